"""model-vs-human metrics on hand-made cases, the exclusion rules, aggregation and the 16-class mapping."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pinpp_lib import human_consistency as H
from pinpp_lib.fileio import PinppError


def test_kappa_cases():
    a = np.array([1, 1, 0, 0] * 25, bool)
    assert H.pair_metrics(a, a)["error_consistency"] == pytest.approx(1.0)           # identical errors
    b = np.array([1, 0, 1, 0] * 25, bool)
    m = H.pair_metrics(a, b)                                                           # independent errors
    assert m["observed_consistency"] == pytest.approx(0.5) and m["error_consistency"] == pytest.approx(0.0)
    assert H.pair_metrics(a, ~a)["error_consistency"] == pytest.approx(-1.0)        # opposite errors
    assert H.pair_metrics(a, b)["accuracy_difference"] == pytest.approx(0.0)
    assert H.pair_metrics(np.ones(10, bool), np.zeros(10, bool))["accuracy_difference"] == pytest.approx(1.0)
    # c_exp = 1 (both always right, or both always wrong): the toolbox's rule c_obs = 1 -> κ = 1
    assert H.pair_metrics(np.ones(4, bool), np.ones(4, bool))["error_consistency"] == 1.0
    assert H.pair_metrics(np.zeros(4, bool), np.zeros(4, bool))["error_consistency"] == 1.0


def _trials(rows):
    return pd.DataFrame(rows, columns=["dataset", "subject", "condition", "category", "response", "key"])


# A literal restatement of the toolbox (bethgelab/model-vs-human @79ed7cd): analyses.ErrorConsistency /
# SixteenClassAccuracyDifference per (decision maker, subject, condition); plot.format_benchmark_df's averaging;
# plot.get_raw_benchmark_df's pairs (humans: j > i only); plot.EXCLUDE_CONDITIONS.
TOOLBOX_EXCLUDE = {"colour": ["cr"], "contrast": ["c100", "c03", "c01"], "high-pass": ["inf", "0.55", "0.45", "0.4"],
                   "low-pass": ["0", "15", "40"], "phase-scrambling": ["0", "150", "180"], "power-equalisation": ["0"],
                   "false-colour": ["True"], "rotation": ["0"], "eidolonI": ["1-10-10", "64-10-10", "128-10-10"],
                   "eidolonII": ["1-3-10", "32-3-10", "64-3-10", "128-3-10"],
                   "eidolonIII": ["1-0-10", "16-0-10", "32-0-10", "64-0-10", "128-0-10"], "uniform-noise": ["0.0", "0.6", "0.9"]}


def _toolbox_pair(df1, df2):
    p1 = (df1.object_response == df1.category).sum() / len(df1)
    p2 = (df2.object_response == df2.category).sum() / len(df2)
    expected = p1 * p2 + (1 - p1) * (1 - p2)
    df1, df2 = df1.sort_values(by="image_id").reset_index(), df2.sort_values(by="image_id").reset_index()
    observed = ((df1.object_response == df1.category) == (df2.object_response == df2.category)).sum() / len(df1)
    kappa = 1.0 if observed == 1.0 else (observed - expected) / (1.0 - expected)
    return {"accuracy_difference": np.square(p1 - p2), "observed_consistency": observed, "error_consistency": kappa}


def _toolbox_benchmark(df, models):
    """df: subj, condition, image_id, object_response, category, dataset (one row per decision maker and image)."""
    rows, all_humans = [], set()
    for ds, d in df.groupby("dataset"):
        humans = sorted(set(d.subj) - set(models))  # the toolbox's decision makers are those of each dataset
        all_humans |= set(humans)
        d = d[~d.condition.isin(TOOLBOX_EXCLUDE.get(ds, []))]
        for group_1, same in ((models, False), (humans, True)):
            for i, g1 in enumerate(group_1):
                for j, g2 in enumerate(humans):
                    if (same and j <= i) or g1 == g2:
                        continue
                    for cond in sorted(d.condition.unique()):
                        r = _toolbox_pair(d[(d.subj == g1) & (d.condition == cond)], d[(d.subj == g2) & (d.condition == cond)])
                        rows += [{"model": g1, "human": g2, "dataset": ds, "metric": k, "value": v} for k, v in r.items()]
    r = pd.DataFrame(rows)
    r = r.groupby(["model", "human", "dataset", "metric"], as_index=False)["value"].mean()
    hum = r[r.model.isin(all_humans)].groupby(["dataset", "metric"], as_index=False)["value"].mean()
    hum = hum.groupby("metric")["value"].mean()
    mod = r[~r.model.isin(all_humans)].groupby(["model", "dataset", "metric"], as_index=False)["value"].mean()
    mod = mod.groupby(["model", "metric"])["value"].mean()
    return mod, hum


def test_kit_equals_the_toolbox_on_the_shipped_trials():
    """Three datasets of the real trials (one with excluded conditions whose raw strings differ from the toolbox's:
    '0.00' vs '0.0'), a model answering from a seeded draw: every benchmark number equals the restatement's."""
    trials = H.load_trials(datasets=["uniform-noise", "sketch", "false-colour"])
    rng = np.random.default_rng(0)
    keys = trials.drop_duplicates(["dataset", "key"])[["dataset", "key", "category", "condition"]].reset_index(drop=True)
    cats = sorted(H.human16_map())
    keys["decision"] = np.where(rng.random(len(keys)) < 0.6, keys["category"], rng.choice(cats, len(keys)))
    per, agg = H.model_vs_humans(keys, trials)
    _, ceiling = H.human_ceiling(trials)
    tb = pd.concat([trials.rename(columns={"subject": "subj", "response": "object_response", "key": "image_id"}),
                    keys.assign(subj="model").rename(columns={"decision": "object_response", "key": "image_id"})])
    tb = tb[["dataset", "subj", "condition", "image_id", "object_response", "category"]]
    mod, hum = _toolbox_benchmark(tb, ["model"])
    for m in H.METRICS:
        assert agg.loc["all", m] == pytest.approx(mod[("model", m)], abs=1e-12), m
        assert ceiling.loc["all", m] == pytest.approx(hum[m], abs=1e-12), m
    assert not set(per.condition) & {"0.0", "0.6", "0.9", "True"}  # excluded, read as the toolbox reads them
    ood = H.ood_accuracy(keys.assign(model="model"), trials)
    kept_keys = keys[~keys.apply(lambda r: r.condition in TOOLBOX_EXCLUDE.get(r.dataset, []), axis=1)]
    want = (kept_keys.decision == kept_keys.category).groupby(kept_keys.dataset).mean()
    assert ood["model"].to_dict() == pytest.approx(want.to_dict())


