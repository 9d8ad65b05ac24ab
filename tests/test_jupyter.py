"""Issue 15: the kit as a researcher opens it — paths from the checkout a notebook sits in, one line when notebook 00
has not run, result files readable by others, notebook metadata that JupyterLab leaves unmodified."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from pinpp_lib import config, fileio, runmeta
from pinpp_lib.fileio import PinppError

ROOT = Path(__file__).resolve().parents[1]


def _fake_checkout(tmp_path: Path) -> Path:
    clone = tmp_path / "clone2"
    (clone / "pinpp_lib").mkdir(parents=True)
    (clone / "pinpp_lib" / "__init__.py").write_text("")
    (clone / "notebooks").mkdir()
    return clone


def test_default_paths_follow_the_checkout_of_the_current_folder(tmp_path, monkeypatch):
    """A second clone sharing this environment: a notebook run in its notebooks/ folder uses its data/ and results/,
    and is told once that the imported code is the other checkout's."""
    monkeypatch.delenv("PINPP_ROOT", raising=False)
    clone = _fake_checkout(tmp_path)
    monkeypatch.chdir(clone / "notebooks")
    assert runmeta.repo_root() == clone.resolve()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = config.resolve("smoke")
    assert s.paths.data_root == clone.resolve() / "data" / "smoke" and s.paths.results == clone.resolve() / "results"
    msgs = [str(w.message) for w in caught if "pinpp_lib is imported from" in str(w.message)]
    assert len(msgs) == 1 and str(clone.resolve()) in msgs[0] and str(runmeta.code_root()) in msgs[0]
    monkeypatch.chdir(tmp_path)  # outside any checkout: the package's own
    assert runmeta.repo_root() == runmeta.code_root() == ROOT
    monkeypatch.setenv("PINPP_ROOT", str(clone))
    assert runmeta.repo_root() == clone.resolve() and runmeta.code_mismatch() == ""


def test_a_notebook_opened_before_00_says_run_00_first(tmp_path):
    s = config.resolve("smoke", data_root=tmp_path / "d")
    for needs in ("release", "converted"):
        with pytest.raises(PinppError, match=r"not found — run notebook 00 first \(`./run_all.sh --profile smoke "
                                             r"--data-root .* --only 00`; it generates this profile's synthetic data"):
            s.ready(needs)
    full = config.resolve("full", data_root=tmp_path / "f")
    with pytest.raises(PinppError, match=r"converted: not found — run notebook 00 first .*it converts the release at"):
        full.ready("converted")
    assert full.ready("release") == f"data → {tmp_path / 'f'}, results → {full.paths.results}"  # the release: its own message
    assert s.ready() == f"data → {tmp_path / 'd'}, results → {s.paths.results}"


def test_result_files_are_readable_by_others(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    fileio.write_text(tmp_path / "t.md", "x")
    path, _ = fileio.write_hashed(tmp_path, lambda sha: f"w_{sha[:8]}.pt", lambda p: p.write_bytes(b"1"))
    for p in (tmp_path / "t.md", path):
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask


NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.fixture(scope="module")
def server():
    """A Jupyter server on this checkout (what JupyterLab talks to), reached through its REST API."""
    import secrets
    import socket
    import time

    import requests
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = secrets.token_hex(8)
    proc = subprocess.Popen([sys.executable, "-m", "jupyter_server", "--no-browser", f"--port={port}", "--ip=127.0.0.1", "--allow-root",
                             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={ROOT}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base, headers = f"http://127.0.0.1:{port}", {"Authorization": f"token {token}"}
    try:
        for _ in range(120):
            try:
                if requests.get(f"{base}/api/status", headers=headers, timeout=2).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        else:
            pytest.fail("jupyter server did not start")
        yield lambda method, path, **kw: requests.request(method, f"{base}{path}", headers=headers, timeout=60, **kw)
    finally:
        proc.terminate()
        proc.wait(30)


def test_every_notebook_opens_unmodified_with_its_kernel(server):
    """Through the server API, as JupyterLab opens a notebook: the kernel its metadata names exists and starts, the
    kernel's language_info is the notebook's (JupyterLab writes it on connect, which would mark the notebook
    modified), saving the loaded notebook gives the same bytes, and it opens on parameters then its title."""
    import nbformat
    from jupyter_client.manager import start_new_kernel
    specs = server("GET", "/api/kernelspecs").json()["kernelspecs"]
    names = {nb.name: json_of(nb)["metadata"]["kernelspec"]["name"] for nb in NOTEBOOKS}
    assert set(names.values()) == {"pinpp"} and specs["pinpp"]["spec"]["display_name"] == "Python 3 (pinpp)"
    km, kc = start_new_kernel(kernel_name="pinpp")
    try:
        kernel_info = kc.kernel_info(reply=True, timeout=60)["content"]["language_info"]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    for nb in NOTEBOOKS:
        model = server("GET", f"/api/contents/notebooks/{nb.name}").json()
        meta = model["content"]["metadata"]
        ours = dict(meta["language_info"])
        theirs = dict(kernel_info)
        # the patch release of Python may differ between machines; the rest must match exactly
        assert ours.pop("version").rsplit(".", 1)[0] == theirs.pop("version").rsplit(".", 1)[0], nb.name
        assert ours == theirs, nb.name
        text = nb.read_text()
        # nbformat.write (the server's save) = writes + a final newline
        assert nbformat.writes(nbformat.reads(text, as_version=4)) + "\n" == text, f"{nb.name}: saving it would change it"
        cells = model["content"]["cells"]
        assert all(c.get("id") for c in cells), nb.name
        assert cells[0]["metadata"].get("tags") == ["parameters"] and "PROFILE = " in cells[0]["source"]
        assert cells[1]["cell_type"] == "markdown" and cells[1]["source"].startswith(f"# {nb.name[:2]} · "), nb.name
        for field in ("**Regenerates:**", "**Command:**", "**Runtime:**", "**Inputs:**", "**Outputs:**"):
            assert field in cells[1]["source"], (nb.name, field)
        assert "settings.ready(" in "".join(c["source"] for c in cells[2:4]), nb.name
        session = server("POST", "/api/sessions", json={"path": f"notebooks/{nb.name}", "type": "notebook",
                                                        "kernel": {"name": meta["kernelspec"]["name"]}})
        assert session.status_code == 201, session.text
        assert session.json()["kernel"]["name"] == "pinpp"
        server("DELETE", f"/api/sessions/{session.json()['id']}")


def json_of(path: Path) -> dict:
    import json
    return json.loads(path.read_text())
