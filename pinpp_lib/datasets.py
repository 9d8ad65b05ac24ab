"""Torch datasets over the converted MPM layout (facts §2) and the authors' transforms (App. C, §4.3).

Images are returned as float tensors in [0, 1] (models normalise inside); masks as int64 (H, W) maps
of global part ids. Joint augmentation uses torchvision's v2 transforms on (Image, Mask) pairs, which
apply one random crop/flip to both and resize masks with nearest-neighbour interpolation.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms import v2

from . import fileio, masks
from .fileio import PinppError

IMG_EXTS = (".jpeg", ".jpg", ".png")


@dataclass
class TransformConfig:
    """Training/eval transform settings (paper: 224 crop, bicubic, crop pct 0.875, jitter 0.1)."""
    size: int = 224
    crop_pct: float = 0.875
    scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    color_jitter: float = 0.1


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
        return x, (None if m is None else torch.from_numpy(m.astype(np.int64)))


def train_transform(cfg: TransformConfig) -> JointTrainTransform:
    """The training transform (paper: RRC 224 bicubic, flip, colour jitter 0.1), joint on image + mask."""
    return JointTrainTransform(cfg)


def eval_transform(cfg: TransformConfig) -> v2.Compose:
    """The authors' evaluation transform: resize to size/crop_pct (256 for 224) bicubic, centre-crop."""
    return v2.Compose([v2.Resize(int(round(cfg.size / cfg.crop_pct)), interpolation=InterpolationMode.BICUBIC, antialias=True),
                       v2.CenterCrop(cfg.size), v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


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
    """(image, part mask, label, seg weight) from `<root>/train/img` + `<root>/train/seg`.

    Images without a mask, or with a blank one, get seg weight 0 (the authors' rule). `seg_dir`
    selects the label maps (`seg`: real labels; notebook 04 writes real + pseudo variants). With
    `object_mask=True` the target becomes `class_index + 1` wherever any part is present (the
    object-supervision ablation, 1000 + 1 classes).
    """

    def __init__(self, root: str | Path, transform: JointTrainTransform | None = None, object_mask: bool = False,
                 only_annotated: bool = False, seg_dir: str = "seg"):
        self.root = Path(root)
        self.img_root, self.seg_root = self.root / "train" / "img", self.root / "train" / seg_dir
        self.classes, samples = list_image_folder(self.img_root)
        parts = fileio.read_json(self.root / "parts.json", "part table", "re-run `pinpp convert`")
        self.num_parts = len(parts)
        self.has_seg = [masks.seg_path_for(self.seg_root, rel).exists() for rel, _ in samples]
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
        if self.has_seg[i]:
            path = masks.seg_path_for(self.seg_root, rel)
            seg = masks.read_label_png(path, self.num_parts, as_int64=False)
            if seg.shape != tuple(img.shape[1:]):
                raise PinppError(f"{path}: mask is {seg.shape} but the image is {tuple(img.shape[1:])}; re-run `pinpp convert`")
        else:
            seg = np.zeros(img.shape[1:], dtype=np.uint16)
        weight = float(seg.any())  # blank or missing mask: no segmentation loss for this image
        if self.transform is not None:
            x, m = self.transform(img, seg)
        else:
            x, m = img.float() / 255, torch.from_numpy(seg.astype(np.int64))
        if self.object_mask:
            m = torch.where(m > 0, label + 1, 0)
        return x, m, label, weight


class ValListDataset(Dataset):
    """(image, label) from a list file of "<wnid>/<file> <label>" lines under `img_root`."""

    def __init__(self, img_root: str | Path, list_file: str | Path, transform: v2.Compose | None = None):
        self.img_root, list_file = Path(img_root), Path(list_file)
        if not list_file.exists():
            raise PinppError(f"{list_file}: val list not found; run `pinpp convert` with --val-list (or notebook 00)")
        self.samples = []
        for n, line in enumerate(list_file.read_text().splitlines(), 1):
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
        img = v2.functional.pil_to_tensor(_load_rgb(self.img_root / rel))
        x = self.transform(img) if self.transform is not None else img.float() / 255
        return x.as_subclass(torch.Tensor), label


def val_dataset(converted: str | Path, transform: v2.Compose | None = None) -> ValListDataset:
    """The converted `val_1w` evaluation set (10 images per class in the full profile)."""
    root = Path(converted) / "val_1w"
    return ValListDataset(root / "img", root / "val_list.txt", transform)
