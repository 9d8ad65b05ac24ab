"""LVIS-style evaluation of the segmentation benchmark, as the authors' code scores Tables 9/10 (§5).

The authors evaluate with their PACO evaluator (LixiaoTHU/PartImageNetPP @e132f50,
`Benchmark/segmentation/paco/evaluation/paco_evaluation.py`, `PACOEvaluator(max_dets_per_image=300)`), which runs
the `lvis` package's evaluator (`PACOEval` subclasses `lvis.LVISEval`; with attributes off it differs only in not
ignoring unmatched detections of "not exhaustively annotated" categories — none here, see below) and then
post-processes its precision array:

    results            LVISEval.summarize: AP (IoU .5:.95), AP50, APr/APc/APf ... over all categories, at most
                       `max_dets` = 300 detections per image (LVISResults keeps the top-scoring 300 of each image)
    obj-AP / part-AP   the mean, over the categories whose `supercategory` is "object" / "part", of
                       `get_AP_from_precisions(precision, idx)` = the mean of precision[:, :, idx, area all] > −1

Fields LVIS needs that the benchmark's COCO files do not carry, and the kit's choice (docs/FIDELITY.md, §5):

    neg_category_ids   LVIS scores a detection of category c on image i only if c is among i's annotated
                       (positive) or verified-absent (negative) categories. "absent" (default): every category
                       without an annotation on the image is verified absent — each PIN++ image is annotated for
                       its class's object and every one of its parts, and no other class is in the benchmark
                       image; this scores every detection, as pycocotools does. "none": no negatives, so only the
                       image's own categories are scored (detections of any other class's parts are ignored).
    not_exhaustive     none: every annotated part is annotated wherever it is visible
    frequency          LVIS's rare/common/frequent groups (≤ 10, 11–100, > 100 training images), from the training
                       file when given, else from the evaluated file (APr/APc/APf only)

`index`: the authors call `get_AP_from_precisions(precisions, idx)` with idx the category **id**, while the
precision array is ordered by category position (sorted ids). The two agree when ids are 0..K−1; with the 1-based
ids their loader assumes (`category_id - 1`) the id reads the next category's AP and the largest id is out of
range. "position" (default) is the per-category AP; "id" restates their call literally (and stops, in one line,
where it would index past the array).
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import fileio

MAX_DETS = 300  # PACOEvaluator(max_dets_per_image=300), the LVIS default
NEG = ("absent", "none")
INDEX = ("position", "id")


class _Everything:
    """A container that holds every category: LVIS's `c in neg_category_ids` for the "absent" reading (a list of
    all absent ids per image would hold K − k ids for each of 10,000 images)."""

    def __contains__(self, _: object) -> bool:
        return True


def frequency(image_count: int) -> str:
    """LVIS v1's frequency group of a category from its number of training images."""
    return "r" if image_count <= 10 else ("c" if image_count <= 100 else "f")


def lvis_dataset(coco: dict, neg: str = "absent", train: dict | None = None) -> dict:
    """A copy of a COCO benchmark dict with the fields LVIS reads (module docstring): per image
    `neg_category_ids` / `not_exhaustive_category_ids`, per category `frequency` / `image_count`, per annotation
    `area` where missing (pycocotools' polygon area)."""
    if neg not in NEG:
        raise fileio.PinppError(f"neg={neg!r}: one of {', '.join(NEG)}")
    from pycocotools import mask as mask_utils
    d = copy.deepcopy(coco)
    counted = train if train is not None else coco
    counts = Counter(c for c, _ in {(a["category_id"], a["image_id"]) for a in counted["annotations"]})
    for c in d["categories"]:
        c["image_count"] = counts.get(c["id"], 0)
        c["frequency"] = frequency(c["image_count"])
    sizes = {im["id"]: (im["height"], im["width"]) for im in d["images"]}
    for a in d["annotations"]:
        if "area" not in a:
            h, w = sizes[a["image_id"]]
            a["area"] = float(mask_utils.area(mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], h, w))))
    everything = _Everything()
    for im in d["images"]:
        im["neg_category_ids"] = everything if neg == "absent" else []
        im["not_exhaustive_category_ids"] = []
    return d


@contextlib.contextmanager
def _numpy_float_alias():
    """lvis 0.5.3 (the last release, 2020) accumulates with `np.float`, which numpy 2 removed; the alias is restored
    for the evaluation only (it meant the builtin float)."""
    had = "float" in np.__dict__
    if not had:
        np.float = float  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if not had:
            del np.float  # type: ignore[attr-defined]


