"""Where the jobs read ImageNet-pretrained weights from, and stand-ins written in the published formats.

The full profile reads pretrained weights the way the libraries do: torchvision's and mmengine's
`torchvision://` files from the torch hub folder (`$TORCH_HOME/hub/checkpoints/<file>.pth`), timm's
from the Hugging Face hub cache (`$HF_HOME/hub/models--timm--<name>/snapshots/<rev>/model.safetensors`).
`WeightsConfig.cache` points both at one folder instead (`<cache>/torch/hub`, `<cache>/huggingface/hub`).

The rehearsal profile cannot download the real weights, so it writes seeded random weights in exactly
those formats and places (`write_standins`) — file names from torchvision's and mmengine's URL tables,
key names from the libraries' own models — and the jobs then load them through their full-profile code
paths. Stand-ins are only ever written into a configured cache folder, never into a default one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from . import fileio
from .checks import Checked, Rule

STANDIN_REVISION = "0" * 40  # the snapshot name of stand-ins in the HF cache (a commit hash's form)
VIT = "vit_small_patch16_224"  # the segmentation ViT-S/16 (seg_configs/_vit_s_sfp.py)


@dataclass
class WeightsConfig(Checked):
    """Pretrained-weight location. `cache`: a folder holding `torch/hub` and `huggingface/hub` (relative: under
    the data root); None: the libraries' defaults (TORCH_HOME, HF_HOME). `standins`: write seeded random weights
    in the published formats into `cache` (rehearsal; nothing real is overwritten)."""
    cache: str | None = None
    standins: bool = False
    LIMITS: ClassVar[dict[str, Rule]] = {}

    def folder(self, data_root: str | Path) -> Path | None:
        return None if self.cache is None else Path(data_root) / self.cache


_DEFAULTS: dict[str, str | None] = {}  # the process's own locations, saved before the first redirect


def use_cache(folder: str | Path | None) -> None:
    """Point torch hub and the Hugging Face hub cache of this process (and of its children) at `folder`;
    None restores the locations the process had before (a smoke or full `resolve` after a rehearsal one)."""
    if folder is None and not _DEFAULTS:
        return  # never redirected: nothing to restore
    import huggingface_hub.constants as hc  # read at call time by hf_hub_download (timm's loader)
    if not _DEFAULTS:
        _DEFAULTS.update(hub=torch.hub.get_dir(), hf=hc.HF_HUB_CACHE, TORCH_HOME=os.environ.get("TORCH_HOME"),
                         HF_HUB_CACHE=os.environ.get("HF_HUB_CACHE"))
    if folder is None:
        torch.hub.set_dir(_DEFAULTS["hub"])
        hc.HF_HUB_CACHE = _DEFAULTS["hf"]
        for var in ("TORCH_HOME", "HF_HUB_CACHE"):
            if _DEFAULTS[var] is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = _DEFAULTS[var]
        return
    folder = Path(folder)
    torch.hub.set_dir(str(folder / "torch" / "hub"))
    hc.HF_HUB_CACHE = os.environ["HF_HUB_CACHE"] = str(folder / "huggingface" / "hub")
    os.environ["TORCH_HOME"] = str(folder / "torch")


def torchvision_files() -> dict[str, str]:
    """File name → torchvision architecture of every torch-hub file the kit loads: ResNet-50 V2 (MPM/AT init,
    `training.load_init`), ResNeXt-50 32×4d V2 (T-PIN++'s Table A5 init) and mmengine's `torchvision://resnet50` /
    `resnet101` (segmentation backbones)."""
    from mmengine.runner.checkpoint import get_torchvision_models
    from torchvision.models import ResNet50_Weights, ResNeXt50_32X4D_Weights
    mm = get_torchvision_models()
    urls = {ResNet50_Weights.IMAGENET1K_V2.url: "resnet50", ResNeXt50_32X4D_Weights.IMAGENET1K_V2.url: "resnext50_32x4d",
            mm["resnet50"]: "resnet50", mm["resnet101"]: "resnet101"}
    return {url.rsplit("/", 1)[1]: arch for url, arch in urls.items()}


def timm_location(folder: str | Path, model_name: str = VIT) -> Path:
    """Where the HF hub cache holds timm's default pretrained weights of `model_name`."""
    from timm.models import get_pretrained_cfg
    repo = get_pretrained_cfg(model_name).hf_hub_id
    return Path(folder) / "huggingface" / "hub" / f"models--{repo.replace('/', '--')}"


def write_standins(folder: str | Path, seed: int = 0) -> list[Path]:
    """Write seeded random weights, in the published formats, for every pretrained file the kit loads; files
    already there are kept (real ones included). Returns the paths."""
    import safetensors.torch
    import timm
    import torchvision
    folder = Path(folder)
    out = []
    for name, arch in torchvision_files().items():
        path = folder / "torch" / "hub" / "checkpoints" / name
        if not path.exists():
            torch.manual_seed(seed)
            sd = getattr(torchvision.models, arch)().state_dict()  # torchvision's own key names, a plain state dict
            path.parent.mkdir(parents=True, exist_ok=True)
            with fileio.atomic_path(path) as tmp, open(tmp, "wb") as f:
                torch.save(sd, f)
        out.append(path)
    loc = timm_location(folder)
    path = loc / "snapshots" / STANDIN_REVISION / "model.safetensors"
    if not path.exists():
        torch.manual_seed(seed)
        sd = timm.create_model(VIT, pretrained=False).state_dict()
        path.parent.mkdir(parents=True, exist_ok=True)
        with fileio.atomic_path(path) as tmp:
            safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp))
        fileio.write_text(loc / "refs" / "main", STANDIN_REVISION)
    out.append(path)
    return out
