"""What every job shares: logging, store options, the one-line error exit."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import re
import signal
import sys
import threading
import traceback
from typing import Any, Callable, Iterator, NoReturn, Sequence

from selection.errors import ConfigError, ZooselectError
from selection.storage import ScrubCredentials, Store

log = logging.getLogger("zooselect")


def add_store_args(p: argparse.ArgumentParser, standard: bool = True, what: str = "embedding store") -> None:
    default = os.environ.get("ZOOSELECT_STORE") or None  # set but empty: as unset, --store is required
    p.add_argument("--store", required=default is None, default=default,
                   help=f"{what} URL: a local directory or s3://bucket/prefix (default: $ZOOSELECT_STORE)")
    p.add_argument("--s3-endpoint", default=None,
                   help="S3-compatible endpoint URL (default: $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL)")
    if standard:
        p.add_argument("--standard", default=None, help="standard id (default: the store's default)")


def add_ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray is started)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def open_store(args: argparse.Namespace, url: str | None = None, writable: bool = True,
               write_prefix: str = "") -> Store:
    """The job's store (`url`, default `--store`), checked (`Store.check`: `writable` under `write_prefix`,
    the folder the job writes); `--s3-endpoint` then holds for every s3:// URL the job and its Ray
    workers read (tasks, checkpoints), not only the store."""
    store = Store(url or args.store, s3_endpoint=args.s3_endpoint)
    if store.scheme == "file":  # its absolute path: workers may run in another directory than this driver
        store = Store(store.root, s3_endpoint=args.s3_endpoint)
    if store.scheme == "memory":
        raise ConfigError(f"store {store.url!r} lives in one process and is gone when the job ends; "
                          f"use a local directory or s3://bucket/prefix")
    if args.s3_endpoint:
        os.environ["AWS_ENDPOINT_URL_S3"] = args.s3_endpoint  # read by every Store; runtime.init passes it on
    store.check(writable, write_prefix)
    return store


_COMMAND: str | None = None  # "zooselect CMD" while the zooselect command runs a job
_TERMINATED = 128 + signal.SIGTERM  # the exit status after SIGTERM
_BROKEN_PIPE = 128 + signal.SIGPIPE  # after its output's reader went away (as a shell tool killed by SIGPIPE)
_terminated = False


def terminated(signum: int, frame: Any) -> None:
    """The jobs' SIGTERM handler (a cancelled `ray job`, a stopped pod; installed by `run_main`, and again by
    `jobs.runtime.init`, as Ray's own aborts with a C++ stack dump): one line, then out through the job's
    `finally` blocks (a compaction's lease, a temporary file) and Ray's shutdown, exit status 143, as Ctrl-C
    gives 130. (Inside a Ray call, Ray turns the exception into SystemExit(1): `run_main` gives 143 all the
    same.)"""
    global _terminated
    _terminated = True
    raise SystemExit(_TERMINATED)  # "error: terminated" comes after the clean-up (its bars' last lines)


LOG_BAR_INTERVAL_S = 30.0  # off a terminal, a progress bar writes a line this often (and one at the end)


_BAR_TIMES = re.compile(r"\[[\d:]+(?:<[^,\]]*)?(?:, [^,\]]*)?")  # `[00:12<00:30, 2.5model/s` of a tqdm line
_BAR_GLYPHS = re.compile(r"\|[^|]*\|")  # `|#########  |`: its width is what the line's other text leaves of ncols
_CSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")  # a terminal control sequence: tqdm moves up (`ESC[A`) to a second bar


class _Lines:
    """A stream for a progress bar off a terminal: each redraw a line of its own, no carriage returns, and
    none that repeats the previous one's progress and note with only the times changed (tqdm's closing
    redraw after a last update; its bar one glyph narrower when the rate takes a digit more), nor a
    terminal's cursor moves (two bars open)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self._last = ""

    def write(self, text: str) -> int:
        line = _CSI.sub("", text.replace("\r", "")).rstrip()
        news = _BAR_TIMES.sub("[", _BAR_GLYPHS.sub("|", line))  # a rate of another width narrows the bar
        if line and news != self._last:
            self.stream.write(line + "\n")
            self._last = news
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(*, disable: bool = False, **kwargs: Any) -> Any:
    """A tqdm bar on stderr (`kwargs`: tqdm's). On a terminal it is redrawn in place; elsewhere (a file,
    `ray job logs`, a pod's log) it writes a plain line every LOG_BAR_INTERVAL_S, on each postfix change
    and at the end, kept, rather than carriage-return frames."""
    from tqdm import tqdm

    if disable or sys.stderr.isatty():
        return tqdm(disable=disable, **kwargs)
    return tqdm(file=_Lines(sys.stderr), mininterval=LOG_BAR_INTERVAL_S, ascii=True, ncols=100,
                **dict(kwargs, leave=True))


def prog(module: str) -> str:
    """A job's name in its usage lines: `zooselect CMD` when that command runs it, else `python -m MODULE`."""
    return _COMMAND or f"python -m {module}"


