"""The one place for storage I/O: any fsspec URL (local directory, s3://, memory://).

Every remote call goes through `Store._call`, which retries transient faults (connection
resets, timeouts, throttling, a restarting server) by exception *type* with capped
exponential backoff; every storage error becomes a `StoreError` at this boundary (a local
file written from a stream, which cannot be read twice, is not retried).
Writes are atomic: a reader sees the old object, the new one, or none, never half.
Credentials come from the usual AWS chain and never appear in messages.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import hashlib
import io
import logging
import os
import random
import re
import stat
import tempfile
import time
import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterable, Iterator, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from selection.errors import ConfigError, CorruptObjectError, ObjectGoneError, StoreError, brief

log = logging.getLogger(__name__)
T = TypeVar("T")

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$")
SUPPORTED_SCHEMES = ("file", "s3", "memory")
# "s3:/bucket" or "s3:bucket" is a mistyped URL, not a local directory named "s3:".
_MISTYPED = re.compile(r"^(file|s3|s3a|gs|gcs|az|abfs|hdfs|http|https|memory):(?!//)", re.IGNORECASE)


# "s3//bucket" (the colon left out) is one too.
_NO_COLON = re.compile(r"^(file|s3|s3a|gs|gcs|az|abfs|hdfs|http|https|memory)//", re.IGNORECASE)


def check_url(url: str) -> None:
    """Refuse a mistyped URL (`s3:/bucket`, `s3//bucket`) that would otherwise be taken as a local path."""
    match = _MISTYPED.match(url) or _NO_COLON.match(url)
    if match:
        scheme, rest = match.group(1).lower(), url[match.end():].lstrip("/")
        raise ConfigError(f"malformed URL {url!r}: did you mean {scheme}://{'/' if scheme == 'file' else ''}{rest}?")


def file_url_path(url: str) -> str | None:
    """The local path of a `file://` URL (scheme case-insensitive; `file://localhost/` as `file:///`, RFC
    8089; percent-escapes decoded: `file:///my%20zoo` is `/my zoo`; `file://~/zoo` in the home folder), None
    for anything else (a plain path is taken as written). ConfigError for a URL without an absolute path (`file://nas01/zoo`)."""
    if not url.lower().startswith("file://"):
        return None
    path = url[len("file://"):]
    if path.lower().startswith("localhost/"):
        path = path[len("localhost"):]
    if not path.startswith(("/", "~")):  # file://nas01/zoo was the folder ./nas01/zoo
        raise ConfigError(f"a file:// URL holds an absolute path (file:///dir/name), got {url!r}; "
                          f"a plain path may be relative")
    path = urllib.parse.unquote(path, errors="surrogateescape")  # bytes, as POSIX names may hold
    if "\x00" in path:
        raise ConfigError(f"file:// URL {url!r} decodes to a path holding a NUL character")
    return os.path.expanduser(path)


_NOT_TRANSIENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                  FileExistsError)
# OSErrors that waiting does not fix: a full or read-only disk, a quota, an invalid request (s3fs
# raises EINVAL for S3's InvalidRequest, InvalidArgument, PreconditionFailed, ...).
_PERMANENT_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EDQUOT, errno.ENAMETOOLONG, errno.EINVAL}


def _transient_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConnectionError, TimeoutError, OSError]
    try:
        from botocore import exceptions as bexc

        types += [bexc.EndpointConnectionError, bexc.ConnectionClosedError,
                  bexc.ReadTimeoutError, bexc.ConnectTimeoutError]
    except ImportError:  # pragma: no cover - s3fs brings botocore
        pass
    try:
        import aiohttp

        types.append(aiohttp.ClientError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


_TRANSIENT = _transient_types()


_DENIED_CODES = ("AccessDenied", "AccessDeniedException", "InvalidAccessKeyId", "SignatureDoesNotMatch")
# What the next attempt meets again, each said in words: s3fs raises some as a PermissionError (clock skew,
# an archived object), which read as bad credentials; 501 and 301 were retried as an unreachable server.
_EXPLAINED = {
    "RequestTimeTooSkewed": "this node's clock and the S3 server's differ by more than S3 allows (15 min): "
                            "set the clock (NTP)",
    "InvalidObjectState": "the object is archived (a Glacier or Deep Archive storage class): restore it first",
    "PermanentRedirect": "the bucket is in another region or at another endpoint: give its region "
                         "(AWS_REGION) or endpoint (--s3-endpoint)",
    "NotImplemented": "the S3 server does not implement this request (HTTP 501)",
}
_PERMANENT_CODES = (*_DENIED_CODES, "NoSuchBucket", "InvalidBucketName", "Forbidden", *_EXPLAINED)
_TRANSIENT_CODES = ("SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                    "ServiceUnavailable", "InternalError", "BadGateway",
                    "OperationAborted")  # HTTP 409, "try again": the one 4xx besides 408/429 that waiting fixes
_HTTP_STATUS = re.compile(r"\b(?:status(?: code)?|HTTP)[ :=]*(\d{3})\b", re.IGNORECASE)


def _response(exc: BaseException) -> dict:
    """The response of a botocore ClientError anywhere in the chain ({} if none)."""
    seen: BaseException | None = exc
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            return response
        seen = seen.__cause__ or seen.__context__
    return {}


def _error_code(exc: BaseException) -> str:
    """The S3 error code (e.g. 'SlowDown') of a botocore ClientError anywhere in the chain."""
    return str(_response(exc).get("Error", {}).get("Code", ""))


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status of a botocore ClientError anywhere in the chain."""
    status = _response(exc).get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status if isinstance(status, int) else None


_QUOTED_OR_URL = re.compile(r"\S+://\S*|\"[^\"]*\"|'[^']*'")


def _mentions(exc: BaseException, codes: tuple[str, ...]) -> bool:
    """Whether the message of `exc` names one of the error `codes` (for errors whose code is only in
    their text), outside the URLs and quoted names it holds: a model id or store prefix holding
    `AccessDenied` or `Forbidden` is not an error code."""
    text = _QUOTED_OR_URL.sub(" ", str(exc))
    return any(re.search(rf"\b{c}\b", text) for c in codes)


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, _NOT_TRANSIENT) or getattr(exc, "errno", None) in _PERMANENT_ERRNOS:
        return False
    code = _error_code(exc)
    if code in _PERMANENT_CODES or _mentions(exc, _PERMANENT_CODES):
        return False
    if code in _TRANSIENT_CODES or _mentions(exc, _TRANSIENT_CODES):
        return True
    text = _QUOTED_OR_URL.sub(" ", str(exc))
    http = _http_status(exc)  # a client error (InvalidRequest, QuotaExceeded, ...) is the same next time
    if http is not None and 400 <= http < 500 and http not in (408, 429):
        return False
    status = _HTTP_STATUS.search(text)
    if status:
        return status.group(1).startswith("5") or status.group(1) == "429"
    return isinstance(exc, _TRANSIENT)


