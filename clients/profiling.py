"""Where a site's time goes: every message its ClientApp handles, profiled, when ``$FEDAL_PROFILE_DIR`` is set.

A round that takes seconds on a device can spend them in Flower (polls, a new process per message)
or in fedal (the site's database, features, training). With ``FEDAL_PROFILE_DIR=<folder>`` in the
SuperNode's environment (or a simulation's), each message the ClientApp handles adds

* a line to ``<folder>/calls.jsonl``: the process id, the message type and round, when the process
  started, when the call started and how long it took (so what came before the call, the process start
  and imports, can be told from the call itself);
* its cProfile to ``<folder>/client-<pid>.prof`` (one file per process, every call it handled; merge them
  with ``pstats.Stats(*files)``).

Without the variable nothing is measured or written. Nothing of this leaves the device.
"""
from __future__ import annotations

import cProfile
import json
import os
import time
from functools import cache
from pathlib import Path

from fedal.flower import protocol

PROFILE_ENV = "FEDAL_PROFILE_DIR"
_profile: cProfile.Profile | None = None  # this process's, over every call it handled


@cache
def process_started_at() -> float | None:
    """When this process started (``time.time()`` seconds; Linux ``/proc``), None where that cannot be read."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def profiling_mod(msg, context, call_next):
    """Flower mod: with ``$FEDAL_PROFILE_DIR`` set, the call under cProfile and its times recorded there."""
    global _profile
    folder = os.environ.get(PROFILE_ENV)
    if not folder:
        return call_next(msg, context)
    if _profile is None:
        _profile = cProfile.Profile()
    started, clock = time.time(), time.perf_counter()
    _profile.enable()
    try:
        return call_next(msg, context)
    finally:
        _profile.disable()
        seconds = time.perf_counter() - clock
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        _profile.dump_stats(out / f"client-{os.getpid()}.prof")
        config = msg.content[protocol.CONFIG] if msg.has_content() and protocol.CONFIG in msg.content else {}
        line = {"pid": os.getpid(), "type": msg.metadata.message_type, "round": config.get(protocol.SERVER_ROUND),
                "process_started": process_started_at(), "call_started": started, "call_seconds": seconds}
        with open(out / "calls.jsonl", "a") as fh:  # one short line per call: appends do not interleave
            fh.write(json.dumps(line) + "\n")
