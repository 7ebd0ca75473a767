"""The one-command local dev stack: a Ray head plus a SeaweedFS S3 endpoint, loopback only.

    python -m cluster.devstack up      [--dir DIR] [--bucket NAME] [--prefix zoo] [--num-cpus N]
    python -m cluster.devstack status  [--dir DIR]
    python -m cluster.devstack down    [--dir DIR] [--purge]

`up` starts

- `weed mini` through `cluster.seaweed.SeaweedServer` on 127.0.0.1 with a random access
  key and secret (reused when DIR already holds data), and the bucket created;
- a Ray head (`ray start --head`) on 127.0.0.1 with ports chosen free here, in its own
  process group (so `down` stops exactly the processes it started, never other Ray
  clusters on the machine), with its temp dir under /tmp/zs-ray-<hash of DIR>, and the
  S3 variables in its environment: Ray workers inherit the raylet's environment, not
  the driver's, so this is how actors reach the store;

then writes DIR/zooselect.env (mode 0600) for the jobs. DIR (created 0700) must be the user's and
writable by no one else (`private_dir`: group write only in a group of the user's own), since it holds
the secrets and what `down` removes:

    source DIR/zooselect.env
    python -m jobs.embed --catalog catalog.yaml --store "$ZOOSELECT_STORE"

`down` stops both (SIGTERM, then SIGKILL after a grace period) and removes the pid and
env files; data stays in DIR/seaweed unless --purge. `status` exits 0 when everything
is up, 1 otherwise.

Ray notes: Ray replaces a loopback --node-ip-address with the machine's address unless
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ("no multi-node cluster": use 127.0.0.1), so that
variable is set for the head and written to the env file for the drivers. The head runs
with token authentication (RAY_AUTH_MODE=token) and a token of its own in
DIR/ray_auth_token (mode 0600), also named in the env file; without it a driver would
pick ~/.ray/auth_token (or none) and be refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from cluster.seaweed import (HOST, SeaweedError, SeaweedServer, _connectable, pick_ports,
                             validate_bucket)

log = logging.getLogger("zooselect.devstack")

ENV_FILE = "zooselect.env"
STATE_FILE = "devstack.json"
RAY_PID_FILE = "ray.pid"
RAY_TOKEN_FILE = "ray_auth_token"
SEAWEED_PID_FILE = "seaweed.pid"
RAY_LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
RAY_PORTS = ("gcs", "node_manager", "object_manager", "runtime_env_agent", "dashboard",
             "dashboard_agent_listen", "dashboard_agent_grpc", "metrics_export")


class DevstackError(RuntimeError):
    """The dev stack could not be started, inspected or stopped."""


def default_dir() -> str:
    return os.environ.get("ZOOSELECT_DEVSTACK_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "zooselect", "devstack")


# ----------------------------------------------------------------------- state files
def private_dir(path: str, create: bool = False) -> str:
    """`path` made absolute (created 0700 if missing and `create`), and refused unless it is the caller's
    own and no one else may write in it: the stack writes its secrets there, `source`s its env file and removes what its
    state file names, so a directory another user can change (a shared /tmp/zs-dev made first by
    someone else) would hand them the keys or the user's shell."""
    root = os.path.abspath(path)
    if create:
        os.makedirs(root, mode=0o700, exist_ok=True)
    elif not os.path.exists(root):
        return root
    st = os.stat(root)
    if st.st_uid != os.getuid():
        raise DevstackError(f"dev stack directory {root} belongs to uid {st.st_uid}, not to you: "
                            f"use a directory of your own (--dir)")
    if st.st_mode & 0o002 or (st.st_mode & 0o020 and not _own_group(st.st_gid)):
        raise DevstackError(f"dev stack directory {root} (mode {st.st_mode & 0o777:o}) is writable by others: "
                            f"chmod go-w it, or use another --dir")
    return root


def _own_group(gid: int) -> bool:
    """Whether only this user is in group `gid` (a user private group, as Debian's umask 002 relies on:
    `up` of an older version made its directory group-writable so)."""
    import grp
    import pwd

    me = pwd.getpwuid(os.getuid()).pw_name
    try:
        members = set(grp.getgrgid(gid).gr_mem)
    except KeyError:  # no such group: nobody is in it by name
        members = set()
    primary = {u.pw_name for u in pwd.getpwall() if u.pw_gid == gid}
    return (members | primary) <= {me}


