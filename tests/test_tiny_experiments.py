"""Notebook 09's experiments (App. F): the runs it plans, the ResNeXt-50 init from torchvision's file, the WRN's
evaluation from a file in DM-Improves-AT's format, Table A5 and Fig. A1 from per-image records."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision

from pinpp_lib import config, models, pretrained, reporting, tiny_pinpp
from pinpp_lib import tiny_experiments as tx
from pinpp_lib.fileio import PinppError
from pinpp_lib.training import load_init, torchvision_v2_weights

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_full_plan_is_table_a5s_two_resnext_runs_and_fig_a1s_resnet_sweep():
    t = config.resolve("full").tiny
    runs = tx.plan(t, "torchvision_v2")
    assert list(runs) == ["rx50_plain", "rx50_mpm", "r50_plain", "r50_mpm", "r50_mpm_lambda0.5", "r50_mpm_lambda2"]
    assert [(c.arch, c.variant, c.lam) for c in runs.values()] == [
        ("rx50", "plain", 1.0), ("rx50", "mpm", 1.0), ("r50", "plain", 1.0), ("r50", "mpm", 1.0), ("r50", "mpm", 0.5),
        ("r50", "mpm", 2.0)]
    assert all(c.adversarial and c.init == "torchvision_v2" and c.transform.size == 224 for c in runs.values())
    # the §4.3 recipe of notebook 05 (its AT config) in every other field; vanilla without the init stage, as there
    at = config.resolve("full").mpm.at
    for c in runs.values():
        assert dataclasses.replace(c, arch=at.arch, variant=at.variant, lam=at.lam,
                                   init_stage_epochs=at.init_stage_epochs) == at
    assert runs["rx50_plain"].init_stage_epochs == 0 and runs["rx50_mpm"].init_stage_epochs == at.init_stage_epochs
    assert tx.table_runs(t) == {"ResNeXt-50 (32×4d) vanilla AT": "rx50_plain", "ResNeXt-50 (32×4d) MPM AT": "rx50_mpm"}
    assert tx.sweep_points(t) == [(0.0, "r50_plain"), (0.5, "r50_mpm_lambda0.5"), (1.0, "r50_mpm"), (2.0, "r50_mpm_lambda2")]


def test_one_architecture_trains_each_distinct_run_once():
    t = config.resolve("smoke").tiny
    assert list(tx.plan(t, "w.pt")) == ["tiny_plain", "tiny_mpm", "tiny_mpm_lambda2"]
    assert set(tx.table_runs(t).values()) <= {run for _, run in tx.sweep_points(t)}


def test_resnext50_starts_from_torchvisions_v2_file(tmp_path):
    """init=torchvision_v2 at arch rx50: torchvision's ResNeXt-50 32×4d V2 file (its own format, read from the torch hub
    folder) fills every tensor of the kit's timm-layout backbone; the 1000-class fc is left out at another size."""
    w = torchvision_v2_weights("rx50")
    assert w.url.endswith("resnext50_32x4d-1a0047aa.pth")
    path = tmp_path / "torch" / "hub" / "checkpoints" / w.url.rsplit("/", 1)[1]
    assert path.name in pretrained.torchvision_files()  # the rehearsal writes its stand-in
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    sd = torchvision.models.resnext50_32x4d().state_dict()
    torch.save(sd, path)
    pretrained.use_cache(tmp_path)
    try:
        net = models.build("plain", "rx50", num_classes=200)
        load_init(net, "torchvision_v2", arch="rx50")
    finally:
        pretrained.use_cache(None)
    own = net.state_dict()
    body = [k for k in own if not k.startswith("fc.")]
    assert body and all(torch.equal(own[k], sd[k]) for k in body)
    assert own["fc.weight"].shape == (200, 2048)
    with pytest.raises(PinppError, match="no weights for arch 'tiny'"):
        torchvision_v2_weights("tiny")


def test_in_release_takes_tiny_imagenets_classes_the_release_has(tmp_path):
    for w in ("n01443537", "n01530575", "n02085620"):  # goldfish and chihuahua are Tiny-ImageNet classes, brambling not
        (tmp_path / "train" / "img" / w).mkdir(parents=True)
    t = config.resolve("smoke").tiny
    got = tx.classes(t, tmp_path)
    assert len(got) == 2 and got == tuple(w for w in tiny_pinpp.TINY_WNIDS if w in {"n01443537", "n02085620"})
    assert tx.classes(dataclasses.replace(t, classes="tiny_imagenet"), tmp_path) == tiny_pinpp.TINY_WNIDS
    empty = tmp_path / "none"
    (empty / "train" / "img" / "n01530575").mkdir(parents=True)
    with pytest.raises(PinppError, match="none of Tiny-ImageNet's 200 classes is in this release"):
        tx.classes(t, empty)


