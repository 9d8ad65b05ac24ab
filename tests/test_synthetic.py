"""The synthetic release is deterministic and in the exact public PIN++ format."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from pycocotools.coco import COCO

from pinpp_lib.fileio import PinppError
from pinpp_lib.imagenet import classes as imagenet_classes
from pinpp_lib.synthetic import SynthConfig, generate

from conftest import SMALL


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_for_a_seed(synth, tmp_path):
    again = generate(tmp_path / "again", SMALL)
    assert _digest(again) == _digest(synth)
    other = generate(tmp_path / "other", SynthConfig(**{**SMALL.__dict__, "seed": 4}))
    assert _digest(other) != _digest(synth)


def test_other_config_or_edited_files_regenerate_the_folder(tmp_path):
    out = generate(tmp_path / "s", SMALL)
    other = SynthConfig(**{**SMALL.__dict__, "classes": 2})
    generate(out, other)  # the kit's own tree under another config: regenerated, never mixed
    assert _digest(out) == _digest(generate(tmp_path / "fresh", other))
    victim = next((out / "release" / "json").glob("*.json"))
    victim.write_text("{}")  # a generated file edited since: not finished any more
    generate(out, other)
    assert _digest(out) == _digest(tmp_path / "fresh")


def test_release_format(synth):
    rel = synth / "release"
    wnids = {c["wnid"] for c in imagenet_classes()}
    files = sorted((rel / "json").glob("*.json"))
    assert len(files) == SMALL.classes
    n_parts = []
    for f in files:
        assert f.stem in wnids
        d = json.loads(f.read_text())
        assert set(d) == {"images", "annotations", "categories"}
        assert [im["id"] for im in d["images"]] == list(range(1, len(d["images"]) + 1))
        assert [a["id"] for a in d["annotations"]] == list(range(1, len(d["annotations"]) + 1))
        assert [c["id"] for c in d["categories"]] == list(range(1, len(d["categories"]) + 1))
        assert all(":" not in c["name"] and set(c) == {"id", "name"} for c in d["categories"])
        n_parts.append(len(d["categories"]))
        sizes = {im["id"]: (im["width"], im["height"]) for im in d["images"]}
        for im in d["images"]:
            assert im["file_name"] == f"{f.stem}/{Path(im['file_name']).name}"
            assert (synth / "imagenet" / "train" / im["file_name"]).exists()
        for a in d["annotations"]:
            w, h = sizes[a["image_id"]]
            for poly in a["segmentation"]:
                assert len(poly) >= 6 and len(poly) % 2 == 0
                assert min(poly[0::2]) >= 0 and max(poly[0::2]) <= w and min(poly[1::2]) >= 0 and max(poly[1::2]) <= h
            assert len(a["bbox"]) == 4
        COCO(str(f))  # loads with pycocotools
    assert 1 in n_parts and max(n_parts) <= 8  # a single-part class is among the first six
    for inc in (rel / "including").glob("*.txt"):
        names = {c["name"] for c in json.loads((rel / "json" / f"{inc.stem}.json").read_text())["categories"]}
        for line in inc.read_text().split():
            child, parent = line.split(":")
            assert child in names and parent in names
    discarded = json.loads((rel / "discarded_data.json").read_text())
    assert discarded and all(set(d) == {"file_name"} for d in discarded)
    assert json.loads((rel / "category_name.json").read_text())


def test_unannotated_and_val_images(synth):
    train = synth / "imagenet" / "train"
    wnids = sorted(p.name for p in train.iterdir())
    per_class = SMALL.images_per_class + SMALL.unannotated_per_class
    assert all(len(list((train / w).glob("*.JPEG"))) == per_class for w in wnids)
    lines = (synth / "imagenet" / "val_list.txt").read_text().split("\n")[:-1]
    assert len(lines) == SMALL.val_per_class * SMALL.classes
    for line in lines:
        rel, label = line.split()
        assert rel.split("/")[1].startswith("ILSVRC2012_val_") and len(rel.split("_")[-1]) == len("00000001.JPEG")
        assert wnids[int(label)] == rel.split("/")[0]
        assert (synth / "imagenet" / "val" / rel).exists()


def test_class_count_bounds(tmp_path):
    with pytest.raises(PinppError, match="between 1 and 1000"):
        generate(tmp_path / "x", SynthConfig(classes=0))
