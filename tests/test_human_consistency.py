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
    assert np.isnan(H.pair_metrics(np.ones(4, bool), np.ones(4, bool))["error_consistency"])  # c_exp = 1


def _trials(rows):
    return pd.DataFrame(rows, columns=["dataset", "subject", "condition", "category", "response", "key"])


def test_exclusions_and_aggregation():
    rows = []
    for subj, correct in (("s1", [1, 1, 0, 0]), ("s2", [1, 0, 1, 0])):
        for cond in ("c100", "c10", "c01"):  # c100: control; c01: humans at 0 % (< 0.2)
            for k, ok in enumerate(correct):
                good = cond != "c01" and ok
                rows.append(("contrast", subj, cond, "dog", "dog" if good else "cat", f"{cond}_{k}.png"))
    trials = _trials(rows)
    decisions = pd.DataFrame({"dataset": "contrast", "key": trials["key"].unique(), "decision": "dog"})
    decisions.loc[decisions.key.str.endswith(("_2.png", "_3.png")), "decision"] = "cat"   # model = s1's pattern
    per, agg = H.model_vs_humans(decisions, trials)
    assert set(per.condition) == {"c10"}                       # control and < 0.2 conditions excluded
    ec = per.set_index("subject")["error_consistency"]
    assert ec["s1"] == pytest.approx(1.0) and ec["s2"] == pytest.approx(0.0)
    assert agg.loc["contrast", "error_consistency"] == pytest.approx(0.5)  # mean over subjects
    assert agg.loc["all", "error_consistency"] == pytest.approx(0.5)
    with pytest.raises(PinppError, match="no model decision"):
        H.model_vs_humans(decisions.iloc[1:], trials)


def test_ceiling_pairs_subjects_on_shared_images():
    rows = [("edge", s, "0", "dog", "dog" if ok else "cat", f"{k}.png")
            for s, pattern in (("a", [1, 1, 0, 0]), ("b", [1, 1, 0, 0]), ("c", [1, 0, 1, 0])) for k, ok in enumerate(pattern)]
    per, agg = H.human_ceiling(_trials(rows))
    ec = per.set_index("subject")["error_consistency"]
    assert ec["a"] == pytest.approx(0.5) and ec["c"] == pytest.approx(0.0)  # a: mean of κ(b,a)=1 and κ(c,a)=0


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
