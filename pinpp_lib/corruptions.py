"""ImageNet-C (paper App. D, Table A1): 15 corruptions × 5 severities on the IN-1K val set.

As in Hendrycks & Dietterich, corruptions are applied to the evaluation crops (resize 256 → centre
crop 224 in full), with the `imagecorruptions` implementation (PyPI `imagecorruptions-imaug`, the
numpy-2-safe fork). The library draws from numpy's global RNG, so each (image, corruption,
severity) is seeded from a stable hash: the same seed gives the same corrupted set on any run.
Evaluation always reads an ImageNet-C folder (`<root>/<corruption>/<severity>/<wnid>/<file>`): a
downloaded copy, or one the kit writes (cached on disk) — over the whole IN-1K val set as App. D
(`write_imagenet_c_from_files`, `val_images`; the full profile) or over the evaluation list's crops
(`write_imagenet_c`; `RobustnessConfig.imagenet_c_images = "eval_list"`, smoke).
Records are per image; accuracy per corruption is the mean over severities.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import fileio, store
from .fileio import PinppError

FAMILIES: dict[str, tuple[str, ...]] = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
}
CORRUPTIONS = tuple(c for names in FAMILIES.values() for c in names)
JPEG_QUALITY = 85  # ImageNet-C's released files are JPEGs of this quality
FAMILY_OF = {c: f for f, names in FAMILIES.items() for c in names}


OWN_RNG = ("impulse_noise", "glass_blur")  # corruptions whose library function takes a `seed` of its own


def image_seed(seed: int, index: int, corruption: str, severity: int) -> int:
    """A 32-bit seed that depends only on its arguments (not on Python's hash randomisation)."""
    digest = hashlib.sha256(f"{seed}|{index}|{corruption}|{severity}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def corrupt(img: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """One corrupted copy of an (H, W, 3) uint8 image, deterministic for `seed`."""
    from imagecorruptions import corrupt as _corrupt
    if corruption not in CORRUPTIONS or not 1 <= severity <= 5:
        raise PinppError(f"unknown corruption {corruption!r} or severity {severity}; "
                         f"choose from {', '.join(CORRUPTIONS)} and 1..5")
    if min(img.shape[:2]) < 32:
        raise PinppError(f"image of {img.shape[1]}x{img.shape[0]} px: the corruptions need at least 32x32; evaluate larger crops")
    state = np.random.get_state()
    np.random.seed(seed)
    # impulse_noise (scikit-image's random_noise) and glass_blur draw from their own generators unless given a seed:
    # numpy's global seed alone left them different on every run
    kwargs = {"seed": seed} if corruption in OWN_RNG else {}
    try:
        out = _corrupt(img, corruption_name=corruption, severity=severity, **kwargs)
    finally:
        np.random.set_state(state)  # leave the caller's numpy RNG as it was
    return np.clip(np.asarray(out), 0, 255).astype(np.uint8)[: img.shape[0], : img.shape[1]]


def corrupt_batch(x: torch.Tensor, corruption: str, severity: int, seed: int, start: int = 0) -> torch.Tensor:
    """Corrupt a batch of [0, 1] images (N, 3, H, W); image i is seeded by its list index start + i."""
    imgs = (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    out = [corrupt(im, corruption, severity, image_seed(seed, start + i, corruption, severity)) for i, im in enumerate(imgs)]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255


def imagenet_c_paths(root: str | Path, corruption: str, severity: int, rel_paths: list[str]) -> list[Path]:
    """Files of an ImageNet-C copy for the evaluation list's `<wnid>/<file>` entries."""
    base = Path(root) / corruption / str(severity)
    paths = [base / rel for rel in rel_paths]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise PinppError(f"{missing[0]}: not found ({len(missing)} missing); expected ImageNet-C as "
                         "<root>/<corruption>/<severity>/<wnid>/<file> (Hendrycks & Dietterich, zenodo) — "
                         "or leave imagenet_c unset and the kit writes it from the evaluation list")
    return paths


def write_imagenet_c(root: str | Path, x: torch.Tensor, rel_paths: list[str], seed: int = 0,
                     corruptions: tuple[str, ...] = CORRUPTIONS, severities: tuple[int, ...] = (1, 2, 3, 4, 5)) -> Path:
    """Write ImageNet-C for the evaluation crops `x` ([0, 1], N×3×S×S) in the released layout.

    Like the original, each corrupted crop is a JPEG (quality 85) named as its source; a
    (corruption, severity) folder is complete once its `.done` record holds the identity of these crops, names
    and seed (`store`), so an interrupted run resumes where it stopped and a changed input is rewritten.
    Evaluation then reads the folder — the same code path as a downloaded ImageNet-C.
    """
    root = Path(root)
    inputs = {"images": store.tensor_digest(x), "names": store.names_digest(rel_paths)}
    for c in tqdm(corruptions, desc="writing ImageNet-C", leave=False):
        for s in severities:
            folder, ident = root / c / str(s), _identity(c, s, seed, inputs)
            if store.finished(folder, ident, ".done") is None:  # same crops, names, seed: reuse
                _write(folder, x, rel_paths, c, s, seed, 0)
                store.finish(folder, ident, [], {"images": len(rel_paths)}, ".done")
    return root


def write_imagenet_c_from_files(root: str | Path, src_root: str | Path, rel_paths: list[str], size: int,
                                crop_pct: float = 0.875, seed: int = 0, corruptions: tuple[str, ...] = CORRUPTIONS,
                                severities: tuple[int, ...] = (1, 2, 3, 4, 5), chunk: int = 1000) -> Path:
    """ImageNet-C of images read from `src_root/<wnid>/<file>` (App. D: the whole IN-1K val set, too many to hold in
    memory): `chunk` images at a time are cropped as the evaluation list is (resize, centre crop) and corrupted under
    every (corruption, severity); each chunk's record (`.done-<start>`, identity: the sources' names, sizes and
    mtimes, the seed) makes an interrupted run resume chunk by chunk. Image i is seeded by its position in the list,
    as in `write_imagenet_c`."""
    from .ood_sets import PathDataset
    root, src_root = Path(root), Path(src_root)
    for start in tqdm(range(0, len(rel_paths), chunk), desc="writing ImageNet-C (chunks)", leave=False):
        rels = rel_paths[start:start + chunk]
        inputs = {"names": store.names_digest(rels), "sources": store.tree_digest([src_root / r for r in rels], src_root),
                  "size": size, "crop_pct": crop_pct}
        record = f".done-{start:08d}"
        idents = {(c, s): _identity(c, s, seed, inputs) for c in corruptions for s in severities}
        todo = [(c, s) for (c, s), ident in idents.items() if store.finished(root / c / str(s), ident, record) is None]
        if not todo:
            continue
        ds = PathDataset([src_root / r for r in rels], size, crop_pct)
        x = torch.stack([ds[i] for i in range(len(ds))])
        for c, s in todo:
            _write(root / c / str(s), x, rels, c, s, seed, start)
            store.finish(root / c / str(s), idents[c, s], [], {"images": len(rels)}, record)
    return root


def _identity(corruption: str, severity: int, seed: int, inputs: dict[str, Any]) -> store.Identity:
    settings = {"corruption": corruption, "severity": severity, "seed": seed, "jpeg_quality": JPEG_QUALITY}
    if corruption in OWN_RNG:
        settings["seed_passed"] = True  # sets written before the seed reached the library are rewritten
    return store.Identity("imagenet-c", settings, inputs)


def _write(folder: Path, x: torch.Tensor, rel_paths: list[str], corruption: str, severity: int, seed: int,
           start: int) -> None:
    from PIL import Image
    out = corrupt_batch(x, corruption, severity, seed, start)
    for img, rel in zip((out * 255).round().byte().permute(0, 2, 3, 1).numpy(), rel_paths):
        fileio.atomic_save_image(Image.fromarray(img), folder / rel, quality=JPEG_QUALITY)


IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def val_images(folder: str | Path, classes: list[str] | None = None, cap: int = 0) -> tuple[list[str], torch.Tensor]:
    """App. D's ImageNet-C images — the whole IN-1K val set — as sorted '<wnid>/<file>' entries of `folder` (the val
    images in class folders, or one (corruption, severity) folder of a downloaded ImageNet-C, whose files are the
    val set), with each image's class index in `classes` (None: the folder's own sorted classes). `cap`
    (rehearsal): a spread of that many."""
    from .ood_sets import spread
    folder = Path(folder)
    wnids = sorted(d.name for d in folder.iterdir() if d.is_dir() and d.name.startswith("n")) if folder.is_dir() else []
    if not wnids:
        raise PinppError(f"{folder}: no <wnid>/ class folders; ImageNet-C over the whole val set (paper App. D) is read "
                         "from the val images in class folders (ILSVRC's valprep.sh) or a downloaded ImageNet-C "
                         "(robustness.imagenet_c) — or set robustness.imagenet_c_images=eval_list for the evaluation list")
    col = {w: i for i, w in enumerate(wnids if classes is None else classes)}
    unknown = [w for w in wnids if w not in col]
    if unknown:
        raise PinppError(f"{folder / unknown[0]}: {len(unknown)} class folder(s) are not classes of the models; "
                         "point robustness.imagenet_c (or the val folder) at ImageNet-1K's val set")
    rels = spread(sorted(f"{w}/{p.name}" for w in wnids for p in (folder / w).iterdir()
                         if p.suffix.lower() in IMAGE_SUFFIXES), cap)
    return rels, torch.tensor([col[r.split("/")[0]] for r in rels])


def evaluate(models: dict[str, nn.Module], root: str | Path, rel_paths: list[str], y: torch.Tensor, size: int,
             corruptions: tuple[str, ...] = CORRUPTIONS, severities: tuple[int, ...] = (1, 2, 3, 4, 5),
             batch_size: int = 250, device: str | torch.device = "cpu", crop_pct: float = 0.875) -> list[dict[str, Any]]:
    """Per-image records (model, index, label, corruption, family, severity, correct) read from an
    ImageNet-C folder in batches; each batch is loaded once and shown to every model. `crop_pct`: the authors read
    ImageNet-C's 224-px images with their test transform (`eval_multi_dataset.py`: resize 256 bicubic, centre crop
    224 — a 1.14× zoom), 0.875; 1.0 reads them as the crops they are (`RobustnessConfig.imagenet_c_crop_pct`)."""
    from .ood_sets import stream_logits
    records: list[dict[str, Any]] = []
    for c in tqdm(corruptions, desc="ImageNet-C", leave=False):
        for s in severities:
            paths = imagenet_c_paths(root, c, s, rel_paths)
            for start, logits in stream_logits(models, paths, size, crop_pct, batch_size, device=device, desc=f"{c}/{s}"):
                for name, z in logits.items():
                    records += [{"model": name, "index": start + i, "label": int(y[start + i]), "corruption": c,
                                 "family": FAMILY_OF[c], "severity": s, "correct": bool(p == y[start + i])}
                                for i, p in enumerate(z.argmax(1))]
    return records


def clean_records(models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, batch_size: int = 250,
                  device: str | torch.device = "cpu") -> list[dict[str, Any]]:
    """The same images uncorrupted (severity 0, ImageNet-C's convention for clean), in `evaluate`'s record form."""
    from .robust_eval import predict
    records: list[dict[str, Any]] = []
    for name, m in models.items():
        pred = predict(m.to(device).eval(), x.to(device), batch_size).cpu()
        records += [{"model": name, "index": i, "label": int(y[i]), "corruption": "none", "family": "clean", "severity": 0,
                     "correct": bool(pred[i] == y[i])} for i in range(len(y))]
    return records


def clean_records_files(models: dict[str, nn.Module], paths: list[Path], y: torch.Tensor, size: int,
                        crop_pct: float = 0.875, batch_size: int = 250, device: str | torch.device = "cpu"
                        ) -> list[dict[str, Any]]:
    """`clean_records` for images read from files (the whole val set), with the evaluation crop."""
    from .ood_sets import stream_logits
    records: list[dict[str, Any]] = []
    for start, logits in stream_logits(models, paths, size, crop_pct, batch_size, device=device, desc="clean"):
        for name, z in logits.items():
            records += [{"model": name, "index": start + i, "label": int(y[start + i]), "corruption": "none",
                         "family": "clean", "severity": 0, "correct": bool(p == y[start + i])}
                        for i, p in enumerate(z.argmax(1))]
    return records


def table_a1(records: pd.DataFrame) -> pd.DataFrame:
    """Accuracy (%) per model and corruption (mean over severities), family means and the overall mean.

    `records` holds per-image rows with a `model` column.
    """
    acc = records.groupby(["model", "corruption"])["correct"].mean().mul(100).unstack("corruption")
    acc = acc[[c for c in CORRUPTIONS if c in acc.columns]]
    for fam, names in FAMILIES.items():
        cols = [c for c in names if c in acc.columns]
        if cols:
            acc[f"{fam} (mean)"] = acc[cols].mean(axis=1)
    acc["mean"] = acc[[c for c in CORRUPTIONS if c in acc.columns]].mean(axis=1)
    order = list(dict.fromkeys(records["model"]))  # the models in the order they were evaluated
    return acc.loc[order].reset_index()
