"""PGD-L∞ for adversarial training and as a fast (non-standard) evaluation (paper App. C).

ε and step sizes are in [0, 1] pixel units (models normalise inside). The attack runs with the
model in eval mode (BN uses running statistics; the paper's choice) and only on the classification
loss; gradients go to the input alone (`torch.autograd.grad`), so parameter .grad is untouched and
no DDP gradient sync is triggered.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Temporarily put `model` in eval mode, restoring its mode afterwards."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def pgd_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, step_size: float,
             random_start: bool = True, autocast: contextlib.AbstractContextManager | None = None) -> torch.Tensor:
    """L∞ PGD on cross-entropy: uniform start in the ε-ball, `steps` signed-gradient steps, projection."""
    x = x.detach()
    delta = torch.empty_like(x).uniform_(-eps, eps) if random_start else torch.zeros_like(x)
    x_adv = (x + delta).clamp(0, 1)
    with eval_mode(model):
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with autocast or contextlib.nullcontext():
                loss = F.cross_entropy(model(x_adv).float(), y)
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach() + step_size * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()
