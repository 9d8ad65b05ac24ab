"""Atomic file writes and the kit's user-facing error type.

Every artefact the kit writes (converted masks, COCO JSONs, tables, run records) goes through
these helpers so that a crash or kill never leaves a half-written file behind: data is written to
a temporary file in the destination folder and then renamed over the target (rename is atomic on
POSIX within one filesystem).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


class PinppError(Exception):
    """An error the user can fix. Its message is one line: the file, the record and the fix.

    The CLI prints it without a traceback; notebooks show it as the cell's error.
    """


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by their owner only (0600); a result file gets the mode a plain `open` would give
# it (0644 under the usual umask 022), so that other users of a shared results folder can read it.
FILE_MODE = 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` if the block succeeds.

    The temporary name keeps the target's extension (libraries such as PIL and cv2 pick the
    format from it) and starts with `._tmp` so that readers globbing for outputs ignore it.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="._tmp", suffix=suffix if suffix is not None else target.suffix,
                               dir=target.parent)
    os.close(fd)
    os.chmod(tmp, FILE_MODE)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(target: str | os.PathLike, text: str) -> None:
    """Write `text` to `target` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def write_bytes(target: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `target` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_json(target: str | os.PathLike, obj: Any, indent: int | None = None) -> None:
    """Serialise `obj` as JSON to `target` atomically."""
    write_text(target, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, what: str = "file", fix: str = "re-create or re-download it") -> Any:
    """Load JSON, turning a parse error into a one-line PinppError that names the file and the fix."""
    path = Path(path)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise PinppError(f"{path}: {what} not found; {fix}") from None
    except json.JSONDecodeError as e:
        raise PinppError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); {fix}") from None
    except UnicodeDecodeError:
        raise PinppError(f"{path}: not a UTF-8 text file; {fix}") from None


def read_text(path: str | os.PathLike, what: str = "file", fix: str = "re-create it") -> str:
    """A user-supplied text file, or one line that says why it cannot be read (missing, a folder, unreadable,
    not UTF-8, empty)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PinppError(f"{path}: {what} not found; {fix}") from None
    except IsADirectoryError:
        raise PinppError(f"{path}: is a folder, but {what} is a file; {fix}") from None
    except OSError as e:
        raise PinppError(f"{path}: {what} cannot be read ({e.strerror}); {fix}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PinppError(f"{path}: {what} is not UTF-8 text (byte {e.start}); {fix}") from None
    if not text.strip():
        raise PinppError(f"{path}: {what} is empty; {fix}")
    return text


def read_csv(path: str | os.PathLike, what: str, fix: str, columns: tuple[str, ...] = (), **kwargs: Any):
    """A user-supplied CSV as a DataFrame (pandas' own errors restated in one line), with `columns` required."""
    import io

    import pandas as pd
    text = read_text(path, what, fix)
    try:
        df = pd.read_csv(io.StringIO(text), **kwargs)
    except (pd.errors.ParserError, ValueError) as e:
        raise PinppError(f"{path}: {what} is not valid CSV ({str(e).splitlines()[0]}); {fix}") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise PinppError(f"{path}: {what} lacks column(s) {missing} (has {list(df.columns)}); {fix}")
    return df


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def atomic_save_image(img, target: str | os.PathLike, **save_kwargs: Any) -> None:
    """Save a PIL image atomically; the format comes from the target's extension (.JPEG → JPEG)."""
    target = Path(target)
    fmt = {".jpeg": "JPEG", ".jpg": "JPEG", ".png": "PNG"}.get(target.suffix.lower())
    with atomic_path(target) as tmp:
        img.save(tmp, format=fmt, **save_kwargs)


def write_hashed(out_dir: str | os.PathLike, name_for: Callable[[str], str], write: Callable[[Path], None]) -> tuple[Path, str]:
    """Write via `write(tmp_path)`, then rename to `out_dir / name_for(sha256)`; return (path, sha256).

    The content hash names the file (checkpoints carry their sha256), and the rename is atomic.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="._tmp", suffix=".part", dir=out_dir)
    os.close(fd)
    os.chmod(tmp, FILE_MODE)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        sha = sha256_file(tmp_path)
        final = out_dir / name_for(sha)
        os.replace(tmp_path, final)
        return final, sha
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
