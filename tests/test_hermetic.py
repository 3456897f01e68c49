"""The tests need nothing beside the repository: a slice of them (every bad-input case that reads a language
model's data or a prepared dataset, and one test of each kind that once read ../shared/data) runs in a copy of
the tracked files placed where no ../shared is beside it, with empty tokenizer caches and the hub offline, and
every selected test must pass: none may fail, error or skip."""

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from conftest import ROOT
from test_bad_input import PREPARE, SAMPLE, TOPICS

SLICE = [
    "tests/test_bad_input.py::test_sample",  # the world fixture: a language-model run, its data and topics
    "tests/test_bad_input.py::test_topics",
    "tests/test_bad_input.py::test_prepare",
    "tests/test_data.py::test_gpt2_tokenizer_rejects_another_file",
    "tests/test_data.py::test_prepare_wikitext_splits_at_article_boundaries",
    "tests/test_data.py::test_lm_eval_windows_are_fixed",
    "tests/test_analyze.py::test_cli_language_model_regex_concepts",
    "tests/test_topics.py::test_cli_language_model_topics_and_ablation",
]
CHILD = "CODEBOOK_FEATURES_HERMETIC_COPY"  # set in the copy's run, so this test never runs itself there


def tracked_files():
    """The repository's files as a clone has them (tracked, plus new files git does not ignore), relative to
    ROOT; without git, every file outside .git and caches."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout
        return [p for p in out.decode().split("\0") if p and os.path.isfile(os.path.join(ROOT, p))]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout
        files = []
        for d, dirs, names in os.walk(ROOT):
            dirs[:] = [x for x in dirs if x not in (".git", "__pycache__", ".pytest_cache", ".ipynb_checkpoints")]
            files += [os.path.relpath(os.path.join(d, n), ROOT) for n in names]
        return files


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get(CHILD) == "1", reason="this run is the hermetic copy's own")
def test_slice_passes_without_shared(tmp_path):
    repo = tmp_path / "repo"
    for rel in tracked_files():
        os.makedirs(repo / os.path.dirname(rel), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), repo / rel)
    assert not (tmp_path / "shared").exists() and (repo / "tests" / "test_bad_input.py").is_file()
    (tmp_path / "cache").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({CHILD: "1", "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1", "PYTHONHASHSEED": "0",
                "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "cache"),
                "TIKTOKEN_CACHE_DIR": str(tmp_path / "cache"), "PYTHONDONTWRITEBYTECODE": "1"})
    report = tmp_path / "report.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *SLICE]
    r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    cases = ET.parse(report).getroot().iter("testcase")
    ran = {}
    for case in cases:
        bad = [c.tag for c in case if c.tag in ("failure", "error", "skipped")]
        assert not bad, (case.get("classname"), case.get("name"), bad, [c.get("message") for c in case])
        ran[case.get("classname")] = ran.get(case.get("classname"), 0) + 1
    assert set(ran) == {"tests.test_bad_input", "tests.test_data", "tests.test_analyze", "tests.test_topics"}, ran
    assert ran["tests.test_bad_input"] == len(SAMPLE) + len(TOPICS) + len(PREPARE) and ran["tests.test_data"] == 3, ran
