"""Shared bits of the benchmark scripts: the machine they ran on, the data folder."""
from __future__ import annotations

import os
import platform
from pathlib import Path

#: the repository's root folder
ROOT = Path(__file__).resolve().parents[2]
#: ``../shared/data`` beside the repository (where tests and benchmarks read real data)
SHARED_DATA_DIR = ROOT.parent / "shared" / "data"


def portable(record: dict) -> dict:
    """``record`` with every absolute path inside the repository's parent folder written
    relative to the repository (``/home/me/shared/data`` -> ``../shared/data``), so a
    committed result names no machine's folders."""
    out = {}
    for key, value in record.items():
        if isinstance(value, (str, Path)) and Path(value).is_absolute():
            path = Path(value).resolve()
            if path.is_relative_to(ROOT.parent):
                value = Path(os.path.relpath(path, ROOT)).as_posix()
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

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"federation setting (defaults: {defaults})")
    p.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    bad = [item for item in args.overrides if "=" not in item]
    if bad:
        p.error(f"--set takes KEY=VALUE, got {bad[0]!r}")
    return {**defaults, **dict(item.split("=", 1) for item in args.overrides)}, args.output_dir
