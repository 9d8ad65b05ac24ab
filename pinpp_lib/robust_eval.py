"""Robust accuracy with AutoAttack (paper §4.3, App. D; facts §7).

`standard` AutoAttack (APGD-CE → APGD-T → FAB-T → Square) from PyPI's `pyautoattack`, at L∞ 4/255,
L2 2.0, L1 75 and a stronger L∞ 8/255, on the evaluation list (10 images per class in full).
Robust accuracy is the per-image worst case over the attacks.

Per-image records: the library's own `run_standard_evaluation` is run one stage at a time on the
images still robust (same seed, order and batching as one call, so the numbers are identical — see
benchmarks/bench_train.py), which lets us record after which stage each image fell, checkpoint
between stages, and resume. Work is sharded by image range. `mode="pgd"` is a fast PGD-k L∞
development mode whose records are flagged `standard: false`.
"""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import fileio, store
from .reporting import accuracy, wilson  # noqa: F401  (wilson: re-exported for callers of this module)
from .attacks import pgd_linf
from .checks import Checked, Rule, at_least, between, each, one_of
from .fileio import PinppError

THREATS: dict[str, tuple[str, float]] = {"Linf-4/255": ("Linf", 4 / 255), "L2-2.0": ("L2", 2.0),
                                         "L1-75": ("L1", 75.0), "Linf-8/255": ("Linf", 8 / 255)}
STAGES = ("apgd-ce", "apgd-t", "fab-t", "square")


