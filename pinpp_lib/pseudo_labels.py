"""Pseudo part labels with the Category Filter (paper §4.1, Table 6 left; no public code exists).

The part model (Mask R-CNN trained on the `parts` benchmark file) runs over every training image
that has no real part mask. Each detection gets one label, the argmax of its class scores; with the
**Category Filter (CF)** the image's known class y first zeroes the scores of every part category
that is not a part of y, so a part of another class can never be emitted. Detections above
`score_thr` are composed into the MPM layout's 16-bit PNG of global part ids with the converter's
overlap rule (inclusion depth first: an included child over its parent; at equal depth the higher
score wins), written for both variants:

    <converted>/train/seg_pseudo_cf/<wnid>/<name>.png      real labels + pseudo labels with CF
    <converted>/train/seg_pseudo_nocf/<wnid>/<name>.png    real labels + pseudo labels without CF
    <converted>/train/whether_pseudo/<wnid>.txt            "<wnid>/<name>.JPEG 0|1" (1 = pseudo)

Real labels are linked into both folders, so every part-supervised run of notebooks 05/06 trains on
real + pseudo (CF) masks alike (`TrainConfig.seg_dir`, paper §4.2); the w/o-CF folder feeds Table 6's ablation. Labelling is batched, resumable (finished images are skipped) and reports
images/s; unreadable images are skipped and listed in `pseudo_report.txt`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from . import fileio, layout, masks, plots, seg_eval, seg_recipes, segmentation, store
from .checks import Checked, Rule, at_least, between
from .datasets import list_image_folder

VARIANTS = {"nocf": {"cf": False, "single_label": True}, "cf": {"cf": True, "single_label": True}}
TABLE6_NAMES = {"nocf": "pseudo labels w/o CF", "cf": "pseudo labels w/ CF"}
SEG_DIRS = layout.PSEUDO_SEG_DIRS  # label folders under <converted>/train, one per variant (TrainConfig.seg_dir)


@dataclass
class PseudoConfig(Checked):
    """Pseudo-labelling settings (our choices where the paper is silent)."""
    score_thr: float = 0.5   # a detection enters the pseudo label at this score or above
    batch_size: int = 8
    det_score_thr: float = 0.05  # RoI-head threshold before CF/argmax (as in evaluation)
    LIMITS: ClassVar[dict[str, Rule]] = {"score_thr": between(0, 1), "batch_size": at_least(1), "det_score_thr": between(0, 1)}


def allowed_labels(classes: list[str]) -> dict[str, list[int]]:
    """wnid → the model labels that are parts of that class (training categories are '<wnid>:<part>')."""
    out: dict[str, list[int]] = {}
    for i, name in enumerate(classes):
        out.setdefault(name.split(":", 1)[0], []).append(i)
    return out


def compose(pred, label_ids: list[int], depth: dict[int, int], shape: tuple[int, int], score_thr: float) -> np.ndarray:
    """A (H, W) uint16 map of global part ids from one image's detections (0 = background).

    Detections under `score_thr` are dropped; the rest are painted by inclusion depth, then by
    ascending score, so an included child lies over its parent and a surer detection over a less sure one.
    """
    out = np.zeros(shape, dtype=np.uint16)
    if len(pred) == 0:
        return out
    scores, labels = pred.scores.numpy(), pred.labels.numpy()
    gids = [label_ids[lab] for lab in labels]
    keep = [i for i in range(len(scores)) if scores[i] >= score_thr]
    m = pred.masks.numpy()
    for i in sorted(keep, key=lambda i: (depth[gids[i]], scores[i])):
        out[m[i].astype(bool)] = gids[i]
    return out


MANIFEST = "seg_pseudo_manifest.json"  # under <converted>/train: the identity the pseudo labels there belong to
RECORDS = "seg_pseudo_records_*.jsonl"   # under <converted>/train: per-image records, one file per shard


def identity(run: dict, conv: Path, pc: PseudoConfig, sc: segmentation.SegConfig | None = None) -> store.Identity:
    """What the pseudo labels depend on: the part model's weights, the global part ids (`parts.json`, the
    values painted), the thresholds and the part model's test settings (resize, detections per image; `sc`).
    Images already labelled under the same identity are kept."""
    test = {} if sc is None else seg_recipes.test_keys(sc)
    return store.Identity("pseudo-labels", {"score_thr": pc.score_thr, "det_score_thr": pc.det_score_thr,
                                            "variants": VARIANTS, **test},
                          {"model": run["sha256"], "parts": fileio.sha256_file(conv / "parts.json")})


def unlabelled_images(converted: str | Path) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]]]:
    """(classes, all training samples, the samples without a real part mask); samples are (relative path, label)."""
    conv = Path(converted)
    classes, samples = list_image_folder(conv / "train" / "img")
    return classes, samples, [(rel, y) for rel, y in samples if not masks.seg_path_for(conv / "train" / layout.REAL_SEG_DIR, rel).exists()]


def _link_real_labels(conv: Path, dest: Path) -> int:
    """Link every real label PNG into `dest` (relative symlinks; idempotent). Returns the count."""
    n = 0
    for src in sorted((conv / "train" / layout.REAL_SEG_DIR).glob("*/*.png")):
        dst = dest / src.parent.name / src.name
        n += 1
        if dst.is_symlink() or dst.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f"._tmp{os.getpid()}{dst.name}")  # per process: shards may link at the same time
        tmp.unlink(missing_ok=True)
        os.symlink(os.path.relpath(src, dst.parent), tmp)
        os.replace(tmp, dst)
    return n


def pseudo_label(run: dict, converted: str | Path, sc: segmentation.SegConfig, pc: PseudoConfig,
                 limit: int | None = None, shard: tuple[int, int] = (0, 1)) -> tuple[dict[str, Any], pd.DataFrame]:
    """Write pseudo labels (both variants) for every unlabelled training image; resumable.

    Returns a summary (images, skipped, images/s) and per-image records (variant, detections kept,
    parts painted, labelled fraction, parts of another class). `limit` caps the images (a dry run).
    `shard=(k, n)` labels every n-th image from the k-th, so n processes (one per GPU) can share the
    work; a last run without a shard then finds nothing pending and writes `whether_pseudo` for all.
    """
    conv = Path(converted)
    dirs = {v: conv / "train" / d for v, d in SEG_DIRS.items()}
    ident = identity(run, conv, pc, sc)
    why = store.stale(conv / "train", ident, MANIFEST)
    if why:  # a day of GPU work per variant: refuse rather than relabel over it
        raise fileio.PinppError(f"{conv / 'train' / MANIFEST}: the pseudo labels there come from another part model, "
                                f"part table, threshold or test setting ({why}); delete {conv / 'train'}/seg_pseudo_* and the "
                                "manifest to relabel")
    if not (conv / "train" / MANIFEST).exists():  # a fresh start: per-image records of an earlier attempt are not ours
        for f in (conv / "train").glob(RECORDS):
            f.unlink()
    fileio.write_json(conv / "train" / MANIFEST, ident.record(), indent=1)  # written first: labels in progress are its
    n_real = sum(_link_real_labels(conv, d) for d in dirs.values()) // len(dirs)

    parts = fileio.read_json(conv / "parts.json", "part table", "re-run `pinpp convert`")
    depth = {p["id"]: p["depth"] for p in parts}
    wnid_of = {p["id"]: p["wnid"] for p in parts}
    allowed = allowed_labels(run["classes"])
    classes, samples, unlabelled = unlabelled_images(conv)
    todo = unlabelled[:limit] if limit is not None else unlabelled
    k, n = shard
    pending = [(rel, y) for i, (rel, y) in enumerate(todo)
               if i % n == k and not all(masks.seg_path_for(d, rel).exists() for d in dirs.values())]
    items = [{"img_path": conv / "train" / "img" / rel, "img_id": i, "file_name": rel,
              "allowed_labels": allowed.get(classes[y], [])} for i, (rel, y) in enumerate(pending)]

    model, _ = segmentation.load_model(run, sc.device, dataclasses.replace(sc, score_thr=pc.det_score_thr))
    skipped = []
    record_file = conv / "train" / RECORDS.replace("*", f"{k}of{n}")  # one per shard: processes never share a file
    t0 = time.time()
    for it, preds, err in seg_eval.infer(model, items, pc.batch_size, VARIANTS, desc="pseudo labels"):
        if err:
            skipped.append(f"{it['file_name']}: {err}")
            continue
        rows = []
        for v, pred in preds.items():
            shape = tuple(pred.masks.shape[1:]) if len(pred) else _image_shape(it["img_path"])
            label = compose(pred, run["cat_ids"], depth, shape, pc.score_thr)
            masks.write_label_png(masks.seg_path_for(dirs[v], it["file_name"]), label)
            rows.append(_record(it["file_name"], v, label, wnid_of, detections=len(pred),
                                kept=int((pred.scores >= pc.score_thr).sum()) if len(pred) else 0))
        with open(record_file, "a") as f:  # after the image's PNGs: a resumed run reports the images labelled before
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    seconds = time.time() - t0
    done = [rel for rel, _ in todo if all(masks.seg_path_for(d, rel).exists() for d in dirs.values())]
    records = _all_records(conv / "train", done, dirs, wnid_of)
    _write_whether_pseudo(conv, samples, classes, {rel for rel, _ in unlabelled}, set(done))
    fileio.write_text(conv / "train" / "pseudo_report.txt",
                      "".join(s + "\n" for s in skipped) or "no unreadable images\n")
    summary = {"real labels": n_real, "unlabelled images": len(todo), "labelled now": len(pending) - len(skipped),
               "labelled before (resumed)": len(done) - (len(pending) - len(skipped)), "skipped (unreadable)": len(skipped),
               "still without a label": len(todo) - len(done),
               "seconds": round(seconds, 1), "images/s": round((len(pending) - len(skipped)) / max(seconds, 1e-9), 2)}
    return summary, pd.DataFrame(records)


def _record(rel: str, variant: str, label: np.ndarray, wnid_of: dict[int, str], detections: float, kept: float) -> dict:
    """One image's record for one variant: its detections and those kept, and what its label map paints."""
    ids = [int(i) for i in np.unique(label) if i]
    wnid = rel.split("/")[0]
    return {"file_name": rel, "wnid": wnid, "variant": variant, "detections": detections, "kept": kept,
            "parts painted": len(ids), "labelled fraction": float((label > 0).mean()),
            "parts of another class": sum(wnid_of.get(i) != wnid for i in ids)}


