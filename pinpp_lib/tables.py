"""The one table writer: our numbers beside the paper's, as CSV + Markdown + LaTeX, plus the index.

Runs produce per-item records; notebooks aggregate them into a DataFrame and call `write_table`,
which (atomically) writes `results/<name>.{csv,md,tex}` and records the file → notebook → paper
table mapping in `results/index.json`, from which `results/README.md` is regenerated.
Published numbers live as data in `pinpp_lib/data/paper/<table>.csv` (with a `source` column), never
in code; `with_paper` joins them beside ours.
"""
from __future__ import annotations

import gzip
import io
import json
from importlib import resources
from pathlib import Path

import pandas as pd

from . import fileio


def has_paper_values(table: str) -> bool:
    """Does the kit hold published numbers for `table` (e.g. "table3")?"""
    return resources.files("pinpp_lib.data").joinpath("paper").joinpath(f"{table}.csv").is_file()


def paper_values(table: str) -> pd.DataFrame:
    """The published numbers for a paper table (`pinpp_lib/data/paper/<table>.csv`)."""
    with resources.files("pinpp_lib.data").joinpath("paper").joinpath(f"{table}.csv").open() as f:
        return pd.read_csv(f, comment="#")


def with_paper(ours: pd.DataFrame, paper: pd.DataFrame, on: str | list[str], columns: list[str]) -> pd.DataFrame:
    """Put each of `columns` as '<col> (ours)' next to '<col> (paper)', joined on `on` (rows of both kept)."""
    on = [on] if isinstance(on, str) else on
    merged = ours.merge(paper[on + [c for c in columns if c in paper.columns]], on=on, how="outer",
                        suffixes=(" (ours)", " (paper)"))
    order = list(on)
    for c in columns:
        for name in (f"{c} (ours)", f"{c} (paper)", c):
            if name in merged.columns and name not in order:
                order.append(name)
    rest = [c for c in merged.columns if c not in order]
    return merged[order + rest]


def _markdown(df: pd.DataFrame, floatfmt: str) -> str:
    def fmt(v) -> str:
        if isinstance(v, float):
            return "–" if pd.isna(v) else format(v, floatfmt)
        return "–" if v is None else str(v).replace("|", "\\|")
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_table(df: pd.DataFrame, name: str, results_dir: str | Path, *, notebook: str, paper_table: str,
                caption: str, floatfmt: str = ".2f", notes: str = "") -> dict[str, Path]:
    """Write `df` as results/<name>.{csv,md,tex} and register it in the results index. Returns the paths.

    A paper table (`name` "table<N>_…") for which the kit holds no published numbers gets that said in its notes.
    """
    results_dir = Path(results_dir)
    key = name.split("_", 1)[0]
    if key.startswith("table") and not has_paper_values(key):
        notes = " ".join(filter(None, [notes, f"The paper's {paper_table} values are not in the kit's data; ours only."]))
    paths = {ext: results_dir / f"{name}.{ext}" for ext in ("csv", "md", "tex")}
    fileio.write_text(paths["csv"], df.to_csv(index=False))
    md = f"**{paper_table}** — {caption}\n\n" + _markdown(df, floatfmt) + (f"\n{notes}\n" if notes else "")
    fileio.write_text(paths["md"], md)
    buf = io.StringIO()
    df.to_latex(buf, index=False, float_format=lambda v: format(v, floatfmt), na_rep="--", caption=caption,
                label=f"tab:{name}")
    fileio.write_text(paths["tex"], buf.getvalue())
    register(results_dir, [p.name for p in paths.values()], notebook=notebook, paper=paper_table, what=caption)
    return paths


def register(results_dir: str | Path, files: list[str], *, notebook: str, paper: str, what: str) -> None:
    """Record result files in results/index.json and regenerate results/README.md from it."""
    results_dir = Path(results_dir)
    index_path = results_dir / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    for f in files:
        index[f] = {"notebook": notebook, "paper": paper, "what": what}
    fileio.write_json(index_path, dict(sorted(index.items())), indent=1)
    rows = _readme_rows(index)
    fileio.write_text(results_dir / "README.md",
                      "# Results\n\nWritten by the notebooks (`./run_all.sh`); every table is CSV + Markdown + LaTeX,\n"
                      "with the paper's numbers beside ours where they are known. Each notebook run also leaves\n"
                      "`run_meta/<notebook>.json` (parameters, profile, git commit, packages, device, seeds, time)\n"
                      "and its executed copy in `executed/` (not committed).\n\n" + "\n".join(rows) + "\n")


def _readme_rows(index: dict[str, dict[str, str]]) -> list[str]:
    """One row per table, figure or record set (its files linked, its notebook linked), in notebook order."""
    groups: dict[tuple[str, str, str], list[str]] = {}
    for f, e in index.items():
        stem = f.split("/")[-1].split(".")[0]
        groups.setdefault((e["notebook"], f.rsplit("/", 1)[0] if "/" in f else "", stem), []).append(f)
    rows = ["| paper | what | files | notebook |", "|---|---|---|---|"]
    for (nb, _, _), files in sorted(groups.items()):
        e = index[files[0]]
        order = {"md": 0, "csv": 1, "tex": 2}
        files = sorted(files, key=lambda f: (order.get(f.rsplit(".", 1)[-1], 3), f))
        label = (lambda f: f.split("/")[-1]) if len(files) == 1 else (lambda f: f.rsplit(".", 1)[-1])  # a table: md · csv · tex
        links = " · ".join(f"[{label(f)}]({f})" for f in files)
        rows.append(f"| {e['paper']} | {e['what']} | {links} | [{nb}](../notebooks/{nb}) |")
    return rows


def write_records(df: pd.DataFrame, name: str, results_dir: str | Path, *, notebook: str, paper: str, what: str) -> Path:
    """Write per-item records as results/records/<name>.csv.gz (atomically) and register them."""
    path = Path(results_dir) / "records" / f"{name}.csv.gz"
    with fileio.atomic_path(path) as tmp:
        # no name and mtime 0 in the gzip header: equal records must be equal bytes, whenever and wherever written
        with open(tmp, "wb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as gz:
            gz.write(df.to_csv(index=False).encode())
    register(results_dir, [f"records/{path.name}"], notebook=notebook, paper=paper, what=what)
    return path
