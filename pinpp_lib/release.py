"""Reading and validating the public PIN++ annotation release (paper §3; facts §1).

    json/<wnid>.json       COCO-style per class: images (local ids from 1), annotations (polygons), categories
    including/<wnid>.txt   "child:parent" lines (child lies inside parent; masks overlap on purpose)
    discarded_data.json    [{"file_name": "<wnid>/<name>.JPEG"}, ...] excluded by the annotators
    category_name.json     optional; not needed by the kit

`load_release` checks everything it can without the images and reports each fault as one line that
names the file, the record and the fix. Faults that would change the global part ids (an unreadable
class file, bad categories, an unknown wnid) are always fatal; record-level faults (one image, one
annotation, one inclusion line) either stop the run (`strict=True`) or drop that record and are listed
in the report (`strict=False`, the CLI's `--skip-bad`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from . import fileio
from .imagenet import in1k_index
from .fileio import PinppError

FIX_DOWNLOAD = "re-download this file from the PIN++ release"


@dataclass
class Fault:
    """One bad record: where it is, what is wrong and how to fix it."""
    file: str
    record: str
    problem: str
    fix: str = FIX_DOWNLOAD

    def line(self) -> str:
        return f"{self.file}: {self.record}: {self.problem}; {self.fix}"


@dataclass
class ClassAnnotations:
    """The validated annotations of one object class (one json/<wnid>.json)."""
    wnid: str
    categories: list[dict]                     # local {id, name}, in file order
    images: list[dict]                         # {id, width, height, file_name}
    annotations: list[dict]                    # valid annotations only
    inclusion: list[tuple[str, str]] = field(default_factory=list)  # (child, parent) part names

    def depth(self, part: str) -> int:
        """Inclusion depth of a part: 0 for top-level parts, parent depth + 1 for included ones."""
        parents = dict(self.inclusion)
        d, seen = 0, set()
        while part in parents and part not in seen:
            seen.add(part)
            part, d = parents[part], d + 1
        return d


@dataclass
class Release:
    """A validated release: classes in sorted-wnid order, discarded file names, and the faults seen."""
    root: Path
    classes: dict[str, ClassAnnotations]
    discarded: set[str]
    faults: list[Fault]

    @property
    def wnids(self) -> list[str]:
        return list(self.classes)


class Checker:
    """Collects faults; in strict mode the first one stops the run as a one-line PinppError."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.faults: list[Fault] = []

    def fault(self, file: str, record: str, problem: str, fix: str = FIX_DOWNLOAD) -> None:
        f = Fault(file, record, problem, fix)
        if self.strict:
            raise PinppError(f.line() + " (or use --skip-bad to drop bad records)")
        self.faults.append(f)

    @staticmethod
    def fatal(file: str, record: str, problem: str, fix: str = FIX_DOWNLOAD) -> None:
        raise PinppError(Fault(file, record, problem, fix).line())


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def known_wnids() -> set[str]:
    return set(in1k_index())


def _check_polygons(seg, w: float, h: float, tol: float = 1.0) -> str | None:
    """Problem with a segmentation, or None. Polygons: ≥ 3 points, even length, inside the image."""
    if isinstance(seg, dict):
        ok = "counts" in seg and seg.get("size") == [h, w]
        return None if ok else f"RLE segmentation without counts or with size {seg.get('size')} ≠ [{h}, {w}]"
    if not isinstance(seg, list) or not seg:
        return "segmentation is neither a polygon list nor an RLE"
    for k, poly in enumerate(seg):
        if not isinstance(poly, list) or not all(_is_num(v) for v in poly):
            return f"polygon {k} is not a list of numbers"
        if len(poly) % 2:
            return f"polygon {k} has an odd number of coordinates ({len(poly)})"
        if len(poly) < 6:
            return f"polygon {k} has {len(poly) // 2} points (needs at least 3)"
        xs, ys = poly[0::2], poly[1::2]
        if min(xs) < -tol or min(ys) < -tol or max(xs) > w + tol or max(ys) > h + tol:
            return (f"polygon {k} lies outside the {w}x{h} image "
                    f"(x {min(xs):.1f}..{max(xs):.1f}, y {min(ys):.1f}..{max(ys):.1f})")
    return None


