"""Issue 14 part 3: Table 3 from released weights — stand-in files in the published layouts, labels mapped by wnid,
measured rows beside published ones, absent weights named with the command that gets them, nothing trained."""
from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
import torch

from pinpp_lib import config, released, tables, zoo
from pinpp_lib import mpm_experiments as mx
from pinpp_lib import table3_released as T
from pinpp_lib.fileio import PinppError
from test_released import AUTHORS, NUM, SEG


@pytest.mark.parametrize("arch", ["plain", "mpm", "twostage"])
def test_authors_layout_standin_is_the_authors_model(arch, tmp_path):
    """The stand-in holds exactly the tensors of the authors' model (restated in test_released), loaded strictly, and
    their training arguments; the kit's import maps it back onto the model it was written from."""
    path = released.write_standin(tmp_path / "c.pth.tar", arch, seed=3, num_classes=NUM, seg_classes=SEG)
    ckpt = released.read_checkpoint(path)
    authors = AUTHORS[arch]()
    authors.load_state_dict(ckpt["state_dict_ema"], strict=True)
    assert set(ckpt) >= {"epoch", "arch", "state_dict", "state_dict_ema", "optimizer", "version", "args"}
    model, dropped = released.map_state_dict(ckpt["state_dict_ema"], arch)
    assert dropped == []
    torch.manual_seed(3)
    from pinpp_lib import models
    ref = models.build(arch, "r50", NUM, SEG)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)
    before = path.read_bytes()
    released.write_standin(path, arch, seed=4, num_classes=NUM, seg_classes=SEG)
    assert path.read_bytes() == before  # an existing file (a real checkpoint) is never overwritten


def test_authors_layout_is_refused_for_archs_with_unused_modules(tmp_path):
    with pytest.raises(PinppError, match="plain, mpm and twostage only"):
        released.write_standin(tmp_path / "c.pth.tar", "mpm_sv1", num_classes=NUM, seg_classes=SEG)


@pytest.mark.parametrize("name", ["salman2020_r50", "mao2022_easyrobust_r50", "debenedetti2022_r50_gelu", "liu2023_ares_r50"])
def test_zoo_standin_has_the_published_prefixes(name, tmp_path):
    e = zoo.entry(name)
    path = zoo.write_standin(name, tmp_path / "w.pth", seed=1)
    obj = released.read_checkpoint(path)
    sd = obj[e.container[0]] if e.container[0] else obj
    want = {"salman2020_r50": "module.model.conv1.weight", "mao2022_easyrobust_r50": "module.1.conv1.weight",
            "debenedetti2022_r50_gelu": "module.model.conv1.weight", "liu2023_ares_r50": "module.conv1.weight"}[name]
    assert want in sd
    if name == "mao2022_easyrobust_r50":  # EasyRobust stores its normalisation as index 0 of a Sequential
        assert torch.equal(sd["module.0.mean"], torch.tensor([0.485, 0.456, 0.406]))
    zoo.import_zoo(name, path, tmp_path / "run")  # strict


def test_label_map_by_wnid():
    assert T.label_map(["n02", "n01", "n03"], ["n01", "n03"], "run").tolist() == [1, 2]
    with pytest.raises(PinppError, match=r"run: the model has no output for 1 class\(es\).*'n09'.*--classes FILE"):
        T.label_map(["n01"], ["n01", "n09"], "run")


def test_catalogue_is_the_authors_two_then_the_zoo():
    names = [m.name for m in T.catalogue()]
    assert names == ["official_vanilla_at", "official_mpm_at", *zoo.entries()]
    assert [m.arch for m in T.catalogue()[:2]] == ["plain", "mpm"]


