"""The rehearsal profile (issue 13): the full profile's settings on tiny synthetic data.

Tier 1: the profile differs from `full` only in sizes; the pieces it adds (part budget, step caps,
evaluation caps, stand-in weights in the published formats) against literal restatements.
Tier 3 (`-m slow`): every notebook end to end under the rehearsal profile, its runtime reported.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import papermill as pm
import pytest
import torch

from pinpp_lib import config, fileio, pretrained, runmeta, synthetic
from pinpp_lib.fileio import PinppError
from pinpp_lib.synthetic_shapes import ClassTemplate, PartTemplate, Placement

from conftest import ROOT

# Settings the rehearsal may change: sizes (images, steps, batch), devices and loader workers, where data
# and weights come from. Any other difference would make it rehearse another code path than the full profile.
SIZE_KEYS = {
    "synth.classes", "synth.images_per_class", "synth.unannotated_per_class", "synth.val_per_class", "synth.size",
    "synth.parts_total", "synth.discard_rate", "convert.workers", "weights.cache", "weights.standins",
    "mpm.device", "mpm.eval_images", "mpm.at.batch_size", "mpm.at.max_steps", "mpm.at.workers", "mpm.at.log_every",
    "mpm.eval.batch_size", "mpm.eval.clean_floor", "robustness.standins", "robustness.batch_size", "robustness.images",
    "robustness.subset_images",
    "robustness.subset_eval.batch_size", "robustness.subset_eval.clean_floor",
    "robustness.pin_supercategories",  # the stand-in lists of the synthetic classes (the shipped 158 are absent)
    "seg.iters", "seg.batch_size", "seg.workers", "seg.log_every", "seg.test_batch", "seg.eval_images", "seg.device",
    "pseudo.batch_size", "few_shot.synth", "few_shot.batch_size", "few_shot.max_steps", "few_shot.meta_episodes",
    "few_shot.meta_episodes_deepemd",
    "few_shot.eval_episodes", "few_shot.workers", "few_shot.device",
    # Table A3: the release's object boxes stand in for COCO (absent here), 2 epochs with the lr step between them
    "det.dataset", "det.batch_size", "det.epochs", "det.lr_steps", "det.train_images", "det.eval_images", "det.workers",
    # Table A5 / Fig. A1: the release's 2 images per class for Tiny-ImageNet's 500, the evaluation cut as notebook 05's
    "tiny.per_class", "tiny.device", "tiny.eval_images", "tiny.at.batch_size", "tiny.at.max_steps", "tiny.at.workers",
    "tiny.at.log_every", "tiny.eval.batch_size", "tiny.eval.clean_floor",
    "det.device",
}


def _flat(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} → {"a.b": 1}; few_shot.synth (a whole release's settings, or None) stays one value."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and f"{prefix}{k}" != "few_shot.synth":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_rehearsal_differs_from_full_only_in_sizes(tmp_path):
    full = _flat({k: v for k, v in config.resolve("full", data_root=tmp_path).as_dict().items() if k not in ("profile", "paths")})
    reh = _flat({k: v for k, v in config.resolve("rehearsal", data_root=tmp_path).as_dict().items()
                 if k not in ("profile", "paths")})
    config.resolve("smoke", data_root=tmp_path)  # give the process its own weight caches back
    assert full.keys() == reh.keys()
    changed = {k for k in full if full[k] != reh[k]}
    assert changed <= SIZE_KEYS, sorted(changed - SIZE_KEYS)
    # the real sizes the rehearsal exists for
    assert reh["synth.classes"] == 1000 and reh["synth.parts_total"] == 3310
    assert reh["mpm.at.arch"] == "r50" and reh["transform.size"] == 224 and reh["mpm.at.init"] == "torchvision_v2"
    assert reh["seg.image_size"] == 1024 and not reh["seg.pretrained"] and reh["seg.num_fed_classes"] == 50
    assert reh["seg.recipe"] == "paper" and reh["seg.box_head"] == "4conv1fc" and reh["seg.norm"] == "SyncBN"
    assert reh["mpm.eval.threats"] == full["mpm.eval.threats"] and len(reh["mpm.eval.threats"]) == 4
    assert reh["mpm.ablation_mode"] == "autoattack" and len(reh["robustness.mvh_datasets"]) == 17
    assert reh["det.arch"] == "r50" and reh["det.scale"] == (1333, 800) and reh["det.clean_init"] == "torchvision://resnet50"
    assert reh["tiny.at.arch"] == "rx50" and reh["tiny.at.transform.size"] == 224 and reh["tiny.init"] == "torchvision_v2"
    assert reh["tiny.classes"] == "tiny_imagenet" and reh["tiny.eval.mode"] == "autoattack"


def test_rehearsal_results_stay_beside_its_data(tmp_path):
    s = config.resolve("rehearsal", data_root=tmp_path)
    assert s.paths.results == tmp_path / "results" and s.paths.synthetic == tmp_path / "synthetic"
    assert torch.hub.get_dir() == str(tmp_path / "weights" / "torch" / "hub")
    config.resolve("smoke", data_root=tmp_path)
    assert torch.hub.get_dir() != str(tmp_path / "weights" / "torch" / "hub")


def _tpl(n_parts: int) -> ClassTemplate:
    t = ClassTemplate("n0", "generic", "x")
    t.parts = [PartTemplate(f"p{i}", "rect", [Placement(0, 0, 1, 1)]) for i in range(n_parts)]
    return t


def test_part_budget_takes_from_the_largest_classes_in_turn():
    # restated: counts 5, 3, 5, 1 → total 10: sweep 1 takes one from each 5 (4, 3, 4, 1), sweep 2 one from each 4
    assert synthetic.part_budget([_tpl(5), _tpl(3), _tpl(5), _tpl(1)], 10) == [3, 3, 3, 1]
    assert synthetic.part_budget([_tpl(5), _tpl(3), _tpl(5), _tpl(1)], 13) == [4, 3, 5, 1]
    assert synthetic.part_budget([_tpl(2)], None) == [2]
    for bad in (3, 15):
        with pytest.raises(PinppError, match="parts_total"):
            synthetic.part_budget([_tpl(5), _tpl(3), _tpl(5), _tpl(1)], bad)


def test_synthetic_release_carries_the_part_total(tmp_path):
    cfg = synthetic.SynthConfig(classes=5, images_per_class=1, unannotated_per_class=0, val_per_class=0, size=32)
    natural = sum(synthetic.part_budget([synthetic.class_template(w, s, n, 0) for w, s, n in synthetic.synth_classes(5)], None))
    out = synthetic.generate(tmp_path, dataclasses.replace(cfg, parts_total=natural - 3))
    names = fileio.read_json(out / "release" / "category_name.json")
    assert sum(len(v["parts"]) for v in names.values()) == natural - 3
    for wnid in names:  # every included child still has its parent among the class's parts
        rel = fileio.read_json(out / "release" / "json" / f"{wnid}.json")
        cats = {c["name"] for c in rel["categories"]}
        inc = out / "release" / "including" / f"{wnid}.txt"
        for line in (inc.read_text().split() if inc.exists() else []):
            child, parent = line.split(":")
            assert {child, parent} <= cats
        assert {a["category_id"] for a in rel["annotations"]} <= {c["id"] for c in rel["categories"]}


def test_max_steps_caps_each_stage_and_keeps_the_schedule(pseudo_converted, tmp_path):
    from pinpp_lib import training
    cfg = training.TrainConfig(variant="mpm", arch="tiny", epochs=3, batch_size=4, init="none", init_stage_epochs=1,
                               adversarial=True, workers=0, max_steps=2, log_every=1, warmup_epochs=1.0,
                               transform=dataclasses.replace(training.TrainConfig().transform, size=32))
    r = training.train(cfg, pseudo_converted, tmp_path / "run")
    log = fileio.read_json(tmp_path / "run" / "train_log.json")
    assert r["steps"] == 4 and [e["stage"] for e in log] == [0, 0, 1, 1]
    data = training.PartSegDataset(pseudo_converted, seg_dir=cfg.seg_dir)
    spe = len(data) // cfg.batch_size
    lr = cfg.lr * cfg.batch_size / cfg.lr_ref_batch
    # the main stage's lr is the full 3-epoch schedule's, not a 2-step one's
    assert log[3]["lr"] == pytest.approx(training.lr_at(1, 3 * spe, spe, lr, cfg.min_lr, cfg.warmup_lr))
    assert training.identity(cfg, data).sha256 != training.identity(dataclasses.replace(cfg, max_steps=0), data).sha256
    assert "max_steps" not in training.identity(dataclasses.replace(cfg, max_steps=0), data).settings


def test_standin_weights_load_through_the_libraries_own_paths(tmp_path):
    """torchvision's Weights API, mmengine's `torchvision://` loader and timm's HF-hub loader read the stand-ins
    exactly as they would read the published files."""
    import timm
    from mmengine.runner.checkpoint import CheckpointLoader
    from torchvision.models import ResNet50_Weights
    paths = pretrained.write_standins(tmp_path)
    assert {p.name for p in paths} == {"resnet50-11ad3fa6.pth", "resnext50_32x4d-1a0047aa.pth", "resnet50-0676ba61.pth",
                                       "resnet101-63fe2227.pth", "model.safetensors"}
    try:
        pretrained.use_cache(tmp_path)
        sd = ResNet50_Weights.IMAGENET1K_V2.get_state_dict(progress=False)
        own = torch.load(tmp_path / "torch" / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth", weights_only=True)
        assert sd.keys() == own.keys() and all(torch.equal(sd[k], own[k]) for k in sd)
        from torchvision.models import ResNeXt50_32X4D_Weights  # T-PIN++'s Table A5 init
        assert "layer1.0.conv2.weight" in ResNeXt50_32X4D_Weights.IMAGENET1K_V2.get_state_dict(progress=False)
        mm = CheckpointLoader.load_checkpoint("torchvision://resnet101", map_location="cpu")
        assert "layer3.22.conv1.weight" in mm
        vit = timm.create_model(pretrained.VIT, pretrained=True)
        file = pretrained.timm_location(tmp_path) / "snapshots" / pretrained.STANDIN_REVISION / "model.safetensors"
        import safetensors.torch
        ref = safetensors.torch.load_file(str(file))
        assert all(torch.equal(v, ref[k]) for k, v in vit.state_dict().items())
        mtime = file.stat().st_mtime_ns
        pretrained.write_standins(tmp_path)  # present files are kept
        assert file.stat().st_mtime_ns == mtime
    finally:
        pretrained.use_cache(None)


def test_standins_are_never_written_into_a_default_cache(tmp_path):
    from pinpp_lib import prepare
    s = config.resolve("smoke", data_root=tmp_path, overrides={"weights": {"standins": True}})
    with pytest.raises(PinppError, match="weights.cache"):
        prepare.prepare_data(s)


def record_attempt(path: Path, attempt: dict) -> None:
    """Write `attempt` (commit, start, seconds per notebook so far, state) as the last entry of the runtime file's
    "attempts", keeping the earlier attempts: a rehearsal resumed in a later session (PINPP_REHEARSAL_DIR) then
    reports what each attempt ran, and an attempt that failed or was stopped keeps what it measured."""
    before = fileio.read_json(path) if path.exists() else {"attempts": []}
    # a file of the earlier format ({notebook: seconds, "total"}) is one passed attempt of an unknown start
    runs = before["attempts"] if "attempts" in before else [{"started": "?", "state": "passed", "seconds": before}]
    runs = [r for r in runs if r["started"] != attempt["started"]] + [attempt]
    fileio.write_json(path, {"note": "seconds per notebook and attempt; an attempt reuses every job an earlier one "
                                     "finished, so its times count only what ran again", "attempts": runs}, indent=1)


@pytest.mark.slow
def test_rehearsal_runs_every_notebook(tmp_path):
    """Every notebook under the rehearsal profile; the runtime per notebook is written to
    <results>/rehearsal_runtime.json after each notebook (`record_attempt`) and printed. PINPP_REHEARSAL_DIR=<folder>:
    data and results there, kept, so that a second attempt reuses every finished job (its times then count only what
    ran again; the file keeps every attempt's)."""
    keep = os.environ.get("PINPP_REHEARSAL_DIR")
    base = Path(keep) if keep else tmp_path
    data, results = base / "data", base / "results"
    (results / "executed").mkdir(parents=True, exist_ok=True)  # papermill writes into an existing folder only
    runtime = results / "rehearsal_runtime.json"
    attempt = {**runmeta.git_commit(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "state": "running",
               "seconds": {}}
    times = attempt["seconds"]
    try:
        for nb in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
            t0, ran = time.time(), False
            try:
                pm.execute_notebook(str(nb), str(results / "executed" / nb.name), kernel_name="pinpp",
                                    cwd=str(ROOT / "notebooks"), progress_bar=False,
                                    parameters={"PROFILE": "rehearsal", "DATA_ROOT": str(data), "RESULTS_DIR": str(results)})
                ran = True
            finally:  # also when it failed or was stopped (Ctrl-C): the time it ran is measured
                times[nb.stem] = round(time.time() - t0, 1)
                record_attempt(runtime, attempt if ran else {**attempt, "state": f"{nb.stem} did not finish"})
        attempt.update(state="every notebook ran", total=round(sum(times.values()), 1))  # the checks below follow
        record_attempt(runtime, attempt)
        print("rehearsal runtime (s):", json.dumps(times), "total", attempt["total"])
        t3 = (results / "table3_mpm_autoattack.csv").read_text()
        assert "vanilla AT" in t3 and "MPM AT" in t3 and "L1-75" in t3 and "Linf-8/255" in t3
        # every released model (the authors' two, the zoo's seven) imported from its stand-in file and measured
        assert t3.count("measured (released weights)") == 9 and "weights not present" not in t3
        meta = json.loads((results / "run_meta" / "05_mpm_adversarial_training.json").read_text())
        assert meta["profile"] == "rehearsal"
        done = json.loads((data / "runs" / "mpm" / "at_mpm" / "done.json").read_text())
        assert done["num_classes"] == 1000 and done["seg_classes"] == 3311 and done["arch"] == "r50"
        assert "no image of these classes" not in (results / "table4_pin_subset.csv").read_text()
        for name in ("table9_part_segmentation", "table10_object_segmentation", "table6_left_pseudo_labels", "table7_bypass_variants",
                     "tableA1_imagenet_c", "table8_model_vs_human", "table4_pin_subset", "table12_few_shot_5shot",
                     "tableA3_detection_transfer", "tableA5_tiny_pinpp"):
            assert (results / f"{name}.csv").exists(), name
        a5 = (results / "tableA5_tiny_pinpp.csv").read_text()  # ResNeXt-50 at 224 from torchvision's file, the WRN measured
        assert "ResNeXt-50 (32×4d) MPM AT" in a5 and "public weights (measured here)" in a5
        done = json.loads((data / "runs" / "tiny" / "rx50_mpm" / "done.json").read_text())
        assert done["num_classes"] == 200 and done["arch"] == "rx50"
    finally:
        if not keep:
            shutil.rmtree(data, ignore_errors=True)  # ≈ 15 GB of full-size checkpoints; pytest keeps its last three tmp folders


def test_table8_on_a_spread_of_images_cuts_the_trials_only_when_asked():
    """RobustnessConfig.images (rehearsal) decides on a spread of each model-vs-human set; Table 8 then scores the
    trials of those images. Without the cap a missing decision stays an error (full profile)."""
    import pandas as pd

    from pinpp_lib import human_consistency as H
    from pinpp_lib import robustness as rb
    from pinpp_lib.ood_sets import spread
    trials = H.load_trials(datasets=["colour"])
    keys = spread(sorted(set(zip(trials["key"], trials["condition"], trials["category"]))), 16)
    assert len(keys) == 16 and len({c for _, c, _ in keys}) == trials["condition"].nunique()  # every condition kept
    decisions = pd.concat([pd.DataFrame({"model": m, "dataset": "colour", "key": [k for k, _, _ in keys],
                                         "condition": [c for _, c, _ in keys], "category": [g for _, _, g in keys],
                                         "decision": [g for _, _, g in keys]}) for m in rb.MODELS])
    t8, per = rb.table8(decisions, ("colour",), pd.DataFrame(), images=16)
    assert set(per["model"]) >= set(rb.MODELS) and len(t8) == len(rb.MODELS) + 1
    assert (t8.set_index("model").loc[list(rb.MODELS), "accuracy_difference"] >= 0).all()
    with pytest.raises(PinppError, match="no model decision"):
        rb.table8(decisions, ("colour",), pd.DataFrame())


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    """scripts/gpu_check.sh --cpu (issue 19): every step runs at CPU sizes and one JSON report comes out; the gpu tier
    is skipped without CUDA, mmdet's step reports why it is skipped or what to run."""
    out = tmp_path / "out"
    r = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), str(out), "--cpu"], capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    report = json.loads((out / "gpu_report.json").read_text())
    steps = {s["step"]: s["rc"] for s in report["steps"]}
    assert list(steps) == ["gpu_tests", "bench_train", "profile", "bench_data", "torchrun", "mmdet"]
    assert steps["bench_train"] == steps["profile"] == steps["bench_data"] == steps["torchrun"] == steps["mmdet"] == 0, steps
    assert steps["gpu_tests"] in (0, 5)  # 5: every test skipped (no CUDA here)
    assert report["bench_train"]["mpm_at_over_vanilla_at"] > 0 and report["bench_data"]["loader_img_mask_s"] > 0
    assert report["profile"]["ratio"] > 0 and report["profile"]["added_ops_ms"]


