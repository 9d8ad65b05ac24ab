"""Cascade R-CNN heads as detectron2's `CascadeROIHeads` runs them (the authors' `r50_fpn_cascade.py`, §5).

mmdet's `CascadeRoIHead` and detectron2's `CascadeROIHeads` (facebookresearch/detectron2 @02b5c4e2,
`detectron2/modeling/roi_heads/cascade_rcnn.py`) share the stages (IoU 0.5 / 0.6 / 0.7, class-agnostic regression,
target weights (10, 5) / (20, 10) / (30, 15)) but not how they train and score them. `Detectron2CascadeRoIHead`
keeps mmdet's pieces and changes what differs:

    training, stage 1      as mmdet: proposals + ground truth, sampled (RoIs per image, positive fraction 0.25)
    training, stages 2–3   every box of the previous stage, decoded, clipped to the image and the empty ones dropped
                           (`_create_proposals_from_boxes`), labelled by the stage's matcher (`_match_and_label_boxes`);
                           no resampling and no ground truth added (mmdet: resampled with ground truth, and the
                           ground-truth-born boxes of stage 1 removed). The config sets the stages' `PseudoSampler`.
    stage losses           unweighted (`stage_loss_weights` 1, 1, 1; mmdet 1, 0.5, 0.25); the pooled box features'
                           gradient scaled by 1 / stages (`_ScaleGradient` in `_run_stage`), training only
    box loss               smooth-L1 with β = 0, i.e. L1 (FastRCNNOutputLayers' default; mmdet's cascade: β = 1) — a
                           config setting (`seg_recipes.apply_recipe`)
    mask head              one, trained on stage 1's sampled foreground proposals with weight 1 and applied to the
                           final boxes (`_forward_mask` with the stage-1 proposals; mmdet: a head per stage, each
                           trained on its stage's samples, their masks averaged at test)
    test scores            the mean of the stages' probabilities (`predict_probs`: sigmoid or softmax per stage);
                           mmdet averages the stages' logits and activates once
"""
from __future__ import annotations

from typing import Any, List, Tuple

import torch
from mmdet.models.roi_heads import CascadeRoIHead
from mmdet.models.task_modules.samplers import SamplingResult
from mmdet.models.utils import empty_instances, unpack_gt_instances
from mmdet.registry import MODELS
from mmdet.structures.bbox import bbox2roi, get_box_tensor
from mmengine.structures import InstanceData
from torch import Tensor


