"""The segmentation benchmark's training recipe as the paper states it and as the authors' code runs it (§5).

The authors' configs (LixiaoTHU/PartImageNetPP @e132f50, `Benchmark/segmentation/configs/PIN++_configs/r50_fpn.py`
and `coco_lsj_loader.py`) are detectron2 LazyConfigs built on `new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py`
(facebookresearch/detectron2 @02b5c4e2). The kit trains with mmdet; `apply_recipe` turns a `SegConfig`'s recipe
fields into the mmdet config so that each detectron2 choice has its mmdet equivalent:

    augment          "lsj": ResizeScale(0.1, 2.0) + FixedSizeCrop(image_size) + flip (the paper; new_baselines)
                     "resize_shortest": flip + ResizeShortestEdge(train_short, max train_long) (the authors' loader)
    table9_task      "parts": Table 9's models train on the parts file | "objects+parts": the code's one 4,308-class
                     model (objects + parts), scored on the parts file (its object detections dropped by name)
    test resize      ResizeShortestEdge(test_short, max test_long) = mmdet Resize((long, short), keep_ratio=True)
                     (both scale by min(short / shorter side, long / longer side), rounded the same way)
    norm             SyncBN in the backbone stem/stages and FPN, NaiveSyncBN (stats over N) in the box/mask head
                     convs; over one process SyncBN is BatchNorm exactly, so a one-process run uses BN (so do CPU
                     processes under torchrun: torch's SyncBatchNorm runs on GPUs only)
    box_head         4conv1fc: 4 × (3×3 conv 256 + norm + ReLU) + 1 fc 1024 (new_baselines, `conv_norm`)
    rpn_convs        2 (new_baselines: `proposal_generator.head.conv_dims = [-1, -1]`)
    vit_style        "vitdet": ViTDet's backbone and optimiser (window attention + relative positions, square padding,
                     LN in the head convs, AdamW lr vit_lr wd vit_weight_decay, none on pos_embed, warm-up from 0.001),
                     read from PACO's vit_b_fpn_100_ep.py — the authors' vit_s_fpn.py imports a vit_b_fpn their
                     repository lacks | "plain": timm's ViT-S with global attention, trained as the R50 configs
    cascade          "detectron2": `Detectron2CascadeRoIHead` (seg_cascade) with L1 box loss, unweighted stages and
                     stages 2–3 unsampled, as the authors' `r50_fpn_cascade.py` on CascadeROIHeads | "mmdet"
    optimiser        SGD momentum 0.9, lr, weight decay 4e-5, none on normalisation layers (weight_decay_norm = 0);
                     ViT backbones: detectron2's layer-wise lr decay (vit_lr_decay, LayerDecayOptimWrapperConstructor)
    schedule         linear warm-up from warmup_factor over warmup_iters, ×0.1 at lr_steps
    amp              AMPTrainer (fp16 autocast + loss scaling) on CUDA; mmengine has no CPU AMP, so CPU runs are fp32
    test             1000 proposals after the RPN's NMS, score threshold 0.001, 300 detections per image

`RECIPES[recipe]` holds the fields where the paper and the code differ; `config.resolve` applies it before the
profile's and the user's overrides. Nothing else reads `SegConfig.recipe`.
"""
from __future__ import annotations

from typing import Any

RECIPES: dict[str, dict[str, Any]] = {
    # §5: large-scale jitter at 1024² (detectron2's new_baselines LSJ), tested as that baseline tests
    # (ResizeShortestEdge 800, max 1333); every choice the paper does not state follows the code
    "paper": {},
    # coco_lsj_loader.py (despite its name): flip + ResizeShortestEdge(375, max 500), the same resize for testing
    "authors_code": {"augment": "resize_shortest", "test_short": 375, "test_long": 500,
                     # r50_fpn.py: one model over the 1000 objects and 3308 parts (num_classes = 4308); Table 9 scores
                     # its parts (the run notebook 03 trains for Table 10's object+part row)
                     "table9_task": "objects+parts"},
}