def _load_class(path: Path, wnid: str, chk: Checker) -> ClassAnnotations:
    name = f"json/{path.name}"
    data = fileio.read_json(path, "class file", FIX_DOWNLOAD)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        chk.fatal(name, "top level", "expected an object with lists 'images', 'annotations', 'categories'")
    cats, cat_ids, cat_names = [], set(), set()
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str) or not c["name"]:
            chk.fatal(name, f"categories[{i}]", "category needs an integer 'id' and a non-empty 'name'")
        if c["id"] in cat_ids or c["name"] in cat_names:
            chk.fatal(name, f"categories[{i}]", f"duplicate category id {c['id']} or name {c['name']!r}")
        cat_ids.add(c["id"])
        cat_names.add(c["name"])
        cats.append({"id": c["id"], "name": c["name"]})
    if not cats:
        chk.fatal(name, "categories", "no part categories")

    images: dict[int, dict] = {}
    for i, im in enumerate(data["images"]):
        rec = f"images[{i}]"
        if not isinstance(im, dict) or not isinstance(im.get("id"), int) or not isinstance(im.get("file_name"), str):
            chk.fault(name, rec, "image needs an integer 'id' and a 'file_name'")
            continue
        if not (_is_num(im.get("width")) and _is_num(im.get("height")) and im["width"] > 0 and im["height"] > 0):
            chk.fault(name, f"{rec} (id {im['id']})", "image needs positive 'width' and 'height'")
            continue
        if im["id"] in images:
            chk.fault(name, f"{rec} (id {im['id']})", "duplicate image id")
            continue
        if Path(im["file_name"]).parts[0] != wnid:
            chk.fault(name, f"{rec} ({im['file_name']})", f"file_name is not under the class folder {wnid}/")
            continue
        images[im["id"]] = {k: im[k] for k in ("id", "width", "height", "file_name")}

    anns, ann_ids = [], set()
    for i, a in enumerate(data["annotations"]):
        rec = f"annotations[{i}]" + (f" (id {a.get('id')})" if isinstance(a, dict) and "id" in a else "")
        if not isinstance(a, dict):
            chk.fault(name, rec, "annotation is not an object")
            continue
        if a.get("id") in ann_ids:
            chk.fault(name, rec, "duplicate annotation id")
            continue
        if a.get("image_id") not in images:
            chk.fault(name, rec, f"image_id {a.get('image_id')!r} does not exist in 'images'")
            continue
        if a.get("category_id") not in cat_ids:
            chk.fault(name, rec, f"category_id {a.get('category_id')!r} does not exist in 'categories'")
            continue
        im = images[a["image_id"]]
        problem = _check_polygons(a.get("segmentation"), im["width"], im["height"])
        if problem:
            chk.fault(name, rec, problem)
            continue
        bbox = a.get("bbox")
        if bbox is not None and not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_num(v) for v in bbox)
                                     and bbox[2] >= 0 and bbox[3] >= 0):
            chk.fault(name, rec, f"bbox {bbox!r} is not [x, y, w, h] with w, h >= 0")
            continue
        ann_ids.add(a.get("id"))
        # area/iscrowd may be missing in the release; they are recomputed from the masks when needed.
        anns.append({"id": a.get("id"), "image_id": a["image_id"], "category_id": a["category_id"],
                     "segmentation": a["segmentation"], "bbox": bbox})
    return ClassAnnotations(wnid, cats, list(images.values()), anns)


