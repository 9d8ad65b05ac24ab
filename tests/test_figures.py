"""Issue 15 part 4: figures a vision researcher can trust — class names beside wnids, intervals where numbers are
compared, severity 0 = clean, legends off the data, and a figure that says when there is nothing to show."""
from __future__ import annotations

import pandas as pd
import pytest

from pinpp_lib import imagenet, plots, reporting
from pinpp_lib import robustness as rb
from pinpp_lib import tiny_experiments as tx


@pytest.fixture
def captured(monkeypatch):
    """The figures the plot functions save, kept open for inspection."""
    figs = []
    real = plots.save

    def keep(fig, path, dpi=plots.DPI):
        figs.append(fig)
        return real(fig, path, dpi)
    monkeypatch.setattr(plots, "save", keep)
    monkeypatch.setattr(plots.pyplot(), "close", lambda fig=None: None)
    return figs


def test_class_label_puts_the_name_beside_the_wnid():
    assert imagenet.class_label("n01440764") == "n01440764 tench"
    assert imagenet.class_label("n99999999") == "n99999999"


def _records():
    rows = []
    for model, hits in (("vanilla", [1, 0, 0, 0]), ("MPM", [1, 1, 0, 0])):
        for corruption, family in (("gaussian_noise", "noise"), ("fog", "weather")):
            for sev in (1, 2):
                rows += [{"model": model, "index": i, "label": 0, "corruption": corruption, "family": family,
                          "severity": sev, "correct": bool(h)} for i, h in enumerate(hits)]
    clean = [{"model": m, "index": i, "label": 0, "corruption": "none", "family": "clean", "severity": 0, "correct": True}
             for m in ("vanilla", "MPM") for i in range(4)]
    return pd.DataFrame(rows), pd.DataFrame(clean)


def test_corruption_curve_starts_at_the_clean_accuracy_with_wilson_intervals(tmp_path, captured):
    rec, clean = _records()
    curve = rb.corruption_curve(rec, clean)
    assert sorted(set(curve.severity)) == [0, 1, 2] and len(curve) == 2 * 2 * 3
    zero = curve[curve.severity == 0]
    assert (zero.accuracy == 100).all() and (zero.n == 4).all()
    one = curve[(curve.severity == 1) & (curve.model == "MPM") & (curve.family == "noise")].iloc[0]
    want = reporting.accuracy([True, True, False, False])  # the literal records of that point
    assert (one.accuracy, one.lo, one.hi, one.n) == (want.value, want.lo, want.hi, 4)
    rb.plot_corruptions(rec, tmp_path / "c.png", clean)
    fig = captured[-1]
    assert [ax.get_xlabel() for ax in fig.axes] == ["severity (0 = clean)"] * 2
    legend = fig.axes[-1].get_legend()
    assert "95% Wilson" in legend.get_title().get_text() and legend.get_bbox_to_anchor().x0 > fig.axes[-1].bbox.x1 - 1


def test_lambda_figure_labels_its_interval_band(tmp_path, captured):
    curve = pd.DataFrame({"lambda": [0.0, 1.0], "robust": [10.0, 20.0], "robust_lo": [5.0, 12.0], "robust_hi": [18.0, 30.0],
                          "n": [20, 20], "clean": [40.0, 45.0], "run": ["at_plain", "at_mpm"], "evaluation": ["AutoAttack"] * 2})
    tx.plot_lambda(curve, tmp_path / "l.png", "Linf-4/255")
    labels = [t.get_text() for t in captured[-1].axes[0].get_legend().get_texts()]
    assert any("95% Wilson interval (20 images)" in t for t in labels) and "clean" in labels
