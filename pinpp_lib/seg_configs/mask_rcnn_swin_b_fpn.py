# Mask R-CNN Swin-B-FPN: the part model that writes the pseudo labels (§4.1: "Mask R-CNN with a Swin-B backbone").
# The R50 base with mmdet's SwinTransformer at Swin-B's sizes (embed 128, depths 2-2-18-2, heads 4-8-16-32, window 7,
# drop path 0.3 as Swin's own detection configs for Swin-B) feeding the FPN. Trained with the benchmark's recipe
# (`seg_recipes`); with seg.pretrained the ImageNet-1K Swin-B weights of the Swin release are loaded (offline: from the
# torch hub cache).
_base_ = "./mask_rcnn_r50_fpn.py"
model = dict(
    backbone=dict(_delete_=True, type="SwinTransformer", embed_dims=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32],
                  window_size=7, mlp_ratio=4, qkv_bias=True, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0,
                  drop_path_rate=0.3, patch_norm=True, out_indices=(0, 1, 2, 3), with_cp=False, convert_weights=True,
                  init_cfg=dict(type="Pretrained", checkpoint="https://github.com/SwinTransformer/storage/releases/"
                                "download/v1.0.0/swin_base_patch4_window7_224.pth")),
    neck=dict(in_channels=[128, 256, 512, 1024]))
