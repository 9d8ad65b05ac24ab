"""Config resolution, the table writer and run_meta."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from pinpp_lib import config, runmeta, tables
from pinpp_lib.fileio import PinppError


def test_profiles_resolve(tmp_path):
    s = config.resolve("smoke", data_root=tmp_path)
    assert s.paths.synthetic == tmp_path / "synthetic" and s.paths.release == tmp_path / "synthetic" / "release"
    assert s.transform.size == 64
    f = config.resolve("full", data_root=tmp_path, release=tmp_path / "hf")
    assert f.paths.synthetic is None and f.paths.release == tmp_path / "hf"
    assert f.transform.size == 224 and f.transform.crop_pct == 0.875  # the paper's eval transform
    o = config.resolve("smoke", seed=7, overrides={"synth": {"classes": 3}})
    assert o.synth.classes == 3 and o.synth.seed == o.convert.seed == 7
    with pytest.raises(PinppError, match="unknown profile"):
        config.resolve("medium")
    with pytest.raises(PinppError, match="unknown setting"):
        config.resolve("smoke", overrides={"synth": {"clases": 3}})
    with pytest.raises(PinppError, match="unknown path"):
        config.resolve("smoke", relase="x")


def test_write_table_and_index(tmp_path):
    ours = pd.DataFrame({"dataset": ["A", "B"], "images": [10, 20]})
    paper = pd.DataFrame({"dataset": ["A", "C"], "images": [11, 30], "source": ["x", "y"]})
    t = tables.with_paper(ours, paper, on="dataset", columns=["images"])
    assert list(t.columns[:3]) == ["dataset", "images (ours)", "images (paper)"]
    assert t.set_index("dataset").loc["A"].tolist()[:2] == [10, 11]
    paths = tables.write_table(t, "t_demo", tmp_path, notebook="nb.ipynb", paper_table="Table 9", caption="demo")
    assert all(p.exists() for p in paths.values())
    assert pd.read_csv(paths["csv"]).shape == t.shape
    assert "| A | 10.00 | 11.00 |" in paths["md"].read_text() or "| A | 10 | 11 |" in paths["md"].read_text()
    assert "\\begin{tabular}" in paths["tex"].read_text()
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["t_demo.csv"] == {"notebook": "nb.ipynb", "paper": "Table 9", "what": "demo"}
    # one row per table: its three files and its notebook linked
    assert ("| Table 9 | demo | [md](t_demo.md) · [csv](t_demo.csv) · [tex](t_demo.tex) | [nb.ipynb](../notebooks/nb.ipynb) |"
            in (tmp_path / "README.md").read_text())


def test_paper_values_are_data():
    t2 = tables.paper_values("table2")
    row = t2.set_index("dataset").loc["PartImageNet++"]
    assert (row["object categories"], row["part categories"], row["images"], row["part masks"]) == (1000, 3308, 100000, 406364)


def test_run_meta(tmp_path):
    m = runmeta.RunMeta("x", profile="smoke", params={"a": 1}, seeds={"s": 0})
    p = m.write(tmp_path / "run_meta.json", extra=5)
    r = json.loads(p.read_text())
    for k in ("params", "profile", "git", "packages", "device", "seeds", "started", "finished"):
        assert k in r
    assert r["packages"]["torch"] and r["extra"] == 5 and "commit" in r["git"]


def test_the_writer_says_when_the_paper_values_are_missing(tmp_path):
    df = pd.DataFrame({"model": ["a"], "acc": [1.0]})
    md = tables.write_table(df, "table9_demo", tmp_path, notebook="n", paper_table="Table 9", caption="c", notes="Ours.")["md"]
    assert md.read_text().rstrip().endswith("Ours. The paper's Table 9 values are not in the kit's data; ours only.")
    md = tables.write_table(df, "table3_demo", tmp_path, notebook="n", paper_table="Table 3", caption="c")["md"]
    assert "not in the kit's data" not in md.read_text()  # table3.csv holds published numbers


def test_records_are_the_same_bytes_whenever_written(tmp_path):
    df = pd.DataFrame({"index": [0, 1], "correct": [True, False]})
    a = tables.write_records(df, "r", tmp_path / "a", notebook="n", paper="p", what="w").read_bytes()
    b = tables.write_records(df, "r", tmp_path / "b", notebook="n", paper="p", what="w").read_bytes()
    assert a == b and pd.read_csv(tmp_path / "a" / "records" / "r.csv.gz").equals(df)


def test_accuracy_and_wilson_interval():
    from pinpp_lib import reporting
    lo, hi = reporting.wilson(50, 100)
    z, p, n = 1.96, 0.5, 100  # the Wilson score interval, written out
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    assert (lo, hi) == pytest.approx((centre - half, centre + half))
    a = reporting.accuracy([True, True, False, True])
    assert (a.value, a.n) == (75.0, 4) and a.ci == f"[{a.lo:.1f}, {a.hi:.1f}]"
    skipped = reporting.accuracy([True, None, False])
    assert pd.isna(skipped.value) and skipped.ci == reporting.NOT_ATTACKED
    recs = pd.DataFrame({"robust": [True, False], "standard": [False, False], "pgd-20": [True, False]})
    assert reporting.evaluation_label(recs) == "PGD-20 (non-standard)"
    assert reporting.evaluation_label(recs.assign(standard=True)) == "AutoAttack (standard)"
    assert reporting.evaluation_label(recs.assign(robust=None)) == "not attacked"


def test_one_colour_per_model_in_every_figure():
    from pinpp_lib import plots
    a = plots.palette(["MPM AT", "vanilla", "other"])
    b = plots.palette(["other", "MPM AT"])
    assert a["MPM AT"] == b["MPM AT"] == plots.MODEL_COLOURS["MPM AT"] and a["vanilla"] == plots.MODEL_COLOURS["vanilla"]
