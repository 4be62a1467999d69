"""``fedal exchange``: a site's pending requests to files and the answers back, as CSV or Label Studio JSON."""
from __future__ import annotations

import argparse
from pathlib import Path

from clients.exchange import CLASSES_CSV, ExchangeError, export_requests, import_answers
from clients.labelstudio import CORRECTION_RULES, DISAGREEMENT_RULES, export_tasks, import_export
from clients.node import open_site_pool
from fedal.fileio import writable_folder

FORMATS = ("csv", "label-studio")
MAX_LISTED = 20  # lines of skipped annotations and corrections printed; the count is always printed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the subcommands ``export`` and ``import`` of ``fedal exchange`` to ``parser``."""
    site = argparse.ArgumentParser(add_help=False)
    group = site.add_argument_group("the site (as in the SuperNode's node config)")
    group.add_argument("--state-dir", required=True, help="the SuperNode's state-dir (holds client-<id>.db)")
    group.add_argument("--client-id", type=int, required=True, help="the SuperNode's client-id")
    group.add_argument("--data-path", required=True, help="the site's data file")
    actions = parser.add_subparsers(dest="action", required=True, metavar="{export,import}")
    export = actions.add_parser(
        "export", parents=[site], help="write the pending queries to a folder",
        description="Write the site's pending queries to a folder: requests.csv + PNGs to fill in, or Label Studio "
                    "tasks (tasks.json, label_config.xml, PNGs) with the set-up that serves their images.")
    export.add_argument("--folder", required=True, help="the folder to write into (created)")
    export.add_argument("--format", choices=FORMATS, default="csv",
                        help="csv (default: requests.csv + PNGs) or label-studio (tasks.json, label_config.xml, PNGs)")
    export.add_argument("--document-root",
                        help="label-studio: the folder Label Studio serves local files from "
                             "(its LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT), --folder or a folder above it; "
                             "default --folder. Image URLs are relative to it")
    imp = actions.add_parser(
        "import", parents=[site], help="record the answers of a filled CSV or a Label Studio JSON export",
        description="Record the answers of a filled requests CSV (all or nothing) or of a Label Studio JSON export "
                    "(its new labels and corrections, all or nothing; out-of-date annotations are reported).")
    source = imp.add_mutually_exclusive_group(required=True)
    source.add_argument("--csv", help="the filled requests CSV")
    source.add_argument("--json", help="a Label Studio JSON export (Export -> JSON)")
    imp.add_argument("--labeler", default="",
                     help="name recorded with the labels (default: the CSV's file name; Label Studio's annotator)")
    imp.add_argument("--disagreement", choices=DISAGREEMENT_RULES, default="ground-truth",
                     help="--json: annotations that disagree on a task: ground-truth (default) takes the one marked "
                          "ground truth in Label Studio and refuses a disagreement without one; majority takes the "
                          "ground truth, else the class most annotators chose (a tie is refused); refuse refuses them")
    imp.add_argument("--corrections", choices=CORRECTION_RULES, default="update",
                     help="--json: a class that differs from an earlier Label Studio answer: update (default) changes "
                          "the label, its history kept; skip reports it and records nothing for it")
    imp.add_argument("--skip-foreign-tasks", action="store_true",
                     help="--json: skip tasks fedal did not create (no request_id, e.g. from a synced storage) "
                          "instead of refusing the export")


def run(args: argparse.Namespace) -> int:
    """Export or import as the parsed ``args`` say; print what happened."""
    from fedal.sitedata import load_site

    data = load_site(args.data_path, args.client_id, args.state_dir)
    with open_site_pool(args.state_dir, args.client_id, data, create=False) as pool:
        if args.action == "export":
            return _export(pool, data, args)
        if args.json:
            return _import_json(pool, data, args)
        result = import_answers(pool, args.csv, source=f"file:{args.labeler}" if args.labeler else None)
        print(f"recorded {result.recorded} label(s); {result.unanswered} row(s) left blank stay pending; "
              f"{result.repeated} already recorded")
    return 0


def _export(pool, data, args: argparse.Namespace) -> int:
    writable_folder(args.folder, what=f"--folder {args.folder}")  # before a PNG is made
    pending = len(pool.requests("pending"))
    if args.format == "csv":
        if args.document_root:
            raise ExchangeError("--document-root is for --format label-studio")
        path = export_requests(pool, data, args.folder)
        print(f"{pending} pending request(s) written to {path}; "
              f"fill the label column (classes in {Path(args.folder) / CLASSES_CSV}) and import it")
        return 0
    out = export_tasks(pool, data, args.folder, document_root=args.document_root)
    print(f"{out.n_tasks} pending request(s) written to {out.tasks} as Label Studio tasks.")
    print("Label Studio, once for this site:")
    if out.document_root is not None:
        print(f"  start it with LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true "
              f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={out.document_root}")
    print(f"  create a project; Settings -> Labeling Interface -> Code: paste {out.config}")
    if out.storage_path is not None:
        print(f"  Settings -> Cloud Storage -> Add Source Storage -> Local files, absolute local path "
              f"{out.storage_path}; add it, do not sync it (the tasks name their images)")
    print(f"Each export: Import {out.new_tasks} ({out.n_new} request(s) no earlier export wrote; {out.tasks.name} "
          "holds them all, for a new project), label, Export -> JSON, then")
    print(f"  fedal exchange import --state-dir {args.state_dir} --client-id {args.client_id} "
          f"--data-path {args.data_path} --json <the downloaded file>")
    return 0


def _import_json(pool, data, args: argparse.Namespace) -> int:
    result = import_export(pool, data, args.json, disagreement=args.disagreement, corrections=args.corrections,
                           skip_foreign=args.skip_foreign_tasks,
                           source=f"label-studio:{args.labeler}" if args.labeler else None)
    print(f"recorded {result.recorded} label(s), corrected {result.corrected}; {result.repeated} already recorded; "
          f"{result.unanswered} exported task(s) without a submitted annotation")
    for title, lines in (("corrected", result.changes), ("reported, not recorded", result.skipped)):
        if lines:
            print(f"{len(lines)} {title}:")
            for line in lines[:MAX_LISTED]:
                print(f"  {line}")
            if len(lines) > MAX_LISTED:
                print(f"  ... and {len(lines) - MAX_LISTED} more")
    if result.foreign:
        print(f"{result.foreign} task(s) not created by fedal skipped (--skip-foreign-tasks)")
    missing = (f", {result.not_in_export} of them not in this export (drafts and tasks nobody submitted are left out "
               "of Label Studio's export)" if result.not_in_export else "")
    print(f"{result.pending} request(s) still pending for this site{missing}")
    return 0
