"""Table 3's public ResNet-50 AT models: where their weights are, and how they become kit runs (issue 14).

`pinpp_lib/data/zoo.csv` holds one row per model (the published location, file layout, architecture,
preprocessing and the numbers its authors report). `fetch` downloads a file with a progress bar and checks its
sha256 where the row has one; Google Drive files (RobustBench's copies) go through `robustbench` when it is
installed, else the one line that says where to put the file. `import_zoo` loads a file with
`torch.load(weights_only=True)` (`argparse.Namespace` allowed, as in timm checkpoints), strips the row's key
prefixes, checks and drops a stored normalisation layer (the kit's models normalise inside), and loads the rest
strictly into the row's architecture; the result is an ordinary run folder (`training.load_trained`,
`pinpp eval-aa --run-dir`) that the kit evaluates with its own preprocessing on the authors' list.
"""
from __future__ import annotations

import csv
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from . import fileio, imagenet, models, store
from .fileio import PinppError
from .released import read_checkpoint, write_run


@dataclass(frozen=True)
class ZooEntry:
    name: str
    model: str
    paper: str
    arch: str
    url: str
    file: str
    sha256: str
    container: tuple[str, ...]
    strip: tuple[str, ...]
    preprocessing: str
    published_clean: float | None
    published_linf4: float | None
    published_eval: str
    checked: str
    importable: str = "yes"
    convert: str = ""  # "" or a layout conversion applied after the prefixes are stripped (CONVERSIONS)

    @property
    def why_not(self) -> str:
        """'' when the kit imports this row's file, else the reason it cannot."""
        return "" if self.importable == "yes" else self.importable.removeprefix("no:").strip()


def entries() -> dict[str, ZooEntry]:
    """name → entry, from the shipped `zoo.csv`."""
    with resources.files("pinpp_lib.data").joinpath("zoo.csv").open() as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    num = lambda v: float(v) if v else None  # noqa: E731
    return {r["name"]: ZooEntry(r["name"], r["model"], r["paper"], r["arch"], r["url"], r["file"], r["sha256"],
                                tuple(r["container"].split(";")), tuple(p for p in r["strip"].split(";") if p),
                                r["preprocessing"], num(r["published_clean"]), num(r["published_linf4"]), r["published_eval"],
                                r["checked"], r["importable"], r.get("convert") or "")
            for r in rows}


def entry(name: str) -> ZooEntry:
    zoo = entries()
    if name not in zoo:
        raise PinppError(f"unknown zoo model {name!r}; `pinpp zoo list` shows {', '.join(zoo)}")
    return zoo[name]


def default_path(e: ZooEntry, folder: str | Path) -> Path:
    return Path(folder) / (e.file or f"{e.name}.pth")


def fetch(name: str, folder: str | Path, url: str | None = None) -> Path:
    """Download the weights of `name` into `folder` (kept if already there with the right sha256); returns the path.
    `url` overrides the row's (e.g. a mirror or a file:// copy)."""
    e = entry(name)
    dest = default_path(e, folder)
    src = url or e.url
    if dest.is_file() and (not e.sha256 or fileio.sha256_file(dest) == e.sha256):
        return dest
    if src.startswith("repo:"):
        raise PinppError(f"{name}: its weights are published at {src[5:]} (no direct link); download them from there "
                         f"and run `pinpp zoo import {name} --weights FILE --out RUN_DIR`")
    if src.startswith("gdrive:"):
        return _fetch_gdrive(name, src[7:], dest, e.sha256)
    tmp = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        _download(src, tmp, dest.name)
    except OSError as err:  # offline, 404, refused: one line with where to get it
        tmp.unlink(missing_ok=True)
        raise PinppError(f"{name}: could not download {src} ({type(err).__name__}); download it by hand and put it at "
                         f"{dest}") from None
    got = fileio.sha256_file(tmp)
    if e.sha256 and got != e.sha256:
        tmp.unlink()
        raise PinppError(f"{name}: {src} has sha256 {got[:12]}, the zoo expects {e.sha256[:12]}; the file changed "
                         "upstream or the download is corrupt — nothing was kept")
    tmp.replace(dest)
    return dest


def _download(url: str, to: Path, label: str) -> None:
    from tqdm.auto import tqdm
    with urllib.request.urlopen(url, timeout=60) as r, open(to, "wb") as f:
        total = int(r.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=label) as bar:
            while chunk := r.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))


