"""Scheduled re-index: `python -m jobs.reindex --catalog CATALOG --store STORE [--dry-run]`.

New or changed models (by weights digest) are embedded, models gone from the catalog
are removed, unchanged ones skipped; a model whose entry changed only in its tags, metadata,
given license or checkpoint file's path (same bytes) has its row rewritten, no model loaded.
With a catalog smaller than the table, more than half of the table (--max-remove) is not
removed, and the run exits 1: a catalog cut short is more likely than half the zoo retired
at once. Safe to run twice at once: every model is one object whose rewrite is an idempotent
overwrite (a refresh checks the row is still the one it planned against first).
"""

from __future__ import annotations

from typing import Sequence

from jobs.common import run_program
from jobs.embed import parser, run


def main(argv: Sequence[str] | None = None) -> int:
    return run(parser("jobs.reindex", __doc__).parse_args(argv), prune=True)


if __name__ == "__main__":
    run_program(main)
