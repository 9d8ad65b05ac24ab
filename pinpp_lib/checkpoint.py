"""Checkpoints and EMA for training (paper App. C: EMA 0.9998, EMA weights are evaluated).

A checkpoint is written to a temporary file, hashed, and renamed to `ckpt_<step>_<sha12>.pt` (the name is
the pointer: the newest intact one is resumed from). Loading verifies the hash and uses
`torch.load(weights_only=True)`, so a checkpoint holds only tensors and plain Python values.
A kill at any moment leaves either the previous or the new checkpoint, never a torn one; equal contents
give equal bytes, hence equal names.
"""
from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import fileio
from .fileio import PinppError


class EMA:
    """Exponential moving average of a model's parameters and buffers (timm's ModelEmaV2, as the authors use it):

        e ← d·e + (1 − d)·m   after every optimiser step, with a constant decay d (0.9998 in the paper).

    `warmup=True` uses timm ModelEma's ramp min(d, (1 + n) / (10 + n)) instead (not the authors' choice;
    an option for short runs). Integer buffers (BN's batch counter) are copied.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.warmup, self.updates = decay, warmup, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.mul_(d).add_(m.detach(), alpha=1 - d)
            else:
                e.copy_(m)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "decay": self.decay, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.decay, self.updates = state["decay"], state["updates"]


def save(out_dir: str | os.PathLike, state: dict[str, Any], step: int, keep: int = 2) -> Path:
    """Atomically save `state` as ckpt_<step>_<sha12>.pt and prune all others but the newest `keep` − 1."""
    out_dir = Path(out_dir)
    final, _ = fileio.write_hashed(out_dir, lambda h: f"ckpt_{step:08d}_{h[:12]}.pt", lambda p: _save(state, p))
    others = [p for p in sorted(out_dir.glob("ckpt_*_*.pt")) if p != final]
    for old in others[:max(0, len(others) - (keep - 1))]:
        old.unlink(missing_ok=True)
    return final


def _save(obj: Any, path: Path) -> None:
    """torch.save through a file handle: given a path, torch names the zip archive's folder after the (temporary)
    file name, so equal weights would get different bytes — and different sha256 names."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def load(path: str | os.PathLike, sha256: str | None = None) -> dict[str, Any]:
    """Load a checkpoint safely (weights_only), checking its sha256 against `sha256` or its name."""
    path = Path(path)
    if not path.exists():
        raise PinppError(f"{path}: checkpoint not found; check the path or re-run training")
    digest = fileio.sha256_file(path)
    expected = sha256 or _recorded_sha256(path)
    if expected and not digest.startswith(expected):
        raise PinppError(f"{path}: sha256 {digest[:12]} does not match {expected[:12]}; the file is corrupt or "
                         "was replaced — delete it (training then resumes from an earlier checkpoint or rewrites it)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors have many types; all mean an unusable file here
        raise PinppError(f"{path}: not a loadable weights-only checkpoint ({type(e).__name__}); re-run training") from None


def _recorded_sha256(path: Path) -> str | None:
    """The sha256 the kit recorded for a weights file: in its name (ckpt_/ema_…_<sha12>.pt) or in the
    `save_weights` sidecar (<stem>.json beside <stem>_<sha12>.pt). A file the kit did not write (a user's
    init weights) has none and loads unchecked."""
    if path.stem.startswith(("ckpt_", "ema_")):
        return path.stem.rsplit("_", 1)[-1]
    side = path.with_name(path.stem.rsplit("_", 1)[0] + ".json")
    if side.is_file():
        info = fileio.read_json(side, "weights sidecar", "delete it and the weights file, then re-run")
        if isinstance(info, dict) and info.get("weights") == path.name and info.get("sha256"):
            return str(info["sha256"])
    return None


def latest(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The newest intact checkpoint of a run directory, or None if there is none.

    Checkpoints are found by name (`ckpt_<step>_<sha12>.pt`), newest first; one whose bytes do not match the
    sha256 in its name, or that does not load, is renamed `*.corrupt` with a warning, so a run resumes from
    the checkpoint before it (two are kept) instead of failing on it.
    """
    for path in sorted(Path(out_dir).glob("ckpt_*_*.pt"), reverse=True):
        try:
            return load(path)
        except PinppError as e:  # set aside, so that pruning and the next resume do not meet it again
            path.rename(path.with_name(path.name + ".corrupt"))
            warnings.warn(f"{e}; moved to {path.name}.corrupt — resuming from the checkpoint before it", stacklevel=2)
    return None


def save_weights(path_stem: str | os.PathLike, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Save final weights as <stem>_<sha12>.pt (weights-only loadable) with a JSON sidecar of `meta`."""
    stem = Path(path_stem)
    final, sha = fileio.write_hashed(stem.parent, lambda h: f"{stem.name}_{h[:12]}.pt", lambda p: _save(state_dict, p))
    fileio.write_json(stem.with_suffix(".json"), {**meta, "weights": final.name, "sha256": sha}, indent=1)
    return final
