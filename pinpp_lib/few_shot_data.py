"""Few-shot data (paper §6): PIN++ images with their part boxes, a class split, and stored episodes.

A sample is an annotated PIN++ image (discarded ones left out) with the boxes of its part
annotations. The classes are split into train / val / test by a seeded permutation (authors: 900
training classes, the rest for val and test). Episodes are drawn with learn2learn's task
transforms (NWays, KShots over k + q samples per class, no replacement, so support and query never
share an image); each episode is drawn under its own stored seed and the whole list is written to a
JSON file, so a table is re-evaluated on exactly the same episodes.

Part crops: the M largest part boxes of an image, cropped and resized to the image size; when an
image has fewer than M parts the remaining slots get random rectangles (seeded per image and slot).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode, v2

from . import store
from .datasets import _load_rgb
from .fileio import PinppError
from .release import Release


@dataclass
class Sample:
    path: Path
    wnid: str
    boxes: list[tuple[float, float, float, float]]  # COCO [x, y, w, h], in the release's pixel coordinates


def part_samples(release: Release, images: str | Path, min_per_class: int = 1) -> list[Sample]:
    """Every annotated, non-discarded image of the release with its part boxes (classes in wnid order)."""
    images = Path(images)
    out = []
    for wnid, cls in release.classes.items():
        boxes: dict[int, list] = {}
        for a in cls.annotations:
            boxes.setdefault(a["image_id"], []).append(tuple(float(v) for v in a["bbox"]))
        found = [Sample(images / im["file_name"], wnid, boxes.get(im["id"], []))
                 for im in cls.images if im["file_name"] not in release.discarded]
        if len(found) < min_per_class:
            raise PinppError(f"json/{wnid}.json: {len(found)} usable images, fewer than the {min_per_class} an episode "
                             "draws per class; lower k_shot + n_query or drop the class")
        out += found
    missing = [s.path for s in out if not s.path.exists()]
    if missing:
        raise PinppError(f"{missing[0]}: image not found ({len(missing)} missing); point `images` at ImageNet train (<wnid>/<file>)")
    return out


def class_split(wnids: list[str], counts: tuple[int, int, int], seed: int = 0) -> dict[str, list[str]]:
    """train / val / test classes: a seeded permutation cut at the given counts."""
    if sum(counts) > len(wnids):
        raise PinppError(f"class split {counts} needs {sum(counts)} classes; the release has {len(wnids)}")
    perm = [wnids[i] for i in np.random.default_rng(seed).permutation(len(wnids))]
    a, b, c = counts
    return {"train": sorted(perm[:a]), "val": sorted(perm[a:a + b]), "test": sorted(perm[a + b:a + b + c])}


def rrc_box(width: int, height: int, rng: np.random.Generator, scale: tuple[float, float] = (0.08, 1.0),
            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """A RandomResizedCrop box (x0, y0, x1, y1), torchvision's `RandomResizedCrop.get_params` restated on a numpy
    generator (10 tries of area × U(scale) at log-uniform aspect ratio, else the centre crop at the clamped ratio)."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y0, x0 = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            return x0, y0, x0 + w, y0 + h
    w, h = width, height
    if width / height < min(ratio):
        h = int(round(w / min(ratio)))
    elif width / height > max(ratio):
        w = int(round(h * max(ratio)))
    x0, y0 = (width - w) // 2, (height - h) // 2
    return x0, y0, x0 + w, y0 + h


def part_boxes(boxes: list[tuple[float, float, float, float]], m: int, width: int, height: int,
               rng: np.random.Generator, fill: str = "rect") -> list[tuple[int, int, int, int]]:
    """M crop boxes (x0, y0, x1, y1): the M largest part boxes, then random ones for missing slots — "rect":
    rectangles of 25–70 % of the image's sides; "rrc": RandomResizedCrop boxes (`rrc_box`, DeepEMD's random patches)."""
    big = sorted(boxes, key=lambda b: -b[2] * b[3])[:m]
    out = []
    for x, y, w, h in big:
        x0, y0 = int(np.clip(np.floor(x), 0, width - 1)), int(np.clip(np.floor(y), 0, height - 1))
        out.append((x0, y0, max(x0 + 1, min(width, int(np.ceil(x + w)))), max(y0 + 1, min(height, int(np.ceil(y + h))))))
    while fill == "rrc" and len(out) < m:
        out.append(rrc_box(width, height, rng))
    while len(out) < m:  # random rectangles, 25-70% of the image's width and height
        w, h = (int(rng.uniform(0.25, 0.7) * s) or 1 for s in (width, height))
        x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        out.append((x0, y0, x0 + w, y0 + h))
    return out


AUGMENTS = ("none", "flip", "rrc_flip")


