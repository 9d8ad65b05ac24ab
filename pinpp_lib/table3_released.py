"""Table 3 from released weights: the authors' vanilla / MPM AT checkpoints and the public ResNet-50 AT models
(paper Table 3; issue 14).

Training MPM AT takes days on 8 GPUs; evaluating a released checkpoint takes hours on one. The paper re-evaluated
every reference model on its own list (10 val images per class) with AutoAttack at four threats; this module does
the same with the kit's AutoAttack on the kit's evaluation list, for every model whose weights are present:

    <released>/official_vanilla_at.pth.tar   the authors' vanilla AT checkpoint (their Drive folder) → --arch plain
    <released>/official_mpm_at.pth.tar       the authors' MPM AT checkpoint                        → --arch mpm
    <released>/<zoo file>                    a zoo model, where `pinpp zoo fetch NAME` puts it

(<released> = `<data root>/released`). A present file is imported once into `<released>/runs/<name>` (reused while
its bytes are unchanged); a run folder written there by hand (`pinpp import-official ... --out`) is used as it is.
Each measured model gets a "measured (released weights)" row beside its published one; a model whose weights are
absent keeps its published row with the one command that gets them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import jobs, robust_eval, tables, zoo
from .fileio import PinppError
from .datasets import list_image_folder
from .mpm_experiments import threat_row
from .robust_eval import EvalConfig

if TYPE_CHECKING:
    from .mpm_experiments import ExperimentConfig

PROTOCOL = "released"  # the records' protocol column: Table 3's threats and mode, on a released model
AUTHORS_DRIVE = "https://drive.google.com/drive/folders/1chr4IKr7JqnS02pVwZV6yNAgxAP58gg9"  # their README


@dataclass(frozen=True)
class ReleasedModel:
    """One Table 3 model that has released weights."""
    name: str    # its run folder under <released>/runs, and the zoo name
    model: str   # its Table 3 label
    kind: str    # "official" (the authors' checkpoint, `released.import_official`) or "zoo" (`zoo.import_zoo`)
    arch: str    # import-official --arch, or the zoo row's architecture
    file: str    # where its weights file is expected, relative to <released>
    get: str     # what puts the file there
    why_not: str = ""  # why the kit cannot import it ('' when it can)


def catalogue() -> list[ReleasedModel]:
    """The authors' two Table 3 models, then every zoo row, in the zoo's order."""
    official = [ReleasedModel(f"official_{tag}_at", f"PIN++ authors' {label} AT (released)", "official", arch,
                              f"official_{tag}_at.pth.tar",
                              f"put the authors' {label} AT checkpoint (Drive folder {AUTHORS_DRIVE}) at "
                              f"<released>/official_{tag}_at.pth.tar")
                for tag, label, arch in (("vanilla", "vanilla", "plain"), ("mpm", "MPM", "mpm"))]
    return official + [ReleasedModel(e.name, e.model, "zoo", e.arch, zoo.default_path(e, ".").name, f"`pinpp zoo fetch {e.name}`",
                                     e.why_not) for e in zoo.entries().values()]


def locate(m: ReleasedModel, folder: str | Path) -> Path | None:
    """The run folder of `m` under `folder` (importing its weights file first if it is there), or None when
    neither the file nor a finished run folder is present."""
    from . import released
    if m.why_not:
        return None
    folder = Path(folder)
    src, out = folder / m.file, folder / "runs" / m.name
    if src.is_file():
        if m.kind == "official":
            released.import_official(src, m.arch, out)
        else:
            zoo.import_zoo(m.name, src, out)
        return out
    return out if (out / "done.json").is_file() else None


def label_map(run_classes: list[str], data_classes: list[str], where: str) -> torch.Tensor:
    """For each class of the evaluation data (by index), the output index of the released model (by wnid)."""
    pos = {w: i for i, w in enumerate(run_classes)}
    missing = [w for w in data_classes if w not in pos]
    if missing:
        raise PinppError(f"{where}: the model has no output for {len(missing)} class(es) of the evaluation data, e.g. "
                         f"{missing[:2]}; it was imported with another class list (import it again with --classes FILE)")
    return torch.tensor([pos[w] for w in data_classes])


def evaluate(present: dict[str, Path], data_classes: list[str], cfg: EvalConfig, x: torch.Tensor, y: torch.Tensor,
             device: str = "cpu", n_jobs: int = 1) -> pd.DataFrame:
    """Per-image records (column `run` = the model's name) of every present released model under `cfg` (the
    profile's Table 3 protocol: all four threats in full). Labels are mapped onto each model's outputs by wnid."""
    names = list(present)
    per = jobs.map_jobs(_evaluate_one, [(n, str(present[n]), data_classes, cfg, x, y, device) for n in names], n_jobs,
                        "evaluating released weights")
    rows = [r for recs in per for r in recs]
    df = pd.DataFrame(rows, columns=None if rows else ["run", "protocol", "index", "label", "threat", "standard", "clean",
                                                       "robust"])
    df["robust"] = df["robust"].map(lambda v: np.nan if v is None else float(v))
    return df


def _evaluate_one(name: str, out: str, data_classes: list[str], cfg: EvalConfig, x: torch.Tensor, y: torch.Tensor,
                  device: str) -> list[dict[str, Any]]:
    from .training import load_trained
    model, meta = load_trained(out, device)
    y_model = label_map(meta["classes"], data_classes, out)[y]
    recs = robust_eval.evaluate_or_skip(model, x, y_model, meta["num_classes"], cfg, Path(out) / "aa", device=device)
    return [{"run": name, "protocol": PROTOCOL, **r} for r in recs]


def measure(cfg: ExperimentConfig, folder: str | Path | None, converted: str | Path, x: torch.Tensor,
            y: torch.Tensor) -> tuple[dict[str, Path] | None, pd.DataFrame]:
    """(name → run folder of every released model present under `folder`, their records) — (None, no records)
    where the profile does not evaluate released weights (`cfg.released` False)."""
    if not cfg.released or folder is None:
        return None, evaluate({}, [], cfg.eval, x, y)
    present = {m.name: p for m in tqdm(catalogue(), desc="released weights") if (p := locate(m, folder)) is not None}
    classes, _ = list_image_folder(Path(converted) / "train" / "img")
    return present, evaluate(present, classes, cfg.eval, x, y, cfg.device, cfg.jobs)


def combine(records: pd.DataFrame, released: pd.DataFrame) -> pd.DataFrame:
    """The kit runs' records with the released models' appended (unchanged when there are none)."""
    return records if released.empty else pd.concat([records, released], ignore_index=True)


def rows(records: pd.DataFrame, threats: tuple[str, ...], present: dict[str, Path] | None) -> pd.DataFrame:
    """Table 3's released-model rows: per model, "measured (released weights)" when measured, and its published
    row (the paper's reference numbers where the kit holds them). `present` None: released weights are not
    evaluated in this profile (smoke), the published rows stand alone."""
    published = tables.paper_values("table3").set_index("model")
    out: list[dict[str, Any]] = []
    for m in catalogue():
        if present is not None and m.name in present and m.name in set(records.run):
            r = records[(records.run == m.name) & (records.protocol == PROTOCOL)]
            out.append(threat_row(r, threats, m.model, "measured (released weights)"))
        if m.kind == "zoo":
            e = zoo.entry(m.name)
            if m.model in published.index:  # the paper's reference numbers
                pub = published.loc[m.model]
                row, what = {c: pub[c] for c in published.columns if c != "source"}, f"published: {pub['source']}"
            elif e.published_clean is not None:  # the model's authors' own
                row = {"clean": e.published_clean, "Linf-4/255": e.published_linf4}
                what = f"published: {e.published_eval}"
            else:
                row, what = {}, "published numbers not in the kit"
            if m.why_not:
                what += f"; the kit cannot import its weights: {m.why_not}"
            elif present is not None and m.name not in present:
                what += f"; weights not present — {m.get}"
            out.append({"model": m.model, **row, "source": what})
        elif present is not None and m.name not in present:
            out.append({"model": m.model, "source": f"weights not present — {m.get}"})
    return pd.DataFrame(out)


def write_standins(folder: str | Path, seed: int = 0) -> list[Path]:
    """Seeded random weights for every catalogue model, each in its published layout, where its real file would be
    (rehearsal: the import and evaluation path runs on CPU). Files already there are kept."""
    from . import released
    folder = Path(folder)
    return [released.write_standin(folder / m.file, m.arch, seed) if m.kind == "official"
            else zoo.write_standin(m.name, folder / m.file, seed) for m in catalogue() if not m.why_not]
