"""model-vs-human consistency metrics (paper Table 8) as the toolbox computes them (bethgelab/model-vs-human @79ed7cd,
`modelvshuman/plotting/analyses.py` and `plot.py`; restated in our own words).

Per dataset, condition and pair of observers (a model and a human subject, or two subjects), on the same trials:

    accuracy difference    (acc_a − acc_b)²
    observed consistency   c_obs = share of trials where both are right or both are wrong
    error consistency      κ = (c_obs − c_exp) / (1 − c_exp),  c_exp = a_a·a_b + (1 − a_a)(1 − a_b); κ = 1 when c_obs = 1
                           (the toolbox's rule, which also covers c_exp = 1)

A model's value: the mean over conditions for each subject, then over subjects, then over datasets. The human noise
ceiling: every unordered pair of subjects once, the mean over conditions per pair, then over pairs, then over
datasets. OOD accuracy: a decision maker's 16-class accuracy over all kept trials of a dataset, then the mean over
datasets. The toolbox's fixed list of excluded conditions (controls, and conditions where humans score < 0.2 on
average) applies to all of them (`data/model_vs_human/excluded_conditions.csv`); conditions are compared as the
toolbox reads them (pandas' parsing of the CSVs, then str). The human side is the benchmark's real trial records,
shipped in `pinpp_lib/data/model_vs_human/` (MIT, see its LICENSE).

A trial is matched to a model decision by its image key: the image name without the trial number,
experiment code and subject ("0001_cop_s02_c30_airplane_10_n02690373_12984.png" →
"c30_airplane_10_n02690373_12984.png"); all subjects of a dataset saw the same keys.
"""
from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from . import fileio
from .imagenet import human16_map
from .fileio import PinppError

METRICS = ["accuracy_difference", "observed_consistency", "error_consistency"]


@functools.lru_cache(maxsize=None)
def excluded_conditions() -> frozenset[tuple[str, str]]:
    """(dataset, condition) pairs the toolbox leaves out (its EXCLUDE_CONDITIONS, shipped as data)."""
    with resources.files("pinpp_lib.data").joinpath("model_vs_human").joinpath("excluded_conditions.csv").open() as f:
        df = pd.read_csv(f, comment="#", dtype=str)
    return frozenset(zip(df["dataset"], df["condition"]))


def data_root() -> Path:
    """The shipped human trial records (one folder per dataset, one CSV per subject and session)."""
    return Path(str(resources.files("pinpp_lib.data").joinpath("model_vs_human")))


def image_key(name: str) -> str:
    """The part of a trial's image name shared by every subject (see the module docstring)."""
    parts = name.split("_")
    if len(parts) < 4:
        raise PinppError(f"image name {name!r}: expected '<trial>_<exp>_<subject>_<rest>'")
    return "_".join(parts[3:])


def load_trials(root: str | Path | None = None, datasets: list[str] | None = None) -> pd.DataFrame:
    """All human trials: dataset, subject, condition, category (truth), response, image key."""
    root = Path(root) if root else data_root()
    if not root.is_dir():
        raise PinppError(f"{root}: model-vs-human trial records not found; expected <dataset>/<dataset>_subject-XX_session_N.csv")
    frames = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and (datasets is None or p.name in datasets)):
        for f in sorted(d.glob("*.csv")):
            df = fileio.read_csv(f, "human trial file", "re-download the raw data (bethgelab/model-vs-human)", dtype=str)
            df.columns = [c.lower() for c in df.columns]  # some files say "Session"
            missing = {"subj", "object_response", "category", "condition", "imagename"} - set(df.columns)
            if missing:
                raise PinppError(f"{f}: missing column(s) {sorted(missing)}; expected the benchmark's raw-data format")
            # the condition as the toolbox sees it: pandas' own parsing of the file, then str ("0.00" -> "0.0")
            parsed = pd.read_csv(f)
            parsed.columns = [c.lower() for c in parsed.columns]
            frames.append(pd.DataFrame({"dataset": d.name, "subject": df["subj"], "condition": parsed["condition"],
                                        "category": df["category"], "response": df["object_response"],
                                        "key": df["imagename"].map(image_key)}))
    if not frames:
        raise PinppError(f"{root}: no trial CSVs found (datasets {datasets or 'all'})")
    out = pd.concat(frames, ignore_index=True)
    out["condition"] = out["condition"].astype(str)
    return out


DECISIONS_FORMAT = "a CSV with columns dataset, imagename (or key), decision (one of the 16 categories)"


def trial_datasets(root: str | Path | None = None) -> list[str]:
    """The datasets that have human trials under `root` (default: the copy shipped with the kit)."""
    root = Path(root) if root else data_root()
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def read_decisions(path: str | Path, datasets: list[str]) -> pd.DataFrame:
    """A model's 16-class decisions from a user's CSV, every row checked: a known dataset, an image name in
    the toolbox's form (or its key), and one of the 16 categories; the first bad row is named in one line."""
    fix = f"expected {DECISIONS_FORMAT}"
    dec = fileio.read_csv(path, "decisions file", fix, dtype=str)
    if "key" not in dec.columns and "imagename" in dec.columns:
        for n, name in enumerate(dec["imagename"], 2):
            if not isinstance(name, str) or len(name.split("_")) < 4:
                raise PinppError(f"{path}: row {n} imagename {name!r}: expected '<trial>_<exp>_<subject>_<rest>' "
                                 "as the toolbox names its images")
        dec["key"] = dec["imagename"].map(image_key)
    missing = {"dataset", "key", "decision"} - set(dec.columns)
    if missing:
        raise PinppError(f"{path}: missing column(s) {sorted(missing)}; {fix}")
    for col, allowed in (("dataset", set(datasets)), ("decision", set(human16_map()))):
        bad = ~dec[col].isin(allowed)
        if bad.any():
            n = int(bad.to_numpy().argmax())
            raise PinppError(f"{path}: row {n + 2} {col} {dec[col].iloc[n]!r}: expected one of {', '.join(sorted(allowed))}; "
                             "fix the row")
    return dec


