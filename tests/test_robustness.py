"""Notebook 06 building blocks: ImageNet-C folders, OOD loaders and label conventions, stand-ins,
PIN subset / super-category evaluation, Table 8 assembly (metrics themselves: test_human_consistency)."""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

from pinpp_lib import corruptions as C
from pinpp_lib import human_consistency as H
from pinpp_lib import ood_sets as O
from pinpp_lib import ood_standins as S
from pinpp_lib import pin_subsets as PS
from pinpp_lib import robustness as RB
from pinpp_lib import tables
from pinpp_lib.datasets import val_dataset
from pinpp_lib.fileio import PinppError
from pinpp_lib.robust_eval import EvalConfig


class FixedLogits(nn.Module):
    """Logits that do not depend on the image: the row `z` for every input (plus a tiny input term for grads)."""

    def __init__(self, z: list[float]):
        super().__init__()
        self.z = torch.tensor(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.z.expand(len(x), -1) + 0 * x.mean((1, 2, 3))[:, None]


class MeanColour(nn.Module):
    """A real (if weak) classifier: a linear map of the mean colour."""

    def __init__(self, n: int):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)) * 10)


def test_imagenet_c_written_then_read_like_a_download(tmp_path):
    x = torch.rand(4, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3])
    rel = [f"n0000000{i}/img{i}.JPEG" for i in range(4)]
    root = C.write_imagenet_c(tmp_path / "c", x, rel, seed=0, corruptions=("gaussian_noise", "contrast"), severities=(1, 5))
    assert sorted(p.name for p in (root / "contrast" / "5").iterdir()) == [".done"] + [f"n0000000{i}" for i in range(4)]
    before = (root / "contrast" / "5" / rel[0]).stat().st_mtime_ns
    C.write_imagenet_c(root, x, rel, seed=0, corruptions=("gaussian_noise", "contrast"), severities=(1, 5))
    assert (root / "contrast" / "5" / rel[0]).stat().st_mtime_ns == before  # complete folders are not rewritten
    models = {"a": MeanColour(4), "b": FixedLogits([0.0, 0.0, 5.0, 0.0])}
    recs = pd.DataFrame(C.evaluate(models, root, rel, y, 32, ("gaussian_noise", "contrast"), (1, 5)))
    assert len(recs) == 2 * 2 * 2 * 4
    b = recs[recs.model == "b"]
    assert (b.correct == (b.label == 2)).all()  # the constant model is right exactly on class 2
    t = C.table_a1(recs).set_index("model")
    assert list(t.index) == ["a", "b"] and t.loc["b", "mean"] == pytest.approx(25.0)
    assert t.loc["a", "contrast"] == pytest.approx(recs[(recs.model == "a") & (recs.corruption == "contrast")].correct.mean() * 100)
    with pytest.raises(PinppError, match="<root>/<corruption>/<severity>/<wnid>/<file>"):
        C.evaluate(models, root, rel, y, 32, ("fog",), (1,))


def test_imagenet_c_over_the_whole_val_set(tmp_path):
    """App. D: every image of the val folder (class folders), written chunk by chunk with each image seeded by its
    list position — the same files as writing the same crops at once — resumed per chunk, listed back from the
    written copy as from a download; a flat folder or an unknown class is one line."""
    from PIL import Image

    from pinpp_lib.ood_sets import PathDataset
    val = tmp_path / "val"
    rng = np.random.default_rng(0)
    for w in ("n00000002", "n00000001"):
        for k in range(3):
            (val / w).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(val / w / f"ILSVRC_{w}_{k}.JPEG")
    (val / "n00000001" / "notes.txt").write_text("not an image")
    classes = ["n00000000", "n00000001", "n00000002"]
    rels, y = C.val_images(val, classes)
    assert rels == sorted(rels) and len(rels) == 6 and y.tolist() == [1, 1, 1, 2, 2, 2]
    kw = dict(crop_pct=0.875, seed=3, corruptions=("gaussian_noise",), severities=(2,))
    root = C.write_imagenet_c_from_files(tmp_path / "c", val, rels, 32, chunk=4, **kw)
    folder = root / "gaussian_noise" / "2"
    assert sorted(p.name for p in folder.glob(".done-*")) == [".done-00000000", ".done-00000004"]
    ds = PathDataset([val / r for r in rels], 32, 0.875)
    once = C.write_imagenet_c(tmp_path / "once", torch.stack([ds[i] for i in range(6)]), rels, seed=3,
                              corruptions=("gaussian_noise",), severities=(2,))
    assert all((folder / r).read_bytes() == (once / "gaussian_noise" / "2" / r).read_bytes() for r in rels)
    (folder / ".done-00000004").unlink()
    before = (folder / rels[0]).stat().st_mtime_ns
    C.write_imagenet_c_from_files(root, val, rels, 32, chunk=4, **kw)  # only the unfinished chunk is rewritten
    assert (folder / rels[0]).stat().st_mtime_ns == before and (folder / ".done-00000004").exists()
    listed, ly = C.val_images(folder, classes)  # a written (or downloaded) copy lists the same images
    assert listed == rels and ly.tolist() == y.tolist()
    assert C.val_images(val, classes, cap=3)[0] == rels[::2]
    with pytest.raises(PinppError, match="no <wnid>/ class folders.*imagenet_c_images=eval_list"):
        C.val_images(tmp_path / "c")
    with pytest.raises(PinppError, match="n00000002: 1 class folder"):
        C.val_images(val, classes[:2])
    cfg = RB.RobustnessConfig(corruptions=("gaussian_noise",), severities=(2,), seed=3)
    got_root, got_rels, got_y = RB.imagenet_c_set(cfg, tmp_path, val, classes, None, [], None, 32, 0.875)
    assert got_root == tmp_path / "imagenet_c" and got_rels == rels and got_y.tolist() == y.tolist()
    assert (tmp_path / "imagenet_c" / "gaussian_noise" / "2" / rels[5]).read_bytes() == (folder / rels[5]).read_bytes()
    assert RB.RobustnessConfig().imagenet_c_images == "val"


