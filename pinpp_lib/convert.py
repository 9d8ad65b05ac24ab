"""Convert a PIN++ release + ImageNet into the layouts the kit trains on (facts §2, §3).

    OUT/train/img/<wnid>/            ImageFolder of all IN-1K train images of the classes (symlinked class dirs)
    OUT/train/seg/<wnid>/<name>.png  16-bit PNG of GLOBAL part ids (0 = background), annotated images only
    OUT/train/whether_pseudo/<wnid>.txt   "<wnid>/<name>.JPEG 0|1" (1 = pseudo label)
    OUT/val_1w/img/<wnid>/<file>, OUT/val_1w/val_list.txt   the evaluation list (10 per class in full)
    OUT/seg_benchmark/{parts,objects,objects+parts}_{train,val,test}.json   COCO, 8:1:1 split by seed
    OUT/parts.json                   global part table: id, wnid, class_index, part, name, parent
    OUT/convert_report.{json,txt}    skipped records and counts

Global part ids: classes in sorted-wnid order, parts in each file's category order, ids from 1.
One id per pixel: an included child is painted over its parent. Discarded images are excluded from
every annotation output. Each output file is written atomically; a killed run resumes per class.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from tqdm.auto import tqdm

from . import fileio, layout, masks, store
from .checks import Checked, Rule, all_of, at_least, between, each, one_of, sums_to
from .fileio import PinppError
from .release import Fault, Release, check_image, dump_faults, load_release

SPLITS = ("train", "val", "test")


@dataclass
class ConvertConfig(Checked):
    """Conversion options. `split` is the benchmark's train/val/test share (paper: 8:1:1)."""
    seed: int = 0
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    strict: bool = True          # False = --skip-bad: drop bad records, list them in the report
    check_images: bool = True    # decode every annotated image (catches missing/truncated files)
    link: str = "symlink"        # train/img and val_1w/img: "symlink" or "copy"
    workers: int = 1
    LIMITS: ClassVar[dict[str, Rule]] = {"seed": at_least(0), "split": all_of(each(between(0, 1)), sums_to(1)),
                                         "link": one_of("symlink", "copy"), "workers": at_least(1)}


def part_table(release: Release) -> list[dict]:
    """The global part table: ids from 1 over sorted wnids, parts in each file's category order."""
    table, next_id = [], 1
    for ci, (wnid, cls) in enumerate(release.classes.items()):
        local = {}
        for c in cls.categories:
            local[c["name"]] = next_id
            table.append({"id": next_id, "wnid": wnid, "class_index": ci, "part": c["name"],
                          "name": f"{wnid}:{c['name']}", "parent": None, "depth": cls.depth(c["name"])})
            next_id += 1
        for child, parent in cls.inclusion:
            table[local[child] - 1]["parent"] = local[parent]
    return table


def _class_records(args: tuple) -> dict:
    """Rasterise one class: write its seg PNGs; return per-image records and faults (worker)."""
    cls, class_index, global_ids, discarded, train_root, out, cache_dir, cfg = args
    cache = cache_dir / f"{cls.wnid}.json"
    if cache.exists():  # resumed run of the same conversion: this class finished before
        return json.loads(cache.read_text())
    strict_faults: list[Fault] = []
    records = []
    by_image: dict[int, list[dict]] = {}
    for a in cls.annotations:
        by_image.setdefault(a["image_id"], []).append(a)
    local_to_global = {c["id"]: global_ids[c["name"]] for c in cls.categories}
    depth = {c["id"]: cls.depth(c["name"]) for c in cls.categories}
    for im in cls.images:
        if im["file_name"] in discarded:
            continue
        h, w = int(im["height"]), int(im["width"])
        if cfg.check_images and train_root is not None:
            problem = check_image(train_root / im["file_name"], w, h)
            if problem:
                f = Fault(f"json/{cls.wnid}.json", f"image id {im['id']} ({im['file_name']})", problem,
                          f"restore the file under {train_root} or use --skip-bad")
                if cfg.strict:
                    raise PinppError(f.line())
                strict_faults.append(f)
                continue
        anns = by_image.get(im["id"], [])
        part_masks = [masks.rasterise(a["segmentation"], h, w) for a in anns]
        ids = [local_to_global[a["category_id"]] for a in anns]
        label = np.zeros((h, w), dtype=np.uint16)
        for k in masks.paint_order([depth[a["category_id"]] for a in anns]):
            label[part_masks[k].astype(bool)] = ids[k]
        masks.write_label_png(masks.seg_path_for(out / "train" / layout.REAL_SEG_DIR, im["file_name"]), label)
        parts = [{"category_id": gid, "segmentation": a["segmentation"],
                  "bbox": a["bbox"] if a["bbox"] is not None else masks.mask_bbox(m),
                  "area": float(m.sum())} for a, gid, m in zip(anns, ids, part_masks)]
        objects = [{"category_id": class_index, "segmentation": masks.encode_rle(m),
                    "bbox": masks.mask_bbox(m), "area": float(m.sum())} for m in masks.object_instances(part_masks)]
        records.append({"file_name": im["file_name"], "width": w, "height": h, "parts": parts, "objects": objects})
    result = {"wnid": cls.wnid, "records": records, "faults": [f.__dict__ for f in strict_faults]}
    fileio.write_text(cache, json.dumps(result))
    return result


