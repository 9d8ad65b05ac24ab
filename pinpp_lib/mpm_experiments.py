"""The §4 experiments of notebook 05: which models to train, and the tables built from their records.

    Table 3    vanilla AT vs MPM AT: clean + AutoAttack robust accuracy at four threat models
    Table 7    two-stage, SV1, SV2 (w/ TD), SV3 w/ TD (= MPM), SV3 w/o TD: params, clean, robust
    Table A4   object-mask vs part-mask supervision
    Table 6 R  MPM on real labels only / + pseudo labels w/o CF / + pseudo labels w/ CF

Every run is one `training.train` call; every number comes from per-image AutoAttack records
(`robust_eval`), aggregated here with 95% intervals. Claims of the paper are checked with paired
bootstrap intervals on the same images and stated as reproduced / not reproduced.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import checkpoint, fileio, jobs, layout, models, reporting, robust_eval
from .datasets import TransformConfig, eval_transform, require_train_labels, val_dataset
from .checks import Checked, Rule, at_least, device_name, each, one_of
from .robust_eval import EvalConfig
from .training import TrainConfig, finished, load_trained, train

TABLE7_VARIANTS = ("twostage", "mpm_sv1", "mpm_sv2", "mpm", "mpm_sv3_notd")
VARIANT_NAMES = {"plain": "vanilla", "twostage": "two-stage", "mpm_sv1": "SV1", "mpm_sv2": "SV2 w/ TD",
                 "mpm": "SV3 w/ TD (MPM)", "mpm_sv3_notd": "SV3 w/o TD"}
# Table 6 right: the training masks of MPM AT. Real + pseudo (CF) is every part-supervised run's default
# (paper §4.2), so its row is the main MPM run; the other two are the explicit ablations.
TABLE6_RUNS = {"real labels only": ("at_mpm_real", layout.REAL_SEG_DIR),
               "+ pseudo w/o CF": ("at_mpm_pseudo_nocf", layout.PSEUDO_SEG_DIRS["nocf"]),
               "+ pseudo w/ CF": ("at_mpm", layout.TRAIN_SEG_DIR)}


@dataclass
class ExperimentConfig(Checked):
    """What notebook 05 trains and evaluates. `at` is the AT recipe every AT run shares."""
    at: TrainConfig = field(default_factory=TrainConfig)
    clean_epochs: int = 100            # the clean (non-AT) recipe: from scratch
    clean_min_lr: float = 1e-3         # its cosine floor (authors' *_ori.yaml; AT configs: 1e-2)
    at_init: str = "torchvision_v2"    # AT runs start here; "clean_run" = the weights of this experiment's clean run
    eval: EvalConfig = field(default_factory=EvalConfig)   # Table 3: vanilla AT and MPM AT
    ablation_threats: tuple[str, ...] = ("Linf-4/255",)  # Tables 7, A4 and 6-right
    ablation_mode: str = "autoattack"  # or "pgd": PGD-k, flagged non-standard in records and tables
    eval_images: int = 0               # smoke, rehearsal: N images spread over the evaluation list; 0: all of it
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    jobs: int = 1                      # runs trained at once, one CPU thread each (smoke: 2 cores); 1: one after another
    released: bool = True              # Table 3: also evaluate the released weights under <data root>/released
    LIMITS: ClassVar[dict[str, Rule]] = {"clean_epochs": at_least(0), "clean_min_lr": at_least(0),
                                         "eval_images": at_least(0), "jobs": at_least(1),
                                         "ablation_threats": each(one_of(*robust_eval.THREATS)),
                                         "ablation_mode": one_of("autoattack", "pgd"), "device": device_name}


def plan(cfg: ExperimentConfig) -> dict[str, TrainConfig]:
    """Run name → TrainConfig: the clean runs (vanilla; MPM, for notebook 06) and every AT run. Every part-supervised
    run trains on `cfg.at.seg_dir` (real + pseudo CF labels by default); only Table 6's ablations change the masks.
    Vanilla AT has no init stage (authors: it starts from the torchvision weights, fc included)."""
    at = cfg.at
    runs = {"clean_vanilla": dataclasses.replace(at, variant="plain", adversarial=False, epochs=cfg.clean_epochs,
                                                 init="none", init_stage_epochs=0, min_lr=cfg.clean_min_lr)}
    # the clean MPM model of notebook 06 (the authors' resnet50_part_pp_ori.yaml: the clean recipe, from scratch,
    # real + pseudo CF labels); planned here so that it trains beside the clean run, before the AT runs need a core
    runs["clean_mpm"] = dataclasses.replace(runs["clean_vanilla"], variant="mpm")
    init = {} if cfg.at_init == "clean_run" else {"init": cfg.at_init}
    for v in TABLE7_VARIANTS:
        runs[f"at_{v}"] = dataclasses.replace(at, variant=v, **init)
    runs["at_plain"] = dataclasses.replace(at, variant="plain", init_stage_epochs=0, **init)
    runs["at_mpm_object"] = dataclasses.replace(at, variant="mpm", object_mask=True, **init)
    for run, seg_dir in TABLE6_RUNS.values():
        runs.setdefault(run, dataclasses.replace(at, variant="mpm", seg_dir=seg_dir, **init))
    return runs


MASK_NAMES = {layout.REAL_SEG_DIR: "real part labels only", layout.PSEUDO_SEG_DIRS["cf"]: "real + pseudo (CF) part labels",
              layout.PSEUDO_SEG_DIRS["nocf"]: "real + pseudo (w/o CF) part labels"}


def recipe_note(at: TrainConfig) -> str:
    """One sentence for a table's notes: the masks and the recipe choices its rows were trained with
    (each one a row of docs/FIDELITY.md, where the alternative is named)."""
    choices = [f"PGD step warm-up per {at.attack_warmup}", "best PGD iterate" if at.attack_keep_best else "last PGD iterate",
               f"attack targets smoothed {at.attack_label_smoothing:g}", "Nesterov SGD" if at.nesterov else "SGD",
               f"lr warm-up from {at.warmup_lr:g}, cosine floor {at.min_lr:g}",
               "EMA with warm-up" if at.ema_warmup else "EMA without warm-up"]
    return (f"Part-supervised runs trained on {MASK_NAMES.get(at.seg_dir, at.seg_dir)} (Table 6's ablations aside); "
            f"AT recipe: {', '.join(choices)} — see docs/FIDELITY.md.")


def resolve_init(name: str, tc: TrainConfig, cfg: ExperimentConfig, work: str | Path) -> TrainConfig:
    """With at_init="clean_run", AT runs start from the EMA backbone of this experiment's clean run
    (it stands in for pretrained ImageNet weights, which cannot be downloaded here)."""
    if not _starts_from_clean_run(tc, cfg):  # clean runs (vanilla, notebook 06's MPM) train from scratch
        return tc
    clean = Path(work) / "clean_vanilla"
    if not (clean / "done.json").exists():
        raise fileio.PinppError(f"{clean}: the clean run must finish first (at_init=clean_run); train run clean_vanilla")
    return dataclasses.replace(tc, init=str(backbone_weights(clean)))


def run_training(runs: dict[str, TrainConfig], cfg: ExperimentConfig, converted: str | Path, work: str | Path,
                 train_missing: bool = True) -> dict[str, dict]:
    """Train every run (resumable: finished runs are skipped). The clean run goes first when the AT runs start
    from it; the others run `cfg.jobs` at a time (`jobs.map_jobs`). `train_missing` False: train nothing, return the
    runs that already finished with these settings (Table 3 from released weights alone)."""
    work = Path(work)
    order = sorted(runs, key=lambda n: n != "clean_vanilla")
    if not train_missing:
        return {n: rec for n in order if (rec := _finished_or_none(n, runs[n], cfg, converted, work)) is not None}
    for seg_dir in sorted({tc.seg_dir for tc in runs.values() if tc.part_supervised}):
        require_train_labels(converted, seg_dir)  # before any run starts: a missing folder must not cost a finished run
    later = {n for n in order if _starts_from_clean_run(runs[n], cfg)}
    done: dict[str, dict] = {}
    for wave in ([n for n in order if n not in later], [n for n in order if n in later]):
        todo = []
        for name in wave:
            tc = resolve_init(name, runs[name], cfg, work)
            # side by side: a finished run is found here, without starting a process for it
            rec = finished(tc, converted, work / name) if cfg.jobs > 1 else None
            if rec is None:
                todo.append((name, tc))
            else:
                done[name] = rec
        results = jobs.map_jobs(train, [(tc, converted, work / name) for name, tc in todo], cfg.jobs, "training runs")
        done.update((name, rec) for (name, _), rec in zip(todo, results))
    return {n: done[n] for n in order}


def _finished_or_none(name: str, tc: TrainConfig, cfg: ExperimentConfig, converted: str | Path, work: Path) -> dict | None:
    try:  # an AT run whose clean run or part labels are missing has not finished either
        return finished(resolve_init(name, tc, cfg, work), converted, work / name)
    except fileio.PinppError:
        return None


def _starts_from_clean_run(tc: TrainConfig, cfg: ExperimentConfig) -> bool:
    return cfg.at_init == "clean_run" and tc.adversarial


def backbone_weights(run_dir: Path) -> Path:
    """The EMA backbone of a finished run as a weights file, named by its sha256 (so that the AT runs' configs,
    which hold the path, change when the clean run does). Reused only while it was exported from the run's
    current weights and its bytes match its sidecar; else written again."""
    source = fileio.read_json(run_dir / "ema.json", "trained model", "train the clean run first")["sha256"]
    side = run_dir / "init_backbone.json"
    if side.exists():
        info = fileio.read_json(side, "init weights record", "delete it to rewrite the init weights")
        path = run_dir / info.get("weights", "")
        if info.get("from_sha256") == source and path.is_file() and fileio.sha256_file(path) == info.get("sha256"):
            return path
    model, _ = load_trained(run_dir)
    return checkpoint.save_weights(run_dir / "init_backbone", models.export_deployable(model).state_dict(),
                                   {"from_run": run_dir.name, "from_sha256": source})


def eval_images(converted: str | Path, tcfg: TransformConfig, start: int = 0,
                end: int | None = None, index: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images start..end of the evaluation list (or those at `index`) as tensors (resize + centre crop, [0, 1])."""
    ds = val_dataset(converted, eval_transform(tcfg))
    end = len(ds) if end is None else end
    if not 0 <= start < end <= len(ds):
        raise fileio.PinppError(f"--start {start} --end {end}: the evaluation list has {len(ds)} images; "
                                f"choose 0 <= start < end <= {len(ds)}")
    idx = range(start, end) if index is None else index
    xs, ys = zip(*[ds[i] for i in tqdm(idx, desc="loading eval images", leave=False)])
    return torch.stack(xs), torch.tensor(ys)


