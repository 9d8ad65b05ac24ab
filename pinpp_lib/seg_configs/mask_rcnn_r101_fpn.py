# Mask R-CNN R101-FPN (Tables 9/10): the R50 base with a deeper backbone.
_base_ = "./mask_rcnn_r50_fpn.py"
model = dict(backbone=dict(depth=101, init_cfg=dict(type="Pretrained", checkpoint="torchvision://resnet101")))
