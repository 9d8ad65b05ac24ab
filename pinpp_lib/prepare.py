"""Data preparation (notebook 00): make or verify the data, then convert it (paper §3, facts §1–§3).

With a synthetic path in the settings (smoke) the stand-in release is generated first; otherwise the
real release and ImageNet are checked to be where the settings say. Either way the same
`convert.convert` produces the MPM layout, the segmentation-benchmark COCO files and `parts.json`.
"""
from __future__ import annotations

from pathlib import Path

from . import convert, pretrained, synthetic, table3_released, tiny_experiments
from .config import Settings
from .fileio import PinppError

WHERE = {
    "release": "the PIN++ annotation release (Hugging Face lixiao20/PartImageNetPP: json/, including/, discarded_data.json)",
    "imagenet_train": "ImageNet-1K train images in <wnid>/ folders",
    "imagenet_val": "ImageNet-1K val images (flat or in <wnid>/ folders)",
    "val_list": "the 10-per-class evaluation list, lines '<wnid>/<file> <label>'",
}


def check_inputs(s: Settings) -> None:
    """Fail with one line per missing input, naming the expected path and what belongs there."""
    for name, what in WHERE.items():
        p: Path = getattr(s.paths, name)
        if not p.exists():
            raise PinppError(f"{p}: not found — expected {what}; put it there or pass {name}=PATH "
                             f"(see the data layout in README.md)")


def prepare_data(s: Settings, workers: int | None = None) -> dict:
    """Generate (if synthetic) and convert the data for `s`; return the conversion summary."""
    if s.paths.synthetic is not None:
        synthetic.generate(s.paths.synthetic, s.synth, workers=workers or s.convert.workers)
    if s.weights.standins:
        folder = s.weights.folder(s.paths.data_root)
        if folder is None:
            raise PinppError("weights.standins needs weights.cache (a folder under the data root): stand-in weights are "
                             "never written into the default torch/Hugging Face caches")
        pretrained.write_standins(folder)
        if s.mpm.released and s.paths.released is not None:  # Table 3's released weights, in their published layouts
            table3_released.write_standins(s.paths.released)
        if s.paths.released is not None:  # Table A5's public Tiny-ImageNet WRN, in DM-Improves-AT's format
            tiny_experiments.write_wrn_standin(s.paths.released / tiny_experiments.WRN_FILE)
    check_inputs(s)
    return convert.convert(s.paths.release, s.paths.imagenet_train, s.paths.converted,
                           s.paths.imagenet_val, s.paths.val_list, s.convert)


def few_shot_source(s: Settings) -> tuple[Path, Path]:
    """(release, images) for the few-shot experiments: the PIN++ release and ImageNet train, or — with
    `few_shot.synth` set (smoke) — a synthetic release with more classes than the MPM one, generated here,
    because 5-way episodes need disjoint train and test classes."""
    if s.few_shot.synth is not None:
        root = s.paths.data_root / "synthetic_fewshot"
        synthetic.generate(root, s.few_shot.synth, workers=s.convert.workers)
        return root / "release", root / "imagenet" / "train"
    for name in ("release", "imagenet_train"):
        if not getattr(s.paths, name).exists():
            raise PinppError(f"{getattr(s.paths, name)}: not found — expected {WHERE[name]}")
    return s.paths.release, s.paths.imagenet_train
