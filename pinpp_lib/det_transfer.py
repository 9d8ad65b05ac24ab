"""Robust detection transfer (paper App. E, Table A3): Faster R-CNN R50-FPN on the PIN++ classifiers' backbones,
adversarially trained downstream and attacked on its classification and box losses.

The recipe is Li et al.'s ("On the Importance of Backbone to the Adversarial Robustness of Object Detectors", the
paper's [advod]; code thu-ml/oddefense @f147296, `frcnn/faster_rcnn_r50_fpn_1x_coco_freeat_all.py` on mmdet 2.28),
restated on mmdet 3 (docs/FIDELITY.md, App. E):

    training   free adversarial training (Shafahi et al.): each batch replayed `free_m` = 4 times; one noise tensor in
               pixel units, kept across batches (resized to each batch, nearest), updated after every replay by
               noise ← clip(noise + ε·sign(∇ₓ(RoI loss_cls + loss_bbox)), ±ε), ε = 4; the images are
               clamp(x + noise, 0, 255) (`AdvOptimizerHook`, `BaseDetector.train_step`, `AdvEpochBasedRunner`)
    schedule   times·12/free_m = 6 epochs, ×0.1 from epoch 5, linear warm-up over 125 batches from 0.001; AdamW lr 1e-4,
               weight decay 0.1, backbone lr ×0.1 (decay ×1, norms included: mmcv's custom keys win over
               norm_decay_mult 0), gradient norm clipped at 100; 2 images per GPU on 8 GPUs, 1333×800, flip 0.5;
               backbone stages 0-1 frozen, BatchNorm in eval mode; RoI losses clipped at 6 (`det_models`)
    test       PGD on the RoI classification ("cls") or box ("reg") loss: 10 steps of 1, ε = 4 pixel units, from the
               clean image, on the padded batch of one image (`mmdet/apis/test.py` `cal_adv`); COCO box AP/AP50
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import checkpoint, fileio, store
from .checks import Checked, Rule, above, all_of, at_least, between, device_name, each, one_of, ordered
from .fileio import PinppError

MEAN, STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)  # mmdet's ImageNet statistics, RGB, pixel units
ROWS = ("clean", "vanilla AT", "MPM AT")  # Table A3's backbones: the reference and notebook 05's two AT models
ATTACKS = ("cls", "reg")                  # oddefense's test_adv_cfg adv_type values for Faster R-CNN


@dataclass
class DetConfig(Checked):
    """Table A3's settings. Defaults: oddefense's Faster R-CNN config (see the module docstring)."""
    dataset: str = "coco"        # "coco": <data root>/coco (COCO 2017) | "pinpp_objects": the converted release's object boxes
    rows: tuple[str, ...] = ROWS
    clean_init: str = "torchvision://resnet50"  # reference row: mmdet's ImageNet R50 (ReLU) | "clean_run": notebook 05's
    arch: str = "r50"            # classifier backbone ("tiny": the smoke classifiers)
    width: float = 1.0           # channel multiplier of the FPN and heads (1.0: the published detector)
    scale: tuple[int, int] = (1333, 800)
    flip: float = 0.5
    batch_size: int = 16         # total over all processes (oddefense: 2 per GPU)
    epochs: int = 6              # times · 12 / free_m with times = 2
    lr_steps: tuple[int, ...] = (5,)  # epochs at which the lr drops ×0.1 (times · 10 // free_m)
    warmup_iters: int = 125      # batches (int(500 / free_m)); a batch's replays share its lr
    warmup_ratio: float = 0.001
    lr: float = 1e-4
    backbone_lr_mult: float = 0.1
    weight_decay: float = 0.1
    norm_decay: float = 0.0      # norm layers outside the backbone (Faster R-CNN R50-FPN has none)
    grad_clip: float = 100.0
    frozen_stages: int = 1
    roi_loss_clip: float = 6.0
    rois_per_image: int = 512
    free_m: int = 4
    epsilon: float = 4.0         # pixel units (of 255)
    attacks: tuple[str, ...] = ATTACKS
    attack_steps: int = 10
    attack_step: float = 1.0
    attack_epsilon: float = 4.0
    train_images: int = 0        # smoke/rehearsal: the first N training images; 0: all
    eval_images: int = 0         # smoke/rehearsal: the first N evaluation images; 0: all
    workers: int = 2
    seed: int = 0
    jobs: int = 1
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    LIMITS: ClassVar[dict[str, Rule]] = {
        "dataset": one_of("coco", "pinpp_objects"), "rows": each(one_of(*ROWS)), "arch": one_of("r50", "tiny"),
        "width": above(0), "flip": between(0, 1), "batch_size": at_least(1), "epochs": at_least(1),
        "lr_steps": all_of(each(at_least(0)), ordered), "warmup_iters": at_least(0), "warmup_ratio": between(0, 1), "lr": above(0),
        "backbone_lr_mult": at_least(0), "weight_decay": at_least(0), "norm_decay": at_least(0), "grad_clip": above(0),
        "frozen_stages": at_least(-1), "roi_loss_clip": above(0), "rois_per_image": at_least(1), "free_m": at_least(1),
        "epsilon": at_least(0), "attacks": each(one_of(*ATTACKS)), "attack_steps": at_least(0), "attack_step": at_least(0),
        "attack_epsilon": at_least(0), "train_images": at_least(0), "eval_images": at_least(0), "workers": at_least(0),
        "seed": at_least(0), "jobs": at_least(1), "device": device_name}


@dataclass(frozen=True)
class DetData:
    """A detection dataset in COCO format: training and evaluation annotation files and image folders."""
    train_ann: Path
    train_img: Path
    val_ann: Path
    val_img: Path


def data_files(dc: DetConfig, data_root: str | Path, converted: str | Path) -> DetData:
    """Where Table A3's detection data lives; one line naming the expected layout when it is not there."""
    if dc.dataset == "pinpp_objects":
        bench = Path(converted) / "seg_benchmark"
        d = DetData(bench / "objects_train.json", Path(converted) / "train" / "img", bench / "objects_val.json",
                    Path(converted) / "train" / "img")
        fix = "run notebook 00 (`pinpp prepare`) first"
    else:
        root = Path(data_root) / "coco"
        d = DetData(root / "annotations" / "instances_train2017.json", root / "train2017",
                    root / "annotations" / "instances_val2017.json", root / "val2017")
        fix = (f"expected COCO 2017 at {root}/: annotations/instances_train2017.json, annotations/instances_val2017.json, "
               "train2017/, val2017/ (cocodataset.org)")
    for p in (d.train_ann, d.val_ann):
        if not p.is_file():
            raise PinppError(f"{p}: detection annotations not found; {fix}")
    for p in (d.train_img, d.val_img):
        if not p.is_dir():
            raise PinppError(f"{p}: detection images not found; {fix}")
    return d