def _fetch_gdrive(name: str, gid: str, dest: Path, sha256: str) -> Path:
    try:
        from robustbench.utils import download_gdrive_new  # RobustBench's own downloader (gdown)
    except ImportError:
        raise PinppError(f"{name}: a Google Drive file (RobustBench's copy): download https://drive.google.com/uc?id={gid} "
                         f"and put it at {dest} (or pip install robustbench and re-run)") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    download_gdrive_new(gid, str(dest))
    if sha256 and fileio.sha256_file(dest) != sha256:
        raise PinppError(f"{name}: {dest} does not have the zoo's sha256 {sha256[:12]}; delete it and download again")
    return dest


def eight_ghost_bn(sd: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """Bai et al.'s ResNet-50 (ViTs-vs-CNNs `test_autoattack.py`: `EightBN` of `GhostBN2D_Old` + `Affine`) as plain
    BatchNorm2d layers, exact at evaluation. Each of their norm layers `P` holds eight ghost BNs `P.bn0..bn7` (no
    affine; running stats of a 2C-channel proxy BN) and `P.aff.bnconv` (a per-channel 1×1 conv with bias). In eval
    mode the forward uses `bn0` (their default `bn_type`) with the stats of the first virtual batch (`x[0]` of the
    stats reshaped to (2, C), `sync_stats` False), then the affine conv; so P = BN(mean = rm[:C], var = rv[:C],
    weight = bnconv.weight, bias = bnconv.bias), eps 1e-5 as theirs."""
    prefixes = sorted({k[: -len(".bn0.proxy_bn.running_mean")] for k in sd if k.endswith(".bn0.proxy_bn.running_mean")})
    if not prefixes:
        raise PinppError(f"{where}: no ghost batch norm (`*.bn0.proxy_bn.running_mean`) found; is it Bai et al.'s file?")
    out = {k: v for k, v in sd.items() if not any(k.startswith(p + ".") for p in prefixes)}
    for p in prefixes:
        w = sd.get(f"{p}.aff.bnconv.weight")
        if w is None:
            raise PinppError(f"{where}: {p}.aff.bnconv.weight missing beside its ghost batch norm")
        c = w.shape[0]
        rm, rv = sd[f"{p}.bn0.proxy_bn.running_mean"], sd[f"{p}.bn0.proxy_bn.running_var"]
        if rm.numel() % c:
            raise PinppError(f"{where}: {p}: ghost stats of {rm.numel()} values for {c} channels")
        out.update({f"{p}.running_mean": rm.reshape(-1, c)[0].clone(), f"{p}.running_var": rv.reshape(-1, c)[0].clone(),
                    f"{p}.weight": w.reshape(c).clone(), f"{p}.bias": sd[f"{p}.aff.bnconv.bias"].reshape(c).clone(),
                    f"{p}.num_batches_tracked": sd.get(f"{p}.bn0.proxy_bn.num_batches_tracked", torch.tensor(0))})
    return out


def to_eight_ghost_bn(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `eight_ghost_bn` (a stand-in in Bai et al.'s layout): each BatchNorm2d `P` as eight ghost BNs
    over a 2C-channel proxy (the same stats in both virtual batches) and the affine conv."""
    prefixes = [k[: -len(".running_mean")] for k in sd if k.endswith(".running_mean")]
    out = {k: v for k, v in sd.items() if not any(k.startswith(p + ".") for p in prefixes)}
    for p in prefixes:
        c = sd[f"{p}.running_mean"].numel()
        for i in range(8):
            out[f"{p}.bn{i}.proxy_bn.running_mean"] = sd[f"{p}.running_mean"].repeat(2)
            out[f"{p}.bn{i}.proxy_bn.running_var"] = sd[f"{p}.running_var"].repeat(2)
            out[f"{p}.bn{i}.proxy_bn.num_batches_tracked"] = sd[f"{p}.num_batches_tracked"]
        out[f"{p}.aff.bnconv.weight"] = sd[f"{p}.weight"].reshape(c, 1, 1, 1)
        out[f"{p}.aff.bnconv.bias"] = sd[f"{p}.bias"]
    return out


CONVERSIONS = {"eight_ghost_bn": eight_ghost_bn}
PUBLISHED_LAYOUT = {"eight_ghost_bn": to_eight_ghost_bn}  # the inverse of each conversion, for stand-ins


def state_dict_from(obj: dict[str, Any], e: ZooEntry, where: str) -> dict[str, torch.Tensor]:
    """The row's state_dict inside a loaded file: the first `container` key present ("" = the file itself),
    its `strip` prefixes removed, a stored normalisation layer checked against ImageNet's and dropped."""
    sd = None
    for key in e.container:
        if key == "" and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            sd = obj
        elif key and isinstance(obj.get(key), dict):
            sd = obj[key]
        if sd is not None:
            break
    if sd is None:
        raise PinppError(f"{where}: none of {[k or '(the file itself)' for k in e.container]} holds a state_dict "
                         f"(the file has {sorted(obj)[:8]}); is it the {e.model} file?")
    out = {}
    for k, v in sd.items():
        for p in e.strip:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    if e.convert:
        out = CONVERSIONS[e.convert](out, where)
    for suffix, ours in (("mean", imagenet.IMAGENET_MEAN), ("std", imagenet.IMAGENET_STD)):
        for k in [k for k in out if k.split(".")[-1] == suffix and "." in k and out[k].numel() == 3]:
            if not torch.allclose(out[k].flatten().float(), torch.tensor(ours), atol=1e-4):
                raise PinppError(f"{where}: its normalisation {k} = {out[k].flatten().tolist()} is not ImageNet's; "
                                 "the kit's models normalise with ImageNet's mean/std")
            del out[k]  # the kit's model normalises inside
    return out


def import_zoo(name: str, weights: str | Path, out: str | Path) -> dict[str, Any]:
    """The zoo model `name` from its weights file as a kit run folder; returns the done record."""
    e, src, out = entry(name), Path(weights), Path(out)
    if e.why_not:
        raise PinppError(f"{name}: the kit cannot import its weights ({e.why_not}); Table 3 keeps its published row")
    sha = fileio.sha256_file(src) if src.is_file() else ""
    ident = store.Identity("zoo-import", {"name": name, "arch": e.arch}, {"weights": sha})
    done = store.finished(out, ident)
    if done is not None:
        return done
    if e.sha256 and sha and sha != e.sha256:
        raise PinppError(f"{src}: sha256 {sha[:12]} is not the published file's {e.sha256[:12]}; download it again")
    sd = state_dict_from(read_checkpoint(src), e, str(src))
    model = models.build(e.arch, "r50", 1000)
    want = model.state_dict()
    unknown, missing = [k for k in sd if k not in want], [k for k in want if k not in sd]
    if unknown or missing:
        raise PinppError(f"{src}: not a {e.arch} state_dict ({len(unknown)} unknown, e.g. {unknown[:2]}; "
                         f"{len(missing)} missing, e.g. {missing[:2]}); is it the {e.model} file?")
    bad = [k for k in want if sd[k].shape != want[k].shape]
    if bad:
        raise PinppError(f"{src}: {bad[0]} has shape {tuple(sd[bad[0]].shape)}, {e.arch} needs {tuple(want[bad[0]].shape)}")
    model.load_state_dict(sd, strict=True)
    return write_run(out, ident, model, e.arch, [c["wnid"] for c in imagenet.classes()], 3311,
                     {"zoo": name, "model": e.model, "file": src.name, "sha256": sha, "url": e.url,
                      "published_preprocessing": e.preprocessing})



def write_standin(name: str, path: str | Path, seed: int = 0) -> Path:
    """A file in the row's published layout holding seeded random weights (what the rehearsal profile imports where
    the real file would be): the row's key prefixes put back in order, EasyRobust's stored normalisation (index 0 of
    its `Sequential(normalise, model)`, hence the `1.` prefix) beside the model, the row's first container. Kept if
    the file exists (a real download is never overwritten)."""
    e, path = entry(name), Path(path)
    if e.why_not:
        raise PinppError(f"{name}: no stand-in for a row the kit cannot import ({e.why_not})")
    if path.exists():
        return path
    torch.manual_seed(seed)
    prefix = "".join(e.strip)
    sd = models.build(e.arch, "r50", 1000).state_dict()
    if e.convert:
        sd = PUBLISHED_LAYOUT[e.convert](sd)
    sd = {prefix + k: v for k, v in sd.items()}
    if "1." in e.strip:
        norm = prefix[: -len("1.")] + "0."
        sd.update({norm + "mean": torch.tensor(imagenet.IMAGENET_MEAN), norm + "std": torch.tensor(imagenet.IMAGENET_STD)})
    obj = {e.container[0]: sd} if e.container[0] else sd
    path.parent.mkdir(parents=True, exist_ok=True)
    with fileio.atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
    return path
