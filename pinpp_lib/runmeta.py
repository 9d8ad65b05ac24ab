"""Provenance: every run writes run_meta.json (params, profile, git commit, packages, device, seeds, time)."""
from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from . import fileio

PACKAGES = ("torch", "torchvision", "timm", "numpy", "mmdet", "mmcv", "mmengine", "learn2learn", "pycocotools",
            "pyautoattack", "papermill", "seaborn", "pandas", "pillow", "opencv-python", "imagecorruptions-imaug")


def repo_root() -> Path:
    """The kit's checkout (the folder holding pinpp_lib/)."""
    return Path(__file__).resolve().parents[1]


def git_commit() -> dict[str, Any]:
    """HEAD commit of the kit's checkout and whether the tree has uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo_root(), capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        # results/ is excluded: a run rewrites its own (tracked) outputs, which says nothing about the code
        return {"commit": git("rev-parse", "HEAD") or None,
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def package_versions() -> dict[str, str | None]:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def device_info() -> dict[str, Any]:
    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        import torch
        info["cuda"] = torch.cuda.is_available()
        if info["cuda"]:
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return info


class RunMeta:
    """Collects a run's provenance; `write()` saves it (atomically) with the end time.

    >>> meta = RunMeta("01_dataset_statistics", profile="smoke", params={...}, seeds={"synth": 0})
    >>> ...; meta.write(results_dir / "run_meta" / "01_dataset_statistics.json")
    """

    def __init__(self, name: str, *, profile: str, params: dict[str, Any], seeds: dict[str, int]):
        self.record = {"name": name, "profile": profile, "params": params, "seeds": seeds,
                       "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                       "git": git_commit(), "packages": package_versions(), "device": device_info()}

    def write(self, path: str | os.PathLike, **extra: Any) -> Path:
        self.record.update(extra)
        self.record["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        fileio.write_json(path, self.record, indent=1)
        return Path(path)
