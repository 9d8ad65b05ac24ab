# Cascade Mask R-CNN R50-FPN (Tables 9/10): the R50 base with three box stages at IoU 0.5 / 0.6 / 0.7,
# each with the federated sigmoid classifier and class-agnostic regression, and one mask head.
_base_ = "./mask_rcnn_r50_fpn.py"

_box_head = dict(type="PartFilterBBoxHead", in_channels=256, fc_out_channels=1024, roi_feat_size=7,
                 num_classes={{_base_.num_classes}}, reg_class_agnostic=True, loss_cls={{_base_.fed_loss}},
                 loss_bbox=dict(type="SmoothL1Loss", beta=1.0, loss_weight=1.0))
_coder = dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4)
_sampler = dict(type="RandomSampler", num=512, pos_fraction=0.25, neg_pos_ub=-1, add_gt_as_proposals=True)
_assign = dict(type="MaxIoUAssigner", match_low_quality=False, ignore_iof_thr=-1)

model = dict(
    type="CascadeRCNN",
    roi_head=dict(
        _delete_=True,
        type="CascadeRoIHead",
        num_stages=3,
        stage_loss_weights=[1, 0.5, 0.25],
        bbox_roi_extractor={{_base_.model.roi_head.bbox_roi_extractor}},
        bbox_head=[
            dict(**_box_head, bbox_coder=dict(**_coder, target_stds=[0.1, 0.1, 0.2, 0.2])),
            dict(**_box_head, bbox_coder=dict(**_coder, target_stds=[0.05, 0.05, 0.1, 0.1])),
            dict(**_box_head, bbox_coder=dict(**_coder, target_stds=[0.033, 0.033, 0.067, 0.067])),
        ],
        mask_roi_extractor={{_base_.model.roi_head.mask_roi_extractor}},
        mask_head={{_base_.model.roi_head.mask_head}}),
    train_cfg=dict(rcnn=[
        dict(assigner=dict(**_assign, pos_iou_thr=iou, neg_iou_thr=iou, min_pos_iou=iou), sampler=_sampler,
             mask_size=28, pos_weight=-1, debug=False)
        for iou in (0.5, 0.6, 0.7)
    ]),
)