def evaluation_index(converted: str | Path, cfg: ExperimentConfig) -> list[int]:
    """Positions in the evaluation list that notebooks 05 and 06 evaluate: all, or `cfg.eval_images` spread over
    the list (rehearsal: many classes, few images)."""
    from .ood_sets import spread
    return spread(list(range(len(val_dataset(converted, None).samples))), cfg.eval_images)


def evaluation_paths(converted: str | Path, cfg: ExperimentConfig) -> list[str]:
    """'<wnid>/<file>' of the images at `evaluation_index`, in the same order (what ImageNet-C is written from)."""
    from .ood_sets import spread
    return [rel for rel, _ in spread(val_dataset(converted, None).samples, cfg.eval_images)]


def evaluation_set(converted: str | Path, cfg: ExperimentConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The images at `evaluation_index` as tensors, with their labels."""
    return eval_images(converted, cfg.at.transform, index=evaluation_index(converted, cfg))


TABLE3_RUNS = ("at_plain", "at_mpm")
RECORD_COLUMNS = ["run", "protocol", "index", "label", "threat", "standard", "clean", "robust"]


def run_evaluation(trained: dict[str, dict], cfg: ExperimentConfig, x: torch.Tensor, y: torch.Tensor) -> pd.DataFrame:
    """Per-image records of every AT run under two protocols (column `protocol`):

    "table3"    `cfg.eval` (all four threats in full), Table 3's runs only;
    "ablation"  `ablation_threats` / `ablation_mode`, every AT run, so that Tables 7, A4 and 6-right
                compare like with like. Identical shards are computed once (records are cached).
    A run below the clean-accuracy floor is recorded (clean flags) but not attacked. Runs are evaluated
    `cfg.jobs` at a time (each attack with one CPU thread when side by side).
    """
    ablation = dataclasses.replace(cfg.eval, threats=cfg.ablation_threats, mode=cfg.ablation_mode)
    # this notebook's tables hold AT models; the clean runs are notebook 06's (and smoke's init)
    names = [name for name, res in trained.items() if res["config"].get("adversarial", True)]
    order = sorted(names, key=lambda n: n not in TABLE3_RUNS)  # the costly AutoAttack jobs start first, side by side
    args = [(n, trained[n]["out"], ([("table3", cfg.eval)] if n in TABLE3_RUNS else []) + [("ablation", ablation)],
             cfg.device, x, y) for n in order]
    per_run = dict(zip(order, jobs.map_jobs(evaluate_run, args, cfg.jobs, "evaluating runs")))
    return records_frame([row for name in names for row in per_run[name]])


def evaluate_run(name: str, out: str | Path, protocols: list[tuple[str, EvalConfig]], device: str, x: torch.Tensor,
                 y: torch.Tensor) -> list[dict[str, Any]]:
    """One trained run's per-image records under each (protocol, evaluation) pair — a job of `run_evaluation` and of
    notebook 09's `tiny_experiments.evaluate_runs`. The same threat twice is computed once (records are cached)."""
    model, meta = load_trained(out, device)
    rows = []
    for protocol, ecfg in protocols:
        recs = robust_eval.evaluate_or_skip(model, x, y, meta["num_classes"], ecfg, Path(out) / "aa", device=device)
        rows += [{"run": name, "protocol": protocol, **r} for r in recs]
    return rows


def records_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Per-image record rows as a frame: the columns all the same when there are none, robust NaN where not attacked."""
    df = pd.DataFrame(rows, columns=None if rows else RECORD_COLUMNS)
    df["robust"] = df["robust"].map(lambda v: np.nan if v is None else float(v))
    return df


def _acc(records: pd.DataFrame, run: str, threat: str, col: str = "robust",
         protocol: str = "ablation") -> reporting.Accuracy:
    r = records[(records.run == run) & (records.threat == threat) & (records.protocol == protocol)]
    return reporting.accuracy(r[col])


def threat_row(r: pd.DataFrame, threats: tuple[str, ...], model: str, source: str) -> dict[str, Any]:
    """One Table 3 row from one model's per-image records `r` (one protocol): clean accuracy, robust accuracy with its
    95% Wilson interval per threat, their mean, the evaluation label. Shared by the kit's runs and released models."""
    row: dict[str, Any] = {"model": model, "clean": reporting.accuracy(r[r.threat == threats[0]]["clean"]).value}
    for t in threats:
        a = reporting.accuracy(r[r.threat == t]["robust"])
        row[t], row[f"{t} 95% CI"] = a.value, a.ci
    row["robust avg"] = float(np.mean([row[t] for t in threats]))
    row["evaluation"] = reporting.evaluation_label(r)
    row["source"] = source
    return row


def table3(records: pd.DataFrame, threats: tuple[str, ...]) -> pd.DataFrame:
    """Clean and robust accuracy (%, 95% Wilson interval) of vanilla vs MPM, both AT (and the clean run)."""
    return pd.DataFrame([threat_row(records[(records.run == run) & (records.protocol == "table3")], threats, label,
                                    "trained by the kit (this run)")
                         for run, label in zip(TABLE3_RUNS, ("vanilla AT", "MPM AT")) if run in set(records.run)])


@functools.lru_cache(maxsize=None)
def r50_deployed_params(variant: str, num_classes: int = 1000, seg_classes: int = 3311) -> int:
    """Parameters at inference of `variant` at the paper's size (R50, 1000 classes, 3311 part classes):
    25.56M for vanilla and every MPM variant (the bypass is dropped), 60.54M for the two-stage model."""
    return models.deployed_params(models.build(variant, "r50", num_classes, seg_classes))


def variant_table(records: pd.DataFrame, trained: dict[str, dict], runs: dict[str, str], threat: str,
                  r50_params: bool = False) -> pd.DataFrame:
    """Rows of (label → run): params in training and deployed, clean and robust accuracy with CI.
    `r50_params` adds the deployed count at the paper's size (Table 7), whatever size was trained."""
    rows = []
    for label, run in runs.items():
        if run not in trained:
            continue
        a = _acc(records, run, threat)
        size = {"R50 params deployed (M)": r50_deployed_params(trained[run]["variant"]) / 1e6} if r50_params else {}
        rows.append({"model": label, "params train (M)": trained[run]["params"] / 1e6,
                     "params deployed (M)": trained[run]["deployable_params"] / 1e6, **size,
                     "clean": _acc(records, run, threat, "clean").value, threat: a.value, "95% CI": a.ci,
                     "n": a.n, "evaluation": _evaluation(records, run, "ablation")})
    return pd.DataFrame(rows)


def _evaluation(records: pd.DataFrame, run: str, protocol: str) -> str:
    return reporting.evaluation_label(records[(records.run == run) & (records.protocol == protocol)])


def claim(records: pd.DataFrame, better: str, worse: str, threat: str, col: str, text: str,
          protocol: str = "ablation") -> dict[str, Any]:
    """Is `better` ahead of `worse` on the same images? Paired bootstrap 95% interval of the difference."""
    sel = (records.threat == threat) & (records.protocol == protocol)
    a = records[sel & (records.run == better)].sort_values("index")[col].to_numpy()
    b = records[sel & (records.run == worse)].sort_values("index")[col].to_numpy()
    if len(a) == 0 or len(a) != len(b) or pd.isna(a).any() or pd.isna(b).any():
        return {"claim": text, "difference (pts)": np.nan, "95% CI": "–", "verdict": "not evaluated"}
    a, b = a.astype(float), b.astype(float)
    mean, lo, hi = robust_eval.paired_diff_ci(a, b)
    verdict = "reproduced" if lo > 0 else ("contradicted" if hi < 0 else "not reproduced (interval includes 0)")
    return {"claim": text, "difference (pts)": 100 * mean, "95% CI": f"[{100 * lo:.1f}, {100 * hi:.1f}]", "verdict": verdict,
            "evaluation": " vs ".join(sorted({_evaluation(records, better, protocol), _evaluation(records, worse, protocol)}))}
