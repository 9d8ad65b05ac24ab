"""One store for finished work: a result is reused only when what it was computed from is unchanged.

Every job that skips work it finished before (training, segmentation, few-shot, convert, synth, pseudo
labels, few-shot episodes, detections, AutoAttack records, ImageNet-C) asks this module. A job's
**identity** is the sha256 of a canonical JSON of

    {"job": <kind>, "settings": <its settings>, "inputs": {<name>: <sha256 of what it read>}}

where an input digest covers the bytes of the files the job read (weights, release JSONs, list files) or,
for large image trees, their names, sizes and modification times (`tree_digest`). A finished job leaves a
record (default `done.json`) beside its outputs:

    {"identity": ..., "job": ..., "settings": ..., "inputs": ..., "files": {<relative path>: <sha256>}, <result fields>}

`finished` returns the record only if its identity matches and every listed file exists with its sha256;
anything else is not finished (a stale record is reported by `stale`, so that a caller can refuse in one
line where recomputing would discard a user's work, e.g. a trained model). A leaf module: it imports only
`fileio`.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from . import fileio


def digest(obj: Any) -> str:
    """sha256 of a canonical JSON form of `obj` (sorted keys; tuples as lists; paths as strings)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def files_digest(paths: Iterable[str | os.PathLike], root: str | os.PathLike | None = None) -> str:
    """sha256 over (name, content sha256) of `paths`, in sorted order; names relative to `root` if given.
    For inputs whose bytes matter and whose size is modest (release JSONs, list files, weights)."""
    h = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        name = str(p.relative_to(root)) if root is not None else p.name
        h.update(f"{name}\0{fileio.sha256_file(p)}\n".encode())
    return h.hexdigest()


def tree_digest(paths: Iterable[str | os.PathLike], root: str | os.PathLike) -> str:
    """sha256 over (relative name, size, modification time) of `paths`, sorted: cheap enough for a million
    images, and it changes when a file is added, removed, replaced or rewritten. A missing path counts as
    missing (so restoring it changes the digest)."""
    root = Path(root)
    h = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        try:
            st = p.stat()
            h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except FileNotFoundError:
            h.update(f"{p.relative_to(root)}\0missing\n".encode())
    return h.hexdigest()


def names_digest(names: Iterable[str]) -> str:
    """sha256 of a list of names (an image list, a class list) in the given order."""
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def tensor_digest(*tensors: Any) -> str:
    """sha256 of tensors' dtypes, shapes and bytes (evaluation images, labels)."""
    h = hashlib.sha256()
    for t in tensors:
        a = t.detach().cpu().contiguous().numpy()
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())  # not memoryview(a).cast("B"): it refuses an empty tensor (no image of a class subset)
    return h.hexdigest()


def module_digest(module: Any) -> str:
    """sha256 of a model's state (names, dtypes, shapes, bytes): what it computes, however it was loaded."""
    sd = module.state_dict()
    h = hashlib.sha256()
    for k, v in sd.items():
        h.update(k.encode())
        h.update(tensor_digest(v).encode())
    return h.hexdigest()


@dataclass
class Identity:
    """What a job's result depends on: its kind, its settings and digests of its inputs."""
    job: str
    settings: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return digest({"job": self.job, "settings": self.settings, "inputs": self.inputs})

    def record(self) -> dict[str, Any]:
        return {"identity": self.sha256, "job": self.job, "settings": json.loads(json.dumps(self.settings, default=str)),
                "inputs": dict(self.inputs)}

    def changes(self, old: dict[str, Any]) -> str:
        """What differs from an older record, in words (for one-line messages)."""
        if old.get("job") != self.job or "identity" not in old:
            return "it was written by another job or an older kit"
        new = self.record()
        diffs = [f"input {k!r}" for k in sorted(set(new["inputs"]) | set(old.get("inputs", {})))
                 if new["inputs"].get(k) != old.get("inputs", {}).get(k)]
        diffs += _setting_diffs(new["settings"], old.get("settings", {}))
        return "changed: " + ", ".join(diffs[:4]) + (" …" if len(diffs) > 4 else "") if diffs else "its record differs"


def _setting_diffs(new: Any, old: Any, prefix: str = "") -> list[str]:
    if isinstance(new, dict) and isinstance(old, dict):
        out: list[str] = []
        for k in sorted(set(new) | set(old)):
            out += _setting_diffs(new.get(k), old.get(k), f"{prefix}{k}.")
        return out
    return [] if new == old else [f"{prefix.rstrip('.')} {old!r} → {new!r}"]


def _record_path(folder: str | os.PathLike, name: str) -> Path:
    return Path(folder) / name


def read(folder: str | os.PathLike, name: str = "done.json") -> dict[str, Any] | None:
    """The record in `folder`, or None. An unreadable record counts as none (it is rewritten)."""
    path = _record_path(folder, name)
    if not path.exists():
        return None
    try:
        rec = fileio.read_json(path)
    except fileio.PinppError:
        return None
    return rec if isinstance(rec, dict) else None


def files_ok(folder: str | os.PathLike, rec: dict[str, Any]) -> bool:
    """Every file the record lists exists with its recorded sha256."""
    for rel, sha in rec.get("files", {}).items():
        p = Path(folder) / rel
        if not p.is_file() or fileio.sha256_file(p) != sha:
            return False
    return True


def finished(folder: str | os.PathLike, ident: Identity, name: str = "done.json") -> dict[str, Any] | None:
    """The record of a finished job with this identity whose files are intact, else None."""
    rec = read(folder, name)
    if rec is None or rec.get("identity") != ident.sha256 or not files_ok(folder, rec):
        return None
    return rec


def stale(folder: str | os.PathLike, ident: Identity, name: str = "done.json") -> str | None:
    """Why the record in `folder` does not belong to `ident` (in words), or None if there is none or it does."""
    rec = read(folder, name)
    if rec is None or rec.get("identity") == ident.sha256:
        return None
    return ident.changes(rec)


RESERVED = ("identity", "job", "settings", "inputs", "files")


def finish(folder: str | os.PathLike, ident: Identity, files: Iterable[str | os.PathLike] = (),
           result: dict[str, Any] | None = None, name: str = "done.json") -> dict[str, Any]:
    """Record `folder`'s job as finished: its identity, the sha256 of each output file (paths relative to
    `folder`, or absolute ones inside it) and the job's `result` fields beside them (so the record reads as
    the result). Written atomically, after the outputs; returns the record."""
    folder = Path(folder)
    result = dict(result or {})
    clash = set(result) & set(RESERVED)
    if clash:
        raise ValueError(f"result fields {sorted(clash)} are reserved for the store's record")
    hashed = {}
    base = Path(os.path.abspath(folder))
    for f in map(Path, files):  # a path inside `folder` (as given, or absolute), or a name relative to it
        p = Path(os.path.abspath(f if f.is_absolute() or f.is_relative_to(folder) else folder / f))
        hashed[str(p.relative_to(base))] = fileio.sha256_file(p)
    rec = {**ident.record(), "files": hashed, **result}
    fileio.write_json(_record_path(folder, name), rec, indent=1)
    return rec


def forget(folder: str | os.PathLike, name: str = "done.json") -> None:
    """Remove a record (its outputs stay; the job will recompute and overwrite them)."""
    _record_path(folder, name).unlink(missing_ok=True)
