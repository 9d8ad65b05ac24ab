"""Part vocabularies and geometry of the synthetic PIN++ stand-in.

Each super-category has a prototype: a list of parts, each with one or more placements of a simple
shape in an object frame ([-1, 1]², y down). A class derives its own template from its
super-category's prototype by a deterministic, wnid-seeded deformation (part positions, sizes and
shapes change), so two classes of one super-category share their part *names* but differ in part
*shape and arrangement* — the signal part supervision can exploit. Colours, textures and
background clutter are drawn per image and carry no class information.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

SHAPES = ("ellipse", "rect", "triangle", "diamond")


@dataclass(frozen=True)
class Placement:
    """One instance of a part in the object frame: centre, size, rotation (degrees)."""
    cx: float
    cy: float
    w: float
    h: float
    angle: float = 0.0


@dataclass
class PartTemplate:
    """A part category of a class: its shape, its placements and (optionally) its parent part."""
    name: str
    shape: str
    placements: list[Placement]
    parent: str | None = None


@dataclass
class ClassTemplate:
    """A synthetic class: wnid, super-category and its parts (in category order)."""
    wnid: str
    supercategory: str
    name: str
    parts: list[PartTemplate] = field(default_factory=list)


P = Placement
# name, shape, placements, parent.  Parents always precede their children.
PROTOTYPES: dict[str, list[tuple[str, str, list[Placement], str | None]]] = {
    "quadruped": [
        ("head", "ellipse", [P(0.72, -0.38, 0.45, 0.40)], None),
        ("body", "ellipse", [P(0.0, 0.0, 1.25, 0.55)], None),
        ("foot", "rect", [P(x, 0.48, 0.14, 0.45) for x in (-0.45, -0.22, 0.22, 0.45)], None),
        ("tail", "triangle", [P(-0.82, -0.12, 0.38, 0.14, 25)], None),
        ("nose", "ellipse", [P(0.92, -0.33, 0.13, 0.11)], "head"),
    ],
    "bird": [
        ("head", "ellipse", [P(0.52, -0.42, 0.36, 0.36)], None),
        ("body", "ellipse", [P(0.0, 0.05, 0.95, 0.55)], None),
        ("wing", "triangle", [P(-0.05, -0.12, 0.7, 0.35, -10)], None),
        ("foot", "rect", [P(-0.1, 0.55, 0.06, 0.35), P(0.15, 0.55, 0.06, 0.35)], None),
        ("tail", "triangle", [P(-0.62, 0.08, 0.42, 0.22, 180)], None),
        ("beak", "triangle", [P(0.68, -0.42, 0.14, 0.1)], "head"),
    ],
    "fish": [
        ("head", "ellipse", [P(0.55, 0.0, 0.45, 0.52)], None),
        ("body", "ellipse", [P(-0.05, 0.0, 1.2, 0.6)], None),
        ("fin", "triangle", [P(0.0, -0.38, 0.35, 0.25), P(0.0, 0.38, 0.35, 0.25, 180)], None),
        ("tail", "triangle", [P(-0.8, 0.0, 0.35, 0.55, 90)], None),
        ("eye", "ellipse", [P(0.62, -0.08, 0.09, 0.09)], "head"),
    ],
    "snake": [
        ("head", "ellipse", [P(0.75, -0.25, 0.3, 0.22)], None),
        ("body", "band", [P(-0.05, 0.0, 1.5, 0.5)], None),
    ],
    "reptile": [
        ("head", "ellipse", [P(0.75, 0.0, 0.3, 0.25)], None),
        ("body", "ellipse", [P(0.0, 0.0, 1.1, 0.8)], None),
        ("foot", "ellipse", [P(x, y, 0.2, 0.14) for x in (-0.35, 0.35) for y in (-0.45, 0.45)], None),
        ("tail", "triangle", [P(-0.68, 0.0, 0.22, 0.14, 90)], None),
        ("shell", "diamond", [P(0.0, 0.0, 0.8, 0.6)], "body"),
    ],
    "car": [
        ("body", "rect", [P(0.0, 0.05, 1.6, 0.55)], None),
        ("wheel", "ellipse", [P(-0.5, 0.38, 0.36, 0.36), P(0.5, 0.38, 0.36, 0.36)], None),
        ("mirror", "triangle", [P(0.48, -0.32, 0.12, 0.12)], None),
        ("window", "rect", [P(-0.25, -0.12, 0.4, 0.2), P(0.22, -0.12, 0.35, 0.2)], "body"),
    ],
    "bicycle": [
        ("body", "diamond", [P(0.0, 0.0, 0.9, 0.5)], None),
        ("wheel", "ellipse", [P(-0.58, 0.25, 0.62, 0.62), P(0.58, 0.25, 0.62, 0.62)], None),
        ("seat", "rect", [P(-0.2, -0.38, 0.3, 0.08)], None),
        ("handle", "rect", [P(0.35, -0.42, 0.28, 0.08, 15)], None),
    ],
    "boat": [
        ("body", "diamond", [P(0.0, 0.3, 1.6, 0.35)], None),
        ("sail", "triangle", [P(0.0, -0.3, 0.7, 0.8)], None),
    ],
    "aeroplane": [
        ("head", "ellipse", [P(0.8, 0.0, 0.32, 0.26)], None),
        ("body", "ellipse", [P(0.0, 0.0, 1.6, 0.3)], None),
        ("wing", "triangle", [P(0.05, -0.35, 0.5, 0.5), P(0.05, 0.35, 0.5, 0.5, 180)], None),
        ("engine", "ellipse", [P(0.15, 0.42, 0.25, 0.12)], None),
        ("tail", "triangle", [P(-0.75, -0.25, 0.3, 0.35)], None),
    ],
    "bottle": [
        ("body", "rect", [P(0.0, 0.15, 0.6, 1.2)], None),
        ("mouth", "rect", [P(0.0, -0.62, 0.22, 0.35)], None),
        ("label", "rect", [P(0.0, 0.2, 0.5, 0.4)], "body"),
    ],
    "tool": [
        ("handle", "rect", [P(0.0, 0.2, 0.15, 1.3)], None),
        ("head", "rect", [P(0.0, -0.52, 0.8, 0.25)], None),
        ("striker", "rect", [P(0.45, -0.52, 0.15, 0.32)], None),
    ],
}
GENERIC_PARTS = ("head", "body", "handle", "base", "top", "leg", "wheel", "frame")


def _stable_seed(*items: object) -> int:
    """A seed from strings/ints that does not depend on Python's hash randomisation."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, items)).encode()).digest()[:8], "little")


