"""Bad input never reaches a traceback (issue 12): each case gives one line naming the input, the record and the fix,
before any work starts."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from pinpp_lib import checkpoint, cli, models
from pinpp_lib.convert import ConvertConfig, convert
from pinpp_lib.fileio import PinppError

from conftest import scratch_kit


def _one_line(capsys, argv: list[str], *expect: str) -> str:
    """`pinpp argv` fails with status 2 and exactly one line on stderr containing each of `expect`."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for e in expect:
        assert e in err, err
    return err


@pytest.fixture
def data_root(converted, tmp_path) -> Path:
    """A data root whose converted/ is the shared synthetic conversion."""
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "converted").symlink_to(converted)
    return tmp_path / "root"


# ------------------------------------------------------------------ settings (--set)

@pytest.mark.parametrize("setting,expect", [
    ("epochs=abc", "TrainConfig.epochs = 'abc': expected an integer"),
    ("batch_size=0", "TrainConfig.batch_size = 0: expected a value ≥ 1"),
    ("lr=-0.1", "TrainConfig.lr = -0.1: expected a value > 0"),
    ("variant=mpm4", "TrainConfig.variant = 'mpm4': expected one of 'plain', 'mpm'"),
    ("attack_warmup=linear", "expected one of 'epoch', 'step'"),
    ("transform.size=big", "train config.transform: TransformConfig.size = 'big': expected an integer"),
    ("transform.scale=(0.9,0.1)", "TransformConfig.scale = (0.9, 0.1): expected values in increasing order"),
    ("label_smoothing=1.5", "TrainConfig.label_smoothing = 1.5: expected a value between 0 and 0.999"),
    ("epoch=3", "unknown setting(s) ['epoch'] for train config"),
])
def test_train_settings_are_checked_before_anything_is_read(capsys, tmp_path, setting, expect):
    # the data root does not even exist: the setting is refused first
    _one_line(capsys, ["train", "at_mpm", "--profile", "full", "--data-root", str(tmp_path / "none"), "--set", setting], expect)


def test_seg_and_eval_settings_are_checked(capsys, tmp_path):
    _one_line(capsys, ["seg-train", "--model", "mask_rcnn_r50_fpn", "--data-root", str(tmp_path), "--set", "iters=0"],
              "SegConfig.iters = 0: expected a value ≥ 1")
    _one_line(capsys, ["pseudo-label", "--data-root", str(tmp_path), "--set", "score_thr=2"],
              "SegConfig.score_thr = 2: expected a value between 0 and 1")


# ------------------------------------------------------------------ train: folders and files

def test_train_without_converted_data_names_the_step(capsys, tmp_path):
    _one_line(capsys, ["train", "at_plain", "--profile", "full", "--data-root", str(tmp_path)],
              "converted/train/img: image folder not found", "pinpp convert")
    _one_line(capsys, ["train", "at_mpm", "--profile", "full", "--data-root", str(tmp_path)],
              "no converted training data (train/img)", "pinpp prepare")


def test_train_with_missing_init_weights(capsys, data_root, pseudo_converted, tmp_path):
    (data_root / "converted").unlink()
    (data_root / "converted").symlink_to(pseudo_converted)
    _one_line(capsys, ["train", "at_plain", "--profile", "full", "--data-root", str(data_root),
                       "--set", f"init={tmp_path / 'nope.pt'}"], "nope.pt: init weights not found")


# ------------------------------------------------------------------ convert

def test_train_root_one_level_too_high_or_low(synth, tmp_path):
    top = tmp_path / "imagenet"
    (top).mkdir()
    (top / "train").symlink_to(synth / "imagenet" / "train")
    with pytest.raises(PinppError, match=r"holds none of the release's 6 class folders .* did you mean .*imagenet/train\?"):
        convert(synth / "release", top, tmp_path / "out")
    one_class = next((synth / "imagenet" / "train").iterdir())
    with pytest.raises(PinppError, match="looks like one class folder itself; pass its parent"):
        convert(synth / "release", one_class, tmp_path / "out")


@pytest.mark.parametrize("content,expect", [(b"\xff\xfe\x00bad", "the val list is not UTF-8 text"),
                                            (b"\n\n", "the val list is empty")])
def test_val_list_not_text_or_empty(synth, tmp_path, content, expect):
    bad = tmp_path / "list.txt"
    bad.write_bytes(content)
    with pytest.raises(PinppError, match=expect):
        convert(synth / "release", synth / "imagenet" / "train", tmp_path / "out", synth / "imagenet" / "val", bad)


def test_val_folder_missing(synth, tmp_path):
    with pytest.raises(PinppError, match="ImageNet val folder not found"):
        convert(synth / "release", synth / "imagenet" / "train", tmp_path / "out", tmp_path / "no_val",
                synth / "imagenet" / "val_list.txt")


def test_convert_options_are_checked():
    with pytest.raises(PinppError, match=r"ConvertConfig.split = \(0.8, 0.1, 0.2\): expected values that sum to 1"):
        ConvertConfig(split=(0.8, 0.1, 0.2))
    with pytest.raises(PinppError, match="ConvertConfig.link = 'hardlink': expected one of 'symlink', 'copy'"):
        ConvertConfig(link="hardlink")