def pair_metrics(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """The three metrics for two observers' correctness vectors on the same trials (a: model, b: human)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    pa, pb = a.mean(), b.mean()
    c_obs = float((a == b).mean())
    c_exp = float(pa * pb + (1 - pa) * (1 - pb))
    kappa = 1.0 if c_obs == 1.0 else (c_obs - c_exp) / (1 - c_exp)  # c_obs < 1 implies c_exp < 1
    return {"accuracy_difference": float((pa - pb) ** 2), "observed_consistency": c_obs, "error_consistency": kappa,
            "acc_a": float(pa), "acc_b": float(pb)}


def _aggregate(per_condition: pd.DataFrame, unit: list[str]) -> pd.DataFrame:
    """Conditions → `unit` (a subject, or a pair of subjects) → datasets (means), then the mean over datasets as 'all'."""
    by_unit = per_condition.groupby(["dataset", *unit])[METRICS].mean()
    by_dataset = by_unit.groupby("dataset")[METRICS].mean()
    overall = by_dataset.mean().to_frame().T
    overall.index = ["all"]
    return pd.concat([by_dataset, overall])


def kept(trials: pd.DataFrame) -> pd.DataFrame:
    """The trials of the conditions the toolbox keeps."""
    drop = excluded_conditions()
    return trials[[(d, c) not in drop for d, c in zip(trials["dataset"], trials["condition"])]]


def model_vs_humans(decisions: pd.DataFrame, trials: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Metrics of a model's 16-class decisions against every human subject.

    `decisions` has columns dataset, key, decision (one of the 16 category names). Returns the
    per-condition table and the aggregate (per dataset + 'all').
    """
    merged = trials.merge(decisions[["dataset", "key", "decision"]], on=["dataset", "key"], how="left")
    if merged["decision"].isna().any():
        lost = merged[merged["decision"].isna()].iloc[0]
        raise PinppError(f"no model decision for {lost['dataset']}/{lost['key']} "
                         f"({int(merged['decision'].isna().sum())} trials); decide on every image of the datasets")
    rows = []
    for (ds, subj, cond), g in kept(merged).groupby(["dataset", "subject", "condition"]):
        rows.append({"dataset": ds, "subject": subj, "condition": cond,
                     **pair_metrics((g["decision"] == g["category"]).to_numpy(), (g["response"] == g["category"]).to_numpy())})
    per = pd.DataFrame(rows)
    return per, _aggregate(per, ["subject"])


def human_ceiling(trials: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The noise ceiling: every unordered pair of subjects once, on the trials both saw, same aggregation (per pair)."""
    rows = []
    for ds, g in kept(trials).groupby("dataset"):
        wide = g.assign(correct=g["response"] == g["category"]).pivot_table(
            index=["condition", "key"], columns="subject", values="correct", aggfunc="first")
        subjects = sorted(wide.columns)
        for cond, w in wide.groupby(level="condition"):
            for i, s in enumerate(subjects):
                for o in subjects[i + 1:]:
                    both = w[[s, o]].dropna()
                    rows.append({"dataset": ds, "subject": s, "other": o, "condition": cond,
                                 **pair_metrics(both[s].astype(bool).to_numpy(), both[o].astype(bool).to_numpy())})
    per = pd.DataFrame(rows)
    return per, _aggregate(per, ["subject", "other"])


def ood_accuracy(decisions: pd.DataFrame, trials: pd.DataFrame) -> pd.Series:
    """16-class OOD accuracy (fraction) per model and dataset as the toolbox reports it: over the images of the
    dataset's kept conditions (the mean over datasets is its benchmark number). `decisions`: model, dataset, key,
    decision, category; each image's condition is read from `trials`. Index: (model, dataset)."""
    cond = trials.drop_duplicates(["dataset", "key"]).set_index(["dataset", "key"])["condition"]
    d = decisions.drop(columns=["condition"], errors="ignore").join(cond, on=["dataset", "key"])
    if d["condition"].isna().any():
        lost = d[d["condition"].isna()].iloc[0]
        raise PinppError(f"decision for {lost['dataset']}/{lost['key']}: no human trial shows that image; decide on the "
                         "toolbox's images (<dataset>/dnn/session-1/*.png)")
    d = kept(d)
    return (d["decision"] == d["category"]).groupby([d["model"], d["dataset"]]).mean()


def decide16(probs: np.ndarray, class_indices: list[int] | None = None) -> list[str]:
    """16-class decisions from softmax probabilities: mean probability over each category's IN-1K
    classes, argmax (the benchmark's mapping). `class_indices[j]` is the IN-1K index of the model's
    output j (default: outputs are the 1000 IN-1K classes); categories the model cannot express are skipped."""
    mapping = human16_map()
    col = {c: j for j, c in enumerate(class_indices if class_indices is not None else range(probs.shape[1]))}
    names, scores = [], []
    for name, idx in mapping.items():
        js = [col[i] for i in idx if i in col]
        if js:
            names.append(name)
            scores.append(probs[:, js].mean(1))
    if not names:
        raise PinppError("none of the model's classes belongs to a model-vs-human category; 16-class decisions need some")
    return [names[k] for k in np.stack(scores, 1).argmax(1)]
