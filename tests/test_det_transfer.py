"""Table A3 (notebook 08): the detection-transfer recipe pinned against literal restatements of thu-ml/oddefense
(mmdet 2.28 fork) and mmcv 1.x, and one end-to-end run on a COCO 2017 layout written in the test."""
from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pinpp_lib import checkpoint, det_transfer, models
from pinpp_lib.det_transfer import DetConfig
from pinpp_lib.fileio import PinppError

TINY = DetConfig(dataset="coco", arch="tiny", width=0.125, scale=(96, 64), batch_size=2, epochs=2, lr_steps=(1,),
                 warmup_iters=1, rois_per_image=16, free_m=2, attack_steps=2, workers=0, device="cpu")


def test_lr_factor_restates_mmcv_step_policy_with_linear_warmup():
    dc = DetConfig()  # warm-up 125 batches from 0.001, ×0.1 at epoch 5 of 6
    for it in (0, 1, 60, 124, 125, 400):
        # mmcv 1.x LrUpdaterHook.get_warmup_lr, 'linear': k = (1 - cur_iters / warmup_iters) * (1 - warmup_ratio)
        k = (1 - it / 125) * (1 - 0.001)
        expected = 1 * (1 - k) if it < 125 else 1.0
        assert det_transfer.lr_factor(it, 0, dc) == pytest.approx(expected)
    assert det_transfer.lr_factor(0, 0, dc) == pytest.approx(0.001)
    for epoch, expected in ((4, 1.0), (5, 0.1)):  # StepLrUpdaterHook: base * gamma ** (number of steps <= epoch)
        assert det_transfer.lr_factor(10_000, epoch, dc) == pytest.approx(expected)
    assert (dc.epochs, dc.lr_steps, dc.warmup_iters) == (2 * 12 // 4, (2 * 10 // 4,), int(500 / 4))  # times = 2, free_m = 4


def test_group_batches_restates_mmdet2_group_sampler():
    flags = np.array([0, 1, 1, 0, 1, 1, 1, 0, 1, 1, 0])
    got = det_transfer.group_batches(flags, 2, np.random.RandomState(3))
    # mmdet 2.28 datasets/samplers/group_sampler.py GroupSampler.__iter__ on the global numpy stream
    np.random.seed(3)
    indices = []
    for i, size in enumerate(np.bincount(flags)):
        if size == 0:
            continue
        indice = np.where(flags == i)[0]
        np.random.shuffle(indice)
        num_extra = int(np.ceil(size / 2)) * 2 - len(indice)
        indice = np.concatenate([indice, np.random.choice(indice, num_extra)])
        indices.append(indice)
    indices = np.concatenate(indices)
    indices = [indices[i * 2:(i + 1) * 2] for i in np.random.permutation(range(len(indices) // 2))]
    assert got == [list(map(int, b)) for b in indices]
    assert all(len(set(flags[b])) == 1 for b in got)  # one orientation per batch


def test_clip_mean_scales_values_above_the_clip_and_their_gradients():
    loss = torch.tensor([1.0, 7.0, 12.0, 3.0], requires_grad=True)
    out = det_transfer_clip(loss, 6.0)
    assert out.item() == pytest.approx((1 + 6 + 6 + 3) / 4)
    out.backward()
    assert loss.grad.tolist() == pytest.approx([0.25, 0.25 * 6 / 7, 0.25 * 6 / 12, 0.25])


def det_transfer_clip(loss, clip):
    from pinpp_lib.det_models import clip_mean
    return clip_mean(loss, clip)


class _LinearLoss:
    """A detector stand-in whose RoI losses are linear in the normalised image: the gradient sign is known."""

    def __init__(self, w: torch.Tensor):
        self.w = w

    def loss(self, x, samples):
        return {"loss_cls": (x * self.w).sum(), "loss_bbox": (-x * self.w).sum()}


def test_pgd_restates_oddefense_cal_adv():
    torch.manual_seed(0)
    mean, std = det_transfer._pixel_stats(torch.zeros(1))
    img = torch.rand(1, 3, 5, 6) * 255
    img[0, 0, 0, 0], img[0, 1, 0, 0] = 1.0, 254.0  # near the [0, 255] bounds
    w = torch.randn(1, 3, 5, 6)
    for kind, sign in (("cls", 1), ("reg", -1)):
        got = det_transfer.pgd(_LinearLoss(w), (img - mean) / std, [], kind, steps=10, step=1.0, eps=4.0)
        # cal_adv: img_adv = min(max(img_adv + sign(grad) * step, img - eps), img + eps).clamp(0, 255), 10 times
        adv = img.clone()
        for _ in range(10):
            adv = torch.clamp(torch.min(torch.max(adv + torch.sign(sign * w) * 1.0, img - 4), img + 4), 0, 255)
        torch.testing.assert_close(got * std + mean, adv, rtol=0, atol=1e-3)


def test_data_files_names_the_coco_layout(tmp_path):
    with pytest.raises(PinppError, match=r"coco/annotations/instances_train2017.json.*train2017/, val2017/"):
        det_transfer.data_files(DetConfig(), tmp_path, tmp_path / "converted")
    with pytest.raises(PinppError, match="objects_train.json.*notebook 00"):
        det_transfer.data_files(DetConfig(dataset="pinpp_objects"), tmp_path, tmp_path / "converted")


def test_classifier_backbone_loads_torchvision_and_kit_weights(tmp_path):
    import torchvision
    from pinpp_lib.det_models import ClassifierResNet
    tv = torchvision.models.resnet50().eval()
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    bb = ClassifierResNet("r50", "relu", str(tmp_path / "tv.pth"), frozen_stages=1)
    bb.init_weights()
    bb.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))
        torch.testing.assert_close(bb(x)[3], ref)
    # the kit's GELU classifiers (deployable export: a timm ResNet that normalises inside; the detector normalises)
    kit = models.build("plain", "tiny", 10).eval()
    checkpoint.save_weights(tmp_path / "kit", kit.state_dict(), {})
    path = next(tmp_path.glob("kit_*.pt"))
    bb = ClassifierResNet("tiny", "gelu", str(path))
    bb.init_weights()
    bb.train()
    assert not bb.net.conv1.weight.requires_grad and not any(p.requires_grad for p in bb.net.layer1.parameters())
    assert bb.net.layer2[0].conv1.weight.requires_grad
    assert not any(m.training for m in bb.modules() if isinstance(m, torch.nn.BatchNorm2d))  # norm_eval
    bb.eval()
    with torch.no_grad():
        feats = kit.forward_features(models.normalise(x.sigmoid()))
        torch.testing.assert_close(bb(models.normalise(x.sigmoid()))[3], feats)
    with pytest.raises(PinppError, match="does not fit"):
        ClassifierResNet("r50", "gelu", str(path)).init_weights()


def _coco(root, n_train=4, n_val=2, size=(80, 60)):
    """A COCO 2017 layout with `n` images of one or two boxes (two categories)."""
    rng = np.random.default_rng(0)
    for split, n in (("train2017", n_train), ("val2017", n_val)):
        (root / "coco" / split).mkdir(parents=True)
        images, anns = [], []
        for i in range(n):
            w, h = size if i % 3 else size[::-1]
            arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            x0, y0 = int(rng.integers(2, w // 2)), int(rng.integers(2, h // 2))
            arr[y0:y0 + 20, x0:x0 + 24] = (250, 30, 30)
            Image.fromarray(arr).save(root / "coco" / split / f"{i:012d}.jpg")
            images.append({"id": i + 1, "file_name": f"{i:012d}.jpg", "width": w, "height": h})
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1 + i % 2, "bbox": [x0, y0, 24, 20],
                         "area": 480, "iscrowd": 0})
        (root / "coco" / "annotations").mkdir(exist_ok=True)
        json.dump({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "bicycle"}]},
                  open(root / "coco" / "annotations" / f"instances_{split}.json", "w"))