def test_record_attempt_keeps_earlier_attempts_and_updates_the_running_one(tmp_path):
    """The rehearsal's runtime file: one entry per attempt, the running one rewritten as notebooks finish."""
    path = tmp_path / "rehearsal_runtime.json"
    first = {"commit": "a", "started": "2026-12-01T10:00:00Z", "state": "00_x did not finish", "seconds": {"00_x": 5.0}}
    path.write_text(json.dumps({"00_x": 9.0, "total": 9.0}))  # the earlier format
    record_attempt(path, first)
    second = {"commit": "b", "started": "2026-12-02T10:00:00Z", "state": "running", "seconds": {"00_x": 1.0}}
    record_attempt(path, second)
    record_attempt(path, {**second, "state": "passed", "seconds": {"00_x": 1.0, "01_y": 2.0}, "total": 3.0})
    runs = json.loads(path.read_text())["attempts"]
    assert runs[0] == {"started": "?", "state": "passed", "seconds": {"00_x": 9.0, "total": 9.0}}
    runs = runs[1:]
    assert [r["commit"] for r in runs] == ["a", "b"] and runs[0] == first
    assert runs[1]["state"] == "passed" and runs[1]["seconds"] == {"00_x": 1.0, "01_y": 2.0} and runs[1]["total"] == 3.0
