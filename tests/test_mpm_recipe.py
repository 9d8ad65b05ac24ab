"""MPM as the authors trained it (issue 11): each formula against a literal restatement of their code
(github:LixiaoTHU/PartImageNetPP @e132f50, restated here in our words), or against the timm object they used."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
from timm.loss import SoftTargetCrossEntropy
import torch
import torch.nn as nn
import torch.nn.functional as F

from pinpp_lib import checkpoint, cli, config, layout, losses, masks, models
from pinpp_lib import mpm_experiments as mx
from pinpp_lib import robustness as rb
from pinpp_lib.attacks import pgd_linf
from pinpp_lib.datasets import PartSegDataset, TransformConfig, random_erase, train_transform
from pinpp_lib.fileio import PinppError
from pinpp_lib.training import TrainConfig, attack_step_at, init_lr_at, load_trained, lr_at, train


# ------------------------------------------------------------------ the part loss

def authors_loss(logits, segs, labels, mask, weight, lam=1.0, gamma=2.0, s=0.1):
    """Literal restatement: `mixup_target` / `mixup_seg` (mixing off, smoothing s) → SoftTargetCrossEntropy +
    λ · SoftFocalLoss(γ) (`model/loss.py`), with the dense B×K×H×W targets their code builds."""
    n_cls, k = logits.shape[1], segs[0].shape[1]
    t_cls = torch.full((len(labels), n_cls), s / n_cls).scatter_(1, labels.view(-1, 1), 1 - s + s / n_cls)
    cls = SoftTargetCrossEntropy()(logits, t_cls)
    seg = F.interpolate(mask[:, None].float(), size=segs[0].shape[-2:], mode="nearest")
    b, _, h, w = seg.shape
    fine = torch.full((b * h * w, k), s / k).scatter_(1, seg.long().view(-1, 1), 1 - s + s / k)
    fine = fine.view(b, h, w, k).permute(0, 3, 1, 2)
    golds = [fine] + [F.interpolate(fine, size=p.shape[-2:], mode="bilinear", align_corners=False) for p in segs[1:]]
    per_head = []
    for pred, gold in zip(segs, golds):
        bb, c, hh, ww = pred.shape
        ce = nn.CrossEntropyLoss(reduction="none")(pred.permute(0, 2, 3, 1).reshape(-1, c), gold.permute(0, 2, 3, 1).reshape(-1, c))
        p = torch.exp(-ce)
        per_head.append((((1 - p) ** gamma) * ce).reshape(bb, hh, ww).mul(weight[:, None, None]).mean())
    return cls + lam * sum(per_head) / len(per_head)


@pytest.mark.parametrize("mask_size,heads", [(32, (8, 4, 2)), (56, (28, 14, 7)), (24, (12, 6, 3)), (30, (9, 3)),
                                             (20, (7,)), (13, (6, 4))])
def test_part_loss_equals_the_authors_dense_loss(mask_size, heads):
    torch.manual_seed(0)
    b, k = 4, 9
    logits, labels = torch.randn(b, 5), torch.tensor([0, 1, 2, 4])
    mask = torch.randint(0, k, (b, mask_size, mask_size))
    segs = [3 * torch.randn(b, k, h, h) for h in heads]
    weight = torch.tensor([1.0, 0.0, 1.0, 1.0])  # a blank image: zero weight, still in the mean's denominator
    total, parts = losses.mpm_loss(logits, segs, labels, mask, weight)
    assert torch.allclose(total, authors_loss(logits, segs, labels, mask, weight), atol=1e-5, rtol=1e-5)
    assert torch.allclose(parts["ce"], F.cross_entropy(logits, labels, label_smoothing=0.1))
    # λ, γ and the smoothing reach both terms as in their code
    t2, _ = losses.mpm_loss(logits, segs, labels, mask, weight, lam=0.5, gamma=1.0, label_smoothing=0.2)
    assert torch.allclose(t2, authors_loss(logits, segs, labels, mask, weight, 0.5, 1.0, 0.2), atol=1e-5, rtol=1e-5)
    zero, p0 = losses.mpm_loss(logits, segs, labels, mask, torch.zeros(b))
    assert p0["focal"] == 0 and torch.allclose(zero, parts["ce"])


def test_fine_target_is_legacy_nearest():
    mask = torch.arange(16).view(1, 4, 4)
    assert losses.target_at(mask, (2, 2)).tolist() == [[[0, 2], [8, 10]]]  # source floor(i·4/2), not the pixel centre


def test_bilinear_taps_reproduce_interpolate():
    for n_in, n_out in ((28, 14), (28, 7), (9, 3), (13, 4), (6, 6)):
        x = torch.randn(n_in, dtype=torch.float64)
        ref = F.interpolate(x.view(1, 1, -1), size=n_out, mode="linear", align_corners=False).view(-1)
        (i0, w0), (i1, w1) = losses.bilinear_taps(n_in, n_out)
        assert torch.allclose(x[i0] * w0.double() + x[i1] * w1.double(), ref, atol=1e-6)


# ------------------------------------------------------------------ bypass and two-stage model

def test_bypass_matches_the_authors_parameter_count():
    k = 3311
    sep = lambda cin, cout: cin * 9 + cin * cout  # depthwise 3×3 + pointwise 1×1, no BN, no bias
    compact = 2048 * 512 + 2 * 512 + 1024 * 256 + 2 * 256 + 512 * 128 + 2 * 128  # 1×1 conv (no bias) + BN
    expected = compact + sep(512, k) + sep(512, 256) + sep(256, k) + sep(256, 128) + sep(128, k)
    m = models.build("mpm", "r50", 1000, k)
    assert models.count_params(m.bypass) == expected and round(expected / 1e6, 3) == 4.524
    assert not any(isinstance(x, nn.BatchNorm2d) for x in m.bypass.heads.modules())
    assert all(c.bias is None for c in m.bypass.modules() if isinstance(c, nn.Conv2d))
    assert round(models.deployed_params(m) / 1e6, 2) == 25.56


def authors_two_stage(backbone, k: int, n: int) -> nn.Module:
    """Literal restatement of `TwostagePartModel` (forward: features → head → softmax → classifier)."""
    c = backbone.num_features
    head = nn.Sequential(nn.GELU(), nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.Conv2d(c, k, 1, bias=False))
    cls = nn.Sequential(nn.AdaptiveAvgPool2d((4, 4)), nn.Conv2d(k, c // 4, kernel_size=(4, 4)), nn.BatchNorm2d(c // 4), nn.GELU(),
                        nn.Flatten(), nn.Linear(c // 4, c), nn.BatchNorm1d(c), nn.GELU(), nn.Linear(c, n))
    return nn.ModuleDict({"head": head, "cls": cls})


def test_two_stage_is_the_authors_model():
    torch.manual_seed(0)
    ours = models.build("twostage", "tiny", 6, 11).eval()
    ref = authors_two_stage(ours.backbone, 11, 6).eval()
    for a, b in zip(ref.parameters(), list(ours.seg_head.parameters()) + list(ours.classifier.parameters()), strict=True):
        with torch.no_grad():
            a.copy_(b)
    x = torch.rand(3, 3, 64, 64)
    seg = ref["head"](ours.backbone.forward_features(models.normalise(x)))
    assert torch.allclose(ours(x), ref["cls"](F.softmax(seg, dim=1)), atol=1e-5)
    r50 = models.build("twostage", "r50", 1000, 3311)
    assert round(models.count_params(r50) / 1e6, 2) == 60.54 == round(mx.r50_deployed_params("twostage") / 1e6, 2)
    assert round(mx.r50_deployed_params("mpm_sv1") / 1e6, 2) == 25.56


# ------------------------------------------------------------------ schedules, EMA, attack

def test_lr_schedule_is_timms_cosine_and_step_scheduler():
    from timm.scheduler import CosineLRScheduler, StepLRScheduler
    updates, epochs, warm = 7, 5, 2
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.2)
    cos = CosineLRScheduler(opt, t_initial=epochs * updates, lr_min=1e-2, warmup_t=warm * updates, warmup_lr_init=1e-3,
                            t_in_epochs=False)
    for t in range(epochs * updates):  # the lr of update t (timm: set by step_update(t) after update t − 1)
        cos.step_update(t)
        assert lr_at(t, epochs * updates, warm * updates, 0.2, 1e-2, 1e-3) == pytest.approx(opt.param_groups[0]["lr"])
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.2)
    step = StepLRScheduler(opt2, decay_t=5 * updates, decay_rate=0.1, warmup_t=warm * updates, warmup_lr_init=1e-3,
                           t_in_epochs=False)
    for t in range(updates):  # the init stage: one epoch of the step schedule's warm-up
        step.step_update(t)
        assert init_lr_at(t, warm * updates, 0.2, 1e-3) == pytest.approx(opt2.param_groups[0]["lr"])


def test_ema_is_model_ema_v2_without_warmup():
    from timm.utils import ModelEmaV2
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    ours, ref = checkpoint.EMA(model, 0.9), ModelEmaV2(model, decay=0.9)
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(8, 4))  # moves the BN buffers
        ours.update(model)
        ref.update(model)
    for (k, a), b in zip(ours.module.state_dict().items(), ref.module.state_dict().values()):
        if a.dtype.is_floating_point:
            assert torch.allclose(a, b, atol=1e-6), k


def test_attack_step_warmup_per_epoch():
    cfg = TrainConfig()
    step = cfg.eps * 2 / cfg.attack_steps  # adv_train.py: attack_step = attack_eps · 2 / attack_it
    for epoch in range(5):
        assert attack_step_at(cfg, epoch, 0, 10) == pytest.approx(step * min(epoch, 2) / (2 + 1e-10), abs=0)
    lin = dataclasses.replace(cfg, attack_warmup="step")
    assert attack_step_at(lin, 0, 9, 10) == pytest.approx(step * 10 / 20)
    with pytest.raises(PinppError, match="expected one of 'epoch', 'step'"):
        dataclasses.replace(cfg, attack_warmup="linear")


def authors_pgd(model, x, y, eps, steps, step, s):
    """Literal restatement of `adv_generator` (eval mode, uniform start, SoftTargetCrossEntropy on the smoothed
    targets, `replace_best` on the batch-mean loss with one more forward after the last step)."""
    n = model(x).shape[1]
    target = torch.full((len(y), n), s / n).scatter_(1, y.view(-1, 1), 1 - s + s / n)
    crit = SoftTargetCrossEntropy()
    images = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)  # their start draws twice; same law
    best_loss, best_x = None, None
    for _ in range(steps):
        images = images.clone().detach().requires_grad_(True)
        loss = crit(model(images), target).mean()
        loss.backward()
        grad = images.grad.detach()
        with torch.no_grad():
            if best_loss is None:
                best_loss, best_x = loss.clone(), images.clone()
            elif best_loss < loss:
                best_loss, best_x = loss.clone(), images.clone()
            images = images + torch.sign(grad) * step
            images = torch.clamp(torch.clamp(images - x, -eps, eps) + x, 0, 1)
    with torch.no_grad():
        loss = crit(model(images), target).mean()
    return images.detach() if best_loss < loss else best_x.detach()


def test_pgd_training_attack_equals_the_authors():
    torch.manual_seed(0)
    m = models.build("plain", "tiny", 5).eval()
    x, y = torch.rand(6, 3, 32, 32), torch.randint(0, 5, (6,))
    for steps, step in ((2, 4 / 255), (3, 1 / 255), (2, 0.0)):
        torch.manual_seed(1)
        ref = authors_pgd(m, x, y, 4 / 255, steps, step, 0.1)
        torch.manual_seed(1)
        ours = pgd_linf(m, x, y, 4 / 255, steps, step, label_smoothing=0.1, keep_best=True)
        assert torch.equal(ours, ref)


# ------------------------------------------------------------------ data: blank after the crop, random erasing

def test_blank_is_decided_after_the_crop(converted, tmp_path):
    root = tmp_path / "c"
    shutil.copytree(converted, root, symlinks=True)
    ds = PartSegDataset(root, train_transform(TransformConfig(size=16, scale=(0.01, 0.02), color_jitter=0.0)))
    i = ds.has_seg.index(True)
    png = root / "train" / "seg" / (ds.samples[i][0].rsplit(".", 1)[0] + ".png")
    lab = np.zeros(masks.read_label_png(png).shape, np.uint16)
    lab[:16, :16] = 1  # one part in a corner: most tiny crops miss it
    masks.write_label_png(png, lab)
    weights = []
    for t in range(60):
        torch.manual_seed(t)
        _, m, _, w = ds[i]
        assert w == float(m.any())
        weights.append(w)
    assert 0.0 in weights and 1.0 in weights


def test_random_erasing_is_timms_pixel_mode_in_pixel_units():
    torch.manual_seed(0)
    x = torch.full((3, 64, 64), 0.5)
    random_erase(x, 1.0)
    changed = (x != 0.5).any(0)
    assert 0.02 * 64 * 64 * 0.5 <= changed.sum() <= 64 * 64 / 3 * 1.6  # one block of 2-33 % (rounding aside)
    z = (x[:, changed] - torch.tensor(models.IMAGENET_MEAN)[:, None]) / torch.tensor(models.IMAGENET_STD)[:, None]
    assert abs(z.mean()) < 0.1 and abs(z.std() - 1) < 0.1  # N(0, 1) once the model normalises
    y = torch.full((3, 8, 8), 0.5)
    torch.manual_seed(0)
    assert torch.equal(random_erase(y, 0.0), torch.full((3, 8, 8), 0.5))


# ------------------------------------------------------------------ pseudo labels in every part-supervised run

ABLATIONS = {"at_mpm_real": layout.REAL_SEG_DIR, "at_mpm_pseudo_nocf": layout.PSEUDO_SEG_DIRS["nocf"]}


def _check_plan(runs: dict[str, TrainConfig]) -> None:
    part_runs = {n: tc for n, tc in runs.items() if tc.part_supervised}
    ablations = ABLATIONS
    for name, tc in part_runs.items():
        assert tc.seg_dir == ablations.get(name, "seg_pseudo_cf"), name
        if tc.adversarial:
            assert tc.init_stage_epochs == 1, name
    for name, tc in runs.items():
        if not tc.part_supervised:
            assert tc.init_stage_epochs == 0, name  # vanilla AT starts from the torchvision weights, fc included


@pytest.mark.parametrize("profile", ["full", "smoke"])
def test_every_part_supervised_run_trains_on_real_plus_pseudo_cf(profile):
    s = config.resolve(profile)
    runs = mx.plan(s.mpm)
    assert {"at_mpm", "at_mpm_object", "at_mpm_sv1", "at_mpm_sv2", "at_mpm_sv3_notd", "at_twostage", *ABLATIONS} <= \
           {n for n, tc in runs.items() if tc.part_supervised}
    _check_plan(runs)
    models06 = rb.plan_models(s.mpm)
    assert {n for n, tc in models06.items() if tc.part_supervised} == {"clean_mpm", "at_mpm"}
    _check_plan(models06)
    assert {label: run for label, (run, _) in mx.TABLE6_RUNS.items()}["+ pseudo w/ CF"] == "at_mpm"
    if profile == "full":
        at = runs["at_mpm"]
        assert (at.init, at.epochs, at.lr, at.min_lr, at.warmup_lr, at.nesterov, at.ema_decay, at.ema_warmup) == \
               ("torchvision_v2", 80, 0.2, 1e-2, 1e-3, True, 0.9998, False)
        assert runs["at_plain"].init == "torchvision_v2" and runs["clean_vanilla"].min_lr == 1e-3
        assert "real + pseudo (CF)" in mx.recipe_note(at)


def test_missing_pseudo_labels_stop_with_one_line(converted, tmp_path, capsys):
    s = config.resolve("smoke", data_root=tmp_path)
    with pytest.raises(PinppError) as e:
        mx.run_training(mx.plan(s.mpm), s.mpm, converted, tmp_path / "runs")
    msg = str(e.value)
    assert "\n" not in msg and "seg_pseudo_cf" in msg and "notebooks/04_pseudo_labels.ipynb" in msg and "pinpp pseudo-label" in msg
    assert not (tmp_path / "runs").exists()  # nothing trained before the check
    (tmp_path / "converted").symlink_to(converted)  # full profile: its AT runs need no clean run first
    assert cli.main(["train", "at_mpm", "--profile", "full", "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pinpp pseudo-label" in err


def test_unfinished_pseudo_labels_are_refused(pseudo_converted, tmp_path):
    conv = tmp_path / "conv"
    shutil.copytree(pseudo_converted, conv, symlinks=True)
    victim = next((conv / "train" / "seg_pseudo_cf").glob("*/*.png"))
    victim.unlink()
    with pytest.raises(PinppError, match=r"1 of \d+ training images have no label .*pinpp pseudo-label"):
        train(TrainConfig(variant="mpm", arch="tiny", epochs=1, init="none"), conv, tmp_path / "run")


def test_training_reads_the_pseudo_labels_and_the_init_stage_is_the_authors(pseudo_converted, tmp_path):
    """An MPM run on real + pseudo labels: the init stage trains only the heads and a new fc (backbone frozen,
    its weights those of the init file); a plain run without one keeps the init file's fc."""
    torch.manual_seed(0)
    donor = models.build("plain", "tiny", 6)
    init = checkpoint.save_weights(tmp_path / "init_backbone", donor.state_dict(), {"from_run": "test"})
    base = dict(arch="tiny", batch_size=8, lr=0.8, init=str(init), workers=0, log_every=1, ckpt_every=100,
                transform=TransformConfig(size=32))
    r = train(TrainConfig(variant="mpm", epochs=0, init_stage_epochs=1, **base), pseudo_converted, tmp_path / "mpm")
    model, meta = load_trained(tmp_path / "mpm")
    got, ref = model.backbone.state_dict(), donor.state_dict()
    frozen = [k for k, _ in donor.named_parameters() if not k.startswith("fc.")]  # BN buffers still move (train mode)
    assert frozen and all(torch.equal(got[k], ref[k]) for k in frozen)
    assert not torch.equal(got["fc.weight"], ref["fc.weight"])  # a new classifier, trained in the init stage
    assert meta["config"]["seg_dir"] == "seg_pseudo_cf" and r["steps"] > 0
    log = json.loads((tmp_path / "mpm" / "train_log.json").read_text())
    assert all(e["focal"] > 0 for e in log)  # the part loss sees pseudo-labelled images
    train(TrainConfig(variant="plain", epochs=0, init_stage_epochs=0, **base), pseudo_converted, tmp_path / "plain")
    plain, _ = load_trained(tmp_path / "plain")
    assert all(torch.equal(v, ref[k]) for k, v in plain.state_dict().items())


def test_table6_ablation_reads_real_labels_only(pseudo_converted):
    real = PartSegDataset(pseudo_converted, seg_dir=layout.REAL_SEG_DIR)
    both = PartSegDataset(pseudo_converted, seg_dir=layout.TRAIN_SEG_DIR)
    assert sum(both.has_seg) == len(both) > sum(real.has_seg) > 0
    assert math.isclose(sum(PartSegDataset(pseudo_converted, seg_dir=None)[i][3] for i in range(3)), 0.0)