def class_template(wnid: str, supercategory: str, name: str, seed: int = 0) -> ClassTemplate:
    """The deterministic part template of one class (same wnid + seed → same template)."""
    rng = np.random.default_rng(_stable_seed("class", wnid, seed))
    tpl = ClassTemplate(wnid, supercategory, name)
    if supercategory == "single":
        # Single-part classes: the one part is the whole object (PIN++ convention).
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        tpl.parts.append(PartTemplate(name.split()[-1].lower(), shape,
                                      [P(0.0, 0.0, float(rng.uniform(0.9, 1.6)), float(rng.uniform(0.9, 1.6)))]))
        return tpl
    if supercategory in PROTOTYPES:
        proto = PROTOTYPES[supercategory]
    else:  # generic: 2–6 parts from a generic vocabulary, random layout
        k = int(rng.integers(2, 7))
        names = rng.choice(GENERIC_PARTS, size=k, replace=False)
        proto = [(str(n), SHAPES[int(rng.integers(4))],
                  [P(float(rng.uniform(-0.6, 0.6)), float(rng.uniform(-0.6, 0.6)),
                     float(rng.uniform(0.3, 0.9)), float(rng.uniform(0.3, 0.9)))], None) for n in names]
    shift: dict[str, np.ndarray] = {}
    for pname, shape, placements, parent in proto:
        # Class identity = deformation of the prototype: move, resize and sometimes reshape parts.
        # Included children move with their parent so that they stay inside it.
        if parent is None and shape != "band" and rng.random() < 0.35:
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
        shift[pname] = shift[parent] if parent else rng.uniform(-0.15, 0.15, size=2)
        sw, sh = rng.uniform(0.7, 1.4, size=2)
        new = [P(pl.cx, pl.cy, pl.w * sw, pl.h * sh, pl.angle + float(rng.uniform(-20, 20))) for pl in placements]
        tpl.parts.append(PartTemplate(pname, shape, new, parent))
    _connect(tpl, shift)
    for part in tpl.parts:
        d = shift[part.name]
        part.placements = [P(pl.cx + float(d[0]), pl.cy + float(d[1]), pl.w, pl.h, pl.angle) for pl in part.placements]
    return tpl


