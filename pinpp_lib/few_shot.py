"""Few-shot experiments of notebook 07 (paper §6, Tables 11 and 12): what is trained, how it is scored.

Four models: {Meta-Baseline, DeepEMD} × {object, object+part}. Each starts with classifier
pre-training on the training classes (Meta-Baseline's stage 1; DeepEMD's pre-training), then
meta-training on episodes of the training classes for each shot setting, then evaluation on the
stored test episodes (same episodes for every model). Per-episode records → mean accuracy and the
95% interval as the authors' test script computes it (Student t over test batches of 4 episodes, `interval`).
`recipe` picks the paper's part model (M branches, convex weights) or the code's (one crop, p-mix; RECIPES).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import checkpoint, fileio, jobs, plots, store
from .checks import Checked, Rule, above, at_least, between, device_name, each, one_of
from .few_shot_data import AUGMENTS, PartImageDataset, Sample, class_split, draw_episodes, episodes
from .synthetic import SynthConfig
from .few_shot_models import FewShotNet, centroid_scores, emd_scores

METHODS = {"Meta-Baseline": "meta_baseline", "DeepEMD": "deepemd"}
VARIANTS = ("object", "object+part")


# Where the paper's text (§6) and the authors' code differ (docs/FIDELITY.md, §6); `config.resolve` applies
# RECIPES[recipe] before the profile's and the user's overrides. Where the paper is silent both follow the code.
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {},                                  # M = 3 part branches, weights normalised to sum 1
    "authors_code": {"mix": "p", "m_parts": 1},   # one part crop, their CNN, p · image + (1 − p) · part, p from 0
}


@dataclass
class FewShotConfig(Checked):
    """Defaults: the paper's §6 and, where it is silent, the authors' code (LixiaoTHU/PartImageNetPP @e132f50,
    `Benchmark/fewshot/metabaseline`: configs/train_classifier_pinpp.yaml, train_meta_pinpp.yaml, test_few_shot.py;
    `Benchmark/fewshot/deepemd/Models/models/resnet.py`)."""
    recipe: str = "paper"              # "paper" | "authors_code" (RECIPES; resolved in config)
    mix: str = "convex"                # "convex": M branches, softmax weights | "p": the code's p · image + (1 − p) · part
    split: tuple[int, int, int] = (900, 50, 50)
    channels: tuple[int, ...] = (64, 128, 256, 512)          # Meta-Baseline's `resnet12` (the code's encoder)
    channels_deepemd: tuple[int, ...] = (64, 160, 320, 640)  # DeepEMD's ResNet-12
    branch_channels: tuple[int, ...] = (64, 128, 256)
    size_meta_baseline: int = 80
    size_deepemd: int = 84
    m_parts: int = 3
    emd_regions: int = 9               # DeepEMD nodes per image: random patches (object) or part boxes (object+part); code: 9
    emd_patches: str = "rrc"           # DeepEMD's random patches: "rrc" RandomResizedCrop + flip (its sampling loader) | "rect"
    emd_kshot: str = "sfc"             # DeepEMD k-shot: "sfc" structured FC prototypes (code) | "nodes": union of the supports
    sfc_steps: int = 100               # SFC fine-tuning passes (code: sfc_update_step), batch sfc_batch, SGD lr sfc_lr
    sfc_lr: float = 0.1
    sfc_batch: int = 4
    meta_shot_deepemd: int = 0         # DeepEMD meta-training shot; 0: at each test shot (its train_meta.py -shot)
    # DeepEMD's own schedules (train_pretrain.py, train_meta.py defaults): SGD momentum 0.9, Nesterov, weight_decay
    pretrain_epochs_deepemd: int = 120
    pretrain_lr_deepemd: float = 0.04
    pretrain_step_deepemd: int = 30    # StepLR: lr × pretrain_gamma_deepemd every this many epochs
    pretrain_gamma_deepemd: float = 0.2
    meta_episodes_deepemd: int = 5000  # 100 epochs × 50 episodes (val_frequency)
    meta_lr_deepemd: float = 0.0005
    meta_step_deepemd: int = 500       # StepLR per epoch of 50 episodes, step 10 epochs: lr × meta_gamma_deepemd
    meta_gamma_deepemd: float = 0.5
    n_query_meta_deepemd: int = 4      # queries per class in its meta-training episodes (-query)
    emd_pixel_stats: str = "cifar"     # DeepEMD's input normalisation (its loaders: CIFAR mean/std) | "imagenet"
    n_way: int = 5
    shots: tuple[int, ...] = (1, 5)
    n_query: int = 15
    pretrain_epochs: int = 100
    pretrain_lr: float = 0.1
    pretrain_milestones: tuple[float, ...] = (0.9,)  # fractions of the epochs, lr × 0.1 each (code: milestones [90] of 100)
    batch_size: int = 128
    weight_decay: float = 5e-4
    pretrain_augment: str = "rrc_flip"  # code: RandomResizedCrop + flip, separately for image and part crop
    meta_augment: str = "none"          # code (Meta-Baseline's train_meta): none
    meta_shot: int = 5                 # meta-train once at this shot, test every shot with it (code); 0: at each shot
    meta_episodes: int = 4000          # code: 20 epochs × 200 batches of one episode
    meta_lr: float = 0.001
    eval_episodes: int = 8000          # code: 10 test epochs × 200 batches × 4 episodes
    ci_group: int = 4                  # episodes per test batch: the interval is Student t over batch accuracies (code)
    workers: int = 4
    max_steps: int = 0                 # rehearsal: stop pre-training after this many steps (schedule kept at full length); 0: no cap
    jobs: int = 1                      # method/regions pairs trained at once, one CPU thread each (smoke); 1: in turn
    seed: int = 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    synth: SynthConfig | None = None   # a synthetic release to use instead of the real one (smoke)
    LIMITS: ClassVar[dict[str, Rule]] = {
        "recipe": one_of(*RECIPES), "mix": one_of("convex", "p"),
        "split": each(at_least(0)), "channels": each(at_least(1)), "channels_deepemd": each(at_least(1)),
        "branch_channels": each(at_least(1)),
        "size_meta_baseline": at_least(8), "size_deepemd": at_least(8), "m_parts": at_least(0), "emd_regions": at_least(1),
        "emd_patches": one_of("rrc", "rect"), "emd_kshot": one_of("sfc", "nodes"), "sfc_steps": at_least(0), "sfc_lr": above(0),
        "sfc_batch": at_least(1), "meta_shot_deepemd": at_least(0),
        "pretrain_epochs_deepemd": at_least(0), "pretrain_lr_deepemd": above(0), "pretrain_step_deepemd": at_least(1),
        "pretrain_gamma_deepemd": between(0, 1), "meta_episodes_deepemd": at_least(0), "meta_lr_deepemd": above(0),
        "meta_step_deepemd": at_least(1), "meta_gamma_deepemd": between(0, 1), "n_query_meta_deepemd": at_least(1),
        "emd_pixel_stats": one_of("cifar", "imagenet"),
        "n_way": at_least(2), "shots": each(at_least(1)), "n_query": at_least(1), "pretrain_epochs": at_least(0),
        "pretrain_lr": above(0), "pretrain_milestones": each(between(0, 1)), "batch_size": at_least(1),
        "pretrain_augment": one_of(*AUGMENTS), "meta_augment": one_of(*AUGMENTS),
        "weight_decay": at_least(0), "meta_shot": at_least(0), "meta_episodes": at_least(0),
        "meta_lr": above(0), "eval_episodes": at_least(1), "ci_group": at_least(1), "workers": at_least(0),
        "max_steps": at_least(0), "jobs": at_least(1), "seed": at_least(0), "device": device_name}


def _regions(method: str, variant: str, cfg: FewShotConfig) -> int:
    """Crops per image the model consumes: part crops (Meta-Baseline object+part), regions (DeepEMD)."""
    if method == "deepemd":
        return cfg.emd_regions
    return cfg.m_parts if variant == "object+part" else 0


def datasets(samples: list[Sample], cfg: FewShotConfig, method: str, variant: str, train: bool,
             augment: str = "none") -> PartImageDataset:
    """The train- or test-class dataset as `method`/`variant` sees it (image size, crops, random patches,
    augmentation)."""
    split = class_split(sorted({s.wnid for s in samples}), cfg.split, cfg.seed)
    names = split["train" if train else "test"]
    size = cfg.size_deepemd if method == "deepemd" else cfg.size_meta_baseline
    use = samples if variant == "object+part" else [dataclasses.replace(s, boxes=[]) for s in samples]  # object: random patches
    return PartImageDataset(use, {w: i for i, w in enumerate(names)}, size, _regions(method, variant, cfg), cfg.seed, train,
                            augment, fill=cfg.emd_patches if method == "deepemd" else "rect")


def build(method: str, variant: str, cfg: FewShotConfig) -> FewShotNet:
    if method == "deepemd":
        return FewShotNet(cfg.channels_deepemd, stats=cfg.emd_pixel_stats)
    return FewShotNet(cfg.channels, cfg.m_parts if variant == "object+part" else 0, cfg.branch_channels, cfg.mix,
                      cfg.size_meta_baseline)


def _features(model: FewShotNet, method: str, x: torch.Tensor, parts: torch.Tensor) -> torch.Tensor:
    return model.regions(parts) if method == "deepemd" else model(x, parts)


def pretrain(model: FewShotNet, ds: PartImageDataset, cfg: FewShotConfig, method: str) -> None:
    """Stage 1: a linear classifier over the training classes on the (mixed) feature; SGD momentum 0.9, lr × 0.1 at
    each milestone epoch (the code's MultiStepLR, stepped per epoch)."""
    dev = torch.device(cfg.device)
    head = nn.Linear(model.out_dim, len(ds.labels)).to(dev)
    model.to(dev).train()
    params = list(model.parameters()) + list(head.parameters())
    sch = schedule(cfg, method)
    opt = torch.optim.SGD(params, lr=sch["pretrain_lr"], momentum=0.9, nesterov=sch["nesterov"], weight_decay=cfg.weight_decay)
    loader = DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.workers,
                        generator=torch.Generator().manual_seed(cfg.seed), drop_last=len(ds) > cfg.batch_size)
    sched = (torch.optim.lr_scheduler.StepLR(opt, cfg.pretrain_step_deepemd, cfg.pretrain_gamma_deepemd) if method == "deepemd"
             else torch.optim.lr_scheduler.MultiStepLR(opt, milestones(cfg), gamma=0.1))
    steps = 0
    for _ in tqdm(range(sch["pretrain_epochs"]), desc="pre-training", leave=False):
        for x, parts, y in loader:
            if cfg.max_steps and steps == cfg.max_steps:
                return
            steps += 1
            x, parts, y = x.to(dev), parts.to(dev), y.to(dev)
            # DeepEMD pre-trains its encoder on whole images (regions come in at meta-training)
            f = model(x) if method == "deepemd" else model(x, parts)
            loss = F.cross_entropy(head(f), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()


def schedule(cfg: FewShotConfig, method: str) -> dict[str, Any]:
    """The training schedule of `method`: Meta-Baseline's (the shared fields; its configs) or DeepEMD's own
    (`*_deepemd` fields: train_pretrain.py / train_meta.py, both SGD with Nesterov momentum)."""
    if method == "deepemd":
        return {"pretrain_epochs": cfg.pretrain_epochs_deepemd, "pretrain_lr": cfg.pretrain_lr_deepemd, "nesterov": True,
                "meta_episodes": cfg.meta_episodes_deepemd, "meta_lr": cfg.meta_lr_deepemd, "meta_query": cfg.n_query_meta_deepemd}
    return {"pretrain_epochs": cfg.pretrain_epochs, "pretrain_lr": cfg.pretrain_lr, "nesterov": False,
            "meta_episodes": cfg.meta_episodes, "meta_lr": cfg.meta_lr, "meta_query": cfg.n_query}


def milestones(cfg: FewShotConfig) -> list[int]:
    """The pre-training epochs after which the lr drops × 0.1 (90 of 100 in the code)."""
    return [round(f * cfg.pretrain_epochs) for f in cfg.pretrain_milestones]


def _episode_logits(model: FewShotNet, method: str, ds: Any, ep: dict[str, Any], cfg: FewShotConfig,
                    dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    n_way = cfg.n_way
    remap = {c: i for i, c in enumerate(ep["classes"])}
    batch = [ds[i] for i in ep["support"] + ep["query"]]
    x = torch.stack([b[0] for b in batch]).to(dev)
    parts = torch.stack([b[1] for b in batch]).to(dev)
    y = torch.tensor([remap[b[2]] for b in batch], device=dev)
    f = _features(model, method, x, parts)
    ns = len(ep["support"])
    if method == "deepemd":
        sfc = {"steps": cfg.sfc_steps, "lr": cfg.sfc_lr, "batch": cfg.sfc_batch}
        gen = torch.Generator().manual_seed(int(ep["seed"]))  # the SFC's batch order, per episode
        return emd_scores(f[:ns], y[:ns], f[ns:], n_way, kshot=cfg.emd_kshot, sfc=sfc, generator=gen), y[ns:]
    return centroid_scores(f[:ns], y[:ns], f[ns:], n_way, model.temperature), y[ns:]


def meta_train(model: FewShotNet, ds: PartImageDataset, cfg: FewShotConfig, method: str, shot: int) -> None:
    """Stage 2: episodes of the training classes (drawn under the config's seed), CE on the query scores."""
    dev = torch.device(cfg.device)
    model.to(dev).train()
    sch = schedule(cfg, method)
    eps = draw_episodes(ds.targets(), cfg.n_way, shot, sch["meta_query"], sch["meta_episodes"], cfg.seed + 17)
    opt = torch.optim.SGD(model.parameters(), lr=sch["meta_lr"], momentum=0.9, nesterov=sch["nesterov"],
                          weight_decay=cfg.weight_decay)
    # DeepEMD: StepLR stepped per epoch of 50 episodes every 10 epochs = × gamma every meta_step_deepemd episodes
    step = torch.optim.lr_scheduler.StepLR(opt, cfg.meta_step_deepemd, cfg.meta_gamma_deepemd) if method == "deepemd" else None
    for ep in tqdm(eps, desc=f"meta-training {shot}-shot", leave=False):
        logits, y = _episode_logits(model, method, ds, ep, cfg, dev)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step is not None:
            step.step()


# Settings that do not change a trained model (evaluation, loader workers, device, the synthetic source —
# whose samples are an input of their own).
_NOT_TRAINING = ("recipe", "eval_episodes", "ci_group", "workers", "device", "shots", "synth", "jobs")


def train_model(samples: list[Sample], cfg: FewShotConfig, method: str, variant: str, shot: int,
                work: str | Path) -> FewShotNet:
    """Pre-train (once per method/variant) and meta-train for `shot`. A finished stage is loaded, not redone,
    while its identity (settings, the training samples, and for meta-training the pre-trained weights) is
    unchanged; a stage of another identity is refused in one line (it holds a trained model)."""
    work = Path(work) / f"{method}_{variant.replace('+', '_')}"
    ds = datasets(samples, cfg, method, variant, train=True, augment=cfg.pretrain_augment)
    ds_meta = datasets(samples, cfg, method, variant, train=True, augment=cfg.meta_augment)
    torch.manual_seed(_stage_seed(cfg.seed, method, variant, "init"))  # the same initial weights whatever ran before
    model = build(method, variant, cfg)
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_TRAINING}
    if not cfg.max_steps:
        settings.pop("max_steps")  # added later: uncapped stages keep the identity they had before
    inputs = {"samples": store.names_digest(f"{s.wnid}/{s.path.name} {s.boxes}" for s in samples)}
    for stage, run in (("pretrain", lambda: pretrain(model, ds, cfg, method)),
                       (f"meta_{shot}shot", lambda: meta_train(model, ds_meta, cfg, method, shot))):
        ident = store.Identity("few-shot", {"method": method, "variant": variant, "stage": stage, "config": settings}, inputs)
        record = f"{stage}.done.json"
        done = store.finished(work, ident, record)
        if done is not None:
            model.load_state_dict(checkpoint.load(work / done["weights"]))
        else:
            why = store.stale(work, ident, record)
            if why:
                raise fileio.PinppError(f"{work / record}: trained with another configuration or other samples ({why}); "
                                        f"use another WORK_DIR or delete {work} to retrain")
            torch.manual_seed(_stage_seed(cfg.seed, method, variant, stage))  # not the RNG state earlier stages left
            run()
            w = checkpoint.save_weights(work / stage, model.state_dict(), {"method": method, "variant": variant, "stage": stage})
            done = store.finish(work, ident, [w], {"weights": w.name}, record)
        inputs = {**inputs, stage: done["files"][done["weights"]]}  # meta-training depends on these weights
    return model.eval()


def _stage_seed(seed: int, *names: str) -> int:
    """A seed per (seed, method, variant, stage): a stage draws the same numbers whether or not the stages
    before it ran in this process or were loaded."""
    return int(store.digest([seed, *names])[:15], 16)


def evaluate(model: FewShotNet, samples: list[Sample], cfg: FewShotConfig, method: str, variant: str, shot: int,
             episode_file: str | Path) -> list[dict[str, Any]]:
    """Per-episode accuracy on the stored test episodes of this shot."""
    dev = torch.device(cfg.device)
    ds = datasets(samples, cfg, method, variant, train=False)
    eps = episodes(episode_file, ds.targets(), cfg.n_way, shot, cfg.n_query, cfg.eval_episodes, cfg.seed)
    model.to(dev).eval()
    out = []
    with torch.no_grad():
        for i, ep in enumerate(tqdm(eps, desc=f"evaluating {shot}-shot", leave=False)):
            logits, y = _episode_logits(model, method, ds, ep, cfg, dev)
            out.append({"episode": i, "seed": ep["seed"], "shot": shot, "accuracy": float((logits.argmax(1) == y).float().mean())})
    return out


def recipe_note(cfg: FewShotConfig) -> str:
    """Which recipe a Table 11/12 number was trained with, for the tables' notes."""
    part = (f"M = {cfg.m_parts} part branches, weights normalised to sum 1" if cfg.mix == "convex"
            else f"{cfg.m_parts} part crop through the authors' CNN, p · image + (1 − p) · part")
    meta = f"meta-trained once at {cfg.meta_shot}-shot" if cfg.meta_shot else "meta-trained at each shot"
    emd = (f"DeepEMD: {cfg.emd_regions} regions, k-shot " + ("structured FC" if cfg.emd_kshot == "sfc" else "union of supports")
           + (f", meta-trained at {cfg.meta_shot_deepemd}-shot" if cfg.meta_shot_deepemd else ", meta-trained at each shot"))
    return (f"Recipe: {cfg.recipe} (Meta-Baseline object+part: {part}; {meta}; {emd}; interval: Student t over test batches "
            f"of {cfg.ci_group} episodes); the other recipe: few_shot.recipe="
            f"{'authors_code' if cfg.recipe == 'paper' else 'paper'} (docs/FIDELITY.md, §6).")


def interval(acc: np.ndarray, group: int) -> float:
    """The 95% interval of the mean as the code's `mean_confidence_interval`: Student t over the accuracies of
    consecutive groups of `group` episodes (a test batch: 4), sem · t(0.975, n − 1); NaN under two full groups."""
    import scipy.stats
    n = len(acc) // group
    if n < 2:
        return np.nan
    batches = acc[:n * group].reshape(n, group).mean(1)
    return float(scipy.stats.sem(batches) * scipy.stats.t.ppf(0.975, n - 1))


def summary_table(records: pd.DataFrame, shot: int, ci_group: int = 4) -> pd.DataFrame:
    """Mean accuracy (%) ± 95% interval (`interval`) per method and variant for one shot setting."""
    rows = []
    for (method, variant), g in records[records.shot == shot].groupby(["method", "variant"], sort=False):
        acc = 100 * g.sort_values("episode")["accuracy"].to_numpy()
        ci = interval(acc, ci_group)
        rows.append({"method": method, "regions": variant, f"{shot}-shot accuracy": acc.mean(), "± 95% CI": ci,
                     "episodes": len(acc)})
    return pd.DataFrame(rows)


def plot_parts(samples: list[Sample], cfg: FewShotConfig, weights: pd.DataFrame, path: str | Path, n: int = 4) -> Path:
    """Test images with their M part crops (what the branches see), and the learned branch weights."""
    plt = plots.pyplot()
    import seaborn as sns
    ds = datasets(samples, cfg, "meta_baseline", "object+part", train=False)
    idx = np.linspace(0, len(ds) - 1, n).astype(int)
    fig, axes = plt.subplots(n, cfg.m_parts + 2, figsize=(1.6 * (cfg.m_parts + 2), 1.6 * n), squeeze=False)
    for r, i in enumerate(idx):
        x, parts, _ = ds[int(i)]
        for c, t in enumerate([x, *parts]):
            axes[r, c].imshow(t.permute(1, 2, 0).numpy())
            axes[r, c].set_title("image" if c == 0 else f"part {c}", fontsize=7)
        axes[r, -1].axis("off")
    for a in axes[:, :-1].flat:
        a.set_xticks([]), a.set_yticks([])
    ax = fig.add_subplot(1, cfg.m_parts + 2, cfg.m_parts + 2)
    sns.barplot(data=weights, x="input", y="weight", hue="shot", ax=ax)
    ax.set_title("learned weights", fontsize=8)
    ax.tick_params(labelsize=6)
    fig.tight_layout()
    plots.save(fig, path, dpi=110)
    return Path(path)



def run(samples: list[Sample], cfg: FewShotConfig, work: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train and evaluate every method × regions × shot (`cfg.jobs` method/regions pairs at a time). Returns
    per-episode records and the learned branch weights of the Meta-Baseline object+part models (image, part
    1..M) per shot."""
    work = Path(work)
    targets = datasets(samples, cfg, "meta_baseline", "object", train=False).targets()
    for shot in cfg.shots:  # drawn here, once: every model of a table is scored on them (and jobs never race to write)
        episodes(work / f"test_episodes_{shot}shot.json", targets, cfg.n_way, shot, cfg.n_query, cfg.eval_episodes, cfg.seed)
    pairs = [(name, method, variant) for name, method in METHODS.items() for variant in VARIANTS]
    out = jobs.map_jobs(_run_pair, [(samples, cfg, *p, work) for p in pairs], cfg.jobs, "few-shot models")
    return pd.DataFrame([r for recs, _ in out for r in recs]), pd.DataFrame([w for _, ws in out for w in ws])


def _run_pair(samples: list[Sample], cfg: FewShotConfig, name: str, method: str, variant: str,
              work: Path) -> tuple[list[dict], list[dict]]:
    """One method and regions variant at every shot: (per-episode records, branch weights)."""
    records, weights = [], []
    for shot in cfg.shots:
        meta_shot = cfg.meta_shot_deepemd if method == "deepemd" else cfg.meta_shot
        model = train_model(samples, cfg, method, variant, meta_shot or shot, work)  # trained once if meta_shot
        recs = evaluate(model, samples, cfg, method, variant, shot, work / f"test_episodes_{shot}shot.json")
        records += [{"method": name, "variant": variant, **r} for r in recs]
        if len(model.branches):
            w = model.mix_weights().detach().cpu().tolist()
            weights += [{"method": name, "shot": f"{shot}-shot", "input": "image" if i == 0 else f"part {i}",
                         "weight": v} for i, v in enumerate(w)]
    return records, weights
