"""The LVIS-style evaluator of the segmentation benchmark (seg_lvis) on hand-made cases with known AP."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pinpp_lib import seg_eval, seg_lvis
from pinpp_lib.fileio import PinppError


def _poly(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _case(first_id: int = 1) -> dict:
    """Image 1 holds a dog, its head and its tail; image 2 a dog only. Categories: dog (object), head, tail (parts)."""
    dog, head, tail = first_id, first_id + 1, first_id + 2
    anns = [(1, dog, (0, 0, 100, 100)), (1, head, (0, 0, 40, 40)), (1, tail, (60, 60, 40, 40)), (2, dog, (10, 10, 50, 50))]
    return {"images": [{"id": i, "width": 100, "height": 100, "file_name": f"n0/{i}.JPEG"} for i in (1, 2)],
            "categories": [{"id": dog, "name": "dog", "supercategory": "object"},
                           {"id": head, "name": "head", "supercategory": "part"},
                           {"id": tail, "name": "tail", "supercategory": "part"}],
            "annotations": [{"id": k + 1, "image_id": i, "category_id": c, "bbox": list(b), "segmentation": _poly(*b), "area": float(b[2] * b[3]),
                             "iscrowd": 0} for k, (i, c, b) in enumerate(anns)]}


def _det(img, cat, box, score):
    rle = mask_utils.frPyObjects(_poly(*box), 100, 100)[0]
    rle["counts"] = rle["counts"].decode("ascii")
    return {"image_id": img, "category_id": cat, "bbox": list(box), "score": score, "segmentation": rle}


def _dets(first_id: int = 1) -> list[dict]:
    """head found exactly on image 1; tail found exactly on image 1 (0.5) but also, wrongly, on image 2 (0.9)."""
    head, tail = first_id + 1, first_id + 2
    return [_det(1, head, (0, 0, 40, 40), 0.9), _det(1, tail, (60, 60, 40, 40), 0.5), _det(2, tail, (0, 0, 20, 20), 0.9)]


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_lvis_ap_of_a_hand_made_case(iou_type, tmp_path):
    """head AP 100; tail: the false positive at 0.9 ranks first, so precision is 1/2 at recall 1: AP 50 at every IoU;
    the dog has no detection: AP 0. Parts 75, object 0, all 50 (the same as pycocotools here)."""
    s, per = seg_lvis.lvis_evaluate(_case(), _dets(), iou_type)
    assert per.set_index("category_id").AP.to_dict() == pytest.approx({1: 0.0, 2: 100.0, 3: 50.0})
    assert s["part AP"] == pytest.approx(75) and s["object AP"] == pytest.approx(0) and s["AP"] == pytest.approx(50)
    assert s["AP50"] == pytest.approx(50) and s["part AP50"] == pytest.approx(75)
    (tmp_path / "gt.json").write_text(json.dumps(_case()))
    coco, _ = seg_eval.coco_evaluate(tmp_path / "gt.json", _dets(), iou_type)
    assert coco["AP"] == pytest.approx(s["AP"])


def test_lvis_negatives_and_detections_per_image():
    """neg="none": the tail on image 2 (no tail annotated there, and no negatives) is ignored, tail AP 100.
    max_dets=1: image 1 keeps its best detection only (the head), so the tail's only kept detection is the false one."""
    s, per = seg_lvis.lvis_evaluate(_case(), _dets(), "bbox", neg="none")
    assert per.set_index("category_id").AP[3] == pytest.approx(100) and s["part AP"] == pytest.approx(100)
    s, per = seg_lvis.lvis_evaluate(_case(), _dets(), "bbox", max_dets=1)
    assert per.set_index("category_id").AP[3] == pytest.approx(0) and per.set_index("category_id").AP[2] == pytest.approx(100)


def test_lvis_on_a_subset_of_images_and_without_detections():
    s, per = seg_lvis.lvis_evaluate(_case(), _dets(), "bbox", img_ids=[1])  # the false tail on image 2 is out
    assert per.set_index("category_id").AP[3] == pytest.approx(100)
    s, per = seg_lvis.lvis_evaluate(_case(), [], "segm")
    assert s["AP"] == 0 and s["part AP"] == 0 and math.isnan(s["APr"])


def test_authors_id_indexing_equals_position_for_zero_based_ids_and_stops_past_the_array():
    """The authors' get_AP_from_precisions(precisions, idx) with idx = category id, restated literally."""
    def literal(precisions, idx):
        precision = precisions[:, :, idx, 0]
        precision = precision[precision > -1]
        return np.mean(precision) if precision.size else float("nan")

    pos, _ = seg_lvis.lvis_evaluate(_case(0), _dets(0), "bbox")
    by_id, _ = seg_lvis.lvis_evaluate(_case(0), _dets(0), "bbox", index="id")
    assert by_id["part AP"] == pytest.approx(pos["part AP"]) and by_id["object AP"] == pytest.approx(pos["object AP"])
    prec = np.full((10, 101, 3, 4), -1.0)
    prec[:, :, 1, 0] = 1.0
    assert literal(prec, 1) * 100 == seg_lvis._ap(prec[:, :, 1, 0])
    with pytest.raises(PinppError, match="category id 3 is past the precision array"):
        seg_lvis.lvis_evaluate(_case(1), _dets(1), "bbox", index="id")  # 1-based ids: the last one is out of range


def test_frequency_groups_and_areas():
    assert [seg_lvis.frequency(n) for n in (0, 10, 11, 100, 101)] == ["r", "r", "c", "c", "f"]
    case = _case()
    for a in case["annotations"]:
        a.pop("area", None)
    d = seg_lvis.lvis_dataset(case, "absent")
    assert [a["area"] for a in d["annotations"]] == [10000.0, 1600.0, 1600.0, 2500.0]
    assert [c["image_count"] for c in d["categories"]] == [2, 1, 1]
    assert 7 in d["images"][0]["neg_category_ids"] and seg_lvis.lvis_dataset(case, "none")["images"][0]["neg_category_ids"] == []
    with pytest.raises(PinppError, match="neg='all'"):
        seg_lvis.lvis_dataset(case, "all")
