"""Robustness beyond AutoAttack (paper App. D and §4.3): what notebook 06 evaluates and how its tables are built.

    Table A1   ImageNet-C: accuracy per corruption (mean over 5 severities), family means
    Table A2   OOD sets: ImageNet-A-Plus, ImageNet-Sketch, Stylized-ImageNet, model-vs-human (16-class)
    Table 8    model-vs-human: accuracy difference, observed and error consistency; human ceiling row,
               published ResNet-50 row
    Table 4    PIN's class subset (logits masked): clean and robust accuracy
    Table 5    PIN's super-categories: clean and robust accuracy

The models are the four of the paper's robustness tables — vanilla and MPM, each clean-trained and
adversarially trained — trained by notebook 05's code (`training.train`; finished runs are reused).
Every number comes from per-image (per-trial) records kept in `results/records/`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch.nn as nn

from . import corruptions, fileio, human_consistency, pin_subsets, plots, reporting
from .checks import Checked, Rule, at_least, between, each, one_of
from . import mpm_experiments as mx
from .corruptions import CORRUPTIONS
from .robust_eval import EvalConfig
from .training import TrainConfig, load_trained

MVH_DATASETS = ("colour", "contrast", "cue-conflict", "edge", "eidolonI", "eidolonII", "eidolonIII", "false-colour",
                "high-pass", "low-pass", "phase-scrambling", "power-equalisation", "rotation", "silhouette", "sketch",
                "stylized", "uniform-noise")
MODELS = {"vanilla": "clean_vanilla", "MPM": "clean_mpm", "vanilla AT": "at_plain", "MPM AT": "at_mpm"}


@dataclass
class RobustnessConfig(Checked):
    """Notebook 06 settings. Dataset paths default to `<data root>/ood/<name>` (see `path`)."""
    corruptions: tuple[str, ...] = CORRUPTIONS
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    imagenet_c: str | None = None         # a downloaded ImageNet-C; None: the kit writes one from the val list
    # the authors' reading (eval_multi_dataset.py; the paper is silent): ImageNet-C's 224-px images through their test
    # transform (resize 256 bicubic, crop 224); 1.0 reads them as the crops they are
    imagenet_c_crop_pct: float = 0.875
    # App. D: ImageNet-C over the whole IN-1K val set ("val"); "eval_list": the evaluation list's images (10 per class)
    imagenet_c_images: str = "val"
    # sets read with the authors' square Resize((256, 256)) + CenterCrop(224) (their ImageNet-A-Plus); () = the kit's
    # eval transform for every set
    square_resize: tuple[str, ...] = ("imagenet_a_plus",)
    imagenet_a_plus: str | None = None
    imagenet_sketch: str | None = None
    stylized_imagenet: str | None = None
    model_vs_human: str | None = None
    pin_subset: str | None = None         # Table 4 class list (pin_subsets.SUBSET_FORMAT)
    # Table 5 super-categories (pin_subsets.SUPER_FORMAT): "pin158", the shipped list of PartImageNet's 158 classes and
    # 11 super-categories; None: <data root>/ood/pin_subsets/pin_supercategories.csv; else a path
    pin_supercategories: str | None = "pin158"
    mvh_datasets: tuple[str, ...] = MVH_DATASETS
    standins: bool = False                # write look-alike OOD sets from the synthetic data (smoke)
    subset_eval: EvalConfig = field(default_factory=lambda: EvalConfig(threats=("Linf-4/255",)))
    batch_size: int = 250
    images: int = 0                       # rehearsal: at most N images per OOD / model-vs-human set, spread over it; 0: all
    subset_images: int = 0                # rehearsal: Tables 4/5 attack at most N of the listed classes' images; 0: all
    seed: int = 0
    LIMITS: ClassVar[dict[str, Rule]] = {"corruptions": each(one_of(*CORRUPTIONS)), "severities": each(between(1, 5)),
                                         "mvh_datasets": each(one_of(*MVH_DATASETS)), "batch_size": at_least(1),
                                         "images": at_least(0), "subset_images": at_least(0), "imagenet_c_crop_pct": between(0.5, 1.0),
                                         "imagenet_c_images": one_of("val", "eval_list"),
                                         "square_resize": each(one_of("imagenet_a_plus", "imagenet_sketch", "stylized_imagenet")),
                                         "seed": at_least(0)}

    def path(self, name: str, data_root: str | Path) -> Path:
        """Where dataset `name` is read from: the explicit setting, else its default under the data root."""
        explicit = getattr(self, name)
        if explicit in pin_subsets.SHIPPED:
            return pin_subsets.shipped(explicit)
        if explicit:
            return Path(explicit)
        defaults = {"imagenet_c": Path("imagenet_c"), "pin_subset": Path("ood/pin_subsets/pin125.txt"),
                    "pin_supercategories": Path("ood/pin_subsets/pin_supercategories.csv")}
        return Path(data_root) / defaults.get(name, Path("ood") / name)


def imagenet_c_set(cfg: RobustnessConfig, data_root: str | Path, imagenet_val: str | Path, classes: list[str],
                   x: Any, rel_paths: list[str], y: Any, size: int, crop_pct: float) -> tuple[Path, list[str], Any]:
    """Table A1's ImageNet-C: (its root, the '<wnid>/<file>' entries read, their labels). `imagenet_c_images`:
    "val" — the whole IN-1K val set (App. D), listed from a downloaded copy or from the val folder, which the kit
    then corrupts chunk by chunk; "eval_list" — the evaluation list, written from its crops `x`. Nothing is
    rewritten while its inputs are unchanged."""
    root = cfg.path("imagenet_c", data_root)
    if cfg.imagenet_c_images == "eval_list":
        if not cfg.imagenet_c:
            corruptions.write_imagenet_c(root, x, rel_paths, cfg.seed, cfg.corruptions, cfg.severities)
        return root, rel_paths, y
    listing = root / cfg.corruptions[0] / str(cfg.severities[0]) if cfg.imagenet_c else Path(imagenet_val)
    rels, labels = corruptions.val_images(listing, classes, cfg.images)
    if not cfg.imagenet_c:
        corruptions.write_imagenet_c_from_files(root, imagenet_val, rels, size, crop_pct, cfg.seed, cfg.corruptions,
                                                cfg.severities)
    return root, rels, labels


def imagenet_c_clean(cfg: RobustnessConfig, models: dict[str, nn.Module], imagenet_val: str | Path, rels: list[str],
                     labels: Any, x: Any, y: Any, size: int, crop_pct: float, device: str) -> list[dict[str, Any]]:
    """Severity 0 (clean) records on ImageNet-C's images: the val files themselves where they are in class folders,
    else (a downloaded ImageNet-C beside a flat val folder) the evaluation list."""
    files = [Path(imagenet_val) / r for r in rels]
    if cfg.imagenet_c_images == "val" and all(f.exists() for f in files):
        return corruptions.clean_records_files(models, files, labels, size, crop_pct, cfg.batch_size, device)
    return corruptions.clean_records(models, x, y, cfg.batch_size, device)


def plan_models(e: mx.ExperimentConfig) -> dict[str, TrainConfig]:
    """The four runs of notebook 05's plan this notebook evaluates: the clean vanilla and clean MPM runs (the
    authors' resnet50_sgd_ori.yaml / resnet50_part_pp_ori.yaml: from scratch, no init stage) and the two AT runs."""
    runs = mx.plan(e)
    return {name: runs[name] for name in ("clean_vanilla", "clean_mpm", "at_plain", "at_mpm")}


