"""Training MPM and its baselines, clean or with PGD adversarial training (paper §4.2, App. C).

One implementation for the notebook, `pinpp train` and `torchrun -m pinpp_lib train` (DDP, one
process per GPU, multi-node via torchrun's rendezvous). Defaults = the paper's AT recipe, with the
details the paper leaves open taken from the authors' `adv_train.py` / `adv_utils.py` / configs
(facts §5b, §6; each choice and its alternative: docs/FIDELITY.md):

    PGD-L∞ ε 4/255, 2 steps of 4/255, uniform random start, model in eval mode while attacking, batch-mean
    CE on label-smoothed targets, the iterate with the highest batch loss kept; attack step size warmed up
    per epoch (0, ½, 1 over the first 2 epochs — epoch 0 trains on the random start alone); losses on x_adv;
    SGD (Nesterov, as timm's "sgd") momentum 0.9, lr 0.2 per 512 images (scaled linearly with the total
    batch), per-step warm-up from 1e-3 over 2 epochs, cosine to a floor of 1e-2; wd 1e-4 (not on BN/bias);
    EMA 0.9998 without warm-up (EMA weights are evaluated), label smoothing 0.1, λ = 1, γ = 2; BN statistics
    averaged over processes after each epoch; bf16 autocast on GPU, channels_last everywhere.
    Init stage (part models only; vanilla AT starts from the torchvision weights with their fc): 1 clean
    epoch with the backbone frozen, a new fc, random erasing 0.25, lr warming up from 1e-3 over 2 epochs
    (the authors' step schedule, cut after its first epoch), no EMA; the main stage's EMA starts from its result.

Part supervision reads `train/<seg_dir>`: real + pseudo (CF) labels by default (§4.2); a missing or
unfinished pseudo-label folder stops the run with one line (`datasets.require_train_labels`).

Resume: checkpoints every `ckpt_every` steps. Every random draw depends only on (seed, step) or
(seed, epoch, sample), so `--resume` after a kill ends with the same weights as an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from . import checkpoint, distributed, fileio, layout, models, store
from .attacks import pgd_linf
from .datasets import PartSegDataset, TransformConfig, fingerprint, require_train_labels, train_transform
from .checks import Checked, Rule, above, at_least, between, one_of
from .fileio import PinppError
from .losses import mpm_loss


@dataclass
class TrainConfig(Checked):
    """One training run. Defaults: the paper's AT recipe for MPM on ResNet-50-GELU (authors' code where the
    paper is silent; docs/FIDELITY.md)."""
    variant: str = "mpm"              # plain | mpm | mpm_sv1 | mpm_sv2 | mpm_sv3_notd | twostage
    arch: str = "r50"                 # r50 | rx50 (ResNeXt-50 32×4d, T-PIN++) | tiny
    object_mask: bool = False         # Table A4: object-mask supervision (num_classes + 1 seg classes)
    seg_dir: str = layout.TRAIN_SEG_DIR  # train/<seg_dir>: real + pseudo (CF) labels; "seg" = real only (ablation)
    epochs: int = 80
    batch_size: int = 64              # per process
    lr: float = 0.2                   # for a total batch of lr_ref_batch; scaled linearly
    lr_ref_batch: int = 512
    min_lr: float = 1e-2              # cosine floor (authors' AT configs; their clean configs: 1e-3)
    warmup_lr: float = 1e-3           # lr at the first step of the warm-up
    momentum: float = 0.9
    nesterov: bool = True             # timm's "sgd" (the authors' optimizer) is Nesterov SGD
    weight_decay: float = 1e-4
    warmup_epochs: float = 2.0
    ema_decay: float = 0.9998
    ema_warmup: bool = False          # the authors' ModelEmaV2 has none; True: timm ModelEma's ramp
    label_smoothing: float = 0.1
    lam: float = 1.0
    gamma: float = 2.0
    adversarial: bool = True
    eps: float = 4 / 255
    attack_steps: int = 2
    attack_step_size: float = 4 / 255
    attack_warmup_epochs: float = 2.0
    attack_warmup: str = "epoch"      # "epoch": step × min(e, W)/W per epoch e (authors); "step": linear per step
    attack_keep_best: bool = True     # keep the iterate with the highest batch loss (authors' use_best)
    attack_label_smoothing: float = 0.1  # the attack's CE targets (authors: their smoothed training targets)
    init: str = "torchvision_v2"      # none | torchvision_v2 | <path to a weights file>
    init_stage_epochs: int = 1        # clean epochs with the backbone frozen (heads only); 0 for vanilla AT
    init_stage_re_prob: float = 0.25  # random erasing in the init stage (authors' init config)
    amp: bool = True                  # bf16 autocast on CUDA (ignored on CPU)
    channels_last: bool = True        # NHWC activations and weights (GPU and CPU)
    sync_bn: bool = False
    dist_bn: bool = True              # average BN running statistics over processes after each epoch (timm "reduce")
    seed: int = 0
    ckpt_every: int = 1000            # steps
    workers: int = 8
    log_every: int = 10
    max_steps: int = 0                # rehearsal: stop each stage after this many steps (schedules keep their full length); 0: no cap
    transform: TransformConfig = field(default_factory=TransformConfig)

    LIMITS: ClassVar[dict[str, Rule]] = {
        "variant": one_of(*models.VARIANTS), "arch": one_of(*models.ARCHS), "epochs": at_least(0), "batch_size": at_least(1),
        "lr": above(0), "lr_ref_batch": at_least(1), "min_lr": at_least(0), "warmup_lr": at_least(0),
        "momentum": between(0, 1), "weight_decay": at_least(0), "warmup_epochs": at_least(0), "ema_decay": between(0, 1),
        "label_smoothing": between(0, 0.999), "lam": at_least(0), "gamma": at_least(0), "eps": at_least(0),
        "attack_steps": at_least(1), "attack_step_size": at_least(0), "attack_warmup_epochs": at_least(0),
        "attack_warmup": one_of("epoch", "step"), "attack_label_smoothing": between(0, 0.999),
        "init_stage_epochs": at_least(0), "init_stage_re_prob": between(0, 1), "ckpt_every": at_least(1),
        "workers": at_least(0), "log_every": at_least(1), "max_steps": at_least(0), "seed": at_least(0)}

    @property
    def part_supervised(self) -> bool:
        """Does this run read part masks (every variant but plain)?"""
        return self.variant != "plain"


class EpochSeeded(Dataset):
    """Seeds the augmentation RNG per (seed, epoch, sample): order of loading cannot change the data."""

    def __init__(self, base: Dataset, seed: int):
        self.base, self.seed, self.epoch = base, seed, 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        # The CPU generator only: torch.manual_seed would also queue a CUDA/XPU/MTIA seeding call with a formatted
        # stack trace in every process without CUDA (the loader workers) — ~1 ms and a few KB per sample, never freed.
        torch.random.default_generator.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i)
        return self.base[i]


def _seed_step(seed: int, cuda: bool) -> None:
    """Seed the generators a training step draws from (CPU, and the current GPU's), as torch.manual_seed does
    without its queue of deferred seeding calls for devices that are not initialised (see EpochSeeded)."""
    torch.random.default_generator.manual_seed(seed)
    if cuda:
        torch.cuda.manual_seed(seed)


def load_init(backbone: nn.Module, init: str, keep_fc: bool = True, arch: str = "r50") -> None:
    """Initialise the backbone: nothing, torchvision's V2 ImageNet weights of `arch` (ResNet-50 for r50, the §4.3
    init; ResNeXt-50 32×4d for rx50, T-PIN++'s Table A5), or a weights file.

    `keep_fc=False` leaves the classifier freshly initialised (the authors drop the fc before the part
    models' init stage); a classifier of another size is never loaded.
    """
    if init == "none":
        return
    if init == "torchvision_v2":
        weights = torchvision_v2_weights(arch)
        try:
            sd = weights.get_state_dict(progress=False)
        except Exception as e:  # offline: URLError/OSError/RuntimeError depending on where it fails
            raise PinppError(f"torchvision {arch} V2 weights are not cached and cannot be downloaded here "
                             f"({type(e).__name__}); put {weights.url.rsplit('/', 1)[1]} into $TORCH_HOME/hub/checkpoints/ "
                             "or train with init=none") from None
    else:
        sd = checkpoint.load(init)
    # torchvision and timm ResNets share key names.
    own = backbone.state_dict()
    sd = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape and (keep_fc or not k.startswith("fc."))}
    missing = [k for k in own if k not in sd and not k.startswith("fc.")]
    if missing:
        raise PinppError(f"{init}: does not fit the {type(backbone).__name__} backbone (missing e.g. {missing[0]})")
    backbone.load_state_dict(sd, strict=False)


def torchvision_v2_weights(arch: str) -> Any:
    """torchvision's IMAGENET1K_V2 weights enum of a kit architecture (no published weights for "tiny")."""
    from torchvision.models import ResNet50_Weights, ResNeXt50_32X4D_Weights
    table = {"r50": ResNet50_Weights.IMAGENET1K_V2, "rx50": ResNeXt50_32X4D_Weights.IMAGENET1K_V2}
    if arch not in table:
        raise PinppError(f"init=torchvision_v2: torchvision publishes no weights for arch {arch!r}; use init=none or a weights file")
    return table[arch]


def _param_groups(params: list[tuple[str, nn.Parameter]], wd: float) -> list[dict[str, Any]]:
    decay = [p for n, p in params if p.ndim > 1]
    no_decay = [p for n, p in params if p.ndim <= 1]  # BN and biases: no weight decay (timm's default)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def _head_names(model: nn.Module) -> set[str]:
    """Parameters trained in the init stage: classifier and part heads (everything but the backbone body)."""
    if isinstance(model, (models.MPM, models.TwoStage)):
        return {n for n, _ in model.named_parameters() if not n.startswith("backbone.") or n.startswith("backbone.fc.")}
    return {n for n, _ in model.named_parameters() if n.startswith("fc.")}


def lr_at(step: int, total: int, warmup: int, base: float, min_lr: float = 0.0, warmup_lr: float = 0.0) -> float:
    """timm's per-update CosineLRScheduler as the authors configure it (warmup_prefix off): a linear ramp
    warmup_lr → base over the first `warmup` steps, else min_lr + ½(base − min_lr)(1 + cos(π·step/total))."""
    if step < warmup:
        return warmup_lr + step * (base - warmup_lr) / warmup
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * step / max(1, total)))


