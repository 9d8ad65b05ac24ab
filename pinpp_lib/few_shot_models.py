"""Few-shot models (paper §6): ResNet-12, part branches, Meta-Baseline and DeepEMD scoring.

    Meta-Baseline (Chen et al.)  a classifier-pre-trained encoder; an episode scores a query by the
                                 cosine similarity to each class centroid of the support features, times
                                 a learnable temperature.
    object+part                  the paper: M part branches (Conv3×3–ReLU–MaxPool stacks, independent weights)
                                 on the M part crops; the feature is a learned convex combination (softmax
                                 weights, so they are positive and sum to 1) of the image feature and the
                                 M part features — the weights are reported. The authors' code: one part
                                 crop through their CNN, mixed as p · image + (1 − p) · part (`mix="p"`).
    DeepEMD (Zhang et al.)       each image is a set of region features (random patches = object; part
                                 boxes = object+part); a query and a class are compared by the earth mover's
                                 distance between their sets with cross-reference weights, solved exactly
                                 (POT's network simplex); as in DeepEMD's OpenCV path, the flow is a
                                 constant in the backward pass. k-shot: the class's set is the union of
                                 its supports' regions.

Models take [0, 1] images and normalise inside.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .imagenet import normalise


class ResBlock12(nn.Module):
    """ResNet-12 block: three Conv3×3–BN–LeakyReLU(0.1), a 1×1 shortcut, 2×2 max-pooling."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        layers = []
        for i in range(3):
            layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)]
            if i < 2:
                layers.append(nn.LeakyReLU(0.1))
        self.body = nn.Sequential(*layers)
        self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(F.leaky_relu(self.body(x) + self.short(x), 0.1))


