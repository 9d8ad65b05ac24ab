# The ViT-S/16 backbone (timm; embed 384, depth 12) with ViTDet's simple feature pyramid, as a model
# delta that the two ViT configs apply to the R50 base and to the cascade. timm's ViT weights expect
# inputs normalised with mean = std = 0.5.
vit_s_sfp = dict(
    data_preprocessor=dict(mean=[127.5, 127.5, 127.5], std=[127.5, 127.5, 127.5]),
    backbone=dict(_delete_=True, type="TimmViT", model_name="vit_small_patch16_224", img_size=1024, pretrained=True,
                  drop_path_rate=0.4),  # the authors' vit_s_fpn.py
    neck=dict(_delete_=True, type="SimpleFeaturePyramid", in_channels=384, out_channels=256,
              scale_factors=(4.0, 2.0, 1.0, 0.5), num_outs=5),
)
