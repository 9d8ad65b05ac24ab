# Cascade Mask R-CNN with the ViT-S/16 + simple-feature-pyramid backbone (Tables 9/10).
_base_ = ["./cascade_mask_rcnn_r50_fpn.py", "./_vit_s_sfp.py"]
model = {{_base_.vit_s_sfp}}
