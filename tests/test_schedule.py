"""tests/schedule.py as a pytest run sees it: files ordered by their tests' time,
measured or guessed, and each run's times kept for the next."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _project(tmp_path: Path) -> Path:
    """A project of three files: 100 quick unit tests, 2 end-to-end tests, one unit test."""
    (tmp_path / "tests" / "testing").mkdir(parents=True)
    (tmp_path / "tests" / "test_many.py").write_text(
        "import pytest\n\n@pytest.mark.parametrize('n', range(100))\ndef test_quick(n):\n    pass\n")
    (tmp_path / "tests" / "testing" / "test_few.py").write_text(
        "def test_one():\n    pass\n\ndef test_two():\n    pass\n")
    # 1.5 s: under a heavily loaded machine the 100 quick tests together took over 0.5 s.
    (tmp_path / "tests" / "test_one.py").write_text("import time\n\ndef test_slow():\n    time.sleep(1.5)\n")
    return tmp_path


def _pytest(project: Path, *args: str) -> list[str]:
    """The files of the run's tests, in the order pytest ran or collected them."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.schedule",
                           "-q", "--rootdir", str(project), *args, "tests"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    files = [line.split("::")[0] for line in done.stdout.splitlines() if "::" in line]
    return [f for i, f in enumerate(files) if i == 0 or files[i - 1] != f]


def test_files_go_longest_first_guessed_then_measured(tmp_path):
    """Unmeasured, the end-to-end file goes first (a second a test), the unit files by
    their count; collecting records nothing, a run each test's time, and the next
    run orders by it."""
    project = _project(tmp_path)
    assert _pytest(project, "--collect-only") == [
        "tests/testing/test_few.py", "tests/test_many.py", "tests/test_one.py"]
    assert not (project / ".pytest_cache" / "v" / "bridged" / "test_seconds").exists()
    _pytest(project)
    seconds = json.loads((project / ".pytest_cache" / "v" / "bridged" / "test_seconds").read_text())
    assert seconds["tests/test_one.py::test_slow"] >= 1.5
    assert len(seconds) == 103
    assert _pytest(project, "--collect-only")[0] == "tests/test_one.py"  # 1.5 s, the others ~0


def test_a_fresh_clone_takes_unmeasured_files_times_from_the_table(tmp_path):
    """No measurements yet: a file tests/file_seconds.json names goes by its figure there (the quick
    unit file before the end-to-end one), files it does not name by the estimate; a file with
    measurements goes by them, not by the table."""
    project = _project(tmp_path)
    (project / "tests" / "file_seconds.json").write_text(json.dumps({"tests/test_many.py": 30.0}))
    assert _pytest(project, "--collect-only") == [
        "tests/test_many.py", "tests/testing/test_few.py", "tests/test_one.py"]
    cache = project / ".pytest_cache" / "v" / "bridged"
    cache.mkdir(parents=True)
    measured = {f"tests/test_many.py::test_quick[{n}]": 0.001 for n in range(100)}
    (cache / "test_seconds").write_text(json.dumps({**measured, "tests/test_one.py::test_slow": 3.0}))
    assert _pytest(project, "--collect-only") == [
        "tests/test_one.py", "tests/testing/test_few.py", "tests/test_many.py"]  # 3 s, 2 guessed, 0.1 s
