"""Segmentation benchmark and pseudo labels (notebooks 02-04): the federated loss, the Category Filter,
pseudo-label composition, COCO evaluation, and a real 1-iteration train + eval of every config."""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from mmengine.structures import InstanceData

from pinpp_lib import fileio, masks, pseudo_labels, seg_eval, seg_recipes, segmentation
from pinpp_lib import seg_models  # noqa: F401  (registers the kit's mmdet modules)
from pinpp_lib.fileio import PinppError

ROOT = Path(__file__).resolve().parents[1]
# The smoke profile's shape of model, made smaller still: 1-2 iterations, 64 px.
TINY = segmentation.SegConfig(iters=1, image_size=64, test_short=50, test_long=83, batch_size=2, width=0.125, vit_depth=2, pretrained=False,
                              num_fed_classes=5, workers=0, ckpt_every=1, log_every=1, warmup_iters=1, test_batch=4,
                              device="cpu")


def built_model(name: str, converted, tmp_path, sc: "segmentation.SegConfig" = TINY):
    """(config, mmdet model with initialised weights) of one kit config on the synthetic parts file, seeded."""
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope
    init_default_scope("mmdet")
    cfg = segmentation.build_config(name, "parts", converted, tmp_path, sc)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    return cfg, model


# ---------------------------------------------------------------- federated loss

def test_federated_classes_cover_the_batch_and_sample_by_frequency():
    torch.manual_seed(0)
    labels = torch.tensor([2, 2, 7, 10, 10])  # 10 = background for K = 10
    weight = torch.ones(10)
    weight[5] = 0  # a class never seen in training is never drawn as a negative
    for _ in range(50):
        fed = seg_models.federated_classes(labels, 10, 6, weight, count_background=False).tolist()
        assert {2, 7} <= set(fed) and 10 not in fed and 5 not in fed
        assert len(fed) == 6 == len(set(fed))
        fed = seg_models.federated_classes(labels, 10, 6, weight).tolist()  # background counts: one negative fewer
        assert {2, 7} <= set(fed) and 10 not in fed and 5 not in fed and len(fed) == 5 == len(set(fed))
    many = torch.arange(8)
    assert set(seg_models.federated_classes(many, 10, 4, weight).tolist()) == set(range(8))  # all gt kept


def test_federated_classes_equal_detectron2s_get_fed_loss_classes():
    """A literal restatement of detectron2's FastRCNNOutputLayers.get_fed_loss_classes (@02b5c4e2, the authors'
    code path): the same classes under the same seed, background dropped afterwards as its mask[:K] does."""
    def detectron2(gt_classes, num_fed_loss_classes, num_classes, weight):
        unique_gt_classes = torch.unique(gt_classes)
        prob = unique_gt_classes.new_ones(num_classes + 1).float()
        prob[-1] = 0
        if len(unique_gt_classes) < num_fed_loss_classes:
            prob[:num_classes] = weight.float().clone()
            prob[unique_gt_classes] = 0
            sampled = torch.multinomial(prob, num_fed_loss_classes - len(unique_gt_classes), replacement=False)
            fed = torch.cat([unique_gt_classes, sampled])
        else:
            fed = unique_gt_classes
        mask = fed.new_zeros(num_classes + 1)
        mask[fed] = 1
        return mask[:num_classes].nonzero().squeeze(1)

    weight = torch.rand(40) ** 0.5
    for seed, labels in enumerate([torch.tensor([3, 3, 40, 17, 40]), torch.tensor([5, 9]), torch.tensor([40, 40]),
                                   torch.arange(41)]):
        torch.manual_seed(seed)
        want = detectron2(labels, 12, 40, weight)
        torch.manual_seed(seed)
        got = seg_models.federated_classes(labels, 40, 12, weight)
        assert sorted(got.tolist()) == want.tolist()


def test_federated_loss_is_bce_over_the_federated_classes_only():
    torch.manual_seed(1)
    loss = seg_models.FederatedLoss(num_classes=6, num_fed_classes=3)
    logits = torch.randn(5, 6, requires_grad=True)
    labels = torch.tensor([1, 6, 4, 6, 1])
    torch.manual_seed(7)
    value = loss(logits, labels, torch.ones(5), avg_factor=5.0)
    torch.manual_seed(7)
    fed = seg_models.federated_classes(labels, 6, 3, torch.ones(6))
    target = torch.zeros(5, 6)
    target[[0, 2, 4], [1, 4, 1]] = 1
    by_hand = F.binary_cross_entropy_with_logits(logits[:, fed], target[:, fed], reduction="sum") / 5
    assert torch.allclose(value, by_hand)
    value.backward()
    outside = [c for c in range(6) if c not in fed.tolist()]
    assert (logits.grad[:, outside] == 0).all() and (logits.grad[:, fed] != 0).any()
    # with every class federated it is the plain sigmoid cross-entropy of a background-free classifier
    full = seg_models.FederatedLoss(num_classes=6, num_fed_classes=50)
    assert torch.allclose(full(logits, labels, avg_factor=5.0),
                          F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / 5)


