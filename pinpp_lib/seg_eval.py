"""Inference and COCO evaluation of the segmentation benchmark (paper §5: Tables 9, 10).

    infer          batched mmdet inference; the backbone and RPN run once per batch and the RoI head
                   once per requested variant (plain, Category Filter, one label per RoI)
    evaluate_run   a finished run on a benchmark split: detections (per-detection records, COCO
                   results JSON in the run folder) → pycocotools COCOeval, mask and box AP / AP50
                   (COCO 0.5:0.95, area all, 100 detections; the paper's numbers) and the authors' LVIS
                   evaluation (`seg_lvis`: 300 detections, object/part AP), per-category AP records of both
    table9/10      the tables; Table 10 is object-only vs object+part training, evaluated on objects

Categories are matched by name between a model's training file and the evaluated file, so an
object+part model is scored on the objects file with its part detections dropped.
"""
from __future__ import annotations

import contextlib
import copy
import io
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
from pycocotools import mask as mask_utils
from tqdm.auto import tqdm

from . import fileio, jobs, plots, seg_lvis, seg_recipes, segmentation, store
from .segmentation import CONFIGS

IOU_TYPES = {"segm": "mask", "bbox": "box"}
PLAIN = {"plain": {"cf": False, "single_label": False}}  # the default variant: no Category Filter, all labels per RoI


def _test_pipeline(cfg):
    from mmcv.transforms import Compose
    return Compose(cfg.test_pipeline)


@contextlib.contextmanager
def _rcnn_option(model, key: str, value: Any):
    """Temporarily set an option of the RoI head's test config (e.g. single_label)."""
    tc = model.roi_head.test_cfg
    old = tc.get(key, None)
    tc[key] = value
    try:
        yield
    finally:
        tc[key] = old


MASK_CHUNK = 50  # detections per mask-head pass at test (see `predict`)


def predict(roi_head, x, rpn_results: list, samples: list, chunk: int = MASK_CHUNK) -> list:
    """`roi_head.predict(x, rpn_results, samples, rescale=True)` with the mask head run on at most `chunk` detections
    of one image at a time. The class-specific mask head outputs detections × classes × 28² floats (300 × 3311 at
    the full profile: 3.1 GB per image, three times over in a cascade, which averages its stages' masks); each
    detection's mask depends on its own box only (norms in eval mode), so the chunks give the same masks."""
    if not roi_head.with_mask:
        return roi_head.predict(x, rpn_results, samples, rescale=True)
    from mmengine.structures import InstanceData
    metas = [s.metainfo for s in samples]
    # as BaseRoIHead.predict: boxes stay in the network's frame; the mask branch rescales boxes and masks together
    results = roi_head.predict_bbox(x, metas, rpn_results, rcnn_test_cfg=roi_head.test_cfg, rescale=False)
    out = []
    for i, (res, meta) in enumerate(zip(results, metas)):
        xi = tuple(f[i:i + 1] for f in x)
        parts = [roi_head.predict_mask(xi, [meta], [res[j:j + chunk]], rescale=True)[0]
                 for j in range(0, max(len(res), 1), chunk)]
        out.append(parts[0] if len(parts) == 1 else InstanceData.cat(parts))
    return out


def infer(model, items: list[dict], batch_size: int, variants: dict[str, dict] | None = None,
          desc: str = "inference") -> Iterator[tuple[dict, dict[str, Any] | None, str | None]]:
    """Yield (item, {variant: pred_instances on CPU}, error) per item, in order.

    `items` are dicts with `img_path`, `img_id` and, for the Category Filter, `allowed_labels`.
    `variants` maps a name to {"cf": bool, "single_label": bool}; default: one plain variant.
    An image that cannot be read yields (item, None, reason) and the rest go on.
    """
    from mmengine.dataset import pseudo_collate
    variants = variants or PLAIN
    pipeline = _test_pipeline(model.cfg)
    dev = next(model.parameters()).device
    for start in tqdm(range(0, len(items), batch_size), desc=desc, leave=False):
        batch, datas, failed = items[start:start + batch_size], [], {}
        for k, it in enumerate(batch):
            try:
                datas.append(pipeline({"img_path": str(it["img_path"]), "img_id": it["img_id"]}))
            except Exception as e:  # unreadable/missing/truncated: reported, not fatal
                failed[k] = f"{type(e).__name__}: {e}"
        ok = [it for k, it in enumerate(batch) if k not in failed]
        outs: list[dict[str, Any]] = [{} for _ in ok]
        if ok:
            with torch.no_grad():
                data = model.data_preprocessor(pseudo_collate(datas), False)
                x = model.extract_feat(data["inputs"].to(dev))
                samples = data["data_samples"]
                rpn = model.rpn_head.predict(x, samples, rescale=False)
                for name, v in variants.items():
                    for s, it in zip(samples, ok):
                        s.set_metainfo({"allowed_labels": it.get("allowed_labels") if v.get("cf") else None})
                    with _rcnn_option(model, "single_label", bool(v.get("single_label"))):
                        res = predict(model.roi_head, x, copy.deepcopy(rpn), samples)
                    for o, r in zip(outs, res):
                        o[name] = r.cpu()
        it_ok = iter(outs)
        for k, it in enumerate(batch):
            yield (it, None, failed[k]) if k in failed else (it, next(it_ok), None)


