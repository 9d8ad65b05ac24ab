"""Tier 2: papermill runs of the notebooks on the synthetic data, and run_all.sh's behaviour."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import papermill as pm
import pytest

from pinpp_lib import release, stats

from conftest import scratch_kit

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
pytestmark = pytest.mark.notebooks


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_conventions(nb):
    n = nbformat.read(nb, as_version=4)
    assert "parameters" in n.cells[0].metadata.get("tags", [])
    assert 'PROFILE = "smoke"' in n.cells[0].source
    assert n.cells[1].cell_type == "markdown"
    for word in ("Regenerates", "Command", "Runtime", "Inputs", "Outputs"):
        assert word in n.cells[1].source
    assert n.metadata.kernelspec.name and n.metadata.language_info.name == "python"
    for c in n.cells:
        if c.cell_type == "code":
            # thin: logic lives in pinpp_lib — no function or class definitions in a cell
            assert not re.search(r"^\s*(async\s+)?(def|class)\s+\w+", c.source, re.M), c.source[:80]


def _assert_real_figure(path: Path) -> None:
    import numpy as np
    from PIL import Image
    img = np.asarray(Image.open(path).convert("L"), dtype=float)
    assert min(img.shape) >= 200 and img.std() > 5, path  # a drawn figure, not an empty canvas


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    data, results = tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("results")
    for nb in [p for p in NOTEBOOKS if p.name[:2] in ("00", "01")]:
        pm.execute_notebook(str(nb), str(results / nb.name), parameters={"DATA_ROOT": str(data), "RESULTS_DIR": str(results)},
                            kernel_name="pinpp", cwd=str(ROOT / "notebooks"), progress_bar=False)
    return data, results


def test_prepare_and_statistics_notebooks(smoke_run):
    data, results = smoke_run
    conv = data / "converted"
    assert (conv / "parts.json").exists() and (conv / "seg_benchmark" / "parts_test.json").exists()
    for name in ("table1_part_masks_per_image", "table2_dataset_comparison", "inclusion_relations", "data_conversion_summary"):
        for ext in ("csv", "md", "tex"):
            assert (results / f"{name}.{ext}").exists(), name
    for fig in ("fig1_part_overlays.png", "fig_parts_per_class.png"):
        _assert_real_figure(results / fig)
    # the table holds what a direct computation on the same release gives
    rel = release.load_release(data / "synthetic" / "release")
    direct = stats.table1(stats.image_records(rel)).set_index("part masks per image")["share (%)"]
    t1 = pd.read_csv(results / "table1_part_masks_per_image.csv").set_index("part masks per image")["share (%) (ours)"]
    assert (direct - t1).abs().max() < 1e-9
    t2 = pd.read_csv(results / "table2_dataset_comparison.csv")
    assert t2.iloc[0]["object categories"] == len(rel.classes)
    for nb in ("00_prepare_data", "01_dataset_statistics"):
        meta = json.loads((results / "run_meta" / f"{nb}.json").read_text())
        assert meta["profile"] == "smoke" and meta["packages"]["torch"] and "commit" in meta["git"]
    index = json.loads((results / "index.json").read_text())
    assert index["table1_part_masks_per_image.md"]["paper"] == "Table 1"
    assert index["fig1_part_overlays.png"]["paper"] == "Fig. 1"


def _run(nb_name: str, data: Path, results: Path) -> None:
    nb = ROOT / "notebooks" / nb_name
    pm.execute_notebook(str(nb), str(results / nb.name), parameters={"DATA_ROOT": str(data), "RESULTS_DIR": str(results)},
                        kernel_name="pinpp", cwd=str(ROOT / "notebooks"), progress_bar=False)


def test_segmentation_notebooks(smoke_run):
    """Notebooks 02-04: tiny real mmdet models on the synthetic benchmark files, Tables 9, 10, 6-left, pseudo labels."""
    data, results = smoke_run
    for nb in ("02_part_segmentation.ipynb", "03_object_segmentation.ipynb", "04_pseudo_labels.ipynb"):
        _run(nb, data, results)
    from pinpp_lib import config
    sc = config.resolve("smoke").seg
    metrics = ["mask AP", "mask AP50", "box AP", "box AP50"]
    t9 = pd.read_csv(results / "table9_part_segmentation.csv")
    assert len(t9) == len(sc.models) and t9[metrics].apply(lambda c: c.between(0, 100)).all().all()
    per = pd.read_csv(results / "records" / "seg_parts_per_category.csv.gz")
    n_parts = len(json.loads((data / "converted" / "parts.json").read_text()))
    assert per.groupby(["config", "metric"]).size().eq(n_parts).all()  # every part category has its AP record
    run = data / "runs" / "seg" / "parts" / f"{sc.models[0]}_seed{sc.seeds[0]}"
    dets = json.loads((run / "detections_parts_test_plain.json").read_text())["detections"]["plain"]
    assert dets and {"image_id", "category_id", "bbox", "score", "segmentation"} <= set(dets[0])
    t10 = pd.read_csv(results / "table10_object_segmentation.csv")
    assert len(t10) == len(sc.object_models) and (t10["seeds"] == len(sc.seeds)).all()
    assert np.allclose(t10["Δ mask AP"], t10["mask AP object+part"] - t10["mask AP object-only"])
    assert t10["Δ mask AP sd"].notna().all() == (len(sc.seeds) > 1)
    t6 = pd.read_csv(results / "table6_left_pseudo_labels.csv")
    assert list(t6.labels) == ["pseudo labels w/o CF", "pseudo labels w/ CF"] and t6[metrics].apply(lambda c: c.between(0, 100)).all().all()
    # every unannotated training image has a pseudo label in both variants; CF never paints another class's part
    conv = data / "converted"
    recs = pd.read_csv(results / "records" / "pseudo_labels.csv.gz")
    n_unlabelled = sum(1 for p in (conv / "train" / "img").glob("*/*.JPEG") if not (conv / "train" / "seg" / p.parent.name / f"{p.stem}.png").exists())
    for v in ("cf", "nocf"):
        assert len(list((conv / "train" / f"seg_pseudo_{v}").glob("*/*.png"))) == len(list((conv / "train" / "seg").glob("*/*.png"))) + n_unlabelled
        assert (recs.variant == v).sum() == n_unlabelled
    assert (recs[recs.variant == "cf"]["parts of another class"] == 0).all()
    flags = [line.split()[1] for f in (conv / "train" / "whether_pseudo").glob("*.txt") for line in f.read_text().splitlines()]
    assert flags.count("1") == n_unlabelled and "0" in flags
    for fig in ("fig_part_segmentation.png", "fig_pseudo_labels.png"):
        _assert_real_figure(results / fig)
    for nb in ("02_part_segmentation", "03_object_segmentation", "04_pseudo_labels"):
        meta = json.loads((results / "run_meta" / f"{nb}.json").read_text())
        assert meta["profile"] == "smoke" and meta["packages"]["mmdet"] == "3.3.0"
    index = json.loads((results / "index.json").read_text())
    assert index["table9_part_segmentation.md"]["paper"] == "Table 9" and index["table6_left_pseudo_labels.csv"]["paper"] == "Table 6 (left)"


def test_mpm_notebook(smoke_run):
    """Notebook 05 on the smoke profile: trains tiny models, attacks them, writes every table."""
    data, results = smoke_run
    nb = ROOT / "notebooks" / "05_mpm_adversarial_training.ipynb"
    pm.execute_notebook(str(nb), str(results / nb.name), parameters={"DATA_ROOT": str(data), "RESULTS_DIR": str(results)},
                        kernel_name="pinpp", cwd=str(ROOT / "notebooks"), progress_bar=False)
    t3 = pd.read_csv(results / "table3_mpm_autoattack.csv")
    ours = t3[t3.model.isin(["vanilla AT", "MPM AT"])]
    assert len(ours) == 2 and (ours.evaluation == "AutoAttack (standard)").all()
    assert ours["Linf-4/255"].between(0, 100).all() and (ours["Linf-4/255"] <= ours["clean"]).all()
    assert {"Salman et al. 2020 (R50)", "Bai et al. 2021 (R50-GELU)"} <= set(t3.model)
    t7 = pd.read_csv(results / "table7_bypass_variants.csv")
    assert set(t7.model) == {"two-stage", "SV1", "SV2 w/ TD", "SV3 w/ TD (MPM)", "SV3 w/o TD"}
    assert (t7["params deployed (M)"] <= t7["params train (M)"]).all()
    claims = pd.read_csv(results / "mpm_claims.csv")
    assert claims.verdict.str.match(r"reproduced|not reproduced|contradicted|not evaluated").all()
    records = pd.read_csv(results / "records" / "mpm_autoattack.csv.gz")
    assert {"run", "protocol", "index", "threat", "clean", "robust", "standard"} <= set(records.columns)
    t6 = pd.read_csv(results / "table6_right_pseudo_labels.csv")
    assert list(t6.model) == ["real labels only", "+ pseudo w/o CF", "+ pseudo w/ CF"]
    assert "real + pseudo (CF) part labels" in (results / "table3_mpm_autoattack.md").read_text()
    r50 = t7.set_index("model")["R50 params deployed (M)"].round(2)
    assert r50["two-stage"] == 60.54 and (r50.drop("two-stage") == 25.56).all()
    runs = data / "runs" / "mpm"
    for run in ("at_mpm", "at_mpm_object", "at_mpm_sv1", "at_twostage"):  # notebook 04's CF labels
        assert json.loads((runs / run / "done.json").read_text())["config"]["seg_dir"] == "seg_pseudo_cf", run
    assert json.loads((runs / "at_mpm_real" / "done.json").read_text())["config"]["seg_dir"] == "seg"
    assert not any(runs.glob("at_mpm_lambda*"))  # Fig. A1's λ sweep is notebook 09's (on T-PIN++)


def test_robustness_notebook(smoke_run):
    """Notebook 06 after 05: reuses its runs, trains the clean MPM run, writes Tables A1, A2, 8, 4, 5."""
    data, results = smoke_run
    nb = ROOT / "notebooks" / "06_robustness_ood.ipynb"
    pm.execute_notebook(str(nb), str(results / nb.name), parameters={"DATA_ROOT": str(data), "RESULTS_DIR": str(results)},
                        kernel_name="pinpp", cwd=str(ROOT / "notebooks"), progress_bar=False)
    models = ["vanilla", "MPM", "vanilla AT", "MPM AT"]
    a1 = pd.read_csv(results / "tableA1_imagenet_c.csv")
    from pinpp_lib.corruptions import CORRUPTIONS
    assert list(a1.model) == models and set(CORRUPTIONS) <= set(a1.columns) and a1["mean"].between(0, 100).all()
    rec = pd.read_csv(results / "records" / "robustness_imagenet_c.csv.gz")
    assert rec.groupby("model").size().nunique() == 1 and set(rec.severity) == {1, 2, 3, 4, 5}
    a2 = pd.read_csv(results / "tableA2_ood.csv")
    assert {"ImageNet-A-Plus", "ImageNet-Sketch", "Stylized-ImageNet (val)", "model-vs-human (mean)"} <= set(a2.columns)
    t8 = pd.read_csv(results / "table8_model_vs_human.csv")
    assert {"humans (noise ceiling)", "ResNet-50 (standard)", *models} <= set(t8.model)
    for name in ("table4_pin_subset", "table5_pin_supercategories"):
        t = pd.read_csv(results / f"{name}.csv")
        assert list(t.model) == models and t["clean"].between(0, 100).all()
    _assert_real_figure(results / "figA_corruption_severity.png")
    assert (data / "runs" / "mpm" / "clean_mpm" / "done.json").exists()


def test_detection_transfer_notebook(smoke_run):
    """Notebook 08: Faster R-CNN with free AT on notebook 05's three backbones, scored clean and under both attacks."""
    data, results = smoke_run
    nb = ROOT / "notebooks" / "08_detection_transfer.ipynb"
    pm.execute_notebook(str(nb), str(results / nb.name), parameters={"DATA_ROOT": str(data), "RESULTS_DIR": str(results)},
                        kernel_name="pinpp", cwd=str(ROOT / "notebooks"), progress_bar=False)
    t = pd.read_csv(results / "tableA3_detection_transfer.csv")
    assert list(t.backbone) == ["clean", "vanilla AT", "MPM AT"]
    assert t.drop(columns="backbone").stack().between(0, 100).all() and t.shape[1] == 7
    rec = pd.read_csv(results / "records" / "det_transfer.csv.gz")
    assert set(rec.evaluation) == {"clean", "A_cls", "A_reg"} and rec.images.eq(8).all()
    meta = json.loads((results / "run_meta" / "08_detection_transfer.json").read_text())
    assert set(meta["runs"]) == {"clean", "vanilla AT", "MPM AT"} and meta["profile"] == "smoke"