def model_config(dc: DetConfig, num_classes: int, backbone: dict[str, Any]) -> dict[str, Any]:
    """mmdet 3 Faster R-CNN R50-FPN as oddefense's base (`configs/_base_/models/faster_rcnn_r50_fpn.py`), with the
    classifier backbone, the RoI-loss clip and `width` applied to the FPN and heads."""
    c = lambda n: max(8, int(round(n * dc.width)))  # noqa: E731
    from .det_models import stage_channels
    coder = lambda stds: dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=stds)  # noqa: E731
    return dict(
        type="FasterRCNN",
        data_preprocessor=dict(type="DetDataPreprocessor", mean=list(MEAN), std=list(STD), bgr_to_rgb=True, pad_size_divisor=32),
        backbone=dict(type="ClassifierResNet", arch=dc.arch, frozen_stages=dc.frozen_stages, norm_eval=True, **backbone),
        neck=dict(type="FPN", in_channels=stage_channels(dc.arch), out_channels=c(256), num_outs=5),
        rpn_head=dict(type="RPNHead", in_channels=c(256), feat_channels=c(256),
                      anchor_generator=dict(type="AnchorGenerator", scales=[8], ratios=[0.5, 1.0, 2.0], strides=[4, 8, 16, 32, 64]),
                      bbox_coder=coder([1.0] * 4), loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
                      loss_bbox=dict(type="L1Loss", loss_weight=1.0)),
        roi_head=dict(type="ClippedLossRoIHead",
                      bbox_roi_extractor=dict(type="SingleRoIExtractor", roi_layer=dict(type="RoIAlign", output_size=7, sampling_ratio=0),
                                              out_channels=c(256), featmap_strides=[4, 8, 16, 32]),
                      bbox_head=dict(type="Shared2FCBBoxHead", in_channels=c(256), fc_out_channels=c(1024), roi_feat_size=7,
                                     num_classes=num_classes, bbox_coder=coder([0.1, 0.1, 0.2, 0.2]), reg_class_agnostic=False,
                                     loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
                                     loss_bbox=dict(type="L1Loss", loss_weight=1.0))),
        train_cfg=dict(
            rpn=dict(assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3, match_low_quality=True,
                                   ignore_iof_thr=-1),
                     sampler=dict(type="RandomSampler", num=256, pos_fraction=0.5, neg_pos_ub=-1, add_gt_as_proposals=False),
                     allowed_border=-1, pos_weight=-1, debug=False),
            rpn_proposal=dict(nms_pre=2000, max_per_img=1000, nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0),
            rcnn=dict(assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5, match_low_quality=False,
                                    ignore_iof_thr=-1),
                      sampler=dict(type="RandomSampler", num=dc.rois_per_image, pos_fraction=0.25, neg_pos_ub=-1, add_gt_as_proposals=True),
                      pos_weight=-1, debug=False, clip=dc.roi_loss_clip)),
        test_cfg=dict(rpn=dict(nms_pre=1000, max_per_img=1000, nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0),
                      rcnn=dict(score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5), max_per_img=100)))


