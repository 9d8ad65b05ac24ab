"""Dataset statistics (paper §3): Table 1, Table 2, inclusion relations, parts per class, Fig. 1.

All numbers come from a validated release (`release.load_release`); discarded images are excluded,
as everywhere in the kit. Per-image records (`image_records`) are the source of every aggregate.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from . import plots
from .release import Release

BINS = [(1, 2, "1–2"), (3, 4, "3–4"), (5, 6, "5–6"), (7, None, "7+")]


def image_records(release: Release) -> pd.DataFrame:
    """One row per kept image: wnid, file name, number of part masks, number of distinct parts."""
    rows = []
    for wnid, cls in release.classes.items():
        per_image: dict[int, list[int]] = {}
        for a in cls.annotations:
            per_image.setdefault(a["image_id"], []).append(a["category_id"])
        for im in cls.images:
            if im["file_name"] in release.discarded:
                continue
            cats = per_image.get(im["id"], [])
            rows.append({"wnid": wnid, "file_name": im["file_name"], "part_masks": len(cats),
                         "distinct_parts": len(set(cats))})
    return pd.DataFrame(rows, columns=["wnid", "file_name", "part_masks", "distinct_parts"])


def table1(records: pd.DataFrame) -> pd.DataFrame:
    """Share (%) of images by number of part masks: 1–2, 3–4, 5–6, 7+ (and 0, if any image has none)."""
    n = len(records)
    rows = []
    if (records["part_masks"] == 0).any():
        rows.append({"part masks per image": "0", "images": int((records["part_masks"] == 0).sum())})
    for lo, hi, label in BINS:
        sel = (records["part_masks"] >= lo) & ((records["part_masks"] <= hi) if hi else True)
        rows.append({"part masks per image": label, "images": int(sel.sum())})
    df = pd.DataFrame(rows)
    df["share (%)"] = 100.0 * df["images"] / max(n, 1)
    return df


def table2_row(release: Release, records: pd.DataFrame, name: str = "PartImageNet++ (ours)") -> dict:
    """Our row of Table 2: object categories, part categories, images, part masks."""
    return {"dataset": name, "object categories": len(release.classes),
            "part categories": sum(len(c.categories) for c in release.classes.values()),
            "images": len(records), "part masks": int(records["part_masks"].sum())}


def inclusion_summary(release: Release) -> pd.DataFrame:
    """Inclusion relations: classes that have any, relations in total, and the most common pairs."""
    pairs = pd.Series([f"{c}:{p}" for cls in release.classes.values() for c, p in cls.inclusion], dtype=object)
    rows = [{"statistic": "classes with inclusion relations", "value": sum(bool(c.inclusion) for c in release.classes.values())},
            {"statistic": "inclusion relations", "value": len(pairs)}]
    rows += [{"statistic": f"relation '{k}'", "value": int(v)} for k, v in pairs.value_counts().head(5).items()]
    return pd.DataFrame(rows)


def parts_per_class(release: Release) -> pd.Series:
    """Number of part categories of each class (index: wnid)."""
    return pd.Series({w: len(c.categories) for w, c in release.classes.items()}, name="parts")


def plot_parts_histogram(counts: pd.Series, path: str | Path) -> Path:
    """Histogram of parts per class (seaborn), saved to `path`."""
    plt = plots.pyplot()
    import seaborn as sns
    fig, ax = plt.subplots(figsize=(5, 3))
    sns.countplot(x=counts.values, ax=ax, color="#4C72B0")
    ax.set_xlabel("part categories per class")
    ax.set_ylabel("classes")
    fig.tight_layout()
    plots.save(fig, path, dpi=120)
    return Path(path)


def plot_overlay_grid(release: Release, imagenet_train: str | Path, path: str | Path, n: int = 12,
                      seed: int = 0, cols: int = 4) -> Path:
    """Fig. 1-style grid: images with coloured part overlays and a legend of part names per image."""
    plt = plots.pyplot()
    from matplotlib.patches import Patch
    from PIL import Image

    from .imagenet import class_label
    from .masks import rasterise

    rng = np.random.default_rng(seed)
    wnids = release.wnids
    picks = [wnids[i] for i in rng.permutation(len(wnids))[:n]] if len(wnids) >= n else [wnids[i % len(wnids)] for i in range(n)]
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 4.0 * rows), squeeze=False)
    palette = plt.get_cmap("tab10")
    for ax, wnid in zip(axes.flat, picks):
        cls = release.classes[wnid]
        kept = [im for im in cls.images if im["file_name"] not in release.discarded]
        im = kept[int(rng.integers(len(kept)))]
        img = np.asarray(Image.open(Path(imagenet_train) / im["file_name"]).convert("RGB"), dtype=np.float32) / 255
        overlay = img.copy()
        names = {c["id"]: c["name"] for c in cls.categories}
        colour = {cid: palette(k % 10)[:3] for k, cid in enumerate(names)}
        anns = [a for a in cls.annotations if a["image_id"] == im["id"]]
        for a in sorted(anns, key=lambda a: cls.depth(names[a["category_id"]])):
            m = rasterise(a["segmentation"], im["height"], im["width"]).astype(bool)
            overlay[m] = 0.3 * overlay[m] + 0.7 * np.array(colour[a["category_id"]])
        ax.imshow(overlay)
        for a in anns:  # outlines keep overlapping parts (child over parent) apart
            m = rasterise(a["segmentation"], im["height"], im["width"])
            ax.contour(m, levels=[0.5], colors=[colour[a["category_id"]]], linewidths=1.2)
        ax.set_title(class_label(wnid), fontsize=9)
        ax.axis("off")
        present = sorted({a["category_id"] for a in anns})
        # below the image, not on it: the legend must not hide the parts it names
        ax.legend(handles=[Patch(color=colour[c], label=names[c]) for c in present], fontsize=7, loc="upper center",
                  bbox_to_anchor=(0.5, 0.0), ncol=2, frameon=False)
    for ax in list(axes.flat)[len(picks):]:
        ax.axis("off")
    fig.tight_layout()
    plots.save(fig, path, dpi=110)
    return Path(path)
