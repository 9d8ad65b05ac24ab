"""Round trip synth → convert: masks match the polygons, ids follow the rule, child over parent,
discarded images excluded, 16-bit PNGs, COCO benchmark files, resume and refusal."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw
from pycocotools.coco import COCO

from pinpp_lib.convert import ConvertConfig, convert
from pinpp_lib.synthetic import SynthConfig, generate


def _pil_mask(seg: list, w: int, h: int) -> np.ndarray:
    """An independent rasteriser (PIL), to check pycocotools-based conversion against."""
    im = Image.new("L", (w, h), 0)
    for poly in seg:
        ImageDraw.Draw(im).polygon(list(zip(poly[0::2], poly[1::2])), fill=1)
    return np.asarray(im, dtype=bool)


def _release(synth: Path):
    """The release read with plain json (no kit code): classes, inclusion depth per part, discarded."""
    classes = {}
    for f in sorted((synth / "release" / "json").glob("*.json")):
        d = json.loads(f.read_text())
        inc = synth / "release" / "including" / f"{f.stem}.txt"
        parents = dict(l.split(":") for l in inc.read_text().split()) if inc.exists() else {}
        classes[f.stem] = (d, parents)
    discarded = {d["file_name"] for d in json.loads((synth / "release" / "discarded_data.json").read_text())}
    return classes, discarded


def _expected_ids(classes) -> dict[tuple[str, str], int]:
    ids, n = {}, 1
    for wnid in sorted(classes):
        for c in classes[wnid][0]["categories"]:  # file order
            ids[(wnid, c["name"])] = n
            n += 1
    return ids


def test_global_ids_follow_the_rule(synth, converted):
    classes, _ = _release(synth)
    parts = json.loads((converted / "parts.json").read_text())
    assert {(p["wnid"], p["part"]): p["id"] for p in parts} == _expected_ids(classes)
    for p in parts:
        if p["parent"] is not None:
            parent = parts[p["parent"] - 1]
            assert parent["wnid"] == p["wnid"] and classes[p["wnid"]][1][p["part"]] == parent["part"]


def test_masks_match_polygons_and_child_over_parent(synth, converted):
    classes, discarded = _release(synth)
    ids = _expected_ids(classes)
    agree = total = child_checked = 0
    for wnid, (d, parents) in classes.items():
        names = {c["id"]: c["name"] for c in d["categories"]}
        depth = {n: (1 if n in parents else 0) for n in names.values()}
        for im in d["images"]:
            png = converted / "train" / "seg" / Path(im["file_name"]).with_suffix(".png")
            if im["file_name"] in discarded:
                assert not png.exists()
                continue
            got = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
            assert got.dtype == np.uint16 and got.shape == (im["height"], im["width"])
            anns = [a for a in d["annotations"] if a["image_id"] == im["id"]]
            want = np.zeros_like(got)
            edges = np.zeros(got.shape, bool)
            k3 = np.ones((3, 3), np.uint8)
            for a in sorted(anns, key=lambda a: depth[names[a["category_id"]]]):  # stable: file order
                m = _pil_mask(a["segmentation"], im["width"], im["height"])
                want[m] = ids[(wnid, names[a["category_id"]])]
                edges |= (cv2.dilate(m.astype(np.uint8), k3) != cv2.erode(m.astype(np.uint8), k3))
            agree += int((want == got).sum())
            total += got.size
            # the two rasterisers may differ on boundary pixels, nowhere else
            assert not ((want != got) & ~edges).any(), png
            for a in anns:  # an included child is painted over its parent
                if names[a["category_id"]] in parents:
                    inner = cv2.erode(_pil_mask(a["segmentation"], im["width"], im["height"]).astype(np.uint8),
                                      np.ones((3, 3), np.uint8)).astype(bool)
                    if inner.any():
                        assert (got[inner] == ids[(wnid, names[a["category_id"]])]).all()
                        child_checked += 1
    assert agree / total > 0.97
    assert child_checked > 0


def test_whether_pseudo_img_and_val(synth, converted):
    _, discarded = _release(synth)
    kept = [l.split() for f in sorted((converted / "train" / "whether_pseudo").glob("*.txt")) for l in f.read_text().splitlines()]
    assert kept and all(flag == "0" for _, flag in kept)
    assert not {p for p, _ in kept} & discarded
    assert all((converted / "train" / "seg" / Path(p).with_suffix(".png")).exists() for p, _ in kept)
    # every train image (discarded and unannotated ones too) is in the ImageFolder tree
    n_img = sum(len(files) for _, _, files in os.walk(converted / "train" / "img", followlinks=True))
    assert n_img == sum(1 for _ in (synth / "imagenet" / "train").rglob("*.JPEG"))
    assert (converted / "val_1w" / "val_list.txt").read_text() == (synth / "imagenet" / "val_list.txt").read_text()


def test_benchmark_coco_files(synth, converted):
    classes, discarded = _release(synth)
    parts = json.loads((converted / "parts.json").read_text())
    k = len(parts)
    sets = {}
    for s in ("train", "val", "test"):
        cp = COCO(str(converted / "seg_benchmark" / f"parts_{s}.json"))
        co = COCO(str(converted / "seg_benchmark" / f"objects_{s}.json"))
        cb = COCO(str(converted / "seg_benchmark" / f"objects+parts_{s}.json"))
        sets[s] = {im["file_name"] for im in cp.dataset["images"]}
        assert {c["supercategory"] for c in cp.dataset["categories"]} == {"part"}
        assert [c["name"] for c in co.dataset["categories"]] == sorted(classes)
        assert len(cb.dataset["categories"]) == k + len(classes)
        assert all(":" in c["name"] for c in cb.dataset["categories"] if c["supercategory"] == "part")
        assert {c["id"] for c in cb.dataset["categories"] if c["supercategory"] == "object"} == set(range(k + 1, k + len(classes) + 1))
        for img_id, im in co.imgs.items():  # object masks = union of the image's part masks
            objs = np.zeros((im["height"], im["width"]), bool)
            for a in co.imgToAnns[img_id]:
                objs |= co.annToMask(a).astype(bool)
            prts = np.zeros_like(objs)
            for a in cp.imgToAnns[img_id]:
                prts |= cp.annToMask(a).astype(bool)
            assert (objs == prts).all()
    allk = sets["train"] | sets["val"] | sets["test"]
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])
    assert not allk & discarded and len(allk) == sum(len(d["images"]) for d, _ in classes.values()) - len(discarded)
    n = len(allk)
    assert abs(len(sets["train"]) - 0.8 * n) <= 1 and abs(len(sets["val"]) - 0.1 * n) <= 1


def test_multi_instance_images_give_several_objects(converted):
    co = COCO(str(converted / "seg_benchmark" / "objects_train.json"))
    counts = [len(v) for v in co.imgToAnns.values()]
    assert max(counts) >= 2 and np.mean(counts) < 1.6


def test_ids_above_255_need_16_bit(tmp_path):
    syn = generate(tmp_path / "s", SynthConfig(classes=80, images_per_class=1, unannotated_per_class=0,
                                               val_per_class=0, size=32, discard_rate=0.0))
    out = tmp_path / "c"
    convert(syn / "release", syn / "imagenet" / "train", out)
    parts = json.loads((out / "parts.json").read_text())
    assert len(parts) > 255
    top = max(int(cv2.imread(str(p), cv2.IMREAD_UNCHANGED).max()) for p in (out / "train" / "seg").rglob("*.png"))
    assert top > 255


def _tree_digest(out: Path) -> dict[str, str]:
    skip = {"convert_manifest.json"}
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and not p.is_symlink() and p.name not in skip
            and "img" not in p.parts}


def test_resume_after_kill_matches_uninterrupted(tmp_path):
    syn = generate(tmp_path / "s", SynthConfig(classes=12, images_per_class=16, size=96, seed=5))
    args = [str(syn / "release"), str(syn / "imagenet" / "train"), str(syn / "imagenet" / "val"),
            str(syn / "imagenet" / "val_list.txt")]
    ref = tmp_path / "ref"
    convert(args[0], args[1], ref, args[2], args[3])
    out = tmp_path / "out"
    code = ("import sys; from pinpp_lib.convert import convert; a=sys.argv[1:]; "
            "convert(a[0], a[1], a[4], a[2], a[3])")
    proc = subprocess.Popen([sys.executable, "-c", code, *args, str(out)])
    deadline = time.time() + 60
    while not list((out / "train" / "seg").rglob("*.png")) and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # kill -9 in the middle of rasterising
    proc.wait()
    assert not (out / "convert_manifest.json").exists()  # not finished: no record
    convert(args[0], args[1], out, args[2], args[3])
    assert _tree_digest(out) == _tree_digest(ref)
    assert not [p for p in out.rglob("._tmp*")]


def test_changed_inputs_are_converted_again(release_copy, tmp_path):
    """A finished conversion is reused only while its inputs are unchanged: a record fixed after --skip-bad,
    a skipped image restored, another option — each gives what a fresh conversion gives."""
    rel, train = release_copy / "release", release_copy / "imagenet" / "train"
    out = tmp_path / "out"
    first = convert(rel, train, out, cfg=ConvertConfig(seed=1))
    assert convert(rel, train, out, cfg=ConvertConfig(seed=1)) == first  # reused
    f = sorted((rel / "json").glob("*.json"))[0]
    data = json.loads(f.read_text())
    good = data["annotations"][0]["segmentation"]
    data["annotations"][0]["segmentation"] = [[1.0, 2.0, 3.0, 4.0]]  # 2 points: a bad polygon
    f.write_text(json.dumps(data))
    skipped = convert(rel, train, out, cfg=ConvertConfig(seed=1, strict=False))
    assert skipped["skipped_records"] == 1
    data["annotations"][0]["segmentation"] = good  # the record fixed
    f.write_text(json.dumps(data))
    assert convert(rel, train, out, cfg=ConvertConfig(seed=1, strict=False))["skipped_records"] == 0
    discarded = {d["file_name"] for d in json.loads((rel / "discarded_data.json").read_text())}
    img = train / next(im["file_name"] for im in data["images"] if im["file_name"] not in discarded)
    hidden = img.with_name("hidden.bak")
    img.rename(hidden)  # a missing image: skipped with --skip-bad
    assert convert(rel, train, out, cfg=ConvertConfig(seed=1, strict=False))["images"] == first["images"] - 1
    hidden.rename(img)  # restored: no longer reported missing
    assert convert(rel, train, out, cfg=ConvertConfig(seed=1, strict=False))["images"] == first["images"]
    other = convert(rel, train, out, cfg=ConvertConfig(seed=99))
    assert other == convert(rel, train, tmp_path / "fresh", cfg=ConvertConfig(seed=99))
    assert _tree_digest(out) == _tree_digest(tmp_path / "fresh")
