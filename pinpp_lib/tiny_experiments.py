"""The experiments of notebook 09 (paper App. F) on Tiny-PartImageNet++ (`tiny_pinpp.build`).

    Table A5   ResNeXt-50 (32×4d, GELU) vanilla AT vs MPM AT on T-PIN++ at 224 px with the §4.3 recipe: deployed
               parameters, FLOPs, clean and AutoAttack accuracy on the IN-1K val images of its 200 classes; the public
               Tiny-ImageNet WRN-28-10 of Wang et al. 2023 (64 px) re-evaluated on the same images, and its published
               numbers (on Tiny-ImageNet's own val set) as a data row
    Fig. A1    robust and clean accuracy against λ, the focal-loss weight: ResNet-50 MPM AT on T-PIN++ (λ = 0 is vanilla
               AT), as the paper ran it "due to constraints in computational capacity"

Runs are named by what they train (`<arch>_plain`, `<arch>_mpm`, `<arch>_mpm_lambda<λ>`), so that a profile whose two
architectures coincide (smoke) trains each distinct run once. Training and attacks are notebook 05's code
(`mpm_experiments.run_training`, `robust_eval`); only the data (the T-PIN++ tree) and the runs differ.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch

from . import fileio, jobs, models, plots, reporting, robust_eval, tiny_pinpp
from .checks import Checked, Rule, at_least, device_name, each, one_of
from .datasets import val_dataset
from .fileio import PinppError
from .mpm_experiments import ExperimentConfig, backbone_weights, eval_images, evaluate_run, records_frame, run_training
from .robust_eval import EvalConfig
from .training import TrainConfig

WRN_FILE = "tiny_linf_wrn28-10.pt"  # where <released>/ holds Wang et al.'s checkpoint (their file name)
WRN_URL = "https://huggingface.co/wzekai99/DM-Improves-AT1/resolve/main/checkpoint/tiny_linf_wrn28-10.pt"
WRN_RUN = "wrn28_10_wang2023"
PROTOCOLS = ("tableA5", "figA1")  # the records' protocol column: Table A5's threats; Fig. A1's one threat
ARCH_NAMES = {"rx50": "ResNeXt-50 (32×4d)", "r50": "ResNet-50", "tiny": "tiny ResNet"}


@dataclass
class TinyConfig(Checked):
    """What notebook 09 builds, trains and evaluates. `at` is the §4.3 AT recipe (notebook 05's), at ResNeXt-50."""
    classes: str = "tiny_imagenet"  # "in_release": only Tiny-ImageNet's classes the release has (smoke: 5 of its 10)
    per_class: int = 500            # training images per class (Tiny-ImageNet's 500)
    seed: int = 0                   # the draw of the training images (`tiny_pinpp.select_train`)
    at: TrainConfig = field(default_factory=lambda: TrainConfig(arch="rx50"))
    sweep_arch: str = "r50"         # Fig. A1's backbone
    lambdas: tuple[float, ...] = (0.5, 2.0)  # Fig. A1's points besides λ = 0 (vanilla AT) and λ = 1 (MPM)
    init: str = "torchvision_v2"    # the AT runs' init (torchvision's V2 weights of the arch); "mpm_clean_run": the
    #                                 EMA backbone of notebook 05's clean run (profiles without ImageNet weights); a path
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(threats=("Linf-4/255", "Linf-8/255")))
    sweep_threat: str = "Linf-4/255"
    eval_images: int = 0            # N images spread over the evaluation list; 0: every val image of the classes
    wrn_transform: str = "tiny_imagenet"  # how the 64-px WRN sees an IN-1K image (`tiny_pinpp.TINY_TRANSFORMS`)
    wrn_class_order: str = "sorted"  # its logits' classes: sorted wnids (ImageFolder's order) | "file": 200_wnids.txt's
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    jobs: int = 1
    LIMITS: ClassVar[dict[str, Rule]] = {"classes": one_of("tiny_imagenet", "in_release"), "per_class": at_least(1),
                                         "seed": at_least(0), "sweep_arch": one_of(*models.ARCHS),
                                         "lambdas": each(at_least(0)), "sweep_threat": one_of(*robust_eval.THREATS),
                                         "eval_images": at_least(0), "wrn_transform": one_of(*tiny_pinpp.TINY_TRANSFORMS),
                                         "wrn_class_order": one_of("sorted", "file"),
                                         "device": device_name, "jobs": at_least(1)}


