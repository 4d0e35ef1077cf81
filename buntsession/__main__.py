"""`python -m buntsession` (or the `buntsession` script): tools for a data file.

    buntsession check FILE     verify every record; exit 0 clean, 1 torn tail only, 2 damaged
    buntsession stats FILE     keys, live vs file size, expiry spread (--json too)
    buntsession dump FILE      one JSON object per live key (value in base64, expiry as unix time)
    buntsession repair FILE    keep every valid record, end the keys whose later records may have been lost
                               in the damage (--keep-suspect keeps them); the original is FILE.corrupt-<time>
    buntsession shrink FILE    rewrite the file to its live set

Usage errors exit 64, a missing file 66, a file held by a running process 75.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from buntsession import tools


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(tools.EX_USAGE)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="buntsession", description="Tools for a buntsession data file.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, summary in (("check", "verify every record"), ("stats", "keys, sizes and expiry spread"),
                          ("dump", "the live keys as JSON lines"), ("repair", "keep every valid record"),
                          ("shrink", "rewrite the file to its live set")):
        command = commands.add_parser(name, help=summary)
        command.add_argument("file")
        if name == "stats":
            command.add_argument("--json", action="store_true", help="one JSON object")
        if name == "repair":
            command.add_argument("--keep-suspect", action="store_true",
                                 help="keep the keys whose later records may have been lost in the damage")
    args = parser.parse_args(argv)
    options: dict[str, bool] = {}
    if args.command == "stats":
        options = {"as_json": args.json}
    elif args.command == "repair":
        options = {"keep_suspect": args.keep_suspect}
    try:
        return tools.COMMANDS[args.command](args.file, sys.stdout, **options)
    except tools.ToolError as exc:
        sys.stderr.write(f"buntsession {args.command}: {exc}\n")
        return exc.status
    except BrokenPipeError:
        # The reader went away (`dump FILE | head`): stop quietly, as the Python docs advise.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