def test_tiny_pinpp_notebook(smoke_run):
    """Notebook 09 after 05: the T-PIN++ tree of the release's Tiny-ImageNet classes, three AT runs from 05's clean run,
    Table A5 (the WRN without its file: how to get it) and Fig. A1."""
    data, results = smoke_run
    nb = ROOT / "notebooks" / "09_tiny_pinpp.ipynb"
    pm.execute_notebook(str(nb), str(results / nb.name), parameters={"DATA_ROOT": str(data), "RESULTS_DIR": str(results)},
                        kernel_name="pinpp", cwd=str(ROOT / "notebooks"), progress_bar=False)
    t = pd.read_csv(results / "tableA5_tiny_pinpp.csv")
    assert list(t.model) == ["tiny ResNet vanilla AT", "tiny ResNet MPM AT", "WRN-28-10 (Wang et al. 2023), re-evaluated",
                             "WRN-28-10 (Wang et al. 2023), published"]
    assert t["Linf-4/255"][:2].between(0, 100).all() and (t["Linf-8/255"][:2] <= t["clean"][:2]).all()
    assert t.source[2].startswith("weights not present: put tiny_linf_wrn28-10.pt")
    tree = json.loads((data / "runs" / "tiny" / "tpinpp" / "tpinpp.json").read_text())
    assert tree["classes"] == 5 and tree["train_images"] == 200 and tree["val_images"] == 20
    _assert_real_figure(results / "figA1_lambda.png")
    rec = pd.read_csv(results / "records" / "tiny_pinpp.csv.gz")
    assert set(rec[rec.protocol == "figA1"].run) == {"tiny_plain", "tiny_mpm", "tiny_mpm_lambda2"}
    assert json.loads((results / "run_meta" / "09_tiny_pinpp.json").read_text())["images"] == 20


