"""Evaluation on PartImageNet's classes (paper Tables 4 and 5).

Table 4 scores the models on PIN's 125-class subset with the logits masked to those classes;
Table 5 on PIN's 11 super-categories. Table 5's list ships with the kit (`SHIPPED["pin158"]`: PartImageNet's 158
classes and their super-categories, as listed publicly by the part-based-models code of Sitawarin et al.; see
`data/SOURCES.md`). The 125-class subset (ROCK's, read from its data files `categorylabel.txt`, which no
repository lists) is an input. Both formats:

    subset file            one wnid per line; blank lines and "# ..." comments ignored
                           (e.g. `pin125.txt`: the 125 PartImageNet classes)
    super-category file    CSV with the header "wnid,supercategory", one class per row
                           (e.g. `pin_supercategories.csv`: the 125 classes → Quadruped, Biped, Fish, ...)

Only images of the listed classes are evaluated. Clean and robust accuracy come from the same
`robust_eval` records as Table 3, on wrapped models: `SubsetLogits` keeps the listed classes'
logits; `SuperCategoryLogits` scores a super-category by the log of its classes' total softmax
probability (log-sum-exp of their logits), so the attack targets the super-category decision itself.
"""
from __future__ import annotations

import csv
import hashlib
import warnings
import io
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import fileio, robust_eval
from .fileio import PinppError
from .ood_sets import spread
from .robust_eval import EvalConfig

_WNID = re.compile(r"^n\d{8}$")
# lists shipped in pinpp_lib/data/pin_subsets (name → file); a RobustnessConfig path may name one
SHIPPED = {"pin158": "pin158_supercategories.csv"}


def shipped(name: str) -> Path:
    """The file of a shipped class list (`SHIPPED`)."""
    from importlib import resources
    return Path(str(resources.files("pinpp_lib.data").joinpath("pin_subsets").joinpath(SHIPPED[name])))
SUBSET_FORMAT = "one wnid per line (e.g. n01443537); '#' starts a comment"
SUPER_FORMAT = "a CSV with the header 'wnid,supercategory' and one row per class"


def read_subset(path: str | Path) -> list[str]:
    """The wnids of a subset file (see the module docstring), in file order."""
    path = Path(path)
    text = fileio.read_text(path, "class-subset file", f"write {SUBSET_FORMAT} (Table 4 needs PIN's 125 classes)")
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        w = line.split("#", 1)[0].strip()
        if w:
            if not _WNID.match(w):
                raise PinppError(f"{path}: line {n} {line!r} is not a wnid; expected {SUBSET_FORMAT}")
            out.append(w)
    if len(set(out)) != len(out) or not out:
        raise PinppError(f"{path}: the subset is empty or repeats a wnid; list each class once")
    return out


def read_supercategories(path: str | Path) -> dict[str, str]:
    """wnid → super-category from a super-category file (see the module docstring)."""
    path = Path(path)
    text = fileio.read_text(path, "super-category file", f"write {SUPER_FORMAT} (Table 5 needs PIN's 11 super-categories)")
    with io.StringIO(text, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"wnid", "supercategory"} <= set(reader.fieldnames):
            raise PinppError(f"{path}: header {reader.fieldnames}; expected {SUPER_FORMAT}")
        out: dict[str, str] = {}
        for n, row in enumerate(reader, 2):
            w, s = (row["wnid"] or "").strip(), (row["supercategory"] or "").strip()
            if not _WNID.match(w) or not s or w in out:
                raise PinppError(f"{path}: row {n} {row}: expected a new wnid and a non-empty super-category")
            out[w] = s
    return out


class SubsetLogits(nn.Module):
    """The model's logits for the classes `keep` only (in that order)."""

    def __init__(self, model: nn.Module, keep: list[int]):
        super().__init__()
        self.model = model
        self.register_buffer("keep", torch.tensor(keep), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[:, self.keep]


class SuperCategoryLogits(nn.Module):
    """Super-category scores: log of the total softmax probability of each group's classes."""

    def __init__(self, model: nn.Module, groups: list[list[int]]):
        super().__init__()
        self.model, self.groups = model, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logp = self.model(x).log_softmax(1)
        return torch.stack([logp[:, g].logsumexp(1) for g in self.groups], 1)


def _tag(items: list[Any]) -> str:
    return hashlib.sha256(repr(items).encode()).hexdigest()[:10]


def _select(y: torch.Tensor, model_classes: list[str], wnids: list[str], where: str,
            images: int = 0) -> tuple[list[int], torch.Tensor]:
    """The listed classes' logit columns and the positions of their images in `y` (at most `images`, spread)."""
    col = {w: j for j, w in enumerate(model_classes)}
    missing = [w for w in wnids if w not in col]
    if missing:
        raise PinppError(f"{where}: {len(missing)} listed class(es) (e.g. {missing[0]}) are not classes of the model")
    listed = torch.tensor([col[w] for w in wnids])
    idx = torch.isin(y, listed).nonzero().squeeze(1)
    # `images` > 0 only in the rehearsal (why: its `robustness.subset_images` in config.py); same code path for fewer
    return [col[w] for w in wnids], idx[spread(list(range(len(idx))), images)]


def _none_evaluated(n: int, where: str) -> list[dict[str, Any]]:
    warnings.warn(f"{where}: none of the {n} evaluation images is of a listed class; its table rows stay empty (n = 0)",
                  stacklevel=3)
    return []


def evaluate_subset(model: nn.Module, x: torch.Tensor, y: torch.Tensor, model_classes: list[str], subset: list[str],
                    cfg: EvalConfig, work_dir: str | Path, device: str | torch.device = "cpu",
                    images: int = 0) -> list[dict[str, Any]]:
    """Table 4 records: images of the subset's classes, logits masked to the subset. `images` (rehearsal): attack at
    most that many of them, spread over the list (0: all)."""
    keep, idx = _select(y, model_classes, subset, "class subset", images)
    if not len(idx):
        return _none_evaluated(len(y), "class subset")
    pos = {j: k for k, j in enumerate(keep)}
    ys = torch.tensor([pos[int(v)] for v in y[idx]])
    recs = robust_eval.evaluate_or_skip(SubsetLogits(model, keep), x[idx], ys, len(keep), cfg,
                                        Path(work_dir) / f"subset_{_tag(subset)}", device=device)
    return [{**r, "index": int(idx[r["index"]]), "classes": len(keep)} for r in recs]


def evaluate_supercategories(model: nn.Module, x: torch.Tensor, y: torch.Tensor, model_classes: list[str],
                             supercats: dict[str, str], cfg: EvalConfig, work_dir: str | Path,
                             device: str | torch.device = "cpu", images: int = 0) -> list[dict[str, Any]]:
    """Table 5 records: images of the listed classes, decisions over super-categories. `images`: as in
    `evaluate_subset`."""
    wnids = sorted(supercats)
    cols, idx = _select(y, model_classes, wnids, "super-category file", images)
    if not len(idx):
        return _none_evaluated(len(y), "super-category file")
    names = sorted(set(supercats.values()))
    groups = [[c for w, c in zip(wnids, cols) if supercats[w] == s] for s in names]
    group_of = {c: names.index(supercats[w]) for w, c in zip(wnids, cols)}
    ys = torch.tensor([group_of[int(v)] for v in y[idx]])
    recs = robust_eval.evaluate_or_skip(SuperCategoryLogits(model, groups), x[idx], ys, len(names), cfg,
                                        Path(work_dir) / f"super_{_tag(sorted(supercats.items()))}", device=device)
    return [{**r, "index": int(idx[r["index"]]), "classes": len(names)} for r in recs]
