"""`pinpp` — the kit's long jobs behind one console command (also `python -m pinpp_lib`).

Notebooks, shell scripts and torchrun call the same functions this CLI calls. User errors
(PinppError) are printed as one line without a traceback and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys

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


def build_parser() -> argparse.ArgumentParser:
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
    r.add_argument("--profile", default="smoke", choices=("smoke", "full"))
    r.add_argument("--data-root")
    r.add_argument("--seed", type=int)
    r.set_defaults(fn=_cmd_prepare)
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