def _load_inclusion(path: Path, cls: ClassAnnotations, chk: Checker) -> None:
    name = f"including/{path.name}"
    parts = {c["name"] for c in cls.categories}
    relations: list[tuple[str, str]] = []
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.count(":") != 1 or not all(s.strip() for s in line.split(":")):
            chk.fault(name, f"line {n} {line!r}", "expected 'child:parent'")
            continue
        child, parent = (s.strip() for s in line.split(":"))
        missing = [p for p in (child, parent) if p not in parts]
        if missing or child == parent:
            why = f"class {cls.wnid} has no part {missing[0]!r}" if missing else "a part cannot include itself"
            chk.fault(name, f"line {n} {line!r}", f"{why} (parts: {', '.join(sorted(parts))})",
                      "fix the line or re-download the file")
            continue
        relations.append((child, parent))
    cls.inclusion = relations
    for child, _ in relations:  # a cycle would make the paint order undefined
        seen, p, parents = set(), child, dict(relations)
        while p in parents:
            if p in seen:
                chk.fatal(name, f"part {child!r}", "inclusion relations form a cycle", "fix the file")
            seen.add(p)
            p = parents[p]


def load_release(root: str | Path, strict: bool = True, wnids: set[str] | None = None) -> Release:
    """Read and validate a PIN++ release folder. Raises PinppError (one line) on fatal faults.

    `wnids` restricts the check of class names (default: the 1000 IN-1K wnids).
    """
    root = Path(root)
    jdir = root / "json"
    if not jdir.is_dir():
        raise PinppError(f"{root}: no json/ folder; point --annotations at the PIN++ release "
                         "(it holds json/<wnid>.json, including/, discarded_data.json)")
    valid = wnids if wnids is not None else known_wnids()
    chk = Checker(strict)
    classes: dict[str, ClassAnnotations] = {}
    files = sorted(jdir.glob("*.json"))
    if not files:
        raise PinppError(f"{jdir}: no <wnid>.json files; download the release's json/ folder")
    for path in files:
        if path.stem not in valid:
            chk.fatal(f"json/{path.name}", "file name", f"{path.stem!r} is not an ImageNet-1K wnid",
                      "remove or rename the file")
        classes[path.stem] = _load_class(path, path.stem, chk)
    inc_dir = root / "including"
    for path in sorted(inc_dir.glob("*.txt")) if inc_dir.is_dir() else []:
        if path.stem not in classes:
            chk.fault(f"including/{path.name}", "file name", f"no json/{path.stem}.json for this inclusion file",
                      "remove the file or add the class")
            continue
        _load_inclusion(path, classes[path.stem], chk)

    discarded: set[str] = set()
    dpath = root / "discarded_data.json"
    if dpath.exists():
        data = fileio.read_json(dpath, "discarded list", FIX_DOWNLOAD)
        if not isinstance(data, list) or not all(isinstance(d, dict) and isinstance(d.get("file_name"), str) for d in data):
            chk.fatal("discarded_data.json", "top level", "expected a list of {\"file_name\": ...} objects")
        discarded = {d["file_name"] for d in data}
    else:
        chk.faults.append(Fault("discarded_data.json", "file", "missing: no image is excluded",
                                "download it from the release to exclude the annotators' rejects"))
    if (root / "category_name.json").exists():
        fileio.read_json(root / "category_name.json", "category names", FIX_DOWNLOAD)  # optional; must parse
    return Release(root, classes, discarded, chk.faults)


def check_image(path: Path, width: int, height: int) -> str | None:
    """Problem with an ImageNet image file (missing, unreadable, truncated, wrong size), or None."""
    if not path.exists():
        return "image file missing under the ImageNet train root"
    try:
        with Image.open(path) as im:
            im.load()  # decodes fully: a truncated JPEG raises here
            size = im.size
    except Exception as e:  # PIL raises many types for corrupt files; all mean the same to the user
        return f"unreadable image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'corrupt'})"
    if size != (int(width), int(height)):
        return f"image is {size[0]}x{size[1]} but the annotation says {int(width)}x{int(height)}"
    return None


def dump_faults(faults: list[Fault]) -> str:
    """The faults as JSON text (for report files)."""
    return json.dumps([f.__dict__ for f in faults], indent=1)