def classes(cfg: TinyConfig, converted: str | Path) -> tuple[str, ...]:
    """T-PIN++'s classes: Tiny-ImageNet's 200, or (`in_release`) those of them the converted release has."""
    if cfg.classes == "tiny_imagenet":
        return tiny_pinpp.TINY_WNIDS
    have = {p.name for p in (Path(converted) / "train" / "img").iterdir() if p.is_dir()}
    chosen = tuple(w for w in tiny_pinpp.TINY_WNIDS if w in have)
    if not chosen:
        raise PinppError(f"{converted}: none of Tiny-ImageNet's 200 classes is in this release; use tiny.classes=tiny_imagenet "
                         "with the full release")
    return chosen


def build_tree(cfg: TinyConfig, converted: str | Path, imagenet_val: str | Path, out: str | Path) -> dict:
    """The T-PIN++ tree of this config (`tiny_pinpp.build`, reused while unchanged)."""
    return tiny_pinpp.build(converted, imagenet_val, out, classes(cfg, converted), cfg.per_class, cfg.seed, cfg.at.seg_dir)


def run_name(arch: str, variant: str, lam: float = 1.0) -> str:
    return f"{arch}_{variant}" + (f"_lambda{lam:g}" if variant != "plain" and lam != 1.0 else "")


def table_runs(cfg: TinyConfig) -> dict[str, str]:
    """Table A5's kit rows: label → run."""
    arch = cfg.at.arch
    name = ARCH_NAMES.get(arch, arch)
    return {f"{name} vanilla AT": run_name(arch, "plain"), f"{name} MPM AT": run_name(arch, "mpm")}


def sweep_points(cfg: TinyConfig) -> list[tuple[float, str]]:
    """Fig. A1's (λ, run), λ ascending: 0 is vanilla AT (no part loss), 1 the MPM run."""
    a = cfg.sweep_arch
    return sorted([(0.0, run_name(a, "plain")), (1.0, run_name(a, "mpm"))] + [(lam, run_name(a, "mpm", lam)) for lam in cfg.lambdas])


def plan(cfg: TinyConfig, init: str) -> dict[str, TrainConfig]:
    """Run name → TrainConfig of every AT run (Table A5's two, Fig. A1's), each distinct run once. Vanilla AT has no
    init stage, as in notebook 05 (the authors' vanilla config)."""
    runs = {}
    for arch, variant, lam in [(cfg.at.arch, "plain", 1.0), (cfg.at.arch, "mpm", 1.0), (cfg.sweep_arch, "plain", 1.0),
                               (cfg.sweep_arch, "mpm", 1.0)] + [(cfg.sweep_arch, "mpm", lam) for lam in cfg.lambdas]:
        extra = {"init_stage_epochs": 0} if variant == "plain" else {}
        runs.setdefault(run_name(arch, variant, lam), dataclasses.replace(cfg.at, arch=arch, variant=variant, lam=lam, init=init,
                                                                          adversarial=True, **extra))
    return runs


def resolve_init(cfg: TinyConfig, mpm_work: str | Path) -> str:
    """The AT runs' init: `cfg.init`, or for "mpm_clean_run" the weights file of notebook 05's clean vanilla run."""
    if cfg.init != "mpm_clean_run":
        return cfg.init
    clean = Path(mpm_work) / "clean_vanilla"
    if not (clean / "done.json").exists():
        raise PinppError(f"{clean}: T-PIN++'s AT runs start from notebook 05's clean run here (tiny.init=mpm_clean_run); "
                         "run notebook 05 first (`./run_all.sh --only 05`)")
    return str(backbone_weights(clean))


def train_runs(runs: dict[str, TrainConfig], cfg: TinyConfig, tree: str | Path, work: str | Path,
               train_missing: bool = True) -> dict[str, dict]:
    """Train every run on the T-PIN++ tree, `cfg.jobs` at a time (finished runs are reused)."""
    return run_training(runs, ExperimentConfig(at=cfg.at, at_init="torchvision_v2", jobs=cfg.jobs, device=cfg.device),
                        tree, work, train_missing)


