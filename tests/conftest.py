"""Shared fixtures: a small synthetic release and its conversion (session-scoped; built once)."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from pinpp_lib.convert import ConvertConfig, convert
from pinpp_lib.synthetic import SynthConfig, generate

ROOT = Path(__file__).resolve().parents[1]
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


@pytest.fixture(scope="session")
def pseudo_converted(converted, tmp_path_factory) -> Path:
    """`converted` plus both pseudo-label folders in the layout notebook 04 writes: real labels linked in,
    every other training image a stand-in pseudo label (its class's first part over the image's centre), so
    that training on real + pseudo labels runs without a segmentation model."""
    import numpy as np
    from PIL import Image

    from pinpp_lib import fileio, layout, masks, pseudo_labels
    out = tmp_path_factory.mktemp("pseudo") / "converted"
    shutil.copytree(converted, out, symlinks=True)
    first_part = {}
    for p in fileio.read_json(out / "parts.json"):
        first_part.setdefault(p["wnid"], p["id"])
    _, _, unlabelled = pseudo_labels.unlabelled_images(out)
    for d in layout.PSEUDO_SEG_DIRS.values():
        pseudo_labels._link_real_labels(out, out / "train" / d)
        for rel, _ in unlabelled:
            with Image.open(out / "train" / "img" / rel) as im:
                w, h = im.size
            lab = np.zeros((h, w), np.uint16)
            lab[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = first_part[rel.split("/")[0]]
            masks.write_label_png(masks.seg_path_for(out / "train" / d, rel), lab)
    return out


@pytest.fixture
def release_copy(synth, tmp_path) -> Path:
    """A writable copy of the synthetic release + images, for tests that break things."""
    dst = tmp_path / "syn"
    shutil.copytree(synth, dst)
    return dst


def scratch_kit(tmp_path: Path, notebooks: dict[str, str]) -> Path:
    """A copy of run_all.sh with a no-op setup step, the real venv, and the given notebooks."""
    import nbformat
    kit = tmp_path / "kit"
    (kit / "scripts").mkdir(parents=True)
    (kit / "notebooks").mkdir()
    shutil.copy(ROOT / "run_all.sh", kit / "run_all.sh")
    (kit / "scripts" / "setup_env.sh").write_text("#!/usr/bin/env bash\n")
    (kit / "scripts" / "setup_env.sh").chmod(0o755)
    (kit / ".venv").symlink_to(Path(sys.prefix))
    for name, code in notebooks.items():
        n = nbformat.v4.new_notebook()
        n.metadata = {"kernelspec": {"name": "pinpp", "display_name": "Python 3 (pinpp)", "language": "python"},
                      "language_info": {"name": "python"}}
        params = nbformat.v4.new_code_cell('PROFILE = "smoke"\nDATA_ROOT = None\nRESULTS_DIR = None')
        params.metadata["tags"] = ["parameters"]
        n.cells = [params, nbformat.v4.new_code_cell(code)]
        nbformat.write(n, kit / "notebooks" / name)
    return kit
