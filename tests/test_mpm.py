"""MPM models, loss, PGD, training (resume, DDP) and AutoAttack evaluation."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from pinpp_lib import checkpoint, losses, models, robust_eval
from pinpp_lib.attacks import pgd_linf
from pinpp_lib.datasets import TransformConfig
from pinpp_lib.fileio import PinppError
from pinpp_lib.training import TrainConfig, load_init, load_trained, lr_at, train

ROOT = Path(__file__).resolve().parents[1]


def test_r50_param_counts_and_shapes():
    m = models.build("mpm", "r50", 1000, 3311)
    assert abs(models.count_params(m.backbone) / 1e6 - 25.6) < 0.05  # paper: 25.6M
    assert round(models.count_params(m.bypass) / 1e6, 3) == 4.524   # authors' code (facts §5b); paper ≈ 4.5M
    m.train()
    logits, segs = m(torch.rand(1, 3, 224, 224))
    assert logits.shape == (1, 1000) and [s.shape[-1] for s in segs] == [28, 14, 7] and segs[0].shape[1] == 3311


@pytest.mark.parametrize("variant,scales", [("mpm", [8, 4, 2]), ("mpm_sv1", [2]), ("mpm_sv2", [4, 2]),
                                            ("mpm_sv3_notd", [8, 4, 2]), ("twostage", [2])])
def test_variants_registered_in_timm(variant, scales):
    m = timm.create_model(f"{variant}_tiny", num_classes=5, seg_classes=7).train()
    logits, segs = m(torch.rand(2, 3, 64, 64))
    assert logits.shape == (2, 5) and [s.shape[-1] for s in segs] == scales and all(s.shape[1] == 7 for s in segs)
    m.eval()
    assert m(torch.rand(2, 3, 64, 64)).shape == (2, 5)  # eval: classification only


def test_top_down_changes_parameters():
    with_td = models.count_params(models.build("mpm", "tiny", 5, 7).bypass)
    without = models.count_params(models.build("mpm_sv3_notd", "tiny", 5, 7).bypass)
    assert with_td > without


def test_export_deployable_loads_into_timm_resnet50():
    m = models.build("mpm", "r50", 1000, 3311).eval()
    d = models.export_deployable(m)
    ref = timm.create_model("resnet50", act_layer="gelu")
    res = ref.load_state_dict(d.state_dict())
    assert not res.missing_keys and not res.unexpected_keys
    assert models.count_params(d) == models.count_params(ref)
    x = torch.rand(2, 3, 224, 224)
    assert torch.allclose(m(x), d(x))
    # [0, 1] input, normalised inside: the plain timm model needs the normalisation done outside
    mean, std = torch.tensor(models.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(models.IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(ref.eval()((x - mean) / std), d(x), atol=1e-5)
    with pytest.raises(ValueError):
        models.export_deployable(models.build("twostage", "tiny", 5, 7))


def test_mpm_loss_parts_and_blank_weights():
    torch.manual_seed(0)
    logits, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    masks = torch.randint(0, 7, (4, 32, 32))
    segs = [torch.randn(4, 7, 8, 8), torch.randn(4, 7, 4, 4), torch.randn(4, 7, 2, 2)]
    total, parts = losses.mpm_loss(logits, segs, y, masks, torch.ones(4))
    assert torch.allclose(parts["ce"], F.cross_entropy(logits, y, label_smoothing=0.1))
    assert torch.allclose(total, parts["ce"] + parts["focal"]) and parts["focal"] > 0
    # a zero-weight image counts in the mean's denominator: one image of four → a quarter of the mean
    one, p1 = losses.mpm_loss(logits[:1], [s[:1] for s in segs], y[:1], masks[:1], torch.ones(1))
    _, p2 = losses.mpm_loss(logits, segs, y, masks, torch.tensor([1.0, 0, 0, 0]))
    assert torch.allclose(p2["focal"], p1["focal"] / 4)


def test_pgd_stays_in_ball_and_raises_loss():
    torch.manual_seed(0)
    m = models.build("plain", "tiny", 5).train()
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 5, (8,))
    xa = pgd_linf(m, x, y, 4 / 255, 5, 1 / 255)
    assert m.training  # mode restored
    assert (xa - x).abs().max() <= 4 / 255 + 1e-6 and xa.min() >= 0 and xa.max() <= 1
    m.eval()
    with torch.no_grad():
        assert F.cross_entropy(m(xa), y) > F.cross_entropy(m(x), y)


def test_lr_schedule():
    assert lr_at(0, 100, 10, 1.0, 0.01, 0.001) == pytest.approx(0.001) and lr_at(5, 100, 10, 1.0, 0.01, 0.001) == pytest.approx(0.5005)
    assert lr_at(10, 100, 10, 1.0, 0.01, 0.001) == pytest.approx(0.01 + 0.495 * (1 + math.cos(math.pi * 0.1)))
    assert lr_at(99, 100, 10, 1.0, 0.01) == pytest.approx(0.01, abs=0.001)


def test_offline_pretrained_init_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(PinppError, match="cannot be downloaded"):
        load_init(models.build("plain", "r50"), "torchvision_v2")


def _cfg(**kw) -> TrainConfig:
    base = dict(variant="mpm", arch="tiny", seg_dir="seg", epochs=2, batch_size=8, lr=0.8, init="none", init_stage_epochs=1, workers=0,
                ema_decay=0.9, ckpt_every=3, log_every=1, adversarial=True, transform=TransformConfig(size=32))
    return TrainConfig(**{**base, **kw})


def test_train_writes_weights_only_checkpoints(converted, tmp_path, monkeypatch):
    import pinpp_lib.training as T
    seen: list[Path] = []
    real_save = checkpoint.save

    def recording_save(*args, **kwargs) -> Path:
        seen.append(real_save(*args, **kwargs))
        assert checkpoint.load(seen[-1])  # weights-only loadable; the sha256 in its name is checked
        return seen[-1]

    monkeypatch.setattr(T.checkpoint, "save", recording_save)
    r = train(_cfg(), converted, tmp_path / "run")
    assert r["steps"] > 0 and json.loads((tmp_path / "run" / "done.json").read_text())["weights"]
    assert seen and len(list((tmp_path / "run").glob("ckpt_*.pt"))) == 1  # only the final state is kept
    m, meta = load_trained(tmp_path / "run")
    assert meta["num_classes"] == 6 and not m.training
    assert train(_cfg(), converted, tmp_path / "run") == r  # finished: a no-op
    with pytest.raises(PinppError, match=r"holds a finished run whose changed: lam 1.0 → 2.0"):
        train(_cfg(lam=2.0), converted, tmp_path / "run")
    ck = real_save(tmp_path / "c", {"w": torch.ones(2)}, 7)
    bad = ck.with_name(ck.name.replace(ck.stem.rsplit("_", 1)[1], "0" * 12))
    ck.rename(bad)
    with pytest.raises(PinppError, match="does not match"):
        checkpoint.load(bad)


def test_weights_files_are_checked_against_their_recorded_sha256(tmp_path):
    sd = {"w": torch.arange(4.0)}
    hashed = checkpoint.save_weights(tmp_path / "init_backbone", sd, {"from_run": "clean"})
    ckpt = checkpoint.save(tmp_path / "c", sd, 3)
    foreign = tmp_path / "user_weights.pt"
    torch.save(sd, foreign)
    for f in (hashed, ckpt, foreign):
        assert torch.equal(checkpoint.load(f)["w"], sd["w"])
    for f in (hashed, ckpt):  # same size, other bytes: only the recorded hash can tell
        torch.save({"w": torch.arange(4.0) + 1}, f)
        with pytest.raises(PinppError, match="does not match"):
            checkpoint.load(f)


_TRAIN_SCRIPT = """
import sys, torch
from pinpp_lib.training import TrainConfig, train
from pinpp_lib.datasets import TransformConfig
torch.set_num_threads(1)
cfg = TrainConfig(variant="mpm", arch="tiny", seg_dir="seg", epochs=3, batch_size=8, lr=0.8, init="none", init_stage_epochs=1, workers=0,
                  ema_decay=0.9, ckpt_every=2, log_every=1, adversarial=True, transform=TransformConfig(size=32))