def to_coco_detections(pred, image_id: int, cat_ids: list[int]) -> list[dict]:
    """COCO result dicts (bbox xywh, score, RLE mask) of one image's predicted instances."""
    if len(pred) == 0:
        return []
    boxes = pred.bboxes.numpy().astype(float)
    masks = pred.masks.numpy().astype(np.uint8) if "masks" in pred else None
    out = []
    for i, (lab, score) in enumerate(zip(pred.labels.tolist(), pred.scores.tolist())):
        x1, y1, x2, y2 = boxes[i]
        d = {"image_id": image_id, "category_id": cat_ids[lab], "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)}
        if masks is not None:
            rle = mask_utils.encode(np.asfortranarray(masks[i]))
            d["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        out.append(d)
    return out


def coco_evaluate(gt_file: str | Path, dets: list[dict], iou_type: str,
                  img_ids: list[int] | None = None) -> tuple[dict[str, float], pd.DataFrame]:
    """COCOeval (0.5:0.95, area all, 100 dets): ({AP, AP50} in %, per-category AP/AP50 in %), over the
    images `img_ids` of the file (None: all of them).

    A category with no ground truth in those images has AP NaN (excluded from the mean, as COCO does).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO(str(gt_file))
        cats = sorted(gt.getCatIds())
        ids = sorted(gt.getImgIds()) if img_ids is None else list(img_ids)
        n_gt = {c: len(gt.getAnnIds(imgIds=ids, catIds=[c], iscrowd=False)) for c in cats}
        if not dets:  # nothing detected: every category with ground truth scores 0
            per = pd.DataFrame({"category_id": cats, "AP": [0.0 if n_gt[c] else np.nan for c in cats]})
            per["AP50"] = per["AP"]
            summary = {"AP": 0.0, "AP50": 0.0}
        else:
            ev = COCOeval(gt, gt.loadRes(copy.deepcopy(dets)), iou_type)
            ev.params.imgIds = ids
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
            prec = ev.eval["precision"][:, :, :, 0, -1]  # T × R × K at area 'all', 100 dets

            def ap(p: np.ndarray) -> float:
                return float(p[p > -1].mean() * 100) if (p > -1).any() else np.nan
            per = pd.DataFrame({"category_id": ev.params.catIds,
                                "AP": [ap(prec[:, :, k]) for k in range(prec.shape[2])],
                                "AP50": [ap(prec[0, :, k]) for k in range(prec.shape[2])]})
            summary = {"AP": float(ev.stats[0] * 100), "AP50": float(ev.stats[1] * 100)}
    per["category"] = [gt.cats[c]["name"] for c in per.category_id]
    per["n_gt"] = [n_gt[c] for c in per.category_id]
    return summary, per


def benchmark_items(gt_file: str | Path, img_root: str | Path, limit: int = 0) -> list[dict]:
    """The images of a benchmark file as inference items: all, or the first `limit` (rehearsal)."""
    coco = fileio.read_json(gt_file, "COCO annotation file", "re-run `pinpp convert`")
    items = [{"img_path": Path(img_root) / im["file_name"], "img_id": im["id"], "file_name": im["file_name"]}
             for im in coco["images"]]
    return items[:limit] if limit else items


def detections_path(run: dict, eval_task: str, split: str, variants: dict[str, dict]) -> Path:
    """Where `detections` caches a run's detections on `<eval_task>_<split>.json` for these variants."""
    return Path(run["out"]) / f"detections_{eval_task}_{split}_{'_'.join(variants)}.json"


def detections(run: dict, converted: str | Path, split: str, eval_task: str, sc: segmentation.SegConfig,
               variants: dict[str, dict] | None = None, allowed: dict[str, list[int]] | None = None) -> dict[str, list[dict]]:
    """Per-detection records of a run on `<eval_task>_<split>.json`, per variant, cached in the run folder and
    reused only for the same weights, benchmark file, filter and test settings (`store`); category ids are those of
    the evaluated file, matched by name."""
    variants = variants or PLAIN
    gt_file = segmentation.annotation_file(converted, eval_task, split)
    cache = detections_path(run, eval_task, split, variants)
    settings = {"variants": variants, "score_thr": sc.score_thr, "allowed": allowed, **seg_recipes.test_keys(sc)}
    if sc.eval_images:
        settings["eval_images"] = sc.eval_images
    ident = store.Identity("detections", settings,
                           {"model": run["sha256"], "benchmark_file": fileio.sha256_file(gt_file)})
    done = store.finished(cache.parent, ident, cache.name)
    if done is not None:  # the same weights, benchmark file, filter and threshold
        return done["detections"]
    gt_cats = {c["name"]: c["id"] for c in segmentation.categories(gt_file)}
    # label → category id of the evaluated file; -1 = a category that file does not score (dropped)
    cat_ids = [gt_cats.get(name, -1) for name in run["classes"]]
    model, _ = segmentation.load_model(run, sc.device, sc)
    items = benchmark_items(gt_file, Path(converted) / "train" / "img", sc.eval_images)
    for it in items:
        if allowed is not None:
            it["allowed_labels"] = allowed[it["file_name"].split("/")[0]]
    out: dict[str, list[dict]] = {v: [] for v in variants}
    t0 = time.time()
    for it, preds, err in infer(model, items, sc.test_batch, variants, desc=f"{run['config']} on {eval_task}_{split}"):
        if err:
            raise fileio.PinppError(f"{it['img_path']}: {err}; restore the image (it is part of the benchmark split)")
        for v, p in preds.items():
            out[v] += [d for d in to_coco_detections(p, it["img_id"], cat_ids) if d["category_id"] != -1]
    store.finish(cache.parent, ident, [], {"images": len(items), "seconds": round(time.time() - t0, 2), "detections": out},
                 cache.name)
    return out


def evaluate_run(run: dict, converted: str | Path, split: str, eval_task: str, sc: segmentation.SegConfig,
                 variants: dict[str, dict] | None = None, allowed: dict[str, list[int]] | None = None
                 ) -> tuple[list[dict], pd.DataFrame]:
    """Mask and box AP/AP50 of a run per variant: (summary rows, per-category records)."""
    gt_file = segmentation.annotation_file(converted, eval_task, split)
    dets = detections(run, converted, split, eval_task, sc, variants, allowed)
    ids = [it["img_id"] for it in benchmark_items(gt_file, "", sc.eval_images)] if sc.eval_images else None
    rows, per_cat = [], []
    key = {"config": run["config"], "model": CONFIGS[run["config"]], "trained on": run["task"], "seed": run["seed"],
           "evaluated on": f"{eval_task}_{split}"}
    gt = fileio.read_json(gt_file, "COCO annotation file", "re-run `pinpp convert`")
    train_file = segmentation.annotation_file(converted, eval_task, "train")
    train = fileio.read_json(train_file, "COCO annotation file", "re-run `pinpp convert`") if train_file.exists() else None
    names = {c["id"]: c["name"] for c in gt["categories"]}
    for v, d in dets.items():
        row = {**key, "variant": v, "detections": len(d)}
        for iou, label in IOU_TYPES.items():
            summary, per = coco_evaluate(gt_file, d if iou == "segm" else [{k: x for k, x in e.items() if k != "segmentation"}
                                                                          for e in d], iou, ids)
            row[f"{label} AP"], row[f"{label} AP50"] = summary["AP"], summary["AP50"]
            per_cat.append(per.assign(**key, variant=v, metric=label))
            # the authors' code: LVIS evaluation (300 detections per image), object/part AP by supercategory
            lv, lper = seg_lvis.lvis_evaluate(gt, d, iou, ids, neg=sc.lvis_neg, train=train, index=sc.lvis_index)
            row[f"{label} AP (LVIS)"], row[f"{label} AP50 (LVIS)"] = lv["AP"], lv["AP50"]
            row[f"{label} object AP (LVIS)"], row[f"{label} part AP (LVIS)"] = lv["object AP"], lv["part AP"]
            per_cat.append(lper.assign(category=[names[c] for c in lper.category_id], **key, variant=v,
                                       metric=f"{label} (LVIS)"))
        rows.append(row)
    return rows, pd.concat(per_cat, ignore_index=True)


METRICS = ["mask AP", "mask AP50", "box AP", "box AP50"]  # pycocotools, COCO-style (the paper's numbers)
LVIS_METRICS = ["mask AP (LVIS)", "mask AP50 (LVIS)", "box AP (LVIS)", "box AP50 (LVIS)"]  # the authors' evaluator


def table9(rows: pd.DataFrame) -> pd.DataFrame:
    """Part segmentation: mask and box AP/AP50 (%) per model (mean over seeds), pycocotools and LVIS."""
    g = rows.groupby("model", sort=False)
    return g[_present(rows)].mean().reset_index().assign(seeds=g.size().to_numpy())


def _present(rows: pd.DataFrame) -> list[str]:
    """The table metrics the rows carry (run rows written before the LVIS columns have pycocotools' only)."""
    return [m for m in METRICS + LVIS_METRICS if m in rows.columns]


def table10(rows: pd.DataFrame) -> pd.DataFrame:
    """Object segmentation: object-only vs object+part training, both scored on objects; the delta
    (object+part − object-only) per metric, with its standard deviation over seeds when there are several."""
    present = _present(rows)
    piv = rows.pivot_table(index=["model", "seed"], columns="trained on", values=present, sort=False)
    out = []
    for model, df in piv.groupby(level=0, sort=False):
        r: dict[str, Any] = {"model": model}
        for m in [m for m in ("mask AP", "box AP", "mask AP50", "mask AP (LVIS)") if m in present]:
            obj, both = df[(m, "objects")], df[(m, "objects+parts")]
            delta = both - obj
            r[f"{m} object-only"], r[f"{m} object+part"] = obj.mean(), both.mean()
            r[f"Δ {m}"] = delta.mean()
            r[f"Δ {m} sd"] = delta.std(ddof=1) if len(delta) > 1 else np.nan
        r["seeds"] = len(df)
        out.append(r)
    return pd.DataFrame(out)


def evaluate_runs(runs: dict, converted: str | Path, split: str, eval_task: str, sc: segmentation.SegConfig
                  ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`evaluate_run` over several runs (`sc.jobs` at a time): (one row per run and variant, per-category records)."""
    out = jobs.map_jobs(evaluate_run, [(run, converted, split, eval_task, sc) for run in runs.values()], sc.jobs,
                        f"evaluating on {eval_task}_{split}")
    return pd.DataFrame([r for rows, _ in out for r in rows]), pd.concat([p for _, p in out], ignore_index=True)


def _colour(i: int) -> np.ndarray:
    """A stable, distinct colour per category id (golden-ratio hues)."""
    import colorsys
    return np.array(colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 1.0))


def overlay(img: np.ndarray, masks_ids: list[tuple[np.ndarray, int]], alpha: float = 0.55) -> np.ndarray:
    """The image (H, W, 3 uint8) with each (mask, category id) painted over it in the category's colour."""
    out = img.astype(float) / 255
    for m, cid in masks_ids:
        m = m.astype(bool)
        out[m] = (1 - alpha) * out[m] + alpha * _colour(cid)
    return out


def plot_predictions(run: dict, converted: str | Path, split: str, path: str | Path, n: int = 6,
                     score_thr: float = 0.5) -> Path:
    """Ground-truth part masks next to the run's predicted masks (score ≥ `score_thr`; notebooks pass the
    pseudo-label threshold, so the figure shows what would become a label) on `n` images."""
    plt = plots.pyplot()
    from PIL import Image
    from pycocotools.coco import COCO

    from .imagenet import class_label
    gt_file = segmentation.annotation_file(converted, run["task"], split)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_file))
    dets = fileio.read_json(detections_path(run, run["task"], split, PLAIN))["detections"]["plain"]
    # panels: the images with most detections at or above the threshold first (ties: image id), then the others;
    # when the model detects nothing there, the title says so
    above: dict[int, int] = {}
    for d in dets:
        if d["score"] >= score_thr:
            above[d["image_id"]] = above.get(d["image_id"], 0) + 1
    ranked = sorted(above, key=lambda i: (-above[i], i))
    ids = (ranked + [i for i in sorted(gt.getImgIds()) if i not in above])[:n]
    fig, axes = plt.subplots(2, len(ids), figsize=(2.2 * len(ids), 4.6), squeeze=False)
    for col, iid in enumerate(ids):
        info = gt.imgs[iid]
        img = np.asarray(Image.open(Path(converted) / "train" / "img" / info["file_name"]).convert("RGB"))
        axes[0, col].set_title(class_label(info["file_name"].split("/")[0]), fontsize=7)
        truth = [(gt.annToMask(a), a["category_id"]) for a in gt.loadAnns(gt.getAnnIds(imgIds=[iid]))]
        pred = [(mask_utils.decode(d["segmentation"]), d["category_id"]) for d in dets
                if d["image_id"] == iid and d["score"] >= score_thr]
        for row, (ms, title) in enumerate(((truth, f"truth: {len(truth)} parts"), (pred, f"predicted: {len(pred)}"))):
            ax = axes[row, col]
            ax.imshow(overlay(img, ms))
            ax.set_title((axes[0, col].get_title() + "\n" if row == 0 else "") + title, fontsize=7)
            ax.axis("off")
    nothing = "" if above else f" — the model detects nothing at score ≥ {score_thr} on any {split} image"
    fig.suptitle(f"{CONFIGS[run['config']]} on {run['task']}_{split} (colour = part category; score ≥ {score_thr}){nothing}",
                 fontsize=8)
    fig.tight_layout()
    plots.save(fig, path, dpi=110)
    return Path(path)
