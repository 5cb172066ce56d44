"""Every ```python block of the README and the user docs runs, so examples never rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def blocks() -> list[tuple[str, int, str]]:
    found = []
    for doc in DOCS:
        for i, m in enumerate(BLOCK.finditer(doc.read_text())):
            found.append((doc.name, i, m.group(1)))
    return found


@pytest.mark.parametrize(("doc", "index", "code"), blocks(), ids=lambda v: str(v)[:20])
def test_example_runs(tmp_path, doc, index, code):
    script = tmp_path / f"{Path(doc).stem}_{index}.py"
    script.write_text(code)
    env = dict(os.environ, KERAS_BACKEND="torch", OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, f"{doc} block {index} failed:\n{proc.stderr[-3000:]}"