def test_few_shot_notebook(smoke_run):
    """Notebook 07: trains the four few-shot models on the synthetic release, writes Tables 11 and 12."""
    data, results = smoke_run
    nb = ROOT / "notebooks" / "07_few_shot.ipynb"
    pm.execute_notebook(str(nb), str(results / nb.name), parameters={"DATA_ROOT": str(data), "RESULTS_DIR": str(results)},
                        kernel_name="pinpp", cwd=str(ROOT / "notebooks"), progress_bar=False)
    for name, col in (("table11_few_shot_1shot", "1-shot accuracy"), ("table12_few_shot_5shot", "5-shot accuracy (ours)")):
        t = pd.read_csv(results / f"{name}.csv")
        ours = t[t[col].notna()]
        assert len(ours) == 4 and ours[col].between(0, 100).all() and (ours["± 95% CI"] > 0).all()
    rec = pd.read_csv(results / "records" / "few_shot_episodes.csv.gz")
    assert rec.groupby(["method", "variant", "shot"]).size().nunique() == 1  # same episode count for every model
    meta = json.loads((results / "run_meta" / "07_few_shot.json").read_text())
    assert abs(sum(w["weight"] for w in meta["branch_weights"] if w["shot"] == "1-shot") - 1) < 1e-6
    _assert_real_figure(results / "fig_few_shot_parts.png")


