"""The embedded synthetic PIN++: a deterministic stand-in written in the exact public release format.

`generate(out, SynthConfig(...))` writes

    out/release/json/<wnid>.json          COCO-style, local ids from 1, polygon segmentation, bare part names
    out/release/including/<wnid>.txt      child:parent lines (only classes that have any)
    out/release/discarded_data.json       [{"file_name": ...}, ...]
    out/release/category_name.json        {wnid: {"object": name, "parts": [...]}} (schema of ours)
    out/imagenet/train/<wnid>/<wnid>_<k>.JPEG       annotated + unannotated (for pseudo-labelling)
    out/imagenet/val/<wnid>/ILSVRC2012_val_<8 digits>.JPEG
    out/imagenet/val_list.txt             "<wnid>/<file> <label>" (the authors' list form)
    out/class_supercategories.json        {wnid: super-category} (stand-in for PIN's super-categories)

so the same reader/converter runs on it as on the real release + ImageNet. Images carry the class in
the shape and arrangement of parts (see `synthetic_shapes`), with random colours, stripe textures,
gradient backgrounds and clutter shapes as nuisances.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import sys
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from . import fileio, store
from .imagenet import classes as imagenet_classes
from .checks import Checked, Rule, at_least, between
from .masks import paint_order
from .synthetic_shapes import SHAPES, ClassTemplate, Placement, class_template, clip_polygon, polygon_area, shape_polygon


@dataclass
class SynthConfig(Checked):
    """Size and seed of a synthetic release (the smoke profile sets its own sizes in `config`)."""
    classes: int = 8
    images_per_class: int = 24
    unannotated_per_class: int = 8
    val_per_class: int = 6
    size: int = 96
    seed: int = 0
    discard_rate: float = 0.04        # share of annotated images listed in discarded_data.json
    multi_instance_rate: float = 0.2  # share of images with two objects
    hide_rate: float = 0.1            # chance that a part instance is hidden (occluded/out of view)
    jpeg_quality: int = 90
    parts_total: int | None = None    # part categories over all classes (rehearsal: PIN++'s 3310); None: each template's own
    LIMITS: ClassVar[dict[str, Rule]] = {"classes": between(1, 1000), "images_per_class": at_least(1),
                                         "unannotated_per_class": at_least(0), "val_per_class": at_least(0), "size": at_least(16),
                                         "seed": at_least(0), "discard_rate": between(0, 1), "multi_instance_rate": between(0, 1),
                                         "hide_rate": between(0, 1), "jpeg_quality": between(1, 100),
                                         "parts_total": at_least(1)}


def synth_classes(n: int) -> list[tuple[str, str, str]]:
    """The first `n` synthetic classes as (wnid, super-category, short name)."""
    with resources.files("pinpp_lib.data").joinpath("synthetic_classes.json").open() as f:
        curated = [(c["wnid"], c["supercategory"], c["name"]) for c in json.load(f)["classes"]]
    if not 1 <= n <= 1000:
        raise fileio.PinppError(f"--classes {n}: choose between 1 and 1000")
    taken = {w for w, _, _ in curated}
    rest = [(c["wnid"], "generic", c["names"].split(",")[0]) for c in imagenet_classes() if c["wnid"] not in taken]
    return (curated + rest)[:n]


def part_budget(templates: list[ClassTemplate], total: int | None) -> list[int]:
    """Parts per class so that they sum to `total`: the classes with the most parts give one up each, in turn
    (ties: the first class), never below one. None keeps every template whole."""
    counts = [len(t.parts) for t in templates]
    if total is None:
        return counts
    if not len(counts) <= total <= sum(counts):
        raise fileio.PinppError(f"parts_total {total}: {len(counts)} synthetic classes can carry between {len(counts)} "
                                f"and {sum(counts)} part categories; choose a total in that range or more classes")
    excess = sum(counts) - total
    while excess:
        top = max(counts)
        for i, c in enumerate(counts):  # one sweep over the largest classes, so the cut spreads evenly
            if c == top and excess:
                counts[i] -= 1
                excess -= 1
    return counts


def _placement_jitter(pl: Placement, rng: np.random.Generator) -> Placement:
    dx, dy = rng.uniform(-0.04, 0.04, size=2)
    s = rng.uniform(0.9, 1.1)
    return Placement(pl.cx + dx, pl.cy + dy, pl.w * s, pl.h * s, pl.angle + rng.uniform(-5, 5))


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, size=3))


def _stripes(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A random two-colour stripe texture covering the canvas (nuisance texture for one part)."""
    yy, xx = np.mgrid[0:h, 0:w]
    a = rng.uniform(0, np.pi)
    period = rng.uniform(3, 10)
    band = (np.floor((xx * np.cos(a) + yy * np.sin(a)) / period) % 2).astype(bool)
    c1, c2 = np.array(_random_colour(rng)), np.array(_random_colour(rng))
    return Image.fromarray(np.where(band[..., None], c1, c2).astype(np.uint8))


