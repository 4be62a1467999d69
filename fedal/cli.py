"""The ``fedal`` command.

Subcommands are named by reference (``"module:function"``) and imported only when
used, so the core never imports Flower or the apps built on it.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from fedal.exceptions import FedalError

# name -> (module with add_arguments(parser) and run(args) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("simulations.simulate", "run a federation on Flower's Simulation Engine"),
    "compare": ("simulations.compare", "compare strategies on the same federation over seeds"),
    "local": ("fedal.local", "on-device active learning (no federation): a strategy next to random"),
    "label": ("clients.labeling", "serve the labeling page for a client's pending queries"),
    "exchange": ("clients.exchange", "export a client's pending queries to files / import the filled CSV"),
    "split": ("fedal.sitedata", "write one data file per site (deployment: each site holds only its own data)"),
    "strategies": ("fedal.local", "list the registered query strategies"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedal", description="Federated and on-device active learning.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


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
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"fedal {name}", description=COMMANDS[name][1])
    getattr(module, f"add_{name}_arguments", getattr(module, "add_arguments", lambda p: None))(parser)
    args = parser.parse_args(argv[1:])
    run = getattr(module, f"run_{name}", None) or module.run
    try:
        return int(run(args) or 0)
    except FedalError as exc:
        print(f"fedal {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fedal {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
