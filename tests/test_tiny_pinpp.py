"""T-PIN++ (App. F): Tiny-ImageNet's class list and image draw, its 64-px transform, and DM-Improves-AT's WRN-28-10
loaded from a file written in their checkpoint format."""
from __future__ import annotations

import json
import shutil
from importlib import resources

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pinpp_lib import tiny_pinpp
from pinpp_lib.fileio import PinppError


def test_tiny_imagenet_classes_are_200_imagenet_classes():
    meta = json.loads(resources.files("pinpp_lib.data").joinpath("imagenet_classes_and_human16.json").read_text())
    in1k = {c["wnid"] for c in meta["imagenet_classes"]}
    assert len(set(tiny_pinpp.TINY_WNIDS)) == 200 and set(tiny_pinpp.TINY_WNIDS) <= in1k
    assert tiny_pinpp.TINY_WNIDS[:3] == ("n09428293", "n02113799", "n02099601")  # 200_wnids.txt's own order


def test_select_train_draws_per_class_from_a_recorded_seed():
    cands = {f"n{c:08d}": [f"n{c:08d}/{i}.JPEG" for i in range(30)] for c in (3, 1, 2)}
    a = tiny_pinpp.select_train(cands, per_class=10, seed=4)
    assert a == tiny_pinpp.select_train({k: v[::-1] for k, v in cands.items()}, per_class=10, seed=4)  # order-free
    assert a != tiny_pinpp.select_train(cands, per_class=10, seed=5)
    assert all(len(set(v)) == 10 and set(v) <= set(cands[k]) for k, v in a.items())
    with pytest.raises(PinppError, match="class n00000001: 30 training images with part masks, 40 needed"):
        tiny_pinpp.select_train(cands, per_class=40)


@pytest.mark.parametrize("shape", [(90, 61), (61, 90), (64, 64)])
def test_tiny_resize_restates_make_tiny_imagenet(shape):
    h, w = shape
    arr = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    got = np.asarray(tiny_pinpp.tiny_resize(Image.fromarray(arr)))
    # resize_image(img, 64, crop=True): h0 = (h - w) / 2 (Python 2 ints); img[h0:h0+w, :]; imresize(img, (64, 64))
    ref = arr
    if h > w:
        h0 = (h - w) // 2
        ref = arr[h0:h0 + w, :]
    elif w > h:
        w0 = (w - h) // 2
        ref = arr[:, w0:w0 + h]
    ref = np.asarray(Image.fromarray(ref).resize((64, 64), resample=Image.BILINEAR))  # scipy.misc.imresize, 'bilinear'
    assert got.shape == (64, 64, 3) and np.array_equal(got, ref)


def test_wrn_28_10_has_the_published_size():
    assert sum(p.numel() for p in tiny_pinpp.WideResNetSwish(num_classes=10).parameters()) == 36_479_194  # WRN-28-10, 10 classes


def _their_block_forward(b, x):
    """DM-Improves-AT `ti_wideresnetwithswish._Block.forward`, restated on our block's modules."""
    if b.has_shortcut:
        x = b.relu_0(b.batchnorm_0(x))
    else:
        out = b.relu_0(b.batchnorm_0(x))
    v = x if b.has_shortcut else out
    v = F.pad(v, (1, 1, 1, 1)) if b.stride == 1 else F.pad(v, (0, 1, 0, 1))
    out = b.conv_1(b.relu_1(b.batchnorm_1(b.conv_0(v))))
    return torch.add(b.shortcut(x) if b.has_shortcut else x, out)


@pytest.mark.parametrize("prefix", ["module.0.", "module.1."])
def test_dm_checkpoint_loads_and_computes_as_theirs(tmp_path, prefix):
    torch.manual_seed(0)
    src = tiny_pinpp.WideResNetSwish(num_classes=200, depth=10, width=2)
    for m in src.modules():  # non-trivial statistics, so that a mixed-up BN would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    torch.save({"model_state_dict": {prefix + k: v for k, v in src.state_dict().items()}}, tmp_path / "tiny.pt")
    model = tiny_pinpp.load_dm_checkpoint(tmp_path / "tiny.pt", depth=10, width=2)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        # their WideResNet.forward: normalise, init_conv, blocks, bn + act, 8×8 average pool, logits
        h = src.init_conv((x - torch.tensor(tiny_pinpp.TINY_MEAN).view(3, 1, 1)) / torch.tensor(tiny_pinpp.TINY_STD).view(3, 1, 1))
        for group in src.eval().layer:
            for b in group.block:
                h = _their_block_forward(b, h)
        ref = src.logits(torch.nn.AdaptiveAvgPool2d((1, 1))(src.relu(src.batchnorm(h))).view(-1, 2 * 64))
    torch.testing.assert_close(out, ref)
    torch.save({"model_state_dict": {"module.0.fc.weight": torch.zeros(1)}}, tmp_path / "bad.pt")
    with pytest.raises(PinppError, match="not a WRN-10-2 Tiny-ImageNet checkpoint"):
        tiny_pinpp.load_dm_checkpoint(tmp_path / "bad.pt", depth=10, width=2)