def test_exclusions_and_aggregation():
    rows = []
    for subj, correct in (("s1", [1, 1, 0, 0]), ("s2", [1, 0, 1, 0])):
        for cond in ("c100", "c10", "c01"):  # c100: control; c01: on the toolbox's list (humans < 0.2 on average)
            for k, ok in enumerate(correct):
                rows.append(("contrast", subj, cond, "dog", "dog" if ok else "cat", f"{cond}_{k}.png"))
    trials = _trials(rows)
    decisions = pd.DataFrame({"dataset": "contrast", "key": trials["key"].unique(), "decision": "dog"})
    decisions.loc[decisions.key.str.endswith(("_2.png", "_3.png")), "decision"] = "cat"   # model = s1's pattern
    per, agg = H.model_vs_humans(decisions, trials)
    assert set(per.condition) == {"c10"}                       # the toolbox's fixed list, whatever humans scored
    ec = per.set_index("subject")["error_consistency"]
    assert ec["s1"] == pytest.approx(1.0) and ec["s2"] == pytest.approx(0.0)
    assert agg.loc["contrast", "error_consistency"] == pytest.approx(0.5)  # mean over subjects
    assert agg.loc["all", "error_consistency"] == pytest.approx(0.5)
    with pytest.raises(PinppError, match="no model decision"):
        H.model_vs_humans(decisions.iloc[1:], trials)


def test_ceiling_counts_each_pair_of_subjects_once():
    rows = [("edge", s, "0", "dog", "dog" if ok else "cat", f"{k}.png")
            for s, pattern in (("a", [1, 1, 0, 0]), ("b", [1, 1, 0, 0]), ("c", [1, 0, 1, 0])) for k, ok in enumerate(pattern)]
    per, agg = H.human_ceiling(_trials(rows))
    assert list(zip(per.subject, per.other)) == [("a", "b"), ("a", "c"), ("b", "c")]
    ec = per.set_index(["subject", "other"])["error_consistency"]
    assert ec[("a", "b")] == pytest.approx(1.0) and ec[("a", "c")] == pytest.approx(0.0)
    assert agg.loc["all", "error_consistency"] == pytest.approx(1 / 3)  # the mean over the three pairs


def test_real_trials_ship_with_the_kit():
    t = H.load_trials()
    assert t.dataset.nunique() == 17 and len(t) == 85120
    assert str(H.data_root()).endswith("pinpp_lib/data/model_vs_human")  # the repo copy, not ../shared
    assert (H.data_root() / "LICENSE").exists()
    _, agg = H.human_ceiling(t[t.dataset.isin(["sketch", "contrast"])])
    assert 0.2 < agg.loc["all", "error_consistency"] < 0.8 and agg.loc["all", "accuracy_difference"] < 0.05


def test_decision_mapping():
    m = H.human16_map()
    assert len(m) == 16 and m["knife"] == [499]
    probs = np.full((2, 1000), 1e-4)
    probs[0, 499] = 0.9              # knife
    probs[1, m["dog"][3]] = 0.9     # a dog class
    assert H.decide16(probs) == ["knife", "dog"]
    sub = [499, 404, 8]             # a model over three IN-1K classes: knife, airplane, a bird
    assert H.decide16(np.array([[0.1, 0.8, 0.1]]), sub) == ["airplane"]
    with pytest.raises(PinppError, match="none of the model's classes"):
        H.decide16(np.ones((1, 2)), [0, 1])
    assert H.image_key("0001_cop_s02_c30_airplane_10_n02690373_12984.png") == "c30_airplane_10_n02690373_12984.png"