class _ScaleGradient(torch.autograd.Function):
    """Identity forward, gradient × scale backward (detectron2's `_ScaleGradient`)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def mean_stage_probs(head, stage_logits: List[Tensor]) -> Tensor:
    """detectron2's test score: the mean over stages of each stage's probabilities, returned as logits that `head`'s
    own activation turns back into exactly that mean (sigmoid heads: logit(p); softmax heads: log p)."""
    if head.custom_cls_channels:  # the federated sigmoid loss: K sigmoid scores (+ a zero background column)
        k = head.num_classes
        probs = torch.stack([head.loss_cls.get_activation(s)[:, :k] for s in stage_logits]).mean(0)
        return torch.logit(probs)
    probs = torch.stack([s.softmax(-1) for s in stage_logits]).mean(0)
    return probs.log()


@MODELS.register_module()
class Detectron2CascadeRoIHead(CascadeRoIHead):
    """mmdet's CascadeRoIHead trained and scored as detectron2's CascadeROIHeads (module docstring).

    `mask_head` / `mask_roi_extractor` are one config each (one head, not one per stage). `grad_scale`: the factor on
    the gradient into the pooled box features; None is 1 / num_stages, as detectron2."""

    def __init__(self, num_stages: int, stage_loss_weights, grad_scale: float | None = None, **kwargs):
        self.grad_scale = 1.0 / num_stages if grad_scale is None else grad_scale
        super().__init__(num_stages, stage_loss_weights, **kwargs)
        for head in self.bbox_head:
            if not head.reg_class_agnostic:
                raise ValueError("Detectron2CascadeRoIHead: class-agnostic regression only (as detectron2's cascade)")

    def init_mask_head(self, mask_roi_extractor, mask_head) -> None:
        if isinstance(mask_head, list) or isinstance(mask_roi_extractor, list) or mask_roi_extractor is None:
            raise ValueError("Detectron2CascadeRoIHead: one mask head and its own RoI extractor (detectron2 has one)")
        self.share_roi_extractor = False
        self.mask_roi_extractor = MODELS.build(mask_roi_extractor)
        self.mask_head = MODELS.build(mask_head)

    def _bbox_forward(self, stage: int, x: Tuple[Tensor], rois: Tensor) -> dict:
        extractor = self.bbox_roi_extractor[stage]
        feats = extractor(x[:extractor.num_inputs], rois)
        if self.training:
            feats = _ScaleGradient.apply(feats, self.grad_scale)
        cls_score, bbox_pred = self.bbox_head[stage](feats)
        return dict(cls_score=cls_score, bbox_pred=bbox_pred, bbox_feats=feats)

    def _mask_forward(self, stage: int, x: Tuple[Tensor], rois: Tensor) -> dict:
        feats = self.mask_roi_extractor(x[:self.mask_roi_extractor.num_inputs], rois)
        return dict(mask_preds=self.mask_head(feats))

    def mask_loss(self, stage: int, x: Tuple[Tensor], sampling_results: List[SamplingResult],
                  batch_gt_instances) -> dict:
        out = self._mask_forward(stage, x, bbox2roi([res.pos_priors for res in sampling_results]))
        out.update(self.mask_head.loss_and_target(mask_preds=out["mask_preds"], sampling_results=sampling_results,
                                                  batch_gt_instances=batch_gt_instances, rcnn_train_cfg=self.train_cfg[0]))
        return out

    @torch.no_grad()
    def next_proposals(self, stage: int, bbox_results: dict, batch_img_metas: List[dict]) -> List[InstanceData]:
        """The next stage's proposals: every RoI's box as this stage predicts it, clipped to its image, empty ones
        dropped (detectron2's `predict_boxes` + `_create_proposals_from_boxes` in training)."""
        head, rois, deltas = self.bbox_head[stage], bbox_results["rois"], bbox_results["bbox_pred"]
        out = []
        for i, meta in enumerate(batch_img_metas):
            sel = rois[:, 0] == i
            boxes = get_box_tensor(head.bbox_coder.decode(rois[sel, 1:], deltas[sel], max_shape=meta["img_shape"]))
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            out.append(InstanceData(bboxes=boxes[keep].detach()))
        return out

    def loss(self, x: Tuple[Tensor], rpn_results_list, batch_data_samples) -> dict:
        gts, gts_ignore, metas = unpack_gt_instances(batch_data_samples)
        losses: dict[str, Any] = {}
        results_list, first = rpn_results_list, None
        for stage in range(self.num_stages):
            self.current_stage = stage
            sampling_results = []
            for i in range(len(batch_data_samples)):
                results = results_list[i]
                results.priors = results.pop("bboxes")
                assign = self.bbox_assigner[stage].assign(results, gts[i], gts_ignore[i])
                sampling_results.append(self.bbox_sampler[stage].sample(
                    assign, results, gts[i], feats=[lvl[i][None] for lvl in x]))
            if stage == 0:
                first = sampling_results  # the mask head's samples (detectron2: stage 1's proposals)
            bbox_results = self.bbox_loss(stage, x, sampling_results)
            weight = self.stage_loss_weights[stage]
            for name, value in bbox_results["loss_bbox"].items():
                losses[f"s{stage}.{name}"] = value * weight if "loss" in name else value
            if stage < self.num_stages - 1:
                results_list = self.next_proposals(stage, bbox_results, metas)
        if self.with_mask:
            losses.update(self.mask_loss(0, x, first, gts)["loss_mask"])
        return losses

    def _refine_roi(self, x: Tuple[Tensor], rois: Tensor, batch_img_metas: List[dict], num_proposals_per_img, **kwargs):
        """mmdet's test-time refinement (boxes of the last stage, regressed stage by stage) with detectron2's score:
        the mean of the stages' probabilities instead of the mean of their logits."""
        stage_logits = []
        for stage in range(self.num_stages):
            res = self._bbox_forward(stage, x, rois)
            stage_logits.append(res["cls_score"])
            bbox_preds = res["bbox_pred"]
            if stage < self.num_stages - 1:
                head, refined = self.bbox_head[stage], []
                for i, (r, d) in enumerate(zip(rois.split(num_proposals_per_img), bbox_preds.split(num_proposals_per_img))):
                    if len(r):
                        boxes = get_box_tensor(head.regress_by_class(r[:, 1:], None, d, batch_img_metas[i]))
                        refined.append(torch.cat([r[:, :1], boxes], 1))
                rois = torch.cat(refined)
        scores = mean_stage_probs(self.bbox_head[-1], stage_logits)
        return (rois.split(num_proposals_per_img), list(scores.split(num_proposals_per_img)),
                list(bbox_preds.split(num_proposals_per_img)))

    def predict_mask(self, x: Tuple[Tensor], batch_img_metas: List[dict], results_list, rescale: bool = False):
        """The one mask head on the final boxes (detectron2's `forward_with_given_boxes`)."""
        mask_rois = bbox2roi([res.bboxes for res in results_list])
        if mask_rois.shape[0] == 0:
            return empty_instances(batch_img_metas, mask_rois.device, task_type="mask", instance_results=results_list,
                                   mask_thr_binary=self.test_cfg.mask_thr_binary)
        preds = self._mask_forward(-1, x, mask_rois)["mask_preds"].split([len(r) for r in results_list], 0)
        return self.mask_head.predict_by_feat(mask_preds=preds, results_list=results_list, batch_img_metas=batch_img_metas,
                                              rcnn_test_cfg=self.test_cfg, rescale=rescale)