@dataclass
class EvalConfig(Checked):
    """AutoAttack evaluation settings (defaults: the paper's protocol)."""
    threats: tuple[str, ...] = tuple(THREATS)
    mode: str = "autoattack"          # autoattack | pgd (dev only, non-standard)
    pgd_steps: int = 20
    batch_size: int = 250
    seed: int = 0
    clean_floor: float | None = None  # default: 2 × chance; below it, attacking is refused
    LIMITS: ClassVar[dict[str, Rule]] = {"threats": each(one_of(*THREATS)), "mode": one_of("autoattack", "pgd"),
                                         "pgd_steps": at_least(1), "batch_size": at_least(1), "seed": at_least(0),
                                         "clean_floor": between(0, 1)}


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """Argmax predictions, batched, without gradients."""
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            out.append(model(x[i:i + batch_size]).argmax(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def paired_diff_ci(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a − b over the same images and its 95% percentile-bootstrap interval (resampling images)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    d = a - b
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(n_boot, len(d)))
    boots = d[idx].mean(1)
    return float(d.mean()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def _autoattack_stages(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, eps: float, cfg: EvalConfig,
                       state_path: Path, ident: store.Identity, device: torch.device) -> dict[str, list[bool]]:
    from pyautoattack import AutoAttack
    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    if state.get("identity") != ident.sha256:  # a resume point of another model, image set or setting: start over
        state = {"identity": ident.sha256}
    if "clean" not in state:
        state["clean"] = (predict(model, x.to(device), cfg.batch_size) == y).tolist()
        fileio.write_json(state_path, state)
    robust = torch.tensor(state["clean"])
    adversary = AutoAttack(model, norm=norm, eps=eps, version="standard", device=device, seed=cfg.seed)
    for stage in adversary.attacks_to_run:
        if stage in state:
            robust = torch.tensor(state[stage])
            continue
        idx = robust.nonzero().squeeze(1)
        if len(idx):
            adversary.attacks_to_run = [stage]  # the library's loop, for this stage alone
            x_adv, _ = adversary.run_standard_evaluation(x[idx].to(device), y[idx].to(device), batch_size=cfg.batch_size)
            robust[idx] = predict(model, x_adv, cfg.batch_size) == y[idx]
        state[stage] = robust.tolist()
        fileio.write_json(state_path, state)  # resume point: the next stage
    return {k: v for k, v in state.items() if k != "identity"}


def identity(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: str, cfg: EvalConfig, start: int) -> store.Identity:
    """What a shard's records depend on: the model's weights, the images and labels, the threat and the attack settings."""
    settings = {"threat": threat, "mode": cfg.mode, "seed": cfg.seed, "batch_size": cfg.batch_size, "start": start, "n": len(x)}
    if cfg.mode == "pgd":
        settings["pgd_steps"] = cfg.pgd_steps
        settings["pgd_start"] = "seeded per batch"  # records of the unseeded start (global RNG) are not reused
    return store.Identity("robust-eval", settings, {"model": store.module_digest(model), "images": store.tensor_digest(x),
                                                    "labels": store.tensor_digest(y)})


def evaluate_threat(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: str, cfg: EvalConfig,
                    work_dir: Path, start: int = 0, device: str | torch.device = "cpu") -> list[dict[str, Any]]:
    """Per-image records for one threat model on images x (indices start..start+len(x) of the list); reused
    only for the same weights, images and settings (`identity`)."""
    norm, eps = THREATS[threat]
    device = torch.device(device)
    model = model.to(device).eval()
    tag = f"{threat.replace('/', '_')}_{cfg.mode}_{start}-{start + len(x)}"
    ident = identity(model, x, y, threat, cfg, start)
    done = store.finished(work_dir, ident, f"records_{tag}.json")
    if done is not None:
        return done["records"]
    if cfg.mode == "pgd":
        if norm != "Linf":
            raise PinppError(f"PGD dev mode supports L∞ threats only, not {threat}; use mode=autoattack")
        clean = (predict(model, x.to(device), cfg.batch_size) == y)
        xa = []
        for i in range(0, len(x), cfg.batch_size):
            # the random start of each batch drawn from (seed, its first image's index in the list): the same records
            # whatever ran before in this process (notebook 05 evaluates runs in worker processes) and in any shard
            with _seeded(cfg.seed * 1_000_003 + start + i, device):
                xa.append(pgd_linf(model, x[i:i + cfg.batch_size].to(device), y[i:i + cfg.batch_size].to(device), eps,
                                   cfg.pgd_steps, 2.5 * eps / cfg.pgd_steps).cpu())
        xa = torch.cat(xa)
        stages = {"clean": clean.tolist(), f"pgd-{cfg.pgd_steps}": (clean & (predict(model, xa.to(device)) == y)).tolist()}
    else:
        stages = _autoattack_stages(model, x, y, norm, eps, cfg, work_dir / f"._state_{tag}.json", ident, device)
    names = [k for k in stages if k != "clean"]
    records = [{"index": start + i, "label": int(y[i]), "threat": threat, "standard": cfg.mode == "autoattack",
                "clean": bool(stages["clean"][i]), **{s: bool(stages[s][i]) for s in names},
                "robust": bool(stages[names[-1]][i]) if names else bool(stages["clean"][i])} for i in range(len(x))]
    work_dir.mkdir(parents=True, exist_ok=True)
    store.finish(work_dir, ident, [], {"records": records}, f"records_{tag}.json")
    (work_dir / f"._state_{tag}.json").unlink(missing_ok=True)
    return records


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Within: the CPU (and this CUDA device's) generator seeded with `seed`; the states before are restored."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.random.default_generator.manual_seed(seed)  # not torch.manual_seed: see training._seed_step
        if cuda:
            torch.cuda.manual_seed(seed)
        yield


class BelowCleanFloor(PinppError):
    """The model's clean accuracy is below the floor: it is not attacked."""


def check_clean_floor(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, floor: float | None,
                      device: str | torch.device = "cpu") -> float:
    """Clean accuracy; refuses to attack a model below the floor (default 2 × chance).

    A model near chance is usually a preprocessing or checkpoint mistake (e.g. normalising twice);
    attacking it would produce meaningless robust accuracies.
    """
    acc = float((predict(model.to(device).eval(), x.to(device)) == y).float().mean())
    floor = 2.0 / num_classes if floor is None else floor
    if acc < floor:
        raise BelowCleanFloor(f"clean accuracy {acc:.3f} is below the floor {floor:.3f}: check the checkpoint and the "
                         "preprocessing (models take [0, 1] images and normalise inside); set clean_floor to override")
    return acc


# Standard AutoAttack's targeted stages and their target classes (pyautoattack `_set_version("standard")`, the same
# as the copy vendored in LixiaoTHU/PartImageNetPP): APGD-T 9 at L∞/L2 and 5 at L1 (with use_largereps), FAB-T 9 at
# every norm — all four stages run at every norm.
STANDARD_TARGETS = {"Linf": {"apgd-t": 9, "fab-t": 9}, "L2": {"apgd-t": 9, "fab-t": 9}, "L1": {"apgd-t": 5, "fab-t": 9}}


def classes_needed(norm: str) -> int:
    """Classes a model needs for standard AutoAttack at `norm`: its targeted stages' targets plus the true class."""
    return 1 + max(STANDARD_TARGETS[norm].values())


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, cfg: EvalConfig, work_dir: str | Path,
             start: int = 0, device: str | torch.device = "cpu") -> list[dict[str, Any]]:
    """All threats of `cfg` on one shard: clean floor check, then per-image records for each threat."""
    work_dir = Path(work_dir)
    if cfg.mode == "autoattack":
        need = max(classes_needed(THREATS[t][0]) for t in cfg.threats)
        if num_classes < need:
            raise PinppError(f"standard AutoAttack needs at least {need} classes (its targeted attacks use "
                             f"{need - 1} target classes); this model has {num_classes} — use more classes "
                             "(e.g. `pinpp synth --classes 10`) or mode=pgd for development")
    check_clean_floor(model, x, y, num_classes, cfg.clean_floor, device)
    out = []
    for threat in tqdm(cfg.threats, desc="threats", leave=False):
        out += evaluate_threat(model, x, y, threat, cfg, work_dir, start, device)
    return out


def evaluate_or_skip(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, cfg: EvalConfig,
                     work_dir: str | Path, start: int = 0, device: str | torch.device = "cpu") -> list[dict[str, Any]]:
    """`evaluate`, except that a model below the clean floor keeps its clean flags and gets robust=None
    ("not attacked") instead of an exception — so a table can still show it."""
    try:
        return evaluate(model, x, y, num_classes, cfg, work_dir, start, device)
    except BelowCleanFloor as e:
        clean = predict(model.to(device).eval(), x.to(device)) == y
        return [{"index": start + i, "label": int(y[i]), "threat": t, "standard": cfg.mode == "autoattack",
                 "clean": bool(clean[i]), "robust": None, "note": f"not attacked: {e}"}
                for t in cfg.threats for i in range(len(y))]


def summarise(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Clean and robust accuracy (with 95% Wilson intervals) per threat, in %."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by.setdefault(r["threat"], []).append(r)
    out = {}
    for t, rs in by.items():
        rob = accuracy(r["robust"] for r in rs)
        out[t] = {"n": rob.n, "clean": accuracy(r["clean"] for r in rs).value, "robust": rob.value, "robust_lo": rob.lo,
                  "robust_hi": rob.hi, "standard": all(r["standard"] for r in rs)}
    return out