# A session token in botocore's DEBUG request log: "x-amz-security-token:TOKEN" (the canonical request)
# and "'X-Amz-Security-Token': b'TOKEN'" (the headers), whichever provider gave it (SSO, STS, a profile)
_TOKEN_HEADER = re.compile(r"""(x-amz-security-token['"]?\s*[:=]\s*b?['"]?)[^\s'",}]+""", re.IGNORECASE)


def _scrub(text: str) -> str:
    """Remove anything that looks like a credential from an error message or a log line."""
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"):
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return _TOKEN_HEADER.sub(r"\1***", text)


class ScrubCredentials(logging.Filter):
    """A handler's filter that takes credentials (`_scrub`) out of every record it writes: botocore logs
    each request's session token at DEBUG (`ZOOSELECT_LOG=DEBUG`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed call: the handler reports it, as without this filter
            return True
        clean = _scrub(text)
        if clean != text:
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:  # a traceback's messages too (the handler prints exc_text)
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = _scrub(record.exc_text)
        return True


WRITE_CHECK = ".zooselect-write-check"  # `Store.check` writes and deletes it: hidden, never listed


@dataclass(frozen=True)
class _Corrupt:
    """A parse error of an object that was read successfully (not a storage fault)."""

    exc: BaseException


def _parsed(watched: "_WatchedFile", fn: Callable[[], T]) -> T | _Corrupt:
    """fn(), a parse of a Parquet object read through `watched`: its error is a storage fault (raised,
    for the retry policy) if one of the object's reads failed, else a corrupt object (returned)."""
    watched.error = None
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - sorted into I/O and parse errors
        if watched.error is not None:
            raise
        return _Corrupt(exc)


def _row_group_batches(meta: Any, batch_bytes: int, rows: Collection[int] | None = None) -> list[list[int]]:
    """A Parquet file's row groups (with `rows`, those holding one of these row numbers) cut into runs of
    about `batch_bytes` stored bytes (at least one group)."""
    wanted = None if rows is None else sorted(rows)
    groups, start = [], 0
    for i in range(meta.num_row_groups):
        n = meta.row_group(i).num_rows
        if wanted is None or bisect.bisect_left(wanted, start) < bisect.bisect_left(wanted, start + n):
            groups.append(i)  # a wanted row number in [start, start + n): O(log rows) a group, not O(rows)
        start += n
    batches: list[list[int]] = [[]]
    size = 0
    for i in groups:
        group = meta.row_group(i)
        if batches[-1] and size >= batch_bytes:
            batches.append([])
            size = 0
        batches[-1].append(i)
        size += sum(group.column(j).total_compressed_size for j in range(group.num_columns))
    return [b for b in batches if b]


def _split_groups(table: pa.Table, meta: Any, groups: list[int]) -> Iterator[pa.Table]:
    """The row groups `groups` of a Parquet file, read together as `table`, one table each."""
    at = 0
    for i in groups:
        n = meta.row_group(i).num_rows
        yield table.slice(at, n)
        at += n


class _WatchedFile:
    """A file object that remembers the last error its own reads raised (for Arrow)."""

    _CALLS = ("read", "readinto", "read1", "readall", "seek", "tell")

    def __init__(self, fh: object) -> None:
        self._fh = fh
        self.error: BaseException | None = None

    def __getattr__(self, name: str) -> object:
        attr = getattr(self._fh, name)
        if name not in self._CALLS:
            return attr

        def call(*args: object, **kwargs: object) -> object:
            try:
                return attr(*args, **kwargs)
            except Exception as exc:
                self.error = exc
                raise
        return call


class _Ranges(io.RawIOBase):
    """A read-only file of an object of which only some byte ranges are fetched: its last TAIL bytes
    (the Parquet footer) when opened, then the ranges `fetch` is given, in parallel (`cat_ranges`). A
    read outside them fetches its own bytes (correct, one request)."""

    TAIL = 1 << 20

    def __init__(self, fs: Any, path: str) -> None:
        super().__init__()
        self.fs, self.path, self.pos = fs, path, 0
        self.size = int(fs.size(path))
        start = max(0, self.size - self.TAIL)
        self.pieces = [(start, fs.cat_file(path, start=start, end=self.size))]

    def fetch(self, ranges: list[tuple[int, int]]) -> None:
        todo = [(a, b) for a, b in ranges if self._piece(a, b) is None]
        if todo:
            blobs = self.fs.cat_ranges([self.path] * len(todo), [a for a, _ in todo], [b for _, b in todo],
                                       on_error="raise")
            self.pieces += [(a, bytes(blob)) for (a, _), blob in zip(todo, blobs)]

    def forget(self) -> None:
        """Drop every range fetched but the footer's (a reader of one row group batch at a time)."""
        del self.pieces[1:]

    def _piece(self, start: int, end: int) -> bytes | None:
        for at, blob in self.pieces:
            if at <= start and end <= at + len(blob):
                return blob[start - at:end - at]
        return None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence] + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        if end <= self.pos:
            return b""
        data = self._piece(self.pos, end)
        if data is None:
            data = self.fs.cat_file(self.path, start=self.pos, end=end)
            self.pieces.append((self.pos, data))
        self.pos = end
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


def _chunk_ranges(meta: Any, columns: list[str] | None, groups: Iterable[int] | None = None,
                  gap: int = 64 << 10) -> list[tuple[int, int]]:
    """The byte ranges of `columns`' chunks (all with None) in the row groups `groups` (all with None)
    of a Parquet file, those less than `gap` apart merged."""
    wanted, spans = None if columns is None else set(columns), []
    for i in range(meta.num_row_groups) if groups is None else groups:
        group = meta.row_group(i)
        for j in range(group.num_columns):
            chunk = group.column(j)
            if wanted is None or chunk.path_in_schema.split(".")[0] in wanted:
                start = min(o for o in (chunk.dictionary_page_offset, chunk.data_page_offset) if o)
                spans.append((start, start + chunk.total_compressed_size))
    merged: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if merged and a - merged[-1][1] < gap:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return merged