def init_lr_at(step: int, warmup: int, base: float, warmup_lr: float) -> float:
    """The init stage's lr: timm's StepLRScheduler warm-up (warmup_lr → base over `warmup` steps), then
    constant — the authors' init config decays only after 5 epochs and trains one."""
    return warmup_lr + step * (base - warmup_lr) / warmup if step < warmup else base


def attack_step_at(cfg: TrainConfig, epoch: int, step_in_stage: int, steps_per_epoch: int) -> float:
    """The PGD step size of a main-stage step, warmed up over `attack_warmup_epochs`.

    "epoch" (authors' `train_one_epoch`): step × min(epoch, W) / (W + 1e-10), i.e. 0, ½, 1 for W = 2;
    "step": step × min(1, (s + 1) / (W · steps per epoch)), a per-step linear ramp.
    """
    w = cfg.attack_warmup_epochs
    if cfg.attack_warmup == "epoch":
        return cfg.attack_step_size * min(epoch, w) / (w + 1e-10)
    return cfg.attack_step_size * min(1.0, (step_in_stage + 1) / max(1, int(w * steps_per_epoch)))


def train_step(model: nn.Module, net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, m: torch.Tensor,
               y: torch.Tensor, w: torch.Tensor, cfg: TrainConfig, attack_step_size: float | None,
               autocast=contextlib.nullcontext) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """One optimisation step: PGD on the classification loss (unless `attack_step_size` is None; a step size
    of 0 still takes the random start), then the MPM loss on x_adv. `net` is the (possibly DDP-wrapped)
    model; the attack uses the bare `model`."""
    if attack_step_size is not None:
        x = pgd_linf(model, x, y, cfg.eps, cfg.attack_steps, attack_step_size, autocast=autocast(),
                     label_smoothing=cfg.attack_label_smoothing, keep_best=cfg.attack_keep_best)
    with autocast():
        outp = net(x)
    logits, segs = outp if isinstance(outp, tuple) else (outp, [])
    loss, parts = mpm_loss(logits, segs, y, m, w, cfg.lam, cfg.gamma, cfg.label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss, parts, logits


def _reduce_bn(module: nn.Module, world: int) -> None:
    """Average BN running statistics over the processes (timm `distribute_bn(..., reduce=True)`)."""
    for name, buf in module.named_buffers():
        if name.endswith(("running_mean", "running_var")):
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(world)


def _training_data(cfg: TrainConfig, data: str | Path) -> tuple[PartSegDataset, store.Identity]:
    """The run's training set (its part labels required first) and the run's identity."""
    if cfg.part_supervised:
        require_train_labels(data, cfg.seg_dir)
    base = PartSegDataset(data, object_mask=cfg.object_mask, seg_dir=cfg.seg_dir if cfg.part_supervised else None)
    return base, identity(cfg, base)


def finished(cfg: TrainConfig, data: str | Path, out: str | Path) -> dict[str, Any] | None:
    """The done record of the run at `out` if it finished with this config and these inputs (what `train` would
    return without training), else None."""
    return store.finished(Path(out), _training_data(cfg, data)[1])


def train(cfg: TrainConfig, data: str | Path, out: str | Path, resume: bool = True) -> dict[str, Any]:
    """Train one model on the converted data at `data`; write checkpoints and final weights to `out`."""
    out = Path(out)
    base, ident = _training_data(cfg, data)
    if resume:
        rec = store.finished(out, ident)
        if rec is not None:
            return rec
        why = store.stale(out, ident)
        if why:
            raise PinppError(f"{out}: holds a finished run whose {why}; delete the folder, choose another --work, "
                             "or pass --restart to retrain it")
    rank, world, device = distributed.setup()
    cuda = device.type == "cuda"
    ds = EpochSeeded(base, cfg.seed)
    num_classes = len(base.classes)
    seg_classes = num_classes + 1 if cfg.object_mask else base.num_parts + 1
    torch.manual_seed(cfg.seed)
    model = models.build(cfg.variant, cfg.arch, num_classes, seg_classes)
    stages = [("init", cfg.init_stage_epochs), ("main", cfg.epochs)]  # notebook 05's plan: no init stage for vanilla
    load_init(model.backbone if hasattr(model, "backbone") else model, cfg.init, keep_fc=stages[0][1] == 0, arch=cfg.arch)
    if cfg.sync_bn and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if cfg.channels_last:  # the authors' setting; on CPU oneDNN's convolutions are ~17% faster in it too
        model.to(memory_format=torch.channels_last)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if (cuda and cfg.amp) else contextlib.nullcontext

    steps_per_epoch = len(ds) // (cfg.batch_size * world)
    if steps_per_epoch == 0:
        raise PinppError(f"{data}: {len(ds)} training images are fewer than one batch of {cfg.batch_size} x {world}")
    lr = cfg.lr * cfg.batch_size * world / cfg.lr_ref_batch
    warmup_steps = int(cfg.warmup_epochs * steps_per_epoch)
    state = checkpoint.latest(out) if resume else None
    pos = {"stage": 0, "epoch": 0, "batch": 0, "step": 0} if state is None else state["pos"]
    log: list[dict[str, float]] = [] if state is None else list(state["log"])
    if state is not None and state.get("identity") != ident.sha256:
        raise PinppError(f"{out}: its checkpoints come from another config, other data or other init weights; "
                         "delete the folder or pass --restart")
    ema, opt = None, None  # the main stage's EMA starts from the init stage's result (authors: a separate run without EMA)
    if state is not None:
        model.load_state_dict(state["model"])
        if state["ema"] is not None:
            ema = checkpoint.EMA(model, cfg.ema_decay, cfg.ema_warmup)
            ema.load_state_dict(state["ema"])

    for si, (stage, n_epochs) in enumerate(stages):
        if si < pos["stage"] or n_epochs == 0:
            continue
        heads_only = stage == "init"
        if not heads_only and ema is None:
            ema = checkpoint.EMA(model, cfg.ema_decay, cfg.ema_warmup)
        base.transform = train_transform(dataclasses.replace(cfg.transform, re_prob=cfg.init_stage_re_prob)
                                         if heads_only else cfg.transform)
        heads = _head_names(model)
        for n, p in model.named_parameters():
            p.requires_grad_(not heads_only or n in heads)
        opt = torch.optim.SGD(_param_groups([(n, p) for n, p in model.named_parameters() if p.requires_grad], cfg.weight_decay),
                              lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
        if state is not None and si == pos["stage"]:
            opt.load_state_dict(state["optimizer"])
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None) if world > 1 else model
        total = n_epochs * steps_per_epoch
        first_epoch = pos["epoch"] if si == pos["stage"] else 0
        for epoch in range(first_epoch, n_epochs):
            n_steps = steps_per_epoch if not cfg.max_steps else min(steps_per_epoch, cfg.max_steps - epoch * steps_per_epoch)
            if n_steps <= 0:
                break  # rehearsal cap reached: the rest of the stage's schedule is not run
            ds.epoch = epoch + 1000 * si
            sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed + si, drop_last=True)
            sampler.set_epoch(epoch)
            skip = pos["batch"] if (si == pos["stage"] and epoch == pos["epoch"]) else 0
            order = list(sampler)[skip * cfg.batch_size: n_steps * cfg.batch_size]
            loader = DataLoader(ds, batch_size=cfg.batch_size, sampler=order, num_workers=cfg.workers,
                                pin_memory=cuda, drop_last=True)
            bar = tqdm(loader, desc=f"{stage} epoch {epoch + 1}/{n_epochs}", disable=rank != 0, leave=False)
            for b, (x, m, y, w) in enumerate(bar, start=skip):
                step_in_stage = epoch * steps_per_epoch + b
                _seed_step(cfg.seed * 1_000_003 + pos["step"], cuda)  # PGD start etc.: a function of the step
                x, m, y, w = (t.to(device, non_blocking=True) for t in (x, m, y, w))
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                step_lr = (init_lr_at(step_in_stage, warmup_steps, lr, cfg.warmup_lr) if heads_only else
                           lr_at(step_in_stage, total, warmup_steps, lr, cfg.min_lr, cfg.warmup_lr))
                for g in opt.param_groups:
                    g["lr"] = step_lr
                attack = (attack_step_at(cfg, epoch, step_in_stage, steps_per_epoch)
                          if cfg.adversarial and not heads_only else None)
                loss, parts, logits = train_step(model, net, opt, x, m, y, w, cfg, attack, autocast)
                if ema is not None:
                    ema.update(model)
                pos = {"stage": si, "epoch": epoch, "batch": b + 1, "step": pos["step"] + 1}
                if pos["step"] % cfg.log_every == 0:
                    log.append({"step": pos["step"], "stage": si, "lr": step_lr, "loss": loss.item(),
                                **{k: v.item() for k, v in parts.items()},
                                "train_acc": (logits.argmax(1) == y).float().mean().item()})
                    bar.set_postfix(loss=f"{loss.item():.3f}")
                if pos["step"] % cfg.ckpt_every == 0 and rank == 0:
                    _save_checkpoint(out, model, ema, opt, pos, log, ident)
            if world > 1 and cfg.dist_bn:
                for mod in (model, ema.module if ema else None):
                    if mod is not None:
                        _reduce_bn(mod, world)
            pos = {"stage": si, "epoch": epoch + 1, "batch": 0, "step": pos["step"]}
        pos = {"stage": si + 1, "epoch": 0, "batch": 0, "step": pos["step"]}
        state = None

    result: dict[str, Any] = {}
    if rank == 0:
        if opt is not None:  # trained now: the final state is kept as the only resume point, so that final
            _save_checkpoint(out, model, ema, opt, pos, log, ident, keep=1)  # weights gone missing are rewritten from it
        final = ema.module if ema is not None else model
        meta = {"variant": cfg.variant, "arch": cfg.arch, "num_classes": num_classes, "seg_classes": seg_classes,
                "classes": base.classes, "steps": pos["step"], "config": _jsonable(cfg),
                "params": models.count_params(model), "deployable_params": models.deployed_params(model)}
        w = checkpoint.save_weights(out / "ema", {k: v.cpu() for k, v in final.state_dict().items()}, meta)
        fileio.write_json(out / "train_log.json", log)
        sha = fileio.read_json(out / "ema.json")["sha256"]  # save_weights' sidecar
        result = store.finish(out, ident, [w], {**meta, "weights": str(w), "sha256": sha, "out": str(out)})
    if dist.is_initialized():
        dist.barrier()
    return result if rank == 0 else store.read(out)