def _part_masks(tpl: ClassTemplate, shift: dict[str, np.ndarray], res: int = 64) -> list[np.ndarray]:
    """Each part rasterised on a res² grid over [-1.5, 1.5]² (for the connectivity check)."""
    from PIL import Image, ImageDraw
    out = []
    for part in tpl.parts:
        im = Image.new("L", (res, res), 0)
        for pl in part.placements:
            pts = (shape_polygon(part.shape, pl) + shift[part.name] + 1.5) / 3.0 * res
            ImageDraw.Draw(im).polygon([tuple(p) for p in pts], fill=1)
        out.append(np.asarray(im, dtype=bool))
    return out


def _connect(tpl: ClassTemplate, shift: dict[str, np.ndarray], steps: int = 30) -> None:
    """Pull top-level parts toward the object centre until all parts form one blob.

    A real object's part masks touch; a deformed template could leave, say, a foot floating, which
    would make it a separate object when object masks are built from parts.
    """
    import cv2
    for _ in range(steps):
        ms = _part_masks(tpl, shift)
        union = np.any(ms, axis=0).astype(np.uint8)
        n, labels = cv2.connectedComponents(union, connectivity=4)  # parts must overlap, not just touch
        if n <= 2:
            return
        main = np.argmax(np.bincount(labels[union.astype(bool)]))
        for part, m in zip(tpl.parts, ms):
            if part.parent is None and m.any() and not (labels[m] == main).any():
                centre = np.mean([[pl.cx, pl.cy] for pl in part.placements], axis=0) + shift[part.name]
                shift[part.name] = shift[part.name] - 0.15 * centre
        for part in tpl.parts:  # children follow their (possibly moved) parents
            if part.parent is not None:
                shift[part.name] = shift[part.parent]


def shape_polygon(shape: str, pl: Placement, n_ellipse: int = 20) -> np.ndarray:
    """Vertices (N, 2) of a shape in the object frame, rotated by the placement's angle."""
    if shape == "ellipse":
        t = np.linspace(0, 2 * np.pi, n_ellipse, endpoint=False)
        pts = np.stack([np.cos(t) * 0.5, np.sin(t) * 0.5], 1)
    elif shape == "rect":
        pts = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    elif shape == "triangle":
        pts = np.array([[0.0, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    elif shape == "diamond":
        pts = np.array([[0.0, -0.5], [0.5, 0.0], [0.0, 0.5], [-0.5, 0.0]])
    elif shape == "band":  # a sinuous thick band (snake body): centre line offset on both sides
        x = np.linspace(-0.5, 0.5, 16)
        y = 0.3 * np.sin(x * 2 * np.pi * 1.5)
        half = 0.12
        pts = np.concatenate([np.stack([x, y - half], 1), np.stack([x[::-1], y[::-1] + half], 1)])
    else:
        raise ValueError(f"unknown shape {shape!r}")
    pts = pts * np.array([pl.w, pl.h])
    a = np.deg2rad(pl.angle)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return pts @ rot.T + np.array([pl.cx, pl.cy])


def clip_polygon(poly: np.ndarray, width: float, height: float) -> np.ndarray:
    """Clip a polygon to the image rectangle [0, width] × [0, height] (Sutherland–Hodgman).

    Annotations must lie inside the image (the release validator rejects ones that don't), and
    objects near the border are cut by the frame just as in real photos.
    """
    def clip(points: list[np.ndarray], inside, intersect) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for i, cur in enumerate(points):
            prev = points[i - 1]
            if inside(cur):
                if not inside(prev):
                    out.append(intersect(prev, cur))
                out.append(cur)
            elif inside(prev):
                out.append(intersect(prev, cur))
        return out

    def at_x(x0: float):
        return lambda p, q: np.array([x0, p[1] + (q[1] - p[1]) * (x0 - p[0]) / (q[0] - p[0])])

    def at_y(y0: float):
        return lambda p, q: np.array([p[0] + (q[0] - p[0]) * (y0 - p[1]) / (q[1] - p[1]), y0])

    pts = list(poly)
    for inside, inter in ((lambda p: p[0] >= 0, at_x(0.0)), (lambda p: p[0] <= width, at_x(width)),
                          (lambda p: p[1] >= 0, at_y(0.0)), (lambda p: p[1] <= height, at_y(height))):
        if not pts:
            break
        pts = clip(pts, inside, inter)
    return np.array(pts).reshape(-1, 2)


def polygon_area(poly: np.ndarray) -> float:
    """Shoelace area of a simple polygon (N, 2)."""
    if len(poly) < 3:
        return 0.0
    x, y = poly[:, 0], poly[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)
