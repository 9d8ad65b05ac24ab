"""mmdet parts of the detection-transfer experiment (paper App. E, Table A3) that mmdet does not ship.

Registered into mmdet's MODELS registry on import (`det_transfer` imports this module before it builds a detector).

    ClassifierResNet    the kit's classifiers as a Faster R-CNN backbone: a timm ResNet (GELU for the PIN++ models,
                        ReLU for torchvision's) returning the four stage outputs, initialised from a weights file of
                        the classifier (fc dropped), with mmdet ResNet's `frozen_stages` and `norm_eval`
    ClippedLossRoIHead  StandardRoIHead with the RoI losses of Li et al.'s code (thu-ml/oddefense
                        `mmdet/models/roi_heads/standard_roi_head.py`, `_bbox_forward_train`): per-RoI classification
                        and per-element box losses, each value above `train_cfg.rcnn.clip` scaled down to it (its
                        gradient scaled by the same factor), then the plain mean over the elements
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
from mmdet.models.roi_heads import StandardRoIHead
from mmdet.models.task_modules.samplers import SamplingResult
from mmdet.registry import MODELS
from mmdet.structures.bbox import bbox2roi
from mmengine.model import BaseModule
from timm.models.resnet import Bottleneck, ResNet
from torch import Tensor

from . import checkpoint
from .fileio import PinppError

ARCHS = {"r50": dict(layers=(3, 4, 6, 3), channels=(64, 128, 256, 512), stem_width=64),
         "tiny": dict(layers=(1, 1, 1, 1), channels=(16, 32, 64, 128), stem_width=16)}  # = models._R50 / models._TINY


def stage_channels(arch: str) -> list[int]:
    """Output channels of the four stages (Bottleneck expansion 4): the FPN's `in_channels`."""
    return [4 * c for c in ARCHS[arch]["channels"]]


def resolve_weights(init: str) -> Path:
    """A weights file: a path, or mmengine's `torchvision://<name>` (the torch hub's checkpoints folder, where mmdet
    reads `torchvision://resnet50`); one line when it is missing (nothing is downloaded)."""
    if init.startswith("torchvision://"):
        from mmengine.runner.checkpoint import get_torchvision_models
        url = get_torchvision_models()[init.split("//", 1)[1]]
        path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]
        if not path.is_file():
            raise PinppError(f"{path}: the ImageNet weights of {init} are not on disk and cannot be downloaded here; "
                             f"fetch {url} there (or set det.clean_init to a weights file)")
        return path
    path = Path(init)
    if not path.is_file():
        raise PinppError(f"{path}: backbone weights not found; train the classifier first (notebook 05) or pass a file")
    return path


def load_backbone_state(net: nn.Module, init: str) -> None:
    """Load a classifier's state_dict (torchvision or timm key names, which are the same for ResNets) into `net`,
    dropping the classifier; every backbone tensor must be there with its shape."""
    path = resolve_weights(init)
    state = checkpoint.load(path)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    own = net.state_dict()
    bad = [k for k in own if k not in state or state[k].shape != own[k].shape]
    if bad:
        raise PinppError(f"{path}: does not fit the {len(own)}-tensor backbone (missing or reshaped: {bad[0]}); "
                         "check det.arch and the weights file")
    net.load_state_dict({k: state[k] for k in own})


@MODELS.register_module()
class ClassifierResNet(BaseModule):
    """A timm ResNet (Bottleneck) as a detection backbone: stem, layer1-4 → the stage outputs in `out_indices`.

    Inputs are the detector's normalised images (its data preprocessor normalises with ImageNet's mean/std, as the
    classifiers do inside). `frozen_stages` and `norm_eval` as mmdet's ResNet: stages 0 (stem) .. k take no gradient
    and keep eval mode; `norm_eval` keeps every BatchNorm in eval mode while training."""

    def __init__(self, arch: str = "r50", act: str = "gelu", init: str = "", frozen_stages: int = 1,
                 norm_eval: bool = True, out_indices: Sequence[int] = (0, 1, 2, 3), init_cfg=None):
        super().__init__(init_cfg)
        if arch not in ARCHS:
            raise PinppError(f"ClassifierResNet arch {arch!r}: choose one of {', '.join(ARCHS)}")
        a = ARCHS[arch]
        self.net = ResNet(Bottleneck, list(a["layers"]), num_classes=0, channels=a["channels"],
                          stem_width=a["stem_width"], act_layer=act)
        self.init, self.frozen_stages, self.norm_eval, self.out_indices = init, frozen_stages, norm_eval, tuple(out_indices)
        self._freeze_stages()

    def init_weights(self) -> None:
        """The classifier's weights (mmengine calls this after building; random init without a file)."""
        if self.init:
            load_backbone_state(self.net, self.init)

    def _stages(self) -> list[list[nn.Module]]:
        n = self.net
        return [[n.conv1, n.bn1], [n.layer1], [n.layer2], [n.layer3], [n.layer4]]

    def _freeze_stages(self) -> None:
        for mods in self._stages()[:self.frozen_stages + 1] if self.frozen_stages >= 0 else []:
            for m in mods:
                m.eval()
                for p in m.parameters():
                    p.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        n = self.net
        x = n.maxpool(n.act1(n.bn1(n.conv1(x))))
        outs = []
        for layer in (n.layer1, n.layer2, n.layer3, n.layer4):
            x = layer(x)
            outs.append(x)
        return tuple(outs[i] for i in self.out_indices)


def clip_mean(loss: Tensor, clip: float | None) -> Tensor:
    """oddefense's RoI-loss clip: elements above `clip` become `clip * l / l.detach()` (value `clip`, gradient scaled by
    clip / l), then the mean over all elements."""
    if clip is not None and loss.dim() > 0:
        loss = loss.clone()
        high = loss > clip
        loss[high] = clip * loss[high] / loss[high].detach()
    return loss.mean()


@MODELS.register_module()
class ClippedLossRoIHead(StandardRoIHead):
    """StandardRoIHead whose box-head losses are computed per element and reduced by `clip_mean` with
    `train_cfg.clip` (the rcnn train config's `clip`, as in oddefense's configs: `train_cfg=dict(rcnn=dict(clip=6))`).

    Per RoI for classification (mean over all sampled RoIs) and per coordinate of the positive RoIs for the L1 box
    loss (mean over 4 × positives; mmdet's default divides the sum by all sampled RoIs instead)."""

    def bbox_loss(self, x: tuple[Tensor, ...], sampling_results: list[SamplingResult]) -> dict:
        rois = bbox2roi([res.priors for res in sampling_results])
        bbox_results = self._bbox_forward(x, rois)
        out = self.bbox_head.loss_and_target(cls_score=bbox_results["cls_score"], bbox_pred=bbox_results["bbox_pred"],
                                             rois=rois, sampling_results=sampling_results, rcnn_train_cfg=self.train_cfg,
                                             reduction_override="none")
        losses = out["loss_bbox"]
        clip = self.train_cfg.get("clip", None)
        for k in ("loss_cls", "loss_bbox"):
            losses[k] = clip_mean(losses[k], clip)
        bbox_results.update(loss_bbox=losses)
        return bbox_results
