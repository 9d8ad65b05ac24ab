"""The `pinpp` console command (same functions the notebooks call)."""
from __future__ import annotations

import json
import subprocess
import sys


def _pinpp(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pinpp_lib", *args], capture_output=True, text=True)


def test_synth_convert_stats(tmp_path):
    r = _pinpp("synth", "--out", str(tmp_path / "s"), "--classes", "3", "--images-per-class", "4",
               "--unannotated-per-class", "1", "--val-per-class", "1", "--size", "48", "--seed", "2")
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "s" / "release" / "json").glob("*.json"))) == 3
    r = _pinpp("convert", "--annotations", str(tmp_path / "s" / "release"), "--imagenet-train",
               str(tmp_path / "s" / "imagenet" / "train"), "--imagenet-val", str(tmp_path / "s" / "imagenet" / "val"),
               "--val-list", str(tmp_path / "s" / "imagenet" / "val_list.txt"), "--out", str(tmp_path / "c"), "--skip-bad")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["classes"] == 3 and summary["val_images"] == 3
    r = _pinpp("stats", "--annotations", str(tmp_path / "s" / "release"))
    assert r.returncode == 0 and "Table 1" in r.stdout and '"object categories": 3' in r.stdout


def test_usage_errors():
    r = _pinpp("convert", "--annotations", "x")
    assert r.returncode == 2 and "required" in r.stderr
    r = _pinpp("synth", "--out", "/tmp/never-made", "--classes", "0")
    assert r.returncode == 2 and r.stderr.strip() == "pinpp synth: error: SynthConfig.classes = 0: expected a value between 1 and 1000; set a valid value"


def test_human_consistency_command(tmp_path):
    r = _pinpp("human-consistency", "--dataset", "sketch")
    assert r.returncode == 0 and "human noise ceiling" in r.stdout and "sketch" in r.stdout
    bad = tmp_path / "d.csv"
    bad.write_text("dataset,decision\nsketch,dog\n")
    r = _pinpp("human-consistency", "--decisions", str(bad), "--dataset", "sketch")
    assert r.returncode == 2 and "missing column(s) ['key']" in r.stderr


def test_set_parsing_and_unknown_run():
    from pinpp_lib.cli import _parse_sets
    assert _parse_sets(["epochs=3", "transform.size=32", "init=none", "lam=0.5"]) == {
        "epochs": 3, "transform": {"size": 32}, "init": "none", "lam": 0.5}
    r = _pinpp("train", "--run", "nope", "--data-root", "/tmp/never-made")
    assert r.returncode == 2 and "unknown run 'nope'" in r.stderr


def test_run_names_pass_through_torchrun():
    """torchrun's parser takes `--run` for an abbreviation of its `--run-path`: the run name is positional, as README shows."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", "29547",
                        "-m", "pinpp_lib", "train", "nope", "--data-root", "/tmp/never-made"], capture_output=True, text=True)
    assert "unknown run 'nope'" in r.stderr and "ambiguous option" not in r.stderr
    r = _pinpp("seg-train", "--model", "mask_rcnn_r50_fpn", "--data-root", "/tmp/never-made")
    assert r.returncode == 2 and "parts_train.json: benchmark file not found; run `pinpp prepare`" in r.stderr


def test_det_train_names_the_coco_layout_under_torchrun(tmp_path):
    """Notebook 08's job: `--row` passes through torchrun, and a full-profile data root without COCO gets one line."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", "29548",
                        "-m", "pinpp_lib", "det-train", "--row", "MPM AT", "--profile", "full", "--data-root", str(tmp_path)],
                       capture_output=True, text=True)
    assert "ambiguous option" not in r.stderr
    assert f"{tmp_path}/coco/annotations/instances_train2017.json: detection annotations not found; expected COCO 2017" in r.stderr
    r = _pinpp("det-train", "--row", "nope")
    assert r.returncode == 2 and "invalid choice: 'nope'" in r.stderr
