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
                                 constant in the backward pass; nodes centred, weights as the authors' fork
                                 (`Models/models/Network.py`, `emd_utils.py`). k-shot: its structured FC
                                 prototypes fine-tuned on the supports (or the union of their regions).

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


# DeepEMD's loaders normalise with CIFAR's statistics (`transforms.Normalize([125.3, 123.0, 113.9] / 255,
# [63.0, 62.1, 66.7] / 255)` in every Models/dataloader/*); Meta-Baseline's with ImageNet's
CIFAR_MEAN, CIFAR_STD = tuple(v / 255 for v in (125.3, 123.0, 113.9)), tuple(v / 255 for v in (63.0, 62.1, 66.7))


class ResNet12(nn.Module):
    """ResNet-12 (channels 64-160-320-640 in the papers) → global average pooled feature. `stats`: the pixel
    statistics it normalises [0, 1] inputs with, "imagenet" or "cifar" (DeepEMD's)."""

    def __init__(self, channels: tuple[int, ...] = (64, 160, 320, 640), stats: str = "imagenet"):
        super().__init__()
        chans = (3,) + tuple(channels)
        self.blocks = nn.Sequential(*[ResBlock12(a, b) for a, b in zip(chans[:-1], chans[1:])])
        self.out_dim = channels[-1]
        if stats not in ("imagenet", "cifar"):
            raise ValueError(f"stats={stats!r}: 'imagenet' or 'cifar'")
        self.stats = stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stats == "cifar":
            x = (x - x.new_tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / x.new_tensor(CIFAR_STD).view(1, 3, 1, 1)
        else:
            x = normalise(x)
        return self.blocks(x).mean((2, 3))


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
                 mix: str = "convex", size: int = 80, stats: str = "imagenet"):
        super().__init__()
        if mix not in ("convex", "p"):
            raise ValueError(f"mix={mix!r}: 'convex' or 'p'")
        self.mix = mix
        self.encoder = ResNet12(channels, stats)
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
    """Exact optimal transport plan between weights a (n) and b (m) (each summing to 1) for `cost` (n×m).

    POT's network simplex called directly (`ot.lp.emd_wrap.emd_c`, what `ot.emd` runs after its backend and marginal
    checks, ~10× less overhead: DeepEMD's structured FC solves ~14,000 of these small problems per 5-shot episode);
    `ot.emd` where the solver does not report an optimum."""
    from ot.lp.emd_wrap import emd_c
    a, b, cost = (np.ascontiguousarray(t, np.float64) for t in (a, b, cost))
    b = b * (a.sum() / b.sum())  # equal masses to the last bit, as ot.emd makes them (else: infeasible)
    flow, _, _, _, code = emd_c(a, b, cost, 100000, 1)
    if code != 1:  # not optimal (iteration limit, unbounded): POT's checked path, which warns
        import ot
        return ot.emd(a, b, cost)
    return flow


def _centre(x: torch.Tensor) -> torch.Tensor:
    """DeepEMD's `normalize_feature` ("center", its default): each node minus its mean over the channels."""
    return x - x.mean(-1, keepdim=True)


def emd_weights(nodes: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Cross-reference weights of `nodes` (…, K, D) against the sets `other` (…, L, D), on the raw features:
    relu(node · mean of the other set) + 1e-3 (`get_weight_vector`), then relu + 1e-5 and normalised
    (`emd_inference_opencv`: to sum K; here to sum 1 — with its temperature / K the logits are the same)."""
    w = F.relu(torch.einsum("...kd,...d->...k", nodes, other.mean(-2))) + 1e-3
    w = F.relu(w) + 1e-5
    return w / w.sum(-1, keepdim=True)


def emd_logits(query: torch.Tensor, protos: torch.Tensor, temperature: float = 12.5) -> torch.Tensor:
    """DeepEMD's `emd_forward_1shot`: logits (Q, P) of query node sets (Q, K, D) against prototype node sets
    (P, L, D) — temperature · Σ flow ⊙ cos, the cosine between centred nodes, the flow the exact optimal transport
    between the cross-reference weights for cost 1 − cos (POT's network simplex; a constant in the backward pass,
    as the code's OpenCV solver)."""
    qn, pn = F.normalize(_centre(query), dim=-1), F.normalize(_centre(protos), dim=-1)
    sim = torch.einsum("qkd,pld->qpkl", qn, pn)
    nq, np_ = len(query), len(protos)
    wq = emd_weights(query[:, None].expand(nq, np_, *query.shape[1:]), protos[None].expand(nq, np_, *protos.shape[1:]))
    wp = emd_weights(protos[None].expand(nq, np_, *protos.shape[1:]), query[:, None].expand(nq, np_, *query.shape[1:]))
    wq, wp, cost = (t.detach().double().cpu().numpy() for t in (wq, wp, 1 - sim))
    flow = np.stack([emd_flow(wq[i, j], wp[i, j], cost[i, j]) for i in range(nq) for j in range(np_)])
    return temperature * (torch.from_numpy(flow).to(sim).view_as(sim) * sim).sum((-1, -2))


def emd_similarity(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Σ flow ⊙ cos(q_i, c_j) of two node sets (K, D), (L, D) (`emd_logits` at temperature 1)."""
    return emd_logits(q[None], c[None], 1.0)[0, 0]


def sfc_prototypes(support: torch.Tensor, support_y: torch.Tensor, n_way: int, temperature: float = 12.5,
                   steps: int = 100, lr: float = 0.1, batch: int = 4,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """DeepEMD's k-shot structured fully connected layer (`get_sfc`): per class the node-wise mean of its supports'
    node sets, then fine-tuned on the (detached) supports — `steps` passes over a random permutation in batches of
    `batch`, cross-entropy of `emd_logits(batch, prototypes)`, SGD lr `lr`, momentum 0.9, dampening 0.9, no weight
    decay. Returns the prototypes (n_way, K, D), detached (the encoder gets no gradient through them, as in the code)."""
    sup = support.detach()
    protos = torch.stack([sup[support_y == c].mean(0) for c in range(n_way)]).clone().requires_grad_(True)
    opt = torch.optim.SGD([protos], lr=lr, momentum=0.9, dampening=0.9, weight_decay=0)
    with torch.enable_grad():
        for _ in range(steps):
            perm = torch.randperm(len(sup), generator=generator).to(sup.device)
            for j in range(0, len(sup), batch):
                idx = perm[j:j + batch]
                loss = F.cross_entropy(emd_logits(sup[idx], protos, temperature), support_y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    return protos.detach()


def emd_scores(support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, n_way: int,
               temperature: float = 12.5, kshot: str = "sfc", sfc: dict | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """DeepEMD logits (Q, n_way) of node sets (·, K, D). One shot: a class is its support's set. k shots:
    "sfc" — the code's structured FC prototypes (`sfc_prototypes`, settings `sfc`); "nodes" — the union of the
    supports' nodes as one set."""
    shot = int((support_y == 0).sum())
    if shot == 1:
        protos = torch.stack([support[support_y == c][0] for c in range(n_way)])
    elif kshot == "sfc":
        protos = sfc_prototypes(support, support_y, n_way, temperature, generator=generator, **(sfc or {}))
    else:
        protos = torch.stack([support[support_y == c].flatten(0, 1) for c in range(n_way)])
    return emd_logits(query, protos, temperature)