def test_wrn_from_a_file_in_their_format_on_the_same_images(tmp_path):
    """The stand-in is DM-Improves-AT's layout ({"model_state_dict"} of DataParallel(Sequential(model))); the WRN's
    labels are the wnids' places in its sorted logit order, whatever the tree's classes."""
    tree, released = tmp_path / "tree", tmp_path / "released"
    paths = []
    rng = np.random.default_rng(0)
    for w in ("n02085620", "n01443537"):
        (tree / "val_1w" / "img" / w).mkdir(parents=True)
        for i in range(2):
            from PIL import Image
            Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(tree / "val_1w" / "img" / w / f"v{i}.JPEG")
            paths.append(f"{w}/v{i}.JPEG")
    cfg = dataclasses.replace(config.resolve("smoke").tiny, eval=dataclasses.replace(config.resolve("smoke").tiny.eval, pgd_steps=1))
    assert tx.evaluate_wrn(cfg, released, tree, paths) is None
    tx.write_wrn_standin(released / tx.WRN_FILE)
    keys = torch.load(released / tx.WRN_FILE, weights_only=True)["model_state_dict"]
    assert all(k.startswith("module.0.") for k in keys) and len(keys) == len(tiny_pinpp.WideResNetSwish(200).state_dict())
    order = sorted(tiny_pinpp.TINY_WNIDS)
    assert tx.wrn_labels(paths).tolist() == [order.index("n02085620")] * 2 + [order.index("n01443537")] * 2
    listed = list(tiny_pinpp.TINY_WNIDS)
    assert tx.wrn_labels(paths, "file").tolist() == [listed.index("n02085620")] * 2 + [listed.index("n01443537")] * 2
    rec = tx.evaluate_wrn(cfg, released, tree, paths)
    assert len(rec) == 2 * len(paths) and set(rec.threat) == {"Linf-4/255", "Linf-8/255"} and set(rec.run) == {tx.WRN_RUN}
    model = tiny_pinpp.load_dm_checkpoint(released / tx.WRN_FILE)
    with torch.no_grad():
        pred = model(tiny_pinpp.tiny_batch([tree / "val_1w" / "img" / p for p in paths])).argmax(1)
    clean = rec[rec.threat == "Linf-4/255"].sort_values("index").clean.tolist()
    assert clean == (pred == tx.wrn_labels(paths)).tolist()


def _records(run: str, protocol: str, threat: str, clean: list[bool], robust: list[bool | None]) -> list[dict]:
    return [{"run": run, "protocol": protocol, "index": i, "label": 0, "threat": threat, "standard": True, "clean": c,
             "robust": np.nan if r is None else float(r)} for i, (c, r) in enumerate(zip(clean, robust))]


def test_table_a5_and_fig_a1_from_per_image_records():
    t = config.resolve("smoke").tiny
    t = dataclasses.replace(t, eval=dataclasses.replace(t.eval, mode="autoattack"))
    rows = []
    for run, flags in (("tiny_plain", [True, False, False, False]), ("tiny_mpm", [True, True, False, False])):
        for threat in ("Linf-4/255", "Linf-8/255"):
            rows += _records(run, "tableA5", threat, [True, True, True, False], flags if threat == "Linf-4/255" else [False] * 4)
        rows += _records(run, "figA1", "Linf-4/255", [True, True, True, False], flags)
    rows += _records("tiny_mpm_lambda2", "figA1", "Linf-4/255", [True, False, False, False], [False] * 4)
    records = pd.DataFrame(rows)
    trained = {n: {"arch": "tiny", "variant": v, "num_classes": 5} for n, v in (("tiny_plain", "plain"), ("tiny_mpm", "mpm"))}
    a5 = tx.table_a5(records, trained, t, "weights not present: ...").set_index("model")
    plain, mpm = a5.loc["tiny ResNet vanilla AT"], a5.loc["tiny ResNet MPM AT"]
    assert (plain["clean"], plain["Linf-4/255"], mpm["Linf-4/255"], mpm["Linf-8/255"]) == (75.0, 25.0, 50.0, 0.0)
    assert mpm["Linf-4/255 95% CI"] == reporting.accuracy([True, True, False, False]).ci
    tiny = models.build("plain", "tiny", 5)
    assert mpm["params deployed (M)"] == models.count_params(tiny) / 1e6 == plain["params deployed (M)"]
    assert mpm["GFLOPs"] == models.count_flops(tiny, 64) / 1e9 and mpm["input (px)"] == 64
    wrn = a5.loc["WRN-28-10 (Wang et al. 2023), re-evaluated"]
    assert np.isnan(wrn["clean"]) and wrn["evaluation"] == "weights not present" and wrn["input (px)"] == 64
    assert wrn["params deployed (M)"] == models.count_params(tiny_pinpp.WideResNetSwish(200)) / 1e6
    pub = a5.loc["WRN-28-10 (Wang et al. 2023), published"]
    assert (pub["clean"], pub["Linf-8/255"]) == (65.19, 31.30) and np.isnan(pub["Linf-4/255"])
    curve = tx.lambda_curve(records, t)
    assert curve["lambda"].tolist() == [0.0, 1.0, 2.0] and curve.robust.tolist() == [25.0, 50.0, 0.0]
    assert curve.clean.tolist() == [75.0, 75.0, 25.0]
    lo, hi = reporting.wilson(2, 4)
    assert (curve.robust_lo[1], curve.robust_hi[1]) == (100 * lo, 100 * hi)
    assert tx.lambda_curve(records.iloc[:0], t).empty  # nothing finished: an empty curve, plotted as empty axes