# ------------------------------------------------------------------ eval-aa

def test_eval_aa_inputs(capsys, data_root, tmp_path):
    _one_line(capsys, ["eval-aa", "--run-dir", str(tmp_path / "nothing"), "--data-root", str(data_root)],
              "ema.json: trained model not found", "pinpp train")
    run = tmp_path / "run"
    meta = {"variant": "plain", "arch": "tiny", "num_classes": 3, "seg_classes": 4, "classes": ["n0", "n1", "n2"],
            "config": {"transform": {"size": 32}}}
    checkpoint.save_weights(run / "ema", models.build("plain", "tiny", 3).state_dict(), meta)
    _one_line(capsys, ["eval-aa", "--run-dir", str(run), "--data-root", str(data_root), "--mode", "pgd"],
              "trained on 3 classes", "has 6")
    torch.manual_seed(0)
    from pinpp_lib.datasets import list_image_folder
    classes, _ = list_image_folder(data_root / "converted" / "train" / "img")
    checkpoint.save_weights(run / "ema", models.build("plain", "tiny", 6).state_dict(), {**meta, "num_classes": 6, "classes": classes})
    _one_line(capsys, ["eval-aa", "--run-dir", str(run), "--data-root", str(data_root), "--mode", "pgd", "--start", "50"],
              "--start 50 --end 12: the evaluation list has 12 images")


# ------------------------------------------------------------------ human consistency, OOD readers, class lists

@pytest.mark.parametrize("content,expect", [
    (b"", "decisions file is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "decisions file is not UTF-8 text"),
    (b"dataset,decision\nsketch,dog\n", "missing column(s) ['key']"),
    (b"dataset,imagename,decision\nsketch,0001_sk_dnn_0_cat_1.png,wolf\n", "row 2 decision 'wolf': expected one of airplane"),
    (b"dataset,imagename,decision\nsketchy,0001_sk_dnn_0_cat_1.png,cat\n", "row 2 dataset 'sketchy'"),
    (b"dataset,imagename,decision\nsketch,cat.png,cat\n", "row 2 imagename 'cat.png'"),
])
def test_human_consistency_decisions(capsys, tmp_path, content, expect):
    f = tmp_path / "decisions.csv"
    f.write_bytes(content)
    _one_line(capsys, ["human-consistency", "--decisions", str(f), "--dataset", "sketch"], str(f), expect)


def test_human_trial_files(capsys, tmp_path):
    (tmp_path / "trials" / "sketch").mkdir(parents=True)
    (tmp_path / "trials" / "sketch" / "sketch_subject-01_session_1.csv").write_bytes(b"\xff\xff\xff")
    _one_line(capsys, ["human-consistency", "--trials", str(tmp_path / "trials")], "human trial file is not UTF-8 text")
    _one_line(capsys, ["human-consistency", "--trials", str(tmp_path / "missing")], "trial records not found")


def test_ood_readers(tmp_path):
    from pinpp_lib import ood_sets
    with pytest.raises(PinppError, match="ImageNet-Sketch not found; expected <root>/sketch/<wnid>/<image>"):
        ood_sets.folder_set("imagenet_sketch", tmp_path)
    d = tmp_path / "sketch" / "dnn" / "session-1"
    d.mkdir(parents=True)
    (d / "cat.png").write_bytes(b"x")
    with pytest.raises(PinppError, match="cat.png: not a model-vs-human image name"):
        ood_sets.mvh_images(tmp_path, "sketch")


def test_class_list_files(tmp_path):
    from pinpp_lib import pin_subsets
    f = tmp_path / "pin125.txt"
    f.write_bytes(b"n01440764\n\xff\xfe\n")
    with pytest.raises(PinppError, match="class-subset file is not UTF-8 text"):
        pin_subsets.read_subset(f)
    f.write_text("n01440764\ncat\n")
    with pytest.raises(PinppError, match="line 2 'cat' is not a wnid"):
        pin_subsets.read_subset(f)


# ------------------------------------------------------------------ run_all.sh

@pytest.mark.parametrize("args,expect", [
    (["--only"], "--only needs a value"),
    (["--only", "5"], "--only '5': expected two-digit notebook numbers"),
    (["--profile"], "--profile needs a value"),
    (["--profile", "full", "--data-root", "/nonexistent/pinpp"], "--data-root /nonexistent/pinpp: no such folder"),
    (["--results-dir", "FILE"], "exists and is not a folder"),
    (["--fast"], "unknown argument '--fast'"),
])
def test_run_all_options(tmp_path, args, expect):
    kit = scratch_kit(tmp_path, {"00_a.ipynb": "pass"})
    (tmp_path / "FILE").write_text("x")
    args = [str(tmp_path / "FILE") if a == "FILE" else a for a in args]
    r = subprocess.run(["bash", str(kit / "run_all.sh"), *args], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and expect in r.stderr, r.stderr
