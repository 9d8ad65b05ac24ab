"""Side-by-side runs (issue 13): two independent tiny AT runs trained `jobs=2` at a time (one CPU thread each, what
the smoke profile does on 2 cores) against the same two one after another (`jobs=1`, the process's threads), measured
in one run on this machine.

    wall(jobs=2) / wall(jobs=1)     goal <= 0.80 on 2 cores (1.0: no gain; 0.5: perfect overlap)

jobs=1 uses the process's threads (the alternative on the same machine), jobs=2 one thread per run. Usage:

    .venv/bin/python benchmarks/bench_jobs.py [--epochs 2] [--batch 32]
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

from pinpp_lib import jobs
from pinpp_lib.convert import ConvertConfig, convert
from pinpp_lib.datasets import TransformConfig
from pinpp_lib.synthetic import SynthConfig, generate
from pinpp_lib.training import TrainConfig, train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        syn = generate(tmp / "s", SynthConfig(classes=10, images_per_class=40, unannotated_per_class=0, val_per_class=1))
        convert(syn / "release", syn / "imagenet" / "train", tmp / "c", syn / "imagenet" / "val", syn / "imagenet" / "val_list.txt",
                ConvertConfig(workers=2))
        base = TrainConfig(arch="tiny", variant="mpm", seg_dir="seg", epochs=args.epochs, batch_size=args.batch, workers=0, init="none",
                           init_stage_epochs=0, transform=TransformConfig(size=64, scale=(0.6, 1.0)))
        runs = [dataclasses.replace(base, seed=s) for s in (0, 1)]
        train(dataclasses.replace(base, epochs=1), tmp / "c", tmp / "warmup")  # page cache, imports: not timed
        walls, weights = {}, {}
        for n_jobs in (1, 2):
            t0 = time.perf_counter()
            recs = jobs.map_jobs(train, [(tc, tmp / "c", tmp / f"j{n_jobs}" / f"run{i}") for i, tc in enumerate(runs)],
                                 n_jobs, f"jobs={n_jobs}")
            walls[n_jobs] = time.perf_counter() - t0
            weights[n_jobs] = [r["sha256"] for r in recs]
        print(f"two runs one after another (jobs=1): {walls[1]:.1f} s; side by side (jobs=2): {walls[2]:.1f} s")
        print(f"wall(jobs=2) / wall(jobs=1) = {walls[2] / walls[1]:.2f}   (goal <= 0.80)")
        # jobs=1 computes with all of the process's threads, jobs=2 with one each: equal weights are not promised
        # here (the kit's profiles never mix the two for one run); printed for information
        print("weights equal across the two schedules:", weights[1] == weights[2])


if __name__ == "__main__":
    main()
