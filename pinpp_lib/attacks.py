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
             random_start: bool = True, autocast: contextlib.AbstractContextManager | None = None,
             label_smoothing: float = 0.0, keep_best: bool = False) -> torch.Tensor:
    """L∞ PGD on cross-entropy: uniform start in the ε-ball, `steps` signed-gradient steps, projection.

    Training uses the authors' variant (`adv_utils.adv_generator`): the loss is the batch-mean CE on
    label-smoothed targets (`label_smoothing`), and with `keep_best` the returned batch is the iterate
    (start, after step 1, …, after the last step) whose batch-mean loss was highest — one more forward
    pass. A zero step size returns the random start itself (their first epoch: step size 0).
    """
    x = x.detach()
    delta = torch.empty_like(x).uniform_(-eps, eps) if random_start else torch.zeros_like(x)
    x_adv = (x + delta).clamp(0, 1)
    if step_size == 0:
        return x_adv  # every iterate equals the start
    best_x, best_loss = None, None

    def loss_of(inp: torch.Tensor) -> torch.Tensor:
        with autocast or contextlib.nullcontext():
            return F.cross_entropy(model(inp).float(), y, label_smoothing=label_smoothing)

    with eval_mode(model):
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = loss_of(x_adv)
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach()
            if keep_best:
                best_x, best_loss = _keep_higher(best_x, best_loss, x_adv, loss.detach())
            x_adv = x_adv + step_size * grad.sign()
            x_adv = ((x_adv - x).clamp(-eps, eps) + x).clamp(0, 1)  # the authors' LinfStep.project, to the bit
        if keep_best:
            with torch.no_grad():
                best_x, _ = _keep_higher(best_x, best_loss, x_adv, loss_of(x_adv))
            x_adv = best_x
    return x_adv.detach()


def _keep_higher(best_x: torch.Tensor | None, best_loss: torch.Tensor | None, x: torch.Tensor,
                 loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch with the strictly higher loss (ties keep the earlier one), without a host sync."""
    if best_x is None:
        return x, loss
    better = loss > best_loss
    return torch.where(better, x, best_x), torch.where(better, loss, best_loss)