def render(tpl: ClassTemplate, rng: np.random.Generator, width: int, height: int,
           n_instances: int, cfg_hide: float = 0.1) -> tuple[Image.Image, list[tuple[int, np.ndarray]]]:
    """Draw one image of class `tpl`; return it and its part polygons as (category index, (N, 2)).

    Parts are drawn in the converter's paint order (category order, included children last) so that
    the pixels agree with the masks the converter will rasterise from the polygons.
    """
    # Background: a gradient between two random colours, then clutter shapes (not annotated).
    t = np.linspace(0, 1, width)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, height)[:, None, None]
    c1, c2 = np.array(_random_colour(rng)), np.array(_random_colour(rng))
    bg = np.broadcast_to(c1 * (1 - t) + c2 * t, (height, width, 3)).astype(np.uint8)
    img = Image.fromarray(np.ascontiguousarray(bg))
    draw = ImageDraw.Draw(img)
    side = min(width, height)
    for _ in range(int(rng.integers(2, 6))):
        pl = Placement(rng.uniform(0, width), rng.uniform(0, height), *(rng.uniform(0.04, 0.2, 2) * side),
                       rng.uniform(0, 360))
        draw.polygon([tuple(p) for p in shape_polygon(SHAPES[int(rng.integers(4))], pl)], fill=_random_colour(rng))

    # Objects: scale, position, rotation and flip per instance; small jitter per part placement.
    polys: list[tuple[int, np.ndarray]] = []
    # Parts that may go missing (occluded/out of view): not the largest part, and no part that
    # includes another (a child must lie inside its parent).
    parents = {p.parent for p in tpl.parts}
    largest = max(range(len(tpl.parts)), key=lambda i: sum(pl.w * pl.h for pl in tpl.parts[i].placements))
    hideable = {i for i, p in enumerate(tpl.parts) if i != largest and p.name not in parents}
    for i in range(n_instances):
        scale = side * (rng.uniform(0.34, 0.44) if n_instances == 1 else rng.uniform(0.18, 0.24))
        cx = width * ((0.5 if n_instances == 1 else (i + 0.5) / n_instances) + rng.uniform(-0.08, 0.08))
        cy = height * (0.5 + rng.uniform(-0.12, 0.12))
        a = np.deg2rad(rng.uniform(-20, 20))
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        flip = np.array([-1.0 if rng.random() < 0.5 else 1.0, 1.0])
        for ci, part in enumerate(tpl.parts):
            for pl in part.placements:
                if ci in hideable and rng.random() < cfg_hide:  # occluded / out-of-view part: neither drawn nor annotated
                    continue
                pts = shape_polygon(part.shape, _placement_jitter(pl, rng)) * flip @ rot.T * scale + [cx, cy]
                pts = clip_polygon(pts, width, height)
                if len(pts) >= 3 and polygon_area(pts) >= 4.0:
                    polys.append((ci, np.round(pts, 2)))

    depth = {p.name: 0 for p in tpl.parts}
    for p in tpl.parts:  # parents precede children in the templates, so one pass suffices
        if p.parent is not None:
            depth[p.name] = depth[p.parent] + 1
    colours = {ci: _random_colour(rng) for ci in range(len(tpl.parts))}
    textured = {ci: rng.random() < 0.4 for ci in range(len(tpl.parts))}
    for k in paint_order([depth[tpl.parts[ci].name] for ci, _ in polys]):
        ci, pts = polys[k]
        xy = [tuple(p) for p in pts]
        if textured[ci]:
            m = Image.new("L", (width, height), 0)
            ImageDraw.Draw(m).polygon(xy, fill=255)
            img.paste(_stripes(rng, width, height), (0, 0), m)
        else:
            draw.polygon(xy, fill=colours[ci])
    noise = rng.normal(0, 6, size=(height, width, 3))
    img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8))
    return img, polys


def _image_size(rng: np.random.Generator, size: int) -> tuple[int, int]:
    short = int(round(size * rng.uniform(0.75, 1.0)))
    return (size, short) if rng.random() < 0.6 else (short, size)


