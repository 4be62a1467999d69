"""Shared bits of the benchmark scripts: the machine they ran on, the data folder."""
from __future__ import annotations

import os
import platform
from pathlib import Path

#: the repository's root folder
ROOT = Path(__file__).resolve().parents[2]
#: ``../shared/data`` beside the repository (where tests and benchmarks read real data)
SHARED_DATA_DIR = ROOT.parent / "shared" / "data"


def portable(record: dict, root: Path = ROOT) -> dict:
    """``record`` with every absolute path inside the parent folder of the repository ``root``
    written relative to the repository (``/home/me/shared/data`` -> ``../shared/data``), so a
    committed result names no machine's folders. Links are not followed: ``../shared`` may be a
    link to a folder elsewhere."""
    out = {}
    for key, value in record.items():
        if isinstance(value, (str, Path)) and Path(value).is_absolute():
            path = Path(os.path.abspath(value))
            if path.is_relative_to(Path(os.path.abspath(root)).parent):
                value = Path(os.path.relpath(path, os.path.abspath(root))).as_posix()
        out[key] = value
    return out


def machine_info() -> dict:
    """CPU count and model, library versions and the load average, for a benchmark's record."""
    import numpy as np
    import sklearn
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": cpu, "python": platform.python_version(),
            "numpy": np.__version__, "torch": torch.__version__, "sklearn": sklearn.__version__,
            "platform": platform.platform(), "load_average": [round(x, 2) for x in os.getloadavg()]}


def federation_settings(argv: list[str] | None, description: str, defaults: dict) -> tuple[dict, str]:
    """Parse a federation benchmark's ``--set KEY=VALUE`` overrides and ``--output-dir``.

    Returns the settings (``defaults`` updated by the overrides) and the output folder.
    """
    import argparse

    from fedal.config import parse_assignments
    from fedal.exceptions import ConfigError

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"federation setting (defaults: {defaults})")
    p.add_argument("--output-dir", default=str(ROOT / "simulations" / "results"))
    args = p.parse_args(argv)
    try:
        overrides = parse_assignments(args.overrides)
    except ConfigError as exc:
        p.error(str(exc))
    return {**defaults, **overrides}, args.output_dir


def command_line(module: str, argv: list[str] | None) -> str:
    """The command that reproduces a benchmark run: ``python -m <module>`` and its arguments."""
    import sys

    return " ".join(["python -m", module, *(argv if argv is not None else sys.argv[1:])])


def save_result(out_dir, name: str, record: dict, text: str) -> None:
    """Write a benchmark's ``record`` to ``<out_dir>/<name>.json`` and its table ``text`` to ``<name>.md``; print it."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / f"{name}.md").write_text(text + "\n")
    print(text)
