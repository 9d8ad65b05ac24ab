"""The cascade heads as detectron2's CascadeROIHeads (the authors' r50_fpn_cascade.py): config, training proposals,
gradient scale, one mask head, test score — each against a literal restatement of detectron2 @02b5c4e2."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from mmengine.dataset import pseudo_collate

from pinpp_lib import seg_cascade, segmentation
from pinpp_lib.seg_cascade import Detectron2CascadeRoIHead

from test_segmentation import TINY, built_model

CASCADE = "cascade_mask_rcnn_r50_fpn"
TWO_FC = dataclasses.replace(TINY, box_head="2fc")  # no norm layers in the box heads: train/eval forward agree


def _model(converted, tmp_path, sc=TINY):
    return built_model(CASCADE, converted, tmp_path, sc)


def _batch(model, cfg, n=2):
    from mmdet.registry import DATASETS
    from mmengine.registry import init_default_scope
    init_default_scope("mmdet")
    torch.manual_seed(0)
    data = DATASETS.build(cfg.train_dataloader.dataset.dataset)
    return model.data_preprocessor(pseudo_collate([data[i] for i in range(n)]), True)


def test_cascade_config_is_detectron2s_and_mmdets_on_request(converted, tmp_path):
    cfg = segmentation.build_config(CASCADE, "parts", converted, tmp_path, TINY)
    rh = cfg.model.roi_head
    assert rh.type == "Detectron2CascadeRoIHead" and rh.stage_loss_weights == [1.0, 1.0, 1.0]
    assert all(h.loss_bbox == dict(type="L1Loss", loss_weight=1.0) and h.reg_class_agnostic for h in rh.bbox_head)
    assert [s.assigner.pos_iou_thr for s in cfg.model.train_cfg.rcnn] == [0.5, 0.6, 0.7]
    assert [s.sampler.type for s in cfg.model.train_cfg.rcnn] == ["RandomSampler", "PseudoSampler", "PseudoSampler"]
    assert [h.bbox_coder.target_stds for h in rh.bbox_head] == [[0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1],
                                                                [0.033, 0.033, 0.067, 0.067]]  # 1 / (10, 5) (20, 10) (30, 15)
    assert isinstance(rh.mask_head, dict)
    old = segmentation.build_config(CASCADE, "parts", converted, tmp_path, dataclasses.replace(TINY, cascade="mmdet")).model
    assert old.roi_head.type == "CascadeRoIHead" and old.roi_head.stage_loss_weights == [1, 0.5, 0.25]
    assert all(s.sampler.type == "RandomSampler" for s in old.train_cfg.rcnn)
    assert all(h.loss_bbox.type == "SmoothL1Loss" for h in old.roi_head.bbox_head)
    # the choice is no identity of a non-cascade model: Mask R-CNN runs stay valid
    ann = segmentation.annotation_file(converted, "parts", "train")
    ident = lambda name, sc: segmentation._identity(name, "parts", 0, sc, ann).sha256  # noqa: E731
    other = dataclasses.replace(TINY, cascade="mmdet")
    assert ident("mask_rcnn_r50_fpn", TINY) == ident("mask_rcnn_r50_fpn", other)
    assert ident(CASCADE, TINY) != ident(CASCADE, other)


def _d2_apply_deltas(deltas, boxes, weights, scale_clamp=math.log(1000.0 / 16)):
    """detectron2 Box2BoxTransform.apply_deltas (box_regression.py), restated (class-agnostic: one box per row)."""
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    ctr_x, ctr_y = boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx, dy = deltas[:, 0] / wx, deltas[:, 1] / wy
    dw, dh = torch.clamp(deltas[:, 2] / ww, max=scale_clamp), torch.clamp(deltas[:, 3] / wh, max=scale_clamp)
    px, py, pw, ph = dx * widths + ctr_x, dy * heights + ctr_y, torch.exp(dw) * widths, torch.exp(dh) * heights
    return torch.stack([px - 0.5 * pw, py - 0.5 * ph, px + 0.5 * pw, py + 0.5 * ph], 1)


def _d2_create_proposals(boxes, image_size):
    """_create_proposals_from_boxes in training: Boxes.clip(h, w), then Boxes.nonempty() (width and height > 0)."""
    h, w = image_size
    b = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], 1)
    return b[((b[:, 2] - b[:, 0]) > 0) & ((b[:, 3] - b[:, 1]) > 0)]


def test_training_proposals_of_stages_2_and_3_restate_detectron2(converted, tmp_path):
    _, model = _model(converted, tmp_path)
    g = torch.Generator().manual_seed(0)
    boxes = torch.rand(40, 2, generator=g) * 50
    boxes = torch.cat([boxes, boxes + 1 + torch.rand(40, 2, generator=g) * 30], 1)
    boxes[:3, :2] += 200  # pushed off the image: clipped to empty and dropped
    rois = torch.cat([torch.tensor([0.0] * 25 + [1.0] * 15)[:, None], boxes], 1)
    deltas = torch.randn(40, 4, generator=g) * 0.5
    metas = [{"img_shape": (60, 70)}, {"img_shape": (45, 52)}]
    for stage, weights in enumerate([(10, 10, 5, 5), (20, 20, 10, 10)]):
        got = model.roi_head.next_proposals(stage, {"rois": rois, "bbox_pred": deltas}, metas)
        for i, meta in enumerate(metas):
            sel = rois[:, 0] == i
            want = _d2_create_proposals(_d2_apply_deltas(deltas[sel], boxes[sel], weights), meta["img_shape"])
            assert torch.allclose(got[i].bboxes, want, atol=1e-4), (stage, i)
    assert len(got[0].bboxes) < 25  # the off-image boxes were dropped


def test_loss_resamples_once_and_trains_one_mask_head(converted, tmp_path):
    """Stage 1 samples (ground truth added); stages 2 and 3 take every box the previous stage predicted, none added;
    the stage losses are unweighted; one mask loss, on stage 1's positives."""
    cfg, model = _model(converted, tmp_path)
    model.train()
    data = _batch(model, cfg)
    seen, results = [], []
    orig = model.roi_head.bbox_loss
    model.roi_head.bbox_loss = lambda stage, x, srs: seen.append((stage, srs)) or results.append(orig(stage, x, srs)) or results[-1]
    masks = []
    orig_mask = model.roi_head.mask_loss
    model.roi_head.mask_loss = lambda stage, x, srs, gts: masks.append(srs) or orig_mask(stage, x, srs, gts)
    losses = model.loss(data["inputs"], data["data_samples"])
    assert [s for s, _ in seen] == [0, 1, 2] and len(masks) == 1 and masks[0] is seen[0][1]
    assert {k for k in losses if "mask" in k} == {"loss_mask"}
    assert {"s0.loss_cls", "s1.loss_cls", "s2.loss_cls", "s0.loss_bbox", "s2.loss_bbox"} <= set(losses)
    for i in range(len(data["data_samples"])):
        first = seen[0][1][i]
        assert first.pos_is_gt.any()  # ground truth added at stage 1
        for stage in (1, 2):
            sr = seen[stage][1][i]
            assert len(sr.pos_inds) + len(sr.neg_inds) == len(sr.priors) and not sr.pos_is_gt.any()
        # stage 2 sees every stage-1 box (those not clipped to empty), ground-truth-born ones included
        assert len(seen[1][1][i].priors) <= len(first.priors) and len(seen[1][1][i].priors) >= len(first.priors) - 2
    # unweighted: each stage's loss is its head's own loss (L1 for the boxes)
    for stage, res in enumerate(results):
        assert type(model.roi_head.bbox_head[stage].loss_bbox).__name__ == "L1Loss"
        for name in ("loss_cls", "loss_bbox"):
            assert torch.equal(losses[f"s{stage}.{name}"], res["loss_bbox"][name])


