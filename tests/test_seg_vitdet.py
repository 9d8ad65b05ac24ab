"""ViT-S as ViTDet builds and trains it (seg.vit_style = "vitdet"): the authors' vit_s_fpn.py sets ViTDet's fields
(`model.backbone.net.*`, `optimizer.params.lr_factor_func`) on a vit_b_fpn their repository lacks; the kit reads it as
PACO's vit_b_fpn_100_ep.py on detectron2's common/models/mask_rcnn_vitdet.py."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pinpp_lib import seg_models, seg_recipes, segmentation

from test_segmentation import TINY, built_model

VIT = "mask_rcnn_vit_s_sfp"


def _build(converted, tmp_path, sc=TINY, name=VIT):
    return built_model(name, converted, tmp_path, sc)


def test_vitdet_config_and_the_plain_one_on_request(converted, tmp_path):
    cfg = segmentation.build_config(VIT, "parts", converted, tmp_path, TINY)
    bb = cfg.model.backbone
    assert (bb.style, bb.square_pad, bb.drop_path_rate) == ("vitdet", TINY.image_size, 0.4)
    assert cfg.model.data_preprocessor.mean == [123.675, 116.28, 103.53] and cfg.model.data_preprocessor.std == [58.395, 57.12, 57.375]
    assert cfg.model.roi_head.bbox_head.norm_cfg.type == "LN2d" and cfg.model.roi_head.mask_head.norm_cfg.eps == 1e-6
    opt = cfg.optim_wrapper
    assert opt.optimizer == dict(type="AdamW", lr=2e-4, betas=(0.9, 0.999), weight_decay=0.1)
    assert opt.paramwise_cfg.custom_keys == {"pos_embed": {"decay_mult": 0.0}} and opt.paramwise_cfg.norm_decay_mult == 0
    assert cfg.param_scheduler[0].start_factor == 0.001
    plain = segmentation.build_config(VIT, "parts", converted, tmp_path, dataclasses.replace(TINY, vit_style="plain"))
    assert plain.model.backbone.get("style", "plain") == "plain" and plain.optim_wrapper.optimizer.type == "SGD"
    assert plain.model.roi_head.bbox_head.norm_cfg.type == "BN" and plain.param_scheduler[0].start_factor == TINY.warmup_factor
    # the R50 configs do not read the ViT fields: their runs keep their identity
    ann = segmentation.annotation_file(converted, "parts", "train")
    ident = lambda name, sc: segmentation._identity(name, "parts", 0, sc, ann).sha256  # noqa: E731
    other = dataclasses.replace(TINY, vit_style="plain", vit_lr=1e-3, vit_weight_decay=0.05)
    assert ident("mask_rcnn_r50_fpn", TINY) == ident("mask_rcnn_r50_fpn", other)
    assert ident(VIT, TINY) != ident(VIT, other)


def test_vitdet_backbone_structure_and_square_padding():
    """detectron2 ViT(window_size=14, window_block_indexes = all but 2, 5, 8, 11, use_rel_pos=True, LayerNorm eps 1e-6),
    no final norm; ImageList padding to a square of `square_pad` at the bottom right with zeros."""
    bb = seg_models.TimmViT(img_size=128, style="vitdet", square_pad=128, drop_path_rate=0.0).eval()
    vit = bb.vit
    assert len(vit.blocks) == 12 and vit.embed_dim == 384
    assert [b.window_size for b in vit.blocks] == [0 if i in (2, 5, 8, 11) else 14 for i in range(12)]
    assert all(b.attn.use_rel_pos and b.norm1.eps == 1e-6 for b in vit.blocks)
    assert isinstance(vit.neck, torch.nn.Identity) and vit.pos_embed.shape == (1, 8, 8, 384)
    x = torch.randn(1, 3, 70, 100)
    with torch.no_grad():
        out = bb(x)[0]
        want = vit.forward_features(F.pad(x, (0, 28, 0, 58)))  # restated: pad to 128² with zeros, no resampling
    assert out.shape == (1, 384, 8, 8) and torch.equal(out, want)
    with torch.no_grad():  # larger than the square: padded to its own size (multiple of 16), the embedding resampled
        assert bb(torch.randn(1, 3, 130, 40))[0].shape == (1, 384, 9, 9)
    with pytest.raises(Exception, match="no ViTDet-style ViT-S weights"):
        seg_models.TimmViT(style="vitdet", pretrained=True)


def test_vitdet_optimiser_restates_detectron2s_param_groups(converted, tmp_path):
    """get_default_optimizer_params(base_lr, weight_decay_norm=0, overrides={"pos_embed": {"weight_decay": 0}},
    lr_factor_func=get_vit_lr_decay_rate(rate 0.8, L)) with AdamW(lr, wd 0.1), restated per parameter."""
    from mmengine.optim import build_optim_wrapper
    sc = dataclasses.replace(TINY, vit_depth=2)
    cfg, model = _build(converted, tmp_path, sc)
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    assert isinstance(wrapper.optimizer, torch.optim.AdamW)
    got = {id(p): (g["lr"], g["weight_decay"]) for g in wrapper.optimizer.param_groups for p in g["params"]}
    norms = {id(p) for m in model.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.modules.batchnorm._BatchNorm,
                                                              torch.nn.GroupNorm)) for p in m.parameters(recurse=False)}
    for name, p in model.named_parameters():
        wd = 0.0 if id(p) in norms or name.rsplit(".", 1)[-1] == "pos_embed" else 0.1
        layer = 3
        if name.startswith("backbone"):
            if ".pos_embed" in name or ".patch_embed" in name:
                layer = 0
            elif ".blocks." in name:
                layer = int(name[name.find(".blocks."):].split(".")[2]) + 1
        lr = 2e-4 * 0.8 ** (3 - layer)
        assert got[id(p)][0] == pytest.approx(lr) and got[id(p)][1] == pytest.approx(wd), name
    assert any("rel_pos_h" in n for n, _ in model.named_parameters())  # relative positions decay, as detectron2


def test_vitdet_trains_one_iteration(converted, tmp_path):
    run = segmentation.train(VIT, "parts", converted, tmp_path, TINY, 0)
    cfg = (Path(run["out"]) / "config.py").read_text()
    assert "style='vitdet'" in cfg.replace('"', "'") and "AdamW" in cfg
    assert seg_recipes.VITDET_WARMUP_FACTOR == 0.001
