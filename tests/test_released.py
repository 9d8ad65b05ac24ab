"""Issue 14: the authors' released checkpoints import into kit runs with the authors' logits.

The authors' architectures are restated here from their code (LixiaoTHU/PartImageNetPP @e132f50,
`model/partmodel.py` MPM / TwostagePartModel / SeparableConv2d, `model/model.py` build_model /
build_part_model: timm `resnet50` with every ReLU replaced by GELU), with their module names, and saved in
timm CheckpointSaver's container (epoch, arch, state_dict, state_dict_ema, optimizer, version, args).
"""
from __future__ import annotations

import argparse
import io
import zipfile

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from pinpp_lib import cli, imagenet, released
from pinpp_lib.fileio import PinppError
from pinpp_lib.training import load_trained

NUM, SEG = 10, 7  # classes, part classes incl. background (small: the R50 body is the real one)


def _gelu(module: nn.Module) -> None:  # the authors' replace_relu_with_gelu
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU):
            setattr(module, name, nn.GELU())
        else:
            _gelu(child)


class SeparableConv2d(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cin, 3, 1, 1, 1, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1, 1, 0, 1, 1, bias=False)

    def forward(self, x):
        return self.pointwise(self.conv1(x))


class AuthorsMPM(nn.Module):
    def __init__(self, level=3, down=True):
        super().__init__()
        self.level, self.down = level, down
        self.segmenter = timm.create_model("resnet50", num_classes=NUM)
        del self.segmenter.fc
        c = 2048 // 4
        self.cp1 = nn.Sequential(nn.Conv2d(2048, c, 1, bias=False), nn.BatchNorm2d(c))
        self.cp2 = nn.Sequential(nn.Conv2d(1024, c // 2, 1, bias=False), nn.BatchNorm2d(c // 2))
        self.cp3 = nn.Sequential(nn.Conv2d(512, c // 4, 1, bias=False), nn.BatchNorm2d(c // 4))
        self.segmenter_head1 = nn.Sequential(nn.GELU(), SeparableConv2d(c, SEG))
        self.up_layer1 = nn.Sequential(nn.GELU(), SeparableConv2d(c, c // 2))
        self.segmenter_head2 = nn.Sequential(nn.GELU(), SeparableConv2d(c // 2, SEG))
        self.up_layer2 = nn.Sequential(nn.GELU(), SeparableConv2d(c // 2, c // 4))
        self.segmenter_head3 = nn.Sequential(nn.GELU(), SeparableConv2d(c // 4, SEG))
        self.classifer = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(2048, NUM))
        _gelu(self)

    def forward(self, x):
        s = self.segmenter
        x = s.maxpool(s.act1(s.bn1(s.conv1(x))))
        x = s.layer2(s.layer1(x))
        f3 = self.cp3(x)
        x = s.layer3(x)
        f2 = self.cp2(x)
        x = s.layer4(x)
        f1 = self.cp1(x)
        up = lambda a, b: F.interpolate(a, size=b.shape[-2:], mode="bilinear", align_corners=False) + b
        sr1 = self.segmenter_head1(f1)
        if self.down:
            mr2 = up(self.up_layer1(f1), f2)
            sr2 = self.segmenter_head2(mr2)
            sr3 = self.segmenter_head3(up(self.up_layer2(mr2), f3))
        else:
            sr2, sr3 = self.segmenter_head2(f2), self.segmenter_head3(f3)
        return self.classifer(x), {3: [sr3, sr2, sr1], 2: [sr2, sr1], 1: [sr1]}[self.level]


class AuthorsTwoStage(nn.Module):
    def __init__(self):
        super().__init__()
        self.segmenter = timm.create_model("resnet50", num_classes=NUM)
        del self.segmenter.fc
        self.segmenter_head = nn.Sequential(nn.GELU(), nn.BatchNorm2d(2048), SeparableConv2d(2048, SEG))
        self.classifer = nn.Sequential(nn.AdaptiveAvgPool2d((4, 4)), nn.Conv2d(SEG, 512, kernel_size=(4, 4)), nn.BatchNorm2d(512),
                                       nn.GELU(), nn.Flatten(), nn.Linear(512, 2048), nn.BatchNorm1d(2048), nn.GELU(),
                                       nn.Linear(2048, NUM))
        _gelu(self)

    def forward(self, x):
        seg = self.segmenter_head(self.segmenter.forward_features(x))
        return self.classifer(F.softmax(seg, dim=1)), [seg]


def _vanilla():
    m = timm.create_model("resnet50", num_classes=NUM)
    _gelu(m)
    return m


AUTHORS = {"plain": _vanilla, "mpm": AuthorsMPM, "mpm_sv1": lambda: AuthorsMPM(level=1), "mpm_sv2": lambda: AuthorsMPM(level=2),
           "mpm_sv3_notd": lambda: AuthorsMPM(down=False), "twostage": AuthorsTwoStage}


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Random weights and BN statistics (a fresh model's BN is the identity and would hide a swapped buffer)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.dtype.is_floating_point:
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.75 if name.endswith(("running_var", "weight")) and t.dim() == 1
                        else torch.randn(t.shape, generator=g) * (0.05 if t.dim() > 1 else 0.1))
    return model.eval()


def _checkpoint(model: nn.Module, arch: str, path, **extra_args):
    level, down = {"mpm_sv1": (1, True), "mpm_sv2": (2, True), "mpm_sv3_notd": (3, False)}.get(arch, (3, True))
    args = argparse.Namespace(model="resnet50", model_type="original" if arch == "plain" else "partmodel",
                              partmodel_type="twostage" if arch == "twostage" else "MPM", level=level, down=down,
                              mean=list(imagenet.IMAGENET_MEAN), std=list(imagenet.IMAGENET_STD), lr=0.2, epochs=80, **extra_args)
    sd = model.state_dict()
    raw = {k: v + 1 if v.dtype.is_floating_point else v for k, v in sd.items()}  # the raw weights differ from the EMA
    torch.save({"epoch": 79, "arch": "resnet50", "state_dict": raw, "optimizer": {"state": {}, "param_groups": [{"lr": 0.01}]},
                "version": 2, "args": args, "state_dict_ema": sd, "metric": 41.2}, path)
    return path


@pytest.mark.parametrize("arch", released.ARCHS)
def test_import_gives_the_authors_logits(arch, tmp_path):
    authors = _randomise(AUTHORS[arch](), seed=len(arch))
    src = _checkpoint(authors, arch, tmp_path / f"{arch}.pth.tar")
    rec = released.import_official(src, arch, tmp_path / "run", classes=[f"n{i:08d}" for i in range(NUM)])
    model, meta = load_trained(tmp_path / "run")
    assert meta["source"]["sha256"] == rec["source"]["sha256"] and meta["source"]["weights"] == "state_dict_ema"
    assert meta["source"]["unused_tensors"] == sorted(released.UNUSED[arch])
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = authors(imagenet.normalise(x))  # the authors normalise outside the model
        ref_logits, ref_parts = ref if isinstance(ref, tuple) else (ref, None)
        torch.testing.assert_close(model(x), ref_logits, rtol=0, atol=1e-5)
        if arch.startswith("mpm"):
            parts = model.bypass(model.features(x))
        elif arch == "twostage":
            parts = [model.seg_head(model.backbone.forward_features(imagenet.normalise(x)))]
        else:
            parts = None
    if ref_parts is not None:
        assert len(parts) == len(ref_parts)
        for p, r in zip(parts, ref_parts):
            torch.testing.assert_close(p, r, rtol=0, atol=1e-5)
    again = released.import_official(src, arch, tmp_path / "run", classes=[f"n{i:08d}" for i in range(NUM)])
    assert again["sha256"] == rec["sha256"]  # reused, not rewritten


def test_raw_weights_and_default_classes(tmp_path):
    authors = _randomise(_vanilla(), 3)
    sd = {k: v for k, v in authors.state_dict().items()}
    full = nn.Linear(2048, 1000)
    sd["fc.weight"], sd["fc.bias"] = full.weight.detach(), full.bias.detach()
    src = tmp_path / "bare.pth"
    torch.save(sd, src)  # a bare state_dict
    rec = released.import_official(src, "plain", tmp_path / "run")
    assert rec["num_classes"] == 1000 and rec["classes"][:2] == [c["wnid"] for c in imagenet.classes()[:2]]
    with pytest.raises(PinppError, match="no 'state_dict_ema'.*--weights raw"):
        released.state_dict_of({"state_dict": sd, "epoch": 1}, "ema", "x.pth")
    assert released.state_dict_of({"state_dict": sd, "epoch": 1}, "raw", "x.pth") is sd


def test_wrong_arch_is_refused_in_one_line_naming_the_fitting_one(tmp_path):
    src = _checkpoint(_randomise(AUTHORS["twostage"](), 0), "twostage", tmp_path / "ts.pth.tar")
    with pytest.raises(PinppError) as e:
        released.import_official(src, "mpm", tmp_path / "run")
    assert "\n" not in str(e.value) and "--arch twostage" in str(e.value)
    sd = released.state_dict_of(released.read_checkpoint(src), "ema", "ts")
    with pytest.raises(PinppError, match="it fits --arch twostage"):
        released.map_state_dict(sd, "mpm")
    sv1 = _checkpoint(_randomise(AUTHORS["mpm_sv1"](), 0), "mpm_sv1", tmp_path / "sv1.pth.tar")
    with pytest.raises(PinppError, match="level=1.*use --arch mpm_sv1"):  # the same tensors as MPM: the args tell
        released.import_official(sv1, "mpm", tmp_path / "run2")
    bad = dict(sd)
    bad["classifer.extra.weight"] = torch.zeros(1)
    with pytest.raises(PinppError, match=r"1 unknown tensor\(s\), e.g. \['classifer.extra.weight'\]"):
        released.map_state_dict(bad, "twostage")
    del bad["classifer.extra.weight"], bad["segmenter_head.1.running_mean"]
    with pytest.raises(PinppError, match=r"1 missing, e.g. \['seg_head.1.running_mean'\]"):
        released.map_state_dict(bad, "twostage")


class Foreign:
    pass


def test_malformed_foreign_and_truncated_files_are_refused(tmp_path, capsys):
    good = _checkpoint(_randomise(_vanilla(), 0), "plain", tmp_path / "v.pth.tar")
    data = good.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pth").write_text("not a checkpoint\n")
    torch.save({"state_dict_ema": {}, "args": Foreign()}, tmp_path / "foreign.pth")
    for name, want in (("cut.pth", "not a complete PyTorch checkpoint"), ("text.pth", "not a complete PyTorch checkpoint"),
                       ("foreign.pth", "an object of type test_released.Foreign"), ("absent.pth", "no such checkpoint file")):
        assert cli.main(["import-official", str(tmp_path / name), "--arch", "plain", "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and want in err, err
    assert not (tmp_path / "o" / "done.json").exists()
    odd = argparse.Namespace(model_type="original", mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    torch.save({"state_dict_ema": _vanilla().state_dict(), "args": odd}, tmp_path / "norm.pth")
    with pytest.raises(PinppError, match=r"mean \[0.5, 0.5, 0.5\]"):
        released.import_official(tmp_path / "norm.pth", "plain", tmp_path / "o2", classes=[f"n{i}" for i in range(NUM)])


def test_weights_only_is_never_switched_off(monkeypatch, tmp_path):
    seen = []
    real = torch.load

    def spy(*a, **k):
        seen.append(k.get("weights_only"))
        return real(*a, **k)
    monkeypatch.setattr(torch, "load", spy)
    src = _checkpoint(_randomise(_vanilla(), 0), "plain", tmp_path / "v.pth.tar")
    released.import_official(src, "plain", tmp_path / "run", classes=[f"n{i}" for i in range(NUM)])
    load_trained(tmp_path / "run")
    assert seen and all(w is True for w in seen)


def test_container_is_timm_checkpoint_saver(tmp_path):
    """The fabricated container matches timm's CheckpointSaver._save keys (read from timm's source)."""
    import inspect

    from timm.utils.checkpoint_saver import CheckpointSaver
    src = inspect.getsource(CheckpointSaver._save)
    for key in ("'epoch'", "'arch'", "'state_dict'", "'state_dict_ema'", "'args'", "'metric'"):
        assert key in src
    path = _checkpoint(_vanilla(), "plain", tmp_path / "c.pth.tar")
    assert zipfile.is_zipfile(io.BytesIO(path.read_bytes()))


def test_imported_run_is_evaluated_by_eval_aa(converted, tmp_path, capsys):
    """An imported run folder is an ordinary run: `pinpp eval-aa --run-dir` evaluates it on the data's list."""
    from pinpp_lib.datasets import list_image_folder
    classes, _ = list_image_folder(converted / "train" / "img")
    authors = _vanilla()
    authors.fc = nn.Linear(2048, len(classes))
    src = _checkpoint(_randomise(authors, 5), "plain", tmp_path / "v.pth.tar")
    assert cli.main(["import-official", str(src), "--arch", "plain", "--out", str(tmp_path / "run"),
                     "--classes", str(_lines(tmp_path / "classes.txt", classes))]) == 0
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "converted").symlink_to(converted)
    capsys.readouterr()
    rc = cli.main(["eval-aa", "--run-dir", str(tmp_path / "run"), "--profile", "smoke", "--data-root", str(tmp_path / "data"),
                   "--mode", "pgd"])
    # random weights: eval-aa reads the run, scores it on the data's list and stops at the clean-accuracy floor
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]
    assert rc == 2 and last.startswith("pinpp eval-aa: error: clean accuracy") and "below the floor" in last, err


def _lines(path, items):
    path.write_text("".join(f"{i}\n" for i in items))
    return path
