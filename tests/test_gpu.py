"""Tier 3 (opt-in: `./run_tests.sh -m gpu`): the CUDA paths — bf16 autocast + channels_last AT training,
AutoAttack on the GPU, and an mmdet Mask R-CNN iteration (where mmcv was built with CUDA ops)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from pinpp_lib import models, robust_eval
from pinpp_lib.datasets import TransformConfig
from pinpp_lib.training import TrainConfig, load_trained, train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_mpm_adversarial_training_on_gpu(converted, tmp_path):
    """The paper's GPU setting (bf16 autocast, channels_last, PGD-2 AT) on the synthetic data: trains, saves, reloads."""
    cfg = TrainConfig(variant="mpm", arch="tiny", seg_dir="seg", epochs=2, batch_size=8, init="none", init_stage_epochs=1, workers=2,
                      ckpt_every=3, log_every=1, ema_decay=0.9, transform=TransformConfig(size=64, scale=(0.6, 1.0)))
    assert cfg.amp and cfg.channels_last
    res = train(cfg, converted, tmp_path / "run")
    model, meta = load_trained(tmp_path / "run", "cuda")
    assert next(model.parameters()).is_cuda and res["steps"] > 0
    x = torch.rand(4, 3, 64, 64, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        logits = models.export_deployable(model)(x)
    assert logits.shape == (4, meta["num_classes"]) and torch.isfinite(logits.float()).all()


def test_autoattack_on_gpu_equals_one_direct_call():
    from pyautoattack import AutoAttack
    torch.manual_seed(0)
    net = models.build("plain", "tiny", 10).eval().cuda()
    x = torch.rand(24, 3, 32, 32)
    y = robust_eval.predict(net, x.cuda()).cpu()
    ecfg = robust_eval.EvalConfig(threats=("Linf-4/255",), batch_size=24, clean_floor=0.0)
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as tmp:
        recs = robust_eval.evaluate(net, x, y, 10, ecfg, Path(tmp), device="cuda")
    adv, _ = AutoAttack(net, norm="Linf", eps=4 / 255, version="standard", device="cuda", seed=0).run_standard_evaluation(
        x.cuda(), y.cuda(), batch_size=24)
    direct = (robust_eval.predict(net, adv) == y).float().mean().item()
    assert sum(r["robust"] for r in recs) / len(recs) == pytest.approx(direct)


def _mmcv_has_cuda_ops() -> bool:
    try:
        from mmcv.ops import roi_align
        roi_align(torch.rand(1, 1, 8, 8, device="cuda"), torch.tensor([[0, 0, 0, 4, 4.0]], device="cuda"), (2, 2))
        return True
    except Exception:
        return False


def test_mask_rcnn_iteration_on_gpu(converted, tmp_path):
    if not _mmcv_has_cuda_ops():
        pytest.skip("mmcv was built without CUDA ops (scripts/setup_env.sh builds them where nvidia-smi sees a GPU)")
    from pinpp_lib import seg_eval, segmentation
    sc = segmentation.SegConfig(iters=2, image_size=128, batch_size=2, width=0.25, pretrained=False, num_fed_classes=5,
                                workers=0, ckpt_every=1, log_every=1, warmup_iters=1, device="cuda")
    run = segmentation.train("mask_rcnn_r50_fpn", "parts", converted, tmp_path, sc, 0)
    rows, _ = seg_eval.evaluate_run(run, converted, "test", "parts", dataclasses.replace(sc, device="cuda"))
    assert 0 <= rows[0]["mask AP"] <= 100