def test_measured_beside_published_and_absent_named(converted, tmp_path):
    """Two models present (the authors' vanilla, Salman et al.): measured on the kit's images, their published rows
    kept; the rest absent with the command that gets them. Labels reach the model by wnid (10 synthetic classes
    inside its 1000 outputs)."""
    folder = tmp_path / "released"
    cat = {m.name: m for m in T.catalogue()}
    released.write_standin(folder / cat["official_vanilla_at"].file, "plain", seed=0)
    zoo.write_standin("salman2020_r50", folder / cat["salman2020_r50"].file, seed=0)
    s = config.resolve("smoke", data_root=tmp_path / "d")
    E = dataclasses.replace(s.mpm, released=True, eval=dataclasses.replace(s.mpm.eval, mode="pgd", pgd_steps=2))
    x, y = mx.eval_images(converted, E.at.transform, end=6)
    present, recs = T.measure(E, folder, converted, x, y)
    assert sorted(present) == ["official_vanilla_at", "salman2020_r50"]
    assert set(recs.protocol) == {"released"} and len(recs) == 2 * 6
    rows = T.rows(recs, E.eval.threats, present).set_index(["model", "source"])
    pub = tables.paper_values("table3").set_index("model")
    salman = "Salman et al. 2020 (R50)"
    assert rows.loc[(salman, "published: RobustBench (5k list)"), "clean"] == pub.loc[salman, "clean"]
    measured = rows.loc[(salman, "measured (released weights)")]
    assert 0 <= measured["clean"] <= 100 and measured["evaluation"] != ""
    sources = dict(rows.index.tolist())
    assert sources["Engstrom et al. 2019 (R50)"] == "published: RobustBench (5k list); weights not present — `pinpp zoo fetch engstrom2019`"
    assert "weights not present — put the authors' MPM AT checkpoint" in sources["PIN++ authors' MPM AT (released)"]
    assert sources["Bai et al. 2021 (R50-GELU)"] == "published: paper (full val set); weights not present — `pinpp zoo fetch bai2021_r50_gelu`"
    # same records again: every model reused (imports and AutoAttack shards cached)
    again = T.measure(E, folder, converted, x, y)[1]
    pd.testing.assert_frame_equal(recs, again)


def test_smoke_shows_published_rows_only(converted, tmp_path):
    s = config.resolve("smoke", data_root=tmp_path / "d")
    assert s.mpm.released is False and s.paths.released == tmp_path / "d" / "released"
    x, y = mx.eval_images(converted, s.mpm.at.transform, end=2)
    present, recs = T.measure(s.mpm, s.paths.released, converted, x, y)
    assert present is None and recs.empty
    rows = T.rows(recs, s.mpm.eval.threats, present)
    assert not rows["source"].str.contains("not present|measured").any()
    assert rows["model"].tolist() == [m.model for m in T.catalogue() if m.kind == "zoo"]
    by = rows.set_index("model")
    # a model outside the paper's reference list shows its own authors' numbers, named as such
    assert by.loc["Liu et al. 2023 (ARES R50)", "clean"] == 67.0
    assert by.loc["Liu et al. 2023 (ARES R50)", "source"] == "published: ARES README (1000 random val images)"


def test_no_training_returns_the_finished_runs_only(converted, tmp_path):
    """`train_missing=False` (run_all --no-train): nothing trains, nothing needs the part labels, and the tables are
    written from no runs at all."""
    s = config.resolve("smoke", data_root=tmp_path / "d")
    trained = mx.run_training(mx.plan(s.mpm), s.mpm, converted, tmp_path / "work", train_missing=False)
    assert trained == {} and not (tmp_path / "work").exists()
    x, y = mx.eval_images(converted, s.mpm.at.transform, end=2)
    records = mx.run_evaluation(trained, s.mpm, x, y)
    assert records.empty and list(records.columns) == mx.RECORD_COLUMNS
    assert mx.table3(records, s.mpm.eval.threats).empty
    tables.write_table(mx.variant_table(records, trained, {"x": "at_mpm"}, "Linf-4/255"), "table7_x", tmp_path / "r",
                       notebook="05", paper_table="Table 7", caption="c")