def _tiny_detector(dc: DetConfig, tmp_path):
    kit = models.build("plain", "tiny", 10)
    path = checkpoint.save_weights(tmp_path / "bb", kit.state_dict(), {})
    return det_transfer.build_detector(dc, 2, str(path), "gelu"), str(path)


def test_param_groups_restate_mmcv_custom_keys_over_norm_decay(tmp_path):
    model, _ = _tiny_detector(TINY, tmp_path)
    groups = {id(g["params"][0]): g for g in det_transfer.param_groups(model, DetConfig())}
    named = dict(model.named_parameters())
    assert id(named["backbone.net.conv1.weight"]) not in groups  # frozen stem
    bn = groups[id(named["backbone.net.layer2.0.bn1.weight"])]
    assert (bn["lr"], bn["weight_decay"]) == (pytest.approx(1e-5), 0.1)  # "backbone" key: ×0.1 lr, decay ×1 (a norm too)
    fpn = groups[id(named["neck.lateral_convs.0.conv.weight"])]
    assert (fpn["lr"], fpn["weight_decay"]) == (1e-4, 0.1)


def test_free_at_step_updates_the_noise_by_the_sign_of_the_roi_loss_gradient(tmp_path):
    from mmengine.dataset import pseudo_collate
    _coco(tmp_path)
    data = det_transfer.data_files(TINY, tmp_path, tmp_path / "unused")
    ds = det_transfer.dataset(TINY, data.train_ann, data.train_img, train=True)
    model, _ = _tiny_detector(TINY, tmp_path)
    model.train()
    batch = model.data_preprocessor(pseudo_collate([ds[0], ds[2]]), training=True)
    noise0 = torch.zeros_like(batch["inputs"]).uniform_(-4, 4)
    # restatement (BaseDetector.train_step + AdvOptimizerHook.after_train_iter, adv_type "all"), on a copy
    ref = copy.deepcopy(model)
    mean, std = det_transfer._pixel_stats(batch["inputs"])
    aux = ((torch.clamp((batch["inputs"] * std + mean) + noise0, 0, 255) - mean) / std).requires_grad_()
    torch.manual_seed(1)
    losses = ref.loss(aux, batch["data_samples"])
    g = torch.autograd.grad(losses["loss_cls"] + losses["loss_bbox"], [aux])[0]
    expected = torch.clamp(noise0 + 4 * torch.sign(g), -4, 4)
    opt = torch.optim.AdamW(det_transfer.param_groups(model, TINY), lr=1e-4)
    before = model.roi_head.bbox_head.fc_cls.weight.detach().clone()
    torch.manual_seed(1)
    noise, log = det_transfer.free_at_step(model, batch, noise0, TINY, opt)
    torch.testing.assert_close(noise, expected)
    assert set(torch.unique(noise.abs()).tolist()) <= set(torch.unique(expected.abs()).tolist())
    assert not torch.equal(before, model.roi_head.bbox_head.fc_cls.weight)  # the step trained the model
    assert {"loss_cls", "loss_bbox", "loss_rpn_cls", "loss_rpn_bbox"} <= set(log)