def dataset(dc: DetConfig, ann: Path, img: Path, train: bool):
    """An mmdet CocoDataset with oddefense's pipeline (test: no flip, annotations kept for the attacks)."""
    from mmdet.registry import DATASETS
    from mmengine.registry import init_default_scope
    init_default_scope("mmdet")
    cats = tuple(c["name"] for c in sorted(fileio.read_json(ann, "COCO annotation file", "re-create it")["categories"],
                                           key=lambda c: c["id"]))
    pipe = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True),
            dict(type="Resize", scale=tuple(dc.scale), keep_ratio=True)]
    pipe += [dict(type="RandomFlip", prob=dc.flip)] if train else []
    pipe += [dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor", "flip",
                                                   "flip_direction"))]
    n = dc.train_images if train else dc.eval_images
    return DATASETS.build(dict(type="CocoDataset", ann_file=str(ann), data_prefix=dict(img=str(img) + "/"), metainfo=dict(classes=cats),
                               filter_cfg=dict(filter_empty_gt=True, min_size=32) if train else None, test_mode=not train,
                               pipeline=pipe, indices=n or None))


def group_batches(flags: np.ndarray, per_batch: int, rng: np.random.RandomState) -> list[list[int]]:
    """mmdet 2's GroupSampler: images grouped by orientation (flag 1: wider than tall), each group shuffled and filled
    up to a multiple of the batch with random repeats of its own images, batches in random order (all full)."""
    indices = []
    for g, size in enumerate(np.bincount(flags)):
        if size == 0:
            continue
        idx = np.where(flags == g)[0]
        rng.shuffle(idx)
        extra = int(np.ceil(size / per_batch)) * per_batch - len(idx)
        indices.append(np.concatenate([idx, rng.choice(idx, extra)]))
    flat = np.concatenate(indices)
    return [flat[i * per_batch:(i + 1) * per_batch].tolist() for i in rng.permutation(len(flat) // per_batch)]


def lr_factor(it: int, epoch: int, dc: DetConfig) -> float:
    """mmcv's step policy with linear warm-up: base × 0.1^(#steps passed) at epoch `epoch`, and during the first
    `warmup_iters` batches (k = (1 − it/warmup) · (1 − ratio)) × (1 − k)."""
    regular = 0.1 ** sum(epoch >= s for s in dc.lr_steps)
    if it >= dc.warmup_iters:
        return regular
    return regular * (1 - (1 - it / dc.warmup_iters) * (1 - dc.warmup_ratio))


def param_groups(model: torch.nn.Module, dc: DetConfig) -> list[dict[str, Any]]:
    """mmcv's DefaultOptimizerConstructor with custom_keys {"backbone": lr ×mult, decay ×1} and norm_decay_mult: a
    parameter whose name holds "backbone" takes the custom key's multipliers (norms included); other norm layers'
    parameters take `norm_decay`; everything else the base lr and decay."""
    groups = []
    for mname, module in model.named_modules():
        is_norm = isinstance(module, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm))
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if "backbone" in f"{mname}.{pname}":
                groups.append(dict(params=[p], lr=dc.lr * dc.backbone_lr_mult, weight_decay=dc.weight_decay))
            else:
                groups.append(dict(params=[p], lr=dc.lr, weight_decay=dc.weight_decay * (dc.norm_decay if is_norm else 1.0)))
    for g in groups:
        g["initial_lr"] = g["lr"]
    return groups


def _pixel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1), torch.tensor(STD, device=x.device).view(1, 3, 1, 1))


