"""Issue 14: Table 3's public models — files fabricated in each published layout import with the reference logits;
the fetch path on file:// URLs with a good and a bad checksum; the offline cases in one line."""
from __future__ import annotations

import argparse
import dataclasses

import pytest
import timm
import torch
import torchvision

from pinpp_lib import cli, fileio, imagenet, zoo
from pinpp_lib.fileio import PinppError
from pinpp_lib.training import load_trained

REFERENCE = {  # the architecture each row names, built by its own library
    "tv_resnet50": lambda: torchvision.models.resnet50(num_classes=1000),
    "timm_resnet50": lambda: timm.create_model("resnet50", num_classes=1000),
    "resnet50_gelu": lambda: timm.create_model("resnet50", num_classes=1000, act_layer="gelu"),
}


def _randomised(arch: str, seed: int) -> torch.nn.Module:
    m = REFERENCE[arch]()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in m.state_dict().items():
            if t.dtype.is_floating_point:
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.75 if t.dim() == 1 and name.endswith(("running_var", "weight"))
                        else torch.randn(t.shape, generator=g) * (0.02 if t.dim() > 1 else 0.1))
    return m.eval()


def _published_layout(e: zoo.ZooEntry, sd: dict) -> dict:
    """The file as its publisher laid it out: the row's prefixes put back, a normalisation layer where the row's
    source stores one (EasyRobust's `0.mean`/`0.std` beside the model's `1.*`), the row's first container."""
    norm = {}
    if "1." in e.strip:
        norm = {"0.mean": torch.tensor(imagenet.IMAGENET_MEAN), "0.std": torch.tensor(imagenet.IMAGENET_STD)}
    prefix = "".join(p for p in e.strip if p != "1.") + ("1." if "1." in e.strip else "")
    if e.strip == ("module.", "model."):  # RobustBench: 'module.' then 'model.' removed
        prefix = "module.model."
    laid = {**norm, **{prefix + k: v for k, v in sd.items()}}
    key = e.container[0]
    if not key:
        return laid
    return {key: laid, "epoch": 90, "args": argparse.Namespace(model="resnet50", lr=0.1)}


@pytest.mark.parametrize("name", [n for n, e in zoo.entries().items() if not e.why_not and not e.convert])
def test_each_zoo_entry_imports_from_its_published_layout(name, tmp_path):
    e = zoo.entry(name)
    ref = _randomised(e.arch, seed=len(name))
    src = tmp_path / "weights.pth"
    torch.save(_published_layout(e, ref.state_dict()), src)
    rec = zoo.import_zoo(name, src, tmp_path / "run")
    model, meta = load_trained(tmp_path / "run")
    assert meta["variant"] == e.arch and meta["source"]["zoo"] == name and meta["source"]["sha256"] == fileio.sha256_file(src)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(imagenet.normalise(x)), rtol=0, atol=1e-5)  # [0, 1] in, normalised inside
    assert zoo.import_zoo(name, src, tmp_path / "run")["sha256"] == rec["sha256"]  # reused


