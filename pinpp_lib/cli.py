"""`pinpp` — the kit's long jobs behind one console command (also `python -m pinpp_lib`).

Notebooks, shell scripts and torchrun call the same functions this CLI calls. User errors
(PinppError) are printed as one line without a traceback and exit with status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from . import distributed, jobs
from .fileio import PinppError


def _add_strict(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--strict", dest="strict", action="store_true", default=True,
                   help="stop at the first bad record (default)")
    g.add_argument("--skip-bad", dest="strict", action="store_false",
                   help="drop bad records and list them in the report")


def _cmd_synth(a: argparse.Namespace) -> int:
    from .synthetic import SynthConfig, generate
    cfg = SynthConfig(classes=a.classes, images_per_class=a.images_per_class, unannotated_per_class=a.unannotated_per_class,
                      val_per_class=a.val_per_class, size=a.size, seed=a.seed)
    out = generate(a.out, cfg, workers=a.workers)
    print(f"synthetic release: {out}/release  images: {out}/imagenet/train  val: {out}/imagenet/val  list: {out}/imagenet/val_list.txt")
    return 0


def _cmd_convert(a: argparse.Namespace) -> int:
    from .convert import ConvertConfig, convert
    cfg = ConvertConfig(seed=a.seed, strict=a.strict, check_images=not a.no_check_images, link=a.link, workers=a.workers)
    summary = convert(a.annotations, a.imagenet_train, a.out, a.imagenet_val, a.val_list, cfg)
    print(json.dumps(summary, indent=1))
    if summary["skipped_records"]:
        print(f"{summary['skipped_records']} record(s) skipped: see {a.out}/convert_report.txt", file=sys.stderr)
    return 0


def _cmd_stats(a: argparse.Namespace) -> int:
    from . import stats
    from .release import load_release
    rel = load_release(a.annotations, strict=a.strict)
    rec = stats.image_records(rel)
    print("Table 1 — part masks per image\n" + stats.table1(rec).to_string(index=False))
    print("\nTable 2 — this release\n" + json.dumps(stats.table2_row(rel, rec), indent=1))
    print("\nInclusion relations\n" + stats.inclusion_summary(rel).to_string(index=False))
    if rel.faults:
        print(f"\n{len(rel.faults)} record(s) skipped:\n" + "\n".join(f.line() for f in rel.faults), file=sys.stderr)
    return 0


def _cmd_prepare(a: argparse.Namespace) -> int:
    from .config import resolve
    from .prepare import prepare_data
    s = resolve(a.profile, data_root=a.data_root, seed=a.seed)
    print(json.dumps(prepare_data(s), indent=1))
    print(f"converted data: {s.paths.converted}")
    return 0


def _parse_sets(items: list[str]) -> dict:
    """--set a.b=value pairs → nested dict; values are Python literals (strings need no quotes)."""
    import ast
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise PinppError(f"--set {item!r}: expected key=value (e.g. --set epochs=3)")
        key, raw = item.split("=", 1)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        node = out
        *path, last = key.split(".")
        for k in path:
            node = node.setdefault(k, {})
        node[last] = value
    return out


def _cmd_train(a: argparse.Namespace) -> int:
    from . import mpm_experiments as mx
    from .config import apply_overrides, resolve
    a.run = a.run or a.run_opt
    s = resolve(a.profile, data_root=a.data_root, seed=a.seed)
    runs = mx.plan(s.mpm)
    if a.run not in runs:
        raise PinppError(f"unknown run {a.run!r}; runs of this profile: {', '.join(runs)}")
    work = s.paths.work("mpm", a.work)
    sets = _parse_sets(a.set)
    tc = apply_overrides(runs[a.run], sets, "train config")  # every value checked before anything is read
    if "init" not in sets:  # a user's --set init=... wins over the profile's init
        tc = mx.resolve_init(a.run, tc, s.mpm, work)
    return _train_one(tc, s.paths.converted, work / a.run, s.mpm.jobs, a.restart)  # the numbers notebook 05 gets


def _train_one(tc: Any, data: Path, out: Path, n_jobs: int, restart: bool) -> int:
    """One training run with the thread count its notebook uses (`jobs`), the process group closed, the result printed."""
    from .training import train
    with jobs.job_threads(n_jobs):
        result = train(tc, data, out, resume=not restart)
    distributed.teardown()
    if result:
        print(json.dumps({k: v for k, v in result.items() if k not in ("config", "classes")}, indent=1))
    return 0


def _cmd_tiny_train(a: argparse.Namespace) -> int:
    from . import tiny_experiments as tx
    from .config import apply_overrides, resolve
    a.run = a.run or a.run_opt
    s = resolve(a.profile, data_root=a.data_root, seed=a.seed)
    cfg = apply_overrides(s.tiny, _parse_sets(a.set), "tiny")  # every value checked before anything is read
    work = s.paths.work("tiny", a.work)
    # the run names do not depend on the init: check the name before the tree is built or an init is looked up
    names = list(tx.plan(cfg, "none"))
    if a.run not in names:
        raise PinppError(f"unknown run {a.run!r}; T-PIN++ runs of this profile: {', '.join(names)}")
    rank, _, _ = distributed.setup()  # under torchrun: one process writes the tree (the same one notebook 09 builds)
    if rank == 0:
        tx.build_tree(cfg, s.paths.converted, s.paths.imagenet_val, work / "tpinpp")
    distributed.barrier()
    tc = tx.plan(cfg, tx.resolve_init(cfg, s.paths.work("mpm", a.mpm_work)))[a.run]
    return _train_one(tc, work / "tpinpp", work / a.run, cfg.jobs, a.restart)  # the numbers notebook 09 gets


def _cmd_eval_aa(a: argparse.Namespace) -> int:
    from pathlib import Path

    from . import mpm_experiments as mx
    from . import robust_eval
    from .config import apply_overrides, resolve
    from .datasets import TransformConfig, list_image_folder
    from .training import load_trained
    s = resolve(a.profile, data_root=a.data_root, seed=a.seed)
    ecfg = apply_overrides(s.mpm.eval, {"threats": tuple(a.threat or s.mpm.eval.threats), "mode": a.mode}, "eval config")
    model, meta = load_trained(a.run_dir, s.mpm.device)
    classes, _ = list_image_folder(s.paths.converted / "train" / "img")
    if meta["classes"] != classes:
        raise PinppError(f"{a.run_dir}: the model was trained on {len(meta['classes'])} classes, the data at "
                         f"{s.paths.converted} has {len(classes)}; evaluate it with the --data-root it was trained on")
    tcfg = TransformConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"]["transform"].items()})
    x, y = mx.eval_images(s.paths.converted, tcfg, a.start, a.end)
    if a.mode == "pgd":
        print("note: PGD dev mode is NOT the standard AutoAttack evaluation; do not report these numbers as such",
              file=sys.stderr)
    with jobs.job_threads(s.mpm.jobs):  # the numbers notebook 05 gets for this run
        records = robust_eval.evaluate(model, x, y, meta["num_classes"], ecfg, Path(a.run_dir) / "aa", a.start, s.mpm.device)
    print(json.dumps(robust_eval.summarise(records), indent=1))
    return 0


def _cmd_import_official(a: argparse.Namespace) -> int:
    from pathlib import Path

    from . import released
    classes = None
    if a.classes:
        if not Path(a.classes).is_file():
            raise PinppError(f"--classes {a.classes}: no such file; pass a file with one wnid per line")
        classes = [ln.split()[0] for ln in Path(a.classes).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    rec = released.import_official(a.checkpoint, a.arch, a.out, a.weights, classes)
    print(json.dumps({k: rec[k] for k in ("variant", "num_classes", "seg_classes", "params", "deployable_params", "weights",
                                          "sha256", "source")}, indent=1))
    return 0


def _cmd_zoo(a: argparse.Namespace) -> int:
    from . import zoo
    if a.zoo_cmd == "list":
        for e in zoo.entries().values():
            pub = f"{e.published_clean:g} / {e.published_linf4:g} ({e.published_eval})" if e.published_clean else "not listed"
            how = f"not importable ({e.why_not})" if e.why_not else e.url
            print(f"{e.name:26s} {e.model:32s} {e.arch:14s} clean / Linf-4/255: {pub}; weights: {how}")
        return 0
    if a.zoo_cmd == "fetch":
        from .config import resolve
        folder = a.dir or resolve("full").paths.released
        print(zoo.fetch(a.name, folder, a.url))
        return 0
    rec = zoo.import_zoo(a.name, a.weights, a.out)
    print(json.dumps({k: rec[k] for k in ("variant", "params", "weights", "sha256", "source")}, indent=1))
    return 0


def _cmd_human(a: argparse.Namespace) -> int:
    from . import human_consistency as H
    trials = H.load_trials(a.trials, a.dataset)
    if a.decisions:
        dec = H.read_decisions(a.decisions, H.trial_datasets(a.trials))
        _, agg = H.model_vs_humans(dec, trials)
        print("model vs humans")
    else:
        _, agg = H.human_ceiling(trials)
        print("human noise ceiling (every pair of subjects once; the toolbox's excluded conditions left out)")
    print(agg.round(3).to_string())
    return 0


def _cmd_imagenet_c(a: argparse.Namespace) -> int:
    from . import corruptions
    from . import mpm_experiments as mx
    from .config import resolve
    s = resolve(a.profile, data_root=a.data_root, seed=a.seed)
    rc, conv, t = s.robustness, s.paths.converted, s.mpm.at.transform
    out = a.out or rc.path("imagenet_c", s.paths.data_root)
    names = tuple(a.corruption or rc.corruptions)
    if (a.images or rc.imagenet_c_images) == "val":  # App. D: the whole val set, read from its class folders
        rels, _ = corruptions.val_images(s.paths.imagenet_val, None, rc.images)
        corruptions.write_imagenet_c_from_files(out, s.paths.imagenet_val, rels, t.size, t.crop_pct, rc.seed, names,
                                                rc.severities)
    else:
        x, _ = mx.evaluation_set(conv, s.mpm)
        rels = mx.evaluation_paths(conv, s.mpm)
        corruptions.write_imagenet_c(out, x, rels, rc.seed, names, rc.severities)
    print(f"ImageNet-C ({len(rels)} images × {len(names)} corruptions × {len(rc.severities)} severities): {out}")
    return 0


def _seg_settings(a: argparse.Namespace):
    from .config import apply_overrides, resolve
    s = resolve(a.profile, data_root=a.data_root)
    return s, apply_overrides(s.seg, _parse_sets(a.set), "seg config")


def _cmd_seg_train(a: argparse.Namespace) -> int:
    from . import segmentation
    s, sc = _seg_settings(a)
    work = s.paths.work("seg", a.work)
    with jobs.job_threads(sc.jobs):  # the numbers notebooks 02/03 get for this run
        res = segmentation.train(a.model, a.task, s.paths.converted, work, sc, a.seed)
    distributed.teardown()
    if res:
        print(json.dumps({k: v for k, v in res.items() if k not in ("classes", "cat_ids", "identity")}, indent=1))
    return 0


def _cmd_seg_eval(a: argparse.Namespace) -> int:
    from . import fileio, seg_eval
    s, sc = _seg_settings(a)
    run = fileio.read_json(f"{a.run_dir}/done.json", "finished segmentation run", "train it first (`pinpp seg-train`)")
    rows, _ = seg_eval.evaluate_run(run, s.paths.converted, a.split, a.on or run["task"], sc)
    for r in rows:
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}))
    return 0


def _det_settings(a: argparse.Namespace):
    from .config import resolve
    from . import det_transfer
    s = resolve(a.profile, data_root=a.data_root, overrides={"det": _parse_sets(a.set)})
    return s, s.det, det_transfer.data_files(s.det, s.paths.data_root, s.paths.converted)


def _cmd_det_train(a: argparse.Namespace) -> int:
    from . import det_transfer
    s, dc, data = _det_settings(a)
    init, act = det_transfer.row_inits(dataclasses.replace(dc, rows=(a.row,)), s.paths.work("mpm", a.mpm_work))[a.row]
    with jobs.job_threads(dc.jobs):  # the numbers notebook 08 gets for this row
        res = det_transfer.train(dc, a.row, init, act, data, s.paths.work("det", a.work) / a.row.replace(" ", "_"))
    distributed.teardown()
    if res:
        print(json.dumps({k: v for k, v in res.items() if k not in ("classes", "identity", "settings", "inputs")}, indent=1))
    return 0


def _cmd_det_eval(a: argparse.Namespace) -> int:
    from . import det_transfer, fileio
    s, dc, data = _det_settings(a)
    run = fileio.read_json(f"{a.run_dir}/done.json", "finished detection run", "train it first (`pinpp det-train`)")
    recs = det_transfer.evaluate({run["row"]: run}, dc, data)
    print(recs.to_string(index=False))
    return 0


def _cmd_few_shot(a: argparse.Namespace) -> int:
    from . import few_shot, few_shot_data, prepare, release
    from .config import resolve
    s = resolve(a.profile, data_root=a.data_root, overrides={"few_shot": _parse_sets(a.set)})  # the recipe applies here
    fs = s.few_shot
    rel_dir, images = prepare.few_shot_source(s)
    samples = few_shot_data.part_samples(release.load_release(rel_dir), images, min_per_class=max(fs.shots) + fs.n_query)
    records, _ = few_shot.run(samples, fs, s.paths.work("few_shot", a.work))  # as notebook 07 (map_jobs sets threads)
    for shot in fs.shots:
        for r in few_shot.summary_table(records, shot, fs.ci_group).to_dict("records"):
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}))
    print(few_shot.recipe_note(fs))
    return 0


def _cmd_pseudo(a: argparse.Namespace) -> int:
    from . import pseudo_labels, segmentation
    s, sc = _seg_settings(a)
    work = s.paths.work("seg", a.work)
    with jobs.job_threads(sc.jobs):  # the run notebook 02 trains
        run = segmentation.train(sc.pseudo_model, "parts", s.paths.converted, work, sc, s.seg.seeds[0])
    try:
        k, n = (int(v) for v in a.shard.split("/"))
    except ValueError:
        k, n = -1, 0
    if not 0 <= k < n:  # a real branch: `python -O` strips asserts
        raise PinppError(f"--shard {a.shard!r}: expected K/N with 0 <= K < N, e.g. 3/8")
    summary, _ = pseudo_labels.pseudo_label(run, s.paths.converted, sc, s.pseudo, a.limit, (k, n))
    print(json.dumps(summary, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .config import PROFILES
    p = argparse.ArgumentParser(prog="pinpp", description="PartImageNet++ reproduction kit")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("synth", help="write the synthetic PIN++ stand-in (release format + ImageNet layout)")
    s.add_argument("--out", required=True)
    s.add_argument("--classes", type=int, default=8)
    s.add_argument("--images-per-class", type=int, default=24)
    s.add_argument("--unannotated-per-class", type=int, default=8)
    s.add_argument("--val-per-class", type=int, default=6)
    s.add_argument("--size", type=int, default=96)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=1)
    s.set_defaults(fn=_cmd_synth)

    c = sub.add_parser("convert", help="release + ImageNet -> MPM layout, benchmark COCO JSONs, parts.json")
    c.add_argument("--annotations", required=True, help="the release folder (json/, including/, discarded_data.json)")
    c.add_argument("--imagenet-train", required=True)
    c.add_argument("--imagenet-val")
    c.add_argument("--val-list")
    c.add_argument("--out", required=True)
    c.add_argument("--seed", type=int, default=0, help="seed of the 8:1:1 benchmark split")
    c.add_argument("--link", choices=("symlink", "copy"), default="symlink")
    c.add_argument("--no-check-images", action="store_true", help="do not decode images (faster; misses truncated files)")
    c.add_argument("--workers", type=int, default=1)
    _add_strict(c)
    c.set_defaults(fn=_cmd_convert)

    t = sub.add_parser("stats", help="print Table 1/2 statistics of a release")
    t.add_argument("--annotations", required=True)
    _add_strict(t)
    t.set_defaults(fn=_cmd_stats)

    r = sub.add_parser("prepare", help="make (smoke) or check (full) the data and convert it")
    r.add_argument("--profile", default="smoke", choices=PROFILES)
    r.add_argument("--data-root")
    r.add_argument("--seed", type=int)
    r.set_defaults(fn=_cmd_prepare)

    for name, fn, text, example, work, sets in (
            ("train", _cmd_train, "train one run of notebook 05 (also under torchrun for DDP)",
             "e.g. at_mpm, at_plain, clean_vanilla (see notebook 05)", "folder of the runs (default <data-root>/runs/mpm)",
             "override a TrainConfig field"),
            ("tiny-train", _cmd_tiny_train, "train one T-PIN++ run of notebook 09 (Table A5, Fig. A1; also under torchrun)",
             "e.g. rx50_mpm, rx50_plain, r50_mpm_lambda2 (see notebook 09)",
             "folder of the T-PIN++ tree and runs (default <data-root>/runs/tiny)",
             "override a TinyConfig field (e.g. init=none, per_class=100; the recipe: at.epochs=10)")):
        tr = sub.add_parser(name, help=text)
        # positional: torchrun's own parser would take `--run` for an abbreviation of its `--run-path`
        tr.add_argument("run", nargs="?", help=f"run name, {example}")
        tr.add_argument("--run", dest="run_opt", metavar="RUN", help="the same, as an option (not under torchrun)")
        tr.add_argument("--profile", default="smoke", choices=PROFILES)
        tr.add_argument("--data-root")
        tr.add_argument("--work", help=work)
        if name == "tiny-train":
            tr.add_argument("--mpm-work", help="notebook 05's runs, for tiny.init=mpm_clean_run (default <data-root>/runs/mpm)")
        tr.add_argument("--seed", type=int)
        tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=sets)
        tr.add_argument("--restart", action="store_true", help="ignore existing checkpoints (default: resume)")
        tr.set_defaults(fn=fn)

    ev = sub.add_parser("eval-aa", help="AutoAttack (or PGD dev mode) per-image records for a trained run")
    ev.add_argument("--run-dir", required=True)
    ev.add_argument("--profile", default="smoke", choices=PROFILES)
    ev.add_argument("--data-root")
    ev.add_argument("--seed", type=int)
    ev.add_argument("--threat", action="append", choices=("Linf-4/255", "L2-2.0", "L1-75", "Linf-8/255"))
    ev.add_argument("--start", type=int, default=0, help="first image of this shard in the evaluation list")
    ev.add_argument("--end", type=int, help="one past the last image of this shard")
    ev.add_argument("--mode", choices=("autoattack", "pgd"), default="autoattack")
    ev.set_defaults(fn=_cmd_eval_aa)

    ic = sub.add_parser("imagenet-c", help="write ImageNet-C (15 corruptions × 5 severities) for the val set (App. D) "
                        "or the evaluation list")
    ic.add_argument("--profile", default="smoke", choices=PROFILES)
    ic.add_argument("--data-root")
    ic.add_argument("--seed", type=int)
    ic.add_argument("--out", help="target folder (default: <data root>/imagenet_c, where notebook 06 reads it)")
    ic.add_argument("--corruption", action="append", help="only these corruptions (repeatable; one per job to parallelise)")
    ic.add_argument("--images", choices=("val", "eval_list"),
                    help="the whole val set in class folders (App. D) or the evaluation list (default: the profile's "
                    "robustness.imagenet_c_images)")
    ic.set_defaults(fn=_cmd_imagenet_c)

    for name, fn, text in (("seg-train", _cmd_seg_train, "train one segmentation-benchmark model (mmdet; also under torchrun)"),
                           ("seg-eval", _cmd_seg_eval, "mask/box AP of a trained segmentation run (pycocotools and LVIS)"),
                           ("pseudo-label", _cmd_pseudo, "write pseudo part labels (w/ and w/o the Category Filter)")):
        sp = sub.add_parser(name, help=text)
        sp.add_argument("--profile", default="smoke", choices=PROFILES)
        sp.add_argument("--data-root")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a SegConfig field")
        sp.set_defaults(fn=fn)
        if name == "seg-train":
            from .segmentation import CONFIGS, TASKS
            sp.add_argument("--model", required=True, choices=list(CONFIGS))
            sp.add_argument("--task", default="parts", choices=TASKS)
            sp.add_argument("--seed", type=int, default=0)
        if name in ("seg-train", "pseudo-label"):
            sp.add_argument("--work", help="folder of the runs (default <data-root>/runs/seg)")
        if name == "seg-eval":
            sp.add_argument("--run-dir", required=True)
            sp.add_argument("--split", default="test", choices=("train", "val", "test"))
            sp.add_argument("--on", choices=("parts", "objects", "objects+parts"), help="file to score on (default: the training task)")
        if name == "pseudo-label":
            sp.add_argument("--limit", type=int, help="label only the first N unlabelled images (a dry run)")
            sp.add_argument("--shard", default="0/1", help="K/N: this process labels every N-th image from the K-th "
                                                           "(one process per GPU: CUDA_VISIBLE_DEVICES=K ... --shard K/N)")

    for name, fn, text in (("det-train", _cmd_det_train, "train one Table A3 detector with free AT (mmdet; also under torchrun)"),
                           ("det-eval", _cmd_det_eval, "box AP/AP50 of a Table A3 detector, clean and under each attack")):
        dp = sub.add_parser(name, help=text)
        dp.add_argument("--profile", default="smoke", choices=PROFILES)
        dp.add_argument("--data-root")
        dp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a DetConfig field")
        dp.set_defaults(fn=fn)
        if name == "det-train":
            from .det_transfer import ROWS
            dp.add_argument("--row", required=True, choices=ROWS, help="the backbone: the reference or notebook 05's AT model")
            dp.add_argument("--work", help="folder of the detector runs (default <data-root>/runs/det)")
            dp.add_argument("--mpm-work", help="notebook 05's runs (default <data-root>/runs/mpm)")
        else:
            dp.add_argument("--run-dir", required=True)

    fp = sub.add_parser("few-shot", help="train and score the four few-shot models of Tables 11/12 (notebook 07's job)")
    fp.add_argument("--profile", default="smoke", choices=PROFILES)
    fp.add_argument("--data-root")
    fp.add_argument("--work", help="folder of the models and stored episodes (default <data-root>/runs/few_shot)")
    fp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a FewShotConfig field, e.g. recipe=authors_code")
    fp.set_defaults(fn=_cmd_few_shot)

    io = sub.add_parser("import-official", help="one of the authors' released checkpoints as a kit run folder "
                                                 "(eval-aa, notebooks 05/06 read it)")
    io.add_argument("checkpoint", help="the authors' .pth.tar (timm CheckpointSaver layout) or a bare state_dict")
    io.add_argument("--arch", required=True, choices=("plain", "mpm", "mpm_sv1", "mpm_sv2", "mpm_sv3_notd", "twostage"))
    io.add_argument("--out", required=True, help="the run folder to write")
    io.add_argument("--weights", choices=("ema", "raw"), default="ema", help="state_dict_ema (the authors' eval.py) or state_dict")
    io.add_argument("--classes", help="file of the model's output wnids, one per line (default: the 1000 IN-1K classes, sorted)")
    io.set_defaults(fn=_cmd_import_official)

    zp = sub.add_parser("zoo", help="Table 3's public ResNet-50 AT models: list, fetch, import as kit runs")
    zsub = zp.add_subparsers(dest="zoo_cmd", required=True)
    zsub.add_parser("list", help="the models, where their weights are published, their published numbers")
    zf = zsub.add_parser("fetch", help="download a model's weights (sha256 checked where known)")
    zf.add_argument("name")
    zf.add_argument("--dir", help="target folder (default: <full data root>/released)")
    zf.add_argument("--url", help="another URL for the same file (a mirror, file://...)")
    zi = zsub.add_parser("import", help="a model's weights file as a kit run folder (eval-aa reads it)")
    zi.add_argument("name")
    zi.add_argument("--weights", required=True)
    zi.add_argument("--out", required=True)
    zp.set_defaults(fn=_cmd_zoo)

    hc = sub.add_parser("human-consistency", help="model-vs-human metrics of a model's decisions, or the human ceiling")
    hc.add_argument("--decisions", help="CSV with dataset, imagename (or key), decision (one of the 16 categories); "
                                        "omit for the human noise ceiling")
    hc.add_argument("--trials", help="folder of human trial CSVs (default: the copy shipped with the kit)")
    hc.add_argument("--dataset", action="append", help="restrict to these datasets (repeatable)")
    hc.set_defaults(fn=_cmd_human)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except PinppError as e:
        print(f"pinpp {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pinpp {args.cmd}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
