"""Released weights: the authors' MPM-paper checkpoints as kit runs (paper Table 3, 7, A4; facts §5b).

The authors trained with timm's `CheckpointSaver`: a file holds a dict with `epoch`, `arch`, `state_dict`,
`state_dict_ema`, `optimizer`, `version` and `args` (an `argparse.Namespace`); their `eval.py` evaluates
`state_dict_ema` on ImageNet-normalised images. Their module names (LixiaoTHU/PartImageNetPP
`model/partmodel.py`, `model/model.py`):

    vanilla      timm `resnet50` with every ReLU replaced by GELU (conv1, bn1, layer1-4, fc)
    MPM          segmenter.* (that ResNet without fc), classifer.2 (the fc), cp1/cp2/cp3 (compact 1x1 conv + BN on
                 layer4/3/2), segmenter_head1/2/3 (GELU + separable conv at 7/14/28), up_layer1/2 (top-down,
                 from layer4 to 3 and 3 to 2); a separable conv is `conv1` (depthwise) + `pointwise`
    SV1, SV2     the same modules (the authors' `MPM(level=1|2)` builds all of them) of which the forward uses
                 fewer: level 1 returns the 7x7 head only, level 2 the 7x7 and 14x14 heads
    SV3 w/o TD   `MPM(down=False)`: the up layers are built and never run
    two-stage    segmenter.*, segmenter_head (GELU, BN, separable conv), classifer (the Sitawarin-style classifier)

`import_official` maps these names onto the kit's modules (`models.py`) strictly: every tensor the authors'
forward uses lands in the kit model, nothing the kit model needs is missing, and the only tensors left out are
those of modules the authors' forward never runs for that architecture (listed in the run's metadata). The
result is an ordinary run folder (`ema_<sha12>.pt` + `ema.json` + `done.json`) that `training.load_trained`,
`pinpp eval-aa --run-dir` and notebooks 05/06 read; the imported model takes [0, 1] images (normalised inside)
and gives the authors' class and part logits.
"""
from __future__ import annotations

import argparse
import dataclasses
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from . import checkpoint, fileio, imagenet, models, store
from .datasets import TransformConfig
from .fileio import PinppError

ARCHS = ("plain", "mpm", "mpm_sv1", "mpm_sv2", "mpm_sv3_notd", "twostage")
WEIGHTS = {"ema": "state_dict_ema", "raw": "state_dict"}  # the authors' eval.py loads state_dict_ema

# Modules of the authors' MPM that their forward does not run for an architecture (built, never used).
UNUSED = {"plain": (), "mpm": (), "twostage": (),
          "mpm_sv1": ("cp2", "cp3", "segmenter_head2", "segmenter_head3", "up_layer1", "up_layer2"),
          "mpm_sv2": ("cp3", "segmenter_head3", "up_layer2"),
          "mpm_sv3_notd": ("up_layer1", "up_layer2")}

# authors' module → kit module (prefix rewrites, applied in order; the separable conv's parts after them)
_MPM_NAMES = [("segmenter.", "backbone."), ("classifer.2.", "backbone.fc."),
              ("cp1.", "bypass.compact.4."), ("cp2.", "bypass.compact.3."), ("cp3.", "bypass.compact.2."),
              ("segmenter_head1.", "bypass.heads.7."), ("segmenter_head2.", "bypass.heads.14."),
              ("segmenter_head3.", "bypass.heads.28."), ("up_layer1.", "bypass.down.4."), ("up_layer2.", "bypass.down.3.")]
_TWOSTAGE_NAMES = [("segmenter.", "backbone."), ("segmenter_head.", "seg_head."), ("classifer.", "classifier.")]
_SEPARABLE = [(re.compile(r"\.conv1\.weight$"), ".0.weight"), (re.compile(r"\.pointwise\.weight$"), ".1.weight")]


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's top-level dict, loaded with `weights_only=True`; `argparse.Namespace` (the training
    arguments timm's CheckpointSaver stores) is the only class allowed besides tensors and plain values."""
    path = Path(path)
    if not path.is_file():
        raise PinppError(f"{path}: no such checkpoint file; download it (README, \"Released weights\") and pass its path")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found is None:  # not a refused class: a text file, a torn legacy pickle
            raise PinppError(f"{path}: not a complete PyTorch checkpoint (UnpicklingError: {str(e).splitlines()[0][:80]}); "
                             "download it again and compare its sha256") from None
        what = f"an object of type {found.group(1)}"
        raise PinppError(f"{path}: holds {what}, which a weights-only load refuses; the kit loads tensors, plain values "
                         "and argparse.Namespace only — save the model's state_dict and import that") from None
    except Exception as e:  # a torn zip, a text file, ...: torch raises several types
        raise PinppError(f"{path}: not a complete PyTorch checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:80]}); "
                         "download it again and compare its sha256") from None
    if not isinstance(obj, dict):
        raise PinppError(f"{path}: holds a {type(obj).__name__}, not a checkpoint dict or a state_dict")
    return obj