def _link_tree(src: Path, dst: Path, mode: str) -> None:
    """Put `src` (a class folder) at `dst` as a symlink or a copy; idempotent."""
    if dst.is_symlink() or dst.exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    if mode == "symlink":
        os.symlink(src.resolve(), dst, target_is_directory=src.is_dir())
    elif src.is_dir():
        tmp = dst.with_name(f"._tmp{dst.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        os.replace(tmp, dst)
    else:
        with fileio.atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)


def _coco_files(records: list[dict], wnids: list[str], parts: list[dict], seed: int,
                split: tuple[float, float, float]) -> dict[str, dict]:
    """The benchmark COCO dicts, keyed '<kind>_<split>'. Parts keep their global ids (1..K);
    objects are class_index + 1 in 'objects' and K + class_index + 1 in 'objects+parts'."""
    records = sorted(records, key=lambda r: r["file_name"])
    order = np.random.default_rng(seed).permutation(len(records))
    n_train = int(round(split[0] * len(records)))
    n_val = int(round(split[1] * len(records)))
    which = np.empty(len(records), dtype=object)
    which[order[:n_train]], which[order[n_train:n_train + n_val]], which[order[n_train + n_val:]] = SPLITS
    k = len(parts)
    part_cats = [{"id": p["id"], "name": p["name"], "supercategory": "part"} for p in parts]
    obj_cats = [{"id": i + 1, "name": w, "supercategory": "object"} for i, w in enumerate(wnids)]
    kinds = {"parts": (part_cats, None), "objects": (obj_cats, 0),
             "objects+parts": (part_cats + [{**c, "id": c["id"] + k} for c in obj_cats], k)}
    out = {}
    for kind, (cats, obj_offset) in kinds.items():
        for s in SPLITS:
            images, anns = [], []
            for img_id, (r, where) in enumerate(zip(records, which), 1):
                if where != s:
                    continue
                images.append({"id": img_id, "file_name": r["file_name"], "width": r["width"], "height": r["height"]})
                items = []
                if kind != "objects":
                    items += r["parts"]
                if obj_offset is not None:
                    items += [{**o, "category_id": o["category_id"] + 1 + obj_offset} for o in r["objects"]]
                for a in items:
                    anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": a["category_id"],
                                 "segmentation": a["segmentation"], "bbox": a["bbox"], "area": a["area"], "iscrowd": 0})
            out[f"{kind}_{s}"] = {"images": images, "annotations": anns, "categories": cats}
    return out


