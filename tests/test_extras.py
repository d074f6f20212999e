"""The core without the optional extras: nothing imports FastAPI, uvicorn or llguidance until asked,
and asking says which extra to install."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BLOCK = "import sys\nfor name in ('fastapi', 'uvicorn', 'starlette', 'llguidance'):\n    sys.modules[name] = None\n"


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=120)


def test_core_imports_without_the_http_extra(tiny_model: Path) -> None:
    proc = run("import edgebit, edgebit.cli, edgebit.cli.serve, edgebit.engine, edgebit.structured, edgebit.http\n"
               f"m = edgebit.load({str(tiny_model)!r}, backend='reference')\n"
               "print(m.complete(prompt='x', max_tokens=2, temperature=0).completion_tokens >= 0)\n"
               "from edgebit.structured import GrammarFactory\n"
               "try:\n    GrammarFactory(m.tokenizer, m.config.n_vocab).json_schema({'type': 'object'})\n"
               "except ImportError as exc:\n    print(exc)\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["True", "structured outputs need llguidance: pip install 'edgebit[http]'"]


def test_serve_http_without_the_extra_says_what_to_install(tiny_model: Path) -> None:
    proc = run(f"from edgebit.cli import main\nmain(['serve', {str(tiny_model)!r}, '--http'])\n")
    assert proc.returncode == 1
    assert "pip install 'edgebit[http]'" in proc.stderr