def _save_checkpoint(out: Path, model: nn.Module, ema: checkpoint.EMA | None, opt: torch.optim.Optimizer,
                     pos: dict[str, int], log: list, ident: store.Identity, keep: int = 2) -> None:
    checkpoint.save(out, {"model": model.state_dict(), "ema": ema.state_dict() if ema else None, "optimizer": opt.state_dict(),
                          "pos": pos, "log": log, "identity": ident.sha256}, pos["step"], keep)


def identity(cfg: TrainConfig, data: PartSegDataset) -> store.Identity:
    """What a run's weights depend on: its config, the training data (`datasets.fingerprint`) and the bytes of
    its init weights (a kit run's weights file, a user's file; torchvision's are fixed by their hash-suffixed
    name — the rehearsal's stand-in of that name lives in its own data root, so its runs never meet real ones)."""
    init = cfg.init if cfg.init in ("none", "torchvision_v2") else fileio.sha256_file(_existing(cfg.init, "init weights"))
    settings = _jsonable(cfg)
    if not cfg.max_steps:
        settings.pop("max_steps")  # added later: uncapped runs keep the identity they had before
    return store.Identity("mpm-train", settings, {**fingerprint(data), "init": init})


def _existing(path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise PinppError(f"{p}: {what} not found; check the path (--set init=...) or use init=none / torchvision_v2")
    return p


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
