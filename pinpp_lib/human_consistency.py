"""model-vs-human consistency metrics (paper Table 8; Geirhos et al., described in our own words).

Per dataset, human subject and condition, on the trials that subject saw:

    accuracy difference    (acc_model − acc_human)²
    observed consistency   c_obs = share of trials where both are right or both are wrong
    error consistency      κ = (c_obs − c_exp) / (1 − c_exp),  c_exp = a_m·a_h + (1 − a_m)(1 − a_h)

Each is averaged over conditions, then over subjects, then over datasets. Undistorted control
conditions and conditions where the subject scores below 0.2 are left out. The human side is the
benchmark's real trial records, shipped in `pinpp_lib/data/model_vs_human/` (MIT, see its LICENSE).

A trial is matched to a model decision by its image key: the image name without the trial number,
experiment code and subject ("0001_cop_s02_c30_airplane_10_n02690373_12984.png" →
"c30_airplane_10_n02690373_12984.png"); all subjects of a dataset saw the same keys, which also
gives the human noise ceiling (each subject against each other subject, same aggregation).
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from . import fileio
from .imagenet import human16_map
from .fileio import PinppError

# Undistorted control condition of each parametric dataset (the others have one condition, "0").
CONTROL_CONDITIONS = {
    "colour": {"cr"}, "contrast": {"c100"}, "false-colour": {"true"}, "high-pass": {"inf"}, "low-pass": {"0"},
    "phase-scrambling": {"0"}, "power-equalisation": {"0"}, "rotation": {"0"}, "uniform-noise": {"0.00"},
    "eidolonI": {"1-10-10"}, "eidolonII": {"1-3-10"}, "eidolonIII": {"1-0-10"},
}
MIN_HUMAN_ACCURACY = 0.2


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
            frames.append(pd.DataFrame({"dataset": d.name, "subject": df["subj"], "condition": df["condition"],
                                        "category": df["category"], "response": df["object_response"],
                                        "key": df["imagename"].map(image_key)}))
    if not frames:
        raise PinppError(f"{root}: no trial CSVs found (datasets {datasets or 'all'})")
    return pd.concat(frames, ignore_index=True)


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
    kappa = (c_obs - c_exp) / (1 - c_exp) if c_exp < 1 else np.nan
    return {"accuracy_difference": float((pa - pb) ** 2), "observed_consistency": c_obs, "error_consistency": kappa,
            "acc_a": float(pa), "acc_b": float(pb)}


def _aggregate(per_condition: pd.DataFrame) -> pd.DataFrame:
    """Conditions → subjects → datasets (means), then the overall mean in a row 'all'."""
    cols = ["accuracy_difference", "observed_consistency", "error_consistency"]
    by_subject = per_condition.groupby(["dataset", "subject"])[cols].mean()
    by_dataset = by_subject.groupby("dataset")[cols].mean()
    overall = by_dataset.mean().to_frame().T
    overall.index = ["all"]
    return pd.concat([by_dataset, overall])


def _keep(dataset: str, condition: str, human_acc: float) -> bool:
    return condition not in CONTROL_CONDITIONS.get(dataset, set()) and human_acc >= MIN_HUMAN_ACCURACY


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
    for (ds, subj, cond), g in merged.groupby(["dataset", "subject", "condition"]):
        human = (g["response"] == g["category"]).to_numpy()
        if _keep(ds, cond, human.mean()):
            rows.append({"dataset": ds, "subject": subj, "condition": cond,
                         **pair_metrics((g["decision"] == g["category"]).to_numpy(), human)})
    per = pd.DataFrame(rows)
    return per, _aggregate(per)


def human_ceiling(trials: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The noise ceiling: each subject (as 'model') against each other subject, same aggregation."""
    rows = []
    for ds, g in trials.groupby("dataset"):
        wide = g.assign(correct=g["response"] == g["category"]).pivot_table(
            index=["condition", "key"], columns="subject", values="correct", aggfunc="first")
        subjects = list(wide.columns)
        for cond, w in wide.groupby(level="condition"):
            for s in subjects:
                human = w[s].dropna().astype(bool)
                if not _keep(ds, cond, human.mean()):
                    continue
                for o in subjects:
                    if o != s:
                        other = w[o].reindex(human.index).dropna().astype(bool)
                        rows.append({"dataset": ds, "subject": s, "other": o, "condition": cond,
                                     **pair_metrics(other.to_numpy(), human.loc[other.index].to_numpy())})
    per = pd.DataFrame(rows)
    per = per.groupby(["dataset", "subject", "condition"], as_index=False)[
        ["accuracy_difference", "observed_consistency", "error_consistency"]].mean()
    return per, _aggregate(per)


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
