"""MPM's training loss as the authors compute it (paper §4.2; facts §5, §5b).

    L = CE_ls(logits, y)  +  λ · mean over heads of SoftFocal_γ(part logits, soft part targets)

Classification: cross-entropy with label smoothing s = 0.1 (timm's soft-target CE on the smoothed
one-hot, which equals `F.cross_entropy(..., label_smoothing=s)`). Part targets, as the authors' target
code builds them (`mixup_seg` with mixing off): the cropped mask is resized with PyTorch's legacy
`nearest` to the finest head (28² at 224 input), one-hot with the same smoothing (on = 1 − s + s/K,
off = s/K, K = part channels including background), then bilinearly downsampled (align_corners=False)
to each coarser head. Per pixel the soft cross-entropy ce = −Σ_c t_c·log p_c enters the focal form
(1 − e^(−ce))^γ · ce (their `SoftFocalLoss`, γ = 2); each image's map is multiplied by its weight
(0 when its mask is blank after the crop), averaged over B·H·W — blank images stay in the
denominator — and the heads are averaged. λ = 1.

Memory: ce is linear in the target, and each bilinear coarse target is a convex combination of at
most 2×2 fine one-hots, so with taps (y_k, w_k) the exact coarse ce is

    ce = −(1 − s)·Σ_k w_k·log p[y_k] − (s/K)·Σ_c log p_c,

a few gathers instead of a dense B×K×28² target (3311 classes × 784 pixels per image).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def target_at(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize an int64 (B, H, W) mask to `size` (the finest head) with PyTorch's legacy `nearest`
    (source pixel floor(i·H/h)), as the authors' `F.interpolate(seg, size, mode="nearest")`."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


def bilinear_taps(n_in: int, n_out: int, device: torch.device | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The two (source index, weight) taps per output pixel of 1-D bilinear resizing from `n_in` to `n_out`
    with align_corners=False, as `F.interpolate` computes them (source = (i + 0.5)·n_in/n_out − 0.5,
    clamped at 0; the upper tap stays at the edge)."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = torch.where(i0 < n_in - 1, i0 + 1, i0)
    w1 = (src - i0).clamp(0, 1)
    return [(i0.to(device), (1 - w1).float().to(device)), (i1.to(device), w1.float().to(device))]


def soft_ce_map(logits: torch.Tensor, fine: torch.Tensor, smoothing: float) -> torch.Tensor:
    """(B, h, w) soft cross-entropy of one head's logits (B, K, h, w) against the smoothed one-hot of the
    (B, H, W) finest-head labels `fine`, bilinearly downsampled to (h, w) — computed through the taps."""
    logp = F.log_softmax(logits.float(), dim=1)
    k, (h, w) = logp.shape[1], logp.shape[-2:]
    if tuple(fine.shape[-2:]) == (h, w):
        picked = logp.gather(1, fine[:, None]).squeeze(1)
    else:
        rows, cols = bilinear_taps(fine.shape[-2], h, fine.device), bilinear_taps(fine.shape[-1], w, fine.device)
        picked = torch.zeros_like(logp[:, 0])
        for ri, rw in rows:
            for ci, cw in cols:
                labels = fine[:, ri][:, :, ci]
                picked = picked + (rw[:, None] * cw[None, :]) * logp.gather(1, labels[:, None]).squeeze(1)
    return -(1 - smoothing) * picked - (smoothing / k) * logp.sum(1)


def part_loss(seg_logits: list[torch.Tensor], masks: torch.Tensor, seg_weight: torch.Tensor, gamma: float = 2.0,
              smoothing: float = 0.1) -> torch.Tensor:
    """The authors' part loss: soft focal per head, weighted per image, mean over B·H·W, mean over heads.
    `seg_logits` are ordered fine → coarse; `masks` are the crops' (B, H, W) part-id maps."""
    fine = target_at(masks, seg_logits[0].shape[-2:])
    w = seg_weight.float().view(-1, 1, 1)
    terms = []
    for s in seg_logits:
        ce = soft_ce_map(s, fine, smoothing)
        terms.append(((1 - torch.exp(-ce)) ** gamma * ce * w).mean())
    return torch.stack(terms).mean()


def mpm_loss(logits: torch.Tensor, seg_logits: list[torch.Tensor], labels: torch.Tensor, masks: torch.Tensor,
             seg_weight: torch.Tensor, lam: float = 1.0, gamma: float = 2.0,
             label_smoothing: float = 0.1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The total loss and its (detached) parts. `seg_logits` are ordered fine → coarse (as MPM returns them).

    The parts stay tensors so that a training step does not force a device sync; call .item() to log.
    """
    ce = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    if not seg_logits or lam == 0:
        return ce, {"ce": ce.detach(), "focal": torch.zeros((), device=ce.device)}
    focal = part_loss(seg_logits, masks, seg_weight, gamma, label_smoothing)
    return ce + lam * focal, {"ce": ce.detach(), "focal": focal.detach()}