def test_pooled_box_features_get_a_third_of_the_gradient(converted, tmp_path):
    _, model = _model(converted, tmp_path, TWO_FC)
    rh = model.roi_head
    assert rh.grad_scale == pytest.approx(1 / 3)
    rh.train()
    x = tuple(torch.randn(1, 32, s, s, requires_grad=True) for s in (16, 8, 4, 2))
    rois = torch.tensor([[0, 2.0, 3.0, 30.0, 40.0], [0, 10.0, 10.0, 50.0, 60.0]])
    grads = []
    for scale in (1 / 3, 1.0):
        rh.grad_scale = scale
        for f in x:
            f.grad = None
        out = rh._bbox_forward(1, x, rois)
        (out["cls_score"].sum() + out["bbox_pred"].sum()).backward()
        grads.append(torch.cat([f.grad.flatten() for f in x]))
    assert grads[1].abs().sum() > 0 and torch.allclose(grads[0], grads[1] / 3, atol=1e-7)
    rh.eval()  # at test nothing is scaled (no gradient anyway), the forward is the same
    assert torch.equal(rh._bbox_forward(1, x, rois)["cls_score"], out["cls_score"])


def test_test_score_is_the_mean_of_the_stages_probabilities(converted, tmp_path):
    """detectron2: scores = mean over stages of predict_probs (sigmoid for use_sigmoid_ce); mmdet would average the
    logits. The head's own activation of the returned logits gives the mean back."""
    _, model = _model(converted, tmp_path)
    head = model.roi_head.bbox_head[-1]
    k = head.num_classes
    g = torch.Generator().manual_seed(1)
    logits = [torch.randn(6, k, generator=g) * 3 for _ in range(3)]
    want = sum(torch.sigmoid(s) for s in logits) / 3  # restated
    got = head.loss_cls.get_activation(seg_cascade.mean_stage_probs(head, logits))
    assert torch.allclose(got[:, :k], want, atol=1e-6) and torch.equal(got[:, k], torch.zeros(6))
    assert not torch.allclose(torch.sigmoid(sum(logits) / 3), want, atol=1e-3)  # the two rules differ here

    class Softmax:  # a softmax head (K + 1 logits), as detectron2 without use_sigmoid_ce
        custom_cls_channels = False
    sm = [torch.randn(4, k + 1, generator=g) for _ in range(3)]
    assert torch.allclose(seg_cascade.mean_stage_probs(Softmax, sm).softmax(-1), sum(s.softmax(-1) for s in sm) / 3, atol=1e-6)


def test_one_mask_head_in_the_model(converted, tmp_path):
    _, model = _model(converted, tmp_path)
    assert isinstance(model.roi_head, Detectron2CascadeRoIHead)
    assert not isinstance(model.roi_head.mask_head, torch.nn.ModuleList)
    assert sum(1 for n, _ in model.named_modules() if n.startswith("roi_head.mask_head.conv_logits")) == 1