def free_at_step(model, batch: dict, noise: torch.Tensor | None, dc: DetConfig, opt: torch.optim.Optimizer,
                 world: int = 1) -> tuple[torch.Tensor, dict[str, float]]:
    """One replay of a batch: train on clamp(x + noise) and return the updated noise (pixel units) and the losses."""
    x, samples = batch["inputs"], batch["data_samples"]
    mean, std = _pixel_stats(x)
    noise = torch.zeros_like(x) if noise is None else F.interpolate(noise, size=x.shape[-2:])
    aux = ((torch.clamp(x * std + mean + noise, 0, 255) - mean) / std).detach().requires_grad_()
    losses = model.loss(aux, samples)
    total, log = model.parse_losses(losses)
    opt.zero_grad(set_to_none=True)
    grad = torch.autograd.grad(losses["loss_cls"] + losses["loss_bbox"], aux, retain_graph=True)[0]
    total.backward()
    noise = torch.clamp(noise + dc.epsilon * torch.sign(grad), -dc.epsilon, dc.epsilon).detach()
    if world > 1:  # gradients averaged over the processes (every BatchNorm is in eval mode: nothing else to sync)
        for p in model.parameters():
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= world
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad and p.grad is not None], dc.grad_clip)
    opt.step()
    return noise, {k: float(v) for k, v in log.items()}


def pgd(model, x: torch.Tensor, samples: list, kind: str, steps: int, step: float, eps: float) -> torch.Tensor:
    """oddefense's `cal_adv`: sign-gradient ascent on the RoI "cls" or "reg" loss in pixel space from the clean image,
    projected to the ε-ball and [0, 255] after each step; returns the normalised adversarial batch."""
    mean, std = _pixel_stats(x)
    img = (x * std + mean).detach()
    adv = img.clone()
    key = {"cls": "loss_cls", "reg": "loss_bbox"}[kind]
    for _ in range(steps):
        adv.requires_grad_()
        loss = model.loss((adv - mean) / std, samples)[key].sum()
        g = torch.autograd.grad(loss, adv)[0]
        adv = torch.clamp(torch.min(torch.max(adv.detach() + step * torch.sign(g), img - eps), img + eps), 0, 255)
    return ((adv - mean) / std).detach()


