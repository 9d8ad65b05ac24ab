"""Tiny-PartImageNet++ (paper App. F): Tiny-ImageNet's classes with PIN++ part masks, and the public Tiny-ImageNet
robust model the paper compares with (Table A5).

    TINY_WNIDS          Tiny-ImageNet's 200 classes (jcjohnson/tiny-imagenet @1c989f8 `200_wnids.txt`, the list its
                        `make_tiny_imagenet.py` is run with)
    select_train        the training images per class as `make_tiny_imagenet.py` draws them: `random.sample` of the
                        class's candidates (theirs: the images with a box annotation, drawn unseeded; here: the images
                        with a part mask, drawn from a recorded seed), 500 per class
    tiny_resize         Tiny-ImageNet's image transform (`resize_image(crop=True)`): the centred square crop, resized to
                        64 × 64 (scipy's `imresize`: PIL bilinear) — how the 64-px model sees an IN-1K image
    WideResNetSwish     the Tiny-ImageNet WRN-28-10 of Wang et al. 2023 (wzekai99/DM-Improves-AT @b390f25
                        `core/models/ti_wideresnetwithswish.py`), restated with its module names so that its
                        checkpoints load: SiLU, BatchNorm momentum 0.01, 'SAME'-padded strided 3×3 convs, pre-activation
                        shortcuts, Tiny-ImageNet's mean/std inside (it takes [0, 1] images, as the kit's models)
    build               the T-PIN++ tree: a converted-layout folder (train/img, train/<part labels>, parts.json,
                        val_1w/) over the selected training images and the IN-1K val images of the classes, which
                        notebook 05's training and evaluation code reads unchanged (labels: the classes' sorted order)
    load_dm_checkpoint  their checkpoint file ({"model_state_dict": ...} of DataParallel(Sequential([Normalization,]
                        model)), `core/utils/train.py` `save_model`) into a WideResNetSwish, weights-only
"""
from __future__ import annotations

import random
import shutil
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from . import checkpoint, fileio, layout, masks, store
from .fileio import PinppError

TINY_WNIDS: tuple[str, ...] = tuple(
    resources.files("pinpp_lib.data").joinpath("tiny_imagenet_200_wnids.txt").read_text().split())
TINY_MEAN, TINY_STD = (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)  # DM-Improves-AT's Tiny-ImageNet statistics


def select_train(candidates: dict[str, Sequence[str]], per_class: int = 500, seed: int = 0) -> dict[str, list[str]]:
    """Class → `per_class` of its candidate images, drawn as `make_tiny_imagenet.py` draws (`random.sample`), from a
    seeded stream over the classes in sorted order and each class's candidates sorted (their draw is from an
    unordered set without a seed: the released Tiny-ImageNet's images cannot be recovered from the code)."""
    rng = random.Random(seed)
    out = {}
    for wnid in sorted(candidates):
        files = sorted(candidates[wnid])
        if len(files) < per_class:
            raise PinppError(f"class {wnid}: {len(files)} training images with part masks, {per_class} needed; "
                             "label the class's unannotated images first (notebook 04) or lower tiny.per_class")
        out[wnid] = rng.sample(files, per_class)
    return out


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target.resolve())