def load_models(trained: dict[str, dict], device: str) -> tuple[dict[str, nn.Module], list[str], dict[str, str]]:
    """label → model (eval mode), the shared class list (wnids), and label → weights sha256."""
    models, shas, classes = {}, {}, None
    for label, run in MODELS.items():
        model, meta = load_trained(trained[run]["out"], device)
        if classes is not None and meta["classes"] != classes:
            raise fileio.PinppError(f"{trained[run]['out']}: trained on other classes than the other models; retrain it")
        models[label], shas[label], classes = model, meta["sha256"], meta["classes"]
    return models, list(classes or []), shas


def subset_records(models: dict[str, nn.Module], trained: dict[str, dict], fn: Any, x: Any, y: Any, classes: list[str],
                   lists: Any, cfg: EvalConfig, device: str, images: int = 0) -> pd.DataFrame:
    """Records of `fn` (pin_subsets.evaluate_subset / evaluate_supercategories) for every model; `images`:
    `RobustnessConfig.subset_images`."""
    return pd.DataFrame([{"model": label, **r} for label, model in models.items()
                         for r in fn(model, x, y, classes, lists, cfg, Path(trained[MODELS[label]]["out"]) / "pin_subsets",
                                     device=device, images=images)])


def subset_protocol_note(cfg: EvalConfig) -> str:
    """Tables 4/5's caption note on the attack: the paper states neither ε nor attack for them and the authors' code has
    no script for them, so the kit says which it ran."""
    return (f"Attack: {cfg.mode} at {', '.join(cfg.threats)} — the paper does not state the ε or attack of Tables 4/5 and "
            "the authors' code (LixiaoTHU/PartImageNetPP) has no script for them; the kit uses Table 3's main threat "
            "(set robustness.subset_eval.threats to change it). ")