def test_folder_set_layouts_and_missing_set(tmp_path):
    with pytest.raises(PinppError, match=r"ImageNet-Sketch not found; expected <root>/sketch/<wnid>/<image> — get it from"):
        O.folder_set("imagenet_sketch", tmp_path / "nowhere")
    from PIL import Image
    for sub in ("sketch", ""):  # both the release layout and a flattened one are read
        base = tmp_path / (sub or "flat")
        for w in ("n00000002", "n00000001"):
            d = base / sub / w
            d.mkdir(parents=True)
            Image.new("RGB", (40, 30), (200, 10, 10)).save(d / "a.JPEG")
        paths, wnids = O.folder_set("imagenet_sketch", base)
        assert wnids == ["n00000001", "n00000002"] and all(p.exists() for p in paths)


def test_label_space_masks_to_the_sets_classes():
    classes = ["n1", "n2", "n3", "n4"]
    y, keep = O.label_space(["n2", "n4", "n4"], classes)
    assert y.tolist() == [1, 3, 3] and keep == [1, 3]
    assert O.label_space(["n1", "n2", "n3", "n4"], classes)[1] is None
    with pytest.raises(PinppError, match="not classes of the model"):
        O.label_space(["n9"], classes)


def test_masked_prediction_ignores_classes_outside_the_set(tmp_path):
    from PIL import Image
    for w in ("n00000002", "n00000004"):
        (tmp_path / w).mkdir()
        Image.new("RGB", (36, 36)).save(tmp_path / w / "x.JPEG")
    classes = ["n00000001", "n00000002", "n00000003", "n00000004"]
    model = FixedLogits([9.0, 1.0, 8.0, 0.5])  # the unmasked argmax (class 0) is not in the set
    recs = pd.DataFrame(O.evaluate_folder_set({"m": model}, "imagenet_a_plus", tmp_path, classes, 32, 0.875))
    assert (recs.pred == 1).all() and recs.correct.tolist() == [True, False] and (recs.classes == 2).all()


