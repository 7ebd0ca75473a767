"""Inspect, export or edit the table: `python -m jobs.table ls|export|remove|compact --store STORE [...]`."""

from __future__ import annotations

import argparse
import contextlib
import os
from typing import Any, Iterator, Sequence

from jobs.common import add_store_args, open_store, prog, progress_bar, run_program
from selection.errors import ConfigError
from selection.keys import model_key
from selection.results import format_gflops
from selection.standard import list_standards, load_standard, marked_default
from selection.storage import check_output, check_outside_store
from selection.table import Progress, compact, delete_rows, export_table, iter_shards, read_consistently


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("jobs.table"), description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="{ls,export,remove,compact}")
    ls = sub.add_parser("ls", help="list the standards and the models embedded under one")
    add_store_args(ls)
    ex = sub.add_parser("export", help="write the live table (row objects and segments, less removed models) "
                                       "as one Parquet file, for DuckDB, Polars or pandas")
    add_store_args(ex)
    ex.add_argument("--out", required=True, metavar="FILE", help="the Parquet file to write")
    ex.add_argument("--no-progress", action="store_true", help="no progress bars")
    rm = sub.add_parser("remove", help="remove models from the table (one object each)")
    add_store_args(rm)
    rm.add_argument("model_ids", nargs="+", metavar="MODEL_ID")
    for quiet in (ls, rm):  # accepted as by every job, for scripts that pass it to each: these have no bars
        quiet.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)
    cp = sub.add_parser("compact", help="fold row objects into segments (fast reads at 10^5+ models)")
    add_store_args(cp)
    cp.add_argument("--segment-rows", type=int, default=None,
                    help="rows per compacted segment (default 50,000, fewer for wide rows: about 1 GiB of "
                         "vectors, 14,339 rows of the default per-source standard)")
    cp.add_argument("--break-leases", action="store_true",
                    help="first delete the leases of compactions that crashed (one not refreshed for an hour is "
                         "taken as crashed anyway; never while one is running)")
    cp.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


@contextlib.contextmanager
def _bars(enabled: bool, **verbs: str) -> Iterator[Progress]:
    """A `selection.table.Progress` that shows one bar per kind of work, named by `verbs`
    (e.g. rows="folded": "folded: 4096 rows")."""
    bars: dict[str, Any] = {}

    def update(what: str, n: int) -> None:
        if what not in bars:
            bars[what] = progress_bar(desc=verbs.get(what, what), unit=f" {what}", disable=not enabled)
        bars[what].update(n)
    try:
        yield update
    finally:
        for bar in bars.values():
            bar.close()


LS_HEAD = (f"{'model_id':<40} {'arch':<24} {'params':>7} {'GFLOPs':>10} {'size':>6} {'sha256':<12} {'compute':<17}"
           f"license / tags")


def _ls_line(row: dict[str, Any]) -> str:
    """One model of `ls`; a null field (the schema allows it for all but the id) shows as '-'."""
    def num(value: float | None, fmt: str, suffix: str, width: int) -> str:
        return f"{'-':>{width}}" if value is None else f"{value:{fmt}}{suffix}"

    params = None if row["num_params"] is None else row["num_params"] / 1e6
    tags = ",".join(row["tags"] or []) or "-"
    return (f"{row['model_id']:<40} {row['arch'] or '-':<24} {num(params, '>6.1f', 'M', 7)} "
            f"{'-' if row['gflops'] is None else format_gflops(row['gflops']) + ' GF':>10} "
            f"{num(row['input_size'], '>4', 'px', 6)} "
            f"{(row['weights_sha256'] or '-')[:12]:<12} {row['compute'] or '-':<17}{row['license'] or '-'} / {tags}"
            f"{'  (standard baseline)' if row['is_baseline'] else ''}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "compact" and args.segment_rows is not None and args.segment_rows < 1:
        raise ConfigError(f"--segment-rows must be >= 1, got {args.segment_rows}")
    check_output(getattr(args, "out", None), flag="--out")
    for mid in getattr(args, "model_ids", []):
        model_key(mid)  # a bad id is a ConfigError before anything is opened or removed
    store = open_store(args, writable=args.command not in ("ls", "export"),  # those two only read
                       write_prefix="embeddings")
    check_outside_store(store, {"--out": getattr(args, "out", None)})
    standards = list_standards(store) if args.command == "ls" else []
    if len(standards) > 1 and args.standard is None and marked_default(store) is None:
        print(f"standards: {', '.join(standards)} (no default; list one's models with --standard ID)")
        return 0
    std = load_standard(store, args.standard)
    if args.command == "ls":
        print(f"standards: {', '.join(standards)} (default/selected: {std.id})")
        cols = ["model_id", "arch", "is_baseline", "num_params", "gflops", "input_size", "weights_sha256", "compute",
                "license", "tags"]
        rows = read_consistently(store, std, lambda listing: [  # the metadata only, never the vectors
            row for shard in iter_shards(store, std, listing, columns=cols) for row in shard.meta.to_pylist()])
        print(LS_HEAD)
        for row in sorted(rows, key=lambda r: r["model_id"]):
            print(_ls_line(row))
        print(f"{len(rows)} models under standard {std.id}")
        return 0
    if args.command == "export":
        try:
            with _bars(not args.no_progress, rows="exported") as progress:
                rows = export_table(store, std, args.out, progress)
        except OSError as exc:  # the local file (the store's errors are StoreErrors): a full disk, a folder gone
            raise ConfigError(f"cannot write {args.out!r}: {exc.strerror or exc}") from exc
        print(f"wrote {rows} models under standard {std.id} to {os.path.abspath(os.path.expanduser(args.out))}")
        return 0
    if args.command == "compact":
        with _bars(not args.no_progress, rows="folded", objects="deleted") as progress:
            res = compact(store, std, args.segment_rows, break_leases=args.break_leases, progress=progress)
        print(f"compacted {res.rows} rows into {res.segments_written} segment(s), removed "
              f"{res.objects_removed} objects in {res.seconds:.1f}s"
              + (f"; removed {res.temporaries_removed} temporary file(s) of interrupted writes"
                 if res.temporaries_removed else ""))
        return 0
    model_ids = list(dict.fromkeys(args.model_ids))  # an id given twice is removed (and counted) once
    missing = delete_rows(store, std, model_ids)
    print(f"removed {len(model_ids) - len(missing)} model(s)"
          + (f"; not in the table: {missing}" if missing else ""))
    return 1 if missing else 0


if __name__ == "__main__":
    run_program(main)
