"""Inspect or edit the table: `python -m jobs.table ls|remove|compact --store STORE [...]`."""

from __future__ import annotations

import argparse
from typing import Sequence

from jobs.common import add_store_args, open_store, run_main
from selection.standard import list_standards, load_standard
from selection.table import compact, delete_row, load_table


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.table", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("ls", help="list the standards and the models embedded under one")
    add_store_args(ls)
    rm = sub.add_parser("remove", help="remove models from the table (one object each)")
    add_store_args(rm)
    rm.add_argument("model_ids", nargs="+", metavar="MODEL_ID")
    cp = sub.add_parser("compact", help="fold row objects into segments (fast reads at 10^5+ models)")
    add_store_args(cp)
    cp.add_argument("--segment-rows", type=int, default=50_000)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    store = open_store(args)
    std = load_standard(store, args.standard)
    if args.command == "ls":
        print(f"standards: {', '.join(list_standards(store))} (default/selected: {std.id})")
        table = load_table(store, std)
        cols = ["model_id", "arch", "is_baseline", "num_params", "gflops", "input_size", "weights_sha256"]
        for row in table.meta.select(cols).to_pylist():
            print(f"{row['model_id']:<40} {row['arch']:<24} {row['num_params'] / 1e6:>6.1f}M "
                  f"{row['gflops']:>7.2f} GF {row['input_size']:>4}px {row['weights_sha256'][:12]}"
                  f"{'  (standard baseline)' if row['is_baseline'] else ''}")
        print(f"{len(table)} models under standard {std.id}")
        return 0
    if args.command == "compact":
        res = compact(store, std, args.segment_rows)
        print(f"compacted {res.rows} rows into {res.segments_written} segment(s), removed "
              f"{res.objects_removed} objects in {res.seconds:.1f}s")
        return 0
    missing = [mid for mid in args.model_ids if not delete_row(store, std, mid)]
    print(f"removed {len(args.model_ids) - len(missing)} model(s)"
          + (f"; not in the table: {missing}" if missing else ""))
    return 1 if missing else 0


if __name__ == "__main__":
    run_main(main)