# detectron2 `configs/common/data/constants.py` imagenet_rgb256_mean / _std (mask_rcnn_vitdet.py's pixel statistics)
IMAGENET_MEAN, IMAGENET_STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
VITDET_WARMUP_FACTOR = 0.001  # mask_rcnn_vitdet_b_100ep.py and PACO's vit_b_fpn_100_ep.py


def walk(node: Any, fn) -> None:
    """Call fn(dict) on every dict inside a config tree."""
    if isinstance(node, dict):
        fn(node)
        for v in node.values():
            walk(v, fn)
    elif isinstance(node, (list, tuple)):
        for v in node:
            walk(v, fn)


def stages(x: Any) -> list:
    """A cascade's per-stage list, or a single head/config as a list of one."""
    return x if isinstance(x, list) else [x]


def apply_recipe(cfg: Any, sc: Any, world_size: int = 1) -> None:
    """Set the recipe fields of `sc` (a SegConfig) on an mmengine Config built from a kit config file."""
    cuda = str(sc.device).startswith("cuda")
    model = cfg.model
    # normalisation: SyncBN only where there is something to synchronise (a one-process run computes the same BN);
    # torch's SyncBatchNorm runs on GPUs only, so CPU processes under torchrun keep per-process BN
    norm = dict(type="SyncBN" if sc.norm == "SyncBN" and world_size > 1 and cuda else "BN", requires_grad=True)
    if model.backbone.type == "ResNet":
        model.backbone.norm_cfg = norm
        model.neck.norm_cfg = norm
    model.rpn_head.num_convs = sc.rpn_convs
    vitdet = model.backbone.type == "TimmViT" and sc.vit_style == "vitdet"
    if vitdet:  # mask_rcnn_vitdet.py: square padding, ImageNet pixel statistics, "LN" in the head convs
        model.backbone.update(style="vitdet", square_pad=sc.image_size)
        model.data_preprocessor.update(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    head_norm = dict(type="LN2d", eps=1e-6, requires_grad=True) if vitdet else norm
    convs = max(8, int(round(256 * sc.width)))  # 256 channels, narrowed with the rest of the model (smoke)
    for head in stages(model.roi_head.bbox_head):
        if sc.box_head == "4conv1fc":
            head.update(num_shared_convs=4, num_shared_fcs=1, conv_out_channels=convs, norm_cfg=head_norm)
        head.loss_cls.count_background = sc.fed_count_background
        head.prior_prob = sc.cls_prior
    if sc.box_head == "4conv1fc":
        model.roi_head.mask_head.norm_cfg = head_norm
    if model.roi_head.type == "CascadeRoIHead" and sc.cascade == "detectron2":
        model.roi_head.type = "Detectron2CascadeRoIHead"  # one mask head, 1/3 gradient, mean of probabilities
        model.roi_head.stage_loss_weights = [1.0] * model.roi_head.num_stages
        for head in stages(model.roi_head.bbox_head):
            head.loss_bbox = dict(type="L1Loss", loss_weight=1.0)  # FastRCNNOutputLayers' smooth_l1_beta = 0
        for stage in cfg.model.train_cfg.rcnn[1:]:  # every box of the previous stage, none added
            stage.sampler = dict(type="PseudoSampler")
    # augmentation
    if sc.augment == "resize_shortest":
        pipeline = cfg.train_dataloader.dataset.dataset.pipeline
        keep = [t for t in pipeline if t["type"] not in ("RandomResize", "RandomCrop")]
        at = next(i for i, t in enumerate(keep) if t["type"] == "LoadAnnotations") + 1
        keep.insert(at, dict(type="Resize", scale=(sc.train_long, sc.train_short), keep_ratio=True))
        cfg.train_dataloader.dataset.dataset.pipeline = keep
        if "train_pipeline" in cfg:  # the config file's own copy: the saved config.py shows what ran
            cfg.train_pipeline = keep
        model.data_preprocessor.batch_augments = None  # LSJ's fixed-size padding only
    apply_test(cfg, sc)
    # optimiser and schedule
    cfg.optim_wrapper.optimizer.update(lr=sc.lr, weight_decay=sc.weight_decay)
    cfg.optim_wrapper.paramwise_cfg = dict(norm_decay_mult=sc.norm_decay)
    if model.backbone.type == "TimmViT":  # vit_s_fpn.py: lr_factor_func = get_vit_lr_decay_rate(rate 0.8, 12 layers)
        cfg.optim_wrapper.constructor = "LayerDecayOptimWrapperConstructor"
        cfg.optim_wrapper.paramwise_cfg.update(lr_decay_rate=sc.vit_lr_decay, num_layers=sc.vit_depth)
    if vitdet:  # ViTDet / PACO vit_b: AdamW (β 0.9, 0.999), wd 0.1 but none on pos_embed and norms, warm-up from 0.001
        cfg.optim_wrapper.optimizer = dict(type="AdamW", lr=sc.vit_lr, betas=(0.9, 0.999), weight_decay=sc.vit_weight_decay)
        cfg.optim_wrapper.paramwise_cfg.update(custom_keys={"pos_embed": dict(decay_mult=0.0)})
    if sc.amp and cuda:
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.loss_scale = "dynamic"
    warm, steps = cfg.param_scheduler
    warm.update(start_factor=VITDET_WARMUP_FACTOR if vitdet else sc.warmup_factor, end=min(sc.warmup_iters, sc.iters))
    steps.update(end=sc.iters, milestones=[round(f * sc.iters) for f in sc.lr_steps])


# SegConfig fields that `apply_test` sets: not a training run's identity, but that of what is scored with it
TEST_FIELDS = ("score_thr", "max_dets", "rpn_test_proposals", "test_short", "test_long")


def test_keys(sc: Any) -> dict[str, Any]:
    """The test-time settings (but the score threshold, which each caller keys under its own name) that key cached
    detections and pseudo labels."""
    return {"max_dets": sc.max_dets, "test_resize": [sc.test_short, sc.test_long], "rpn_test_proposals": sc.rpn_test_proposals}


def apply_test(cfg: Any, sc: Any) -> None:
    """Set the test-time fields of `sc` on a config: resize, proposals, score threshold, detections per image.

    They are not part of a training run's identity: `segmentation.load_model(run, device, sc)` applies them to a
    finished run, so the same weights are scored under another test setting without retraining."""
    for stage in stages(cfg.model.test_cfg.rcnn):
        stage.update(score_thr=sc.score_thr, max_per_img=sc.max_dets)
    cfg.model.test_cfg.rpn.max_per_img = sc.rpn_test_proposals

    def test_resize(d: dict) -> None:
        if d.get("type") == "Resize":
            d.update(scale=(sc.test_long, sc.test_short), keep_ratio=True)
    walk(cfg.test_pipeline, test_resize)


def recipe_note(sc: Any) -> str:
    """The recipe a Table 9/10/6-left number was trained with, for the table's notes."""
    aug = (f"LSJ at {sc.image_size}²" if sc.augment == "lsj"
           else f"resize shorter side {sc.train_short} (longer ≤ {sc.train_long}) + flip")
    init = "ImageNet-pretrained" if sc.pretrained else "from scratch"
    joint = "Table 9: the joint object+part models' parts; " if sc.table9_task == "objects+parts" else ""
    return (f"Recipe: {sc.recipe} ({joint}{aug}, tested at {sc.test_short}/{sc.test_long}; {init}, {sc.norm}, {sc.box_head} box head, "
            f"{sc.rois_per_image} RoIs/image, {sc.cascade}-style cascade heads, {sc.iters} iterations, width ×{sc.width:g}); "
            "the other recipe: "
            f"seg.recipe={'authors_code' if sc.recipe == 'paper' else 'paper'} (docs/FIDELITY.md, §5). "
            "AP: pycocotools, COCO-style (100 detections per image; the paper's numbers); '(LVIS)' columns: the "
            f"authors' PACO/LVIS evaluator (300 detections per image, negatives '{sc.lvis_neg}', seg.lvis_neg; "
            "docs/FIDELITY.md, §5).")