def test_resnext50_gelu_and_its_mpm():
    """Table A5's backbone: timm's ResNeXt-50 32×4d layout with GELU (same parameter count as timm's ReLU model), and
    MPM on it with the part heads at 28², 14², 7² for 224-px input."""
    import timm
    from pinpp_lib import models
    net = models.build("plain", "rx50", 200)
    assert models.count_params(net) == models.count_params(timm.create_model("resnext50_32x4d", num_classes=200))
    assert net.layer1[0].conv2.groups == 32 and net.layer1[0].conv2.out_channels == 128  # 32 groups × 4 channels
    assert isinstance(net.act1, torch.nn.GELU) or type(net.act1).__name__ == "GELU"
    mpm = models.build("mpm", "rx50", 200, seg_classes=50).train()
    logits, parts = mpm(torch.rand(2, 3, 224, 224))
    assert logits.shape == (2, 200) and [p.shape[-1] for p in parts] == [28, 14, 7]
    assert models.deployed_params(mpm) == models.count_params(net)


def test_flop_counter_counts_two_per_multiply_add():
    from pinpp_lib import models
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.Flatten(), torch.nn.Linear(8 * 16 * 16, 5))
    assert models.count_flops(conv, 16) == 2 * (8 * 16 * 16 * 3 * 3 * 3) + 2 * (8 * 16 * 16 * 5)
    r50 = models.build("plain", "r50", 1000)
    assert abs(models.count_flops(r50) / 2e9 - 4.09) < 0.05  # ResNet-50's 4.1 G multiply-adds at 224 px


def test_build_writes_a_converted_layout_of_the_draw(tmp_path):
    from pinpp_lib.datasets import list_image_folder, val_dataset
    conv, val, out = tmp_path / "converted", tmp_path / "val", tmp_path / "tpinpp"
    wnids = ("n02099601", "n01443537")
    for w in (*wnids, "n09999999"):
        for i in range(6):
            (conv / "train" / "img" / w).mkdir(parents=True, exist_ok=True)
            (conv / "train" / "img" / w / f"{w}_{i}.JPEG").write_bytes(b"x")
            if i != 5:  # one image per class has no label map: never drawn
                (conv / "train" / "seg_pseudo_cf" / w).mkdir(parents=True, exist_ok=True)
                (conv / "train" / "seg_pseudo_cf" / w / f"{w}_{i}.png").write_bytes(b"x")
        (val / w).mkdir(parents=True)
        for i in range(3):
            (val / w / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(b"x")
    (conv / "parts.json").write_text("[]")
    rec = tiny_pinpp.build(conv, val, out, classes=wnids, per_class=4, seed=1)
    assert (rec["classes"], rec["train_images"], rec["val_images"]) == (2, 8, 6)
    classes, samples = list_image_folder(out / "train" / "img")
    assert classes == sorted(wnids) and len(samples) == 8 and not any(s.endswith("_5.JPEG") for s, _ in samples)
    assert all((out / "train" / "seg_pseudo_cf" / s).with_suffix(".png").exists() for s, _ in samples)
    assert [lab for _, lab in val_dataset(out).samples] == [0, 0, 0, 1, 1, 1]  # sorted wnids
    assert tiny_pinpp.build(conv, val, out, classes=wnids, per_class=4, seed=1) == rec  # reused
    rec2 = tiny_pinpp.build(conv, val, out, classes=wnids, per_class=2, seed=1)
    assert rec2["train_images"] == 4 and len(list_image_folder(out / "train" / "img")[1]) == 4  # no stale links
    with pytest.raises(PinppError, match="1 of the 1 T-PIN.. classes have no training images .e.g. n09428293."):
        tiny_pinpp.build(conv, val, out, classes=("n09428293",), per_class=2)
    shutil.rmtree(val / wnids[0])
    with pytest.raises(PinppError, match=f"val/{wnids[0]}: the IN-1K val images of {wnids[0]} not found"):
        tiny_pinpp.build(conv, val, out, classes=wnids, per_class=2)


@pytest.mark.parametrize("shape", [(90, 61), (61, 90), (64, 64), (500, 375)])
def test_authors_tiny_resize_is_their_eval_transform(shape):
    """eval.py's "for tiny" branch: torchvision's Resize(64, BICUBIC) on the PIL image (the library object itself)."""
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode
    h, w = shape
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (h, w, 3), dtype=np.uint8))
    ref = transforms.Resize(64, interpolation=InterpolationMode.BICUBIC)(img)
    got = tiny_pinpp.authors_tiny_resize(img)
    assert got.size == ref.size and np.array_equal(np.asarray(got), np.asarray(ref))
