"""Tier 3 (`./run_tests.sh -m slow`): the same inputs give the same tables (issue 13).

Notebook 07 (few-shot: synthetic data generated from nothing, training, stored episodes) runs twice from two
empty data folders; every CSV table and per-item record it writes must be byte-identical.
"""
from __future__ import annotations

from pathlib import Path

import papermill as pm
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _outputs(results: Path) -> dict[str, bytes]:
    return {str(p.relative_to(results)): p.read_bytes() for p in sorted(results.rglob("*.csv")) + sorted(results.rglob("*.csv.gz"))}


def test_few_shot_notebook_twice_gives_identical_tables(tmp_path):
    nb = ROOT / "notebooks" / "07_few_shot.ipynb"
    runs = []
    for k in (1, 2):
        data, results = tmp_path / f"data{k}", tmp_path / f"results{k}"
        pm.execute_notebook(str(nb), str(tmp_path / f"run{k}.ipynb"), parameters={"DATA_ROOT": str(data), "RESULTS_DIR": str(results)},
                            kernel_name="pinpp", cwd=str(ROOT / "notebooks"), progress_bar=False)
        runs.append(_outputs(results))
    assert runs[0].keys() == runs[1].keys() and runs[0]
    differ = [name for name in runs[0] if runs[0][name] != runs[1][name]]
    assert not differ, f"differ between two runs: {differ}"
