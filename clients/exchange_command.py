"""``fedal exchange``: a site's pending requests to files and the answers back, as CSV or Label Studio JSON."""
from __future__ import annotations

import argparse
from pathlib import Path

from clients.exchange import CLASSES_CSV, ExchangeError, export_requests, import_answers
from clients.labelstudio import LABEL_CONFIG, TASKS_JSON, export_tasks, import_export
from clients.node import open_site_pool

FORMATS = ("csv", "label-studio")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of ``fedal exchange`` to ``parser``."""
    parser.add_argument("action", choices=("export", "import"), help="export pending queries, or import answers")
    parser.add_argument("--state-dir", required=True, help="the SuperNode's state-dir (holds client-<id>.db)")
    parser.add_argument("--client-id", type=int, required=True, help="the SuperNode's client-id")
    parser.add_argument("--data-path", required=True, help="the site's data file (as in the node config)")
    parser.add_argument("--format", choices=FORMATS, default="csv",
                        help="export: csv (requests.csv + PNGs) or label-studio (tasks.json, label_config.xml, PNGs)")
    parser.add_argument("--folder", help="export: the folder to write into")
    parser.add_argument("--csv", help="import: the filled requests CSV")
    parser.add_argument("--json", help="import: a Label Studio JSON export (Export -> JSON)")
    parser.add_argument("--labeler", default="", help="import: name recorded with the labels (default the file name)")


def run(args: argparse.Namespace) -> int:
    """Export or import as the parsed ``args`` say; print what happened."""
    from fedal.sitedata import load_site

    data = load_site(args.data_path, args.client_id)
    with open_site_pool(args.state_dir, args.client_id, data, create=False) as pool:
        if args.action == "export":
            if not args.folder:
                raise ExchangeError("export needs --folder (where to write the requests and the images)")
            pending = len(pool.requests("pending"))
            if args.format == "label-studio":
                path = export_tasks(pool, data, args.folder)
                print(f"{pending} pending request(s) written to {path} as Label Studio tasks; create a project with "
                      f"{Path(args.folder) / LABEL_CONFIG}, serve {args.folder} as local files, import {TASKS_JSON}, "
                      "label, then Export -> JSON and import it with --json")
            else:
                path = export_requests(pool, data, args.folder)
                print(f"{pending} pending request(s) written to {path}; "
                      f"fill the label column (classes in {Path(args.folder) / CLASSES_CSV}) and import it")
            return 0
        if bool(args.csv) == bool(args.json):
            raise ExchangeError("import needs --csv (a filled requests CSV) or --json (a Label Studio export)")
        if args.json:
            result = import_export(pool, data, args.json, source=f"label-studio:{args.labeler}" if args.labeler else None)
        else:
            result = import_answers(pool, args.csv, source=f"file:{args.labeler}" if args.labeler else None)
        blank = "task(s) without annotation" if args.json else "row(s) left blank"
        print(f"recorded {result.recorded} label(s); {result.unanswered} {blank} stay pending; "
              f"{result.repeated} already recorded")
    return 0