def build(converted: str | Path, imagenet_val: str | Path, out: str | Path, classes: Sequence[str] = TINY_WNIDS,
          per_class: int = 500, seed: int = 0, seg_dir: str = layout.TRAIN_SEG_DIR) -> dict:
    """Write (or reuse) the T-PIN++ tree at `out` from the converted release; returns its record.

    Training: `select_train` over each class's train images that have a label map in `seg_dir` (real + pseudo CF:
    every image after notebook 04). Evaluation: every IN-1K val image of the classes, from `imagenet_val/<wnid>/`
    (ImageNet's val in class folders). Everything is linked, nothing copied; the tree is reused while its classes,
    draw and inputs are unchanged."""
    converted, out, val = Path(converted), Path(out), Path(imagenet_val)
    img_root, seg_root = converted / "train" / "img", converted / "train" / seg_dir
    missing = [w for w in classes if not (img_root / w).is_dir()]
    if missing:
        raise PinppError(f"{img_root}: {len(missing)} of the {len(classes)} T-PIN++ classes have no training images "
                         f"(e.g. {missing[0]}); convert the full release first (notebook 00)")
    cands = {w: [f"{w}/{f.name}" for f in sorted((img_root / w).iterdir()) if masks.seg_path_for(seg_root, f"{w}/{f.name}").exists()]
             for w in classes}
    vals = {}
    for w in classes:
        if not (val / w).is_dir():
            raise PinppError(f"{val / w}: the IN-1K val images of {w} not found; T-PIN++ is evaluated on every val image of "
                             "its classes, from ImageNet's val in class folders (<imagenet val>/<wnid>/<file>)")
        vals[w] = sorted(f.name for f in (val / w).iterdir() if f.is_file() or f.is_symlink())
    ident = store.Identity("tpinpp", {"classes": sorted(classes), "per_class": per_class, "seed": seed, "seg_dir": seg_dir},
                           {"candidates": store.names_digest(sorted(c for v in cands.values() for c in v)),
                            "val": store.names_digest(sorted(f"{w}/{f}" for w, fs in vals.items() for f in fs)),
                            "parts": fileio.sha256_file(converted / "parts.json")})
    done = store.finished(out, ident, "tpinpp.json")
    if done is not None:
        return done
    chosen = select_train(cands, per_class, seed)
    for sub in ("train", "val_1w"):  # links of an earlier draw (only links live there)
        shutil.rmtree(out / sub, ignore_errors=True)
    order = sorted(classes)
    for w in order:
        for rel in chosen[w]:
            _link(img_root / rel, out / "train" / "img" / rel)
            _link(masks.seg_path_for(seg_root, rel), masks.seg_path_for(out / "train" / seg_dir, rel))
    _link(converted / "parts.json", out / "parts.json")
    lines = []
    for label, w in enumerate(order):
        _link(val / w, out / "val_1w" / "img" / w)
        lines += [f"{w}/{f} {label}" for f in vals[w]]
    fileio.write_text(out / "val_1w" / "val_list.txt", "\n".join(lines) + "\n")
    fileio.write_json(out / "train_images.json", {w: chosen[w] for w in order}, indent=1)
    return store.finish(out, ident, [out / "train_images.json", out / "val_1w" / "val_list.txt"],
                        {"classes": len(order), "train_images": sum(map(len, chosen.values())), "val_images": len(lines)},
                        "tpinpp.json")


def tiny_resize(img: Image.Image, size: int = 64) -> Image.Image:
    """The centred square crop (offset (long − short) // 2, Python 2's integer division) resized to `size` × `size`
    with PIL's bilinear filter (what scipy.misc.imresize called)."""
    w, h = img.size
    if h > w:
        h0 = (h - w) // 2
        img = img.crop((0, h0, w, h0 + w))
    elif w > h:
        w0 = (w - h) // 2
        img = img.crop((w0, 0, w0 + h, h))
    return img.convert("RGB").resize((size, size), Image.BILINEAR)


