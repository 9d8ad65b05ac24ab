"""Training/evaluation benchmark for issue 3, ratios measured in one run on whatever device is present.

    MPM AT step / vanilla AT step          goal <= 1.05   (the bypass is cheap next to PGD)
    PGD-2 AT step / clean step             ideal 3.0      (2 attack fwd+bwd + 1 training fwd+bwd)
    deployable MPM / timm resnet50 (infer) goal 1.00      (same network once the bypass is dropped)
    kit AutoAttack / direct pyautoattack   goal <= 1.02, identical robust accuracy

On a GPU: ResNet-50 at 224 px, bf16 autocast, channels_last (the paper's setting); img/s printed.
On a CPU the defaults shrink the batch. Usage:

    .venv/bin/python benchmarks/bench_train.py [--arch r50|tiny] [--size 224] [--batch 64] [--steps 10]
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import timm
import torch

from pinpp_lib import models, robust_eval
from pinpp_lib.training import TrainConfig, _param_groups, train_step


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, steps: int, dev: torch.device, warmup: int = 2) -> float:
    """Median seconds per call after warm-up."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="r50", choices=("r50", "tiny"))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64 if cuda else 4)
    ap.add_argument("--steps", type=int, default=10 if cuda else 3)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--parts", type=int, default=3310)
    ap.add_argument("--aa-images", type=int, default=32)
    ap.add_argument("--json", help="also write the figures to this JSON file (scripts/gpu_check.sh)")
    args = ap.parse_args()
    dev = torch.device("cuda" if cuda else "cpu")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    fmt = torch.channels_last if cuda else torch.contiguous_format
    cfg = TrainConfig()
    torch.manual_seed(0)
    b, s = args.batch, args.size
    x = torch.rand(b, 3, s, s, device=dev).contiguous(memory_format=fmt)
    y = torch.randint(0, args.classes, (b,), device=dev)
    m = torch.randint(0, args.parts + 1, (b, s, s), device=dev)
    w = torch.ones(b, device=dev)

    def step_fn(variant: str, step_size: float | None):
        model = models.build(variant, args.arch, args.classes, args.parts + 1).to(dev, memory_format=fmt).train()
        opt = torch.optim.SGD(_param_groups(list(model.named_parameters()), 1e-4), lr=0.01, momentum=0.9)
        return lambda: train_step(model, model, opt, x, m, y, w, cfg, step_size, autocast)

    print(f"device: {torch.cuda.get_device_name() if cuda else 'CPU'}; {args.arch} at {s}px, batch {b}, "
          f"{'bf16 autocast, channels_last' if cuda else 'fp32'}; median of {args.steps} steps")
    t_van = _time(step_fn("plain", 4 / 255), args.steps, dev)
    t_mpm = _time(step_fn("mpm", 4 / 255), args.steps, dev)
    t_clean = _time(step_fn("plain", None), args.steps, dev)
    print(f"vanilla AT step  {t_van * 1e3:8.1f} ms  ({b / t_van:7.1f} img/s)")
    print(f"MPM AT step      {t_mpm * 1e3:8.1f} ms  ({b / t_mpm:7.1f} img/s)")
    print(f"clean step       {t_clean * 1e3:8.1f} ms  ({b / t_clean:7.1f} img/s)")
    print(f"ratio MPM AT / vanilla AT step: {t_mpm / t_van:.3f}   goal <= 1.05")
    print(f"ratio PGD-2 AT / clean step:    {t_van / t_clean:.3f}   ideal 3.0")

    mpm = models.build("mpm", args.arch, args.classes, args.parts + 1).to(dev, memory_format=fmt).eval()
    dep = models.export_deployable(mpm)
    ref = timm.create_model("resnet50" if args.arch == "r50" else "resnet18", act_layer="gelu", num_classes=args.classes)
    if args.arch == "r50":
        ref.load_state_dict(dep.state_dict())
    else:  # tiny has no timm twin: compare against an identical fresh copy of the plain model
        ref = models.build("plain", "tiny", args.classes)
    ref = ref.to(dev, memory_format=fmt).eval()
    def infer(net):
        def run():
            with torch.no_grad(), autocast():  # the context must close: a leaked autocast would run AutoAttack in bf16
                return net(x)
        return run
    t_dep = _time(infer(dep), args.steps, dev)
    t_ref = _time(infer(ref), args.steps, dev)
    print(f"inference: deployable MPM {b / t_dep:7.1f} img/s, timm {'resnet50' if args.arch == 'r50' else 'plain'} "
          f"{b / t_ref:7.1f} img/s; ratio {t_dep / t_ref:.3f}   goal 1.00")

    # AutoAttack: the kit's per-stage evaluation vs one direct pyautoattack call (tiny model, CPU-sized).
    # Timed in ABBA order, best of two each, so that drift in machine speed does not favour either.
    from pyautoattack import AutoAttack
    torch.manual_seed(0)
    tiny = models.build("plain", "tiny", 10).eval().to(dev)
    xa = torch.rand(args.aa_images, 3, 32, 32, device=dev)
    ya = robust_eval.predict(tiny, xa).to(dev)
    ecfg = robust_eval.EvalConfig(threats=("Linf-4/255",), batch_size=args.aa_images, clean_floor=0.0)

    def direct() -> tuple[float, float]:
        t0 = time.perf_counter()
        adv, _ = AutoAttack(tiny, norm="Linf", eps=4 / 255, version="standard", device=dev, seed=0).run_standard_evaluation(
            xa, ya, batch_size=args.aa_images)
        _sync(dev)
        return time.perf_counter() - t0, (robust_eval.predict(tiny, adv) == ya.cpu()).float().mean().item()

    def kit() -> tuple[float, float]:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            recs = robust_eval.evaluate(tiny, xa.cpu(), ya.cpu(), 10, ecfg, Path(tmp), device=dev)
            _sync(dev)
            return time.perf_counter() - t0, sum(r["robust"] for r in recs) / len(recs)

    runs = [direct(), kit(), kit(), direct()]
    t_direct, acc_direct = min(runs[0][0], runs[3][0]), runs[0][1]
    t_kit, acc_kit = min(runs[1][0], runs[2][0]), runs[1][1]
    print(f"AutoAttack L-inf 4/255 on {args.aa_images} images (best of 2, ABBA): direct {t_direct:.1f} s "
          f"(robust {acc_direct:.4f}), kit {t_kit:.1f} s (robust {acc_kit:.4f}); identical: {acc_kit == acc_direct}; "
          f"time ratio {t_kit / t_direct:.3f}   goal <= 1.02")
    if args.json:
        import json
        Path(args.json).write_text(json.dumps({
            "device": torch.cuda.get_device_name() if cuda else "CPU", "arch": args.arch, "size": s, "batch": b,
            "precision": "bf16 autocast, channels_last" if cuda else "fp32",
            "vanilla_at_img_s": b / t_van, "mpm_at_img_s": b / t_mpm, "clean_img_s": b / t_clean,
            "mpm_at_over_vanilla_at": t_mpm / t_van, "pgd2_at_over_clean": t_van / t_clean,
            "pgd2_at_throughput_vs_clean": t_clean / t_van, "deployable_mpm_over_timm_infer": t_dep / t_ref,
            "autoattack_kit_over_direct": t_kit / t_direct, "autoattack_identical": acc_kit == acc_direct}, indent=1))


if __name__ == "__main__":
    main()
