"""Shared fixtures: a small synthetic release and its conversion (session-scoped; built once)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pinpp_lib.convert import ConvertConfig, convert
from pinpp_lib.synthetic import SynthConfig, generate

SMALL = SynthConfig(classes=6, images_per_class=10, unannotated_per_class=3, val_per_class=2, size=64, seed=3,
                    discard_rate=0.1)


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("synth"), SMALL)


@pytest.fixture(scope="session")
def converted(synth, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted")
    convert(synth / "release", synth / "imagenet" / "train", out, synth / "imagenet" / "val",
            synth / "imagenet" / "val_list.txt", ConvertConfig(seed=1))
    return out


@pytest.fixture
def release_copy(synth, tmp_path) -> Path:
    """A writable copy of the synthetic release + images, for tests that break things."""
    dst = tmp_path / "syn"
    shutil.copytree(synth, dst)
    return dst
