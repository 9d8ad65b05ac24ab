"""Training MPM and its baselines, clean or with PGD adversarial training (paper §4.2, App. C).

One implementation for the notebook, `pinpp train` and `torchrun -m pinpp_lib train` (DDP, one
process per GPU, multi-node via torchrun's rendezvous). Recipe defaults = the paper's AT recipe:

    PGD-L∞ ε 4/255, 2 steps of 4/255, random start, step size warmed up over 2 epochs, model in eval
    mode while attacking, attack on the classification loss, losses on x_adv;
    SGD 0.9, lr 0.2 per 512 images (scaled linearly with the total batch), cosine, 2 warm-up epochs,
    wd 1e-4 (not on BN/bias), EMA 0.9998 (EMA weights are evaluated), label smoothing 0.1, λ = 1, γ = 2,
    bf16 autocast + channels_last on GPU; init stage: 1 clean epoch with the backbone frozen.

Resume: checkpoints every `ckpt_every` steps. Every random draw depends only on (seed, step) or
(seed, epoch, sample), so `--resume` after a kill ends with the same weights as an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from . import checkpoint, fileio, models
from .attacks import pgd_linf
from .datasets import PartSegDataset, TransformConfig, train_transform
from .fileio import PinppError
from .losses import mpm_loss


@dataclass
class TrainConfig:
    """One training run. Defaults: the paper's AT recipe for MPM on ResNet-50-GELU."""
    variant: str = "mpm"              # plain | mpm | mpm_sv1 | mpm_sv2 | mpm_sv3_notd | twostage
    arch: str = "r50"                 # r50 | tiny
    object_mask: bool = False         # Table A4: object-mask supervision (num_classes + 1 seg classes)
    seg_dir: str = "seg"              # train/<seg_dir>: real labels, or real + pseudo (notebook 04)
    epochs: int = 80
    batch_size: int = 64              # per process
    lr: float = 0.2                   # for a total batch of lr_ref_batch; scaled linearly
    lr_ref_batch: int = 512
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 2.0
    ema_decay: float = 0.9998
    label_smoothing: float = 0.1
    lam: float = 1.0
    gamma: float = 2.0
    adversarial: bool = True
    eps: float = 4 / 255
    attack_steps: int = 2
    attack_step_size: float = 4 / 255
    attack_warmup_epochs: float = 2.0
    init: str = "torchvision_v2"      # none | torchvision_v2 | <path to a weights file>
    init_stage_epochs: int = 1        # clean epochs with the backbone frozen (heads only)
    amp: bool = True                  # bf16 autocast on CUDA (ignored on CPU)
    channels_last: bool = True        # CUDA only
    sync_bn: bool = False
    seed: int = 0
    ckpt_every: int = 1000            # steps
    workers: int = 8
    log_every: int = 10
    transform: TransformConfig = field(default_factory=TransformConfig)


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun: init the process group (NCCL on GPU, else gloo)."""
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


class EpochSeeded(Dataset):
    """Seeds the augmentation RNG per (seed, epoch, sample): order of loading cannot change the data."""

    def __init__(self, base: Dataset, seed: int):
        self.base, self.seed, self.epoch = base, seed, 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i)
        return self.base[i]


def load_init(backbone: nn.Module, init: str) -> None:
    """Initialise the backbone: nothing, torchvision's ResNet-50 V2 weights, or a weights file."""
    if init == "none":
        return
    if init == "torchvision_v2":
        from torchvision.models import ResNet50_Weights
        try:
            sd = ResNet50_Weights.IMAGENET1K_V2.get_state_dict(progress=False)
        except Exception as e:  # offline: URLError/OSError/RuntimeError depending on where it fails
            raise PinppError("torchvision ResNet-50 V2 weights are not cached and cannot be downloaded here "
                             f"({type(e).__name__}); put resnet50-11ad3fa6.pth into $TORCH_HOME/hub/checkpoints/ "
                             "or train with init=none") from None
    else:
        sd = checkpoint.load(init)
    # torchvision and timm ResNets share key names; a classifier of another size is skipped.
    own = backbone.state_dict()
    sd = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in sd and not k.startswith("fc.")]
    if missing:
        raise PinppError(f"{init}: does not fit the {type(backbone).__name__} backbone (missing e.g. {missing[0]})")
    backbone.load_state_dict(sd, strict=False)


