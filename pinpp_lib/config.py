"""The one place that turns a profile ("smoke" | "rehearsal" | "full") into concrete settings.

Each component owns its defaults in its own dataclass (`SynthConfig`, `ConvertConfig`,
`TransformConfig`, ...); defaults are the paper's recipe where the paper has one. A profile here is
only a set of overrides plus the data paths, so nothing else in the kit branches on the profile.

    smoke      the embedded synthetic release, generated on the fly under <data_root>/synthetic; small models
    rehearsal  the full profile's settings and code paths (ResNet-50 at 224 with 1000 classes and PIN++'s 3310 part
               categories, AutoAttack at every threat, the segmentation configs at 1024 px with pretrained backbones,
               all 17 model-vs-human sets) on a synthetic release of 1000 classes, cut to 1-2 steps per training stage
               and a handful of images per evaluation, with stand-in weights in the published formats: every
               full-only branch runs on CPU (slow test tier)
    full       the real release + ImageNet (paths below, or passed explicitly)

Full-profile data layout under `data_root` (default `<repo>/data/full`; override any path):

    pinpp/                    the Hugging Face release (json/, including/, discarded_data.json)
    imagenet/train/<wnid>/    ImageNet-1K train images
    imagenet/val/             ImageNet-1K val images (flat, or in <wnid>/ folders)
    imagenet/val_list.txt     the authors' 10-per-class list, "<wnid>/<file> <label>"
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .convert import ConvertConfig
from .datasets import TransformConfig
from .det_transfer import DetConfig
from .checks import Checked, Rule, SettingError, at_least
from .fileio import PinppError
from .mpm_experiments import ExperimentConfig
from .few_shot import RECIPES as FS_RECIPES
from .few_shot import FewShotConfig
from .pretrained import WeightsConfig, use_cache
from .pseudo_labels import PseudoConfig
from .robustness import RobustnessConfig
from .runmeta import code_mismatch, repo_root
from .seg_recipes import RECIPES
from .segmentation import SegConfig
from .synthetic import SynthConfig
from .tiny_experiments import TinyConfig

PROFILES = ("smoke", "rehearsal", "full")

# Overrides per profile and component. The component defaults are the full (paper) values.
_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "smoke": {
        # 10 classes: standard AutoAttack's targeted stages use 9 target classes. As many unannotated images
        # as annotated ones (PIN++: 100 annotated of ~1300): they carry pseudo labels in every MPM run. Sizes are
        # cut for the whole smoke run's time on 2 cores (README, "Runtime").
        "synth": {"classes": 10, "images_per_class": 40, "unannotated_per_class": 40, "val_per_class": 4},
        "convert": {"workers": 2},
        "transform": {"size": 64},
        "stats": {"figure_images": 8},
        # Notebook 05: a narrow ResNet at 64 px for tens of epochs on 2 CPU cores; the clean run stands in
        # for the pretrained ImageNet weights that initialise the AT runs (no downloads here).
        # The clean run needs its 750 steps: with 8 epochs it stays near chance (17 %) and the AT runs that start from
        # it fall below AutoAttack's clean floor; 30 epochs give 42 %.
        # AutoAttack costs ~1.5 min per model and threat on 20 images (Square's 5000 queries dominate): smoke evaluates
        # 20 of the 40 val images (2 per class) and attacks Table 3's two models at L∞ 4/255 (the threat of the
        # reference rows) side by side; the ablations are checked with PGD-20, flagged non-standard.
        # Independent runs train 2 at a time, one CPU thread each (`jobs`): ~1.5x sooner on 2 cores, and numbers that do
        # not depend on the machine's core count. The same in notebooks 02/03 (segmentation runs) and 07.
        # The AT schedule is the paper's shrunk to 2 epochs: lr warm-up over half an epoch, the PGD step warmed up
        # per epoch over 1 (0 in epoch 0, full in epoch 1), so that the short run still attacks at full strength.
        # Released weights (Table 3's reference rows) are 1000-class ImageNet models: nothing to measure on 10 synthetic
        # classes, so smoke shows their published rows only.
        "mpm": {"clean_epochs": 30, "at_init": "clean_run", "device": "cpu", "jobs": 2, "eval_images": 20,
                "released": False,
                "ablation_mode": "pgd",
                "at": {"arch": "tiny", "epochs": 2, "batch_size": 32, "lr": 1.6, "init_stage_epochs": 1, "workers": 0,
                       "ema_decay": 0.98, "ckpt_every": 100, "log_every": 5, "warmup_epochs": 0.5,
                       "attack_warmup_epochs": 1.0, "transform": {"size": 64, "scale": (0.6, 1.0)}},
                "eval": {"batch_size": 128, "threats": ("Linf-4/255",)}},
        # Notebook 06: look-alike OOD sets written from the synthetic val images (nothing can be downloaded),
        # six of the 17 model-vs-human sets (one per kind: colour, parametric, noise, sketch, style, edges),
        # and PGD-20 for Tables 4/5 (the smoke subsets have < 10 classes, too few for standard AutoAttack).
        "robustness": {"standins": True, "mvh_datasets": ("colour", "contrast", "uniform-noise", "sketch", "stylized", "edge"),
                       "subset_eval": {"mode": "pgd", "batch_size": 128}, "pin_supercategories": None},
        # Notebooks 02-04: the six configs at 1/8 width on 96 px LSJ crops, from scratch (no ImageNet weights
        # here), 40 iterations of batch 4 with 16 RoIs per image and 50 RPN proposals per test image (≈ 0.3 s an
        # iteration for Mask R-CNN, 0.5 s for the cascades, one thread): enough to run every part of the pipeline
        # (warm-up, both lr steps, two checkpoints, resume), not to learn much (AP ≈ 0). At this width the 4conv1fc box
        # head and the normed mask head cost more than the backbone, per RoI: 64 RoIs and 1000 proposals made 02-04
        # ≈ 3x slower.
        # Table 10: Mask R-CNN R50 with two seeds, so that its spread is computed.
        # Federated loss over 15 of the ~40 part categories (the paper's 50 would cover them all and reduce to
        # plain sigmoid CE).
        "seg": {"image_size": 96, "test_short": 75, "test_long": 125, "train_short": 48, "train_long": 64,  # ≈ 1024:800:1333
                "width": 0.125, "vit_depth": 4, "pretrained": False, "iters": 40, "batch_size": 4,
                "lr": 0.02, "warmup_iters": 10, "rois_per_image": 16, "rpn_test_proposals": 50, "num_fed_classes": 15, "workers": 0,
                "ckpt_every": 20, "log_every": 10, "seeds": (0, 1), "object_models": ("mask_rcnn_r50_fpn",), "device": "cpu",
                "pseudo_model": "mask_rcnn_r50_fpn",  # full: §4.1's Swin-B (the rehearsal runs it)
                # 100 detections per image (the code's 300): an untrained smoke model fills every slot, and pasting
                # and encoding 300 masks per image tripled notebooks 02-04; pycocotools scores 100 per image anyway
                "max_dets": 100, "jobs": 2},
        # Notebook 08 (Table A3): the detection set is the synthetic release's object boxes (COCO format, notebook 00);
        # the backbones are notebook 05's tiny classifiers (the clean run as the reference row: no torchvision weights
        # here), the detector at 1/8 width on ≈ 160×96 images, 2 epochs of 4 batches (16 images, 4 replays each) and
        # the paper's attacks (PGD-10 on cls and reg) on 8 evaluation images; two rows train side by side.
        "det": {"dataset": "pinpp_objects", "clean_init": "clean_run", "arch": "tiny", "width": 0.125, "scale": (160, 96),
                "batch_size": 4, "epochs": 2, "lr_steps": (1,), "warmup_iters": 2, "rois_per_image": 32, "train_images": 16,
                "eval_images": 8, "workers": 0, "jobs": 2, "device": "cpu"},
        # Notebook 09 (Table A5, Fig. A1): T-PIN++ from the 5 of Tiny-ImageNet's classes the release has, 40 training
        # images each (every annotated one; the rest are pseudo-labelled), notebook 05's smoke AT recipe and tiny ResNet
        # for both backbones (so Table A5's runs are Fig. A1's λ = 0 and 1), started from notebook 05's clean run (no
        # ImageNet weights here), λ = 2 as the third point; PGD-20 on the 20 val images (5 classes: too few for standard
        # AutoAttack) at both threats, every model attacked (clean floor 0: 2 epochs on 200 images leave some models
        # below 2 × chance, and a row of dashes would exercise nothing).
        "tiny": {"classes": "in_release", "per_class": 40, "init": "mpm_clean_run", "sweep_arch": "tiny", "lambdas": (2.0,),
                 "device": "cpu", "jobs": 2,
                 "at": {"arch": "tiny", "epochs": 2, "batch_size": 32, "lr": 1.6, "init_stage_epochs": 1, "workers": 0,
                        "ema_decay": 0.98, "ckpt_every": 100, "log_every": 5, "warmup_epochs": 0.5,
                        "attack_warmup_epochs": 1.0, "transform": {"size": 64, "scale": (0.6, 1.0)}},
                 "eval": {"mode": "pgd", "batch_size": 128, "clean_floor": 0.0}},
        # The smoke part model scores low after 60 iterations; at the default 0.5 it would paint nothing.
        "pseudo": {"batch_size": 8, "score_thr": 0.05},
        # Notebook 07: its own synthetic release with 20 classes (10 train / 5 val / 5 test; 5-way episodes need
        # disjoint class sets), a narrow ResNet-12 at 40 px, short schedules, 32 test episodes per shot (8 test batches of 4).
        "few_shot": {"synth": SynthConfig(classes=20, images_per_class=20, unannotated_per_class=0, val_per_class=0,
                                          size=64, seed=5),
                     "split": (10, 5, 5), "channels": (16, 32, 64, 128), "channels_deepemd": (16, 32, 64, 128),
                     "branch_channels": (8, 16, 32),
                     "size_meta_baseline": 40, "size_deepemd": 40, "emd_regions": 3, "sfc_steps": 20, "n_query": 5,
                     "pretrain_epochs": 12, "batch_size": 50, "pretrain_lr": 0.05, "meta_episodes": 10, "meta_lr": 0.002,
                     "pretrain_epochs_deepemd": 12, "pretrain_step_deepemd": 3, "meta_episodes_deepemd": 10, "meta_step_deepemd": 1,
                     "eval_episodes": 32, "workers": 0, "device": "cpu", "jobs": 2},
    },
    # The full settings (component defaults) with only sizes cut: images, steps, batch, device. Nothing here picks
    # another code path than the full profile does, except the stand-in weights (written where the jobs look).
    "rehearsal": {
        # 1000 classes with PIN++'s 3310 part categories (3311 segmentation classes with the background); 2 annotated
        # train images per class (the 8:1:1 benchmark split: 1600/200/200), 1 val image; a few discarded images
        # become the pseudo-label targets (no unannotated ones: labelling 1000 images at 1024 px takes an hour on CPU).
        "synth": {"classes": 1000, "images_per_class": 2, "unannotated_per_class": 0, "val_per_class": 1, "size": 128,
                  "parts_total": 3310, "discard_rate": 0.003},
        "convert": {"workers": 2},
        "weights": {"cache": "weights", "standins": True},
        # R50 at 224, the authors' AT recipe, torchvision-V2 init from the stand-in file; 2 steps per stage of batch 4.
        # clean_floor 0: untrained models are attacked anyway, so that every threat's records are written.
        "mpm": {"device": "cpu", "eval_images": 16,
                "at": {"batch_size": 4, "max_steps": 2, "workers": 2, "log_every": 1},
                "eval": {"batch_size": 8, "clean_floor": 0.0}},
        # PIN's class lists: the stand-ins written beside the synthetic data (the shipped 158 real classes are absent)
        # Tables 4/5 attack 2 images of the listed classes: an untrained model is "robust" on its super-category images,
        # so every AutoAttack stage (Square: 5000 queries) runs in full on each — ≈ 40 min per model for 16 images
        "robustness": {"standins": True, "batch_size": 8, "images": 16, "subset_images": 2,
                       "subset_eval": {"batch_size": 8, "clean_floor": 0.0}, "pin_supercategories": None},
        # The six configs at 1024 px LSJ with pretrained backbones (stand-ins), 2 iterations of one image.
        "seg": {"iters": 2, "batch_size": 1, "workers": 1, "log_every": 1, "test_batch": 1, "eval_images": 3, "device": "cpu"},
        "pseudo": {"batch_size": 1},
        # Table A3 at full size (R50, 1333×800, torchvision's R50 from the stand-in file for the reference row) on the
        # release's object boxes (no COCO here): 2 images, 2 epochs (the lr step between them), 1 image attacked.
        "det": {"dataset": "pinpp_objects", "batch_size": 2, "epochs": 2, "lr_steps": (1,), "train_images": 2,
                "eval_images": 1, "workers": 1, "device": "cpu"},
        # T-PIN++ of all 200 classes, 2 training images each (the release's 2 per class), ResNeXt-50 and ResNet-50 at 224
        # from the stand-in torchvision files, 2 steps per stage, AutoAttack at both threats on 16 of its 200 val images;
        # Wang et al.'s WRN from a stand-in file in their checkpoint format.
        "tiny": {"per_class": 2, "device": "cpu", "eval_images": 16,
                 "at": {"batch_size": 4, "max_steps": 2, "workers": 2, "log_every": 1},
                 "eval": {"batch_size": 8, "clean_floor": 0.0}},
        # The authors' 900/50/50 split of 1000 classes, ResNet-12 at 80/84 px; an episode draws 20 images per class
        # (5-shot + 15 queries): 24 per class with 1 % discarded leaves every class ≥ 20 usable (at 20 per class and the
        # generator's 4 %, classes lost one and the loader refused them)
        "few_shot": {"synth": SynthConfig(classes=1000, images_per_class=24, unannotated_per_class=0, val_per_class=0,
                                          size=96, discard_rate=0.01, seed=5),
                     "batch_size": 16, "max_steps": 2, "meta_episodes": 2, "meta_episodes_deepemd": 2, "eval_episodes": 2, "workers": 1,
                     "device": "cpu"},
    },
    "full": {
        "convert": {"workers": max(1, (os.cpu_count() or 1) - 1)},
        "stats": {"figure_images": 12},
    },
}


@dataclass
class StatsConfig(Checked):
    """Dataset-statistics settings (notebook 01)."""
    figure_images: int = 12
    seed: int = 0
    LIMITS: ClassVar[dict[str, Rule]] = {"figure_images": at_least(1), "seed": at_least(0)}


@dataclass
class Paths:
    """Where the data and results live for a run."""
    data_root: Path
    release: Path
    imagenet_train: Path
    imagenet_val: Path
    val_list: Path
    converted: Path
    results: Path
    synthetic: Path | None = None  # smoke only: the generated tree
    released: Path | None = None   # released weights (Table 3's fast path): <data root>/released

    def work(self, job: str, override: str | Path | None = None) -> Path:
        """Folder of a job's trained runs ("mpm", "seg", "few_shot"): `override`, else <data root>/runs/<job>.
        Notebooks and CLI jobs that share runs (05 and 06; 02-04) meet there."""
        return Path(override) if override else self.data_root / "runs" / job


@dataclass
class Settings:
    """Everything a notebook or CLI job needs, resolved from a profile."""
    profile: str
    paths: Paths
    synth: SynthConfig = field(default_factory=SynthConfig)
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    mpm: ExperimentConfig = field(default_factory=ExperimentConfig)
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)
    few_shot: FewShotConfig = field(default_factory=FewShotConfig)
    seg: SegConfig = field(default_factory=SegConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    det: DetConfig = field(default_factory=DetConfig)
    tiny: TinyConfig = field(default_factory=TinyConfig)

    def ready(self, needs: str | None = None) -> str:
        """"data → …, results → …" for a notebook's first output. `needs` ("release" | "converted"): notebook 00's
        output the notebook reads; when it is missing, one line saying to run notebook 00 first (a notebook opened
        on its own before 00 ran), instead of advice about the release's layout."""
        p = self.paths
        if needs not in (None, "release", "converted"):
            raise ValueError(f"needs={needs!r}: 'release', 'converted' or None")
        path = {"release": p.release, "converted": p.converted}.get(needs or "")
        # the full profile's release is the user's download, not notebook 00's output: its own message applies
        if path is not None and not path.exists() and (self.profile != "full" or needs == "converted"):
            what = (f"it converts the release at {p.release}" if self.profile == "full"
                    else "it generates this profile's synthetic data and converts it")
            root = "" if p.data_root == repo_root() / "data" / self.profile else f" --data-root {p.data_root}"
            raise PinppError(f"{path}: not found — run notebook 00 first (`./run_all.sh --profile {self.profile}{root} "
                             f"--only 00`; {what})")
        return f"data → {p.data_root}, results → {p.results}"

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["paths"] = {k: (str(v) if v is not None else None) for k, v in d["paths"].items()}
        return d