def _lvis(dataset: dict):
    """An `lvis.LVIS` over an in-memory dict (its constructor reads a path)."""
    from lvis import LVIS
    api = LVIS.__new__(LVIS)
    api.logger = logging.getLogger("lvis.lvis")
    api.dataset = dataset
    api._create_index()
    return api


def _ap(p: np.ndarray) -> float:
    """get_AP_from_precisions for one category's T × R slice (area all), in %: NaN when it has no ground truth."""
    return float(p[p > -1].mean() * 100) if (p > -1).any() else np.nan


def _mean(aps: list[float]) -> float:
    """get_mean_AP: the mean over categories with ground truth (NaN when none)."""
    a = np.array(aps, dtype=float)
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else np.nan


def lvis_evaluate(gt: str | Path | dict, dets: list[dict], iou_type: str, img_ids: list[int] | None = None,
                  max_dets: int = MAX_DETS, neg: str = "absent", train: dict | None = None,
                  index: str = "position") -> tuple[dict[str, float], pd.DataFrame]:
    """LVIS evaluation as the authors' PACO evaluator: ({AP, AP50, APr, APc, APf, object AP, object AP50, part AP,
    part AP50} in %, per-category AP/AP50 in %), over the images `img_ids` (None: all of the file).

    `dets` are COCO result dicts (bbox, score, segmentation RLE). For "segm" their boxes are dropped, as the
    authors do, so that a detection's area is its mask's. `train`: the training file's dict (frequency groups)."""
    if index not in INDEX:
        raise fileio.PinppError(f"index={index!r}: one of {', '.join(INDEX)}")
    coco = gt if isinstance(gt, dict) else fileio.read_json(gt, "COCO annotation file", "re-run `pinpp convert`")
    api = _lvis(lvis_dataset(coco, neg, train))
    cats = sorted(api.get_cat_ids())
    super_of = {c["id"]: c.get("supercategory", "") for c in api.dataset["categories"]}
    ids = sorted(api.get_img_ids()) if img_ids is None else sorted(img_ids)
    keep = set(ids)
    dets = [d for d in dets if d["image_id"] in keep]
    if not dets:  # LVISResults cannot be built from nothing: every category with ground truth scores 0
        n_gt = Counter(a["category_id"] for a in api.dataset["annotations"] if a["image_id"] in keep)
        per = pd.DataFrame({"category_id": cats, "AP": [0.0 if n_gt[c] else np.nan for c in cats]})
        per["AP50"] = per["AP"]
        prec = None
        summary = {"AP": _mean(list(per.AP)), "AP50": _mean(list(per.AP50)), "APr": np.nan, "APc": np.nan, "APf": np.nan}
    else:
        from lvis import LVISEval, LVISResults
        res = copy.deepcopy(dets)
        if iou_type == "segm":
            for r in res:
                r.pop("bbox", None)
        with contextlib.redirect_stdout(io.StringIO()), _numpy_float_alias():
            ev = LVISEval(api, LVISResults(api, res, max_dets=max_dets), iou_type)
            ev.params.max_dets = max_dets
            ev.params.img_ids = ids
            ev.run()
        prec = ev.eval["precision"]  # T × R × K × areas, K in the order of `cats`
        per = pd.DataFrame({"category_id": cats, "AP": [_ap(prec[:, :, k, 0]) for k in range(len(cats))],
                            "AP50": [_ap(prec[0, :, k, 0]) for k in range(len(cats))]})
        r = ev.get_results()
        summary = {k: float(r[k]) * 100 if r[k] > -1 else np.nan for k in ("AP", "AP50", "APr", "APc", "APf")}
    at = per.set_index("category_id")
    for group in ("object", "part"):
        members = [c for c in cats if super_of[c] == group]
        if index == "position" or prec is None:
            summary[f"{group} AP"] = _mean([at.AP[c] for c in members])
            summary[f"{group} AP50"] = _mean([at.AP50[c] for c in members])
        else:  # the authors' call: the id used as the position in the precision array
            bad = [c for c in members if not 0 <= c < prec.shape[2]]
            if bad:
                raise fileio.PinppError(f"LVIS evaluation with index='id': category id {bad[0]} is past the precision "
                                        f"array ({prec.shape[2]} categories), where the authors' get_AP_from_precisions "
                                        "fails too; use index='position'")
            summary[f"{group} AP"] = _mean([_ap(prec[:, :, c, 0]) for c in members])
            summary[f"{group} AP50"] = _mean([_ap(prec[0, :, c, 0]) for c in members])
    return summary, per
