"""Where an MPM AT step spends its time beyond a vanilla AT step (issue 19): torch.profiler over `train_step`.

Profiles the same PGD-2 AT step (ResNet-50-GELU, 1000 classes, 3310 parts + background) with and without the bypass,
and prints the operators whose self time the MPM step adds, and the share of the step that the bypass modules, the
segmentation heads and the segmentation loss take. On a GPU: bf16 autocast and channels_last (the paper's setting);
on a CPU: fp32 and a small batch. Usage:

    .venv/bin/python benchmarks/profile_at_step.py [--arch r50|tiny] [--size 224] [--batch 4] [--steps 3] [--json F]
"""
from __future__ import annotations

import argparse
import contextlib
import json
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from pinpp_lib import models
from pinpp_lib.training import TrainConfig, _param_groups, train_step


def _profile(step, steps: int, cuda: bool) -> tuple[dict[str, float], float]:
    """Self time (µs) per operator over `steps` calls after two warm-up calls, and the wall time per call (µs)."""
    for _ in range(2):
        step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            with record_function("step"):
                step()
        if cuda:
            torch.cuda.synchronize()
    self_time: dict[str, float] = defaultdict(float)
    wall = 0.0
    for e in prof.key_averages():
        t = (e.self_device_time_total if cuda else e.self_cpu_time_total) / steps
        if e.key == "step":
            wall = (e.device_time_total if cuda else e.cpu_time_total) / steps
        else:
            self_time[e.key] += t
    return dict(self_time), wall


def _module_share(model: torch.nn.Module, step, names: tuple[str, ...]) -> float:
    """Fraction of a step's wall time spent inside forward calls of modules whose name starts with `names`
    (forward only: their backward runs interleaved with the rest and is not attributed)."""
    import time
    spent = [0.0]
    starts: dict[int, float] = {}
    hooks = []
    for n, mod in model.named_modules():
        if n and n.split(".")[0] in names and "." not in n:
            hooks.append(mod.register_forward_pre_hook(lambda m, i: starts.__setitem__(id(m), time.perf_counter())))
            hooks.append(mod.register_forward_hook(lambda m, i, o: spent.__setitem__(0, spent[0] + time.perf_counter() - starts[id(m)])))
    t0 = time.perf_counter()
    step()
    total = time.perf_counter() - t0
    for h in hooks:
        h.remove()
    return spent[0] / total


def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="r50", choices=("r50", "tiny"))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64 if cuda else 4)
    ap.add_argument("--steps", type=int, default=5 if cuda else 3)
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = torch.device("cuda" if cuda else "cpu")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    fmt = torch.channels_last if cuda else torch.contiguous_format
    torch.manual_seed(0)
    b, s = args.batch, args.size
    x = torch.rand(b, 3, s, s, device=dev).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (b,), device=dev)
    m = torch.randint(0, 3311, (b, s, s), device=dev)
    w = torch.ones(b, device=dev)
    cfg = TrainConfig()

    def make(variant: str):
        model = models.build(variant, args.arch, 1000, 3311).to(dev, memory_format=fmt).train()
        opt = torch.optim.SGD(_param_groups(list(model.named_parameters()), 1e-4), lr=0.01, momentum=0.9)
        return model, (lambda: train_step(model, model, opt, x, m, y, w, cfg, 4 / 255, autocast))

    _, van_step = make("plain")
    mpm, mpm_step = make("mpm")
    van, t_van = _profile(van_step, args.steps, cuda)
    mp, t_mpm = _profile(mpm_step, args.steps, cuda)
    added = sorted(((mp.get(k, 0.0) - van.get(k, 0.0), k) for k in set(mp) | set(van)), reverse=True)
    heads = tuple(n for n, _ in mpm.named_children() if n not in ("backbone", "stem", "layer1", "layer2", "layer3", "layer4", "fc"))
    share = _module_share(mpm, mpm_step, heads)
    print(f"{'GPU' if cuda else 'CPU'}; {args.arch} at {s}px, batch {b}; PGD-2 AT step, {args.steps} profiled")
    print(f"vanilla AT step {t_van / 1e3:8.1f} ms; MPM AT step {t_mpm / 1e3:8.1f} ms; ratio {t_mpm / t_van:.3f} (goal <= 1.05)")
    print(f"forward of the MPM-only modules {heads}: {100 * share:.1f} % of the MPM step's wall time")
    print("operators whose self time the MPM step adds (ms per step):")
    for d, k in added[:12]:
        print(f"  {d / 1e3:8.2f}  {k}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": "GPU" if cuda else "CPU", "arch": args.arch, "size": s, "batch": b,
            "vanilla_at_ms": t_van / 1e3, "mpm_at_ms": t_mpm / 1e3, "ratio": t_mpm / t_van, "mpm_module_forward_share": share,
            "added_ops_ms": {k: d / 1e3 for d, k in added[:20]}}, indent=1))


if __name__ == "__main__":
    main()