def apply_overrides(obj: Any, overrides: dict[str, Any], where: str) -> Any:
    """`obj` with `overrides` applied; a dict given for a dataclass field overrides inside it."""
    names = {f.name for f in dataclasses.fields(obj)}
    bad = set(overrides) - names
    if bad:
        raise PinppError(f"unknown setting(s) {sorted(bad)} for {where}; known: {sorted(names)}")
    try:
        resolved = {k: apply_overrides(getattr(obj, k), v, f"{where}.{k}") if dataclasses.is_dataclass(getattr(obj, k))
                    and isinstance(v, dict) else v for k, v in overrides.items()}
        return dataclasses.replace(obj, **resolved)
    except SettingError as e:  # name the key path the user gave (e.g. `--set transform.size=...`)
        if e.where is None:
            e = SettingError(f"{where}: {e}")
            e.where = where
        raise e from None


def resolve(profile: str = "smoke", data_root: str | Path | None = None, results_dir: str | Path | None = None,
            seed: int | None = None, overrides: dict[str, dict[str, Any]] | None = None, **paths: str | Path) -> Settings:
    """Resolve `profile` into Settings.

    `overrides` is {component: {field: value}} on top of the profile (e.g. {"synth": {"classes": 20}});
    `seed` sets every component's seed; `paths` overrides single paths (release=..., imagenet_train=...).
    """
    if profile not in PROFILES:
        raise PinppError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    root = Path(data_root) if data_root else repo_root() / "data" / profile
    # rehearsal numbers mean nothing: they stay beside its data, never in the kit's results/
    results = Path(results_dir) if results_dir else (root / "results" if profile == "rehearsal" else repo_root() / "results")
    if profile in ("smoke", "rehearsal"):
        syn = root / "synthetic"
        base = Paths(root, syn / "release", syn / "imagenet" / "train", syn / "imagenet" / "val",
                     syn / "imagenet" / "val_list.txt", root / "converted", results, syn)
    else:
        base = Paths(root, root / "pinpp", root / "imagenet" / "train", root / "imagenet" / "val",
                     root / "imagenet" / "val_list.txt", root / "converted", results)
    unknown = set(paths) - {f.name for f in dataclasses.fields(Paths)}
    if unknown:
        raise PinppError(f"unknown path(s) {sorted(unknown)}; known: {[f.name for f in dataclasses.fields(Paths)]}")
    base = dataclasses.replace(base, released=root / "released")
    base = dataclasses.replace(base, **{k: Path(v) for k, v in paths.items() if v is not None})
    s = Settings(profile, base)
    merged: dict[str, dict[str, Any]] = {k: dict(v) for k, v in _OVERRIDES[profile].items()}
    for comp, vals in (overrides or {}).items():
        merged.setdefault(comp, {}).update(vals)
    # the recipes (paper | authors_code: segmentation §5, few-shot §6) set their fields first; the profile's and the
    # user's overrides win
    for comp, default, recipes, section in (("seg", SegConfig.recipe, RECIPES, "§5"),
                                            ("few_shot", FewShotConfig.recipe, FS_RECIPES, "§6")):
        recipe = merged.get(comp, {}).get("recipe", default)
        if recipe not in recipes:
            raise PinppError(f"{comp}.recipe {recipe!r}: choose one of {', '.join(recipes)} (docs/FIDELITY.md, {section})")
        merged[comp] = {**recipes[recipe], **merged.get(comp, {})}
    for comp, vals in merged.items():
        if not hasattr(s, comp) or comp == "paths":
            raise PinppError(f"unknown component {comp!r} in overrides")
        setattr(s, comp, apply_overrides(getattr(s, comp), vals, comp))
    if seed is not None:
        for comp in ("synth", "convert", "stats"):
            setattr(s, comp, dataclasses.replace(getattr(s, comp), seed=seed))
        s.mpm = dataclasses.replace(s.mpm, at=dataclasses.replace(s.mpm.at, seed=seed), eval=dataclasses.replace(s.mpm.eval, seed=seed))
        s.few_shot = dataclasses.replace(s.few_shot, seed=seed)
        s.robustness = dataclasses.replace(s.robustness, seed=seed,
                                           subset_eval=dataclasses.replace(s.robustness.subset_eval, seed=seed))
    mismatch = code_mismatch()
    if mismatch:
        warnings.warn(mismatch, stacklevel=2)
    # torch hub and HF hub of this process and its children (torchrun jobs resolve again); None: the defaults
    use_cache(s.weights.folder(s.paths.data_root))
    return s
