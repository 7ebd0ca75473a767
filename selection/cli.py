"""`zooselect COMMAND ...`: the jobs behind one command."""

from __future__ import annotations

import difflib
import importlib
import os
import sys

COMMANDS = {
    "standard": ("jobs.standard", "build and publish a standard"),
    "embed": ("jobs.embed", "embed a catalog into the table (one Ray actor per model)"),
    "reindex": ("jobs.reindex", "scheduled re-index: embed new/changed, remove gone, skip unchanged"),
    "select": ("jobs.select", "rank the table's models for one or more tasks"),
    "table": ("jobs.table", "list (ls), export, remove or compact the table's models"),
    "demo": ("jobs.demo", "the embedded default, end to end on this machine"),
    "benchmark": ("jobs.benchmark", "quality (vs brute-force LogME, H-score, ...), its zoo alone, and scaling benchmarks"),
}


def usage() -> str:
    lines = ["usage: zooselect COMMAND [options]   (zooselect COMMAND --help for each; zooselect --version)", "",
             "commands:"]
    lines += [f"  {name:<10} {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # as argparse does without a required command: the usage on stderr, exit 2
        print(f"error: a command is required\n{usage()}", file=sys.stderr)
        sys.exit(2)
    if argv[0] == "help" and argv[1:]:  # `zooselect help select [scaling]`: that command's help
        argv = argv[1:] + ["--help"]
    if argv[0] in ("-h", "--help", "help"):
        try:
            print(usage(), flush=True)
        except BrokenPipeError:  # `zooselect --help | head -2`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    if argv[0] == "--version":  # the version rows record (a checkout on PYTHONPATH has no package metadata)
        from selection import __version__

        print(f"zooselect {__version__}")
        sys.exit(0)
    if argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        print(f"error: unknown command {argv[0]!r}{f' (did you mean {close[0]!r}?)' if close else ''}\n{usage()}",
              file=sys.stderr)
        sys.exit(2)
    try:
        module = importlib.import_module(COMMANDS[argv[0]][0])  # seconds: torch, Ray
    except KeyboardInterrupt:  # Ctrl-C before the job runs: as after, one line and 130, not an import traceback
        print("error: interrupted", file=sys.stderr, flush=True)
        # Nothing to clean up yet; a half-imported torch's exit handlers, run by sys.exit, sometimes
        # ended the process by the signal instead (status -2; CI, session 42)
        os._exit(130)
    from jobs.common import run_program

    run_program(module.main, argv[1:], command=f"zooselect {argv[0]}")


if __name__ == "__main__":
    main()
