"""The README stays true: its demo output is what `make demo` prints, its Python example runs."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
README = (REPO_ROOT / "README.md").read_text()


def demo_block() -> str:
    """The first fenced block after the `make demo` explanation: the demo's real output."""
    start = README.index("What you get (real output):")
    return README[start:].split("```", 2)[1]


def table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if re.match(r"\| \d+ \|", line)]


@pytest.mark.slow
def test_the_readme_demo_output_is_what_make_demo_prints(tmp_path):
    make = (REPO_ROOT / "Makefile").read_text()
    command = re.search(r"^demo:.*\n\t(.*)$", make, re.M).group(1).split("$(BIN)/fedal ", 1)[1].split()
    proc = subprocess.run([sys.executable, "-m", "simulations.cli", *command, "--output-dir", str(tmp_path / "out")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = demo_block()
    assert table_lines(shown) and table_lines(shown) == table_lines(proc.stdout)
    for prefix in ("baseline random:",):
        line = next(l for l in proc.stdout.splitlines() if l.startswith(prefix))
        assert line in shown, line
    final = re.search(r"final: \d+ labels, accuracy [0-9.]+", proc.stdout).group(0)
    assert final in shown, final
    first = next(l for l in proc.stdout.splitlines() if l.startswith("fedal simulate:"))
    assert first in shown


def test_the_readme_python_example_runs(tmp_path, data_dir):
    code = README.split("```python", 1)[1].split("```", 1)[0]
    code = code.replace('"../shared/data"', repr(str(data_dir)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    accuracies = [float(x) for x in re.findall(r"accuracy (0\.\d+)", proc.stdout)]
    assert len(accuracies) >= 5 and accuracies[-1] > accuracies[0]
