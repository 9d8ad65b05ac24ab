"""Finished work is reused only while its inputs are unchanged (issue 12): the store, and each job's stale cases."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from pinpp_lib import checkpoint, store
from pinpp_lib import training as T
from pinpp_lib.datasets import TransformConfig
from pinpp_lib.fileio import PinppError


# ------------------------------------------------------------------ the store itself

def test_identity_record_and_files(tmp_path):
    out = tmp_path / "job"
    out.mkdir()
    (out / "a.txt").write_text("A")
    ident = store.Identity("demo", {"k": 1, "nested": {"x": (1, 2)}}, {"data": "abc"})
    assert store.finished(out, ident) is None and store.stale(out, ident) is None
    rec = store.finish(out, ident, ["a.txt"], {"answer": 42})
    assert rec["answer"] == 42 and store.finished(out, ident) == rec
    assert store.finished(out, store.Identity("demo", {"k": 2, "nested": {"x": (1, 2)}}, {"data": "abc"})) is None
    assert store.stale(out, store.Identity("demo", {"k": 2, "nested": {"x": (1, 2)}}, {"data": "abc"})) == "changed: k 1 → 2"
    assert "input 'data'" in store.stale(out, store.Identity("demo", {"k": 1, "nested": {"x": [1, 2]}}, {"data": "abd"}))
    (out / "a.txt").write_text("B")  # an output rewritten behind the store's back: not finished any more
    assert store.finished(out, ident) is None and store.stale(out, ident) is None
    (out / "done.json").write_text("{ torn")
    assert store.read(out) is None
    with pytest.raises(ValueError, match="reserved"):
        store.finish(out, ident, [], {"files": 1})


def test_tree_digest_sees_added_removed_and_rewritten_files(tmp_path):
    files = [tmp_path / f"{i}.png" for i in range(3)]
    for f in files:
        f.write_bytes(b"x")
    d0 = store.tree_digest(files, tmp_path)
    assert store.tree_digest(files[:2], tmp_path) != d0
    files[1].unlink()
    assert store.tree_digest(files, tmp_path) != d0  # a missing file counts as missing
    files[1].write_bytes(b"xy")
    assert store.tree_digest(files, tmp_path) != d0


def test_equal_weights_get_equal_names(tmp_path):
    sd = {"w": torch.arange(6.0).view(2, 3), "b": torch.zeros(3)}
    a = checkpoint.save_weights(tmp_path / "one" / "w", sd, {})
    b = checkpoint.save_weights(tmp_path / "two" / "w", {k: v.clone() for k, v in sd.items()}, {})
    assert a.name == b.name and a.read_bytes() == b.read_bytes()
    assert checkpoint.save(tmp_path / "c1", sd, 3).name == checkpoint.save(tmp_path / "c2", sd, 3).name


def test_corrupt_latest_checkpoint_falls_back_to_the_one_before(tmp_path):
    checkpoint.save(tmp_path, {"step": torch.tensor(2)}, 2)
    newest = checkpoint.save(tmp_path, {"step": torch.tensor(4)}, 4)
    newest.write_bytes(newest.read_bytes()[:-7] + b"garbage")
    with pytest.warns(UserWarning, match="resuming from the checkpoint before it"):
        state = checkpoint.latest(tmp_path)
    assert int(state["step"]) == 2 and (tmp_path / (newest.name + ".corrupt")).exists() and not newest.exists()


# ------------------------------------------------------------------ training

def _plain(**kw) -> T.TrainConfig:
    base = dict(variant="plain", arch="tiny", epochs=1, batch_size=8, lr=0.4, init="none", init_stage_epochs=0, workers=0,
                adversarial=False, ckpt_every=3, log_every=1, ema_decay=0.9, transform=TransformConfig(size=32))
    return T.TrainConfig(**{**base, **kw})


@pytest.fixture
def conv(converted, tmp_path) -> Path:
    out = tmp_path / "conv"
    shutil.copytree(converted, out, symlinks=True)
    return out


def test_finished_run_is_reused_only_while_its_inputs_are_unchanged(conv, tmp_path):
    out = tmp_path / "run"
    r1 = T.train(_plain(), conv, out)
    weights = Path(r1["weights"])
    stamp = weights.stat().st_mtime_ns
    assert T.train(_plain(), conv, out) == r1 and weights.stat().st_mtime_ns == stamp  # reused, not retrained
    assert len(list(out.glob("ckpt_*.pt"))) == 1  # the final state, kept as a resume point
    # the final weights deleted, or corrupted: rewritten from the final checkpoint, to the same bytes
    weights.unlink()
    assert T.train(_plain(), conv, out)["weights"] == r1["weights"] and weights.exists()
    weights.write_bytes(b"\0" * 100)
    assert T.train(_plain(), conv, out)["sha256"] == r1["sha256"]
    # a changed setting or a class removed from the converted tree: the finished run is not reused
    with pytest.raises(PinppError, match=r"changed: .*lr 0.4 → 0.5.*--restart"):
        T.train(_plain(lr=0.5), conv, out)
    victim = sorted((conv / "train" / "img").iterdir())[-1]
    victim.unlink()
    with pytest.raises(PinppError, match="changed: input 'images'"):
        T.train(_plain(), conv, out)
    r2 = T.train(_plain(), conv, out, resume=False)
    assert r2["num_classes"] == r1["num_classes"] - 1


def test_changed_init_weights_or_masks_change_the_identity(pseudo_converted, tmp_path):
    conv = tmp_path / "conv"
    shutil.copytree(pseudo_converted, conv, symlinks=True)
    user_init = tmp_path / "my_backbone.pt"  # a user's own weights file: no recorded sha256, so only its bytes tell
    torch.save(T.models.build("plain", "tiny", 6).state_dict(), user_init)
    cfg = _plain(variant="mpm", init=str(user_init))
    out = tmp_path / "run"
    T.train(cfg, conv, out)
    torch.save(T.models.build("plain", "tiny", 6).state_dict(), user_init)  # other random weights, same path
    with pytest.raises(PinppError, match="input 'init'"):
        T.train(cfg, conv, out)
    T.train(cfg, conv, out, resume=False)
    mask = next((conv / "train" / "seg_pseudo_cf").glob("*/*.png"))
    shutil.copy(mask.resolve(), tmp_path / "m.png")
    mask.unlink()
    shutil.copy(tmp_path / "m.png", mask)  # rewritten: a relabelled mask looks like this
    with pytest.raises(PinppError, match="input 'masks'"):
        T.train(cfg, conv, out)


def test_resume_skips_a_corrupt_newest_checkpoint(conv, tmp_path, monkeypatch):
    ref = T.train(_plain(epochs=2), conv, tmp_path / "ref")
    real_step, calls = T.train_step, {"n": 0}

    def dying_step(*a, **k):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(T, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        T.train(_plain(epochs=2), conv, tmp_path / "run")
    monkeypatch.setattr(T, "train_step", real_step)
    ckpts = sorted((tmp_path / "run").glob("ckpt_*.pt"))
    assert len(ckpts) == 2
    ckpts[-1].write_bytes(b"\0" * 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = T.train(_plain(epochs=2), conv, tmp_path / "run")
    assert any("resuming from the checkpoint before it" in str(w.message) for w in caught)
    assert again["sha256"] == ref["sha256"]  # resumed from the earlier checkpoint: the same weights as one run


# ------------------------------------------------------------------ AutoAttack records and ImageNet-C

def _linear(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10)).eval()


def test_attack_records_follow_the_weights_and_images(tmp_path, monkeypatch):
    from pinpp_lib import robust_eval as R
    m = _linear()
    x = torch.rand(12, 3, 8, 8)
    y = R.predict(m, x)
    cfg = R.EvalConfig(threats=("Linf-4/255",), mode="pgd", pgd_steps=3, clean_floor=0.0)
    first = R.evaluate(m, x, y, 10, cfg, tmp_path)
    calls = {"n": 0}
    real = R.pgd_linf

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(R, "pgd_linf", counting)
    assert R.evaluate(m, x, y, 10, cfg, tmp_path) == first and calls["n"] == 0  # reused
    with torch.no_grad():
        m[1].weight.mul_(-1)  # retrained weights: the records are recomputed, not reused
    again = R.evaluate(m, x, y, 10, cfg, tmp_path)
    assert calls["n"] > 0 and again == R.evaluate(m, x, y, 10, cfg, tmp_path / "fresh")
    calls["n"] = 0
    R.evaluate(m, x.flip(0), y.flip(0), 10, cfg, tmp_path)  # other images, same range: recomputed
    assert calls["n"] > 0


def test_a_foreign_attack_resume_point_is_ignored(tmp_path):
    from pinpp_lib import robust_eval as R
    m = _linear(1)
    x = torch.rand(6, 3, 8, 8)
    y = R.predict(m, x)
    cfg = R.EvalConfig(threats=("Linf-4/255",), batch_size=6, clean_floor=0.0)
    tag = "Linf-4_255_autoattack_0-6"
    foreign = {"identity": "0" * 64, "clean": [False] * 6, "apgd-ce": [False] * 6, "apgd-t": [False] * 6,
                    "fab-t": [False] * 6, "square": [False] * 6}
    (tmp_path / f"._state_{tag}.json").write_text(json.dumps(foreign))
    recs = R.evaluate(m, x, y, 10, cfg, tmp_path)
    assert all(r["clean"] for r in recs)  # computed, not taken from the other model's resume point
    assert recs == R.evaluate(m, x, y, 10, cfg, tmp_path / "fresh")


def test_imagenet_c_is_rewritten_when_its_seed_or_images_change(tmp_path):
    from pinpp_lib import corruptions as C
    x = torch.rand(3, 3, 32, 32)
    rels = [f"n01440764/{i}.JPEG" for i in range(3)]
    root = C.write_imagenet_c(tmp_path / "c", x, rels, seed=0, corruptions=("gaussian_noise",), severities=(3,))
    f = root / "gaussian_noise" / "3" / rels[0]
    seed0 = f.read_bytes()
    C.write_imagenet_c(root, x, rels, seed=0, corruptions=("gaussian_noise",), severities=(3,))
    assert f.read_bytes() == seed0
    C.write_imagenet_c(root, x, rels, seed=1, corruptions=("gaussian_noise",), severities=(3,))
    fresh = C.write_imagenet_c(tmp_path / "fresh", x, rels, seed=1, corruptions=("gaussian_noise",), severities=(3,))
    assert f.read_bytes() != seed0 and f.read_bytes() == (fresh / "gaussian_noise" / "3" / rels[0]).read_bytes()
    C.write_imagenet_c(root, x.flip(0), rels, seed=1, corruptions=("gaussian_noise",), severities=(3,))
    assert f.read_bytes() != (fresh / "gaussian_noise" / "3" / rels[0]).read_bytes()