class PartImageDataset(Dataset):
    """(image, M part crops, label): image resized to size×size (bilinear, antialiased: the code's PIL `Resize`),
    crops of `part_boxes` likewise.

    `labels` maps wnid → label; crops of missing parts are random (`part_boxes`' `fill`), seeded by (seed, index).
    `augment`: "none"; "flip": one horizontal flip shared by the image and its crops; "rrc_flip": the authors'
    classifier pre-training (`augment: resize` in datasets/pinpp.py) — RandomResizedCrop(size) and a horizontal flip
    drawn separately for the image and for each crop (their `__getitem__` calls the transform once per tensor).
    None: "flip" when `train`, else "none".
    """

    def __init__(self, samples: list[Sample], labels: dict[str, int], size: int, m: int, seed: int = 0, train: bool = False,
                 augment: str | None = None, fill: str = "rect"):
        augment = augment or ("flip" if train else "none")
        if augment not in AUGMENTS:
            raise ValueError(f"augment={augment!r}: one of {AUGMENTS}")
        self.samples = [s for s in samples if s.wnid in labels]
        self.labels, self.size, self.m, self.seed, self.train, self.augment = labels, size, m, seed, train, augment
        self.fill = fill
        self.resize = v2.Resize((size, size), interpolation=InterpolationMode.BILINEAR, antialias=True)
        self.rrc = v2.RandomResizedCrop((size, size), interpolation=InterpolationMode.BILINEAR, antialias=True)

    def __len__(self) -> int:
        return len(self.samples)

    def targets(self) -> list[int]:
        return [self.labels[s.wnid] for s in self.samples]

    def _rrc_flip(self, t: torch.Tensor) -> torch.Tensor:
        t = self.rrc(t)
        return t.flip(-1) if torch.rand(1).item() < 0.5 else t

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        s = self.samples[i]
        img = v2.functional.pil_to_tensor(_load_rgb(s.path))
        h, w = img.shape[1:]
        rng = np.random.default_rng([self.seed, i])
        regions = [img[:, y0:y1, x0:x1] for x0, y0, x1, y1 in part_boxes(s.boxes, self.m, w, h, rng, self.fill)]
        if self.fill == "rrc":  # DeepEMD's patches: each RandomResizedCrop flipped with probability 0.5
            n_parts = min(len(s.boxes), self.m)
            regions = regions[:n_parts] + [r.flip(-1) if rng.random() < 0.5 else r for r in regions[n_parts:]]
        if self.augment == "rrc_flip":
            x, crops = self._rrc_flip(img), [self._rrc_flip(r) for r in regions]
        else:
            x, crops = self.resize(img), [self.resize(r) for r in regions]
            if self.augment == "flip" and torch.rand(1).item() < 0.5:  # the same flip for the image and its crops
                x, crops = x.flip(-1), [c.flip(-1) for c in crops]
        to = lambda t: v2.functional.to_dtype(t, torch.float32, scale=True)  # noqa: E731
        parts = torch.stack([to(c) for c in crops]) if crops else torch.zeros(0, 3, self.size, self.size)
        return to(x), parts, self.labels[s.wnid]


def draw_episodes(targets: list[int], n_way: int, k_shot: int, n_query: int, n_episodes: int, seed: int) -> list[dict[str, Any]]:
    """`n_episodes` episodes as {"seed", "classes", "support", "query"} (dataset indices, class-major).

    learn2learn draws the task (NWays, then KShots(k + q) without replacement) under the episode's
    own seed; the first k of each class are the support, the rest the query.
    """
    import learn2learn as l2l
    labels_to_indices: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        labels_to_indices.setdefault(t, []).append(i)
    short = {c: len(v) for c, v in labels_to_indices.items() if len(v) < k_shot + n_query}
    if len(labels_to_indices) < n_way or short:
        raise PinppError(f"{n_way}-way {k_shot}-shot with {n_query} queries needs {n_way} classes with {k_shot + n_query} "
                         f"images each; have {len(labels_to_indices)} classes, too small: {short}")
    meta = l2l.data.MetaDataset(_Labels(targets), labels_to_indices=labels_to_indices)
    tasks = l2l.data.Taskset(meta, [l2l.data.transforms.NWays(meta, n_way),
                                        l2l.data.transforms.KShots(meta, k_shot + n_query)], num_tasks=-1)
    out = []
    state = random.getstate()
    for e in range(n_episodes):
        ep_seed = seed * 1_000_003 + e
        random.seed(ep_seed)  # learn2learn's transforms draw from Python's `random`
        desc = tasks.sample_task_description()
        by_class: dict[int, list[int]] = {}
        for d in desc:
            by_class.setdefault(targets[d.index], []).append(d.index)
        classes = sorted(by_class)
        out.append({"seed": ep_seed, "classes": classes,
                    "support": [i for c in classes for i in by_class[c][:k_shot]],
                    "query": [i for c in classes for i in by_class[c][k_shot:]]})
    random.setstate(state)  # leave the caller's RNG as it was
    return out


class _Labels(Dataset):
    """Just the labels: episode drawing needs no pixels."""

    def __init__(self, targets: list[int]):
        self.t = targets

    def __len__(self) -> int:
        return len(self.t)

    def __getitem__(self, i: int) -> tuple[int, int]:
        return i, self.t[i]


def episodes(path: str | Path, targets: list[int], n_way: int, k_shot: int, n_query: int, n_episodes: int,
             seed: int) -> list[dict[str, Any]]:
    """The stored episodes at `path`, drawn and written on first use. They are replayed while the request and
    the dataset's labels are unchanged (every model of a table is scored on the same episodes); after a change
    they are drawn again (they are cheap, and the models are then retrained too)."""
    path = Path(path)
    ident = store.Identity("episodes", {"n_way": n_way, "k_shot": k_shot, "n_query": n_query, "n_episodes": n_episodes,
                                        "seed": seed}, {"targets": store.names_digest(map(str, targets))})
    done = store.finished(path.parent, ident, path.name)
    if done is not None:
        return done["episodes"]
    eps = draw_episodes(targets, n_way, k_shot, n_query, n_episodes, seed)
    store.finish(path.parent, ident, [], {"episodes": eps}, path.name)
    return eps