class _Block(nn.Module):
    """A pre-activation WRN block. With a channel change the activated input feeds both the conv and the 1×1 shortcut;
    otherwise the raw input is the residual."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.batchnorm_0 = nn.BatchNorm2d(cin, momentum=0.01)
        self.relu_0 = nn.SiLU(inplace=True)
        self.conv_0 = nn.Conv2d(cin, cout, 3, stride=stride, padding=0, bias=False)  # padded by hand ('SAME')
        self.batchnorm_1 = nn.BatchNorm2d(cout, momentum=0.01)
        self.relu_1 = nn.SiLU(inplace=True)
        self.conv_1 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.has_shortcut = cin != cout
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if self.has_shortcut else None
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu_0(self.batchnorm_0(x))
        if self.has_shortcut:
            x = act
        pad = (1, 1, 1, 1) if self.stride == 1 else (0, 1, 0, 1)  # TensorFlow's 'SAME' for stride 2: right/bottom only
        out = self.conv_1(self.relu_1(self.batchnorm_1(self.conv_0(F.pad(act, pad)))))
        return (self.shortcut(x) if self.has_shortcut else x) + out


class _BlockGroup(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int):
        super().__init__()
        self.block = nn.Sequential(*[_Block(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class WideResNetSwish(nn.Module):
    """WRN-depth-width with SiLU for 64-px Tiny-ImageNet images in [0, 1] (normalised inside)."""

    def __init__(self, num_classes: int = 200, depth: int = 28, width: int = 10):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth {depth}: must be 6n + 4")
        n, ch = (depth - 4) // 6, [16, 16 * width, 32 * width, 64 * width]
        self.register_buffer("mean", torch.tensor(TINY_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(TINY_STD).view(1, 3, 1, 1), persistent=False)
        self.init_conv = nn.Conv2d(3, ch[0], 3, stride=1, padding=1, bias=False)
        self.layer = nn.Sequential(_BlockGroup(n, ch[0], ch[1], 1), _BlockGroup(n, ch[1], ch[2], 2),
                                   _BlockGroup(n, ch[2], ch[3], 2))
        self.batchnorm = nn.BatchNorm2d(ch[3], momentum=0.01)
        self.relu = nn.SiLU(inplace=True)
        self.logits = nn.Linear(ch[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.batchnorm(self.layer(self.init_conv((x - self.mean) / self.std))))
        return self.logits(F.adaptive_avg_pool2d(out, 1).flatten(1))


def load_dm_checkpoint(path: str | Path, num_classes: int = 200, depth: int = 28, width: int = 10) -> WideResNetSwish:
    """A DM-Improves-AT Tiny-ImageNet checkpoint (e.g. `tiny_linf_wrn28-10.pt`) as a WideResNetSwish in eval mode.

    Their files hold {"model_state_dict": state} of DataParallel(Sequential(model)) or, trained with --normalize,
    DataParallel(Sequential(Normalization, model)) (no tensors of its own): keys "module.0.<name>" / "module.1.<name>"."""
    state = checkpoint.load(path)
    state = state.get("model_state_dict", state) if isinstance(state, dict) else state
    model = WideResNetSwish(num_classes, depth, width)
    own = model.state_dict()
    stripped = {}
    for k, v in state.items():
        parts = k.split(".")
        parts = parts[1:] if parts[0] == "module" else parts
        parts = parts[1:] if parts and parts[0].isdigit() else parts
        stripped[".".join(parts)] = v
    missing = [k for k in own if k not in stripped or stripped[k].shape != own[k].shape]
    if missing:
        raise PinppError(f"{path}: not a WRN-{depth}-{width} Tiny-ImageNet checkpoint of DM-Improves-AT (missing or "
                         f"reshaped: {missing[0]}); download tiny_linf_wrn28-10.pt from huggingface.co/wzekai99/DM-Improves-AT1")
    model.load_state_dict({k: stripped[k] for k in own})
    return model.eval()


def class_order(wnids: Sequence[str] = TINY_WNIDS) -> list[str]:
    """The 200 classes in the order of the WRN's logits: sorted wnids (the folder order of tiny-imagenet-200/train,
    which torchvision's ImageFolder and the usual .npz repacks use; DM-Improves-AT's `train.npz` labels could not be
    read here — docs/FIDELITY.md, App. F)."""
    return sorted(wnids)


def authors_tiny_resize(img: Image.Image, size: int = 64) -> Image.Image:
    """The authors' evaluation of a non-224 model (LixiaoTHU/PartImageNetPP @e132f50 `eval.py` `build_transform`, the
    "for tiny" branch): `transforms.Resize(size, BICUBIC)` — the shorter side to `size`, no crop (square only for
    square inputs, so their batches imply images prepared square; which images the paper fed it is not in the code)."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)  # torchvision's _compute_resized_output_size: truncation
    new = (size, new_long) if w <= h else (new_long, size)
    return img.convert("RGB").resize(new, Image.BICUBIC)


TINY_TRANSFORMS = {"tiny_imagenet": tiny_resize, "authors_eval": authors_tiny_resize}


def tiny_batch(paths: Sequence[str | Path], size: int = 64, transform: str = "tiny_imagenet") -> torch.Tensor:
    """IN-1K images as the 64-px model sees them (`TINY_TRANSFORMS`: Tiny-ImageNet's own centre crop + bilinear, or the
    authors' `eval.py` resize), [0, 1] floats, N × 3 × H × W (one size per batch)."""
    arrs = [np.asarray(TINY_TRANSFORMS[transform](Image.open(p), size), dtype=np.float32) / 255 for p in paths]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()