def _all_records(train: Path, done: list[str], dirs: dict[str, Path], wnid_of: dict[int, str]) -> list[dict]:
    """Per-image records of the labelled images `done`, from this run and the runs it resumes (all shards), in the
    order of `done` and of VARIANTS; the last record of an image and variant wins, a line cut short by a crash is
    skipped. An image labelled before records were kept gets the fields its PNG gives (detections unknown: NaN)."""
    order, vorder = {rel: i for i, rel in enumerate(done)}, list(VARIANTS)
    latest: dict[tuple[str, str], dict] = {}
    for f in sorted(train.glob(RECORDS)):
        for line in f.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if r.get("file_name") in order:
                latest[(r["file_name"], r["variant"])] = r
    for rel in done:
        for v in VARIANTS:
            if (rel, v) not in latest:
                label = masks.read_label_png(masks.seg_path_for(dirs[v], rel))
                latest[(rel, v)] = _record(rel, v, label, wnid_of, detections=np.nan, kept=np.nan)
    return [latest[k] for k in sorted(latest, key=lambda k: (order[k[0]], vorder.index(k[1])))]


def _image_shape(path: Path) -> tuple[int, int]:
    from PIL import Image
    with Image.open(path) as im:
        return im.height, im.width


def _write_whether_pseudo(conv: Path, samples: list[tuple[str, int]], classes: list[str], unlabelled: set[str],
                          pseudo: set[str]) -> None:
    """whether_pseudo/<wnid>.txt over every labelled training image: 0 = real mask, 1 = pseudo mask.
    `unlabelled`: the images without a real mask (`unlabelled_images` looked once; no second pass over the disk)."""
    lines: dict[str, list[str]] = {w: [] for w in classes}
    for rel, y in samples:
        if rel not in unlabelled:
            lines[classes[y]].append(f"{rel} 0\n")
        elif rel in pseudo:
            lines[classes[y]].append(f"{rel} 1\n")
    for wnid, ls in lines.items():
        fileio.write_text(conv / "train" / "whether_pseudo" / f"{wnid}.txt", "".join(ls))