train(cfg, sys.argv[1], sys.argv[2])
"""


def _final_state(out: Path) -> dict[str, torch.Tensor]:
    meta = json.loads((out / "ema.json").read_text())
    return checkpoint.load(out / meta["weights"], meta["sha256"])


def test_kill_9_then_resume_gives_identical_weights(converted, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "-c", _TRAIN_SCRIPT, str(converted), str(ref)], check=True, env=env,
                   capture_output=True)
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-c", _TRAIN_SCRIPT, str(converted), str(out)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("ckpt_*.pt"))) < 2:
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (out / "done.json").exists()
    subprocess.run([sys.executable, "-c", _TRAIN_SCRIPT, str(converted), str(out)], check=True, env=env, capture_output=True)
    a, b = _final_state(ref), _final_state(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_two_cpu_processes(converted, tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(_TRAIN_SCRIPT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                        str(script), str(converted), str(tmp_path / "ddp")], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    done = json.loads((tmp_path / "ddp" / "done.json").read_text())
    single = train(_cfg(epochs=3, ckpt_every=2), converted, tmp_path / "single")
    # two processes of batch 8 take half as many steps per epoch as one process of batch 8
    assert done["steps"] < single["steps"]
    m, _ = load_trained(tmp_path / "ddp")
    assert all(torch.isfinite(v).all() for v in m.state_dict().values() if v.dtype.is_floating_point)


def test_autoattack_records_match_direct_pyautoattack(tmp_path):
    from pyautoattack import AutoAttack
    torch.manual_seed(0)
    # a linear model keeps all four stages cheap; its margins vary, so some images survive each stage
    m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10)).eval()
    with torch.no_grad():
        m[1].weight.mul_(0.5)
    x = torch.rand(12, 3, 8, 8)
    y = robust_eval.predict(m, x)  # clean-correct, so every stage gets work
    y[:2] = (y[:2] + 1) % 10       # and two clean mistakes
    cfg = robust_eval.EvalConfig(threats=("Linf-4/255",), batch_size=5, clean_floor=0.0)
    recs = robust_eval.evaluate(m, x, y, 10, cfg, tmp_path)
    adversary = AutoAttack(m, norm="Linf", eps=4 / 255, version="standard", seed=0)
    x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=5)
    direct = (robust_eval.predict(m, x_adv) == y).tolist()
    assert sum(r["apgd-ce"] for r in recs) >= 2  # later stages get work too
    assert [r["robust"] for r in recs] == direct
    assert [r["clean"] for r in recs] == (robust_eval.predict(m, x) == y).tolist()
    for r in recs:  # monotone: once fooled, never robust again
        flags = [r["clean"]] + [r[s] for s in robust_eval.STAGES]
        assert flags == sorted(flags, reverse=True)
    again = robust_eval.evaluate(m, x, y, 10, cfg, tmp_path)  # resumed from the finished shard
    assert again == recs
    with pytest.raises(PinppError, match="at least 10 classes"):
        robust_eval.evaluate(m, x, y, 4, cfg, tmp_path / "few")


@pytest.mark.parametrize("threat,norm,eps", [("L2-2.0", "L2", 2.0), ("L1-75", "L1", 75.0)])
def test_autoattack_l2_l1_match_direct(tmp_path, threat, norm, eps):
    from pyautoattack import AutoAttack
    torch.manual_seed(1)
    m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10)).eval()
    x = torch.rand(8, 3, 8, 8)
    y = robust_eval.predict(m, x)
    recs = robust_eval.evaluate(m, x, y, 10, robust_eval.EvalConfig(threats=(threat,), batch_size=8, clean_floor=0.0), tmp_path)
    x_adv, _ = AutoAttack(m, norm=norm, eps=eps, version="standard", seed=0).run_standard_evaluation(x, y, batch_size=8)
    assert [r["robust"] for r in recs] == (robust_eval.predict(m, x_adv) == y).tolist()


def test_clean_floor_and_pgd_mode(tmp_path):
    torch.manual_seed(0)
    m = models.build("plain", "tiny", 4).eval()
    x = torch.rand(8, 3, 32, 32)
    y = (robust_eval.predict(m, x) + 1) % 4  # all wrong
    with pytest.raises(PinppError, match="below the floor"):
        robust_eval.evaluate(m, x, y, 4, robust_eval.EvalConfig(threats=("Linf-4/255",), mode="pgd"), tmp_path)
    y = robust_eval.predict(m, x)
    recs = robust_eval.evaluate(m, x, y, 4, robust_eval.EvalConfig(threats=("Linf-4/255",), mode="pgd", pgd_steps=3), tmp_path)
    assert all(not r["standard"] for r in recs) and "pgd-3" in recs[0]
    s = robust_eval.summarise(recs)["Linf-4/255"]
    assert s["n"] == 8 and s["robust_lo"] <= s["robust"] <= s["robust_hi"] and not s["standard"]


def test_wilson_and_paired_ci():
    lo, hi = robust_eval.wilson(50, 100)
    assert lo == pytest.approx(0.404, abs=0.002) and hi == pytest.approx(0.596, abs=0.002)
    import numpy as np
    a, b = np.ones(200), np.zeros(200)
    mean, lo, hi = robust_eval.paired_diff_ci(a, b)
    assert mean == lo == hi == 1.0


def test_pgd_records_do_not_depend_on_the_process_rng(tmp_path):
    """PGD dev mode draws each batch's random start from (seed, index): the same records whatever the global RNG
    state (notebook 05 evaluates runs in worker processes), the same in two shards as in one call, and the global
    RNG untouched."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4)).eval()
    x = torch.rand(12, 3, 8, 8)
    y = robust_eval.predict(m, x)
    cfg = robust_eval.EvalConfig(threats=("Linf-8/255",), mode="pgd", pgd_steps=1, clean_floor=0.0, batch_size=4)

    def records(work, lo=0, hi=12):
        return [r["robust"] for r in robust_eval.evaluate_threat(m, x[lo:hi], y[lo:hi], "Linf-8/255", cfg, tmp_path / work, lo)]
    torch.manual_seed(1)
    a = records("a")
    torch.manual_seed(2)
    before = torch.random.get_rng_state()
    b = records("b")
    assert a == b and torch.equal(before, torch.random.get_rng_state())
    assert records("c", 0, 4) + records("c", 4, 12) == a
