"""MPM and its ablations (paper §4.2, Table 7, Table A4; facts §5), registered with timm.

    resnet50_gelu              ResNet-50 with every ReLU replaced by GELU (the deployable classifier)
    mpm_resnet50               = SV3: + multi-scale part bypass (compact 1×1 conv+BN on layer2/3/4,
                                 top-down separable-conv path, heads at 28², 14², 7² for 224 input)
    mpm_sv1_resnet50           head at 7² only;     mpm_sv2_resnet50: 7² + 14² with top-down
    mpm_sv3_notd_resnet50      three heads, no top-down path
    twostage_resnet50          Sitawarin-style: segmenter at 7² → softmax → 4×4 pool → small classifier
    *_tiny                     the same classes on a narrow ResNet (smoke profile)

Models take images in [0, 1] and normalise inside (a forward pre-hook on the backbone, so the
backbone's state_dict stays that of a plain timm ResNet). In training mode MPM returns
(logits, [part logits per scale, fine → coarse]); in eval mode only logits. `export_deployable`
drops the bypass: the result's state_dict loads into timm `resnet50` (GELU) with no missing or
unexpected keys. Object-mask supervision = any MPM with `seg_classes = num_classes + 1`.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import register_model
from timm.models.resnet import Bottleneck, ResNet

from .imagenet import IMAGENET_MEAN, IMAGENET_STD, normalise  # noqa: F401  (re-exported: models take [0, 1] images)

TINY_CHANNELS = (16, 32, 64, 128)  # ×4 bottleneck expansion → 512-d features


def _normalise_hook(module: nn.Module, args: tuple) -> tuple:
    return (normalise(args[0]),) + tuple(args[1:])


def resnet_gelu(num_classes: int = 1000, layers: tuple[int, ...] = (3, 4, 6, 3),
                channels: tuple[int, ...] = (64, 128, 256, 512), stem_width: int = 64, cardinality: int = 1,
                base_width: int = 64) -> ResNet:
    """A timm ResNet (Bottleneck; ResNeXt with `cardinality` groups of `base_width`) with GELU everywhere, taking
    [0, 1] images (normalised inside)."""
    net = ResNet(Bottleneck, layers, num_classes=num_classes, channels=channels, stem_width=stem_width, act_layer="gelu",
                 cardinality=cardinality, base_width=base_width)
    net.register_forward_pre_hook(_normalise_hook)
    return net


class SeparableConv(nn.Sequential):
    """Depthwise 3×3 → pointwise 1×1, no BN and no bias (the authors' `SeparableConv2d(..., bias=False)`;
    with it the R50 bypass at 3311 part classes has 4.524M parameters, facts §5b)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False), nn.Conv2d(cin, cout, 1, bias=False))


