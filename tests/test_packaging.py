"""`pip install .` from a read-only checkout: the build writes nothing into the source tree and the
wheel carries every subpackage and entry point (issue 12: setuptools wrote edgebit.egg-info there)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_wheel_builds_from_a_read_only_copy_without_writing_into_it(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "edgebit", src / "edgebit", ignore=shutil.ignore_patterns("__pycache__"))
    before = _tree(src)
    for path in [src, *src.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    out = tmp_path / "wheels"
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                               "--no-index", "-w", str(out), str(src)], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "PIP_NO_INPUT": "1"})
    finally:
        for path in [src, *src.rglob("*")]:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "deprecat" not in (proc.stdout + proc.stderr).lower()
    assert _tree(src) == before  # no build/, no *.egg-info
    [wheel] = out.glob("edgebit-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
        metadata = next(zf.read(n).decode() for n in names if n.endswith("METADATA"))
    assert {"edgebit/cli/__init__.py", "edgebit/mqtt/service.py", "edgebit/backends/__init__.py"} <= names
    # the bundled micro model is package data: `edgebit demo` works right after `pip install`
    assert "edgebit/models/edgebit-sensors.gguf" in names
    assert "edgebit=edgebit.cli:main" in entry_points.replace(" ", "") and "[edgebit.backends]" in entry_points
    assert "License-Expression: MIT" in metadata
