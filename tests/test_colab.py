"""The workshop notebook's first cell on Colab, simulated: a fresh runtime clones the repository, a restarted one
(the clone already there) does not clone again, and neither replaces Colab's own torch. git and pip are stubbed."""

import json
import os
import shutil
import subprocess
import sys
import types

import pytest

from conftest import ROOT


def colab_block():
    """The part of the first code cell that runs on Colab, with REPO_URL set as a teacher would."""
    cells = json.load(open(os.path.join(ROOT, "workshop", "workshop.ipynb"), encoding="utf-8"))["cells"]
    src = "".join(next(c for c in cells if c["cell_type"] == "code")["source"])
    block = src[: src.index("sys.path.insert")]
    return block.replace("https://github.com/YOUR-ORG/codebook-features", "https://example.org/codebook-features.git")


@pytest.mark.parametrize("restarted", [False, True])
def test_colab_cell_clones_once_and_keeps_colab_torch(restarted, tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, check=False):
        calls.append(cmd)
        if cmd[:2] == ["git", "clone"]:
            os.makedirs(cmd[-1])
            shutil.copy(os.path.join(ROOT, "requirements.txt"), cmd[-1])
        return subprocess.CompletedProcess(cmd, 0)

    if restarted:
        os.makedirs(tmp_path / "codebook-features")
        shutil.copy(os.path.join(ROOT, "requirements.txt"), tmp_path / "codebook-features")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setattr(subprocess, "run", fake_run)
    exec(colab_block(), {"__name__": "__main__"})
    assert os.getcwd() == str(tmp_path / "codebook-features")
    clones = [c for c in calls if c[:2] == ["git", "clone"]]
    assert len(clones) == (0 if restarted else 1)
    (pip,) = [c for c in calls if "pip" in c]
    assert "numpy" in pip and "tqdm" in pip
    assert not any(a.startswith("torch") for a in pip[pip.index("install"):]), pip  # Colab's torch stays


def test_colab_cell_stops_with_one_line_until_repo_url_is_set(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    block = colab_block().replace("https://example.org/codebook-features.git", "https://github.com/YOUR-ORG/x")
    with pytest.raises(SystemExit, match="^error: set REPO_URL"):
        exec(block, {"__name__": "__main__"})