def test_foreign_layouts_are_refused_in_one_line(tmp_path):
    e = zoo.entry("salman2020_r50")
    gelu = _randomised("resnet50_gelu", 0).state_dict()
    torch.save({"state_dict": {"module.model." + k: v for k, v in gelu.items()}, "extra.weight": torch.zeros(1)}, tmp_path / "a.pth")
    (tmp_path / "b.pth").write_bytes(b"\x00" * 100)
    torch.save({"something": {"x": torch.zeros(1)}}, tmp_path / "c.pth")
    ref = _randomised("tv_resnet50", 0).state_dict()
    bad = {"module.model." + k: v for k, v in ref.items()}
    bad["module.model.fc.weight"] = torch.zeros(10, 2048)
    torch.save({"state_dict": bad}, tmp_path / "d.pth")
    odd = {**{"module.model." + k: v for k, v in ref.items()}, "module.model.normalize.mean": torch.tensor([0.5, 0.5, 0.5])}
    torch.save({"state_dict": odd}, tmp_path / "e.pth")
    for f, want in (("b.pth", "not a complete PyTorch checkpoint"), ("c.pth", "none of ['state_dict', '(the file itself)']"),
                    ("d.pth", "fc.weight has shape (10, 2048)"), ("e.pth", "is not ImageNet's")):
        with pytest.raises(PinppError, match=want.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")) as err:
            zoo.import_zoo(e.name, tmp_path / f, tmp_path / f"run_{f}")
        assert "\n" not in str(err.value)


def test_fetch_checks_the_sha256(tmp_path, monkeypatch, capsys):
    payload = tmp_path / "published.pth"
    torch.save({"state_dict": {}}, payload)
    good = fileio.sha256_file(payload)
    row = dataclasses.replace(zoo.entry("mao2022_easyrobust_r50"), url=payload.as_uri(), sha256=good)
    monkeypatch.setattr(zoo, "entries", lambda: {row.name: row})
    got = zoo.fetch(row.name, tmp_path / "dl")
    assert got.read_bytes() == payload.read_bytes() and got.name == row.file
    assert zoo.fetch(row.name, tmp_path / "dl") == got  # present with the right hash: kept
    monkeypatch.setattr(zoo, "entries", lambda: {row.name: dataclasses.replace(row, sha256="0" * 64)})
    with pytest.raises(PinppError, match="the zoo expects 000000000000.*nothing was kept"):
        zoo.fetch(row.name, tmp_path / "dl2")
    assert not any((tmp_path / "dl2").iterdir())
    monkeypatch.setattr(zoo, "entries", lambda: {row.name: dataclasses.replace(row, url=(tmp_path / "absent.pth").as_uri())})
    capsys.readouterr()  # the progress bars of the downloads above
    assert cli.main(["zoo", "fetch", row.name, "--dir", str(tmp_path / "dl3")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "download it by hand and put it at" in err


def test_offline_sources_say_where_to_get_the_file(tmp_path, capsys):
    for name, want in (("bai2021_r50_gelu", "drive.google.com/uc?id=1IPExDTAAuxIhUSYrmlweTQaKNscTw24-"),
                       ("salman2020_r50", "drive.google.com/uc?id=1TmT5oGa1UvVjM3d-XeSj_XmKqBNRUg8r")):
        assert cli.main(["zoo", "fetch", name, "--dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and want in err, err
    assert cli.main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    assert all(n in out for n in zoo.entries()) and "64.02 / 34.96" in out


class _GhostBN(torch.nn.Module):
    """Bai et al.'s GhostBN2D_Old (ViTs-vs-CNNs autoattack/ghost_bn_old.py), restated for evaluation: no affine, a
    proxy BN over ratio × C channels whose stats, reshaped to (ratio, C), give x[0] at eval (sync_stats False)."""

    def __init__(self, c, ratio=2):
        super().__init__()
        self.c, self.ratio = c, ratio
        self.proxy_bn = torch.nn.Module()  # their nn.BatchNorm2d(ratio × C) with weight and bias deleted: its stats only
        self.proxy_bn.register_buffer("running_mean", torch.zeros(c * ratio))
        self.proxy_bn.register_buffer("running_var", torch.ones(c * ratio))
        self.proxy_bn.register_buffer("num_batches_tracked", torch.tensor(0))

    def forward(self, x):
        rm = self.proxy_bn.running_mean.reshape(self.ratio, self.c)[0]
        rv = self.proxy_bn.running_var.reshape(self.ratio, self.c)[0]
        return torch.nn.functional.batch_norm(x, rm, rv, None, None, False, 0.0, 1e-5)


class _EightBN(torch.nn.Module):
    """Their EightBN: bn0..bn7 (bn_type 'bn0' by default), then Affine (a depthwise 1×1 conv with bias)."""

    def __init__(self, c):
        super().__init__()
        for i in range(8):
            setattr(self, f"bn{i}", _GhostBN(c))
        self.aff = torch.nn.Module()
        self.aff.bnconv = torch.nn.Conv2d(c, c, 1, groups=c, bias=True)

    def forward(self, x):
        return self.aff.bnconv(self.bn0(x))


def _bai_resnet50():
    """Their resnet_gbn_gelu_4096 ResNet-50 (torchvision's structure, GELU, EightBN as every norm layer)."""
    m = torchvision.models.resnet50(num_classes=1000, norm_layer=_EightBN)
    m.relu = torch.nn.GELU()
    for mod in m.modules():
        if isinstance(mod, torchvision.models.resnet.Bottleneck):
            mod.relu = torch.nn.GELU()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, t in m.state_dict().items():
            if t.dtype.is_floating_point:
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.75 if name.endswith("running_var")
                        else torch.randn(t.shape, generator=g) * (0.02 if t.dim() > 1 else 0.1) + (1.0 if "bnconv.weight" in name else 0.0))
    return m.eval()


def test_bai_ghost_bn_layout_imports_with_their_logits(tmp_path):
    """Bai et al.'s R50-GELU file ({'model': state_dict}, eight ghost BNs + affine conv per norm layer, evaluated on
    (x − 0.5) / 0.5): imported into a plain GELU ResNet-50 that normalises inside, same logits."""
    theirs = _bai_resnet50()
    src = tmp_path / "res50_gelu.pth"
    torch.save({"model": theirs.state_dict(), "epoch": 99}, src)
    zoo.import_zoo("bai2021_r50_gelu", src, tmp_path / "run")
    model, meta = load_trained(tmp_path / "run")
    assert meta["variant"] == "resnet50_gelu_half"
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), theirs((x - 0.5) / 0.5), rtol=1e-4, atol=1e-4)
    # the stand-in the rehearsal writes is in the same layout
    zoo.write_standin("bai2021_r50_gelu", tmp_path / "standin.pth")
    theirs.load_state_dict(released_sd(tmp_path / "standin.pth"), strict=True)


def released_sd(path):
    from pinpp_lib.released import read_checkpoint
    return {k.removeprefix("module."): v for k, v in read_checkpoint(path)["model"].items()}


def test_a_row_marked_not_importable_is_refused_in_one_line(tmp_path, monkeypatch):
    e = dataclasses.replace(zoo.entry("salman2020_r50"), importable="no: a layout the kit has no converter for")
    monkeypatch.setattr(zoo, "entries", lambda: {e.name: e})
    (tmp_path / "w.pth").write_bytes(b"anything")
    with pytest.raises(PinppError, match=r"^salman2020_r50: the kit cannot import its weights \(a layout the kit has no"):
        zoo.import_zoo(e.name, tmp_path / "w.pth", tmp_path / "run")
    assert not (tmp_path / "run").exists()