def _convert_val(val_list: Path, val_root: Path, wnids: list[str], out: Path, cfg: ConvertConfig,
                 faults: list[Fault]) -> int:
    """Link the val-list images into val_1w/img and check their labels; return the count kept."""
    index = {w: i for i, w in enumerate(wnids)}
    kept = []
    text = fileio.read_text(val_list, "the val list", "pass the evaluation list: lines '<wnid>/<file> <label>'")
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        parts = raw.split()
        rec = f"line {n} {raw.strip()!r}"
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or "/" not in parts[0]:
            f = Fault(val_list.name, rec, "expected '<wnid>/<file> <label>'", "fix the line")
        elif parts[0].split("/")[0] not in index:
            f = Fault(val_list.name, rec, "wnid is not a class of the release", "remove the line")
        elif int(parts[1]) != index[parts[0].split("/")[0]]:
            f = Fault(val_list.name, rec, f"label {parts[1]} ≠ sorted-wnid index {index[parts[0].split('/')[0]]}",
                      "labels must be the class index in sorted-wnid order")
        else:
            src = next((p for p in (val_root / parts[0], val_root / Path(parts[0]).name) if p.exists()), None)
            if src is None:
                f = Fault(val_list.name, rec, f"image not found under {val_root} (as <wnid>/<file> or <file>)",
                          "check --imagenet-val")
            else:
                _link_tree(src, out / "val_1w" / "img" / parts[0], cfg.link)
                kept.append(f"{parts[0]} {parts[1]}\n")
                continue
        if cfg.strict:
            raise PinppError(f.line() + " (or use --skip-bad)")
        faults.append(f)
    fileio.write_text(out / "val_1w" / "val_list.txt", "".join(kept))
    return len(kept)


def _remove_temporaries(out: Path) -> None:
    for dirpath, _, files in os.walk(out):  # does not descend into the symlinked image folders
        for f in files:
            if f.startswith("._tmp"):
                (Path(dirpath) / f).unlink(missing_ok=True)


MANIFEST = "convert_manifest.json"  # the store's record of a finished conversion
OWN_OUTPUTS = ("train/img", "train/seg", "train/whether_pseudo", "val_1w", "seg_benchmark", "parts.json",
               "convert_report.json", "convert_report.txt", ".cache")  # never train/seg_pseudo_* (notebook 04's work)


def check_train_root(train_root: Path, wnids: list[str]) -> None:
    """One line unless `train_root` holds class folders of the release (a root one level too high or too
    low would otherwise show up as thousands of images 'to restore')."""
    if any((train_root / w).is_dir() for w in wnids):
        return
    inner = [d for d in sorted(train_root.iterdir()) if d.is_dir() and any((d / w).is_dir() for w in wnids)]
    hint = f" — did you mean {inner[0]}?" if inner else (
        f" — it looks like one class folder itself; pass its parent {train_root.parent}" if train_root.name in wnids else "")
    raise PinppError(f"{train_root}: holds none of the release's {len(wnids)} class folders (e.g. {wnids[0]}/){hint}; "
                     "pass the ImageNet train folder that holds <wnid>/ folders")


def identity(release: Release, cfg: ConvertConfig, train_root: Path, imagenet_val: Path | None,
             val_list: Path | None) -> store.Identity:
    """What a conversion depends on: the options, the release's bytes (json/, including/, discarded and
    category files), the train root's class folders and the annotated images (names, sizes, times), and the
    val list's bytes and the val images."""
    rel_files = [p for p in release.root.rglob("*") if p.is_file() and p.suffix in (".json", ".txt")]
    images = [train_root / im["file_name"] for cls in release.classes.values() for im in cls.images]
    inputs = {"release": store.files_digest(rel_files, release.root),
              "train_classes": store.names_digest(sorted(d.name for d in train_root.iterdir() if d.is_dir())),
              "train_images": store.tree_digest(images, train_root)}
    if val_list is not None and imagenet_val is not None:
        inputs["val_list"] = store.files_digest([val_list])
        inputs["val_images"] = store.tree_digest([p for p in imagenet_val.rglob("*") if p.is_file()], imagenet_val)
    settings = {**{k: v for k, v in asdict(cfg).items() if k != "workers"}, "imagenet_train": str(train_root.resolve()),
                "imagenet_val": str(imagenet_val.resolve()) if imagenet_val else None}
    return store.Identity("convert", settings, inputs)