def _class_job(args: tuple) -> dict:
    """Generate every image of one class; return its release JSON, inclusion lines and val entries."""
    cls_idx, (wnid, supercat, name), cfg, out, val_start, n_parts = args
    tpl = class_template(wnid, supercat, name, cfg.seed)
    tpl.parts = tpl.parts[:n_parts]  # a prefix: parents precede their included children in every template
    train_dir, val_dir = out / "imagenet" / "train" / wnid, out / "imagenet" / "val" / wnid
    train_dir.mkdir(parents=True, exist_ok=True)
    val_dir.mkdir(parents=True, exist_ok=True)
    images, anns, discarded, val = [], [], [], []
    n_train = cfg.images_per_class + cfg.unannotated_per_class
    for k in range(1, n_train + cfg.val_per_class + 1):
        rng = np.random.default_rng([cfg.seed, cls_idx, k])
        w, h = _image_size(rng, cfg.size)
        n_inst = 2 if rng.random() < cfg.multi_instance_rate else 1
        img, polys = render(tpl, rng, w, h, n_inst, cfg.hide_rate)
        if k > n_train:  # validation image, ImageNet val naming
            fname = f"ILSVRC2012_val_{val_start + k - n_train:08d}.JPEG"
            fileio.atomic_save_image(img, val_dir / fname, quality=cfg.jpeg_quality)
            val.append(f"{wnid}/{fname} {cls_idx}")
            continue
        fname = f"{wnid}_{k}.JPEG"
        fileio.atomic_save_image(img, train_dir / fname, quality=cfg.jpeg_quality)
        if k > cfg.images_per_class:
            continue  # unannotated training image (pseudo-label target)
        image_id = len(images) + 1
        images.append({"id": image_id, "width": w, "height": h, "file_name": f"{wnid}/{fname}"})
        if rng.random() < cfg.discard_rate:
            discarded.append({"file_name": f"{wnid}/{fname}"})
        for ci, pts in polys:
            x0, y0 = pts.min(0)
            x1, y1 = pts.max(0)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": ci + 1,
                         "segmentation": [[float(v) for v in pts.reshape(-1)]],
                         "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                         "area": round(polygon_area(pts), 2), "iscrowd": 0})
    release = {"images": images, "annotations": anns,
               "categories": [{"id": i + 1, "name": p.name} for i, p in enumerate(tpl.parts)]}
    inclusion = [f"{p.name}:{p.parent}" for p in tpl.parts if p.parent]
    return {"wnid": wnid, "supercategory": supercat, "name": name, "release": release,
            "inclusion": inclusion, "discarded": discarded, "val": val}


RECORD = "synth_config.json"  # the store's record of a finished tree


def generate(out: str | Path, cfg: SynthConfig | None = None, workers: int = 1) -> Path:
    """Write a synthetic release + ImageNet-layout images under `out` (deterministic for cfg.seed).

    Returns `out`. A finished tree carries its record `synth_config.json` (`store`): generating again with
    the same config onto intact files is a no-op; another config, or a generated file changed since, makes
    the kit delete its own tree (`release/`, `imagenet/`) and generate it again.
    """
    cfg = cfg or SynthConfig()
    out = Path(out)
    ident = store.Identity("synth", asdict(cfg))
    if store.finished(out, ident, RECORD) is not None:
        return out
    if store.read(out, RECORD) is not None:  # the kit's own earlier tree: regenerate, never mix two configs
        for sub in ("release", "imagenet"):
            shutil.rmtree(out / sub, ignore_errors=True)
        store.forget(out, RECORD)
    classes = sorted(synth_classes(cfg.classes))  # sorted wnids = label order, as in ImageFolder
    budget = part_budget([class_template(w, sc, n, cfg.seed) for w, sc, n in classes], cfg.parts_total)
    jobs = [(i, c, cfg, out, i * cfg.val_per_class, k) for i, (c, k) in enumerate(zip(classes, budget))]
    if workers > 1:
        # fork: the workers only use numpy/PIL (no torch/OpenMP state), and scripts need no __main__ guard
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with ctx.Pool(workers) as pool:
            results = list(tqdm(pool.imap(_class_job, jobs), total=len(jobs), desc="synth classes"))
    else:
        results = [_class_job(j) for j in tqdm(jobs, desc="synth classes")]
    rel = out / "release"
    for r in results:
        fileio.write_json(rel / "json" / f"{r['wnid']}.json", r["release"])
        if r["inclusion"]:
            fileio.write_text(rel / "including" / f"{r['wnid']}.txt", "\n".join(r["inclusion"]) + "\n")
    fileio.write_json(rel / "discarded_data.json", [d for r in results for d in r["discarded"]])
    fileio.write_json(rel / "category_name.json",
                      {r["wnid"]: {"object": r["name"], "parts": [c["name"] for c in r["release"]["categories"]]}
                       for r in results}, indent=1)
    fileio.write_text(out / "imagenet" / "val_list.txt", "".join(f"{v}\n" for r in results for v in r["val"]))
    fileio.write_json(out / "class_supercategories.json", {r["wnid"]: r["supercategory"] for r in results}, indent=1)
    store.finish(out, ident, sorted(rel.rglob("*.json")) + [out / "imagenet" / "val_list.txt"], {"config": asdict(cfg)}, RECORD)
    return out
