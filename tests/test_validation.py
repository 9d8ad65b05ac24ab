"""Bad input: each fault stops the run with one line naming the file, the record and the fix;
with --skip-bad the record is dropped and listed in the report instead."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pinpp_lib import masks
from pinpp_lib.convert import ConvertConfig, convert
from pinpp_lib.fileio import PinppError
from pinpp_lib.release import load_release


def _first_class(root: Path) -> tuple[Path, dict]:
    f = sorted((root / "release" / "json").glob("*.json"))[0]
    return f, json.loads(f.read_text())


def _edit(root: Path, fn) -> Path:
    f, d = _first_class(root)
    fn(d)
    f.write_text(json.dumps(d))
    return f


def _class_with_inclusion(root: Path) -> Path:
    return sorted((root / "release" / "including").glob("*.txt"))[0]


def _run(root: Path, out: Path | None = None, strict: bool = True):
    return convert(root / "release", root / "imagenet" / "train", out or root / "out",
                   root / "imagenet" / "val", root / "imagenet" / "val_list.txt", ConvertConfig(strict=strict))


FAULTS = {
    "malformed json": (lambda r: _first_class(r)[0].write_text('{"images": [1, 2'), "not valid JSON"),
    "missing key": (lambda r: _edit(r, lambda d: d.pop("annotations")), "expected an object with lists"),
    "polygon < 3 points": (lambda r: _edit(r, lambda d: d["annotations"][0].update(segmentation=[[1, 1, 5, 5]])),
                           "needs at least 3"),
    "odd polygon": (lambda r: _edit(r, lambda d: d["annotations"][0].update(segmentation=[[1, 1, 5, 5, 9, 9, 3]])),
                    "odd number of coordinates"),
    "polygon outside image": (lambda r: _edit(r, lambda d: d["annotations"][0].update(
        segmentation=[[1, 1, 500, 1, 500, 400]])), "lies outside"),
    "unknown image_id": (lambda r: _edit(r, lambda d: d["annotations"][0].update(image_id=999)), "image_id 999"),
    "unknown category_id": (lambda r: _edit(r, lambda d: d["annotations"][0].update(category_id=999)), "category_id 999"),
    "duplicate image id": (lambda r: _edit(r, lambda d: d["images"][1].update(id=d["images"][0]["id"])), "duplicate image id"),
    "duplicate annotation id": (lambda r: _edit(r, lambda d: d["annotations"][1].update(id=d["annotations"][0]["id"])),
                                "duplicate annotation id"),
    "duplicate category": (lambda r: _edit(r, lambda d: d["categories"].append(dict(d["categories"][0]))),
                           "duplicate category"),
    "negative bbox": (lambda r: _edit(r, lambda d: d["annotations"][0].update(bbox=[0, 0, -3, 4])), "bbox"),
    "file_name outside class": (lambda r: _edit(r, lambda d: d["images"][0].update(file_name="n00000000/x.JPEG")),
                                "not under the class folder"),
    "unknown wnid": (lambda r: _first_class(r)[0].rename(_first_class(r)[0].with_name("n99999999.json")),
                     "not an ImageNet-1K wnid"),
    "inclusion names missing part": (lambda r: _class_with_inclusion(r).write_text("wing:head\n"), "has no part 'wing'"),
    "inclusion malformed": (lambda r: _class_with_inclusion(r).write_text("nose-head\n"), "expected 'child:parent'"),
    "discarded malformed": (lambda r: (r / "release" / "discarded_data.json").write_text('["a.JPEG"]'),
                            "expected a list of"),
    "image missing": (lambda r: (r / "imagenet" / "train" / _first_class(r)[1]["images"][0]["file_name"]).unlink(),
                      "image file missing"),
    "truncated jpeg": (lambda r: _truncate(r / "imagenet" / "train" / _first_class(r)[1]["images"][0]["file_name"]),
                       "unreadable image"),
    "image size mismatch": (lambda r: _edit(r, lambda d: d["images"][0].update(width=d["images"][0]["width"] + 7)),
                            "annotation says"),
    "val label mismatch": (lambda r: _relabel_val(r), "sorted-wnid index"),
}


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])


def _relabel_val(r: Path) -> None:
    f = r / "imagenet" / "val_list.txt"
    lines = f.read_text().splitlines()
    rel, label = lines[0].split()
    lines[0] = f"{rel} {int(label) + 1}"
    f.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("name", list(FAULTS))
def test_fault_is_one_clear_line(release_copy, name):
    breaker, phrase = FAULTS[name]
    # the image fault cases must hit a kept (non-discarded) image: undiscard everything
    (release_copy / "release" / "discarded_data.json").write_text("[]")
    breaker(release_copy)
    with pytest.raises(PinppError) as e:
        _run(release_copy)
    msg = str(e.value)
    assert phrase in msg and "\n" not in msg
    assert any(k in msg for k in ("json/", "including/", "discarded_data.json", "val_list.txt")), msg
    assert not (release_copy / "out" / "seg_benchmark").exists()  # nothing half-written downstream


def test_eight_bit_png_with_large_ids_is_refused(tmp_path):
    p = tmp_path / "m.png"
    import cv2
    cv2.imwrite(str(p), np.full((4, 4), 7, np.uint8))
    assert masks.read_label_png(p, max_id=200).max() == 7
    with pytest.raises(PinppError, match="8-bit label PNG"):
        masks.read_label_png(p, max_id=3308)


def test_skip_bad_drops_and_reports(release_copy):
    (release_copy / "release" / "discarded_data.json").write_text("[]")
    f, d = _first_class(release_copy)
    d["annotations"][0]["segmentation"] = [[1, 1, 2, 2]]
    f.write_text(json.dumps(d))
    (release_copy / "imagenet" / "train" / d["images"][1]["file_name"]).unlink()
    summary = _run(release_copy, strict=False)
    report = json.loads((release_copy / "out" / "convert_report.json").read_text())
    problems = [x["problem"] for x in report["faults"]]
    assert summary["skipped_records"] == len(problems) == 2
    assert any("at least 3" in p for p in problems) and any("missing" in p for p in problems)
    txt = (release_copy / "out" / "convert_report.txt").read_text()
    assert d["images"][1]["file_name"] in txt
    assert not (release_copy / "out" / "train" / "seg" / Path(d["images"][1]["file_name"]).with_suffix(".png")).exists()
    rel = load_release(release_copy / "release", strict=False)  # drops the bad annotation, keeps the image
    first = rel.classes[f.stem]
    lost = sum(a["image_id"] == d["images"][1]["id"] for a in first.annotations)
    assert summary["part_masks"] == sum(len(c.annotations) for c in rel.classes.values()) - lost
    assert summary["images"] == sum(len(c.images) for c in rel.classes.values()) - 1


def test_missing_release_folder_and_roots(tmp_path, synth):
    with pytest.raises(PinppError, match="no json/ folder"):
        load_release(tmp_path)
    with pytest.raises(PinppError, match="ImageNet train root not found"):
        convert(synth / "release", tmp_path / "nope", tmp_path / "o")
    with pytest.raises(PinppError, match="go together"):
        convert(synth / "release", synth / "imagenet" / "train", tmp_path / "o", imagenet_val=synth / "imagenet" / "val")


def test_cli_prints_one_line_and_exits_2(release_copy):
    _first_class(release_copy)[0].write_text("{")
    r = subprocess.run([sys.executable, "-m", "pinpp_lib", "convert", "--annotations", str(release_copy / "release"),
                        "--imagenet-train", str(release_copy / "imagenet" / "train"), "--out", str(release_copy / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("pinpp convert: error:") and "not valid JSON" in lines[0]
    assert "Traceback" not in r.stderr
