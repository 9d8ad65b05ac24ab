"""Datasets and transforms: joint augmentation keeps image and mask aligned, blank masks weigh 0."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from pinpp_lib import datasets as D
from pinpp_lib.fileio import PinppError


def test_joint_transform_keeps_image_and_mask_aligned():
    # image channel 0 encodes the column, the mask encodes the same column: after a random crop,
    # resize and flip both must still agree (bicubic vs nearest: within a few source columns).
    torch.manual_seed(0)
    h, w = 60, 200
    cols = torch.arange(w).float()
    img = (cols / (w - 1) * 255).round().to(torch.uint8).expand(3, h, w).clone()
    mask = np.broadcast_to(np.arange(w, dtype=np.uint16), (h, w))
    tf = D.train_transform(D.TransformConfig(size=48, color_jitter=0.0, scale=(0.3, 1.0)))
    flipped = 0
    for _ in range(30):
        x, m = tf(img, mask)
        assert x.shape == (3, 48, 48) and m.shape == (48, 48) and m.dtype == torch.int64
        assert x.min() >= 0 and x.max() <= 1
        from_image = x[0] * (w - 1)
        assert (from_image - m.float()).abs()[:, 2:-2].max() < 3.0
        assert set(m.unique().tolist()) <= set(range(w))  # nearest: no invented ids
        flipped += int(m[0, 0] > m[0, -1])
    assert 0 < flipped < 30  # flips happen, and not always
    x, none = tf(img)
    assert none is None and x.shape == (3, 48, 48)


def test_eval_transform_is_resize_then_centre_crop():
    img = tv_tensors.Image(torch.randint(0, 255, (3, 300, 400), dtype=torch.uint8))
    x = D.eval_transform(D.TransformConfig())(img)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32


def test_eval_transform_matches_torchvision_on_pil():
    """The authors' eval.py: torchvision Resize(int(224 / 0.875)) bicubic on a PIL image, CenterCrop, ToTensor."""
    from PIL import Image
    from torchvision import transforms as T
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (300, 410, 3), dtype=np.uint8))
    ref = T.Compose([T.Resize(int(224 / 0.875), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor()])(img)
    assert torch.equal(D.eval_transform(D.TransformConfig())(img).as_subclass(torch.Tensor), ref)


def test_part_dataset_weights_and_labels(converted):
    ds = D.PartSegDataset(converted, D.train_transform(D.TransformConfig(size=32)))
    assert len(ds.classes) == 6 and ds.num_parts > 6
    seen = {0.0: 0, 1.0: 0}
    for i in range(len(ds)):
        x, m, label, weight = ds[i]
        assert x.shape == (3, 32, 32) and m.shape == (32, 32)
        assert ds.classes[label] == ds.samples[i][0].split("/")[0]
        if not ds.has_seg[i]:
            assert weight == 0.0 and not m.any()  # unannotated or discarded: no seg loss
        seen[weight] += 1
    assert seen[0.0] and seen[1.0]
    obj = D.PartSegDataset(converted, None, object_mask=True, only_annotated=True)
    x, m, label, w = obj[0]
    assert set(m.unique().tolist()) <= {0, label + 1}
    assert len(obj) == sum(ds.has_seg)


def test_blank_mask_gets_zero_weight(converted, tmp_path):
    import shutil
    root = tmp_path / "c"
    shutil.copytree(converted, root, symlinks=True)
    ds = D.PartSegDataset(root)
    i = ds.has_seg.index(True)
    png = root / "train" / "seg" / (ds.samples[i][0].rsplit(".", 1)[0] + ".png")
    cv2.imwrite(str(png), np.zeros(cv2.imread(str(png), cv2.IMREAD_UNCHANGED).shape, np.uint16))
    assert ds[i][3] == 0.0


def test_val_dataset(converted):
    ds = D.val_dataset(converted, D.eval_transform(D.TransformConfig(size=32)))
    assert len(ds) == 12
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and 0 <= y < 6


def test_missing_inputs_are_clear(tmp_path):
    with pytest.raises(PinppError, match="run `pinpp convert`"):
        D.PartSegDataset(tmp_path)
    with pytest.raises(PinppError, match="val list not found"):
        D.ValListDataset(tmp_path, tmp_path / "nope.txt")