def test_run_all_stops_at_first_failure_and_keeps_earlier_results(tmp_path):
    write = "import pathlib; pathlib.Path('../results/{}.txt').write_text(PROFILE)"
    kit = scratch_kit(tmp_path, {"00_a.ipynb": write.format("a"), "01_b.ipynb": "raise RuntimeError('boom')",
                                  "02_c.ipynb": write.format("c")})
    r = subprocess.run(["bash", str(kit / "run_all.sh")], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1
    assert "01_b.ipynb FAILED" in r.stderr
    assert (kit / "results" / "a.txt").read_text() == "smoke"
    assert not (kit / "results" / "c.txt").exists()
    assert (kit / "results" / "executed" / "01_b.ipynb").exists()


def test_run_all_only_and_profile(tmp_path):
    write = "import pathlib; pathlib.Path('../results/{}.txt').write_text(PROFILE)"
    kit = scratch_kit(tmp_path, {"00_a.ipynb": write.format("a"), "01_b.ipynb": write.format("b")})
    r = subprocess.run(["bash", str(kit / "run_all.sh"), "--only", "01", "--profile", "full"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (kit / "results" / "b.txt").read_text() == "full" and not (kit / "results" / "a.txt").exists()
    r = subprocess.run(["bash", str(kit / "run_all.sh"), "--only", "09"], capture_output=True, text=True)
    assert r.returncode == 2 and "no notebook notebooks/09_*.ipynb" in r.stderr
    r = subprocess.run(["bash", str(kit / "run_all.sh"), "--profile", "huge"], capture_output=True, text=True)
    assert r.returncode == 2 and "smoke, rehearsal or full" in r.stderr