def state_dict_of(ckpt: dict[str, Any], weights: str, where: str) -> dict[str, torch.Tensor]:
    """The `weights` ("ema" | "raw") state_dict of a CheckpointSaver dict; a bare state_dict is itself."""
    if weights not in WEIGHTS:
        raise PinppError(f"--weights {weights!r}: choose ema (the authors' eval.py) or raw")
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt
    key = WEIGHTS[weights]
    if not isinstance(ckpt.get(key), dict):
        raise PinppError(f"{where}: no {key!r} in the checkpoint (it has {sorted(ckpt)[:8]}); "
                         f"pass --weights {'raw' if weights == 'ema' else 'ema'} or a checkpoint of the authors' training")
    return ckpt[key]


def _rename(key: str, arch: str) -> str | None:
    """The kit's name of one authors' tensor, or None for a tensor of a module the authors' forward never runs."""
    if arch == "plain":
        return key
    if key.split(".")[0] in UNUSED[arch]:
        return None
    for old, new in (_TWOSTAGE_NAMES if arch == "twostage" else _MPM_NAMES):
        if key.startswith(old):
            key = new + key[len(old):]
            break
    else:
        return "?" + key  # no known prefix: reported as unknown
    for pat, rep in _SEPARABLE:
        if not key.startswith("backbone."):
            key = pat.sub(rep, key)
    return key


def _sizes(sd: dict[str, torch.Tensor], arch: str) -> tuple[int, int] | None:
    """(classes, part classes incl. background) from the tensors' shapes; None if the tensors that tell are absent."""
    fc = {"plain": "fc.weight", "twostage": "classifer.8.weight"}.get(arch, "classifer.2.weight")
    seg = {"plain": None, "twostage": "segmenter_head.2.pointwise.weight"}.get(arch, "segmenter_head1.1.pointwise.weight")
    if fc not in sd or (seg is not None and seg not in sd):
        return None
    return int(sd[fc].shape[0]), int(sd[seg].shape[0]) if seg else 0


def map_state_dict(sd: dict[str, torch.Tensor], arch: str, where: str = "checkpoint",
                   guess: bool = True) -> tuple[torch.nn.Module, list[str]]:
    """The kit model of `arch` loaded with the authors' tensors `sd` (strict), and the authors' keys left out
    (those of modules their forward does not run). One line on any unknown, missing or mis-shaped tensor, naming
    the --arch that fits the tensors where one does (`guess`)."""
    if arch not in ARCHS:
        raise PinppError(f"--arch {arch!r}: choose one of {', '.join(ARCHS)}")
    if sd and all(k.startswith("module.") for k in sd):  # saved from a DistributedDataParallel wrapper
        sd = {k[len("module."):]: v for k, v in sd.items()}
    sizes = _sizes(sd, arch)
    if sizes is None:
        raise PinppError(f"{where}: not the authors' --arch {arch} layout (no classifier or part head of that "
                         f"architecture){_guess(sd, arch) if guess else ''}")
    num_classes, seg_classes = sizes
    model = models.build(arch, "r50", num_classes, seg_classes or 3311)
    want = model.state_dict()
    mapped, dropped, unknown = {}, [], []
    for k, v in sd.items():
        new = _rename(k, arch)
        if new is None:
            dropped.append(k)
        elif new not in want:
            unknown.append(k)
        else:
            mapped[new] = v
    missing = [k for k in want if k not in mapped]
    if unknown or missing:
        detail = (f"{len(unknown)} unknown tensor(s), e.g. {unknown[:2]}" if unknown else "") + \
                 ("; " if unknown and missing else "") + (f"{len(missing)} missing, e.g. {missing[:2]}" if missing else "")
        raise PinppError(f"{where}: not the authors' --arch {arch} layout ({detail}){_guess(sd, arch) if guess else ''}")
    for k, v in mapped.items():
        if v.shape != want[k].shape:
            raise PinppError(f"{where}: {k} has shape {tuple(v.shape)}, the --arch {arch} model needs {tuple(want[k].shape)}")
    model.load_state_dict(mapped, strict=True)
    return model.eval(), dropped


