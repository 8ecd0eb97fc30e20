"""The ``tadpole`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _schemas(args: argparse.Namespace) -> int:
    from schemas.events import rendered_schemas, write_schemas

    if args.write:
        for path in write_schemas():
            print(f"wrote {path}")
        return 0
    for name, text in rendered_schemas().items():
        print(f"# {name}\n{text}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tadpole",
        description="Tadpole: an event-sourced control plane for jobs, tasks and worker spots.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    schemas = sub.add_parser("schemas", help="print or write the Avro schemas of every event")
    schemas.add_argument("--write", action="store_true", help="write schemas/avro/*.avsc")
    schemas.set_defaults(run=_schemas)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