def convert(annotations: str | Path, imagenet_train: str | Path, out: str | Path,
            imagenet_val: str | Path | None = None, val_list: str | Path | None = None,
            cfg: ConvertConfig | None = None) -> dict:
    """Convert a release (`annotations`, the HF folder) + ImageNet into `out`. Returns the summary.

    Works unchanged on the real release and on `pinpp synth` output. A finished conversion of the same
    inputs (`identity`) with intact outputs is reused; after a change of any input (a record fixed, an image
    restored, a class removed) the converter's own outputs are deleted and written again — pseudo labels
    (`train/seg_pseudo_*`) are left to their own record. A killed run resumes class by class.
    """
    cfg = cfg or ConvertConfig()
    out, train_root = Path(out), Path(imagenet_train)
    if not train_root.is_dir():
        raise PinppError(f"{train_root}: ImageNet train root not found; pass --imagenet-train DIR (holding <wnid>/ folders)")
    if (val_list is None) != (imagenet_val is None):
        raise PinppError("--imagenet-val and --val-list go together; pass both or neither")
    release = load_release(annotations, strict=cfg.strict)
    check_train_root(train_root, release.wnids)
    if imagenet_val is not None and not Path(imagenet_val).is_dir():
        raise PinppError(f"{imagenet_val}: ImageNet val folder not found; pass --imagenet-val DIR (flat, or with <wnid>/ folders)")
    ident = identity(release, cfg, train_root, Path(imagenet_val) if imagenet_val else None,
                     Path(val_list) if val_list else None)
    done = store.finished(out, ident, MANIFEST)
    if done is not None:
        return done["summary"]
    cache = out / ".cache" / ident.sha256[:16]
    if store.read(out, MANIFEST) is not None or (out / ".cache").is_dir() and not cache.is_dir():
        _remove_own_outputs(out)  # another conversion's outputs: never mixed with this one's
        store.forget(out, MANIFEST)
    _remove_temporaries(out)  # left by a killed run; finished classes (in the cache) are reused

    wnids = release.wnids
    parts = part_table(release)
    gid = {(p["wnid"], p["part"]): p["id"] for p in parts}
    jobs = [(cls, ci, {n: i for (w, n), i in gid.items() if w == cls.wnid}, release.discarded, train_root, out, cache, cfg)
            for ci, cls in enumerate(release.classes.values())]
    if cfg.workers > 1:
        with mp.get_context("spawn").Pool(cfg.workers) as pool:
            results = list(tqdm(pool.imap(_class_records, jobs), total=len(jobs), desc="convert classes"))
    else:
        results = [_class_records(j) for j in tqdm(jobs, desc="convert classes")]

    faults = list(release.faults) + [Fault(**f) for r in results for f in r["faults"]]
    records = [rec for r in results for rec in r["records"]]
    for r in results:
        src = train_root / r["wnid"]
        if src.is_dir():
            _link_tree(src, out / "train" / "img" / r["wnid"], cfg.link)
        fileio.write_text(out / "train" / "whether_pseudo" / f"{r['wnid']}.txt",
                          "".join(f"{rec['file_name']} 0\n" for rec in r["records"]))
    n_val = _convert_val(Path(val_list), Path(imagenet_val), wnids, out, cfg, faults) if val_list else 0
    for name, coco in _coco_files(records, wnids, parts, cfg.seed, cfg.split).items():
        fileio.write_json(out / "seg_benchmark" / f"{name}.json", coco)
    fileio.write_json(out / "parts.json", parts, indent=1)

    summary = {"classes": len(wnids), "part_categories": len(parts), "images": len(records),
               "part_masks": sum(len(r["parts"]) for r in records), "objects": sum(len(r["objects"]) for r in records),
               "discarded": len(release.discarded), "val_images": n_val, "skipped_records": len(faults)}
    fileio.write_text(out / "convert_report.json", json.dumps({"summary": summary, "faults": json.loads(dump_faults(faults))}, indent=1))
    fileio.write_text(out / "convert_report.txt", "".join(f.line() + "\n" for f in faults) or "no skipped records\n")
    own = [out / "parts.json", out / "convert_report.json", *sorted((out / "seg_benchmark").glob("*.json"))]
    store.finish(out, ident, own + ([out / "val_1w" / "val_list.txt"] if val_list else []), {"summary": summary}, MANIFEST)
    shutil.rmtree(out / ".cache", ignore_errors=True)
    return summary


def _remove_own_outputs(out: Path) -> None:
    """Delete what `convert` writes (image folders are links or copies: their sources are untouched)."""
    for rel in OWN_OUTPUTS:
        p = out / rel
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)
