"""Stand-ins for the OOD sets, written from the synthetic data in the real sets' folder layouts.

No OOD set can be downloaded here, so the smoke profile writes look-alikes of each one from the
evaluation list, in exactly the layout the real loaders (`ood_sets`) read: sketch-like line
drawings (ImageNet-Sketch), stylised recolourings (Stylized-ImageNet), hard crops of a class subset
(ImageNet-A-Plus), the model-vs-human sets — one image per image key of the real human trials,
distorted as the set's condition says (grey, contrast, noise, low/high-pass, rotation, phase noise,
eidolon-like warps, edges, silhouettes, ...) — and the Table 4/5 class lists from the synthetic
classes' super-categories. The numbers they give test the pipeline, not the paper's claims.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from . import fileio, store
from .ood_sets import spread
from .datasets import _load_rgb
from .human_consistency import load_trials
from .imagenet import human16_map, in1k_index

RECORD = ".standins_done.json"  # the store's record of a finished set of stand-ins

# The synthetic classes' super-categories that are PartImageNet super-categories (Table 5 uses PIN's 11).
PIN_SUPERCATEGORIES = {"quadruped": "Quadruped", "biped": "Biped", "fish": "Fish", "bird": "Bird", "snake": "Snake",
                       "reptile": "Reptile", "car": "Car", "bicycle": "Bicycle", "boat": "Boat",
                       "aeroplane": "Aeroplane", "bottle": "Bottle"}


def _rng(*key: object) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little"))


def _grey(img: np.ndarray) -> np.ndarray:
    return np.repeat(img.mean(2, keepdims=True), 3, 2)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(img, (0, 0), max(sigma, 1e-3)) if sigma > 0 else img


def sketch_like(img: np.ndarray) -> np.ndarray:
    """Dark strokes on white: inverted gradient magnitude of the grey image."""
    g = cv2.GaussianBlur(img.mean(2), (0, 0), 0.8)
    mag = np.hypot(cv2.Sobel(g, cv2.CV_64F, 1, 0), cv2.Sobel(g, cv2.CV_64F, 0, 1))
    return np.repeat(1 - np.clip(mag / (mag.max() + 1e-8) * 1.5, 0, 1)[..., None], 3, 2)


def stylise(img: np.ndarray, rng: np.random.Generator, texture: np.ndarray | None = None) -> np.ndarray:
    """Edge-preserving painterly filter, a random colour mixing, and a blended stroke texture."""
    out = cv2.stylization((img * 255).astype(np.uint8), sigma_s=20, sigma_r=0.45).astype(np.float64) / 255
    out = np.clip(out @ (np.eye(3) * 0.4 + rng.random((3, 3)) * 0.4), 0, 1)
    tex = texture if texture is not None else _blur(rng.random(img.shape[:2] + (3,)), 1.5)
    return np.clip(0.7 * out + 0.3 * tex, 0, 1)


def _scramble(img: np.ndarray, width_deg: float, rng: np.random.Generator) -> np.ndarray:
    f = np.fft.fft2(img, axes=(0, 1))
    noise = rng.uniform(-1, 1, img.shape[:2])[..., None] * np.deg2rad(width_deg)
    return np.clip(np.real(np.fft.ifft2(np.abs(f) * np.exp(1j * (np.angle(f) + noise)), axes=(0, 1))), 0, 1)


def _warp(img: np.ndarray, reach: float, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    dx, dy = (_blur(rng.standard_normal((h, w)), 2) * reach * 0.5 for _ in range(2))
    xs, ys = np.meshgrid(np.arange(w), np.arange(h))
    return cv2.remap(img.astype(np.float32), (xs + dx).astype(np.float32), (ys + dy).astype(np.float32),
                     cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT).astype(np.float64)


def _num(cond: str, default: float = 0.0) -> float:
    try:
        return float(cond.lstrip("c").split("-")[0])
    except ValueError:
        return default


def distort(dataset: str, condition: str, img: np.ndarray, rng: np.random.Generator, other: np.ndarray) -> np.ndarray:
    """A look-alike of a model-vs-human image: `img` ([0, 1], H×W×3) distorted per dataset and condition."""
    g = _grey(img)
    if dataset == "colour":
        return img if condition == "cr" else g
    if dataset == "contrast":
        return 0.5 + (g - 0.5) * _num(condition, 100) / 100
    if dataset == "uniform-noise":
        return np.clip(g + rng.uniform(-1, 1, g.shape[:2])[..., None] * _num(condition), 0, 1)
    if dataset == "low-pass":
        return _blur(g, _num(condition) * img.shape[0] / 224)
    if dataset == "high-pass":
        return g if condition == "inf" else np.clip(g - _blur(g, _num(condition) * img.shape[0] / 224) + 0.5, 0, 1)
    if dataset == "rotation":
        return np.rot90(g, int(_num(condition) // 90)).copy()
    if dataset == "false-colour":
        return img if condition == "true" else np.clip(2 * g - img, 0, 1)
    if dataset == "phase-scrambling":
        return _scramble(g, _num(condition), rng)
    if dataset == "power-equalisation":
        return g if condition == "0" else _scramble(g, 30, rng)
    if dataset.startswith("eidolon"):
        return _warp(g, np.log2(max(_num(condition, 1), 1)), rng)
    if dataset == "sketch":
        return sketch_like(img)
    if dataset in ("stylized", "cue-conflict"):
        return stylise(img, rng, texture=other if dataset == "cue-conflict" else None)
    if dataset == "edge":
        e = cv2.Canny((g[..., 0] * 255).astype(np.uint8), 50, 150) > 0
        return np.repeat(np.where(e, 0.0, 1.0)[..., None], 3, 2)
    if dataset == "silhouette":
        border = np.concatenate([g[0, :, 0], g[-1, :, 0], g[:, 0, 0], g[:, -1, 0]])
        fg = np.abs(g[..., 0] - np.median(border)) > 0.15
        return np.repeat(np.where(fg, 0.0, 1.0)[..., None], 3, 2)
    raise fileio.PinppError(f"no stand-in distortion for model-vs-human set {dataset!r}")


def _save(arr: np.ndarray, path: Path) -> None:
    fileio.atomic_save_image(Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8)), path,
                             **({"quality": 90} if path.suffix.lower() == ".jpeg" else {}))


def write_standins(img_root: str | Path, val_list: str | Path, class_supercategories: str | Path, out: str | Path,
                   mvh_datasets: tuple[str, ...], seed: int = 0, images: int = 0) -> Path:
    """Write every stand-in under `out` (ood/<set>/..., pin_subsets/...); reused while its sources (the val list,
    its images, the super-categories) and settings are unchanged. `images` (rehearsal): the OOD sets are made
    from at most that many val images and each model-vs-human set holds at most that many, spread over the
    list (`ood_sets.spread`); 0: all."""
    out = Path(out)
    listed = [line.split()[0] for line in Path(val_list).read_text().splitlines() if line.strip()]
    samples = spread(listed, images)
    settings = {"seed": seed, "mvh_datasets": list(mvh_datasets), **({"images": images} if images else {}),
                "pin_lists": "generic classes take PIN's super-categories in turn"}
    ident = store.Identity("ood-standins", settings,
                           {"val_list": fileio.sha256_file(val_list), "supercategories": fileio.sha256_file(class_supercategories),
                            "images": store.tree_digest([Path(img_root) / rel for rel in samples], img_root)})
    if store.finished(out, ident, RECORD) is not None:
        return out
    imgs = {rel: np.asarray(_load_rgb(Path(img_root) / rel), dtype=np.float64) / 255 for rel in samples}
    wnids = sorted({rel.split("/")[0] for rel in samples})
    a_plus = set(wnids[::2])  # a class subset, as the real ImageNet-A-Plus covers part of IN-1K
    for rel, img in tqdm(imgs.items(), desc="OOD stand-ins", leave=False):
        wnid, stem = rel.split("/")[0], Path(rel).stem
        rng = _rng(seed, rel)
        _save(sketch_like(img), out / "imagenet_sketch" / "sketch" / wnid / f"{stem}.JPEG")
        _save(stylise(img, rng), out / "stylized_imagenet" / "val" / wnid / f"{stem}.png")
        if wnid in a_plus:
            h, w = img.shape[:2]
            s = int(min(h, w) * rng.uniform(0.5, 0.8))
            y0, x0 = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
            crop = img[y0:y0 + s, x0:x0 + s] * rng.uniform(0.6, 1.2, 3)
            _save(crop, out / "imagenet_a_plus" / wnid / f"{stem}.JPEG")
    _write_mvh(imgs, out / "model_vs_human", mvh_datasets, seed, images)
    # every class of the val list, not only those of the sampled images (rehearsal: 16 images of 1000 classes)
    _write_class_lists(class_supercategories, sorted({rel.split("/")[0] for rel in listed}), out / "pin_subsets")
    store.finish(out, ident, [], {"images": len(samples)}, RECORD)
    return out


def _write_mvh(imgs: dict[str, np.ndarray], root: Path, datasets: tuple[str, ...], seed: int, images: int = 0) -> None:
    """One image per image key of the human trials; the source image is of the key's category where the
    synthetic classes have one (else any image: the model cannot be right, as for a class it does not know)."""
    idx = in1k_index()
    rels = sorted(imgs)
    by_cat = {cat: [r for r in rels if idx[r.split("/")[0]] in set(ins)] for cat, ins in human16_map().items()}
    trials = load_trials(datasets=list(datasets))
    for ds, g in trials.groupby("dataset"):
        numbered = list(enumerate(sorted(set(zip(g["key"], g["category"]))), 1))  # n: the position among all keys
        for n, (key, cat) in tqdm(spread(numbered, images), desc=ds, leave=False):
            rng = _rng(seed, ds, key)
            pool = by_cat.get(cat) or rels
            src, other = imgs[pool[rng.integers(len(pool))]], imgs[rels[rng.integers(len(rels))]]
            if other.shape != src.shape:
                other = cv2.resize(other, src.shape[1::-1])
            _save(distort(ds, key.split("_")[0], src, rng, other), root / ds / "dnn" / "session-1" / f"{n:04d}_sd_dnn_{key}")


def pin_stand_in_supercategories(class_supercategories: dict[str, str], wnids: list[str]) -> dict[str, str]:
    """PIN super-category (PIN's spelling) of each listed class that has one: a curated synthetic class keeps its own
    where it is one of PIN's 11; the generated "generic" classes (the rehearsal's 990 of 1000) take PIN's 11 in turn
    (sorted wnids), so that a 16-image spread of the val list meets Tables 4/5's classes (it met none before)."""
    names = list(PIN_SUPERCATEGORIES.values())
    out, k = {}, 0
    for w in sorted(wnids):
        sc = class_supercategories.get(w)
        if sc in PIN_SUPERCATEGORIES:
            out[w] = PIN_SUPERCATEGORIES[sc]
        elif sc == "generic":
            out[w], k = names[k % len(names)], k + 1
    return out


def _write_class_lists(class_supercategories: str | Path, wnids: list[str], out: Path) -> None:
    """Table 4/5 inputs: the classes with a (stand-in) PIN super-category, and that super-category."""
    pin = pin_stand_in_supercategories(json.loads(Path(class_supercategories).read_text()), wnids)
    fileio.write_text(out / "pin125.txt", "# stand-in for PIN's 125 classes: synthetic classes with a PIN super-category\n"
                      + "".join(f"{w}\n" for w in pin))
    fileio.write_text(out / "pin_supercategories.csv",
                      "wnid,supercategory\n" + "".join(f"{w},{s}\n" for w, s in pin.items()))