def _param_groups(params: list[tuple[str, nn.Parameter]], wd: float) -> list[dict[str, Any]]:
    decay = [p for n, p in params if p.ndim > 1]
    no_decay = [p for n, p in params if p.ndim <= 1]  # BN and biases: no weight decay (timm's default)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def _head_names(model: nn.Module) -> set[str]:
    """Parameters trained in the init stage: classifier and part heads (everything but the backbone body)."""
    if isinstance(model, (models.MPM, models.TwoStage)):
        return {n for n, _ in model.named_parameters() if not n.startswith("backbone.") or n.startswith("backbone.fc.")}
    return {n for n, _ in model.named_parameters() if n.startswith("fc.")}


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up to `base`, then cosine to 0 (per step)."""
    if step < warmup:
        return base * (step + 1) / warmup
    return 0.5 * base * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_step(model: nn.Module, net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, m: torch.Tensor,
               y: torch.Tensor, w: torch.Tensor, cfg: TrainConfig, attack_step_size: float,
               autocast=contextlib.nullcontext) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """One optimisation step: PGD on the classification loss (if attack_step_size > 0), then the MPM
    loss on x_adv. `net` is the (possibly DDP-wrapped) model; the attack uses the bare `model`."""
    if attack_step_size > 0:
        x = pgd_linf(model, x, y, cfg.eps, cfg.attack_steps, attack_step_size, autocast=autocast())
    with autocast():
        outp = net(x)
    logits, segs = outp if isinstance(outp, tuple) else (outp, [])
    loss, parts = mpm_loss(logits, segs, y, m, w, cfg.lam, cfg.gamma, cfg.label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss, parts, logits


def train(cfg: TrainConfig, data: str | Path, out: str | Path, resume: bool = True) -> dict[str, Any]:
    """Train one model on the converted data at `data`; write checkpoints and final weights to `out`."""
    out = Path(out)
    done = out / "done.json"
    wanted = json.loads(json.dumps(_jsonable(cfg)))
    if done.exists() and resume:
        old = fileio.read_json(done)
        if old["config"] != wanted:
            raise PinppError(f"{out}: holds a finished run with another config; delete the folder, "
                             "choose another --work, or pass --restart")
        return old
    rank, world, device = setup_distributed()
    cuda = device.type == "cuda"
    tcfg = cfg.transform
    base = PartSegDataset(data, train_transform(tcfg), object_mask=cfg.object_mask, seg_dir=cfg.seg_dir)
    ds = EpochSeeded(base, cfg.seed)
    num_classes = len(base.classes)
    seg_classes = num_classes + 1 if cfg.object_mask else base.num_parts + 1
    torch.manual_seed(cfg.seed)
    model = models.build(cfg.variant, cfg.arch, num_classes, seg_classes)
    load_init(model.backbone if hasattr(model, "backbone") else model, cfg.init)
    if cfg.sync_bn and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if cuda and cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    ema = checkpoint.EMA(model, cfg.ema_decay)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if (cuda and cfg.amp) else contextlib.nullcontext

    steps_per_epoch = len(ds) // (cfg.batch_size * world)
    if steps_per_epoch == 0:
        raise PinppError(f"{data}: {len(ds)} training images are fewer than one batch of {cfg.batch_size} x {world}")
    stages = [("init", cfg.init_stage_epochs), ("main", cfg.epochs)]
    lr = cfg.lr * cfg.batch_size * world / cfg.lr_ref_batch
    state = checkpoint.latest(out) if resume else None
    pos = {"stage": 0, "epoch": 0, "batch": 0, "step": 0} if state is None else state["pos"]
    log: list[dict[str, float]] = [] if state is None else list(state["log"])
    if state is not None and state["config"] != wanted:
        raise PinppError(f"{out}: its checkpoints come from another config; delete the folder or pass --restart")
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])

    for si, (stage, n_epochs) in enumerate(stages):
        if si < pos["stage"] or n_epochs == 0:
            continue
        heads_only = stage == "init"
        heads = _head_names(model)
        for n, p in model.named_parameters():
            p.requires_grad_(not heads_only or n in heads)
        opt = torch.optim.SGD(_param_groups([(n, p) for n, p in model.named_parameters() if p.requires_grad], cfg.weight_decay),
                              lr=lr, momentum=cfg.momentum, nesterov=False)
        if state is not None and si == pos["stage"]:
            opt.load_state_dict(state["optimizer"])
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None) if world > 1 else model
        total = n_epochs * steps_per_epoch
        first_epoch = pos["epoch"] if si == pos["stage"] else 0
        for epoch in range(first_epoch, n_epochs):
            ds.epoch = epoch + 1000 * si
            sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed + si, drop_last=True)
            sampler.set_epoch(epoch)
            skip = pos["batch"] if (si == pos["stage"] and epoch == pos["epoch"]) else 0
            order = list(sampler)[skip * cfg.batch_size: steps_per_epoch * cfg.batch_size]
            loader = DataLoader(ds, batch_size=cfg.batch_size, sampler=order, num_workers=cfg.workers,
                                pin_memory=cuda, drop_last=True)
            bar = tqdm(loader, desc=f"{stage} epoch {epoch + 1}/{n_epochs}", disable=rank != 0, leave=False)
            for b, (x, m, y, w) in enumerate(bar, start=skip):
                step_in_stage = epoch * steps_per_epoch + b
                torch.manual_seed(cfg.seed * 1_000_003 + pos["step"])  # PGD start etc.: a function of the step
                x, m, y, w = (t.to(device, non_blocking=True) for t in (x, m, y, w))
                if cuda and cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                for g in opt.param_groups:
                    g["lr"] = lr if heads_only else lr_at(step_in_stage, total, int(cfg.warmup_epochs * steps_per_epoch), lr)
                warm = max(1, int(cfg.attack_warmup_epochs * steps_per_epoch))
                ss = cfg.attack_step_size * min(1.0, (step_in_stage + 1) / warm)
                loss, parts, logits = train_step(model, net, opt, x, m, y, w, cfg, ss if cfg.adversarial and not heads_only else 0.0,
                                                 autocast)
                ema.update(model)
                pos = {"stage": si, "epoch": epoch, "batch": b + 1, "step": pos["step"] + 1}
                if pos["step"] % cfg.log_every == 0:
                    log.append({"step": pos["step"], "stage": si, "lr": opt.param_groups[0]["lr"], "loss": loss.item(),
                                **{k: v.item() for k, v in parts.items()},
                                "train_acc": (logits.argmax(1) == y).float().mean().item()})
                    bar.set_postfix(loss=f"{loss.item():.3f}")
                if pos["step"] % cfg.ckpt_every == 0 and rank == 0:
                    checkpoint.save(out, {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                                          "pos": pos, "log": log, "config": _jsonable(cfg)}, pos["step"])
            pos = {"stage": si, "epoch": epoch + 1, "batch": 0, "step": pos["step"]}
        pos = {"stage": si + 1, "epoch": 0, "batch": 0, "step": pos["step"]}
        state = None

    result: dict[str, Any] = {}
    if rank == 0:
        meta = {"variant": cfg.variant, "arch": cfg.arch, "num_classes": num_classes, "seg_classes": seg_classes,
                "classes": base.classes, "steps": pos["step"], "config": _jsonable(cfg),
                "params": models.count_params(model), "deployable_params": models.count_params(
                    model.backbone if isinstance(model, models.MPM) else model)}
        w = checkpoint.save_weights(out / "ema", {k: v.cpu() for k, v in ema.module.state_dict().items()}, meta)
        fileio.write_json(out / "train_log.json", log)
        result = {**meta, "weights": str(w), "out": str(out)}
        fileio.write_json(done, result, indent=1)
        for ck in out.glob("ckpt_*.pt"):  # resume points are moot once the final weights exist
            ck.unlink()
        (out / "latest.json").unlink(missing_ok=True)
    if dist.is_initialized():
        dist.barrier()
    return result if rank == 0 else fileio.read_json(done)


def _jsonable(cfg: TrainConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["transform"] = {k: list(v) if isinstance(v, tuple) else v for k, v in d["transform"].items()}
    return d


def load_trained(out: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The EMA model of a finished run (eval mode), and its metadata."""
    meta = fileio.read_json(Path(out) / "ema.json", "trained model", "train it first (`pinpp train`)")
    m = models.build(meta["variant"], meta["arch"], meta["num_classes"], meta["seg_classes"])
    m.load_state_dict(checkpoint.load(Path(out) / meta["weights"], meta["sha256"]))
    return m.to(device).eval(), meta
