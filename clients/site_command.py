"""``fedal site``: the site's own loop beside its SuperNode, asking for labels while the server is away.

Flags and printing; the work is :class:`clients.offline.OfflineSite`, imported when the command runs
(``fedal --help`` stays quick).
"""
from __future__ import annotations

import argparse
import math
import re
import signal
import sys
import time
from pathlib import Path

from fedal.exceptions import ConfigError

#: seconds between two steps of ``fedal site`` (default)
DEFAULT_EVERY_S = 5.0
#: offline requests waiting for an answer at once (default; the same as :data:`clients.offline.DEFAULT_BATCH`)
DEFAULT_BATCH = 5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of ``fedal site`` to ``parser``."""
    parser.add_argument("--state-dir", required=True, help="the SuperNode's state-dir (holds client-<id>.db)")
    parser.add_argument("--client-id", type=int, required=True, help="the SuperNode's client-id")
    parser.add_argument("--every", type=float, default=DEFAULT_EVERY_S,
                        help=f"seconds between two looks at the site (default {DEFAULT_EVERY_S:g})")
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH,
                        help=f"most offline requests waiting for an answer at once (default {DEFAULT_BATCH})")
    parser.add_argument("--once", action="store_true", help="one look, then exit (e.g. from cron)")


def _say(out: dict) -> str:
    state = out["state"]
    clock = f" ({out['clock_problem']})" if out.get("clock_problem") else ""
    if state == "connected":
        return f"connected (model of round {out['round']}); {out['labeled']} labels"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(out["offline_since"])) if out["offline_since"] else "?"
    what = {"offline": "asking on its own", "spent": "offline budget spent: no new requests, answers wait for the "
            "server", "expired": "offline longer than offline-max-hours: no new requests"}[state]
    return (f"offline since {since}{clock} (model of round {out['round']}): {what}; asked {out['asked']} now, "
            f"{out['spent']} of {out['budget']} offline labels used, {out['waiting']} waiting; {out['labeled']} labels")


def check_state_dir(state_dir: str, client_id: int) -> Path:
    """The ``--state-dir`` folder, if it holds the state of client ``client_id`` (its database or its stored global
    model); else :class:`ConfigError` naming what is wrong (a typo would otherwise wait for ever)."""
    from fedal.offline import snapshot_path

    folder = Path(state_dir).expanduser()
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise ConfigError(f"--state-dir {folder} {what}; give the state-dir of the SuperNode's node config (the folder "
                          f"that holds client-{client_id}.db)")
    if (folder / f"client-{client_id}.db").is_file() or snapshot_path(folder, client_id).is_file():
        return folder
    others = sorted({int(m.group(1)) for f in folder.glob("client-*.db")
                     if (m := re.fullmatch(r"client-(\d+)\.db", f.name))})
    hint = (f"it holds the state of client(s) {', '.join(map(str, others))}: check --client-id" if others else
            "check --state-dir and --client-id against the SuperNode's node config; if they are right, let the "
            "SuperNode take part in one round first (both files appear with its first train message)")
    raise ConfigError(f"--state-dir {folder} holds no state of client {client_id}: no client database "
                      f"client-{client_id}.db and no stored global model client-{client_id}.global.npz; {hint}")


def run(args: argparse.Namespace) -> int:
    """Run ``fedal site`` with the parsed ``args`` until Ctrl-C / SIGTERM (or one step with ``--once``)."""
    if not (args.every > 0 and math.isfinite(args.every)):
        raise ConfigError(f"--every must be a number of seconds > 0, got {args.every}")
    folder = check_state_dir(args.state_dir, args.client_id)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unwind: the database is closed in `finally`
    from clients.offline import OfflineSite, site_lock
    from fedal.offline import snapshot_path

    site = OfflineSite(folder, args.client_id, batch=args.batch)
    with site_lock(folder, args.client_id):  # one loop per site: a second one is refused, naming this one's pid
        if not args.once and not site.path.is_file():  # its database is there, its first global model not yet
            print(f"waiting for the first global model ({snapshot_path(folder, args.client_id)} appears with the "
                  "SuperNode's first train message)", flush=True)
            while not site.path.is_file():
                time.sleep(args.every)
        last = None
        try:
            while True:
                out = site.step()
                line = _say(out)
                if line != last:
                    print(time.strftime("%H:%M:%S ") + line, flush=True)
                    last = line
                if args.once:
                    return 0
                time.sleep(args.every)
        finally:
            site.close()