def accuracy_table(records: pd.DataFrame, threat: str) -> pd.DataFrame:
    """Clean and robust accuracy (%) with 95% Wilson intervals per model."""
    rows = []
    for label in MODELS:
        r = records[(records.model == label) & (records.threat == threat)] if len(records) else records
        if r.empty:  # no evaluation image of the listed classes (pin_subsets warns)
            rows.append({"model": label, "clean": np.nan, "n": 0, "classes": np.nan, threat: np.nan, "95% CI": "",
                         "evaluation": "no image of these classes"})
            continue
        rob = reporting.accuracy(r["robust"])
        rows.append({"model": label, "clean": reporting.accuracy(r["clean"]).value, "n": len(r),
                     "classes": int(r["classes"].iloc[0]), threat: rob.value, "95% CI": rob.ci,
                     "evaluation": reporting.evaluation_label(r)})
    return pd.DataFrame(rows)


def table8(decisions: pd.DataFrame, datasets: tuple[str, ...], paper: pd.DataFrame,
           images: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Table 8 (ours per model, the human noise ceiling, the paper's rows) and the per-condition records.
    `images` (rehearsal, `RobustnessConfig.images`): the decisions cover a spread of each set's images, so the
    trials are cut to those images; otherwise every trial needs a decision (a missing one is an error)."""
    trials = human_consistency.load_trials(datasets=list(datasets))
    if images:
        decided = set(zip(decisions["dataset"], decisions["key"]))
        trials = trials[[k in decided for k in zip(trials["dataset"], trials["key"])]]
    rows, per = [], []
    for label in MODELS:
        d = decisions[decisions.model == label]
        p, agg = human_consistency.model_vs_humans(d, trials)
        per.append(p.assign(model=label))
        rows.append({"model": label, "source": "ours", "datasets": len(datasets), **agg.loc["all"].to_dict()})
    p, agg = human_consistency.human_ceiling(trials)
    per.append(p.assign(model="humans (ceiling)"))
    rows.append({"model": "humans (noise ceiling)", "source": "ours (real human trials)", "datasets": len(datasets),
                 **agg.loc["all"].to_dict()})
    return pd.concat([pd.DataFrame(rows), paper], ignore_index=True), pd.concat(per, ignore_index=True)


def corruption_curve(records: pd.DataFrame, clean: pd.DataFrame | None = None) -> pd.DataFrame:
    """Accuracy (%) per model, family and severity with its 95% Wilson interval over the pooled per-image records of
    the family's corruptions (the same images under each corruption: the interval is a rough guide, not exact);
    severity 0 is the clean accuracy on the same images (`clean`, from `corruptions.clean_records`)."""
    rows = []
    for fam in dict.fromkeys(records["family"]):
        for m in dict.fromkeys(records["model"]):
            r = records[(records.family == fam) & (records.model == m)]
            if clean is not None:
                r = pd.concat([clean[clean.model == m], r], ignore_index=True)
            for sev, g in r.groupby("severity"):
                a = reporting.accuracy(g["correct"])
                rows.append({"model": m, "family": fam, "severity": int(sev), "accuracy": a.value, "lo": a.lo, "hi": a.hi,
                             "n": a.n})
    return pd.DataFrame(rows)


def plot_corruptions(records: pd.DataFrame, path: str | Path, clean: pd.DataFrame | None = None) -> Path:
    """Accuracy against corruption severity (`corruption_curve`): one panel per family, one line per model, bars =
    95% Wilson intervals, the legend beside the panels."""
    plt = plots.pyplot()
    curve = corruption_curve(records, clean)
    families, models = list(dict.fromkeys(curve["family"])), list(dict.fromkeys(curve["model"]))
    colours = plots.palette(models)
    fig, axes = plt.subplots(1, len(families), figsize=(2.6 * len(families) + 1.8, 2.9), sharey=True, squeeze=False)
    for ax, fam in zip(axes[0], families):
        for k, m in enumerate(models):
            c = curve[(curve.family == fam) & (curve.model == m)]
            x = c["severity"].to_numpy(dtype=float) + (k - (len(models) - 1) / 2) * 0.06  # bars side by side
            err = np.vstack([c["accuracy"] - c["lo"], c["hi"] - c["accuracy"]])
            ax.errorbar(x, c["accuracy"], yerr=err, marker="o", ms=3, lw=1.2, capsize=2, color=colours[m], label=m)
        ax.set_title(fam)
        ax.set_xlabel("severity (0 = clean)" if clean is not None else "severity")
    axes[0, 0].set_ylabel("accuracy (%)")
    axes[0, -1].legend(title=f"model (bars: 95% Wilson, ≤ {int(curve['n'].max())} images)", loc="upper left",
                       bbox_to_anchor=(1.02, 1.0), fontsize=7, title_fontsize=7, frameon=False)  # off the data
    fig.tight_layout()
    plots.save(fig, path, dpi=120)
    return Path(path)