def _fits(sd: dict[str, torch.Tensor], arch: str) -> bool:
    try:
        map_state_dict(sd, arch, guess=False)
        return True
    except PinppError:
        return False


def _guess(sd: dict[str, torch.Tensor], tried: str) -> str:
    """'; it fits --arch X' when another architecture takes these tensors exactly."""
    fits = [a for a in ARCHS if a != tried and _fits(sd, a)]
    return f"; it fits --arch {' or '.join(fits)}" if fits else "; no --arch fits it"


def import_official(checkpoint_file: str | Path, arch: str, out: str | Path, weights: str = "ema",
                    classes: list[str] | None = None) -> dict[str, Any]:
    """Write the kit run folder `out` from one of the authors' checkpoints; returns its done record.
    `classes`: the wnids of the model's outputs (default: the 1000 IN-1K classes in sorted-wnid order, the
    authors' label order). Reused while the checkpoint's bytes and the options are unchanged."""
    src, out = Path(checkpoint_file), Path(out)
    sha = fileio.sha256_file(src) if src.is_file() else ""
    ident = store.Identity("import-official", {"arch": arch, "weights": weights}, {"checkpoint": sha})
    done = store.finished(out, ident)
    if done is not None:
        return done
    if store.stale(out, ident):
        raise PinppError(f"{out}: holds another import or a trained run; choose another --out or delete the folder")
    ckpt = read_checkpoint(src)
    args = ckpt.get("args")
    _check_normalisation(args, src)
    _check_args(args, arch, src)
    model, dropped = map_state_dict(state_dict_of(ckpt, weights, str(src)), arch, str(src))
    num_classes = model.num_classes if arch == "plain" else (model.backbone.num_classes if arch != "twostage"
                                                             else model.classifier[-1].out_features)
    seg = getattr(model, "seg_classes", 0)
    wnids = classes or [c["wnid"] for c in imagenet.classes()]
    if len(wnids) != num_classes:
        raise PinppError(f"{src}: the model has {num_classes} classes, the class list {len(wnids)}; pass --classes FILE "
                         "(one wnid per line, in the model's output order)")
    return write_run(out, ident, model, arch, wnids, seg or 3311, {
        "file": src.name, "sha256": sha, "weights": WEIGHTS[weights], "epoch": ckpt.get("epoch"), "arch": ckpt.get("arch"),
        "model": getattr(args, "model", None), "unused_tensors": sorted({k.split(".")[0] for k in dropped})})


def write_run(out: Path, ident: store.Identity, model: torch.nn.Module, variant: str, classes: list[str],
              seg_classes: int, source: dict[str, Any]) -> dict[str, Any]:
    """An imported model as a kit run folder (ema_<sha12>.pt, ema.json, done.json) that `training.load_trained`
    and `pinpp eval-aa` read; its config holds the kit's evaluation transform. Returns the done record."""
    meta = {"variant": variant, "arch": "r50", "num_classes": len(classes), "seg_classes": seg_classes, "classes": classes,
            "config": {"transform": _jsonable(TransformConfig()), "imported": True},
            "params": models.count_params(model), "deployable_params": models.deployed_params(model), "source": source}
    w = checkpoint.save_weights(out / "ema", model.state_dict(), meta)
    side = fileio.read_json(out / "ema.json")
    return store.finish(out, ident, [w], {**meta, "weights": str(w), "sha256": side["sha256"], "out": str(out)})