def test_federated_loss_reads_class_frequencies_and_is_an_mmdet_loss(tmp_path):
    from mmdet.registry import MODELS
    coco = {"images": [{"id": i} for i in (1, 2, 3)], "categories": [{"id": 9, "name": "b"}, {"id": 4, "name": "a"}],
            "annotations": [{"image_id": 1, "category_id": 4}, {"image_id": 1, "category_id": 4},
                            {"image_id": 2, "category_id": 4}, {"image_id": 3, "category_id": 9}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    assert seg_models.class_image_counts(str(tmp_path / "c.json"), 2).tolist() == [2.0, 1.0]  # id order: 4, then 9
    loss = MODELS.build(dict(type="FederatedLoss", num_classes=2, ann_file=str(tmp_path / "c.json"), freq_power=0.5))
    assert torch.allclose(loss.fed_weight, torch.tensor([2.0, 1.0]).sqrt())
    assert loss.get_cls_channels(2) == 2 and loss.get_activation(torch.zeros(3, 2)).shape == (3, 3)
    with pytest.raises(PinppError, match="2 categories but the model has 3"):
        seg_models.class_image_counts(str(tmp_path / "c.json"), 3)


# ---------------------------------------------------------------- Category Filter

def test_filter_logits_zeroes_other_classes_and_keeps_one_label():
    z = torch.tensor([[3.0, 1.0, 2.0, 0.5], [0.0, 4.0, 1.0, 0.0]])
    cf = seg_models.filter_logits(z, 4, [0, 2], single=False)
    assert torch.isinf(cf[:, [1, 3]]).all() and torch.equal(cf[:, [0, 2]], z[:, [0, 2]])
    one = seg_models.filter_logits(z, 4, [0, 2], single=True)
    assert torch.isfinite(one).sum(1).tolist() == [1, 1] and one[1].argmax() == 2  # best allowed, not best overall
    assert torch.equal(seg_models.filter_logits(z, 4, None, False), z)


@pytest.fixture(scope="module")
def tiny_run(converted, tmp_path_factory):
    """A real Mask R-CNN R50-FPN (1/8 width) trained 2 iterations on the synthetic parts file."""
    work = tmp_path_factory.mktemp("seg")
    return segmentation.train("mask_rcnn_r50_fpn", "parts", converted, work, dataclasses.replace(TINY, iters=2), 0)


def test_category_filter_never_emits_a_part_of_another_class(tiny_run, converted):
    """Untrained enough that every class scores alike: without CF many classes' parts come out, with CF only the image's."""
    model, _ = segmentation.load_model(tiny_run)
    model.roi_head.test_cfg["score_thr"] = 0.0
    allowed = pseudo_labels.allowed_labels(tiny_run["classes"])
    items = seg_eval.benchmark_items(converted / "seg_benchmark" / "parts_val.json", converted / "train" / "img")
    for it in items:
        it["allowed_labels"] = allowed[it["file_name"].split("/")[0]]
    variants = {"plain": {"cf": False}, "cf": {"cf": True}, "cf1": {"cf": True, "single_label": True}}
    foreign_without_cf = 0
    for it, preds, err in seg_eval.infer(model, items, 4, variants):
        assert err is None
        ok = set(it["allowed_labels"])
        foreign_without_cf += sum(lab not in ok for lab in preds["plain"].labels.tolist())
        assert set(preds["cf"].labels.tolist()) <= ok and set(preds["cf1"].labels.tolist()) <= ok
        assert len(preds["cf"]) > 0
    assert foreign_without_cf > 0  # the filter is what removes them


# ---------------------------------------------------------------- pseudo-label PNGs

def _pred(masks_: list[np.ndarray], labels: list[int], scores: list[float]) -> InstanceData:
    p = InstanceData()
    p.masks = torch.tensor(np.stack(masks_)).bool()
    p.labels = torch.tensor(labels)
    p.scores = torch.tensor(scores)
    p.bboxes = torch.zeros(len(labels), 4)
    return p


def test_compose_follows_the_converter_overlap_rule(tmp_path):
    big = np.zeros((8, 8), bool)
    big[1:7, 1:7] = True
    small = np.zeros((8, 8), bool)
    small[2:4, 2:4] = True
    other = np.zeros((8, 8), bool)
    other[4:8, 4:8] = True
    gids = [300, 301, 700]  # model label → global part id (ids above 255 need 16 bits)
    depth = {300: 0, 301: 1, 700: 0}  # 301 is included in 300 (e.g. nose:head)
    # the child is painted over its parent even with a lower score; at equal depth the surer detection wins
    lab = pseudo_labels.compose(_pred([small, big, other], [1, 0, 2], [0.6, 0.9, 0.95]), gids, depth, (8, 8), 0.5)
    assert lab.dtype == np.uint16
    assert (lab[2:4, 2:4] == 301).all() and lab[1, 1] == 300 and lab[6, 6] == 700 and lab[0, 0] == 0
    lab2 = pseudo_labels.compose(_pred([big, other], [0, 2], [0.95, 0.9]), gids, depth, (8, 8), 0.5)
    assert lab2[5, 5] == 300  # higher score over lower at equal depth
    lab3 = pseudo_labels.compose(_pred([big, other], [0, 2], [0.95, 0.4]), gids, depth, (8, 8), 0.5)
    assert 700 not in lab3  # under the threshold: dropped
    masks.write_label_png(tmp_path / "x.png", lab)
    assert np.array_equal(masks.read_label_png(tmp_path / "x.png", max_id=700), lab.astype(np.int64))


def test_pseudo_labels_are_written_resumably_and_feed_mpm_training(tiny_run, converted, tmp_path, monkeypatch):
    conv = tmp_path / "conv"
    shutil.copytree(converted, conv, symlinks=True)
    unlabelled = pseudo_labels.unlabelled_images(conv)[2]
    broken = conv / "train" / "img" / unlabelled[0][0]
    real = broken.parent.resolve()  # class folders are symlinks into the shared fixture: copy this one first
    broken.parent.unlink()
    shutil.copytree(real, broken.parent)
    broken.write_bytes(b"\xff\xd8\xff not a jpeg")  # a truncated JPEG
    pc = pseudo_labels.PseudoConfig(score_thr=0.0, batch_size=4)
    summary, recs = pseudo_labels.pseudo_label(tiny_run, conv, TINY, pc)
    assert summary["skipped (unreadable)"] == 1 and broken.name in (conv / "train" / "pseudo_report.txt").read_text()
    assert summary["labelled now"] == len(unlabelled) - 1 and summary["images/s"] > 0
    assert set(recs.variant) == {"cf", "nocf"} and (recs[recs.variant == "cf"]["parts of another class"] == 0).all()
    parts = json.loads((conv / "parts.json").read_text())
    wnid_of = {p["id"]: p["wnid"] for p in parts}
    for rel, _ in unlabelled[1:6]:
        lab = masks.read_label_png(masks.seg_path_for(conv / "train" / "seg_pseudo_cf", rel))
        assert {wnid_of[i] for i in np.unique(lab) if i} <= {rel.split("/")[0]}
    real_png = next((conv / "train" / "seg").glob("*/*.png"))
    linked = conv / "train" / "seg_pseudo_cf" / real_png.parent.name / real_png.name
    assert np.array_equal(masks.read_label_png(linked), masks.read_label_png(real_png))
    flags = dict(line.split() for f in (conv / "train" / "whether_pseudo").glob("*.txt") for line in f.read_text().splitlines())
    assert flags[unlabelled[1][0]] == "1" and flags[f"{real_png.parent.name}/{real_png.stem}.JPEG"] == "0"
    assert unlabelled[0][0] not in flags
    again, recs2 = pseudo_labels.pseudo_label(tiny_run, conv, TINY, pc)  # resumed: only the unreadable one is tried
    assert again["labelled now"] == 0 and again["labelled before (resumed)"] == len(unlabelled) - 1
    assert recs2.equals(recs) and len(recs) == 2 * (len(unlabelled) - 1)  # the records of the images labelled before
    for f in (conv / "train").glob(pseudo_labels.RECORDS):  # labels written before records were kept: from the PNGs
        f.unlink()
    _, recs3 = pseudo_labels.pseudo_label(tiny_run, conv, TINY, pc)
    cols = ["file_name", "variant", "parts painted", "labelled fraction", "parts of another class"]
    assert recs3[cols].equals(recs[cols]) and recs3.detections.isna().all()
    with pytest.raises(PinppError, match=r"another part model, part table, threshold or test setting \(changed: score_thr 0.0 → 0.7\)"):
        pseudo_labels.pseudo_label(tiny_run, conv, TINY, dataclasses.replace(pc, score_thr=0.7))
    from pinpp_lib.datasets import PartSegDataset
    ds = PartSegDataset(conv, seg_dir="seg_pseudo_cf")
    assert sum(ds.has_seg) == sum(PartSegDataset(conv).has_seg) + len(unlabelled) - 1
    # the figure says what each variant painted, and says so where it painted nothing (issue 15)
    figs = _captured_figures(monkeypatch)
    pseudo_labels.plot_pseudo(conv, recs, tmp_path / "p.png", n=len(unlabelled))
    titles = [ax.get_title() for ax in figs[-1].axes]
    for _, r in recs.iterrows():  # each image and variant: its title states the record
        want = (f"{int(r['parts painted'])} parts on {r['labelled fraction']:.0%} of pixels" if r["parts painted"]
                else "nothing painted (0% of pixels)")
        assert any(t.startswith(("w/o CF: " if r.variant == "nocf" else "w/ CF: ") + want) for t in titles), (want, titles)
    assert any(t.startswith(unlabelled[1][0].split("/")[0] + " ") for t in titles)  # wnid + class name


def _captured_figures(monkeypatch) -> list:
    from pinpp_lib import plots
    figs, real = [], plots.save
    monkeypatch.setattr(plots, "save", lambda fig, path, dpi=plots.DPI: (figs.append(fig), real(fig, path, dpi))[1])
    monkeypatch.setattr(plots.pyplot(), "close", lambda fig=None: None)
    return figs


def test_part_figure_picks_images_with_detections_or_says_there_are_none(tiny_run, converted, tmp_path, monkeypatch):
    figs = _captured_figures(monkeypatch)
    seg_eval.evaluate_run(tiny_run, converted, "test", "parts", TINY)  # writes the detections the figure reads
    seg_eval.plot_predictions(tiny_run, converted, "test", tmp_path / "a.png", n=3, score_thr=1.01)
    assert "the model detects nothing at score ≥ 1.01 on any test image" in figs[-1]._suptitle.get_text()
    # one confident detection (a ground-truth mask) on the last test image: that image comes first
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    run = {**tiny_run, "out": str(tmp_path / "run")}
    shutil.copytree(tiny_run["out"], run["out"])
    path = seg_eval.detections_path(run, "parts", "test", seg_eval.PLAIN)
    det = fileio.read_json(path)
    gt = COCO(str(segmentation.annotation_file(converted, "parts", "test")))
    iid = sorted(gt.getImgIds())[-1]
    ann = gt.loadAnns(gt.getAnnIds(imgIds=[iid]))[0]
    rle = mask_utils.encode(np.asfortranarray(gt.annToMask(ann)))
    det["detections"]["plain"].append({"image_id": iid, "category_id": ann["category_id"], "score": 0.9,
                                       "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    fileio.write_json(path, det)
    # 0.9: the untrained model's sigmoid scores sit near 0.5 (the classifier bias starts at 0, as detectron2's)
    seg_eval.plot_predictions(run, converted, "test", tmp_path / "b.png", n=3, score_thr=0.9)
    assert "detects nothing" not in figs[-1]._suptitle.get_text()
    wnid = gt.imgs[iid]["file_name"].split("/")[0]
    assert figs[-1].axes[0].get_title().startswith(f"{wnid} ")  # wnid + class name, the image with the detection first
    assert figs[-1].axes[3].get_title() == "predicted: 1"


# ---------------------------------------------------------------- evaluation

def test_coco_evaluate_scores_perfect_and_empty_detections(converted):
    gt_file = converted / "seg_benchmark" / "parts_test.json"
    gt = json.loads(gt_file.read_text())
    perfect = []
    for a in gt["annotations"]:
        h, w = next((im["height"], im["width"]) for im in gt["images"] if im["id"] == a["image_id"])
        perfect.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
                        "segmentation": masks.encode_rle(masks.rasterise(a["segmentation"], h, w))})
    summary, per = seg_eval.coco_evaluate(gt_file, perfect, "segm")
    assert summary["AP"] == pytest.approx(100) and summary["AP50"] == pytest.approx(100)
    with_gt = per[per.n_gt > 0]
    assert np.allclose(with_gt.AP, 100) and per[per.n_gt == 0].AP.isna().all()
    half = [d for d in perfect if d["category_id"] != with_gt.category_id.iloc[0]]
    s_half, per_half = seg_eval.coco_evaluate(gt_file, half, "bbox")
    assert per_half.set_index("category_id").AP[with_gt.category_id.iloc[0]] == 0 and s_half["AP"] < 100
    empty, per0 = seg_eval.coco_evaluate(gt_file, [], "segm")
    assert empty["AP"] == 0 and (per0[per0.n_gt > 0].AP == 0).all()


def test_table10_reports_the_delta_and_its_spread_over_seeds():
    rows = []
    for seed, (obj, both) in enumerate(((10.0, 13.0), (12.0, 13.0))):
        for task, v in (("objects", obj), ("objects+parts", both)):
            rows.append({"model": "M", "seed": seed, "trained on": task, "mask AP": v, "mask AP50": v * 2,
                         "box AP": v + 1, "box AP50": v})
    t = seg_eval.table10(pd.DataFrame(rows)).iloc[0]  # rows without LVIS columns (written before them)
    assert "Δ mask AP (LVIS)" not in t.index
    for r in rows:
        r["mask AP (LVIS)"] = r["mask AP"] / 2
    t = seg_eval.table10(pd.DataFrame(rows)).iloc[0]
    assert t["Δ mask AP (LVIS)"] == pytest.approx(1.0) and list(seg_eval.table9(pd.DataFrame(rows)).columns)[-2:] == \
        ["mask AP (LVIS)", "seeds"]
    assert t["Δ mask AP"] == pytest.approx(2.0) and t["Δ mask AP sd"] == pytest.approx(np.std([3, 1], ddof=1))
    assert t["mask AP object-only"] == pytest.approx(11.0) and t["seeds"] == 2
    one = seg_eval.table10(pd.DataFrame([r for r in rows if r["seed"] == 0])).iloc[0]
    assert np.isnan(one["Δ mask AP sd"]) and one["Δ box AP"] == pytest.approx(3.0)


# ---------------------------------------------------------------- configs: build, train 1 iteration, evaluate

def test_configs_are_one_base_and_small_deltas():
    base = segmentation.config_path("mask_rcnn_r50_fpn")
    for name in segmentation.CONFIGS:
        text = segmentation.config_path(name).read_text()
        assert name == "mask_rcnn_r50_fpn" or "_base_" in text
        assert len(text.splitlines()) < (130 if name == "mask_rcnn_r50_fpn" else 40), name
    assert "FederatedLoss" in base.read_text() and "ClassBalancedDataset" in base.read_text()


def test_smoke_and_full_configs_differ_in_sizes_only(converted, tmp_path):
    full = segmentation.build_config("cascade_mask_rcnn_r50_fpn", "parts", converted, tmp_path, segmentation.SegConfig())
    small = segmentation.build_config("cascade_mask_rcnn_r50_fpn", "parts", converted, tmp_path, TINY)

    def shape(node):  # the tree of keys, with module types; numbers and the ImageNet init left out
        if isinstance(node, dict):
            return {k: shape(v) for k, v in node.items() if k not in ("init_cfg", "base_channels")}
        if isinstance(node, (list, tuple)):
            return [shape(v) for v in node]
        return node if isinstance(node, str) else type(node).__name__
    assert shape(full.model) == shape(small.model)
    n_parts = len(json.loads((converted / "parts.json").read_text()))
    assert all(h.num_classes == n_parts for h in small.model.roi_head.bbox_head) and full.train_cfg.max_iters == 62500
    assert full.param_scheduler[1].milestones == [31250, 46875] and full.optim_wrapper.optimizer.lr == 0.03
    assert "init_cfg" not in full.model.backbone  # the authors' configs train from scratch (init_checkpoint "")
    assert full.model.backbone.frozen_stages == -1 and not full.model.backbone.norm_eval  # from scratch: train it all
    lsj = full.train_dataloader.dataset.dataset.pipeline[2]
    assert lsj.ratio_range == (0.1, 2.0) and lsj.scale == (1024, 1024)
    assert full.model.test_cfg.rpn.max_per_img == 1000 and full.model.test_cfg.rcnn.max_per_img == 300
    from pinpp_lib import config
    sizes = lambda sc: (sc.rois_per_image, sc.rpn_test_proposals, sc.max_dets)  # noqa: E731
    assert sizes(config.resolve("full", data_root=tmp_path).seg) == (128, 1000, 300)
    assert sizes(config.resolve("rehearsal", data_root=tmp_path).seg) == (128, 1000, 300)
    assert sizes(config.resolve("smoke", data_root=tmp_path).seg) == (16, 50, 100)  # smoke's time only


def _types(pipeline) -> list[str]:
    return [t["type"] for t in pipeline]


def test_recipes_build_the_papers_and_the_authors_configs(converted, tmp_path):
    """seg.recipe, resolved in config: "paper" = LSJ at 1024 (tested at 800/1333), "authors_code" = flip +
    ResizeShortestEdge(375, 500) for training and testing; both with the code's choices where the paper is silent
    (r50_fpn.py on new_baselines LSJ: SyncBN, 4conv1fc heads with norm, 2-conv RPN, 128 RoIs, wd 4e-5 without decay
    on norms, warm-up 250 from 0.067, AMP, score 0.001, 300 detections, federated loss counting the background)."""
    from pinpp_lib import config
    paper = config.resolve("full", data_root=tmp_path).seg
    code = config.resolve("full", data_root=tmp_path, overrides={"seg": {"recipe": "authors_code"}}).seg
    assert (paper.augment, paper.test_short, paper.test_long) == ("lsj", 800, 1333)
    assert (code.augment, code.train_short, code.train_long, code.test_short, code.test_long) == ("resize_shortest", 375, 500, 375, 500)
    assert (paper.table9_task, code.table9_task) == ("parts", "objects+parts")  # r50_fpn.py: num_classes = 4308
    assert "joint object+part" in seg_recipes.recipe_note(code) and "joint" not in seg_recipes.recipe_note(paper)
    assert "detectron2-style cascade heads" in seg_recipes.recipe_note(paper)
    assert {f: getattr(paper, f) for f in ("recipe", "augment", "test_short", "test_long")} != \
        {f: getattr(code, f) for f in ("recipe", "augment", "test_short", "test_long")}
    assert config.resolve("full", data_root=tmp_path, overrides={"seg": {"recipe": "authors_code", "test_short": 600}}).seg.test_short == 600
    with pytest.raises(PinppError, match="seg.recipe 'detectron2': choose one of paper, authors_code"):
        config.resolve("full", data_root=tmp_path, overrides={"seg": {"recipe": "detectron2"}})
    for sc in (paper, code):
        for world in (1, 2):
            cfg = segmentation.build_config("mask_rcnn_r50_fpn", "parts", converted, tmp_path, dataclasses.replace(sc, device="cuda"), 0, world)
            m = cfg.model
            norm = "SyncBN" if world > 1 else "BN"  # SyncBN over one process is BatchNorm
            assert m.backbone.norm_cfg.type == m.neck.norm_cfg.type == m.roi_head.bbox_head.norm_cfg.type == norm
            assert m.roi_head.mask_head.norm_cfg.type == norm
            b = m.roi_head.bbox_head
            assert (b.num_shared_convs, b.num_shared_fcs, b.conv_out_channels, b.fc_out_channels) == (4, 1, 256, 1024)
            assert b.loss_cls.count_background and b.prior_prob is None and b.loss_cls.num_fed_classes == 50
            assert m.rpn_head.num_convs == 2 and m.train_cfg.rcnn.sampler.num == 128
            assert (m.test_cfg.rcnn.score_thr, m.test_cfg.rcnn.max_per_img) == (0.001, 300)
            ow = cfg.optim_wrapper
            assert ow.type == "AmpOptimWrapper" and ow.optimizer.weight_decay == 4e-5 and ow.paramwise_cfg.norm_decay_mult == 0
            warm = cfg.param_scheduler[0]
            assert (warm.start_factor, warm.end) == (0.067, 250)
        cpu = segmentation.build_config("mask_rcnn_r50_fpn", "parts", converted, tmp_path, dataclasses.replace(sc, device="cpu"))
        assert cpu.optim_wrapper.type == "OptimWrapper"  # mmengine has no CPU AMP
        test_resize = [t for t in cpu.test_pipeline if t["type"] == "Resize"][0]
        assert test_resize.scale == (sc.test_long, sc.test_short) and test_resize.keep_ratio
        train = cpu.train_dataloader.dataset.dataset.pipeline
        if sc.augment == "lsj":
            assert "RandomResize" in _types(train) and "RandomCrop" in _types(train)
            assert cpu.model.data_preprocessor.batch_augments[0].type == "BatchFixedSizePad"
        else:
            assert "RandomResize" not in _types(train) and "RandomCrop" not in _types(train) and "RandomFlip" in _types(train)
            r = [t for t in train if t["type"] == "Resize"][0]
            assert r.scale == (500, 375) and r.keep_ratio and cpu.model.data_preprocessor.batch_augments is None
    # a narrow model (smoke) narrows the head convs too: 256 × width, as every other channel count
    tiny = segmentation.build_config("mask_rcnn_r50_fpn", "parts", converted, tmp_path, TINY).model.roi_head.bbox_head
    assert tiny.conv_out_channels == 32 and tiny.fc_out_channels == 128
    # the cascade's three box heads get the same 4conv1fc head
    casc = segmentation.build_config("cascade_mask_rcnn_r50_fpn", "parts", converted, tmp_path, paper)
    assert all(h.num_shared_convs == 4 and h.num_shared_fcs == 1 for h in casc.model.roi_head.bbox_head)


def test_authors_code_recipe_trains_one_iteration_and_evaluates(converted, tmp_path):
    """The other recipe runs end to end too (resize-shortest augmentation without LSJ's fixed-size padding), as the
    code's one joint object+part model scored on the parts file for Table 9 (its object detections dropped)."""
    sc = dataclasses.replace(TINY, recipe="authors_code", augment="resize_shortest", train_short=48, train_long=64,
                             test_short=48, test_long=64, table9_task="objects+parts")
    run = segmentation.train("mask_rcnn_r50_fpn", sc.table9_task, converted, tmp_path, sc, 0)
    assert len(run["classes"]) == len(segmentation.categories(segmentation.annotation_file(converted, "objects+parts", "train")))
    cfg = (Path(run["out"]) / "config.py").read_text()
    flat = cfg.replace(" ", "").replace("\n", "")
    assert "type='Resize'" in flat and "scale=(64,48,)" in flat.replace("scale=(64,48)", "scale=(64,48,)") and "RandomCrop" not in flat
    rows, per = seg_eval.evaluate_run(run, converted, "test", "parts", sc)
    assert 0 <= rows[0]["mask AP"] <= 100 and per.category.str.contains(":").all()  # parts only
    assert all(d["category_id"] in {c["id"] for c in segmentation.categories(segmentation.annotation_file(converted, "parts", "test"))}
               for d in seg_eval.detections(run, converted, "test", "parts", sc)["plain"])


def test_swin_b_pseudo_model_is_the_full_profiles(converted, tmp_path):
    """§4.1's part model: Mask R-CNN Swin-B in full and rehearsal (R50 in smoke), Swin-B's sizes feeding the FPN; a
    narrow copy keeps 32 channels per head."""
    from pinpp_lib import config
    assert config.resolve("full", data_root=tmp_path).seg.pseudo_model == "mask_rcnn_swin_b_fpn"
    assert config.resolve("rehearsal", data_root=tmp_path).seg.pseudo_model == "mask_rcnn_swin_b_fpn"
    assert config.resolve("smoke", data_root=tmp_path).seg.pseudo_model == "mask_rcnn_r50_fpn"
    assert "mask_rcnn_swin_b_fpn" not in segmentation.BENCHMARK and len(segmentation.BENCHMARK) == 6
    full = segmentation.build_config("mask_rcnn_swin_b_fpn", "parts", converted, tmp_path, segmentation.SegConfig())
    bb = full.model.backbone
    assert (bb.type, bb.embed_dims, list(bb.depths), list(bb.num_heads), bb.window_size) == \
        ("SwinTransformer", 128, [2, 2, 18, 2], [4, 8, 16, 32], 7)
    assert list(full.model.neck.in_channels) == [128, 256, 512, 1024] and "init_cfg" not in bb  # from scratch
    small = segmentation.build_config("mask_rcnn_swin_b_fpn", "parts", converted, tmp_path, TINY)
    assert small.model.backbone.embed_dims == 32 and list(small.model.backbone.num_heads) == [1, 2, 4, 8]
    assert list(small.model.neck.in_channels) == [32, 64, 128, 256]
    pre = segmentation.build_config("mask_rcnn_swin_b_fpn", "parts", converted, tmp_path, segmentation.SegConfig(pretrained=True))
    assert pre.model.backbone.init_cfg.checkpoint.endswith("swin_base_patch4_window7_224.pth")


def test_resize_shortest_edge_equals_detectron2s():
    """mmdet's Resize((long, short), keep_ratio=True) gives detectron2's ResizeShortestEdge(short, max long) output
    size; detectron2 restated literally (detectron2/data/transforms/augmentation_impl.py @02b5c4e2)."""
    from mmdet.datasets.transforms import Resize

    def detectron2(oldh, oldw, short_edge_length, max_size):
        h, w = oldh, oldw
        size = short_edge_length * 1.0
        scale = size / min(h, w)
        if h < w:
            newh, neww = size, scale * w
        else:
            newh, neww = scale * h, size
        if max(newh, neww) > max_size:
            scale = max_size * 1.0 / max(newh, neww)
            newh = newh * scale
            neww = neww * scale
        neww = int(neww + 0.5)
        newh = int(newh + 0.5)
        return (newh, neww)

    t = Resize(scale=(500, 375), keep_ratio=True)
    for h, w in [(375, 500), (500, 375), (333, 500), (240, 320), (1200, 300), (481, 640), (375, 375), (2000, 3008)]:
        out = t({"img": np.zeros((h, w, 3), np.uint8), "img_shape": (h, w)})
        assert out["img"].shape[:2] == detectron2(h, w, 375, 500), (h, w)


def test_missing_pretrained_weights_fail_with_the_file_to_fetch(converted, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    cfg = segmentation.build_config("mask_rcnn_r101_fpn", "parts", converted, tmp_path, segmentation.SegConfig(pretrained=True))
    with pytest.raises(PinppError, match=r"resnet101-.*\.pth: ImageNet weights .* seg.pretrained=False"):
        segmentation.check_pretrained(cfg)


@pytest.mark.parametrize("name", list(segmentation.CONFIGS))
def test_every_config_trains_one_iteration_and_evaluates(name, converted, tmp_path, capsys):
    task = "objects+parts" if "cascade" in name else "parts"
    run = segmentation.train(name, task, converted, tmp_path, TINY, 0)
    # mmengine's console lines go to the run's console.log, not to the notebook (issue 15)
    assert "mmengine - " not in capsys.readouterr().out and "mmengine - " in (Path(run["out"]) / "console.log").read_text()
    assert run["iters"] == 1 and run["sha256"].startswith(run["weights"].split("_")[1][:12])
    assert len(list(Path(run["out"]).glob("iter_*.pth"))) == 1  # only the last resume point is kept (to rewrite the weights)
    rows, per = seg_eval.evaluate_run(run, converted, "test", "objects" if task == "objects+parts" else "parts", TINY)
    for m in seg_eval.METRICS + seg_eval.LVIS_METRICS:
        assert 0 <= rows[0][m] <= 100
    assert set(per.metric) == {"mask", "box", "mask (LVIS)", "box (LVIS)"}
    assert per.category.str.contains(":").sum() == (0 if task != "parts" else len(per))
    # LVIS: parts-only files hold no object category, the objects file no part category
    assert np.isnan(rows[0]["mask object AP (LVIS)" if task == "parts" else "mask part AP (LVIS)"])
    assert segmentation.train(name, task, converted, tmp_path, TINY, 0) == run  # finished: reused, not retrained
    with pytest.raises(PinppError, match=r"another configuration or training file \(changed: seg.lr"):
        segmentation.train(name, task, converted, tmp_path, dataclasses.replace(TINY, lr=0.1), 0)


def _cli(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pinpp_lib", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, **(env or {})}, **kw)


def _tiny_sets(**extra) -> list[str]:
    fields = {**{f.name: getattr(TINY, f.name) for f in dataclasses.fields(TINY) if f.name not in ("models", "object_models", "seeds", "lr_steps")},
              **extra}
    return [a for k, v in fields.items() for a in ("--set", f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}")]


def test_killed_training_resumes_from_its_last_checkpoint(smoke_data_root):
    """kill -9 mid-run, then the same command: mmengine resumes (weights-only load of its checkpoint)."""
    root, work = smoke_data_root
    args = ["seg-train", "--data-root", str(root), "--work", str(work), "--model", "mask_rcnn_r50_fpn", *_tiny_sets(iters=12, ckpt_every=2)]
    p = _cli(*args)
    run = work / "parts" / "mask_rcnn_r50_fpn_seed0"
    t0 = time.time()
    while not (run / "iter_4.pth").exists():
        assert p.poll() is None, p.stdout.read()
        assert time.time() - t0 < 300
        time.sleep(0.2)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (run / "done.json").exists()
    before = (run / "console.log").stat().st_size  # mmengine's console lines go to the run's console.log
    q = _cli(*args)
    out = q.communicate(timeout=600)[0]
    assert q.returncode == 0, out
    log = (run / "console.log").read_text()[before:]
    assert "resumed" in log.lower() and "Iter(train) [ 2/12]" not in log  # continued, not restarted
    assert json.loads((run / "done.json").read_text())["iters"] == 12


def test_two_process_training_under_torchrun_on_cpu(smoke_data_root):
    """The mmengine `pytorch` launcher under torchrun: 2 gloo processes, batch split between them."""
    root, work = smoke_data_root
    env = {"OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541", "-m", "pinpp_lib", "seg-train",
                        "--data-root", str(root), "--work", str(work), "--model", "mask_rcnn_r50_fpn", "--task", "objects",
                        *_tiny_sets(iters=2)], capture_output=True, text=True, env={**os.environ, **env}, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    done = json.loads((work / "objects" / "mask_rcnn_r50_fpn_seed0" / "done.json").read_text())
    assert done["processes"] == 2 and done["iters"] == 2


@pytest.fixture(scope="module")
def smoke_data_root(converted, tmp_path_factory):
    """A data root whose `converted/` is the shared synthetic conversion (for CLI tests)."""
    root = tmp_path_factory.mktemp("root")
    (root / "converted").symlink_to(converted)
    return root, root / "runs"


def test_pseudo_label_shards_split_the_work(tiny_run, converted, tmp_path):
    conv = tmp_path / "conv"
    shutil.copytree(converted, conv, symlinks=True)
    pc = pseudo_labels.PseudoConfig(score_thr=0.0, batch_size=4)
    a, _ = pseudo_labels.pseudo_label(tiny_run, conv, TINY, pc, limit=6, shard=(0, 2))
    assert a["labelled now"] == 3 and a["still without a label"] == 3
    b, _ = pseudo_labels.pseudo_label(tiny_run, conv, TINY, pc, limit=6, shard=(1, 2))
    assert b["labelled now"] == 3 and b["still without a label"] == 0
    flags = [line.split()[1] for f in (conv / "train" / "whether_pseudo").glob("*.txt") for line in f.read_text().splitlines()]
    assert flags.count("1") == 6


def test_finished_runs_and_detections_follow_their_inputs(converted, tmp_path):
    """Weights that went missing are rewritten from the kept checkpoint; an edited training file refuses the old
    run in one line; cached detections are recomputed for another benchmark file."""
    conv = tmp_path / "conv"
    shutil.copytree(converted, conv, symlinks=True)
    cfg = dataclasses.replace(TINY, iters=2)
    run = segmentation.train("mask_rcnn_r50_fpn", "parts", conv, tmp_path / "work", cfg, 0)
    weights = Path(run["out"]) / run["weights"]
    weights.unlink()
    again = segmentation.train("mask_rcnn_r50_fpn", "parts", conv, tmp_path / "work", cfg, 0)
    assert again["sha256"] == run["sha256"] and weights.exists()
    dets = seg_eval.detections(again, conv, "val", "parts", cfg)
    cache = seg_eval.detections_path(again, "parts", "val", seg_eval.PLAIN)
    stamp = cache.stat().st_mtime_ns
    assert seg_eval.detections(again, conv, "val", "parts", cfg) == dets and cache.stat().st_mtime_ns == stamp
    val = conv / "seg_benchmark" / "parts_val.json"
    coco = json.loads(val.read_text())
    coco["images"] = coco["images"][:1]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] == coco["images"][0]["id"]]
    val.write_text(json.dumps(coco))
    seg_eval.detections(again, conv, "val", "parts", cfg)
    assert json.loads(cache.read_text())["images"] == 1  # recomputed on the edited file
    # test-time settings: applied to the finished run at load (no retraining), and part of the detections' identity
    few = dataclasses.replace(cfg, max_dets=2, score_thr=0.0, test_short=40, test_long=60)
    assert segmentation.finished("mask_rcnn_r50_fpn", "parts", conv, tmp_path / "work", few, 0)["sha256"] == run["sha256"]
    model, _ = segmentation.load_model(again, "cpu", few)
    assert model.roi_head.test_cfg["max_per_img"] == 2 and model.roi_head.test_cfg["score_thr"] == 0.0
    assert [t["scale"] for t in model.cfg.test_pipeline if t["type"] == "Resize"] == [(60, 40)]
    per_image = collections.Counter(d["image_id"] for d in seg_eval.detections(again, conv, "val", "parts", few)["plain"])
    assert per_image and max(per_image.values()) <= 2
    many = dataclasses.replace(few, max_dets=300)
    per_image = collections.Counter(d["image_id"] for d in seg_eval.detections(again, conv, "val", "parts", many)["plain"])
    assert max(per_image.values()) > 2  # the cache of `few` was not reused
    train_file = conv / "seg_benchmark" / "parts_train.json"
    train_file.write_text(train_file.read_text().replace('"iscrowd": 0', '"iscrowd":0'))
    with pytest.raises(PinppError, match=r"another configuration or training file \(changed: input 'train_file'\)"):
        segmentation.train("mask_rcnn_r50_fpn", "parts", conv, tmp_path / "work", cfg, 0)


@pytest.mark.parametrize("name", ["mask_rcnn_r50_fpn", "cascade_mask_rcnn_r50_fpn"])
def test_chunked_mask_prediction_equals_mmdets(name, converted, tmp_path):
    """seg_eval.predict runs the class-specific mask head a few detections at a time (memory: detections × classes ×
    28²); boxes, scores, labels and masks equal mmdet's roi_head.predict on the whole batch."""
    from mmengine.dataset import pseudo_collate
    run = segmentation.train(name, "parts", converted, tmp_path, TINY, 0)
    model, _ = segmentation.load_model(run, "cpu", dataclasses.replace(TINY, score_thr=0.0))
    items = seg_eval.benchmark_items(converted / "seg_benchmark" / "parts_test.json", converted / "train" / "img", 3)
    pipeline = seg_eval._test_pipeline(model.cfg)
    data = model.data_preprocessor(pseudo_collate([pipeline({"img_path": str(i["img_path"]), "img_id": i["img_id"]})
                                                   for i in items]), False)
    with torch.no_grad():
        x = model.extract_feat(data["inputs"])
        rpn = model.rpn_head.predict(x, data["data_samples"], rescale=False)
        whole = model.roi_head.predict(x, [r.clone() for r in rpn], data["data_samples"], rescale=True)
        chunked = seg_eval.predict(model.roi_head, x, [r.clone() for r in rpn], data["data_samples"], chunk=7)
    assert sum(len(w) for w in whole) > 7  # several chunks per image
    for w, c in zip(whole, chunked):
        for k in ("bboxes", "scores", "labels", "masks"):
            assert torch.equal(getattr(w, k), getattr(c, k)), k


def test_vit_layer_decay_restates_detectron2s_get_vit_lr_decay_rate(converted, tmp_path):
    """The authors' vit_s_fpn.py: lr_factor_func = partial(get_vit_lr_decay_rate, lr_decay_rate=0.8, num_layers=12)."""
    def literal(name, lr_decay_rate=1.0, num_layers=12):  # detectron2/modeling/backbone/vit.py, restated
        layer_id = num_layers + 1
        if name.startswith("backbone"):
            if ".pos_embed" in name or ".patch_embed" in name:
                layer_id = 0
            elif ".blocks." in name and ".residual." not in name:
                layer_id = int(name[name.find(".blocks.") :].split(".")[2]) + 1
        return lr_decay_rate ** (num_layers + 1 - layer_id)

    names = ["backbone.vit.pos_embed", "backbone.vit.patch_embed.proj.weight", "backbone.vit.blocks.0.attn.qkv.weight",
             "backbone.vit.blocks.11.mlp.fc2.bias", "backbone.vit.blocks.3.residual.conv1.weight", "backbone.vit.norm.weight",
             "neck.stages.0.0.weight", "roi_head.bbox_head.fc_cls.weight"]
    for n in names:
        assert seg_models.vit_lr_decay_rate(n, 0.8, 12) == pytest.approx(literal(n, 0.8, 12)), n
    assert segmentation.SegConfig().vit_lr_decay == 0.8
    # the built optimiser: each ViT parameter's lr is the base lr times its factor; R50 configs keep the default constructor
    from mmdet.registry import MODELS
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import init_default_scope
    init_default_scope("mmdet")
    cfg = segmentation.build_config("mask_rcnn_vit_s_sfp", "parts", converted, tmp_path, TINY)
    assert cfg.optim_wrapper.constructor == "LayerDecayOptimWrapperConstructor"
    assert "constructor" not in segmentation.build_config("mask_rcnn_r50_fpn", "parts", converted, tmp_path, TINY).optim_wrapper
    model = MODELS.build(cfg.model)
    opt = build_optim_wrapper(model, cfg.optim_wrapper).optimizer
    lr = {id(g["params"][0]): g["lr"] for g in opt.param_groups}
    base = cfg.optim_wrapper.optimizer.lr
    for n, p in model.named_parameters():
        assert lr[id(p)] == pytest.approx(base * literal(n, 0.8, TINY.vit_depth)), n
    assert lr[id(dict(model.named_parameters())["backbone.vit.pos_embed"])] == pytest.approx(base * 0.8 ** (TINY.vit_depth + 1))
