"""What every job shares: logging, store options, the one-line error exit."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Sequence

from selection.errors import ZooselectError
from selection.storage import Store

log = logging.getLogger("zooselect")


def add_store_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    default = os.environ.get("ZOOSELECT_STORE")
    p.add_argument("--store", required=required and default is None, default=default,
                   help="embedding store URL: a local directory or s3://bucket/prefix "
                        "(default: $ZOOSELECT_STORE)")
    p.add_argument("--s3-endpoint", default=None,
                   help="S3-compatible endpoint URL (default: $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL)")
    p.add_argument("--standard", default=None, help="standard id (default: the store's default)")


def add_ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray is started)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def open_store(args: argparse.Namespace) -> Store:
    store = Store(args.store, s3_endpoint=args.s3_endpoint)
    store.check()
    return store


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> None:
    """Run a job's main; user errors become one line on stderr and exit status 2."""
    level = os.environ.get("ZOOSELECT_LOG", "WARNING").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code = main(argv)
    except ZooselectError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
