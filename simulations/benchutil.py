"""Shared bits of the benchmark scripts: the machine they ran on, the data folder."""
from __future__ import annotations

import os
import platform
from pathlib import Path

#: ``../shared/data`` beside the repository (where tests and benchmarks read real data)
SHARED_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"


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
