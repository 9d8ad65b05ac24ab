"""Torch datasets over the converted MPM layout (facts §2) and the authors' transforms (App. C, §4.3).

Images are returned as float tensors in [0, 1] (models normalise inside); masks as int64 (H, W) maps
of global part ids. Joint augmentation uses torchvision's v2 transforms on (Image, Mask) pairs, which
apply one random crop/flip to both and resize masks with nearest-neighbour interpolation.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms import v2

from . import fileio, layout, masks, store
from .checks import Checked, Rule, all_of, at_least, between, each, ordered
from .fileio import PinppError
from .imagenet import IMAGENET_MEAN, IMAGENET_STD

IMG_EXTS = (".jpeg", ".jpg", ".png")


@dataclass
class TransformConfig(Checked):
    """Training/eval transform settings (paper: 224 crop, bicubic, crop pct 0.875, jitter 0.1).

    `re_prob`: timm's RandomErasing (mode "pixel", one block) on the image only; the authors use 0.25
    in the MPM init stage and 0 elsewhere (`TrainConfig.init_stage_re_prob` sets it for that stage)."""
    size: int = 224
    crop_pct: float = 0.875
    scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    color_jitter: float = 0.1
    re_prob: float = 0.0
    LIMITS: ClassVar[dict[str, Rule]] = {"size": at_least(8), "crop_pct": between(0.05, 1), "hflip": between(0, 1),
                                         "scale": all_of(each(between(0, 1)), ordered), "color_jitter": at_least(0),
                                         "re_prob": between(0, 1)}


class JointTrainTransform:
    """Random-resized-crop + flip drawn once and applied to image and mask; colour jitter on the image.

    The image goes through torchvision (bicubic, antialiased); the mask is cropped in numpy while
    still uint16 and resized with cv2's nearest-exact (pixel-centre aligned, like the bicubic image)
    so that it never exists at full resolution as int64 — this keeps masks cheap to load
    (benchmarks/bench_data.py).
    """

    def __init__(self, cfg: TransformConfig):
        self.cfg = cfg
        self.ratio = (3 / 4, 4 / 3)
        j = cfg.color_jitter
        self.jitter = v2.ColorJitter(brightness=j, contrast=j, saturation=j) if j > 0 else None

    def __call__(self, img: torch.Tensor, mask: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """img: uint8 (3, H, W); mask: integer (H, W) array or None → float [0,1] image, int64 mask."""
        size = self.cfg.size
        i, j, h, w = RandomResizedCrop.get_params(img, list(self.cfg.scale), list(self.ratio))
        x = v2.functional.resized_crop(img, i, j, h, w, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)
        m = None
        if mask is not None:
            m = cv2.resize(np.ascontiguousarray(mask[i:i + h, j:j + w]), (size, size), interpolation=cv2.INTER_NEAREST_EXACT)
        if torch.rand(1).item() < self.cfg.hflip:
            x = x.flip(-1)
            m = None if m is None else m[:, ::-1]
        if self.jitter is not None:
            x = self.jitter(x)
        x = v2.functional.to_dtype(x, torch.float32, scale=True)
        if self.cfg.re_prob > 0:
            random_erase(x, self.cfg.re_prob)
        return x, (None if m is None else torch.from_numpy(m.astype(np.int64)))


def random_erase(x: torch.Tensor, prob: float, min_area: float = 0.02, max_area: float = 1 / 3,
                 min_aspect: float = 0.3) -> torch.Tensor:
    """timm's RandomErasing(prob, mode="pixel", max_count=1) on a [0, 1] image (3, H, W), in place.

    timm erases a normalised image with N(0, 1) noise per pixel; the kit's images are normalised inside
    the model, so the block gets mean + std·N(0, 1), which the model's normalisation maps to exactly that
    noise. Up to 10 tries for a block (area 2–33 %, aspect 0.3–3.3) that fits, as timm.
    """
    if torch.rand(1).item() >= prob:
        return x
    _, h, w = x.shape
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    for _ in range(10):
        area = (min_area + (max_area - min_area) * torch.rand(1).item()) * h * w
        aspect = math.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * torch.rand(1).item())
        eh, ew = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if ew < w and eh < h:
            top, left = int(torch.randint(0, h - eh + 1, (1,))), int(torch.randint(0, w - ew + 1, (1,)))
            mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
            std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
            x[:, top:top + eh, left:left + ew] = mean + std * torch.randn(3, eh, ew)
            break
    return x


def train_transform(cfg: TransformConfig) -> JointTrainTransform:
    """The training transform (paper: RRC 224 bicubic, flip, colour jitter 0.1), joint on image + mask."""
    return JointTrainTransform(cfg)


def eval_transform(cfg: TransformConfig) -> v2.Compose:
    """The authors' evaluation transform (`eval.py`): resize the shorter side to int(size / crop_pct) (256 for
    224) bicubic, centre-crop, to [0, 1]. Given a PIL image (as the kit's readers pass), the resize is PIL's,
    exactly as their torchvision `Resize` on PIL images."""
    return v2.Compose([v2.Resize(int(cfg.size / cfg.crop_pct), interpolation=InterpolationMode.BICUBIC, antialias=True),
                       v2.CenterCrop(cfg.size), v2.ToImage(), _to_unit])


def _to_unit(img: torch.Tensor) -> torch.Tensor:
    """uint8 → float in [0, 1] as torchvision's ToTensor divides (v2.ToDtype multiplies by 1/255: 1 ulp apart)."""
    return img.float().div(255)


def _load_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise PinppError(f"{path}: unreadable image ({e}); restore the file or re-run `pinpp convert`") from None


def list_image_folder(img_root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Sorted class folders and (relative path, label) samples of an ImageFolder tree (follows symlinks)."""
    if not img_root.is_dir():
        raise PinppError(f"{img_root}: image folder not found; run `pinpp convert` (or notebook 00) first")
    classes = sorted(d.name for d in img_root.iterdir() if d.is_dir())
    samples = []
    for label, wnid in enumerate(classes):
        for dirpath, _, files in os.walk(img_root / wnid, followlinks=True):
            rel = Path(dirpath).relative_to(img_root)
            samples += [(str(rel / f), label) for f in sorted(files) if f.lower().endswith(IMG_EXTS) and not f.startswith("._tmp")]
    return classes, samples


class PartSegDataset(Dataset):
    """(image, part mask, label, seg weight) from `<root>/train/img` + `<root>/train/<seg_dir>`.

    `seg_dir` selects the label maps: `seg` (real labels), `seg_pseudo_cf` / `seg_pseudo_nocf` (real +
    pseudo, notebook 04), or None for a model without part supervision (no masks are read; the mask is a
    placeholder 0). The seg weight is the authors' rule (`ignore_blank`): 0 when the mask is blank **after**
    the crop — a crop that misses every part, an image without a mask, or a blank mask — else 1. With
    `object_mask=True` the target becomes `class_index + 1` wherever any part is present (the
    object-supervision ablation, 1000 + 1 classes).
    """

    def __init__(self, root: str | Path, transform: JointTrainTransform | None = None, object_mask: bool = False,
                 only_annotated: bool = False, seg_dir: str | None = layout.REAL_SEG_DIR):
        self.root = Path(root)
        self.img_root = self.root / "train" / "img"
        self.seg_root = self.root / "train" / seg_dir if seg_dir else None
        self.classes, samples = list_image_folder(self.img_root)
        parts = fileio.read_json(self.root / "parts.json", "part table", "re-run `pinpp convert`")
        self.num_parts = len(parts)
        seg_root = self.seg_root
        self.has_seg = [seg_root is not None and masks.seg_path_for(seg_root, rel).exists() for rel, _ in samples]
        keep = [i for i, h in enumerate(self.has_seg) if h or not only_annotated]
        self.samples = [samples[i] for i in keep]
        self.has_seg = [self.has_seg[i] for i in keep]
        self.transform = transform
        self.object_mask = object_mask

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int, float]:
        rel, label = self.samples[i]
        img = v2.functional.pil_to_tensor(_load_rgb(self.img_root / rel))
        if self.seg_root is None:  # no part supervision: the image alone
            x = self.transform(img)[0] if self.transform is not None else img.float() / 255
            return x, torch.zeros((), dtype=torch.int64), label, 0.0
        if self.has_seg[i]:
            path = masks.seg_path_for(self.seg_root, rel)
            seg = masks.read_label_png(path, self.num_parts, as_int64=False)
            if seg.shape != tuple(img.shape[1:]):
                raise PinppError(f"{path}: mask is {seg.shape} but the image is {tuple(img.shape[1:])}; re-run `pinpp convert`")
        else:
            seg = np.zeros(img.shape[1:], dtype=np.uint16)
        if self.transform is not None:
            x, m = self.transform(img, seg)
        else:
            x, m = img.float() / 255, torch.from_numpy(seg.astype(np.int64))
        weight = float(bool(m.any()))  # blank after the crop: no segmentation loss for this image
        if self.object_mask:
            m = torch.where(m > 0, label + 1, 0)
        return x, m, label, weight


def fingerprint(ds: PartSegDataset) -> dict[str, str]:
    """Digests of what training on `ds` reads: the class and image list (names, in order), the part table's
    bytes, and the label maps (names, sizes, modification times) — a class removed, an image added or a
    relabelled mask all change it."""
    masks_used = [masks.seg_path_for(ds.seg_root, rel) for (rel, _), has in zip(ds.samples, ds.has_seg) if has]
    return {"images": store.names_digest(f"{rel} {label}" for rel, label in ds.samples),
            "parts": fileio.sha256_file(ds.root / "parts.json"),
            "masks": store.tree_digest(masks_used, ds.seg_root) if ds.seg_root is not None else "none"}


def require_train_labels(root: str | Path, seg_dir: str) -> None:
    """Stop with one line unless `train/<seg_dir>` can supervise a part model.

    A pseudo-label folder must exist and hold a label for every training image (real labels are linked
    in, the rest are pseudo labels): a missing or unfinished one names notebook 04 / `pinpp pseudo-label`.
    The real-label folder `seg` only needs to exist (most images have no real mask; they weigh 0).
    """
    folder = Path(root) / "train" / seg_dir
    if not (Path(root) / "train" / "img").is_dir():
        raise PinppError(f"{root}: no converted training data (train/img); run `pinpp prepare` (notebook 00) or "
                         "`pinpp convert`, or point --data-root at the folder that holds converted/")
    how = "run notebooks/04_pseudo_labels.ipynb (or `pinpp pseudo-label`)"
    if seg_dir == layout.REAL_SEG_DIR:
        if not folder.is_dir():
            raise PinppError(f"{folder}: real part labels not found; run `pinpp convert` (or notebook 00) first")
        return
    if not folder.is_dir():
        raise PinppError(f"{folder}: pseudo part labels not found; {how} first — part-supervised runs train on real + "
                         f"pseudo labels (paper §4.2; seg_dir={layout.REAL_SEG_DIR} is the real-labels-only ablation)")
    _, samples = list_image_folder(Path(root) / "train" / "img")
    missing = [rel for rel, _ in samples if not masks.seg_path_for(folder, rel).exists()]
    if missing:
        raise PinppError(f"{folder}: {len(missing)} of {len(samples)} training images have no label (e.g. {missing[0]}); "
                         f"{how} to finish labelling (it resumes), or fix the images listed in train/pseudo_report.txt")


class ValListDataset(Dataset):
    """(image, label) from a list file of "<wnid>/<file> <label>" lines under `img_root`."""

    def __init__(self, img_root: str | Path, list_file: str | Path, transform: v2.Compose | None = None):
        self.img_root, list_file = Path(img_root), Path(list_file)
        text = fileio.read_text(list_file, "val list", "run `pinpp convert` with --val-list (or notebook 00)")
        self.samples = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rel, label = line.split()
                    self.samples.append((rel, int(label)))
                except ValueError:
                    raise PinppError(f"{list_file}: line {n} {line!r}: expected '<wnid>/<file> <label>'; fix the line") from None
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        rel, label = self.samples[i]
        img = _load_rgb(self.img_root / rel)
        x = self.transform(img) if self.transform is not None else v2.functional.pil_to_tensor(img).float() / 255
        return x.as_subclass(torch.Tensor), label


def val_dataset(converted: str | Path, transform: v2.Compose | None = None) -> ValListDataset:
    """The converted `val_1w` evaluation set (10 images per class in the full profile)."""
    root = Path(converted) / "val_1w"
    return ValListDataset(root / "img", root / "val_list.txt", transform)
