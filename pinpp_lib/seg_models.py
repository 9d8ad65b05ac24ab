"""mmdet building blocks of the segmentation benchmark (paper §5) that mmdet does not ship.

Registered into mmdet's MODELS registry on import; the kit's configs (`pinpp_lib/seg_configs/`)
import this module through `custom_imports`, so torchrun workers register them too.

    FederatedLoss         sigmoid BCE over the ground-truth classes of the batch plus sampled
                          negatives (Zhou et al. 2021, as in detectron2's fed loss; the authors' recipe)
    PartFilterBBoxHead    ConvFCBBoxHead (2fc, or detectron2's 4conv1fc) + two inference options: the Category Filter (CF, §4.1:
                          scores of categories outside an image's `allowed_labels` are zeroed) and
                          `single_label` (one label per RoI: its argmax) used when pseudo-labelling
    TimmViT               a timm ViT (ViT-S/16: embed 384, depth 12) as a single-scale backbone, plain or ViTDet's
                          (window attention, relative positions, square padding)
    LN2d                  channel LayerNorm of conv features (detectron2's "LN" conv_norm), as an mmcv norm layer
    SimpleFeaturePyramid  ViTDet's simple feature pyramid: strides 4/8/16/32 (+64) from the stride-16 map
    PlainHistoryHook      keeps mmengine's resume checkpoints loadable with torch.load(weights_only=True)
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmdet.models.roi_heads.bbox_heads import ConvFCBBoxHead
from mmdet.registry import HOOKS, MODELS, OPTIM_WRAPPER_CONSTRUCTORS
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer
from mmengine.model import BaseModule
from mmengine.optim import DefaultOptimWrapperConstructor
from torch import Tensor

from . import fileio


def class_image_counts(ann_file: str, num_classes: int) -> Tensor:
    """Images per category of a COCO file, in the order of the categories' ids (= mmdet's labels)."""
    coco = fileio.read_json(ann_file, "COCO annotation file", "re-run `pinpp convert`")
    cat_ids = sorted(c["id"] for c in coco["categories"])
    if len(cat_ids) != num_classes:
        raise fileio.PinppError(f"{ann_file}: {len(cat_ids)} categories but the model has {num_classes} classes; "
                                "rebuild the config from this file")
    label = {c: i for i, c in enumerate(cat_ids)}
    seen: set[tuple[int, int]] = {(a["image_id"], label[a["category_id"]]) for a in coco["annotations"]}
    counts = torch.zeros(num_classes)
    for _, lab in seen:
        counts[lab] += 1
    return counts


def federated_classes(labels: Tensor, num_classes: int, num_fed: int, weight: Tensor,
                      count_background: bool = True) -> Tensor:
    """The foreground classes a federated loss is computed over: every ground-truth class among `labels` plus
    negatives drawn without replacement with probability ∝ `weight` (image frequency ** power), up to `num_fed`.

    `count_background` (detectron2's `get_fed_loss_classes`, the authors' code): the background label
    (`num_classes`) of a batch with background RoIs is one of the `num_fed` unique classes, so one negative fewer is
    drawn; it is never drawn and is dropped from the result. False: only foreground classes count."""
    keep = (labels >= 0) & (labels <= num_classes) if count_background else (labels >= 0) & (labels < num_classes)
    unique = torch.unique(labels[keep])
    gt = unique[unique < num_classes]
    if len(unique) >= num_fed:
        return gt
    # the draw over K + 1 entries with the background's at 0, as detectron2: the same samples under the same seed
    prob = torch.cat([weight.to(labels.device, torch.float), weight.new_zeros(1, dtype=torch.float).to(labels.device)])
    prob[unique] = 0
    n_neg = min(num_fed - len(unique), int((prob > 0).sum()))  # detectron2 would fail; the kit draws what there is
    if n_neg == 0:
        return gt
    return torch.cat([gt, torch.multinomial(prob, n_neg, replacement=False)])


@MODELS.register_module()
class FederatedLoss(nn.Module):
    """Sigmoid cross-entropy restricted to a federated subset of classes, for the RoI classifier.

    The classifier has K outputs (no background logit): a background RoI is all-zero targets.
    Per batch, the loss covers the K-way BCE only on the classes from `federated_classes`
    (ground truth of the batch + `num_fed_classes` in all, negatives by frequency**`freq_power`),
    summed over classes and averaged over RoIs. Class frequencies are read from `ann_file`.
    Inference uses the sigmoid scores with a zero background column appended (mmdet's NMS drops it).
    """

    def __init__(self, num_classes: int, ann_file: Optional[str] = None, num_fed_classes: int = 50,
                 freq_power: float = 0.5, loss_weight: float = 1.0, use_fed_loss: bool = True,
                 count_background: bool = True):
        super().__init__()
        self.num_classes, self.num_fed, self.loss_weight, self.use_fed = num_classes, num_fed_classes, loss_weight, use_fed_loss
        self.count_background = count_background
        counts = class_image_counts(ann_file, num_classes) if ann_file else torch.ones(num_classes)
        self.register_buffer("fed_weight", counts.float() ** freq_power, persistent=False)
        # mmdet's BBoxHead asks the loss for its output channels, activation and accuracy
        self.custom_cls_channels = self.custom_activation = self.custom_accuracy = True

    def get_cls_channels(self, num_classes: int) -> int:
        return num_classes

    def get_activation(self, cls_score: Tensor) -> Tensor:
        return torch.cat([cls_score.sigmoid(), cls_score.new_zeros(len(cls_score), 1)], dim=1)

    def get_accuracy(self, cls_score: Tensor, labels: Tensor) -> dict[str, Tensor]:
        fg = labels < self.num_classes
        acc = (cls_score[fg].argmax(1) == labels[fg]).float().mean() * 100 if fg.any() else cls_score.new_tensor(0.0)
        return {"acc": acc}

    def forward(self, cls_score: Tensor, labels: Tensor, label_weights: Optional[Tensor] = None,
                avg_factor: Optional[float] = None, reduction_override: Optional[str] = None) -> Tensor:
        k = self.num_classes
        target = F.one_hot(labels.clamp(0, k), k + 1)[:, :k].to(cls_score.dtype)  # background: all zeros
        loss = F.binary_cross_entropy_with_logits(cls_score, target, reduction="none")
        if self.use_fed:
            mask = cls_score.new_zeros(k)
            mask[federated_classes(labels, k, self.num_fed, self.fed_weight, self.count_background)] = 1
            loss = loss * mask[None]
        if label_weights is not None:
            loss = loss * label_weights[:, None].to(loss.dtype)
        return self.loss_weight * loss.sum() / (avg_factor if avg_factor else max(len(cls_score), 1))


@MODELS.register_module()
class PartFilterBBoxHead(ConvFCBBoxHead):
    """A shared conv/fc box head — by default mmdet's Shared2FCBBoxHead (2 fc); `num_shared_convs=4,
    num_shared_fcs=1, norm_cfg=...` is detectron2's 4conv1fc head of the authors' configs — plus the Category Filter
    and one-label-per-RoI at inference.

    - CF: an image whose metainfo carries `allowed_labels` (the labels of its class's parts) gets
      every other category's logit set to −inf before scoring, so its probability is exactly 0 and
      no detection of another class's part can come out (paper §4.1).
    - `single_label=True` in the rcnn test config keeps only each RoI's best category ("argmax per
      detection"), instead of one detection per category above the score threshold.
    Without either option (and with the defaults) it is exactly Shared2FCBBoxHead. `prior_prob`: the sigmoid
    classifier's bias starts at log(p / (1 − p)); None keeps mmdet's 0, as detectron2's FastRCNNOutputLayers (the
    authors' code) initialises it.
    """

    def __init__(self, *args, num_shared_convs: int = 0, num_shared_fcs: int = 2, prior_prob: Optional[float] = None,
                 **kwargs):
        super().__init__(*args, num_shared_convs=num_shared_convs, num_shared_fcs=num_shared_fcs, **kwargs)
        if prior_prob is not None and isinstance(self.loss_cls, FederatedLoss):
            for init in self.init_cfg:
                if init.get("override") == {"name": "fc_cls"}:
                    init["bias_prob"] = prior_prob

    def _predict_by_feat_single(self, roi: Tensor, cls_score: Tensor, bbox_pred: Tensor, img_meta: dict,
                                rescale: bool = False, rcnn_test_cfg=None):
        allowed = img_meta.get("allowed_labels")
        single = rcnn_test_cfg is not None and rcnn_test_cfg.get("single_label", False)
        if cls_score is not None and len(cls_score) and (allowed is not None or single):
            cls_score = filter_logits(cls_score, self.num_classes, allowed, single)
        return super()._predict_by_feat_single(roi, cls_score, bbox_pred, img_meta, rescale, rcnn_test_cfg)


def filter_logits(cls_score: Tensor, num_classes: int, allowed: Optional[Sequence[int]], single: bool) -> Tensor:
    """Logits with categories outside `allowed` (and, if `single`, all but the best one) at −inf.
    A background column (softmax heads) is kept as it is."""
    out = cls_score.clone()
    fg = out[:, :num_classes]
    if allowed is not None:
        keep = torch.zeros(num_classes, dtype=torch.bool, device=out.device)
        keep[torch.as_tensor(list(allowed), dtype=torch.long, device=out.device)] = True
        fg[:, ~keep] = float("-inf")
    if single:
        best = fg.argmax(1)
        mask = torch.ones_like(fg, dtype=torch.bool)
        mask[torch.arange(len(fg)), best] = False
        fg[mask] = float("-inf")
    return out


@MODELS.register_module()
class TimmViT(BaseModule):
    """A timm ViT as a plain backbone: returns the stride-`patch` map of its last block, (B, C, H/p, W/p).

    style "plain": timm's `VisionTransformer` (global attention in every block, a final norm); `dynamic_img_size`
    lets one model run at the training crop and at any padded test size (the position embedding is resampled).
    style "vitdet": ViTDet's backbone (detectron2 `modeling/backbone/vit.py` as `common/models/mask_rcnn_vitdet.py`
    builds it) on timm's `VisionTransformerSAM`, which restates it: window attention (`window_size` 14) except in
    `global_blocks` (2, 5, 8, 11), decomposed relative position embeddings, LayerNorm eps 1e-6, no final norm; inputs
    zero-padded (after normalisation) to a `square_pad`² square at the bottom right, as detectron2's `square_pad`
    (a larger image is padded to its own size, multiple of the patch, and the absolute position embedding resampled,
    where detectron2 would crop). Smaller widths/depths (smoke) are passed as overrides.
    """

    def __init__(self, model_name: str = "vit_small_patch16_224", img_size: int = 1024, pretrained: bool = False,
                 drop_path_rate: float = 0.1, embed_dim: Optional[int] = None, depth: Optional[int] = None,
                 num_heads: Optional[int] = None, style: str = "plain", window_size: int = 14,
                 global_blocks: Sequence[int] = (2, 5, 8, 11), square_pad: int = 0, init_cfg=None):
        super().__init__(init_cfg)
        import timm
        kw = {k: v for k, v in (("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads)) if v is not None}
        self.square_pad = square_pad
        if style == "vitdet":
            if pretrained:
                raise fileio.PinppError("no ViTDet-style ViT-S weights exist to load (MAE released ViT-B/L/H only); "
                                        "set seg.pretrained=False or seg.vit_style=plain for timm's ViT-S")
            from functools import partial
            from timm.models.vision_transformer_sam import VisionTransformerSAM
            self.vit = VisionTransformerSAM(img_size=img_size, patch_size=16, num_classes=0, neck_chans=0, window_size=window_size,
                                            global_attn_indexes=tuple(global_blocks), use_rel_pos=True, use_abs_pos=True,
                                            drop_path_rate=drop_path_rate, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                                            **{"embed_dim": 384, "depth": 12, "num_heads": 6, **kw})
            self.vit.neck = nn.Identity()  # detectron2's ViT has no final norm
        elif style == "plain":
            try:
                self.vit = timm.create_model(model_name, pretrained=pretrained, img_size=img_size, dynamic_img_size=True,
                                             num_classes=0, global_pool="", drop_path_rate=drop_path_rate, **kw)
            except Exception as e:  # offline hub: many exception types, one meaning
                if not pretrained:
                    raise
                raise fileio.PinppError(f"timm weights for {model_name} cannot be loaded here ({type(e).__name__}); put them "
                                        "in the Hugging Face cache (HF_HOME) or set seg.pretrained=None") from None
        else:
            raise ValueError(f"TimmViT style {style!r}: 'plain' or 'vitdet'")
        self.style = style
        self.patch = self.vit.patch_embed.patch_size[0]
        self.out_channels = self.vit.embed_dim

    def forward(self, x: Tensor) -> tuple[Tensor]:
        if self.style == "vitdet":
            h, w = x.shape[-2:]
            side = max(self.square_pad, -(-h // self.patch) * self.patch, -(-w // self.patch) * self.patch)
            x = F.pad(x, (0, side - w, 0, side - h))
            return (self.vit.forward_features(x).contiguous(),)  # (B, C, H/p, W/p): the SAM ViT's NHWC → NCHW already
        b, _, h, w = x.shape
        tokens = self.vit.forward_features(x)[:, self.vit.num_prefix_tokens:]
        return (tokens.transpose(1, 2).reshape(b, -1, h // self.patch, w // self.patch),)


@MODELS.register_module()
class SimpleFeaturePyramid(BaseModule):
    """ViTDet's simple feature pyramid: from one stride-16 map, maps at strides 16/4, 16/2, 16, 32 by
    deconvolutions / identity / max-pooling, each projected by 1×1 + 3×3 convs with LayerNorm;
    `num_outs` > 4 adds max-pooled levels on top (the RPN's stride-64 level)."""

    def __init__(self, in_channels: int = 384, out_channels: int = 256, scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
                 num_outs: int = 5, init_cfg=None):
        super().__init__(init_cfg)
        from timm.layers import LayerNorm2d
        self.num_outs = num_outs
        self.stages = nn.ModuleList()
        for s in scale_factors:
            c = in_channels
            if s == 4.0:
                layers, c = [nn.ConvTranspose2d(c, c // 2, 2, 2), LayerNorm2d(c // 2), nn.GELU(), nn.ConvTranspose2d(c // 2, c // 4, 2, 2)], c // 4
            elif s == 2.0:
                layers, c = [nn.ConvTranspose2d(c, c // 2, 2, 2)], c // 2
            elif s == 1.0:
                layers = []
            elif s == 0.5:
                layers = [nn.MaxPool2d(2, 2)]
            else:
                raise ValueError(f"scale factor {s} is not one of 4, 2, 1, 0.5")
            layers += [nn.Conv2d(c, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                       nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels)]
            self.stages.append(nn.Sequential(*layers))

    def forward(self, inputs: tuple[Tensor]) -> tuple[Tensor, ...]:
        outs = [stage(inputs[-1]) for stage in self.stages]
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return tuple(outs)


def _register_ln2d() -> None:
    """detectron2's `LayerNorm` (over the channels of each pixel, eps 1e-6) — the "LN" conv_norm of ViTDet's box and
    mask heads — as the mmcv norm type "LN2d" (mmcv's "LN" normalises the last dimension, the width)."""
    from mmengine.registry import MODELS as ROOT
    from timm.layers import LayerNorm2d
    if ROOT.get("LN2d") is None:
        ROOT.register_module("LN2d", module=LayerNorm2d)


_register_ln2d()

_BUFFER_TAG = "__pinpp_history_buffer__"


@HOOKS.register_module()
class PlainHistoryHook(Hook):
    """Stores the message hub's HistoryBuffers in checkpoints as plain lists, and back on loading.

    A HistoryBuffer pickles its statistics methods through `getattr`, which `torch.load(weights_only=True)`
    (the default since torch 2.6) rightly refuses; allow-listing `getattr` would defeat safe loading.
    With plain lists a resume checkpoint holds only tensors, numbers, strings and numpy arrays
    (the latter allow-listed by `segmentation.allow_mmengine_checkpoints`).
    """

    priority = "VERY_LOW"

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        scalars = checkpoint.get("message_hub", {}).get("log_scalars", {})
        for k, buf in list(scalars.items()):
            if isinstance(buf, HistoryBuffer):
                log, count = buf.data
                scalars[k] = {_BUFFER_TAG: True, "log": log.tolist(), "count": count.tolist(), "max_length": buf.max_length}

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        scalars = checkpoint.get("message_hub", {}).get("log_scalars", {})
        for k, v in list(scalars.items()):
            if isinstance(v, dict) and v.get(_BUFFER_TAG):
                scalars[k] = HistoryBuffer(v["log"], v["count"], v["max_length"])


def vit_lr_decay_rate(name: str, lr_decay_rate: float = 1.0, num_layers: int = 12) -> float:
    """The lr factor of a parameter as detectron2's `get_vit_lr_decay_rate` (modeling/backbone/vit.py), which the
    authors' `vit_s_fpn.py` sets as `lr_factor_func` (rate 0.8, 12 layers): backbone position and patch embeddings
    are layer 0, block i is layer i + 1, every other parameter layer num_layers + 1; factor = rate^(L + 1 − layer)."""
    layer = num_layers + 1
    if name.startswith("backbone"):
        if ".pos_embed" in name or ".patch_embed" in name:
            layer = 0
        elif ".blocks." in name and ".residual." not in name:
            layer = int(name[name.find(".blocks."):].split(".")[2]) + 1
    return lr_decay_rate ** (num_layers + 1 - layer)


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class LayerDecayOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """mmengine's default constructor (norm_decay_mult, ...) with each parameter's lr multiplied by
    `vit_lr_decay_rate(name, lr_decay_rate, num_layers)` — detectron2's `lr_factor_func`, applied on top of the other
    per-parameter settings as its `get_default_optimizer_params` does. paramwise_cfg keys: `lr_decay_rate`, `num_layers`."""

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: Optional[dict] = None):
        paramwise_cfg = dict(paramwise_cfg or {})
        self.lr_decay_rate = paramwise_cfg.pop("lr_decay_rate", 1.0)
        self.num_layers = paramwise_cfg.pop("num_layers", 12)
        super().__init__(optim_wrapper_cfg, paramwise_cfg)

    def add_params(self, params: list, module: nn.Module, prefix: str = "", is_dcn_module=None) -> None:
        super().add_params(params, module, prefix, is_dcn_module)
        if prefix:  # the recursion into children; the top call (prefix "") has every parameter's group
            return
        names = {id(p): n for n, p in module.named_parameters()}
        for group in params:
            factor = vit_lr_decay_rate(names[id(group["params"][0])], self.lr_decay_rate, self.num_layers)
            group["lr"] = group.get("lr", self.base_lr) * factor
