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


def _checkout_of(path: Path) -> Path | None:
    """The kit checkout that holds `path` (a folder with pinpp_lib/ and notebooks/), if any."""
    for p in (path, *path.parents):
        if (p / "pinpp_lib" / "__init__.py").is_file() and (p / "notebooks").is_dir():
            return p
    return None


def code_root() -> Path:
    """The folder this package was imported from (the checkout, for the kit's own editable install)."""
    return Path(__file__).resolve().parents[1]


def repo_root() -> Path:
    """The kit's checkout, where default data and results live: $PINPP_ROOT if set, else the checkout the current
    folder is in (JupyterLab and papermill run a notebook in its own folder), else the package's. So a second clone
    that shares a virtual environment with the first reads and writes its own data/ and results/."""
    env = os.environ.get("PINPP_ROOT")
    if env:
        return Path(env).resolve()
    return _checkout_of(Path.cwd().resolve()) or code_root()


def code_mismatch() -> str:
    """One line when the current folder belongs to another checkout than the imported code ('' otherwise)."""
    here = None if os.environ.get("PINPP_ROOT") else _checkout_of(Path.cwd().resolve())
    if here is None or here == code_root():
        return ""
    return (f"pinpp_lib is imported from {code_root()}, but this folder is in the checkout {here}: that checkout's "
            f"data/ and results/ are used with the other checkout's code; run {here}/run_all.sh (its own .venv) or "
            f"`pip install -e {here}` in this environment")


def git_commit() -> dict[str, Any]:
    """HEAD commit of the kit's checkout and whether the tree has uncommitted changes."""
    def git(*args: str) -> str:
        # the code that ran: the checkout the package was imported from
        return subprocess.run(["git", *args], cwd=code_root(), capture_output=True, text=True, timeout=10).stdout.strip()
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