@contextlib.contextmanager
def as_flags(*fields: str) -> Iterator[None]:
    """A library config's errors name its fields (`top_k must be >= 1`); the job's user gave flags: within
    this block, such an error names `--top-k` instead."""
    try:
        yield
    except ConfigError as exc:
        text = str(exc)
        quoted = min((i for i in (text.find("'"), text.find('"')) if i >= 0), default=len(text))
        head = text[:quoted]  # before the first quote: the value the user gave is quoted after it, as given
        for name in fields:
            head = re.sub(rf"(?<![\w-]){name}\b", "--" + name.replace("_", "-"), head)
        raise ConfigError(head + text[quoted:]) from None


def command(module: str) -> str:
    """How to run another job, in a hint: as this one was run (`zooselect embed` or `python -m jobs.embed`)."""
    name = module.split(".", 1)[1]
    return f"zooselect {'benchmark scaling' if name == 'scaling' else name}" if _COMMAND else f"python -m {module}"


def _as_run(text: str) -> str:
    """An error's hint as this job was run: the library (which knows no command) names `python -m jobs.X`,
    which under `zooselect` is `zooselect X`."""
    return re.sub(r"`python -m (jobs\.\w+)", lambda m: "`" + command(m[1]), text) if _COMMAND else text


def prog_of_subcommand(name: str) -> None:
    """A job that hands over to another's main (`zooselect benchmark scaling`): its usage names both."""
    global _COMMAND
    if _COMMAND:
        _COMMAND = f"{_COMMAND} {name}"


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None,
             command: str | None = None) -> None:
    """Run a job's main; user errors become one line on stderr and exit status 2. `command`: the
    `zooselect CMD` that runs it, for its usage lines."""
    global _COMMAND
    _COMMAND = command
    level = os.environ.get("ZOOSELECT_LOG", "WARNING").upper()
    if not isinstance(logging.getLevelName(level), int):  # every name logging knows (WARN, FATAL too)
        print(f"error: ZOOSELECT_LOG should be a logging level such as DEBUG, INFO or WARNING, got {level!r}",
              file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(ScrubCredentials())
    if threading.current_thread() is threading.main_thread():  # before any work, not only once Ray runs
        signal.signal(signal.SIGTERM, terminated)
    try:
        code = main(argv)
    except ZooselectError as exc:
        print(f"error: {_as_run(str(exc))}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:  # `zooselect table ls | head`: the reader went away; the job stops, as by SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the flush at exit fails no more
        code = _BROKEN_PIPE
    except SystemExit as exc:
        code = exc.code
    if _terminated:  # SIGTERM: last, and 143, even when its clean-up failed (that error said above)
        print("error: terminated", file=sys.stderr)
        code = _TERMINATED
    sys.exit(code)


def run_program(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None,
                command: str | None = None) -> NoReturn:
    """`run_main` as a process of its own (`python -m jobs.X`, `zooselect X`), which then ends as Python
    ends one (threads joined as interpreter shutdown joins them, exit handlers run: Ray's shutdown,
    logging's flush), but without the C++ teardown after it. There, a process that had imported torch and
    used Arrow's thread pools aborted now and then ("terminate called without an active exception",
    status 134, after its work was done and printed: 4 of 75 runs of a script that read Parquet on this
    loaded machine, 0 of 120 so). Reads no longer use Arrow's CPU pool
    (`selection.storage.READ_THREADS`); file reads still start its I/O pool. Under a tracer or profiler
    (`coverage run`, `cProfile`), which save their data in Python's own teardown, it exits as Python does."""
    try:
        run_main(main, argv, command)
        code: Any = 0
    except SystemExit as exc:
        code = exc.code
    except Exception:  # noqa: BLE001 - a bug: its traceback, status 1, as Python gives
        traceback.print_exc()
        code = 1
    if code is not None and not isinstance(code, int):  # as sys.exit("message") does
        print(code, file=sys.stderr)
        code = 1
    if sys.gettrace() is not None or sys.getprofile() is not None:
        sys.exit(code)
    interrupted: list[bool] = []

    def on_interrupt(*_: Any) -> None:  # an exit handler's KeyboardInterrupt is printed as "ignored": none is raised
        if interrupted:  # a second Ctrl-C: a handler (Ray's shutdown) that hangs is not waited for
            print("error: interrupted", file=sys.stderr)
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code or 130)
        interrupted.append(True)

    try:
        try:
            threading._shutdown()  # type: ignore[attr-defined]  # what interpreter shutdown does: executors too
        except KeyboardInterrupt:  # Ctrl-C while waiting for threads
            interrupted.append(True)
        except SystemExit:  # SIGTERM
            print("error: terminated", file=sys.stderr)
            code = _TERMINATED
        with contextlib.suppress(ValueError):  # not the main thread: signals are not this code's
            signal.signal(signal.SIGINT, on_interrupt)
        atexit._run_exitfuncs()
        if interrupted and code != 130:  # after the work: still one line, and 130 unless it had failed (B274)
            print("error: interrupted", file=sys.stderr)
            code = code or 130
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BrokenPipeError:  # output still buffered, its reader gone (`| head`): as when printed
                code = code or _BROKEN_PIPE
            except (OSError, ValueError):  # a stream closed
                pass
        os._exit(code or 0)


if __name__ == "__main__":  # `python -m jobs.common --help` printed nothing, exit 0
    print("error: jobs.common is not a command: it holds what the jobs share (`zooselect --help` lists the "
          "commands)", file=sys.stderr)
    sys.exit(2)
