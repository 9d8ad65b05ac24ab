"""Out-of-distribution test sets (paper App. D, Table A2; Table 8's images): folder loaders and label conventions.

    ImageNet-A-Plus        <root>/<wnid>/<image>               a class subset → logits masked to its classes
    ImageNet-Sketch        <root>/sketch/<wnid>/<image>        1000 classes
    Stylized-ImageNet val  <root>/val/<wnid>/<image>           1000 classes
    model-vs-human         <root>/<dataset>/dnn/session-1/<NNNN>_<exp>_dnn_<condition>_<category>_<...>.png
                           17 sets; the model's probabilities are mapped to the 16 categories
                           (`human_consistency.decide16`) and matched to the human trials by image key

A set that covers only part of the model's classes is scored with the logits masked to the classes
it contains (the usual ImageNet-A/-R convention); an image of a class the model does not know is an
error. Images are read in batches by a DataLoader (a 50k-image set never sits in memory), with the
kit's evaluation transform (the authors' `eval_multi_dataset.py` test transform), except ImageNet-A-Plus, which
the authors read with a square `Resize((256, 256))` (`square_transform`). ImageNet-C: `corruptions.evaluate`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode, v2
from tqdm.auto import tqdm

from .datasets import IMG_EXTS, TransformConfig, _load_rgb, _to_unit, eval_transform
from .fileio import PinppError
from .human_consistency import decide16, image_key
from .imagenet import in1k_index


@dataclass(frozen=True)
class FolderLayout:
    """Where a set's class folders live under its root, and what to tell a user who lacks it."""
    title: str
    subdirs: tuple[str, ...]  # tried in order; "" = the root itself
    layout: str
    source: str


OOD_SETS: dict[str, FolderLayout] = {
    "imagenet_a_plus": FolderLayout("ImageNet-A-Plus", ("",), "<root>/<wnid>/<image>",
                                    "the ImageNet-A-Plus release (3,286 images; a class subset of IN-1K)"),
    "imagenet_sketch": FolderLayout("ImageNet-Sketch", ("sketch", ""), "<root>/sketch/<wnid>/<image>",
                                    "github.com/HaohanWang/ImageNet-Sketch (50,889 images)"),
    "stylized_imagenet": FolderLayout("Stylized-ImageNet (val)", ("val", ""), "<root>/val/<wnid>/<image>",
                                      "github.com/rgeirhos/Stylized-ImageNet (its script stylises the IN-1K val set)"),
}
MVH_LAYOUT = ("<root>/<dataset>/dnn/session-1/<NNNN>_<exp>_dnn_<condition>_<category>_<...>.png, as the "
              "`modelvshuman` toolbox downloads them (github.com/bethgelab/model-vs-human)")


def square_transform(size: int, crop_pct: float) -> v2.Compose:
    """The authors' ImageNet-A-Plus transform (`eval_multi_dataset.py`: `Resize((256, 256))`, bilinear, aspect not
    kept; `CenterCrop(224)`; `ToTensor`), for `size` 224 and `crop_pct` 0.875; PIL's resize, as theirs on PIL images."""
    side = int(size / crop_pct)
    return v2.Compose([v2.Resize((side, side), interpolation=InterpolationMode.BILINEAR, antialias=True),
                       v2.CenterCrop(size), v2.ToImage(), _to_unit])


class PathDataset(Dataset):
    """Images at `paths`, transformed for evaluation (the kit's eval transform, or the square resize: `square`)."""

    def __init__(self, paths: list[Path], size: int, crop_pct: float, square: bool = False):
        self.paths = paths
        self.transform = square_transform(size, crop_pct) if square else eval_transform(TransformConfig(size=size, crop_pct=crop_pct))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(_load_rgb(self.paths[i])).as_subclass(torch.Tensor)


def stream_logits(models: dict[str, nn.Module], paths: list[Path], size: int, crop_pct: float, batch_size: int = 250,
                  workers: int = 0, device: str | torch.device = "cpu", desc: str = "images",
                  square: bool = False) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """(start index, {model: logits}) per batch; every batch is read once and shown to every model."""
    loader = DataLoader(PathDataset(paths, size, crop_pct, square), batch_size=batch_size, num_workers=workers)
    start = 0
    with torch.no_grad():
        for x in tqdm(loader, desc=desc, leave=False):
            yield start, {n: m.to(device).eval()(x.to(device)).float().cpu() for n, m in models.items()}
            start += len(x)


