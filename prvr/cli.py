"""``prvr`` command line: what users do outside Snakemake."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _show(args) -> int:
    path = Path(args.path)
    if not path.exists():
        print(f"prvr show: {path} does not exist (did the workflow finish?)", file=sys.stderr)
        return 1
    print(path.read_text())
    return 0


def _validate(args) -> int:
    from prvr.config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"{args.config}: {exc}", file=sys.stderr)
        return 1
    print(f"{args.config}: valid ({', '.join(sorted(cfg['datasets']))})")
    return 0


def _metrics(args) -> int:
    from prvr.report import metrics_table

    rows = [(p, json.loads(Path(p).read_text())) for p in args.files]
    print(metrics_table(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["release"]:  # check / import / export of the MS-SL release layout
        from prvr.data.msrl import main as release_main

        return release_main(argv[1:])
    parser = argparse.ArgumentParser(prog="prvr", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("show", help="print a markdown table or report")
    p.add_argument("path")
    p.set_defaults(func=_show)
    p = sub.add_parser("validate", help="validate a config file against the schema")
    p.add_argument("config")
    p.set_defaults(func=_validate)
    sub.add_parser("release", help="MS-SL/DL-DKD feature releases: check, import, export (prvr release -h)")
    p = sub.add_parser("metrics", help="table of one or more test_metrics.json files")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=_metrics)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
