"""Does PyPI's `pyautoattack` (the kit's AutoAttack) give the same per-image results as the AutoAttack copy vendored in
the authors' repository (LixiaoTHU/PartImageNetPP, `autoattack/`)? Issue 16, part 3.

    python scripts/compare_autoattack.py /path/to/PartImageNetPP [--images 24] [--seed 0]

A small CNN is fitted to a fixed set of random images (so that every image starts correctly classified and each
attack has work to do); both libraries then run `version="standard"` at each of Table 3's threats (L∞ 4/255, L2 2.0,
L1 75 — L1 with the library's own `use_largereps` setting) on the same images, with the same seed and batch. The
script prints, per threat, the robust flags of both and whether they are identical, and exits non-zero on any
difference. It imports the authors' copy from their checkout at run time; nothing of theirs is kept in the kit.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch
import torch.nn as nn

THREATS = {"Linf-4/255": ("Linf", 4 / 255), "L2-2.0": ("L2", 2.0), "L1-75": ("L1", 75.0)}


def fitted_model(x: torch.Tensor, y: torch.Tensor, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    return m.eval()


def robust_flags(aa_module, model, x, y, norm, eps, seed, kit: bool) -> list[bool]:
    if kit:
        adv = aa_module.AutoAttack(model, norm=norm, eps=eps, version="standard", device="cpu", seed=seed)
        x_adv, _ = adv.run_standard_evaluation(x, y, batch_size=len(x))
    else:
        adv = aa_module.AutoAttack(model, norm=norm, eps=eps, version="standard", device="cpu", seed=seed, verbose=False)
        x_adv = adv.run_standard_evaluation(x, y, bs=len(x))
    with torch.no_grad():
        return (model(x_adv).argmax(1) == y).tolist()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("authors_repo", type=Path, help="a checkout of LixiaoTHU/PartImageNetPP (its autoattack/ folder)")
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eps-scale", type=float, default=0.05,
                    help="ε × this, so that the small model keeps some images robust and every stage has work (default 0.05)")
    a = ap.parse_args(argv)
    if not (a.authors_repo / "autoattack" / "autoattack.py").is_file():
        print(f"{a.authors_repo}: no autoattack/autoattack.py; pass a checkout of LixiaoTHU/PartImageNetPP", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(a.seed)
    x = torch.rand(a.images, 3, 32, 32, generator=g)
    y = torch.arange(a.images) % 10
    model = fitted_model(x, y, a.seed)
    import pyautoattack
    sys.path.insert(0, str(a.authors_repo))
    authors = importlib.import_module("autoattack")
    assert Path(authors.__file__).resolve().is_relative_to(a.authors_repo.resolve()), authors.__file__
    same = True
    for threat, (norm, eps) in THREATS.items():
        eps *= a.eps_scale
        ours = robust_flags(pyautoattack, model, x, y, norm, eps, a.seed, kit=True)
        theirs = robust_flags(authors, model, x, y, norm, eps, a.seed, kit=False)
        same &= ours == theirs
        print(f"{threat} × {a.eps_scale:g}: robust {sum(ours)}/{len(ours)} (pyautoattack) vs {sum(theirs)}/{len(theirs)} (authors' copy); "
              f"per-image flags {'identical' if ours == theirs else 'DIFFER'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