def evaluation_set(cfg: TinyConfig, tree: str | Path) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """The evaluated val images ('<wnid>/<file>', spread over the list when `eval_images` is set), as the 224-px
    models see them, and their labels (the classes' sorted order)."""
    from .ood_sets import spread
    samples = val_dataset(tree, None).samples
    index = spread(list(range(len(samples))), cfg.eval_images)
    x, y = eval_images(tree, cfg.at.transform, index=index)
    return [samples[i][0] for i in index], x, y


def evaluate_runs(trained: dict[str, dict], cfg: TinyConfig, x: torch.Tensor, y: torch.Tensor) -> pd.DataFrame:
    """Per-image records: Table A5's runs at `cfg.eval`'s threats ("tableA5"), Fig. A1's at `sweep_threat` ("figA1")."""
    a5, a1 = set(table_runs(cfg).values()), {run for _, run in sweep_points(cfg)}
    sweep = dataclasses.replace(cfg.eval, threats=(cfg.sweep_threat,))
    names = [n for n in trained if n in a5 | a1]
    args = [(n, trained[n]["out"], ([("tableA5", cfg.eval)] if n in a5 else []) + ([("figA1", sweep)] if n in a1 else []),
             cfg.device, x, y) for n in names]
    return records_frame([r for recs in jobs.map_jobs(evaluate_run, args, cfg.jobs, "evaluating T-PIN++ runs") for r in recs])


def wrn_labels(paths: list[str], order: str = "sorted") -> torch.Tensor:
    """Each '<wnid>/<file>''s index among the WRN's 200 logits: sorted wnids (`tiny_pinpp.class_order`; unverified,
    docs/FIDELITY.md) or ("file") the order of Tiny-ImageNet's wnid list."""
    wnids = tiny_pinpp.class_order() if order == "sorted" else list(tiny_pinpp.TINY_WNIDS)
    order = {w: i for i, w in enumerate(wnids)}
    return torch.tensor([order[p.split("/", 1)[0]] for p in paths])


def evaluate_wrn(cfg: TinyConfig, released: str | Path, tree: str | Path, paths: list[str]) -> pd.DataFrame | None:
    """Records of Wang et al.'s WRN-28-10 on the same val images at 64 px (`cfg.wrn_transform`), Table A5's threats
    (ε in pixel units, as for the 224-px models); None when its file is not under `released`."""
    path = Path(released) / WRN_FILE
    if not path.is_file():
        return None
    model = tiny_pinpp.load_dm_checkpoint(path)
    x = tiny_pinpp.tiny_batch([Path(tree) / "val_1w" / "img" / p for p in paths], transform=cfg.wrn_transform)
    work = Path(released) / "runs" / WRN_RUN / "aa"
    recs = robust_eval.evaluate_or_skip(model, x, wrn_labels(paths, cfg.wrn_class_order), 200, cfg.eval, work, device=cfg.device)
    return records_frame([{"run": WRN_RUN, "protocol": "tableA5", **r} for r in recs])


def write_wrn_standin(path: str | Path, seed: int = 0) -> Path:
    """Seeded random weights in DM-Improves-AT's checkpoint format (`{"model_state_dict"}` of
    DataParallel(Sequential(model)): keys "module.0.<name>"), for the rehearsal; an existing file is kept."""
    path = Path(path)
    if not path.exists():
        torch.manual_seed(seed)
        sd = tiny_pinpp.WideResNetSwish(200).state_dict()
        path.parent.mkdir(parents=True, exist_ok=True)
        with fileio.atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save({"model_state_dict": {f"module.0.{k}": v for k, v in sd.items()}}, f)
    return path


def published() -> pd.DataFrame:
    """Wang et al. 2023's own numbers for the WRN (`pinpp_lib/data/tiny_published.csv`, cited there)."""
    with resources.files("pinpp_lib.data").joinpath("tiny_published.csv").open() as f:
        return pd.read_csv(f, comment="#")


def _size(arch: str, variant: str, size: int, num_classes: int) -> dict[str, float]:
    net = models.export_deployable(models.build(variant, arch, num_classes, 2)) if variant != "wrn" else tiny_pinpp.WideResNetSwish(200)
    return {"params deployed (M)": models.count_params(net) / 1e6, "GFLOPs": models.count_flops(net, size) / 1e9}


