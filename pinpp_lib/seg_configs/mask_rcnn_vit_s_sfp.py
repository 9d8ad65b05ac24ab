# Mask R-CNN with a ViT-S/16 backbone and a simple feature pyramid (Tables 9/10): the R50 base, backbone swapped.
_base_ = ["./mask_rcnn_r50_fpn.py", "./_vit_s_sfp.py"]
model = {{_base_.vit_s_sfp}}