class ResNet12(nn.Module):
    """ResNet-12 (channels 64-160-320-640 in the papers) → global average pooled feature."""

    def __init__(self, channels: tuple[int, ...] = (64, 160, 320, 640)):
        super().__init__()
        chans = (3,) + tuple(channels)
        self.blocks = nn.Sequential(*[ResBlock12(a, b) for a, b in zip(chans[:-1], chans[1:])])
        self.out_dim = channels[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(normalise(x)).mean((2, 3))


class PartBranch(nn.Sequential):
    """Conv3×3–ReLU–MaxPool stacks ending in the encoder's feature size, global average pooled."""

    def __init__(self, channels: tuple[int, ...]):
        chans = (3,) + tuple(channels)
        layers: list[nn.Module] = []
        for a, b in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(a, b, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        super().__init__(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(normalise(x)).mean((2, 3))


class AuthorsPartCNN(nn.Module):
    """The part encoder of the authors' Meta-Baseline (`models/resnet12.py`, class `CNN`): two stages of
    2 × (Conv3×3 – BN – ReLU) + MaxPool 2 (64, 128 channels), then an MLP 256 – 256 – D with ReLU and dropout 0.5
    (its first layer takes 128 · (size/4)²: 51,200 at their 80 px)."""

    def __init__(self, size: int, out_dim: int):
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in ((3, 64), (64, 128)):
            layers += [nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(),
                       nn.Conv2d(b, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(), nn.MaxPool2d(2)]
        self.convs = nn.Sequential(*layers)
        self.mlp = nn.Sequential(nn.Linear(128 * (size // 4) ** 2, 256), nn.ReLU(), nn.Dropout(0.5),
                                 nn.Linear(256, 256), nn.ReLU(), nn.Dropout(0.5), nn.Linear(256, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.convs(normalise(x)).flatten(1))


class FewShotNet(nn.Module):
    """Encoder (+ part networks on part crops, mixed with the image feature). `forward(x, parts)` → (B, D).

    mix="convex" (the paper): M `PartBranch`es, feature = Σ w_i f_i over (image, part 1..M) with w = softmax of
    learned logits (positive, summing to 1; equal at the start).
    mix="p" (the authors' code): one `AuthorsPartCNN` on one part crop, feature = p · f_image + (1 − p) · f_part
    with one unconstrained learnable scalar p, 0 at the start (their `ResNet12.forward`)."""

    def __init__(self, channels: tuple[int, ...], m_parts: int = 0, branch_channels: tuple[int, ...] = (32, 64, 128),
                 mix: str = "convex", size: int = 80):
        super().__init__()
        if mix not in ("convex", "p"):
            raise ValueError(f"mix={mix!r}: 'convex' or 'p'")
        self.mix = mix
        self.encoder = ResNet12(channels)
        if mix == "p" and m_parts:
            self.branches = nn.ModuleList([AuthorsPartCNN(size, channels[-1])])
            self.p = nn.Parameter(torch.tensor(0.0))
        else:
            self.branches = nn.ModuleList(PartBranch(tuple(branch_channels) + (channels[-1],)) for _ in range(m_parts))
            self.mix_logits = nn.Parameter(torch.zeros(m_parts + 1))  # equal weights at the start
        self.temperature = nn.Parameter(torch.tensor(10.0))       # Meta-Baseline's learnable τ

    @property
    def out_dim(self) -> int:
        return self.encoder.out_dim

    def mix_weights(self) -> torch.Tensor:
        """Weights of (image, part 1, ..., part M): convex (positive, summing to 1), or (p, 1 − p)."""
        return torch.stack([self.p, 1 - self.p]) if self.mix == "p" else self.mix_logits.softmax(0)

    def forward(self, x: torch.Tensor, parts: torch.Tensor | None = None) -> torch.Tensor:
        f = self.encoder(x)
        if not len(self.branches):
            return f
        if parts is None or parts.shape[1] < len(self.branches):
            raise ValueError(f"this model needs {len(self.branches)} part crops per image")
        w = self.mix_weights()
        return w[0] * f + sum(w[i + 1] * br(parts[:, i]) for i, br in enumerate(self.branches))

    def regions(self, crops: torch.Tensor) -> torch.Tensor:
        """DeepEMD nodes: the encoder's feature of each region crop, (B, K, 3, S, S) → (B, K, D)."""
        b, k = crops.shape[:2]
        return self.encoder(crops.flatten(0, 1)).view(b, k, -1)


def centroid_scores(support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, n_way: int,
                    temperature: torch.Tensor) -> torch.Tensor:
    """Meta-Baseline logits: τ · cos(query, class centroid of the supports), (Q, n_way)."""
    cent = torch.stack([support[support_y == c].mean(0) for c in range(n_way)])
    return temperature * F.normalize(query, dim=-1) @ F.normalize(cent, dim=-1).T


def emd_flow(a: np.ndarray, b: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Exact optimal transport plan between weights a (n) and b (m) (each summing to 1) for `cost` (n×m)."""
    import ot
    return ot.emd(np.ascontiguousarray(a, np.float64), np.ascontiguousarray(b, np.float64),
                  np.ascontiguousarray(cost, np.float64))


def _cross_weights(nodes: torch.Tensor, other: torch.Tensor) -> np.ndarray:
    """DeepEMD's cross-reference weights: relu(node · mean of the other set), normalised to sum 1."""
    w = F.relu(nodes @ other.mean(0)).detach().double().cpu().numpy() + 1e-5
    return w / w.sum()


def emd_similarity(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Σ flow ⊙ cos(q_i, c_j) with the exact EMD flow (cost 1 − cos), differentiable in the features."""
    sim = F.normalize(q, dim=-1) @ F.normalize(c, dim=-1).T
    flow = emd_flow(_cross_weights(q, c), _cross_weights(c, q), (1 - sim).detach().double().cpu().numpy())
    return (torch.from_numpy(flow).to(sim) * sim).sum()


def emd_scores(support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, n_way: int,
               temperature: float = 12.5) -> torch.Tensor:
    """DeepEMD logits (Q, n_way): node sets (·, K, D); a class's set = all regions of its supports."""
    classes = [support[support_y == c].flatten(0, 1) for c in range(n_way)]
    return temperature * torch.stack([torch.stack([emd_similarity(q, c) for c in classes]) for q in query])
