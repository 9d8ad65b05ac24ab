"""Data-loading benchmark (issue: masks add ≤ 25 % to loading time).

Measures, in one run on this machine:
  * samples/s of the training pipeline for image-only vs image + 16-bit part mask
    (decode + random-resized-crop 224 + flip + jitter; the mask rides along with nearest resizing),
  * conversion images/s (polygons → 16-bit PNG + COCO records, images decoded for validation).
Prints the ratio (image+mask time / image-only time). Data: a synthetic release at ImageNet-like size.

    .venv/bin/python benchmarks/bench_data.py [--images 400] [--size 400]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torchvision.transforms import v2

from pinpp_lib import datasets as D
from pinpp_lib.convert import ConvertConfig, convert
from pinpp_lib.synthetic import SynthConfig, generate


def _time(fn, n: int, repeats: int = 3) -> float:
    """Best-of-`repeats` seconds per call over n calls (best-of damps noise from other processes)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(n):
            fn(i)
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=400, help="annotated images in the benchmark set")
    ap.add_argument("--size", type=int, default=400, help="long side of the images (ImageNet ~ 400-500)")
    ap.add_argument("--workers", type=int, default=0, help="also time a DataLoader with this many workers (img+mask)")
    ap.add_argument("--json", help="also write the figures to this JSON file (scripts/gpu_check.sh)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # one loader worker's view
    classes = 8
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        syn = generate(tmp / "s", SynthConfig(classes=classes, images_per_class=args.images // classes, unannotated_per_class=0,
                                              val_per_class=0, size=args.size, discard_rate=0.0))
        t0 = time.perf_counter()
        summary = convert(syn / "release", syn / "imagenet" / "train", tmp / "c", cfg=ConvertConfig())
        conv_s = time.perf_counter() - t0

        cfg = D.TransformConfig()
        ds = D.PartSegDataset(tmp / "c", D.train_transform(cfg), only_annotated=True)
        tf = D.train_transform(cfg)
        n = len(ds)

        def image_only(i: int) -> None:  # the same pipeline without the mask
            img = D._load_rgb(ds.img_root / ds.samples[i][0])
            tf(v2.functional.pil_to_tensor(img))

        def image_and_mask(i: int) -> None:
            ds[i]

        torch.manual_seed(0)
        t_img = _time(image_only, n)
        t_both = _time(image_and_mask, n)
        loader_s = None
        if args.workers:  # the training loader's view: image + mask through the train transform, batched
            dl = torch.utils.data.DataLoader(ds, batch_size=64, num_workers=args.workers, persistent_workers=False)
            t0 = time.perf_counter()
            seen = sum(len(batch[0]) for batch in dl)
            loader_s = seen / (time.perf_counter() - t0)
            print(f"DataLoader, {args.workers} workers, image + mask: {loader_s:8.1f} samples/s")
    print(f"images: {n} at up to {args.size}px, train transform 224 (bicubic RRC + flip + jitter), 1 thread")
    print(f"image only      : {1 / t_img:8.1f} samples/s")
    print(f"image + 16b mask: {1 / t_both:8.1f} samples/s")
    print(f"ratio (image+mask time / image time): {t_both / t_img:.3f}   goal <= 1.25")
    print(f"conversion      : {summary['images'] / conv_s:8.1f} images/s (1 worker, decode check on)")
    if args.json:
        import json
        Path(args.json).write_text(json.dumps({"images": n, "size": args.size, "image_only_1thread_s": 1 / t_img,
                                               "image_mask_1thread_s": 1 / t_both, "mask_cost_ratio": t_both / t_img,
                                               "loader_workers": args.workers, "loader_img_mask_s": loader_s}, indent=1))


if __name__ == "__main__":
    main()