def test_end_to_end_on_a_converted_release(pseudo_converted, synth, tmp_path):
    """Tree, three runs (1 step each) from scratch, PGD records, Table A5, Fig. A1 — the notebook's calls."""
    t = config.resolve("smoke").tiny
    t = dataclasses.replace(t, per_class=4, at=dataclasses.replace(t.at, max_steps=1, batch_size=8), jobs=1,
                            eval=dataclasses.replace(t.eval, pgd_steps=1))
    rec = tx.build_tree(t, pseudo_converted, synth / "imagenet" / "val", tmp_path / "tpinpp")
    assert (rec["classes"], rec["train_images"], rec["val_images"]) == (5, 20, 10)
    trained = tx.train_runs(tx.plan(t, "none"), t, tmp_path / "tpinpp", tmp_path)
    assert set(trained) == {"tiny_plain", "tiny_mpm", "tiny_mpm_lambda2"} and all(r["num_classes"] == 5 for r in trained.values())
    paths, x, y = tx.evaluation_set(t, tmp_path / "tpinpp")
    assert len(paths) == len(y) == 10 and x.shape[-1] == 64
    records = tx.evaluate_runs(trained, t, x, y)
    assert len(records[records.protocol == "tableA5"]) == 2 * 2 * 10 and len(records[records.protocol == "figA1"]) == 3 * 10
    a5 = tx.table_a5(records, trained, t, "absent")
    assert a5["clean"][:2].between(0, 100).all()
    tx.plot_lambda(tx.lambda_curve(records, t), tmp_path / "f.png", t.sweep_threat)
    assert (tmp_path / "f.png").stat().st_size > 1000
    # reused: a second call trains nothing
    assert tx.train_runs(tx.plan(t, "none"), t, tmp_path / "tpinpp", tmp_path, train_missing=False).keys() == trained.keys()


def test_mpm_clean_run_init_needs_notebook_05(tmp_path):
    t = config.resolve("smoke").tiny
    with pytest.raises(PinppError, match="clean_vanilla: T-PIN..'s AT runs start from notebook 05's clean run"):
        tx.resolve_init(t, tmp_path)
    assert tx.resolve_init(dataclasses.replace(t, init="none"), tmp_path) == "none"


def test_cli_names_the_runs_of_the_profile(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pinpp_lib", "tiny-train", "rx50_nope", "--data-root", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0 and "unknown run 'rx50_nope'; T-PIN++ runs of this profile: tiny_plain, tiny_mpm, tiny_mpm_lambda2" in out.stderr


def test_tiny_train_under_torchrun(pseudo_converted, synth, tmp_path):
    """`pinpp tiny-train` in two processes (DDP, gloo): rank 0 writes the tree while the other waits at the barrier,
    then both train the run; `--set` takes TinyConfig fields (the recipe under `at.`)."""
    root = tmp_path / "d"
    (root / "synthetic" / "imagenet").mkdir(parents=True)
    (root / "converted").symlink_to(pseudo_converted)
    (root / "synthetic" / "imagenet" / "val").symlink_to(synth / "imagenet" / "val")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29551",
                        "-m", "pinpp_lib", "tiny-train", "tiny_plain", "--data-root", str(root), "--set", "init=none",
                        "--set", "per_class=4", "--set", "at.max_steps=1", "--set", "at.batch_size=8"],
                       capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    done = json.loads((root / "runs" / "tiny" / "tiny_plain" / "done.json").read_text())
    assert done["num_classes"] == 5 and done["config"]["init"] == "none" and done["config"]["max_steps"] == 1
    assert json.loads((root / "runs" / "tiny" / "tpinpp" / "tpinpp.json").read_text())["train_images"] == 20