def table6_left(rows: list[dict]) -> pd.DataFrame:
    """AP / AP50 (mask and box, %) of the part model on the val split, without and with CF."""
    df = pd.DataFrame(rows)
    df["labels"] = df["variant"].map(TABLE6_NAMES)
    return df[["labels", "model", *seg_eval.METRICS, "detections"]]


def plot_pseudo(converted: str | Path, records: pd.DataFrame, path: str | Path, n: int = 6) -> Path:
    """Unlabelled images with their pseudo labels without and with CF (colour = global part id);
    images where CF changed most (parts of another class removed) come first."""
    plt = plots.pyplot()
    from PIL import Image

    from .imagenet import class_label
    conv = Path(converted)
    by = records.set_index(["file_name", "variant"])
    piv = records.pivot_table(index="file_name", columns="variant", values="parts of another class", aggfunc="first")
    files = list(piv.sort_values("nocf", ascending=False, kind="stable").index[:n])
    fig, axes = plt.subplots(3, len(files), figsize=(2.3 * len(files), 7.0), squeeze=False)
    for col, rel in enumerate(files):
        img = np.asarray(Image.open(conv / "train" / "img" / rel).convert("RGB"))
        axes[0, col].imshow(img)
        axes[0, col].set_title(class_label(rel.split("/")[0]), fontsize=7)
        for row, v in ((1, "nocf"), (2, "cf")):
            lab = masks.read_label_png(masks.seg_path_for(conv / "train" / SEG_DIRS[v], rel))
            r = by.loc[(rel, v)]
            axes[row, col].imshow(seg_eval.overlay(img, [(lab == i, int(i)) for i in np.unique(lab) if i]))
            what = (f"{int(r['parts painted'])} parts on {r['labelled fraction']:.0%} of pixels, {int(r['parts of another class'])} foreign"
                    if r["parts painted"] else "nothing painted (0% of pixels)")
            axes[row, col].set_title(f"{'w/o' if v == 'nocf' else 'w/'} CF: {what}", fontsize=6)
        for ax in axes[:, col]:
            ax.axis("off")
    fig.suptitle("Pseudo part labels: w/o CF (middle) vs w/ CF (bottom), colour = part; 'foreign' = parts of another "
                 "class (what CF removes)", fontsize=8)
    fig.tight_layout()
    plots.save(fig, path, dpi=110)
    return Path(path)