class PartBypass(nn.Module):
    """The multi-scale part branch. `scales` ⊆ {7, 14, 28} names the heads by their size at 224 input."""

    def __init__(self, feat_channels: tuple[int, int, int], seg_classes: int, scales: tuple[int, ...] = (28, 14, 7),
                 top_down: bool = True):
        super().__init__()
        c2, c3, c4 = feat_channels  # layer2, layer3, layer4 output channels (512, 1024, 2048 in R50)
        self.scales, self.top_down = tuple(sorted(scales, reverse=True)), top_down
        need = {7: 4, 14: 3, 28: 2}
        levels = {need[s] for s in scales} | ({4, 3} if top_down and 14 in scales else set())
        levels |= {4, 3, 2} if top_down and 28 in scales else set()
        dims = {2: c2 // 4, 3: c3 // 4, 4: c4 // 4}  # compact layers: a quarter of the channels
        self.compact = nn.ModuleDict({str(l): nn.Sequential(nn.Conv2d({2: c2, 3: c3, 4: c4}[l], dims[l], 1, bias=False),
                                                            nn.BatchNorm2d(dims[l])) for l in sorted(levels)})
        self.down = nn.ModuleDict()
        if top_down:  # GELU → separable conv halving channels → upsample → add
            for l in (4, 3):
                if str(l - 1) in self.compact:
                    self.down[str(l)] = nn.Sequential(nn.GELU(), SeparableConv(dims[l], dims[l] // 2))
        self.heads = nn.ModuleDict({str(s): nn.Sequential(nn.GELU(), SeparableConv(dims[need[s]], seg_classes))
                                    for s in self.scales})

    def forward(self, feats: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        p = {l: self.compact[str(l)](feats[l]) for l in (4, 3, 2) if str(l) in self.compact}
        if self.top_down:
            for l in (4, 3):
                if str(l) in self.down:
                    up = F.interpolate(self.down[str(l)](p[l]), size=p[l - 1].shape[-2:], mode="bilinear", align_corners=False)
                    p[l - 1] = p[l - 1] + up
        need = {7: 4, 14: 3, 28: 2}
        return [self.heads[str(s)](p[need[s]]) for s in self.scales]


class MPM(nn.Module):
    """Backbone classifier + part bypass. Eval: logits only (the bypass is not run)."""

    def __init__(self, backbone: ResNet, seg_classes: int, scales: tuple[int, ...] = (28, 14, 7), top_down: bool = True):
        super().__init__()
        self.backbone = backbone
        chans = tuple(backbone.feature_info[i]["num_chs"] for i in (2, 3, 4))
        self.bypass = PartBypass(chans, seg_classes, scales, top_down)
        self.seg_classes = seg_classes

    def features(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        b = self.backbone
        x = _normalise_hook(b, (x,))[0]  # the hook only runs through backbone.__call__
        x = b.maxpool(b.act1(b.bn1(b.conv1(x))))
        f2 = b.layer2(b.layer1(x))
        f3 = b.layer3(f2)
        return {2: f2, 3: f3, 4: b.layer4(f3)}

    def forward(self, x: torch.Tensor):
        if not self.training:
            return self.backbone(x)
        feats = self.features(x)
        return self.backbone.forward_head(feats[4]), self.bypass(feats)


class TwoStage(nn.Module):
    """Sitawarin-style two-stage model as the authors built it (`TwostagePartModel`, facts §5b):

        layer4 → GELU → BN → separable 3×3 (→ K part logits at 7²) → softmax → AdaptiveAvgPool 4×4
        → Conv 4×4 (K → C/4) → BN → GELU → Flatten → Linear (C/4 → C) → BN1d → GELU → Linear (C → classes)

    with C = 2048 in R50 (60.54M parameters at K = 3311, about twice MPM's 25.56M deployed). The classifier
    sees only the part masks, so nothing can be dropped at inference. Training mode returns
    (logits, [part logits]) like MPM; eval mode returns logits.
    """

    def __init__(self, backbone: ResNet, seg_classes: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.backbone.reset_classifier(0)  # its fc is unused
        c = backbone.num_features
        self.seg_head = nn.Sequential(nn.GELU(), nn.BatchNorm2d(c), SeparableConv(c, seg_classes))
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(4), nn.Conv2d(seg_classes, c // 4, 4), nn.BatchNorm2d(c // 4), nn.GELU(), nn.Flatten(),
            nn.Linear(c // 4, c), nn.BatchNorm1d(c), nn.GELU(), nn.Linear(c, num_classes))
        self.seg_classes = seg_classes

    def forward(self, x: torch.Tensor):
        seg = self.seg_head(self.backbone.forward_features(normalise(x)))  # the hook runs only through backbone.__call__
        logits = self.classifier(seg.softmax(1))
        return (logits, [seg]) if self.training else logits


def export_deployable(model: nn.Module) -> ResNet:
    """The classification path alone: a copy of the backbone (a plain timm ResNet, GELU)."""
    if isinstance(model, TwoStage):
        raise ValueError("the two-stage model classifies from its part masks; it has no bypass to drop")
    backbone = model.backbone if isinstance(model, MPM) else model
    return copy.deepcopy(backbone).eval()


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_flops(model: nn.Module, size: int = 224) -> int:
    """FLOPs of one forward pass of a 1 × 3 × size × size image, as torch's FlopCounterMode counts them (2 per
    multiply-add of convolutions and matrix products; normalisation, activations and pooling not counted)."""
    from torch.utils.flop_counter import FlopCounterMode
    was = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, size, size))
    model.train(was)
    return int(counter.get_total_flops())


def deployed_params(model: nn.Module) -> int:
    """Parameters used at inference (Table 7): MPM's backbone alone (the bypass is dropped); all of a
    plain or two-stage model."""
    return count_params(model.backbone if isinstance(model, MPM) else model)


_R50 = dict(layers=(3, 4, 6, 3), channels=(64, 128, 256, 512), stem_width=64)
_TINY = dict(layers=(1, 1, 1, 1), channels=TINY_CHANNELS, stem_width=16)
_RX50 = dict(_R50, cardinality=32, base_width=4)  # ResNeXt-50 32×4d (T-PIN++, App. F: Table A5's backbone)
ARCHS = {"r50": _R50, "tiny": _TINY, "rx50": _RX50}
VARIANTS = {  # name → (bypass scales, top-down) ; None = no bypass
    "plain": None, "mpm": ((28, 14, 7), True), "mpm_sv1": ((7,), False), "mpm_sv2": ((14, 7), True),
    "mpm_sv3_notd": ((28, 14, 7), False), "twostage": "twostage",
}


def _with_normalisation(net: nn.Module) -> nn.Module:
    net.register_forward_pre_hook(_normalise_hook)
    return net


def _tv_resnet50(num_classes: int) -> nn.Module:
    import torchvision
    return _with_normalisation(torchvision.models.resnet50(num_classes=num_classes))


def _half_normalise_hook(module: nn.Module, args: tuple) -> tuple:
    return ((args[0] - 0.5) / 0.5,) + tuple(args[1:])


def _resnet50_gelu_half(num_classes: int) -> nn.Module:
    """The GELU ResNet-50 normalising with mean = std = 0.5 (Bai et al. 2021's evaluation, ViTs-vs-CNNs
    `test_autoattack.py`), not ImageNet's: their weights only work with their normalisation."""
    net = ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, act_layer="gelu")
    net.register_forward_pre_hook(_half_normalise_hook)
    return net


# Public ResNet-50s of Table 3's reference rows (`zoo.py`), taking [0, 1] images like the kit's own models.
PUBLIC = {"tv_resnet50": _tv_resnet50,  # torchvision ResNet-50 (ReLU): RobustBench's ImageNet R50 entries
          "timm_resnet50": lambda n: _with_normalisation(ResNet(Bottleneck, [3, 4, 6, 3], num_classes=n)),  # timm, ReLU
          "resnet50_gelu": lambda n: resnet_gelu(n),
          "resnet50_gelu_half": _resnet50_gelu_half}


def build(variant: str, size: str = "r50", num_classes: int = 1000, seg_classes: int = 3311) -> nn.Module:
    """Create a model by variant ('plain', 'mpm', 'mpm_sv1', ..., or a `PUBLIC` architecture) and size ('r50', 'rx50'
    (ResNeXt-50 32×4d) or 'tiny'; public architectures are R50)."""
    if variant in PUBLIC:
        return PUBLIC[variant](num_classes)
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
    arch = ARCHS[size]
    backbone = resnet_gelu(num_classes, **arch)
    spec = VARIANTS[variant]
    if spec is None:
        return backbone
    if spec == "twostage":
        return TwoStage(backbone, seg_classes, num_classes)
    return MPM(backbone, seg_classes, *spec)


def _register(name: str, variant: str, size: str) -> None:
    def fn(pretrained: bool = False, num_classes: int = 1000, seg_classes: int = 3311, **kwargs) -> nn.Module:
        if pretrained:
            raise ValueError(f"{name}: no pretrained weights are published; train with `pinpp train`")
        return build(variant, size, num_classes, seg_classes)
    fn.__name__ = name
    fn.__doc__ = f"PIN++ {variant} model ({size})."
    register_model(fn)


for _v in VARIANTS:
    for _s, _suffix in (("r50", "resnet50"), ("tiny", "tiny"), ("rx50", "resnext50_32x4d")):
        _name = {"plain": {"r50": "resnet50_gelu", "tiny": "resnet_gelu_tiny", "rx50": "resnext50_32x4d_gelu"}[_s]}.get(_v, f"{_v}_{_suffix}")
        _register(_name, _v, _s)