def table_a5(records: pd.DataFrame, trained: dict[str, dict], cfg: TinyConfig, wrn_how: str) -> pd.DataFrame:
    """Table A5: the kit's two runs, the WRN measured on the same images (or how to get its weights), its published row.
    Parameters and FLOPs are the deployed classifier's (MPM's bypass dropped) at its input size."""
    threats, rows = cfg.eval.threats, []
    entries = [(label, run, trained.get(run, {}).get("arch", cfg.at.arch), trained.get(run, {}).get("variant"), cfg.at.transform.size,
                "trained by the kit (this run)") for label, run in table_runs(cfg).items()]
    entries.append(("WRN-28-10 (Wang et al. 2023), re-evaluated", WRN_RUN, "wrn28-10", "wrn", 64, wrn_how))
    for label, run, arch, variant, size, source in entries:
        if variant is None:
            continue  # a kit run that has not finished (TRAIN = False)
        ncls = trained[run]["num_classes"] if run in trained else 200
        row: dict[str, Any] = {"model": label, "input (px)": size, **_size(arch, variant, size, ncls)}
        r = records[(records.run == run) & (records.protocol == "tableA5")]
        measured = len(r) > 0
        row["clean"] = reporting.accuracy(r[r.threat == threats[0]]["clean"]).value if measured else np.nan
        for t in threats:
            a = reporting.accuracy(r[r.threat == t]["robust"]) if measured else None
            row[t], row[f"{t} 95% CI"] = (a.value, a.ci) if a else (np.nan, "–")
        row["evaluation"] = reporting.evaluation_label(r) if measured else "weights not present"
        row["source"] = source
        rows.append(row)
    for p in published().itertuples(index=False):
        rows.append({"model": p.model, "input (px)": p.input_px, "clean": p.clean,
                     **{t: (p.robust if t == p.threat else np.nan) for t in threats}, "evaluation": p.evaluation,
                     "source": p.source})
    return pd.DataFrame(rows)


def lambda_curve(records: pd.DataFrame, cfg: TinyConfig) -> pd.DataFrame:
    """Fig. A1's points: robust (`sweep_threat`, 95% Wilson interval) and clean accuracy against λ."""
    rows = []
    for lam, run in sweep_points(cfg):
        r = records[(records.run == run) & (records.protocol == "figA1") & (records.threat == cfg.sweep_threat)]
        if len(r):
            a = reporting.accuracy(r["robust"])
            rows.append({"lambda": lam, "robust": a.value, "robust_lo": a.lo, "robust_hi": a.hi, "n": a.n,
                         "clean": reporting.accuracy(r["clean"]).value, "run": run, "evaluation": reporting.evaluation_label(r)})
    cols = ("lambda", "robust", "robust_lo", "robust_hi", "n", "clean", "run", "evaluation")
    return pd.DataFrame(rows) if rows else pd.DataFrame({c: pd.Series(dtype=object if c in ("run", "evaluation") else float)
                                                          for c in cols})


def plot_lambda(curve: pd.DataFrame, path: str | Path, threat: str) -> Path:
    """Fig. A1: robust accuracy (with its 95% interval) and clean accuracy against λ."""
    plt = plots.pyplot()
    import seaborn as sns
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    how = ", ".join(sorted(set(curve["evaluation"])))
    sns.lineplot(data=curve, x="lambda", y="robust", marker="o", ax=ax, label=f"robust ({threat}; {how})",
                 color=plots.MODEL_COLOURS["robust"])
    ax.fill_between(curve["lambda"], curve["robust_lo"], curve["robust_hi"], alpha=0.2, color=plots.MODEL_COLOURS["robust"],
                    label=f"robust: 95% Wilson interval ({int(curve['n'].max()) if len(curve) else 0} images)")
    sns.lineplot(data=curve, x="lambda", y="clean", marker="s", ax=ax, label="clean", color=plots.MODEL_COLOURS["clean"])
    ax.set_xlabel("λ (focal-loss weight)")
    ax.set_ylabel("accuracy (%)")
    if curve.empty:
        ax.text(0.5, 0.5, "no λ run has finished", transform=ax.transAxes, ha="center")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False)  # off the data
    fig.tight_layout()
    plots.save(fig, path, dpi=120)
    return Path(path)