@pytest.fixture(scope="module")
def standins(converted, synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("ood")
    S.write_standins(converted / "val_1w" / "img", converted / "val_1w" / "val_list.txt",
                     synth / "class_supercategories.json", out, ("colour", "edge"), seed=0)
    return out


def test_standins_are_read_by_the_real_loaders(standins, converted):
    n_val = len(val_dataset(converted))
    for name in O.OOD_SETS:
        paths, wnids = O.folder_set(name, standins / name)
        assert len(paths) == (n_val if name != "imagenet_a_plus" else len(paths)) and paths
    a_plus = set(O.folder_set("imagenet_a_plus", standins / "imagenet_a_plus")[1])
    assert 0 < len(a_plus) < len({rel.split("/")[0] for rel, _ in val_dataset(converted).samples})
    trials = H.load_trials(datasets=["colour", "edge"])
    for ds in ("colour", "edge"):
        imgs = O.mvh_images(standins / "model_vs_human", ds)
        assert set(imgs.key) == set(trials[trials.dataset == ds].key)  # one image per key the humans saw
        assert (imgs.category.isin(H.human16_map())).all()
    subset = PS.read_subset(standins / "pin_subsets" / "pin125.txt")
    supercats = PS.read_supercategories(standins / "pin_subsets" / "pin_supercategories.csv")
    assert set(supercats) == set(subset) and set(supercats.values()) <= set(S.PIN_SUPERCATEGORIES.values())


def test_mvh_decisions_feed_the_human_metrics(standins, converted):
    classes = sorted({rel.split("/")[0] for rel, _ in val_dataset(converted).samples})
    dec = O.mvh_decisions({"m": MeanColour(len(classes))}, standins / "model_vs_human", ("colour", "edge"), classes, 32, 0.875)
    assert set(dec.columns) >= {"model", "dataset", "key", "decision", "category"}
    table, per = RB.table8(pd.concat([dec.assign(model=m) for m in RB.MODELS]), ("colour", "edge"), tables.paper_values("table8"))
    ours = table[table.source == "ours"].set_index("model")
    assert list(ours.index) == list(RB.MODELS) and ours["error_consistency"].between(-1, 1).all()
    ceiling = table[table.model == "humans (noise ceiling)"].iloc[0]
    assert ceiling.observed_consistency > ours.observed_consistency.max()  # humans agree with each other more
    assert "ResNet-50 (standard)" in set(table.model) and set(per.model) >= set(RB.MODELS)


def test_stand_in_distortions_follow_conditions():
    rng = np.random.default_rng(0)
    img = rng.random((48, 48, 3))
    assert np.allclose(S.distort("colour", "cr", img, rng, img), img)
    assert np.ptp(S.distort("colour", "bw", img, rng, img), axis=2).max() == 0  # greyscale
    low = S.distort("contrast", "c05", img, rng, img)
    assert np.ptp(low) < 0.06
    assert np.allclose(S.distort("rotation", "180", img, rng, img), np.rot90(img.mean(2, keepdims=True).repeat(3, 2), 2))
    with pytest.raises(PinppError, match="no stand-in distortion"):
        S.distort("unknown-set", "0", img, rng, img)


def test_subset_and_supercategory_files(tmp_path):
    f = tmp_path / "pin125.txt"
    f.write_text("# PIN\nn01443537\n\nn01530575  # bird\n")
    assert PS.read_subset(f) == ["n01443537", "n01530575"]
    f.write_text("n01443537\ngoldfish\n")
    with pytest.raises(PinppError, match=r"pin125.txt: line 2 'goldfish' is not a wnid"):
        PS.read_subset(f)
    with pytest.raises(PinppError, match="not found; write one wnid per line"):
        PS.read_subset(tmp_path / "missing.txt")
    g = tmp_path / "super.csv"
    g.write_text("class,group\nn01443537,Fish\n")
    with pytest.raises(PinppError, match="expected a CSV with the header 'wnid,supercategory'"):
        PS.read_supercategories(g)
    g.write_text("wnid,supercategory\nn01443537,Fish\nn01443537,Bird\n")
    with pytest.raises(PinppError, match="row 3"):
        PS.read_supercategories(g)


def test_supercategory_logits_are_log_total_probability():
    z = torch.tensor([[1.0, 2.0, 0.5, -1.0]])
    m = PS.SuperCategoryLogits(FixedLogits(z[0].tolist()), [[0, 2], [1]])
    out = m(torch.zeros(1, 3, 4, 4))
    p = z.softmax(1)[0]
    assert torch.allclose(out.exp()[0], torch.stack([p[0] + p[2], p[1]]))
    assert torch.equal(PS.SubsetLogits(FixedLogits(z[0].tolist()), [3, 1])(torch.zeros(1, 3, 4, 4)), z[:, [3, 1]])


def test_subset_and_supercategory_records(tmp_path):
    classes = ["n00000001", "n00000002", "n00000003", "n00000004"]
    y = torch.tensor([0, 1, 2, 3, 1, 2])
    x = torch.rand(6, 3, 8, 8)
    cfg = EvalConfig(threats=("Linf-4/255",), mode="pgd", pgd_steps=2, clean_floor=0.0)
    model = FixedLogits([0.0, 3.0, 2.9, 0.0])  # predicts class 1; masked to {2, 3} it predicts 2
    recs = pd.DataFrame(PS.evaluate_subset(model, x, y, classes, ["n00000003", "n00000004"], cfg, tmp_path))
    assert sorted(recs["index"]) == [2, 3, 5] and recs.set_index("index").clean.to_dict() == {2: True, 3: False, 5: True}
    supers = {"n00000001": "A", "n00000002": "B", "n00000003": "B"}
    recs = pd.DataFrame(PS.evaluate_supercategories(model, x, y, classes, supers, cfg, tmp_path))
    assert sorted(recs["index"]) == [0, 1, 2, 4, 5] and recs.set_index("index").clean.to_dict() == {0: False, 1: True, 2: True, 4: True, 5: True}
    # the rehearsal's cap (RobustnessConfig.subset_images): every k-th listed image, k = ceil(listed / cap)
    capped = pd.DataFrame(PS.evaluate_subset(model, x, y, classes, ["n00000003", "n00000004"], cfg, tmp_path, images=2))
    assert sorted(capped["index"]) == [2, 5]  # of [2, 3, 5]: step 2
    capped = pd.DataFrame(PS.evaluate_supercategories(model, x, y, classes, supers, cfg, tmp_path, images=2))
    assert sorted(capped["index"]) == [0, 4] and capped.set_index("index").clean.to_dict() == {0: False, 4: True}  # step 3
    with pytest.raises(PinppError, match="not classes of the model"):
        PS.evaluate_subset(model, x, y, classes, ["n09999999"], cfg, tmp_path)
    weak = PS.evaluate_subset(FixedLogits([0.0, 0.0, 0.0, 9.0]), x, y, classes, ["n00000002", "n00000003"],
                              EvalConfig(threats=("Linf-4/255",), mode="pgd"), tmp_path / "w")
    assert all(r["robust"] is None and "not attacked" in r["note"] for r in weak)  # below the clean floor
    y0 = torch.tensor([0, 0, 1, 1, 0, 1])  # no image of the listed classes: warned, no records, an n = 0 row
    with pytest.warns(UserWarning, match="none of the 6 evaluation images"):
        assert PS.evaluate_subset(model, x, y0, classes, ["n00000003"], cfg, tmp_path / "e") == []
    with pytest.warns(UserWarning, match="super-category file: none"):
        assert PS.evaluate_supercategories(model, x, y0, classes, {"n00000004": "A"}, cfg, tmp_path / "e") == []
    t = RB.accuracy_table(pd.DataFrame([]), "Linf-4/255")
    assert list(t["n"]) == [0] * len(RB.MODELS) and t["clean"].isna().all()


def test_config_paths_default_under_the_data_root(tmp_path):
    rc = RB.RobustnessConfig()
    assert rc.path("imagenet_sketch", tmp_path) == tmp_path / "ood" / "imagenet_sketch"
    assert rc.path("pin_subset", tmp_path) == tmp_path / "ood" / "pin_subsets" / "pin125.txt"
    assert RB.RobustnessConfig(imagenet_c=str(tmp_path / "IC")).path("imagenet_c", "/x") == tmp_path / "IC"
    assert json.loads(json.dumps(RB.MVH_DATASETS)) and len(RB.MVH_DATASETS) == 17
    assert os.path.basename(str(rc.path("model_vs_human", tmp_path))) == "model_vs_human"


def test_capped_standins_list_every_pin_class_of_the_val_list(converted, synth, tmp_path):
    """Rehearsal (`images`): the OOD sets come from a few val images, the PIN class lists from every val class
    (a 16-image spread over 1000 classes left Tables 4/5 without a class)."""
    import json
    S.write_standins(converted / "val_1w" / "img", converted / "val_1w" / "val_list.txt",
                     synth / "class_supercategories.json", tmp_path, ("colour",), seed=0, images=2)
    sc = json.loads((synth / "class_supercategories.json").read_text())
    val_classes = {rel.split("/")[0] for rel, _ in val_dataset(converted).samples}
    want = sorted(w for w in val_classes if sc.get(w) in S.PIN_SUPERCATEGORIES or sc.get(w) == "generic")
    assert len(want) > 2 and PS.read_subset(tmp_path / "pin_subsets" / "pin125.txt") == want
    assert len({p.parent.name for p in (tmp_path / "imagenet_sketch" / "sketch").rglob("*.JPEG")}) <= 2


def test_shipped_pin158_list_is_partimagenets_classes_and_supercategories(tmp_path):
    """Table 5's default list: PartImageNet's 158 IN-1K classes with the class counts per super-category of the
    PartImageNet paper, read through the same reader as a user's file; the full profile points at it, smoke and
    rehearsal at their stand-ins."""
    from collections import Counter

    from pinpp_lib import config, imagenet
    d = PS.read_supercategories(PS.shipped("pin158"))
    assert Counter(d.values()) == {"Quadruped": 46, "Reptile": 20, "Car": 19, "Biped": 17, "Snake": 15, "Bird": 14,
                                   "Fish": 10, "Bicycle": 6, "Bottle": 5, "Boat": 4, "Aeroplane": 2}
    assert set(d) <= {c["wnid"] for c in imagenet.classes()} and set(d.values()) == set(S.PIN_SUPERCATEGORIES.values())
    assert d["n02071294"] == "Fish" and d["n02510455"] == "Quadruped"  # killer whale, giant panda (as PartImageNet)
    full = config.resolve("full", data_root=tmp_path)
    assert full.robustness.path("pin_supercategories", tmp_path) == PS.shipped("pin158")
    assert full.robustness.path("pin_subset", tmp_path) == tmp_path / "ood" / "pin_subsets" / "pin125.txt"
    smoke = config.resolve("smoke", data_root=tmp_path)
    assert smoke.robustness.path("pin_supercategories", tmp_path) == tmp_path / "ood" / "pin_subsets" / "pin_supercategories.csv"


def test_stand_in_pin_lists_give_generic_classes_pin_supercategories_in_turn():
    """Curated classes keep their own PIN super-category, other curated ones stay out, generated classes cycle
    through PIN's 11 (so a spread of a 1000-class val list always meets Tables 4/5's classes)."""
    sc = {"n1": "fish", "n2": "single", "n3": "generic", "n4": "generic", **{f"n9{i:02d}": "generic" for i in range(11)}}
    got = S.pin_stand_in_supercategories(sc, sorted(sc))
    assert got["n1"] == "Fish" and "n2" not in got and got["n3"] == "Quadruped" and got["n4"] == "Biped"
    assert [got[f"n9{i:02d}"] for i in range(11)] == list(S.PIN_SUPERCATEGORIES.values())[2:] + ["Quadruped", "Biped"]
    from pinpp_lib import store
    assert store.tensor_digest(torch.zeros(0, 3, 4, 4)) != store.tensor_digest(torch.zeros(0, 3, 4, 5))


def test_standard_autoattack_class_guard_matches_the_library():
    """The guard asks for what `pyautoattack`'s standard version really runs: FAB-T with 9 targets at every norm, so
    10 classes at L1 too (APGD-T's 5 L1 targets are not the binding stage)."""
    import torch.nn as nn
    from pyautoattack import AutoAttack

    from pinpp_lib import robust_eval
    for norm in ("Linf", "L2", "L1"):
        aa = AutoAttack(nn.Linear(2, 2), norm=norm, eps=0.1, version="standard", device="cpu", seed=0)
        assert set(aa.attacks_to_run) == {"apgd-ce", "apgd-t", "fab-t", "square"}
        assert robust_eval.STANDARD_TARGETS[norm] == {"apgd-t": aa.apgd_targeted.n_target_classes, "fab-t": aa.fab.n_target_classes}
        assert robust_eval.classes_needed(norm) == 10


def test_a_plus_square_resize_and_imagenet_c_zoom_are_the_authors_transforms(tmp_path):
    """eval_multi_dataset.py restated: ImageNet-A-Plus = Resize((256, 256)) + CenterCrop((224, 224)) + ToTensor;
    every other set, ImageNet-C's 224-px images included = Resize(int(224 / 0.875), bicubic) + CenterCrop(224)."""
    import numpy as np
    import torch
    from PIL import Image
    from torchvision import transforms

    from pinpp_lib import ood_sets
    rng = np.random.default_rng(0)
    for shape, name in (((300, 420, 3), "aplus.png"), ((224, 224, 3), "inc.png")):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(tmp_path / name)
    aplus = transforms.Compose([transforms.Resize((256, 256)), transforms.CenterCrop((224, 224)), transforms.ToTensor()])
    test = transforms.Compose([transforms.Resize(int(224 / 0.875), interpolation=transforms.InterpolationMode.BICUBIC),
                               transforms.CenterCrop(224), transforms.ToTensor()])
    ours = ood_sets.PathDataset([tmp_path / "aplus.png"], 224, 0.875, square=True)[0]
    torch.testing.assert_close(ours, aplus(Image.open(tmp_path / "aplus.png").convert("RGB")), rtol=0, atol=1e-6)
    ours = ood_sets.PathDataset([tmp_path / "inc.png"], 224, 0.875)[0]
    torch.testing.assert_close(ours, test(Image.open(tmp_path / "inc.png").convert("RGB")), rtol=0, atol=1e-6)
    from pinpp_lib.robustness import RobustnessConfig
    assert RobustnessConfig().imagenet_c_crop_pct == 0.875 and RobustnessConfig().square_resize == ("imagenet_a_plus",)