def spread(items: list, n: int) -> list:
    """Every k-th item, k the smallest step that leaves at most `n` (0: all): a cap that still covers the
    whole list (every class of a folder set, every condition of a model-vs-human set) — rehearsal only."""
    return items if not n or len(items) <= n else items[::-(-len(items) // n)]


def folder_set(name: str, root: str | Path) -> tuple[list[Path], list[str]]:
    """Image paths of an OOD set and the wnid of each (from its class folder)."""
    spec = OOD_SETS[name]
    root = Path(root)
    for sub in spec.subdirs:
        base = root / sub if sub else root
        classes = sorted(d.name for d in base.iterdir() if d.is_dir() and d.name.startswith("n")) if base.is_dir() else []
        if classes:
            break
    else:
        raise PinppError(f"{root}: {spec.title} not found; expected {spec.layout} — get it from {spec.source} "
                         f"and pass its folder ({name}=...)")
    paths, wnids = [], []
    for wnid in classes:
        for dirpath, _, files in os.walk(base / wnid, followlinks=True):
            found = [Path(dirpath) / f for f in sorted(files) if f.lower().endswith(IMG_EXTS)]
            paths += found
            wnids += [wnid] * len(found)
    return paths, wnids


def label_space(wnids: list[str], model_classes: list[str]) -> tuple[torch.Tensor, list[int] | None]:
    """Targets in the model's output space, and the outputs to keep (None: the set covers every class)."""
    col = {w: j for j, w in enumerate(model_classes)}
    unknown = sorted(set(wnids) - set(col))
    if unknown:
        raise PinppError(f"class folder(s) {unknown[:3]} ({len(unknown)} in all) are not classes of the model; "
                         "the set and the model must share wnids")
    present = sorted({col[w] for w in wnids})
    return torch.tensor([col[w] for w in wnids]), (present if len(present) < len(model_classes) else None)


def evaluate_folder_set(models: dict[str, nn.Module], name: str, root: str | Path, model_classes: list[str], size: int,
                        crop_pct: float, batch_size: int = 250, device: str | torch.device = "cpu",
                        images: int = 0, square: tuple[str, ...] = ("imagenet_a_plus",)) -> list[dict[str, Any]]:
    """Per-image records (model, set, index, label, pred, correct) with the set's label convention; `images`: at
    most that many, spread over the set (0: all); sets in `square` are read with the authors' square resize
    (`square_transform`; `RobustnessConfig.square_resize`)."""
    paths, wnids = folder_set(name, root)
    if images and paths:
        paths, wnids = map(list, zip(*spread(list(zip(paths, wnids)), images)))
    y, keep = label_space(wnids, model_classes)
    recs: list[dict[str, Any]] = []
    for start, logits in stream_logits(models, paths, size, crop_pct, batch_size, device=device, desc=name,
                                       square=name in square):
        for m, z in logits.items():
            pred = z.argmax(1) if keep is None else torch.tensor(keep)[z[:, keep].argmax(1)]
            recs += [{"model": m, "set": name, "index": start + i, "label": int(y[start + i]), "pred": int(p),
                      "correct": bool(p == y[start + i]), "classes": len(keep or model_classes)} for i, p in enumerate(pred)]
    return recs


def mvh_images(root: str | Path, dataset: str) -> pd.DataFrame:
    """The images of a model-vs-human set: path, key (shared with the human trials), condition, category."""
    base = Path(root) / dataset
    paths = sorted(base.rglob("*.png")) if base.is_dir() else []
    if not paths:
        raise PinppError(f"{base}: model-vs-human set {dataset!r} not found; expected {MVH_LAYOUT}")
    bad = next((p for p in paths if len(p.name.split("_")) < 5), None)
    if bad is not None:
        raise PinppError(f"{bad}: not a model-vs-human image name; expected {MVH_LAYOUT}")
    keys = [image_key(p.name) for p in paths]
    return pd.DataFrame({"path": paths, "key": keys, "condition": [k.split("_")[0] for k in keys],
                         "category": [k.split("_")[1] for k in keys]})


def mvh_decisions(models: dict[str, nn.Module], root: str | Path, datasets: tuple[str, ...], model_classes: list[str],
                  size: int, crop_pct: float, batch_size: int = 250, device: str | torch.device = "cpu",
                  images: int = 0) -> pd.DataFrame:
    """16-class decisions (model, dataset, key, condition, category, decision) on the model-vs-human sets;
    `images`: at most that many per set, spread over it (0: all)."""
    idx = in1k_index()
    class_indices = [idx[w] for w in model_classes]  # output j of the model is IN-1K class class_indices[j]
    rows = []
    for ds in datasets:
        imgs = mvh_images(root, ds)
        imgs = imgs.iloc[spread(list(range(len(imgs))), images)].reset_index(drop=True)
        for start, logits in stream_logits(models, list(imgs.path), size, crop_pct, batch_size, device=device, desc=ds):
            chunk = imgs.iloc[start:start + len(next(iter(logits.values())))]
            for m, z in logits.items():
                rows.append(chunk.drop(columns="path").assign(model=m, dataset=ds,
                                                            decision=decide16(z.softmax(1).numpy(), class_indices)))
    return pd.concat(rows, ignore_index=True)


def table_a2(records: pd.DataFrame, titles: dict[str, str] | None = None) -> pd.DataFrame:
    """Accuracy (%) per model and OOD set (columns: set titles); `records` from `evaluate_folder_set`."""
    titles = titles or {k: v.title for k, v in OOD_SETS.items()}
    acc = records.groupby(["model", "set"])["correct"].mean().mul(100).unstack("set")
    acc = acc.rename(columns=titles).loc[list(dict.fromkeys(records["model"]))]  # models in evaluation order
    return acc.reset_index()


def mvh_accuracy(decisions: pd.DataFrame) -> pd.DataFrame:
    """16-class accuracy (%) per model on each model-vs-human set and their mean, as the toolbox reports OOD accuracy
    (`human_consistency.ood_accuracy`: the images of each set's kept conditions)."""
    from .human_consistency import load_trials, ood_accuracy
    acc = ood_accuracy(decisions, load_trials(datasets=sorted(set(decisions["dataset"])))).mul(100)
    out = acc.unstack("dataset")
    out["model-vs-human (mean)"] = out.mean(axis=1)
    return out.loc[list(dict.fromkeys(decisions["model"]))].reset_index()