def _identity(dc: DetConfig, row: str, init: str, data: DetData) -> store.Identity:
    """A run: its training settings, the backbone's weights and the training file (not the device, workers or test
    settings)."""
    keep = {k: v for k, v in dataclasses.asdict(dc).items()
            if k not in ("rows", "clean_init", "attacks", "attack_steps", "attack_step", "attack_epsilon", "eval_images",
                         "workers", "jobs", "device")}
    from .det_models import resolve_weights
    return store.Identity("det-train", {"row": row, "det": keep, "init": init if "://" in init else Path(init).name},
                          {"backbone": fileio.sha256_file(resolve_weights(init)), "train_file": fileio.sha256_file(data.train_ann)})


def build_detector(dc: DetConfig, num_classes: int, init: str, act: str):
    """The Faster R-CNN of a row, weights initialised as mmdet does (backbone from the classifier's file)."""
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope
    from . import det_models  # noqa: F401  (registers ClassifierResNet and ClippedLossRoIHead)
    from mmengine.config import ConfigDict
    init_default_scope("mmdet")
    model = MODELS.build(ConfigDict(model_config(dc, num_classes, dict(act=act, init=init))))
    model.init_weights()
    return model


def train(dc: DetConfig, row: str, init: str, act: str, data: DetData, out: str | Path) -> dict[str, Any]:
    """Free-AT training of one row's detector (resumable per epoch; reused when finished with the same identity;
    a folder of another identity is refused). Under torchrun each process takes its share of every step's batches."""
    from mmengine.dataset import pseudo_collate
    from . import distributed
    out = Path(out)
    ident = _identity(dc, row, init, data)
    done = store.finished(out, ident)
    if done is not None:
        return done
    why = store.stale(out, ident)
    if why:
        raise PinppError(f"{out}: holds a detector of another configuration ({why}); delete the folder or choose another work dir")
    rank, world, dev = distributed.setup()
    dev = dev if world > 1 else torch.device(dc.device)
    if dc.batch_size % world:
        raise PinppError(f"det.batch_size {dc.batch_size} does not split over {world} processes; choose a multiple")
    ds = dataset(dc, data.train_ann, data.train_img, train=True)
    infos = [ds.get_data_info(i) for i in range(len(ds))]
    flags = np.array([int(info["width"] / info["height"] > 1) for info in infos])
    torch.manual_seed(dc.seed)
    model = build_detector(dc, len(ds.metainfo["classes"]), init, act).to(dev)
    opt = torch.optim.AdamW(param_groups(model, dc), lr=dc.lr, betas=(0.9, 0.999), weight_decay=dc.weight_decay)
    state = checkpoint.latest(out / "ckpt")
    epoch, it, noise, t0 = 0, 0, None, time.time()
    if state is not None and state.get("identity") == ident.sha256:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        epoch, it, noise = state["epoch"], state["it"], state["noise"]
    log: dict[str, float] = {}
    while epoch < dc.epochs:
        model.train()
        steps = group_batches(flags, dc.batch_size // world, np.random.RandomState(dc.seed + epoch))
        mine = steps[rank::world][:len(steps) // world]  # one batch per process per step
        torch.manual_seed(dc.seed * 1000 + epoch)  # the samplers' draws and the flips of this epoch
        np.random.seed(dc.seed * 1000 + epoch)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=mine, collate_fn=pseudo_collate, num_workers=dc.workers,
                                             worker_init_fn=_seed_worker)
        for data_batch in tqdm(loader, desc=f"{row}: epoch {epoch + 1}/{dc.epochs}", disable=rank > 0):
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * lr_factor(it, epoch, dc)
            batch = model.data_preprocessor(data_batch, training=True)
            for _ in range(dc.free_m):  # one noise tensor over every replay and batch
                noise, log = free_at_step(model, batch, noise, dc, opt, world)
            it += 1
        epoch += 1
        if rank == 0:
            checkpoint.save(out / "ckpt", {"identity": ident.sha256, "model": model.state_dict(), "opt": opt.state_dict(),
                                           "epoch": epoch, "it": it, "noise": noise}, epoch)
    result: dict[str, Any] = {}
    if rank == 0:
        meta = {"row": row, "init": init, "act": act, "classes": list(ds.metainfo["classes"]), "epochs": dc.epochs,
                "iters": it, "train_seconds": round(time.time() - t0, 1), "processes": world, "last_losses": log}
        w = checkpoint.save_weights(out / "weights", model.state_dict(), meta)
        result = store.finish(out, ident, [w], {**fileio.read_json(out / "weights.json"), "out": str(out)})
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return result if rank == 0 else store.read(out)


def _seed_worker(_: int) -> None:
    np.random.seed(torch.initial_seed() % 2 ** 32)  # mmcv's random flips draw from numpy; each worker its own stream


def load_detector(run: dict, dc: DetConfig):
    """A finished row's detector (eval mode) as it was trained, its weights' sha256 checked."""
    trained = run["settings"]["det"]
    model = build_detector(dataclasses.replace(dc, **{k: trained[k] for k in ("arch", "width", "rois_per_image", "roi_loss_clip")}),
                           len(run["classes"]), "", run["act"])
    model.load_state_dict(checkpoint.load(Path(run["out"]) / run["weights"], run["sha256"]))
    return model.to(dc.device).eval()


def detections(run: dict, dc: DetConfig, data: DetData, attack: str | None) -> list[dict]:
    """COCO detections of a row's detector on the evaluation images, clean (`attack` None) or under PGD on its "cls" or
    "reg" loss; cached in the run folder, reused for the same weights, evaluation file and attack settings."""
    name = f"detections_{attack or 'clean'}.json"
    settings = {"attack": attack, "eval_images": dc.eval_images, "scale": list(dc.scale), "seed": dc.seed}
    if attack:
        settings.update(steps=dc.attack_steps, step=dc.attack_step, eps=dc.attack_epsilon)
    ident = store.Identity("det-eval", settings, {"model": run["sha256"], "eval_file": fileio.sha256_file(data.val_ann)})
    done = store.finished(run["out"], ident, name)
    if done is not None:
        return done["detections"]
    from mmengine.dataset import pseudo_collate
    model = load_detector(run, dc)
    ds = dataset(dc, data.val_ann, data.val_img, train=False)
    cat_ids = list(ds.cat_ids)  # mmdet's own label → category id map (the file's ids in `classes` order)
    dets: list[dict] = []
    t0 = time.time()
    for i in tqdm(range(len(ds)), desc=f"{run['row']}: {attack or 'clean'}"):
        batch = model.data_preprocessor(pseudo_collate([ds[i]]), training=False)  # one image per batch, as oddefense tests
        x, samples = batch["inputs"], batch["data_samples"]
        if attack:
            torch.manual_seed(dc.seed + i)  # the RPN's and RoI sampler's draws inside the attack's losses
            x = pgd(model, x, samples, attack, dc.attack_steps, dc.attack_step, dc.attack_epsilon)
        with torch.no_grad():
            pred = model.predict(x, samples, rescale=True)[0].pred_instances
        for box, score, label in zip(pred.bboxes.tolist(), pred.scores.tolist(), pred.labels.tolist()):
            dets.append({"image_id": samples[0].img_id, "category_id": cat_ids[label], "score": round(score, 5),
                         "bbox": [round(box[0], 2), round(box[1], 2), round(box[2] - box[0], 2), round(box[3] - box[1], 2)]})
    store.finish(run["out"], ident, [], {"images": len(ds), "seconds": round(time.time() - t0, 1), "detections": dets}, name)
    return dets


def evaluate(runs: dict[str, dict], dc: DetConfig, data: DetData) -> pd.DataFrame:
    """One record per row and evaluation (clean, then each attack): COCO box AP and AP50 in %."""
    from .seg_eval import coco_evaluate
    ids = None
    if dc.eval_images:  # the images scored: those `detections` ran on
        ds = dataset(dc, data.val_ann, data.val_img, train=False)
        ids = [int(ds.get_data_info(i)["img_id"]) for i in range(len(ds))]
    rows = []
    for row, run in runs.items():
        for attack in (None, *dc.attacks):
            summary, _ = coco_evaluate(data.val_ann, detections(run, dc, data, attack), "bbox", ids)
            rows.append({"backbone": row, "evaluation": "clean" if attack is None else f"A_{attack}", **summary,
                         "images": len(ids) if ids else None})
    return pd.DataFrame(rows)


def table_a3(records: pd.DataFrame) -> pd.DataFrame:
    """Table A3's layout: a row per backbone, AP and AP50 for clean images and under each attack."""
    wide = records.pivot(index="backbone", columns="evaluation", values=["AP", "AP50"])
    order = [e for e in ("clean", *(f"A_{a}" for a in ATTACKS)) if e in set(records.evaluation)]
    out = pd.DataFrame({"backbone": [b for b in ROWS if b in wide.index]})
    for e in order:
        for m in ("AP", "AP50"):
            out[f"{e} {m}"] = [wide.loc[b, (m, e)] for b in out.backbone]
    return out


def row_inits(dc: DetConfig, mpm_work: str | Path) -> dict[str, tuple[str, str]]:
    """Row → (backbone weights, activation): the deployable classifiers of notebook 05 (GELU; their EMA backbones,
    bypass dropped) and the reference: torchvision's ReLU R50 or notebook 05's clean run."""
    from .mpm_experiments import backbone_weights
    runs = {"clean": "clean_vanilla", "vanilla AT": "at_plain", "MPM AT": "at_mpm"}
    out = {}
    for row in dc.rows:
        if row == "clean" and dc.clean_init != "clean_run":
            out[row] = (dc.clean_init, "relu")
            continue
        run = Path(mpm_work) / runs[row]
        if not (run / "ema.json").is_file():
            raise PinppError(f"{run}: the {row} classifier is not trained; run notebook 05 (`pinpp train {runs[row]}`) first")
        out[row] = (str(backbone_weights(run)), "gelu")
    return out


def run_all(dc: DetConfig, inits: dict[str, tuple[str, str]], data: DetData, work: str | Path) -> dict[str, dict]:
    """Train every row not finished yet, `dc.jobs` at a time; row → done record."""
    from . import jobs
    todo = list(inits)
    done = jobs.map_jobs(train, [(dc, r, *inits[r], data, Path(work) / r.replace(" ", "_")) for r in todo], dc.jobs,
                         "detection runs")
    return dict(zip(todo, done))


def recipe_note(dc: DetConfig, data: DetData) -> str:
    """Table A3's notes: the data, the reference row and the recipe (docs/FIDELITY.md, App. E)."""
    src = ("COCO 2017 (train2017 → val2017)" if dc.dataset == "coco" else
           f"the release's object boxes ({data.train_ann.name} → {data.val_ann.name}) standing in for COCO")
    ref = "torchvision's ImageNet ResNet-50 (ReLU)" if dc.clean_init != "clean_run" else "notebook 05's clean classifier (GELU)"
    part = f" Scored on the first {dc.eval_images} evaluation images." if dc.eval_images else ""
    return (f"Detection data: {src}. Reference row: {ref}. Free AT as thu-ml/oddefense (m = {dc.free_m}, eps "
            f"{dc.epsilon:g}/255, {dc.epochs} epochs, AdamW lr {dc.lr:g}, backbone ×{dc.backbone_lr_mult:g}); see "
            f"docs/FIDELITY.md, App. E.{part}")