# What the authors' training arguments say each architecture is: (model_type, partmodel_type, level, down).
# Their SV1/SV2/SV3 w/o TD checkpoints hold the same tensors as MPM's, so only the arguments tell them apart.
ARGS = {"plain": ("original", None, None, None), "mpm": ("partmodel", "MPM", 3, True),
        "mpm_sv1": ("partmodel", "MPM", 1, True), "mpm_sv2": ("partmodel", "MPM", 2, True),
        "mpm_sv3_notd": ("partmodel", "MPM", 3, False), "twostage": ("partmodel", "twostage", None, None)}


def _check_args(args: Any, arch: str, src: Path) -> None:
    """Refuse an --arch that the checkpoint's own training arguments contradict (when it has them)."""
    if args is None or getattr(args, "model_type", None) is None:
        return
    theirs = (args.model_type, getattr(args, "partmodel_type", None), getattr(args, "level", None), getattr(args, "down", None))

    def fits(a: str) -> bool:
        want = ARGS[a]
        return all(w is None or t == w for w, t in zip(want, theirs)) and (want[0] == theirs[0])
    if not fits(arch):
        other = [a for a in ARCHS if fits(a)]
        raise PinppError(f"{src}: its training arguments (model_type={theirs[0]}, partmodel_type={theirs[1]}, level={theirs[2]}, "
                         f"down={theirs[3]}) are not --arch {arch}; " + (f"use --arch {other[0]}" if other else "no --arch fits them"))


def _jsonable(cfg: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def _check_normalisation(args: Any, src: Path) -> None:
    """The kit's models normalise with ImageNet's mean/std; a checkpoint trained with others is refused."""
    for name, ours in (("mean", imagenet.IMAGENET_MEAN), ("std", imagenet.IMAGENET_STD)):
        theirs = getattr(args, name, None)
        if theirs is not None and [round(float(v), 4) for v in theirs] != [round(v, 4) for v in ours]:
            raise PinppError(f"{src}: trained with {name} {list(theirs)}, the kit's models normalise with ImageNet's "
                             f"{list(ours)}; this checkpoint cannot be imported as is")


def to_authors(model: torch.nn.Module, arch: str) -> dict[str, torch.Tensor]:
    """The kit model's tensors under the authors' module names (the inverse of `map_state_dict`), for the
    architectures whose authors' model has no unused modules (plain, mpm, twostage)."""
    if UNUSED.get(arch, ()) or arch not in ARCHS:
        raise PinppError(f"--arch {arch!r}: the authors' layout can be written for plain, mpm and twostage only")
    names = sorted(_TWOSTAGE_NAMES if arch == "twostage" else _MPM_NAMES, key=lambda p: -len(p[1]))  # backbone.fc. first
    out = {}
    for k, v in model.state_dict().items():
        theirs = k
        if arch != "plain":
            parent, _, leaf = k.rpartition(".")
            mod, _, part = parent.rpartition(".")
            if leaf == "weight" and part in ("0", "1") and isinstance(model.get_submodule(mod), models.SeparableConv):
                theirs = f"{mod}.{'conv1' if part == '0' else 'pointwise'}.weight"
            old, new = next(p for p in names if theirs.startswith(p[1]))
            theirs = old + theirs[len(new):]
        assert _rename(theirs, arch) == k, (k, theirs)  # the import maps it back onto the same tensor
        out[theirs] = v
    return out


def write_standin(path: str | Path, arch: str, seed: int = 0, num_classes: int = 1000, seg_classes: int = 3311) -> Path:
    """A checkpoint in the authors' released layout (timm CheckpointSaver dict, their module names, their training
    arguments) holding seeded random weights: what the rehearsal profile evaluates where the real files would be.
    Kept if the file exists (a real checkpoint is never overwritten)."""
    path = Path(path)
    if path.exists():
        return path
    torch.manual_seed(seed)
    sd = to_authors(models.build(arch, "r50", num_classes, seg_classes), arch)
    model_type, partmodel_type, level, down = ARGS[arch]
    args = argparse.Namespace(model="resnet50", model_type=model_type, partmodel_type=partmodel_type, level=level, down=down,
                              mean=list(imagenet.IMAGENET_MEAN), std=list(imagenet.IMAGENET_STD))
    path.parent.mkdir(parents=True, exist_ok=True)
    with fileio.atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save({"epoch": 0, "arch": "resnet50", "state_dict": sd, "state_dict_ema": sd, "optimizer": {}, "version": 2,
                    "args": args}, f)
    return path