def test_det_train_and_eval_on_a_coco_layout(tmp_path):
    _coco(tmp_path)
    data = det_transfer.data_files(TINY, tmp_path, tmp_path / "unused")
    _, init = _tiny_detector(TINY, tmp_path)
    dc = dataclasses.replace(TINY, attacks=("cls", "reg"), eval_images=2, epochs=1, lr_steps=(1,))
    run = det_transfer.train(dc, "MPM AT", init, "gelu", data, tmp_path / "runs" / "MPM_AT")
    assert run["iters"] == 2 and run["classes"] == ["person", "bicycle"]  # 4 images / batch 2 per epoch
    assert det_transfer.train(dc, "MPM AT", init, "gelu", data, tmp_path / "runs" / "MPM_AT")["sha256"] == run["sha256"]
    with pytest.raises(PinppError, match="another configuration"):
        det_transfer.train(dataclasses.replace(dc, free_m=3), "MPM AT", init, "gelu", data, tmp_path / "runs" / "MPM_AT")
    recs = det_transfer.evaluate({"MPM AT": run}, dc, data)
    assert list(recs.evaluation) == ["clean", "A_cls", "A_reg"] and recs.images.eq(2).all()
    assert recs[["AP", "AP50"]].ge(0).all().all()
    table = det_transfer.table_a3(recs)
    assert list(table.columns) == ["backbone", "clean AP", "clean AP50", "A_cls AP", "A_cls AP50", "A_reg AP", "A_reg AP50"]
    cached = json.loads((tmp_path / "runs" / "MPM_AT" / "detections_cls.json").read_text())
    assert cached["images"] == 2 and cached["settings"]["steps"] == 2