# How much of a Parquet object `Store.iter_row_groups` fetches and decodes at once: a few row groups of a
# segment (selection.table.SEGMENT_GROUP_BYTES); on S3 their byte ranges are fetched in parallel.
ROW_GROUP_BATCH_BYTES = 32 << 20
STALE_TEMPORARY_S = 3600.0  # a local write's temporary file untouched this long is one whose writer was killed
# `Store.write_tables` on S3: a larger object goes up in parts of this size, this many at a time.
UPLOAD_PART_BYTES = 32 << 20
UPLOAD_PARTS_AT_ONCE = 4


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with capped exponential backoff and jitter."""

    attempts: int = 6
    base_delay_s: float = 0.2
    max_delay_s: float = 5.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigError(f"retry attempts must be >= 1, got {self.attempts}")
        if self.base_delay_s < 0 or self.max_delay_s < self.base_delay_s:
            raise ConfigError(
                f"retry delays must satisfy 0 <= base <= max, got base={self.base_delay_s} "
                f"max={self.max_delay_s}")

    def delay(self, attempt: int) -> float:
        return min(self.max_delay_s, self.base_delay_s * 2 ** attempt) * (0.5 + random.random() / 2)


# Parquet is decoded on the calling thread, not on Arrow's CPU thread pool: with torch imported, a process
# that had decoded on the pool aborted at exit ("terminate called without an active exception", status
# 134) in 3-7 of 45 runs on this loaded 2-core machine, 0 of 45 without the pool.
# Decoding a 20,000-row segment took as long either way here (0.17 s); the sweep's parallelism is
# across segments and row groups (Ray tasks), not inside one.
READ_THREADS = False

_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{32}\.tmp")  # the temporary file of `atomic_local_file`
_SPOOL = re.compile(r"\.zooselect-spool-[A-Za-z0-9_]+\.parquet")  # a remote `write_tables`' local file


@contextlib.contextmanager
def atomic_local_file(path: str, follow_link: bool = True) -> Iterator[str]:
    """A temporary file beside `path` to write in; when the block ends without an error it is fsynced
    and renamed over `path`, and the directory flushed: a write stopped part-way leaves the old file
    whole, and a reported write survives a power loss. A symlink is written where it points (a file
    the user named), or, with `follow_link=False` (a store's object: whoever else may write the store
    could plant a link to a file of the user's), replaced by the file. An existing file keeps its
    permissions. On an error the temporary file is removed. `~` is the home folder, as
    `check_output` reads it."""
    path = os.path.abspath(os.path.expanduser(path))
    path = os.path.realpath(path) if follow_link else \
        os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))  # folders still followed
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        with contextlib.suppress(FileNotFoundError):  # deleted meanwhile (a compaction, a remove): written anew
            if os.path.isfile(path) and not os.path.islink(path):
                os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        os.replace(tmp, path)
        _fsync_dir(directory)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_outside_store(store: Store, outputs: dict[str, str | None]) -> None:
    """Refuse an output path (flag -> path) inside a local store's folder: a results file written over
    `standards/DEFAULT` or a row object broke the store."""
    if getattr(store, "scheme", None) != "file":
        return
    root = os.path.realpath(store.root).rstrip(os.sep)
    for flag, path in outputs.items():
        if path and (os.path.realpath(os.path.expanduser(path)) + os.sep).startswith(root + os.sep):
            raise ConfigError(f"{flag} {path!r} is inside the store {store.url!r}: write it elsewhere (the store "
                              f"holds only what zooselect writes there)")


def check_output(path: str | None, *, directory: bool = False, flag: str | None = None) -> None:
    """Refuse, before any work, an output path that cannot be written (a file where a directory
    is wanted or the reverse, a missing or read-only parent): results must not be lost at the end.
    None: no output asked for; `flag` (the option given it) names the path in errors."""
    if path is None:
        return
    what = flag or ("output directory" if directory else "output file")
    if not isinstance(path, str) or not path.strip():  # `--json "$OUT"` with OUT unset ran and wrote nothing
        raise ConfigError(f"{what} should name a {'folder' if directory else 'file'}, got {path!r} (an unset "
                          f"variable?)")
    if not directory and path.endswith(("/", os.sep)):  # `--json newdir/` wrote a file named newdir
        raise ConfigError(f"{what} {path!r} ends with '/': name a file, not a folder")
    if "://" in path:
        raise ConfigError(f"cannot write {path!r}: outputs are local paths, not URLs")
    full = os.path.abspath(os.path.expanduser(path))
    real = os.path.realpath(full)
    streams = ("/dev/std", "/dev/fd/", "/dev/tty", "/proc/")  # /dev/shm holds regular files: not among them
    if path == "-" or any(p.startswith(streams) for p in (full, real)) or (
            os.path.exists(real) and not os.path.isdir(real) and not os.path.isfile(real)):
        raise ConfigError(f"cannot write {path!r}: outputs are regular files, written whole (a temporary file "
                          f"beside the path, then moved over it), not standard output, a device or a pipe")
    if directory:
        if os.path.exists(full) and not os.path.isdir(full):
            raise ConfigError(f"{what} {path!r} is a file")
        parent = full
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
    else:
        if os.path.isdir(full):
            raise ConfigError(f"{what} {path!r} is a directory")
        if os.path.exists(full) and not os.access(full, os.W_OK):
            raise ConfigError(f"cannot write {path!r}: the file exists and is not writable")
        parent = os.path.dirname(full)
        if not os.path.isdir(parent):
            raise ConfigError(f"cannot write {path!r}: directory {parent!r} does not exist")
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise ConfigError(f"cannot write {path!r}: {parent!r} is not a writable directory")


def write_file_atomically(path: str, data: bytes, follow_link: bool = True) -> None:
    """Write a local file's bytes through `atomic_local_file`."""
    with atomic_local_file(path, follow_link) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def _local_files(top: str) -> list[str]:
    """Every file under a local folder (or `top` itself, a file), symlinked folders followed once each
    (`find` would list a symlinked folder as one entry: a task's class folder, or a table's rows kept
    on another disk, would be left out). A link whose target is gone is left out with a warning naming it."""
    if os.path.isfile(top):
        return [top]
    above: dict[str, frozenset[str]] = {}  # a folder -> the real paths of it and the folders it is in
    files, broken = [], []
    def unreadable(exc: OSError) -> None:  # left out without a word, a folder's rows were missing from a read
        where = os.path.relpath(exc.filename, top) if exc.filename else ""
        if exc.errno != errno.ENOENT and not any(p.startswith(".") for p in where.split(os.sep) if p != ".."):
            raise exc  # not one removed meanwhile, nor a hidden one (a task's `.Trash-1001`: never read)

    for directory, folders, names in os.walk(top, followlinks=True, onerror=unreadable):
        real = os.path.realpath(directory)
        chain = above.get(os.path.dirname(directory), frozenset())
        if real in chain:  # a link back up the tree
            folders[:] = []
            continue
        above[directory] = chain | {real}
        for n in names:
            path = os.path.join(directory, n)
            if os.path.isfile(path):
                files.append(path)
            elif os.path.islink(path) and not os.path.exists(path):
                broken.append(path)
    if broken:
        log.warning("left out %d symbolic link(s) whose target is gone under %s: %s%s", len(broken), top,
                    ", ".join(f"{p} -> {_link_target(p)}" for p in broken[:3]), " ..." if len(broken) > 3 else "")
    return files


def _link_target(path: str) -> str:
    """Where a symbolic link points ('?' if it was removed meanwhile: the listing goes on)."""
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def make_folders(directory: str) -> None:
    """`os.makedirs`, every folder it creates flushed into its parent: a file reported as written into a
    new folder (a table's first row of a shard, a new standard's) survives a power loss with its folder."""
    created, d = [], os.path.abspath(directory)
    while not os.path.isdir(d) and os.path.dirname(d) != d:
        created.append(d)
        d = os.path.dirname(d)
    os.makedirs(directory, exist_ok=True)
    for d in reversed(created):
        _fsync_dir(os.path.dirname(d))


def _fsync_dir(path: str) -> None:
    """Flush a directory's entries to disk (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories
    finally:
        os.close(fd)



def _leaf_columns(name: str, type_: pa.DataType) -> list[tuple[str, pa.DataType]]:
    """The Parquet leaf columns of an Arrow field: their paths as pyarrow names them, and types."""
    if pa.types.is_list(type_) or pa.types.is_large_list(type_) or pa.types.is_fixed_size_list(type_):
        return _leaf_columns(f"{name}.list.element", type_.value_type)
    if pa.types.is_struct(type_):
        return [leaf for f in type_ for leaf in _leaf_columns(f"{name}.{f.name}", f.type)]
    return [(name, type_)]


def parquet_options(schema: pa.Schema, portable: bool = False) -> dict:
    """How zooselect writes Parquet (pyarrow's `write_table` / `ParquetWriter` options): zstd; float
    columns (the embeddings) byte-stream-split, which zstd then shrinks by their exponent bytes and
    reads without entropy-decoding their mantissas (about 10 % smaller than plain zstd, and 1.15-1.3x
    faster for pyarrow to decode: docs/performance.md); the other columns dictionary-encoded, pyarrow's
    default.
    DuckDB, Polars and pandas read the byte-stream-split encoding (a test checks); Spark's vectorized
    reader may not. `portable`: plain zstd, for any reader (what users take away: `jobs.table export`,
    the results of `jobs.select`)."""
    leaves = [leaf for f in schema for leaf in _leaf_columns(f.name, f.type)]
    floats = [path for path, t in leaves if pa.types.is_floating(t)]
    if portable or not floats:
        return {"compression": "zstd"}
    return {"compression": "zstd", "use_byte_stream_split": floats,
            "use_dictionary": [path for path, _ in leaves if path not in floats]}


def parquet_bytes(table: pa.Table, row_group_size: int | None = None, portable: bool = False) -> bytes:
    """A table as Parquet bytes (`parquet_options`, `portable` as there), `row_group_size` rows per row
    group (pyarrow's default: 1 Mi). The same table gives the same bytes."""
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=row_group_size, **parquet_options(table.schema, portable))
    return sink.getvalue()


def write_row_groups(path: str, schema: pa.Schema, tables: Iterable[pa.Table], row_group_size: int) -> int:
    """Write a stream of tables to a local Parquet file (`parquet_options`) in row groups of
    `row_group_size` rows, whatever the tables' sizes (the last group may be smaller); return its rows.
    Holds the tables of at most one row group besides the one in hand."""
    if row_group_size < 1:
        raise ConfigError(f"row group size must be >= 1, got {row_group_size}")
    rows, pending, held = 0, [], 0
    with pq.ParquetWriter(path, schema, **parquet_options(schema)) as out:
        for t in tables:
            rows += t.num_rows
            pending.append(t)
            held += t.num_rows
            if held < row_group_size:
                continue
            whole = pa.concat_tables(pending)
            full = held - held % row_group_size
            out.write_table(whole.slice(0, full), row_group_size=row_group_size)
            rest = whole.slice(full)
            # a slice keeps every buffer it came from: keep only the rest's own
            pending, held = ([rest.combine_chunks()] if rest.num_rows else []), rest.num_rows
        if held:
            out.write_table(pa.concat_tables(pending), row_group_size=row_group_size)
    return rows


def _first_line(exc: BaseException) -> str:
    """An exception's message in one line (its type's name if it has none)."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _spool_in_use(path: str) -> bool:
    """Whether a live `Store.write_tables` holds the spool file `path` (its shared lock; a killed
    writer's lock is gone with it)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def as_store(store: "Store | str | os.PathLike[str]") -> "Store":
    """`store` itself, or the Store a URL or local path names: the library's functions take either (the
    jobs take a URL). Anything else is a ConfigError naming it."""
    return store if isinstance(store, Store) else Store(store)


class Store:
    """A root URL plus the fsspec filesystem behind it; paths below are relative to the root."""

    def __init__(self, url: str | os.PathLike[str], *, s3_endpoint: str | None = None, s3_region: str | None = None,
                 retry: RetryPolicy = RetryPolicy()) -> None:
        if isinstance(url, os.PathLike):  # a pathlib.Path to a local store
            url = os.fspath(url)
        if not isinstance(url, str):  # a Standard in the store's place (arguments swapped): its name, not its arrays
            name = getattr(url, "id", None)
            shown = repr(name) if isinstance(name, str) else brief(url)
            raise ConfigError(f"a store should be a Store, a URL or a local path, got {type(url).__name__} {shown}")
        if not url.strip():
            raise ConfigError(f"store URL must be a non-empty string, got {url!r}")
        if url != url.strip() or any(ord(c) < 32 or ord(c) == 127 for c in url):
            # ' s3://b/x' was a local folder named ' s3:', 's3://b/x ' another S3 prefix than 's3://b/x'
            raise ConfigError(f"store URL {url!r} holds leading or trailing spaces or control characters")
        check_url(url)
        match = _SCHEME.match(url)
        scheme = match.group(1).lower() if match else "file"
        if scheme not in SUPPORTED_SCHEMES:
            raise ConfigError(f"unsupported store URL scheme {scheme!r} in {url!r} "
                              f"(use a local path or s3://bucket/prefix)")
        self.url = url.rstrip("/")
        self.scheme = scheme
        self.retry = retry
        self.bucket: str | None = None  # S3's
        self.endpoint: str | None = None
        if scheme == "file":
            path = file_url_path(url) if match else url
            self.root = os.path.abspath(os.path.expanduser(path))
            self.fs = fsspec.filesystem("file")
        elif scheme == "s3":
            bucket_path = match.group(2).rstrip("/")
            if bucket_path and "" in bucket_path.split("/"):
                # s3://bucket//zoo: a write keeps the empty component in its key, a listing drops it
                raise ConfigError(f"empty path component ('//') in store URL {url!r}")
            if {".", ".."} & set(bucket_path.split("/")):  # an S3 key is not normalised: HTTP 400 InvalidRequest
                raise ConfigError(f"'.' or '..' path component in store URL {url!r}: S3 keys are not folders")
            bucket = bucket_path.split("/")[0]
            if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
                raise ConfigError(f"invalid S3 bucket name {bucket!r} in store URL {url!r}")
            self.root = bucket_path
            self.bucket = bucket
            endpoint = (s3_endpoint or os.environ.get("AWS_ENDPOINT_URL_S3")
                        or os.environ.get("AWS_ENDPOINT_URL"))
            if endpoint and not re.match(r"^https?://[^\s/]+", endpoint):
                raise ConfigError(f"S3 endpoint must be an http(s) URL, got {endpoint!r}")
            self.endpoint = endpoint
            client_kwargs = {}
            region = s3_region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            if region:
                client_kwargs["region_name"] = region
            import s3fs  # noqa: F401  (registers the protocol; fails clearly if missing)

            # `retry` is the only retry layer: botocore (total_max_attempts=1) and s3fs (retries=1) try
            # once per call, else their retries multiply ours (a hung endpoint: 90 requests, 45 min a call).
            self.fs = fsspec.filesystem(
                "s3", endpoint_url=endpoint, client_kwargs=client_kwargs,
                config_kwargs={"retries": {"total_max_attempts": 1, "mode": "standard"},
                               "connect_timeout": 5, "read_timeout": 30},
                skip_instance_cache=True, use_listings_cache=False)
            self.fs.retries = 1  # a class attribute of S3FileSystem, not a constructor argument
        else:
            self.root = match.group(2).rstrip("/")
            self.fs = fsspec.filesystem(scheme)

    # -- the choke point ---------------------------------------------------------------
    def _call(self, what: str, path: str, fn: Callable[[], T]) -> T:
        for attempt in range(self.retry.attempts):
            try:
                return fn()
            except FileNotFoundError:
                raise
            except Exception as exc:  # noqa: BLE001 - classified below
                if not _is_transient(exc) or attempt == self.retry.attempts - 1:
                    raise self._translate(what, path, exc) from exc
                delay = self.retry.delay(attempt)
                log.warning("transient storage error on %s %s (%s); retry %d/%d in %.2fs",
                            what, self._display(path), type(exc).__name__, attempt + 1,
                            self.retry.attempts - 1, delay)
                if self.scheme == "s3":
                    self.fs.invalidate_cache()
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _translate(self, what: str, path: str, exc: BaseException) -> StoreError:
        text = _scrub(str(exc)).splitlines()[0] if str(exc) else type(exc).__name__
        where = self._display(path)
        if isinstance(exc, PermissionError) and self.scheme == "file":
            return StoreError(f"permission denied for {what} {where}: {text}")
        code = _error_code(exc)
        explained = code if code in _EXPLAINED else next((c for c in _EXPLAINED if _mentions(exc, (c,))), None)
        if explained:
            return StoreError(f"storage error for {what} {where}: {explained}: {_EXPLAINED[explained]}")
        if isinstance(exc, PermissionError) or code in _DENIED_CODES or _mentions(exc, _DENIED_CODES):
            return StoreError(f"access denied for {what} {where}: check the AWS credentials "
                              f"(environment or profile) for this store")
        if code == "NoSuchBucket" or _mentions(exc, ("NoSuchBucket",)):
            return self._no_bucket()
        if _is_transient(exc):
            return StoreError(f"storage unreachable for {what} {where} after "
                              f"{self.retry.attempts} attempts: {type(exc).__name__}: {text}")
        http = _http_status(exc)
        if code and code not in text:  # s3fs's message drops it (e.g. "[Errno 22] Content-MD5 ... required")
            text = f"{code}{f' (HTTP {http})' if http else ''}: {text}"
        return StoreError(f"storage error for {what} {where}: {type(exc).__name__}: {text}")

    def _full(self, rel: str) -> str:
        rel = rel.strip("/")
        if ".." in rel.split("/"):
            raise ConfigError(f"refusing a store path with '..': {rel!r}")
        return f"{self.root}/{rel}" if rel else self.root

    def _display(self, rel: str) -> str:
        return f"{self.url}/{rel.strip('/')}" if rel else self.url

    # -- public API --------------------------------------------------------------------
    def location(self, rel: str) -> str:
        """Where others find an object: its absolute path in a local store (the store's URL may be
        relative, and it is read later from other working directories), else its URL."""
        return os.path.join(self.root, rel) if self.scheme == "file" else f"{self.url}/{rel}"

    def check(self, writable: bool = True, write_prefix: str = "") -> None:
        """Fail with a one-line StoreError unless the store root is reachable and usable (`writable`:
        writable too, a local one by the permissions of `write_prefix` (or the nearest folder above it that
        exists), an S3 one by writing and deleting the empty hidden
        object WRITE_CHECK under `write_prefix`, where the job writes: credentials may allow writes
        there only; a job that only reads, such as a selection not saving, need not)."""
        if self.scheme == "s3":
            prefix = self.root[len(self.bucket):].strip("/")
            try:  # one key listed under the store's prefix (not exists(): s3fs turns every error into False;
                # not ls(bucket): that pages through the bucket's whole top level)
                self._call("check", "", lambda: self.fs.call_s3(
                    "list_objects_v2", Bucket=self.bucket, Prefix=f"{prefix}/" if prefix else "", MaxKeys=1))
            except FileNotFoundError as exc:
                raise StoreError(f"bucket {self.bucket!r} does not exist "
                                 f"(store {self.url!r}, endpoint {self.endpoint or 'AWS default'})") from exc
            if writable:  # read-only credentials fail here, not when the work is done and its results are lost
                probe = f"{write_prefix.strip('/')}/{WRITE_CHECK}".lstrip("/")
                self.write_bytes(probe, b"")
                try:
                    self.delete(probe)
                except StoreError as exc:  # hidden, never listed: left (one, rewritten)
                    log.warning("could not delete %s (%s)", self._display(probe), exc)
        elif self.scheme == "file":
            if os.path.exists(self.root) and not os.path.isdir(self.root):
                raise StoreError(f"store path {self.root!r} exists and is not a directory")
            target = os.path.join(self.root, write_prefix.strip("/")) if write_prefix.strip("/") else self.root
            parent = target  # the folder the job writes, or the nearest that exists (it makes the rest)
            while not os.path.exists(parent):
                parent = os.path.dirname(parent)
            if writable and not os.path.isdir(parent):  # `results` a file: the save at the end would fail
                raise StoreError(f"store path {self.root!r}: {parent!r} is a file, not a folder")
            if writable and not os.access(parent, os.W_OK):
                shown = repr(self.root) if parent == self.root or target == self.root else f"{self.root!r} ({parent!r})"
                raise StoreError(f"store path {shown} is not writable")

    def exists(self, rel: str) -> bool:
        return self._call("exists", rel, lambda: self.fs.exists(self._full(rel)))

    def read_bytes(self, rel: str) -> bytes:
        try:
            return self._call("read", rel, lambda: self.fs.cat_file(self._full(rel)))
        except FileNotFoundError as exc:
            raise ObjectGoneError(f"no object at {self._display(rel)}") from exc

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write atomically: local files via rename, object stores via one PUT (a multipart upload from
        100 MiB, s3fs's, which the store completes or aborts whole: all-or-nothing too)."""
        full = self._full(rel)
        if self.scheme == "file":
            def write_local() -> None:
                make_folders(os.path.dirname(full))
                write_file_atomically(full, data, follow_link=False)
            self._call("write", rel, write_local)
        else:
            try:
                self._call("write", rel, lambda: self.fs.pipe_file(full, data))
            except FileNotFoundError as exc:
                raise self._no_bucket() from exc

    def _no_bucket(self) -> StoreError:
        """What a write's FileNotFoundError means on an object store."""
        return StoreError(f"bucket {self.bucket or self.root!r} does not exist (store {self.url!r})")

    def delete(self, rel: str, flush: bool = True) -> bool:
        """Delete one object; return False when it did not exist. On a local store the folder is then
        flushed (a delete survives a power loss, as a write does); `flush=False` leaves that to one
        `flush_folders` after many deletes."""
        full = self._full(rel)
        if self.scheme == "s3" and not self._call("exists", rel, lambda: self.fs.exists(full)):
            return False  # S3 DeleteObject succeeds on a missing key
        try:
            self._call("delete", rel, lambda: self.fs.rm_file(full))
        except FileNotFoundError:
            return False
        if flush:
            self.flush_folders([rel])
        return True

    def flush_folders(self, rels: Iterable[str]) -> None:
        """Flush the folders holding these objects to disk, each once (local stores; a no-op elsewhere)."""
        if self.scheme == "file":
            for folder in sorted({os.path.dirname(self._full(r)) for r in rels}):
                _fsync_dir(folder)

    def list(self, prefix: str, suffix: str = "") -> list[str]:
        """Relative paths of the objects under `prefix` ending in `suffix`, sorted."""
        full = self._full(prefix)
        try:
            found = self._call("list", prefix, lambda: _local_files(full) if self.scheme == "file"
                               else self.fs.find(full))
        except FileNotFoundError:
            return []
        root = self._full("")
        out = []
        for path in found:
            if os.sep != "/":  # a local path's separators (a backslash is a name's character on POSIX)
                path = path.replace(os.sep, "/")
            if self.scheme == "s3" or self.scheme == "memory":
                path = path.lstrip("/")
                root_cmp = root.lstrip("/")
            else:
                root_cmp = root
            rel = path[len(root_cmp):].lstrip("/") if path.startswith(root_cmp) else path
            name = rel.rsplit("/", 1)[-1]
            if not name or name.startswith(".") or not rel.endswith(suffix):  # no name: a folder (SeaweedFS's, a
                # console's "folder/" object), e.g. one a write check left empty
                continue
            out.append(rel)
        return sorted(out)

    def sha256(self, rel: str, piece_bytes: int = 1 << 24) -> str:
        """The sha256 of an object's bytes, read in pieces of `piece_bytes` so that it is never held
        whole (a checkpoint of gigabytes), retried from its start on a transient error.
        ObjectGoneError if there is no object."""
        full = self._full(rel)

        def digest() -> str:
            h = hashlib.sha256()
            with (open(full, "rb") if self.scheme == "file" else
                  self.fs.open(full, "rb", block_size=piece_bytes, cache_type="none")) as fh:
                for piece in iter(lambda: fh.read(piece_bytes), b""):
                    h.update(piece)
            return h.hexdigest()
        try:
            return self._call("read", rel, digest)
        except FileNotFoundError as exc:
            raise ObjectGoneError(f"no object at {self._display(rel)}") from exc

    def stamp(self, rel: str) -> str:
        """A fingerprint of an object's version, without reading it (one HEAD or stat): on S3 its ETag,
        size and time of writing; locally its size, mtime, ctime and inode (ctime cannot be set back,
        so every rewrite changes it). Equal stamps mean the same bytes; a store that gives none returns "" (then
        compare the bytes). ObjectGoneError if there is no object."""
        full = self._full(rel)
        try:
            if self.scheme == "file":
                st = self._call("stat", rel, lambda: os.stat(full))
                return f"stat:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"
            info = self._call("stat", rel, lambda: self.fs.info(full))
        except FileNotFoundError as exc:
            raise ObjectGoneError(f"no object at {self._display(rel)}") from exc
        etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
        # The time too: an ETag comes back with its bytes, so an object replaced and put back while it
        # was read would otherwise match the stamp taken before.
        modified = info.get("LastModified") or info.get("last_modified") or ""
        modified = modified.isoformat() if hasattr(modified, "isoformat") else str(modified)
        return f"etag:{etag}:{info.get('size')}:{modified}" if etag else ""

    def remove_stale_temporaries(self, prefix: str, older_than_s: float) -> int:
        """Delete the temporary files of local writes that were killed part-way (a write that ends,
        even by an error, removes its own) and untouched for `older_than_s`: hidden, so never listed
        or read, but they hold disk. Return how many; one that cannot be removed is logged and left.
        Elsewhere an object is written in one PUT or upload, from a spool file in the temporary
        directory (`write_tables`): those of killed writes are removed instead."""
        cutoff = time.time() - older_than_s
        removed = 0
        if self.scheme == "file":
            where = self._display(prefix)
            candidates = [p for p in _local_files(self._full(prefix)) if _TEMPORARY.fullmatch(os.path.basename(p))]
        else:  # an upload still reading its file has it open: a removal leaves it whole
            where = tempfile.gettempdir()
            try:
                candidates = [os.path.join(where, n) for n in os.listdir(where) if _SPOOL.fullmatch(n)]
            except OSError:
                candidates = []
        for path in candidates:
            try:
                st = os.lstat(path)
                if st.st_mtime >= cutoff:
                    continue
                if self.scheme != "file" and (not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid()
                                              or _spool_in_use(path)):
                    continue  # a shared temporary directory: only this user's files, none being uploaded
                os.remove(path)
                removed += 1
            except FileNotFoundError:
                continue  # its writer renamed or removed it meanwhile
            except OSError as exc:
                log.warning("cannot remove the temporary file of an interrupted write %s: %s", path, exc)
        if removed:
            log.info("removed %d temporary file(s) of interrupted writes under %s", removed, where)
        return removed

    def remove_empty_folders(self, prefix: str) -> None:
        """Remove the empty folders under `prefix` (kept: `prefix` itself), in a local store. On S3 a folder
        is a key prefix and goes with its last object (a server that keeps an emptied one, as SeaweedFS's
        filer does, keeps it: not removed here).
        Only for folders no one writes into any more (a replaced compaction's key index): a writer
        making a file in a folder removed just before would fail."""
        if self.scheme != "file":
            return
        for folder, _, _ in sorted(os.walk(self._full(prefix)), key=lambda w: -len(w[0]))[:-1]:
            try:
                os.rmdir(folder)
            except OSError:  # not empty, or gone
                continue

    def has_entries(self, prefix: str) -> bool:
        """Whether anything is one level under `prefix` (one LIST call, not a full listing).
        A directory left empty counts: locally, and on servers that keep empty folders (SeaweedFS)."""
        full = self._full(prefix)
        try:
            return bool(self._call("list", prefix, lambda: self.fs.ls(full, detail=False)))
        except FileNotFoundError:
            return False

    def read_many(self, rels: Iterable[str], threads: int = 16, missing_ok: bool = False) -> list[bytes | None]:
        """The bytes of many objects, read concurrently (object stores reward parallelism) by `threads`
        threads. `missing_ok`: an object that is gone reads as None instead of raising ObjectGoneError."""
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads should be a whole number >= 1, got {threads!r}")
        def read(rel: str) -> bytes | None:
            try:
                return self.read_bytes(rel)
            except ObjectGoneError:
                if missing_ok:
                    return None
                raise

        rels = list(rels)
        if len(rels) <= 1:
            return [read(r) for r in rels]
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return list(pool.map(read, rels))

    def read_table(self, rel: str, data: bytes | None = None) -> pa.Table:
        """A Parquet object (or its already-read `data`) as an Arrow table."""
        data = self.read_bytes(rel) if data is None else data
        try:
            # Not pq.read_table: its dataset reader over an in-memory file left the process to abort at
            # exit ("terminate called without an active exception", rc 134) in 16 of 40 runs here; 0 of 80 so.
            # READ_THREADS: see there.
            return pq.ParquetFile(pa.BufferReader(data)).read(use_threads=READ_THREADS)
        except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
            raise CorruptObjectError(f"corrupt Parquet object {self._display(rel)}: {_first_line(exc)}") from exc

    def read_table_columns(self, rel: str, columns: list[str]) -> pa.Table:
        """Only `columns` of a Parquet object (reads the footer and those column chunks: on S3, ranged
        GETs of those bytes alone, all at once); columns the object lacks are left out (the caller says
        whether that is an error).

        I/O errors go through the retry policy; a parse error (Arrow raises a plain
        OSError for a corrupt footer) is a corrupt object, never retried as transient.
        """
        def read() -> pa.Table | _Corrupt:
            # On S3 the chunks are fetched at once, in parallel (`_Ranges`); s3fs's file read-ahead
            # fetched 50 MB at each chunk, most of a segment, and a reader's ranged reads run one by one.
            src = _Ranges(self.fs, self._full(rel)) if self.scheme == "s3" else self.fs.open(self._full(rel), "rb")
            with src as fh:
                watched = _WatchedFile(fh)
                def plan() -> tuple[pq.ParquetFile, list[str], list[tuple[int, int]]]:
                    pf = pq.ParquetFile(watched)
                    wanted = [c for c in columns if c in set(pf.schema_arrow.names)]
                    return pf, wanted, _chunk_ranges(pf.metadata, wanted) if isinstance(fh, _Ranges) else []

                planned = _parsed(watched, plan)  # a damaged footer (bad offsets too) is a corrupt object
                if isinstance(planned, _Corrupt):
                    return planned
                pf, wanted, ranges = planned
                if ranges:
                    fh.fetch(ranges)  # an I/O error: classified by _call
                return _parsed(watched, lambda: pf.read(columns=wanted, use_threads=READ_THREADS))

        return self._parquet(rel, read)

    def iter_row_groups(self, rel: str, batch_bytes: int | None = None,
                        rows: Collection[int] | None = None) -> Iterator[pa.Table]:
        """A Parquet object's row groups, in order, one table each, read and decoded about `batch_bytes`
        of the object at a time (decoded on this thread, `READ_THREADS`; on S3 a batch's ranges fetched
        in parallel): memory holds one batch, not the whole object (a segment of 50,000
        per-source rows is 3.7 GB; one compacted before session 27 is a single row group, read whole
        until recompacted). A local file is read by Arrow itself (no copies of its bytes in Python).
        Errors as `read_table_columns`; the object gone between two batches is ObjectGoneError.
        `batch_bytes`: ROW_GROUP_BATCH_BYTES when None. `rows`: only the row groups holding one of these
        row numbers (counted from 0 over the object) are read, each whole."""
        batch_bytes = ROW_GROUP_BATCH_BYTES if batch_bytes is None else batch_bytes
        if self.scheme == "file":
            yield from self._local_row_groups(rel, batch_bytes, rows)
            return

        Batches = list[tuple[list[int], list[tuple[int, int]]]]  # row groups, and their byte ranges

        def open_ranges() -> tuple[_Ranges, _WatchedFile, pq.ParquetFile, Batches] | _Corrupt:
            src = _Ranges(self.fs, self._full(rel))
            watched = _WatchedFile(src)

            def plan() -> tuple[pq.ParquetFile, Batches]:  # a damaged footer (bad offsets too): corrupt
                pf = pq.ParquetFile(watched)
                batches = _row_group_batches(pf.metadata, batch_bytes, rows)
                return pf, [(g, _chunk_ranges(pf.metadata, None, g)) for g in batches]

            planned = _parsed(watched, plan)
            return planned if isinstance(planned, _Corrupt) else (src, watched, *planned)

        src, watched, pf, batches = self._parquet(rel, open_ranges)
        for groups, spans in batches:
            def read(groups: list[int] = groups, spans: list[tuple[int, int]] = spans) -> pa.Table | _Corrupt:
                src.forget()
                src.fetch(spans)
                return _parsed(watched, lambda: pf.read_row_groups(groups, use_threads=READ_THREADS))

            table = self._parquet(rel, read)
            src.forget()
            yield from _split_groups(table, pf.metadata, groups)

    def _local_row_groups(self, rel: str, batch_bytes: int, rows: Collection[int] | None) -> Iterator[pa.Table]:
        """`iter_row_groups` of a local file. Arrow raises OSError for a parse error and for an I/O error
        alike: one with an errno (EIO, EACCES) is an I/O error, for the retry policy; others are a corrupt
        object."""
        def parsed(fn: Callable[[], T]) -> T | _Corrupt:
            try:
                return fn()
            except (pa.ArrowException, OSError) as exc:
                if isinstance(exc, OSError) and exc.errno is not None:
                    raise
                return _Corrupt(exc)

        def plan() -> tuple[pq.ParquetFile, list[list[int]]]:
            pf = pq.ParquetFile(self._full(rel))
            return pf, _row_group_batches(pf.metadata, batch_bytes, rows)

        pf, batches = self._parquet(rel, lambda: parsed(plan))
        try:
            for groups in batches:
                table = self._parquet(rel, lambda groups=groups: parsed(
                    lambda: pf.read_row_groups(groups, use_threads=READ_THREADS)))
                yield from _split_groups(table, pf.metadata, groups)
        finally:
            pf.close()

    def _parquet(self, rel: str, read: Callable[[], T | _Corrupt]) -> T:
        """`read()` of a Parquet object under the retry policy: the object missing is ObjectGoneError, a
        parse error (`_Corrupt`) a StoreError naming the object."""
        try:
            result = self._call("read", rel, read)
        except FileNotFoundError as exc:
            raise ObjectGoneError(f"no object at {self._display(rel)}") from exc
        if isinstance(result, _Corrupt):
            raise CorruptObjectError(f"corrupt Parquet object {self._display(rel)}: "
                                     f"{_first_line(result.exc)}") from result.exc
        return result

    def write_table(self, rel: str, table: pa.Table, row_group_size: int | None = None) -> None:
        """Write a Parquet object (`parquet_bytes`)."""
        self.write_bytes(rel, parquet_bytes(table, row_group_size))

    def write_tables(self, rel: str, schema: pa.Schema, tables: Iterable[pa.Table], row_group_size: int) -> int:
        """Write a Parquet object (`parquet_options`) from a stream of tables of `schema`, `row_group_size`
        rows per row group; return its rows. Memory holds a row group and the table in hand, never the
        object: the row groups go to a local temporary file, which then becomes the object whole or not
        at all (locally renamed, `atomic_local_file`; elsewhere uploaded, on S3 in parts of
        UPLOAD_PART_BYTES, and retried whole). A StoreError raised by `tables` propagates as it is,
        and nothing is written. A remote write's spool file is in the temporary directory (`TMPDIR`):
        a process killed mid-write leaves it there."""
        full = self._full(rel)
        if self.scheme == "file":
            try:
                make_folders(os.path.dirname(full))
                with atomic_local_file(full, follow_link=False) as tmp:
                    return write_row_groups(tmp, schema, tables, row_group_size)
            except OSError as exc:  # not retried: the stream is read once
                if isinstance(exc, PermissionError):
                    raise self._translate("write", rel, exc) from exc
                raise StoreError(f"storage error for write {self._display(rel)}: {type(exc).__name__}: "
                                 f"{_first_line(exc)}") from exc
        try:
            fd, tmp = tempfile.mkstemp(prefix=".zooselect-spool-", suffix=".parquet")
        except OSError as exc:
            raise StoreError(f"cannot make a local file to write {self._display(rel)} through, in "
                             f"{tempfile.gettempdir()!r} (TMPDIR): {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # in use: `remove_stale_temporaries` leaves it, however old
            rows = self._spool(rel, tmp, schema, tables, row_group_size)
            parts = {"chunksize": UPLOAD_PART_BYTES, "max_concurrency": UPLOAD_PARTS_AT_ONCE} \
                if self.scheme == "s3" else {}
            try:
                self._call("write", rel, lambda: self.fs.put_file(tmp, full, **parts))
            except FileNotFoundError as exc:
                if not os.path.exists(tmp):
                    raise StoreError(f"the local file {tmp} holding {self._display(rel)} was removed "
                                     f"while it was uploaded") from exc
                raise self._no_bucket() from exc
            return rows
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            os.close(fd)

    def _spool(self, rel: str, path: str, schema: pa.Schema, tables: Iterable[pa.Table], row_group_size: int) -> int:
        """`write_row_groups` to the local file `path` that becomes `rel`; a local write error is a StoreError."""
        try:
            return write_row_groups(path, schema, tables, row_group_size)
        except OSError as exc:
            raise StoreError(f"cannot write {path}, the local file for {self._display(rel)}: "
                             f"{_first_line(exc)}") from exc

    def __repr__(self) -> str:
        return f"Store({self.url!r})"
