"""The ``fedal`` command: the front door, above every part it runs.

Each subcommand is a pair of functions, one that adds its flags to a parser and one that
runs it; the modules that define them import their heavy parts (torch, Flower, Ray)
only when the command runs, so ``fedal --help`` is quick.
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from clients import exchange_command, gate, labeling, site_command
from fedal.exceptions import FedalError
from simulations import commands, compare, simulate


class Command(NamedTuple):
    """A subcommand: its one-line help, its flags, what it does (returns the exit status)."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {
    "simulate": Command("run a federation on Flower's Simulation Engine",
                        simulate.add_simulate_arguments, simulate.run_simulate),
    "compare": Command("compare strategies on the same federation over seeds",
                       compare.add_compare_arguments, compare.run_compare),
    "local": Command("on-device active learning (no federation): a strategy next to random",
                     commands.add_local_arguments, commands.run_local),
    "label": Command("serve the labeling page for a client's pending queries",
                     labeling.add_label_arguments, labeling.run_label),
    "site": Command("run a site on its own while the server is away: score, ask for labels, learn (offline budget)",
                    site_command.add_arguments, site_command.run),
    "exchange": Command("export a client's pending queries to files / import the filled CSV",
                        exchange_command.add_arguments, exchange_command.run),
    "gate": Command("a site's gate to the coordinator: only the apps the site accepted reach its SuperNode",
                    gate.add_arguments, gate.run),
    "scan": Command("read a site's folder of images (PNG, JPEG, TIFF, BMP, DICOM) and say what it found",
                    commands.add_scan_arguments, commands.run_scan),
    "split": Command("write one data file per site (deployment: each site holds only its own data)",
                     commands.add_split_arguments, commands.run_split),
    "strategies": Command("list the registered query strategies",
                          commands.add_strategies_arguments, commands.run_strategies),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedal", description="Federated and on-device active learning.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub.add_parser(name, help=command.help, add_help=False)
    return parser


def invoked_as() -> str:
    """The ``fedal`` command as this process was started, to print in what to run next: ``python -m
    simulations.cli`` with this interpreter, the script's path as typed (``.venv/bin/fedal``), or plain
    ``fedal`` when that name on PATH is this very script (or when called from Python)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name == __spec__.name:
        return f"{shlex.quote(sys.executable)} -m {spec.name}"
    script = sys.argv[0] if sys.argv else ""
    if Path(script).name != "fedal":
        return "fedal"
    on_path = shutil.which("fedal")
    if on_path and Path(on_path).resolve() == Path(script).resolve():
        return "fedal"
    return shlex.quote(script)


def main(argv: list[str] | None = None) -> int:
    """Run the ``fedal`` command; return its exit status (2 for a bad command or input).

    Parameters
    ----------
    argv : list of str, optional
        Arguments after ``fedal``; default ``sys.argv[1:]``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = _parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_usage(sys.stderr)
            print(f"fedal: error: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    name, command = argv[0], COMMANDS[argv[0]]
    parser = argparse.ArgumentParser(prog=f"fedal {name}", description=command.help)
    command.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    args.argv = argv  # the command as typed (what to run again, e.g. with --resume)
    args.prog = invoked_as()
    try:
        return int(command.run(args) or 0)
    except FedalError as exc:
        print(f"fedal {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fedal {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
