"""ImageNet-1K names shared by every section: normalisation constants, the class list, the 16-class map.

A leaf module (imports nothing from the kit): datasets, models, OOD readers, model-vs-human metrics and the
synthetic generator all take these from here. The class list and the 16-class map ship with the kit
(`pinpp_lib/data/imagenet_classes_and_human16.json`; sources in `data/SOURCES.md`).
"""
from __future__ import annotations

import functools
import json
from importlib import resources

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] images → ImageNet-normalised (the kit's models take [0, 1] images and normalise inside)."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


@functools.lru_cache(maxsize=None)
def _data() -> dict:
    with resources.files("pinpp_lib.data").joinpath("imagenet_classes_and_human16.json").open() as f:
        return json.load(f)


def classes() -> list[dict]:
    """The 1000 IN-1K classes (index, wnid, names) in sorted-wnid order."""
    return [dict(c) for c in _data()["imagenet_classes"]]


def in1k_index() -> dict[str, int]:
    """wnid → ImageNet-1K class index (sorted-wnid order)."""
    return {c["wnid"]: c["index"] for c in _data()["imagenet_classes"]}


def human16_map() -> dict[str, list[int]]:
    """The 16 model-vs-human categories → ImageNet-1K class indices."""
    return {k: list(v) for k, v in _data()["human16_to_imagenet_indices"].items()}


@functools.lru_cache(maxsize=None)
def _names() -> dict[str, str]:
    return {c["wnid"]: c["names"].split(",")[0].strip() for c in _data()["imagenet_classes"]}


def class_label(wnid: str) -> str:
    """'<wnid> <first class name>' for figure titles ("n01440764 tench"); the bare wnid if it is not an IN-1K class."""
    name = _names().get(wnid)
    return f"{wnid} {name}" if name else wnid
