"""MPM's training loss (paper §4.2; facts §5).

    L = CE_ls(logits, y)  +  λ · mean_over_scales FocalLoss_γ(part logits, targets)

CE uses label smoothing 0.1; focal γ = 2, λ = 1. Targets: the part mask nearest-resized to the finest
head (28² at 224 input), one-hot, then bilinearly downsampled to the coarser heads (14², 7²). Images
whose mask is blank get zero weight in the focal term.

The coarse targets are soft. With K + 1 = 3311 classes a dense one-hot at 28² would take
B·3311·784 floats, so `focal_loss` uses the identity that bilinear downsampling by an even integer
factor f (align_corners=False) averages exactly 2×2 source pixels per output pixel, at offsets
f/2 − 1 and f/2: the focal loss against the soft target equals the mean of the focal losses against
those four hard labels. `dense_focal_loss` is the literal (memory-hungry) definition, kept for tests.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def target_at(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-resize an int64 (B, H, W) mask to `size` (the finest head's resolution)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask[:, None].float(), size=size, mode="nearest-exact")[:, 0].long()


def _focal_terms(logp: torch.Tensor, labels: torch.Tensor, gamma: float) -> torch.Tensor:
    """−(1 − p_y)^γ log p_y per pixel, for hard labels (B, h, w) and log-probs (B, C, h, w)."""
    lp = logp.gather(1, labels[:, None]).squeeze(1)
    return -((1 - lp.exp()).clamp(min=0) ** gamma) * lp


def focal_loss(logits: torch.Tensor, fine: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Per-image focal loss (B,) of one head against the bilinearly downsampled one-hot of `fine`.

    `fine` is the (B, H, W) hard target at the finest head; `logits` is (B, C, H/f, W/f), f ∈ {1, 2, 4, ...}.
    """
    logp = F.log_softmax(logits.float(), dim=1)
    h, w = logits.shape[-2:]
    fh, fw = fine.shape[-2] // h, fine.shape[-1] // w
    if (fh, fw) == (1, 1):
        return _focal_terms(logp, fine, gamma).flatten(1).mean(1)
    if fh != fw or fh % 2 or fine.shape[-2] != fh * h or fine.shape[-1] != fw * w:
        raise ValueError(f"focal targets: finest head {tuple(fine.shape[-2:])} is not an even multiple of {(h, w)}")
    taps = (fh // 2 - 1, fh // 2)
    terms = [_focal_terms(logp, fine[:, a::fh, b::fw][:, :h, :w], gamma) for a in taps for b in taps]
    return torch.stack(terms).mean(0).flatten(1).mean(1)


def dense_focal_loss(logits: torch.Tensor, fine: torch.Tensor, num_classes: int, gamma: float = 2.0) -> torch.Tensor:
    """The literal definition: one-hot at the finest scale, bilinear downsampling, soft-target focal."""
    onehot = F.one_hot(fine, num_classes).permute(0, 3, 1, 2).float()
    target = F.interpolate(onehot, size=logits.shape[-2:], mode="bilinear", align_corners=False)
    logp = F.log_softmax(logits.float(), dim=1)
    return (-(target * (1 - logp.exp()) ** gamma * logp).sum(1)).flatten(1).mean(1)


def mpm_loss(logits: torch.Tensor, seg_logits: list[torch.Tensor], labels: torch.Tensor, masks: torch.Tensor,
             seg_weight: torch.Tensor, lam: float = 1.0, gamma: float = 2.0,
             label_smoothing: float = 0.1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The total loss and its (detached) parts. `seg_logits` are ordered fine → coarse (as MPM returns them).

    The parts stay tensors so that a training step does not force a device sync; call .item() to log.
    """
    ce = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    if not seg_logits or lam == 0:
        return ce, {"ce": ce.detach(), "focal": torch.zeros((), device=ce.device)}
    fine = target_at(masks, seg_logits[0].shape[-2:])
    per_image = torch.stack([focal_loss(s, fine, gamma) for s in seg_logits]).mean(0)  # mean over scales
    w = seg_weight.to(per_image.dtype)
    focal = (per_image * w).sum() / w.sum().clamp(min=1.0)  # blank masks: zero weight
    return ce + lam * focal, {"ce": ce.detach(), "focal": focal.detach()}