def _write_private(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    _remove(tmp)  # a stale one, or a link planted there: never written through
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def load_state(root: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(root, STATE_FILE)) as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise DevstackError(f"unreadable dev stack state {os.path.join(root, STATE_FILE)}: {exc}")


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def env_vars(state: dict[str, Any]) -> dict[str, str]:
    """The variables the jobs need, from a dev stack state."""
    env: dict[str, str] = {}
    ray = state.get("ray")
    if ray:
        env["RAY_ADDRESS"] = f"{HOST}:{ray['ports']['gcs']}"
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN_PATH"] = ray["token_path"]
        if ray.get("dashboard"):
            env["RAY_API_SERVER_ADDRESS"] = f"http://{HOST}:{ray['ports']['dashboard']}"
    s3 = state.get("seaweed")
    if s3:
        env.update({"AWS_ENDPOINT_URL_S3": s3["endpoint"], "AWS_ACCESS_KEY_ID": s3["access_key"],
                    "AWS_SECRET_ACCESS_KEY": s3["secret_key"], "AWS_REGION": "us-east-1",
                    "AWS_DEFAULT_REGION": "us-east-1",
                    "ZOOSELECT_STORE": f"s3://{s3['bucket']}/{state['prefix']}".rstrip("/")})
    return env


def write_env_file(root: str, state: dict[str, Any]) -> str:
    path = os.path.join(root, ENV_FILE)
    lines = ["# zooselect dev stack (python -m cluster.devstack up); contains a local secret",
             f"# usage: source {shlex.quote(path)}"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env_vars(state).items()]
    if state.get("ray"):
        lines.append("unset RAY_AUTH_TOKEN  # the token file above is this cluster's")
    _write_private(path, "\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------- Ray
def _group_members(pgid: int) -> list[int]:
    """Live pids in process group `pgid` (Linux /proc); [] when none."""
    pids = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:  # state, ppid, pgrp
            pids.append(int(entry))
    return pids


def _is_ray_group(pgid: int) -> bool:
    for pid in _group_members(pgid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if b"ray" in fh.read():
                    return True
        except OSError:
            continue
    return False


def ray_running(ray: dict[str, Any] | None) -> bool:
    return bool(ray) and _is_ray_group(ray["pgid"]) and _connectable(HOST, ray["ports"]["gcs"])


def start_ray(root: str, *, num_cpus: int | None, num_gpus: int | None,
              extra_env: dict[str, str] | None = None, timeout: float = 120.0) -> dict[str, Any]:
    """Start the head; `extra_env` reaches every Ray worker (they inherit the raylet's
    environment, not the driver's), e.g. the S3 endpoint and credentials."""
    ray_bin = shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray")
    if not os.path.exists(ray_bin):
        raise DevstackError("`ray` command not found (pip install ray)")
    ports = dict(zip(RAY_PORTS, pick_ports(len(RAY_PORTS), grpc_offset=None)))
    # unix socket paths live under the temp dir: keep it short
    temp_dir = _ray_temp_dir(root)
    if os.path.lexists(temp_dir) and (os.path.islink(temp_dir) or os.lstat(temp_dir).st_uid != os.getuid()):
        raise DevstackError(f"Ray temp dir {temp_dir} exists and is not yours: remove it or use another --dir")
    cmd = [ray_bin, "start", "--head", "--node-ip-address", HOST, "--port", str(ports["gcs"]),
           "--dashboard-host", HOST, "--dashboard-port", str(ports["dashboard"]),
           "--node-manager-port", str(ports["node_manager"]),
           "--object-manager-port", str(ports["object_manager"]),
           "--runtime-env-agent-port", str(ports["runtime_env_agent"]),
           "--dashboard-agent-listen-port", str(ports["dashboard_agent_listen"]),
           "--dashboard-agent-grpc-port", str(ports["dashboard_agent_grpc"]),
           "--metrics-export-port", str(ports["metrics_export"]),
           "--temp-dir", temp_dir, "--disable-usage-stats"]
    if num_cpus is not None:
        cmd += ["--num-cpus", str(num_cpus)]
    if num_gpus is not None:
        cmd += ["--num-gpus", str(num_gpus)]
    # token authentication with a token of this stack's own (not ~/.ray/auth_token)
    token_path = os.path.join(root, RAY_TOKEN_FILE)
    _write_private(token_path, secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")
           and not (extra_env and k.startswith("AWS_"))}
    env.update(extra_env or {})
    env.update(RAY_LOOPBACK_ENV, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token_path)
    log_path = os.path.join(root, "ray-start.log")
    try:
        with open(log_path, "wb") as logfile:
            # a new session: the head's processes form one process group that `down` stops
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logfile,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                code = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                stop_group(proc.pid)
                raise DevstackError(f"`ray start` did not finish in {timeout:.0f}s (log {log_path})")
            except BaseException:  # Ctrl-C or SIGTERM: its own session would bring up a head nobody records
                stop_group(proc.pid)
                raise
        if code != 0:
            stop_group(proc.pid)
            with open(log_path, errors="replace") as fh:
                tail = "".join(fh.readlines()[-12:])
            raise DevstackError(f"`ray start` failed with exit code {code} (log {log_path}):\n{tail}")
    except BaseException:  # no head to record, so `down` would never remove its temp dir
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    ray = {"pgid": proc.pid, "ports": ports, "temp_dir": temp_dir, "log": log_path,
           "token_path": token_path}
    # the dashboard (and with it `ray job submit`) needs ray[default]; minimal ray has none
    ray["dashboard"] = _connectable(HOST, ports["dashboard"])
    _write_private(os.path.join(root, RAY_PID_FILE), f"{proc.pid}\n")
    return ray


def stop_group(pgid: int, grace: float = 3.0) -> None:
    """SIGTERM the process group we created, SIGKILL what is left after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not _group_members(pgid) and sys.platform.startswith("linux"):
            return
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _group_members(pgid):
                return
            time.sleep(0.2)


# ---------------------------------------------------------------------- commands
def cmd_up(args: argparse.Namespace) -> int:
    root = private_dir(args.dir, create=True)
    state = load_state(root)
    if state and _status(state, quiet=True):
        running = [name for name, key in (("Ray", "ray"), ("SeaweedFS", "seaweed")) if state.get(key)]
        wanted = [name for name, off in (("Ray", args.no_ray), ("SeaweedFS", args.no_s3)) if not off]
        if running != wanted:  # `up --no-ray`, then `up`: it said "already up" and started no Ray
            print(f"devstack up: a stack of {' and '.join(running) or 'nothing'} is already up in {root}; "
                  f"`down` it first to start {' and '.join(wanted) or 'nothing'}", file=sys.stderr)
            return 1
        print(f"dev stack already up; source {write_env_file(root, state)}")  # the file may have been removed
        return 0
    if state:  # leftovers of a stack that half died: clean up first
        _down(root, state, purge=False)
    validate_bucket(args.bucket)
    state = {"dir": root, "prefix": args.prefix.strip("/"), "ray": None, "seaweed": None}
    try:
        if not args.no_s3:
            old = _previous_seaweed_keys(root)
            server = SeaweedServer(args.bucket, root=os.path.join(root, "seaweed"),
                                   detached=True, access_key=old.get("access_key"),
                                   secret_key=old.get("secret_key"))
            server.start()
            state["seaweed"] = server.state()
            _write_private(os.path.join(root, SEAWEED_PID_FILE), f"{server.pid}\n")
            _write_private(os.path.join(root, STATE_FILE), json.dumps(state, indent=1))
        if not args.no_ray:
            state["ray"] = start_ray(root, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                                     extra_env=env_vars(state))
            _write_private(os.path.join(root, STATE_FILE), json.dumps(state, indent=1))
    except BaseException as exc:  # Ctrl-C too: nothing it started is left running
        _down(root, state, purge=False)
        if not isinstance(exc, (SeaweedError, DevstackError, OSError)):
            raise
        print(f"devstack up failed: {exc}", file=sys.stderr)
        return 1
    env_path = write_env_file(root, state)
    _status(state)
    print(f"source {env_path}")
    return 0


def _previous_seaweed_keys(root: str) -> dict[str, str]:
    """Reuse the identity of an earlier stack on the same data (files in the bucket stay
    readable with the same credentials)."""
    path = os.path.join(root, "seaweed", "s3.json")
    try:
        with open(path) as fh:
            cred = json.load(fh)["identities"][0]["credentials"][0]
        return {"access_key": cred["accessKey"], "secret_key": cred["secretKey"]}
    except (OSError, ValueError, KeyError, IndexError):
        return {}


def _stop_seaweed(state: dict[str, Any]) -> None:
    try:
        SeaweedServer.attach(state).stop()
    except SeaweedError as exc:
        log.warning("could not stop SeaweedFS: %s", exc)


def _ray_temp_dir(root: str) -> str:
    return f"/tmp/zs-ray-{hashlib.sha1(root.encode()).hexdigest()[:10]}"


def _stop_ray(state: dict[str, Any]) -> None:
    if _is_ray_group(state["pgid"]):
        stop_group(state["pgid"])
    temp_dir = state.get("temp_dir", "")
    if re.fullmatch(r"/tmp/zs-ray-[0-9a-f]{10}", temp_dir) and not os.path.islink(temp_dir):
        shutil.rmtree(temp_dir, ignore_errors=True)  # only a dir of the form start_ray makes


def _down(root: str, state: dict[str, Any] | None, *, purge: bool) -> None:
    stoppers = []
    if state and state.get("seaweed"):
        stoppers.append(threading.Thread(target=_stop_seaweed, args=(state["seaweed"],)))
    if state and state.get("ray"):
        stoppers.append(threading.Thread(target=_stop_ray, args=(state["ray"],)))
    for thread in stoppers:  # both at once: each takes a few seconds
        thread.start()
    for thread in stoppers:
        thread.join()
    for name in (ENV_FILE, STATE_FILE, RAY_PID_FILE, SEAWEED_PID_FILE, RAY_TOKEN_FILE):
        _remove(os.path.join(root, name))
    if purge:
        shutil.rmtree(os.path.join(root, "seaweed"), ignore_errors=True)


def cmd_down(args: argparse.Namespace) -> int:
    root = private_dir(args.dir)
    state = load_state(root)
    if state is None:
        print(f"no dev stack in {root}")
        if args.purge:
            shutil.rmtree(os.path.join(root, "seaweed"), ignore_errors=True)
        return 0
    _down(root, state, purge=args.purge)
    print("dev stack down" + (" (data removed)" if args.purge else
                              f" (data kept in {os.path.join(root, 'seaweed')})"))
    return 0


def _status(state: dict[str, Any], quiet: bool = False) -> bool:
    ok = True
    lines = []
    ray = state.get("ray")
    if ray:
        up = ray_running(ray)
        ok &= up
        dash = (f", dashboard http://{HOST}:{ray['ports']['dashboard']}"
                if ray.get("dashboard") else ", no dashboard (minimal ray)")
        lines.append(f"ray      {'up  ' if up else 'DOWN'}  {HOST}:{ray['ports']['gcs']}"
                     f"{dash if up else ''}")
    s3 = state.get("seaweed")
    if s3:
        server = SeaweedServer.attach(s3)
        up = server.running() and _connectable(HOST, s3["ports"]["s3"])
        ok &= up
        lines.append(f"seaweed  {'up  ' if up else 'DOWN'}  {s3['endpoint']}  "
                     f"bucket {s3['bucket']}")
    if not quiet:
        print("\n".join(lines) if lines else "nothing configured")
    return ok and bool(lines)


def cmd_status(args: argparse.Namespace) -> int:
    root = private_dir(args.dir)
    state = load_state(root)
    if state is None:
        print(f"no dev stack in {root}")
        return 1
    ok = _status(state)
    if ok:
        print(f"env file: {os.path.join(root, ENV_FILE)}")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.devstack",
        description="Local dev stack for zooselect: a Ray head and a SeaweedFS S3 endpoint, "
                    "both on 127.0.0.1, plus an env file the jobs can `source`.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", default=default_dir(),
                        help="state directory: pid files, env file, S3 data "
                             "(default: $ZOOSELECT_DEVSTACK_DIR or ~/.cache/zooselect/devstack)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{up,down,status}")
    up = sub.add_parser("up", parents=[common], help="start Ray and SeaweedFS, write the env file")
    up.add_argument("--bucket", default="zooselect", help="S3 bucket to create (3-63 chars)")
    up.add_argument("--prefix", default="zoo", help="key prefix of ZOOSELECT_STORE in the bucket")
    up.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may use")
    up.add_argument("--num-gpus", type=int, default=None, help="GPUs Ray may use")
    only = up.add_mutually_exclusive_group()  # both: nothing started, an empty env file
    only.add_argument("--no-ray", action="store_true", help="start only the S3 endpoint")
    only.add_argument("--no-s3", action="store_true", help="start only the Ray head")
    up.set_defaults(func=cmd_up)
    down = sub.add_parser("down", parents=[common], help="stop what `up` started")
    down.add_argument("--purge", action="store_true", help="also delete the S3 data")
    down.set_defaults(func=cmd_down)
    status = sub.add_parser("status", parents=[common],
                            help="show what runs; exit 0 only when all is up")
    status.set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DevstackError, SeaweedError) as exc:
        print(f"devstack: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
