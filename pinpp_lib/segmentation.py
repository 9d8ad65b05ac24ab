"""Training the segmentation benchmark's models with mmdet (paper §5: Tables 9, 10; §4.1's part model).

    configs     `pinpp_lib/seg_configs/<name>.py`: Mask R-CNN R50/R101-FPN, their cascades, and ViT-S
                with a simple feature pyramid (with and without cascade) — one base, five deltas
    tasks       "parts" | "objects" | "objects+parts": which benchmark file trains the model
                (`<converted>/seg_benchmark/<task>_{train,val,test}.json`, written by `pinpp convert`)

One implementation for notebooks 02–04, `pinpp seg-train`, and `torchrun -m pinpp_lib seg-train`
(mmengine's `pytorch` launcher: one process per GPU, DDP; gloo on CPU). A run folder holds
mmengine's resumable checkpoints while training (re-running resumes from the last one) and, once
finished, the weights as `weights_<sha12>.pt` (state_dict only; loaded with weights_only=True and
checked against the sha256) with `done.json`. A folder refuses a run with another configuration.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Iterator

import torch

from . import checkpoint, distributed, fileio, jobs, seg_lvis, seg_recipes, store
from .checks import Checked, Rule, above, all_of, at_least, between, device_name, each, one_of, ordered
from .fileio import PinppError
from .seg_recipes import RECIPES, apply_recipe, stages, walk

CONFIGS = {  # config file → row label of Tables 9 and 10 (and of the pseudo-label model)
    "mask_rcnn_r50_fpn": "Mask R-CNN R50-FPN",
    "mask_rcnn_r101_fpn": "Mask R-CNN R101-FPN",
    "cascade_mask_rcnn_r50_fpn": "Cascade Mask R-CNN R50-FPN",
    "cascade_mask_rcnn_r101_fpn": "Cascade Mask R-CNN R101-FPN",
    "mask_rcnn_vit_s_sfp": "Mask R-CNN ViT-S (simple FPN)",
    "cascade_mask_rcnn_vit_s_sfp": "Cascade Mask R-CNN ViT-S (simple FPN)",
    "mask_rcnn_swin_b_fpn": "Mask R-CNN Swin-B-FPN",
}
BENCHMARK = tuple(CONFIGS)[:6]  # the rows of Tables 9 and 10; Swin-B is §4.1's pseudo-label model
TASKS = ("parts", "objects", "objects+parts")


@dataclass
class SegConfig(Checked):
    """Segmentation-benchmark settings at full size. Defaults: the paper's recipe (§5) and, where it is silent, the
    authors' detectron2 configs (r50_fpn.py on new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py); `recipe` picks the
    paper's or the code's choice where they differ (`RECIPES`, resolved in `config`)."""
    recipe: str = "paper"                            # "paper" | "authors_code" (see RECIPES)
    models: tuple[str, ...] = BENCHMARK              # Table 9 rows
    object_models: tuple[str, ...] = BENCHMARK       # Table 10 rows (each trained object-only and object+part)
    pseudo_model: str = "mask_rcnn_swin_b_fpn"       # the part model that writes pseudo labels (§4.1: Swin-B)
    table9_task: str = "parts"   # Table 9's models: trained on parts only | "objects+parts": the code's one 4,308-class model
    seeds: tuple[int, ...] = (0,)                    # Table 10 runs each (and reports the spread); Tables 9 and 6-left the first
    augment: str = "lsj"         # "lsj": scale 0.1–2.0 of image_size, crop/pad to it, flip | "resize_shortest"
    image_size: int = 1024       # LSJ crop size
    train_short: int = 375       # "resize_shortest": shorter side, longer side at most train_long (training)
    train_long: int = 500
    test_short: int = 800        # test resize: shorter side, longer side at most test_long
    test_long: int = 1333
    batch_size: int = 8          # total over all processes
    lr: float = 0.03
    iters: int = 62500
    lr_steps: tuple[float, ...] = (0.5, 0.75)        # fractions of `iters`, ×0.1 each
    warmup_iters: int = 250      # code: warmup_length = 250 / max_iter, from warmup_factor (new_baselines: 0.067)
    warmup_factor: float = 0.067
    weight_decay: float = 4e-5   # new_baselines LSJ; none on normalisation layers (detectron2 weight_decay_norm = 0)
    norm_decay: float = 0.0
    amp: bool = True             # train.amp.enabled (CUDA only: a CPU run trains in fp32)
    norm: str = "SyncBN"         # backbone, FPN and head convs (SyncBN over one process is BatchNorm exactly)
    box_head: str = "4conv1fc"   # "4conv1fc" (4 convs with norm + 1 fc, new_baselines) | "2fc" (mmdet's default)
    cascade: str = "detectron2"  # cascade heads as detectron2's CascadeROIHeads (seg_cascade) | "mmdet" (its CascadeRoIHead)
    rpn_convs: int = 2           # new_baselines: 2 convs in the RPN head
    width: float = 1.0           # channel multiplier of backbone/neck/heads (1.0 = the published models)
    vit_depth: int = 12
    vit_lr_decay: float = 0.8    # vit_s_fpn.py: layer-wise lr decay (detectron2 get_vit_lr_decay_rate); 1.0: none
    vit_style: str = "vitdet"    # ViTDet's backbone + AdamW (PACO's vit_b_fpn) | "plain": timm ViT, SGD (seg_recipes)
    vit_lr: float = 2e-4         # "vitdet": AdamW lr (PACO vit_b_fpn_100_ep.py; the authors' value is not published)
    vit_weight_decay: float = 0.1  # "vitdet": AdamW weight decay (detectron2 common/optim.py AdamW)
    pretrained: bool = False     # the code trains from scratch (init_checkpoint ""); True: ImageNet-pretrained backbones
    num_fed_classes: int = 50    # detectron2's fed_loss_num_classes; the background counts among them (seg_models)
    fed_count_background: bool = True
    cls_prior: float | None = None  # RoI classifier bias init: None = 0 (detectron2); p: log(p / (1 − p))
    rois_per_image: int = 128    # the authors' batch_size_per_image (detectron2/mmdet default: 512)
    rfs_threshold: float = 1e-3
    workers: int = 4
    ckpt_every: int = 5000
    log_every: int = 50
    test_batch: int = 8
    score_thr: float = 0.001     # test_score_thresh of the authors' box predictors
    max_dets: int = 300          # test_topk_per_image (detections kept per image)
    rpn_test_proposals: int = 1000  # proposals per image after the RPN's NMS at test (detectron2 post_nms_topk[1])
    eval_images: int = 0         # rehearsal: score the first N images of a split only; 0: all
    lvis_neg: str = "absent"     # the LVIS evaluation's negatives per image (seg_lvis): "absent" | "none"
    lvis_index: str = "position"  # its per-category AP: "position" | "id" (the authors' literal indexing, seg_lvis)
    jobs: int = 1                # runs trained (and scored) at once, one CPU thread each (smoke); 1: one after another
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    LIMITS: ClassVar[dict[str, Rule]] = {
        "models": each(one_of(*CONFIGS)), "object_models": each(one_of(*CONFIGS)), "pseudo_model": one_of(*CONFIGS),
        "table9_task": one_of("parts", "objects+parts"),
        "recipe": one_of(*RECIPES), "augment": one_of("lsj", "resize_shortest"), "train_short": at_least(16),
        "train_long": at_least(16), "test_short": at_least(16), "test_long": at_least(16),
        "warmup_factor": between(0, 1), "norm_decay": at_least(0), "norm": one_of("BN", "SyncBN"),
        "lvis_neg": one_of(*seg_lvis.NEG), "lvis_index": one_of(*seg_lvis.INDEX), "box_head": one_of("4conv1fc", "2fc"), "cascade": one_of("detectron2", "mmdet"), "rpn_convs": at_least(1), "max_dets": at_least(1), "rpn_test_proposals": at_least(1),
        "seeds": each(at_least(0)), "image_size": at_least(32), "batch_size": at_least(1), "lr": above(0), "iters": at_least(1),
        "lr_steps": all_of(each(between(0, 1)), ordered), "warmup_iters": at_least(0), "weight_decay": at_least(0),
        "width": above(0), "vit_depth": at_least(1), "vit_lr_decay": between(0, 1), "vit_style": one_of("vitdet", "plain"), "vit_lr": above(0),
        "vit_weight_decay": at_least(0), "num_fed_classes": at_least(1), "rois_per_image": at_least(1),
        "rfs_threshold": at_least(0), "workers": at_least(0), "ckpt_every": at_least(1), "log_every": at_least(1),
        "test_batch": at_least(1), "score_thr": between(0, 1), "eval_images": at_least(0), "jobs": at_least(1),
        "device": device_name}


def config_path(name: str) -> Path:
    if name not in CONFIGS:
        raise PinppError(f"unknown segmentation config {name!r}; choose one of {', '.join(CONFIGS)}")
    return Path(str(resources.files("pinpp_lib").joinpath("seg_configs").joinpath(f"{name}.py")))


def annotation_file(converted: str | Path, task: str, split: str) -> Path:
    if task not in TASKS:
        raise PinppError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    path = Path(converted) / "seg_benchmark" / f"{task}_{split}.json"
    if not path.exists():
        raise PinppError(f"{path}: benchmark file not found; run `pinpp prepare` (notebook 00) or `pinpp convert` first")
    return path


def categories(ann_file: str | Path) -> list[dict]:
    """The file's categories in id order: mmdet's label i is the i-th of them."""
    coco = fileio.read_json(ann_file, "COCO annotation file", "re-run `pinpp convert`")
    return sorted(coco["categories"], key=lambda c: c["id"])


def _scale_width(model: dict, w: float) -> None:
    """Multiply every channel count of the model by `w` (smoke shrinks the published models; 1.0 = unchanged)."""
    if w == 1.0:
        return
    c = lambda n: max(8, int(round(n * w)))  # noqa: E731
    bb = model["backbone"]
    if bb["type"] == "ResNet":
        bb["base_channels"] = c(64)
        exp = 1 if bb["depth"] in (18, 34) else 4
        model["neck"]["in_channels"] = [c(64) * exp * 2 ** i for i in range(4)]
    elif bb["type"] == "SwinTransformer":  # heads scale with the width; 32 channels per head, doubling per stage
        heads = max(1, int(round(bb["num_heads"][0] * w)))
        bb.update(embed_dims=32 * heads, num_heads=[heads * 2 ** i for i in range(4)])
        model["neck"]["in_channels"] = [32 * heads * 2 ** i for i in range(4)]
    else:  # ViT: width in multiples of its heads (64 channels each)
        heads = max(1, int(round(6 * w)))
        bb.update(embed_dim=64 * heads, num_heads=heads)
        model["neck"]["in_channels"] = 64 * heads

    def shrink(d: dict) -> None:
        for k in ("out_channels", "feat_channels", "conv_out_channels", "fc_out_channels"):
            if k in d:
                d[k] = c(d[k])
        if d.get("type") in ("SingleRoIExtractor", "PartFilterBBoxHead", "FCNMaskHead", "RPNHead"):
            if "in_channels" in d:
                d["in_channels"] = c(d["in_channels"])
    for key in ("neck", "rpn_head", "roi_head"):
        walk(model[key], shrink)


def _set_image_size(cfg, size: int) -> None:
    def fix(d: dict) -> None:
        if d.get("type") in ("RandomResize", "Resize"):
            d["scale"] = (size, size)
        elif d.get("type") == "RandomCrop" or d.get("type") == "BatchFixedSizePad":
            d["crop_size" if d["type"] == "RandomCrop" else "size"] = (size, size)
        elif d.get("type") == "TimmViT":
            d["img_size"] = size
    walk(cfg.model, fix)
    walk(cfg.train_dataloader, fix)  # the test resize is the recipe's (seg_recipes.apply_recipe)


def _set_classes(model: dict, n: int, ann_file: str, num_fed: int) -> None:
    def fix(d: dict) -> None:
        if "num_classes" in d and d.get("type") != "RPNHead":
            d["num_classes"] = n
        if d.get("type") == "FederatedLoss":
            d.update(ann_file=ann_file, num_fed_classes=num_fed)
    walk(model, fix)


def _set_pretrained(model: dict, pretrained: bool) -> None:
    """Without ImageNet weights the backbone trains from scratch: nothing frozen, BN statistics updated."""
    bb = model["backbone"]
    if bb["type"] == "TimmViT":
        bb["pretrained"] = pretrained
    elif bb["type"] == "SwinTransformer":
        if not pretrained:
            bb.pop("init_cfg", None)
    elif not pretrained:
        bb.pop("init_cfg", None)
        bb.update(frozen_stages=-1, norm_eval=False)


def build_config(name: str, task: str, converted: str | Path, run_dir: str | Path, sc: SegConfig, seed: int = 0,
                 world_size: int = 1):
    """The mmengine Config of one run: the config file + this data, size, schedule and seed."""
    from mmengine.config import Config
    cfg = Config.fromfile(str(config_path(name)))
    ann = annotation_file(converted, task, "train")
    cats = categories(ann)
    _set_classes(cfg.model, len(cats), str(ann), sc.num_fed_classes)
    _set_pretrained(cfg.model, sc.pretrained)
    if cfg.model.backbone.type == "TimmViT":
        cfg.model.backbone.depth = sc.vit_depth
    _scale_width(cfg.model, sc.width)
    _set_image_size(cfg, sc.image_size)
    if sc.batch_size % world_size:
        raise PinppError(f"seg batch_size {sc.batch_size} does not split over {world_size} processes; choose a multiple")
    dl = cfg.train_dataloader
    dl.batch_size, dl.num_workers, dl.persistent_workers = sc.batch_size // world_size, sc.workers, sc.workers > 0
    dl.dataset.oversample_thr = sc.rfs_threshold
    dl.dataset.dataset.update(ann_file=str(ann), data_prefix=dict(img=str(Path(converted) / "train" / "img") + "/"),
                              metainfo=dict(classes=tuple(c["name"] for c in cats)))
    rcnn = cfg.model.train_cfg.rcnn
    for stage in stages(rcnn):
        stage.sampler.num = sc.rois_per_image
    cfg.train_cfg.max_iters = sc.iters
    apply_recipe(cfg, sc, world_size)  # augmentation, norms, heads, optimiser, schedule, AMP, test settings
    cfg.default_hooks.checkpoint.interval = sc.ckpt_every
    cfg.default_hooks.logger.interval = sc.log_every
    cfg.log_processor.window_size = sc.log_every
    cfg.randomness = dict(seed=seed, deterministic=False)
    cuda = sc.device.startswith("cuda")
    cfg.env_cfg.dist_cfg.backend = "nccl" if cuda else "gloo"
    cfg.launcher = "pytorch" if world_size > 1 else "none"
    if world_size > 1 and not cuda:  # DDP over CPU processes takes no device ids (mmengine passes LOCAL_RANK)
        cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None, broadcast_buffers=False,
                                     find_unused_parameters=False)
    cfg.work_dir = str(run_dir)
    return cfg


def allow_mmengine_checkpoints() -> None:
    """Let `torch.load(weights_only=True)` (torch ≥ 2.6's default) read mmengine's resume checkpoints.

    `seg_models.PlainHistoryHook` stores the message hub as plain lists; what remains beyond tensors
    are numpy arrays/scalars and the LR scheduler's Counter. This allow-lists exactly those types
    instead of disabling safe loading."""
    import collections

    import numpy as np
    from numpy._core.multiarray import _reconstruct, scalar  # numpy's own pickling helpers
    dtypes = [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    torch.serialization.add_safe_globals([_reconstruct, scalar, np.ndarray, np.dtype, collections.Counter, *dtypes])


def check_pretrained(cfg) -> None:
    """Fail early, in one line, when ImageNet weights the config asks for are not on disk (offline)."""
    init = cfg.model.backbone.get("init_cfg") or {}
    ck = init.get("checkpoint", "") if isinstance(init, dict) else ""
    if ck.startswith(("torchvision://", "https://")):
        from mmengine.runner.checkpoint import get_torchvision_models
        url = get_torchvision_models()[ck.split("//", 1)[1]] if ck.startswith("torchvision://") else ck
        path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]
        if not path.exists():
            raise PinppError(f"{path}: ImageNet weights for the backbone ({ck}) are not on disk and cannot be downloaded "
                             f"here; fetch {url} there, or train from scratch with seg.pretrained=False")


def run_dir(work: str | Path, name: str, task: str, seed: int) -> Path:
    return Path(work) / task / f"{name}_seed{seed}"


def _run(name: str, task: str, converted: str | Path, work: str | Path, sc: SegConfig,
         seed: int) -> tuple[Path, Path, store.Identity]:
    """A run's folder, training file and identity."""
    ann = annotation_file(converted, task, "train")
    return run_dir(work, name, task, seed), ann, _identity(name, task, seed, sc, ann)


# SegConfig fields only some configs read, and the part of the config name that marks them (vit_depth and vit_lr_decay
# predate this and stay in every run's identity, so that finished runs stay valid)
MODEL_ONLY = {"cascade": "cascade", "vit_style": "vit", "vit_lr": "vit", "vit_weight_decay": "vit"}


def _identity(name: str, task: str, seed: int, sc: SegConfig, ann_file: Path) -> store.Identity:
    """What makes two runs the same run: the config, task, seed, training settings (not the device, loader workers
    or test-time settings, which `load_model` applies) and the bytes of the training file."""
    d = {k: v for k, v in dataclasses.asdict(sc).items()
         if k not in ("recipe", "models", "object_models", "pseudo_model", "table9_task", "seeds", "workers", "device", "test_batch",
                       *seg_recipes.TEST_FIELDS, "log_every", "eval_images", "lvis_neg", "lvis_index", "jobs")
         and (k not in MODEL_ONLY or MODEL_ONLY[k] in name)}  # a choice one kind of model reads is no other's identity
    return store.Identity("seg-train", {"config": name, "task": task, "seed": seed, "seg": d, "train_file": ann_file.name},
                          {"train_file": fileio.sha256_file(ann_file)})


@contextlib.contextmanager
def _unformatted_config_text() -> Iterator[None]:
    """Inside a run, mmengine's config text skips yapf. mmengine re-formats the whole config with yapf each time
    it logs, dumps or checkpoints it (≈ 2.5 s a call on CPU, five calls or more per run: 16 of the 23 s of a
    two-iteration run); the unformatted text is the same Python, only not re-wrapped."""
    import mmengine.config.config as mc
    formatter = mc.FormatCode
    mc.FormatCode = lambda text, **_: (text, False)
    try:
        yield
    finally:
        mc.FormatCode = formatter


STARTED = "run_identity.json"  # written when a run starts: its checkpoints belong to this identity


def train(name: str, task: str, converted: str | Path, work: str | Path, sc: SegConfig, seed: int = 0) -> dict[str, Any]:
    """Train (or resume, or reuse) one run; return its `done.json` record (weights path, sha256, ...).

    A finished run is reused only for the same identity with its weights intact; weights gone missing are
    rewritten from the last checkpoint (kept for that); a folder of another identity is refused in one line
    (it holds a user's training)."""
    out, ann, ident = _run(name, task, converted, work, sc, seed)
    done = store.finished(out, ident)
    if done is not None:
        return done
    why = store.stale(out, ident) or store.stale(out, ident, STARTED)
    if why:
        raise PinppError(f"{out}: holds a run with another configuration or training file ({why}); delete the folder "
                         "or choose another work dir")
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = 0
    if world > 1:  # under torchrun: the process group first (mmengine's own init assumes a GPU per process)
        rank, world, _ = distributed.setup()
    cfg = build_config(name, task, converted, out, sc, seed, world)
    check_pretrained(cfg)
    allow_mmengine_checkpoints()
    from mmengine.runner import Runner
    with _unformatted_config_text():
        if rank == 0:
            fileio.write_json(out / STARTED, ident.record(), indent=1)
            fileio.write_text(out / "config.py", cfg.pretty_text)
        t0 = time.time()
        # mmengine's console handler writes the environment, the config and every log line to stdout (thousands of
        # lines in a notebook); it binds to the stdout it finds when the runner is built, so the run's console.log
        # takes them. mmengine's own log file (<out>/<timestamp>/<timestamp>.log) is written as always.
        out.mkdir(parents=True, exist_ok=True)  # rank 0 may not have created it yet (torchrun)
        log = out / ("console.log" if rank == 0 else f"console_rank{rank}.log")
        with open(log, "a") as console, contextlib.redirect_stdout(console):
            runner = Runner.from_cfg(cfg)
            runner.train()
    result: dict[str, Any] = {}
    if rank == 0:
        last = Path((out / "last_checkpoint").read_text().strip())
        state = torch.load(last, map_location="cpu", weights_only=True)
        cats = categories(ann)
        meta = {"config": name, "task": task, "seed": seed, "iters": sc.iters, "classes": [c["name"] for c in cats],
                "cat_ids": [c["id"] for c in cats], "train_file": str(ann), "train_seconds": round(time.time() - t0, 1),
                "processes": world}
        w = checkpoint.save_weights(out / "weights", state["state_dict"], meta)
        result = store.finish(out, ident, [w], {**fileio.read_json(out / "weights.json"), "out": str(out)})
        for ck in out.glob("iter_*.pth"):  # earlier resume points are moot; the last one can rewrite the weights
            if ck.resolve() != last.resolve():
                ck.unlink()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return result if rank == 0 else store.read(out)


def load_model(run: str | Path | dict, device: str = "cpu", sc: SegConfig | None = None):
    """The trained model of a finished run (eval mode) and its config; the weights' sha256 is checked.

    `sc`: test at its resize, score threshold and detections per image (`seg_recipes.apply_test`); None: as the run's
    saved config says (what it was trained with)."""
    out = Path(run["out"]) if isinstance(run, dict) else Path(run)
    info = fileio.read_json(out / "done.json", "finished segmentation run", "train it first (`pinpp seg-train`)")
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmdet.registry import MODELS
    from . import seg_models  # noqa: F401  (registers the kit's modules)
    init_default_scope("mmdet")
    cfg = Config.fromfile(str(out / "config.py"))
    if sc is not None:
        seg_recipes.apply_test(cfg, sc)
    _set_pretrained(cfg.model, False)  # the weights come from the run, not from ImageNet
    model = MODELS.build(cfg.model)
    state = checkpoint.load(out / info["weights"], info["sha256"])
    model.load_state_dict(state)
    model.cfg = cfg
    return model.to(device).eval(), info


def run_all(names: tuple[str, ...], tasks: tuple[str, ...], converted: str | Path, work: str | Path, sc: SegConfig,
            seeds: tuple[int, ...] = (0,)) -> dict[tuple[str, str, int], dict]:
    """Train every (config, task, seed) not finished yet, `sc.jobs` at a time; (name, task, seed) → done record."""
    keys = [(n, t, s) for t in tasks for n in names for s in seeds]
    done = {k: finished(k[0], k[1], converted, work, sc, k[2]) if sc.jobs > 1 else None for k in keys}
    todo = [k for k in keys if done[k] is None]  # side by side: no process is started for a finished run
    results = jobs.map_jobs(train, [(n, t, converted, work, sc, s) for n, t, s in todo], sc.jobs, "segmentation runs")
    done.update(zip(todo, results))
    return done


def finished(name: str, task: str, converted: str | Path, work: str | Path, sc: SegConfig, seed: int = 0) -> dict[str, Any] | None:
    """The done record of a finished run of this identity (what `train` would return at once), else None."""
    out, _, ident = _run(name, task, converted, work, sc, seed)
    return store.finished(out, ident)
