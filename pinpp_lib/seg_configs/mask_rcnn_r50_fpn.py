# Mask R-CNN R50-FPN for the PIN++ segmentation benchmark (paper §5, Tables 9/10) — the base config.
#
# The authors' recipe (detectron2/PACO style): sigmoid classification with a federated loss,
# repeat-factor sampling (threshold 1e-3), large-scale jitter (LSJ) at 1024², total batch 8, SGD lr 0.03,
# 62.5k iterations with lr steps at 50% and 75%. The other five configs are small deltas of this file.
# `pinpp_lib.seg_recipes.apply_recipe` then sets what the paper's and the authors' recipes choose (augmentation,
# test resize, norms, 4conv1fc heads, 2-conv RPN, RoIs, optimiser, warm-up, AMP, detections per image).
#
# `pinpp_lib.segmentation.build_config` fills in what depends on the data and the run: the annotation
# files and image root, the classes (`num_classes`, the federated loss's frequency file), image size,
# iterations, batch, width (smoke shrinks these only), seed and device. Fields marked FILLED are set there.
custom_imports = dict(imports=["pinpp_lib.seg_models", "pinpp_lib.seg_cascade"], allow_failed_imports=False)
default_scope = "mmdet"

image_size = (1024, 1024)
num_classes = 1  # FILLED: categories of the training file (parts: 3308, objects: 1000, objects+parts: 4308)
fed_loss = dict(type="FederatedLoss", num_classes=num_classes, ann_file=None,  # FILLED: the training file
                num_fed_classes=50, freq_power=0.5, loss_weight=1.0)

model = dict(
    type="MaskRCNN",
    data_preprocessor=dict(type="DetDataPreprocessor", mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                           bgr_to_rgb=True, pad_mask=True, pad_size_divisor=32,
                           # LSJ trains on fixed-size padded crops
                           batch_augments=[dict(type="BatchFixedSizePad", size=image_size, pad_mask=True)]),
    backbone=dict(type="ResNet", depth=50, num_stages=4, out_indices=(0, 1, 2, 3), frozen_stages=1,
                  norm_cfg=dict(type="BN", requires_grad=True), norm_eval=True, style="pytorch",
                  init_cfg=dict(type="Pretrained", checkpoint="torchvision://resnet50")),
    neck=dict(type="FPN", in_channels=[256, 512, 1024, 2048], out_channels=256, num_outs=5),
    rpn_head=dict(
        type="RPNHead", in_channels=256, feat_channels=256,
        anchor_generator=dict(type="AnchorGenerator", scales=[8], ratios=[0.5, 1.0, 2.0], strides=[4, 8, 16, 32, 64]),
        bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
        loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
        loss_bbox=dict(type="L1Loss", loss_weight=1.0)),
    roi_head=dict(
        type="StandardRoIHead",
        bbox_roi_extractor=dict(type="SingleRoIExtractor", roi_layer=dict(type="RoIAlign", output_size=7, sampling_ratio=0),
                                out_channels=256, featmap_strides=[4, 8, 16, 32]),
        bbox_head=dict(type="PartFilterBBoxHead", in_channels=256, fc_out_channels=1024, roi_feat_size=7,
                       num_classes=num_classes, reg_class_agnostic=False,
                       bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[0.1, 0.1, 0.2, 0.2]),
                       loss_cls=fed_loss, loss_bbox=dict(type="L1Loss", loss_weight=1.0)),
        mask_roi_extractor=dict(type="SingleRoIExtractor", roi_layer=dict(type="RoIAlign", output_size=14, sampling_ratio=0),
                                out_channels=256, featmap_strides=[4, 8, 16, 32]),
        mask_head=dict(type="FCNMaskHead", num_convs=4, in_channels=256, conv_out_channels=256, num_classes=num_classes,
                       loss_mask=dict(type="CrossEntropyLoss", use_mask=True, loss_weight=1.0))),
    train_cfg=dict(
        rpn=dict(assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3,
                               match_low_quality=True, ignore_iof_thr=-1),
                 sampler=dict(type="RandomSampler", num=256, pos_fraction=0.5, neg_pos_ub=-1, add_gt_as_proposals=False),
                 allowed_border=-1, pos_weight=-1, debug=False),
        rpn_proposal=dict(nms_pre=2000, max_per_img=1000, nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0),
        rcnn=dict(assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5,
                                match_low_quality=True, ignore_iof_thr=-1),
                  sampler=dict(type="RandomSampler", num=512, pos_fraction=0.25, neg_pos_ub=-1, add_gt_as_proposals=True),
                  mask_size=28, pos_weight=-1, debug=False)),
    test_cfg=dict(
        rpn=dict(nms_pre=1000, max_per_img=1000, nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0),
        # COCO-style evaluation: up to 100 detections per image (many parts per image)
        rcnn=dict(score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5), max_per_img=100, mask_thr_binary=0.5)))

# Large-scale jitter: resize by 0.1–2.0 of the crop size, crop (or pad) to it, flip.
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", with_bbox=True, with_mask=True, poly2mask=True),
    dict(type="RandomResize", scale=image_size, ratio_range=(0.1, 2.0), keep_ratio=True),
    dict(type="RandomCrop", crop_type="absolute_range", crop_size=image_size, recompute_bbox=True, allow_negative_crop=True),
    dict(type="FilterAnnotations", min_gt_bbox_wh=(1e-2, 1e-2)),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackDetInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=image_size, keep_ratio=True),
    dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
]
train_dataloader = dict(
    batch_size=8, num_workers=4, persistent_workers=True,  # batch: per process (FILLED: total 8 / processes)
    sampler=dict(type="InfiniteSampler", shuffle=True),
    # repeat-factor sampling (LVIS): images with rare categories repeat by max(1, sqrt(t / f_c))
    dataset=dict(type="ClassBalancedDataset", oversample_thr=1e-3,
                 dataset=dict(type="CocoDataset", ann_file=None, data_prefix=dict(img=None), metainfo=None,  # FILLED
                              filter_cfg=dict(filter_empty_gt=True, min_size=1), pipeline=train_pipeline)))
val_dataloader = None  # evaluation runs after training, in pinpp_lib.seg_eval (pycocotools, per-category records)
val_cfg = val_evaluator = None
test_dataloader = test_cfg = test_evaluator = None

train_cfg = dict(type="IterBasedTrainLoop", max_iters=62500, val_interval=10**9)
optim_wrapper = dict(type="OptimWrapper", optimizer=dict(type="SGD", lr=0.03, momentum=0.9, weight_decay=1e-4),
                     clip_grad=None)
param_scheduler = [
    dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type="MultiStepLR", by_epoch=False, begin=0, end=62500, milestones=[31250, 46875], gamma=0.1),
]

default_hooks = dict(
    timer=dict(type="IterTimerHook"),
    logger=dict(type="LoggerHook", interval=50),
    param_scheduler=dict(type="ParamSchedulerHook"),
    # resumable checkpoints (the kit keeps the final weights as weights_<sha256[:12]>.pt)
    checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=5000, max_keep_ckpts=2, save_last=True),
    sampler_seed=dict(type="DistSamplerSeedHook"),
    visualization=dict(type="DetVisualizationHook"),
)
custom_hooks = [dict(type="PlainHistoryHook")]  # resume checkpoints load with weights_only=True
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
               dist_cfg=dict(backend="nccl"))
vis_backends = [dict(type="LocalVisBackend")]
visualizer = dict(type="DetLocalVisualizer", vis_backends=vis_backends, name="visualizer")
log_processor = dict(type="LogProcessor", window_size=50, by_epoch=False)
log_level = "INFO"
load_from = None
resume = True
