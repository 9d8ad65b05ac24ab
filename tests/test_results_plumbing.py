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
    assert "`t_demo.md` | `nb.ipynb` | Table 9" in (tmp_path / "README.md").read_text()


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
