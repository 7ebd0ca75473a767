"""The one thin execution module: everything that touches Ray lives here.

Jobs call `init`, `map_tasks` (with `put`, `fetch`) and `embed_with_actors`; the library stays Ray-free.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import os
import re
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, NoReturn, Sequence

from jobs.common import progress_bar, terminated
from selection.catalog import CatalogEntry
from selection.embedder import EmbedResult
from selection.errors import ClusterError, ConfigError
from selection.standard import Standard
from selection.storage import Store
from selection.table import HeldRows, segments_hold

log = logging.getLogger(__name__)
CONNECT_TIMEOUT_S = 5.0
WAIT_NOTICE_S = 300.0  # nothing finished for this long: say what is waiting (a node that never comes?)
FORWARDED_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")  # read by every Store, in every worker


def _host_port(address: str) -> tuple[str, int]:
    """(host, port) of a `host:port` or `ray://host:port` address, else a ConfigError."""
    rest = address[len("ray://"):] if address.startswith("ray://") else address
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")  # IPv6: [::1]:6379
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"Ray address must be host:port (or ray://host:port, auto), got {address!r}")
    return host, int(port)


# An HTTP/2 client preface and an empty SETTINGS frame; Ray's GCS and client server speak gRPC and
# answer with a SETTINGS frame (type 4 in the frame header's fourth byte).
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _check_reachable(address: str) -> None:
    """ClusterError unless `address` accepts a connection and answers like a gRPC server, within
    CONNECT_TIMEOUT_S. Ray itself retries a closed port for minutes and hangs on a port that is open
    but not Ray's. With TLS (RAY_USE_TLS) only the connection is checked."""
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S) as sock:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
                return
            sock.sendall(_H2_PREFACE)
            reply = b""
            while len(reply) < 4:
                chunk = sock.recv(9 - len(reply))
                if not chunk:
                    break
                reply += chunk
    except socket.timeout:
        raise ClusterError(f"cannot connect to Ray at {address!r}: no answer within "
                           f"{CONNECT_TIMEOUT_S:g} s (is it a Ray head's GCS or ray:// port?)") from None
    except OSError as exc:
        raise ClusterError(f"cannot connect to Ray at {address!r}: "
                           f"{exc.strerror or type(exc).__name__}") from None
    if len(reply) < 4 or reply[3] != 4:
        raise ClusterError(f"cannot connect to Ray at {address!r}: the port answers, but not like Ray "
                           f"(first bytes {reply[:12]!r}); is it a Ray head's GCS or ray:// port?")


def _connect(address: str, **kwargs: Any) -> None:
    """ray.init(address=...) after a bounded reachability check, with one-line errors."""
    import ray

    if address != "auto":
        _check_reachable(address)
        log.info("connecting to Ray at %s", address)
    try:
        ray.init(address=address, **kwargs)
    except (ValueError, ConnectionError, RuntimeError, TimeoutError) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # `ray start` turns token authentication on; a driver sends the token only when told to.
        hint = ""
        if "Failed to connect" in text:
            hint = ("; if the cluster uses token authentication, set RAY_AUTH_MODE=token (and "
                    "RAY_AUTH_TOKEN_PATH unless the token is ~/.ray/auth_token)")
        raise ClusterError(f"cannot connect to Ray at {address!r}: {text[:300]}{hint}") from None


def _job_env_vars() -> dict[str, str]:
    """The environment variables a submitted job's runtime env gives every worker (`ray job submit
    --runtime-env`; Ray hands the driver the job's config in RAY_JOB_CONFIG_JSON_ENV_VAR)."""
    try:
        env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("runtime_env") or {}
        # As Ray gives them to a worker (ray._private.utils.update_envs): $VAR and ${VAR} expanded from the
        # node's environment, then an unset ${VAR} of capitals, digits and underscores removed.
        return {str(k): re.sub(r"\$\{[A-Z0-9_]+\}", "", os.path.expandvars(str(v)))
                for k, v in (env.get("env_vars") or {}).items()}
    except (ValueError, AttributeError):
        return {}


def _quiet_auth_advice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def init(address: str | None = None) -> None:
    """Connect to a cluster (`address` or $RAY_ADDRESS), else start a local Ray."""
    import ray

    if ray.is_initialized():
        _own_sigterm()
        return
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True,
                              "include_dashboard": False}
    # The job's S3 endpoint (--s3-endpoint, jobs.common.open_store) holds in its workers too.
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    # Under `ray job submit`, Ray refuses a driver runtime env that sets a variable the job's sets too:
    # the job's reaches the workers already; a different value here could not.
    for key, value in _job_env_vars().items():
        if key in env and env.pop(key) != value:
            raise ConfigError(f"{key} is {os.environ[key]!r} here (--s3-endpoint or the environment) but "
                              f"{value!r} in the submitted job's runtime env, which is what its workers "
                              f"get; give one value")
    if address and address != "local":
        if env:
            kwargs["runtime_env"] = {"env_vars": env}
        _connect(address, **{k: v for k, v in kwargs.items() if k != "include_dashboard"})
    else:
        # A local Ray: workers import this checkout, whatever the current directory.
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + os.pathsep + os.environ.get("PYTHONPATH", "")
        kwargs["runtime_env"] = {"env_vars": env}
        # Ray turns token authentication on for a new local cluster, then tells how to turn it off, on
        # every run of every job: kept on, that advice is not shown.
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_quiet_auth_advice)
        ray.init(address="local", **kwargs)  # never attach to a stray `ray start` cluster
    _own_sigterm()


def _own_sigterm() -> None:
    """SIGTERM ends the job with one line and 143 (`jobs.common.terminated`): Ray's own handler, which
    `ray.init` installs, aborts with a C++ stack dump."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, terminated)


def cluster_resources() -> dict[str, float]:
    import ray

    return dict(ray.cluster_resources())


def node_resources() -> list[dict[str, float]]:
    """The resources of each alive node: an actor or task must fit on one node (`check_fits`)."""
    import ray

    return [{name: float(amount) for name, amount in node.get("Resources", {}).items()}
            for node in ray.nodes() if node.get("Alive")]


def _most(nodes: Sequence[dict[str, float]]) -> dict[str, float]:
    """The most of each resource that one node has (`nodes`: each node's resources)."""
    out: dict[str, float] = {}
    for n in nodes:
        for name, amount in n.items():
            out[name] = max(out.get(name, 0.0), amount)
    return out


def driver_node() -> str | None:
    """The id of this driver's node, where tasks see this machine's disk, if it has a CPU for them
    (a head started with `--num-cpus 0` has none), else None; None under Ray Client (`ray://`), whose
    driver runs on a machine outside the cluster."""
    import ray
    from ray.util.client import ray as client

    if client.is_connected():
        return None
    here = ray.get_runtime_context().get_node_id()
    return here if _resources_of(here).get("CPU", 0) >= 1 else None


def _resources_of(node_id: str) -> dict[str, float]:
    import ray

    return next((dict(n.get("Resources", {})) for n in ray.nodes() if n.get("NodeID") == node_id and n.get("Alive")), {})


def map_tasks(fn: Callable[..., Any], items: Sequence[Any], *, shared: Any = None, num_gpus: float = 0,
              desc: str = "", progress: bool = True, max_retries: int = 2,
              what: str = "a task", option: str = "", autoscaling: bool = False, keep: bool = False,
              node: str | None = None, fail_fast: bool = False) -> list[Any]:
    """Run `fn(shared, item)` as one Ray task per item (each holding 1 CPU and `num_gpus`);
    results in input order.

    `shared` (e.g. the standard) is put in the object store once. A task that raises a
    ZooselectError returns it (the caller reports it); a crashed worker is retried up
    to `max_retries` times, and then its item's result is a TaskCrashed (a ClusterError), any other
    error Ray raises for it a ClusterError. The tasks' 1 CPU and `num_gpus` are checked against the nodes
    first (`check_fits`; `autoscaling`: wait for nodes instead of refusing).
    `keep`: `fn` returns (result, value); only the result comes back, the value stays in the object
    store for later tasks, and each item's entry is (result, a reference to the value: `fetch` it).
    `node`: every task runs on that node (e.g. `driver_node()`), checked against its resources alone.
    `fail_fast`: the first ZooselectError a task raises is raised here, the unfinished tasks cancelled
    (a worker that crashed stays its item's `TaskCrashed`, not raised).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    need = {"CPU": (1, "1 per task"), **({"GPU": (num_gpus, option or "num_gpus")} if num_gpus else {})}
    if node is None:
        check_fits(what, need, node_resources(), autoscaling)
    else:
        check_fits(what, need, [_resources_of(node)], autoscaling=False, where=f"its node {node[:12]}… has")
    remote = ray.remote(num_cpus=1, num_gpus=num_gpus, max_retries=max_retries,
                        num_returns=2 if keep else 1)(_call_keeping if keep else _call_catching)
    if node is not None:
        remote = remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
    shared_ref = ray.put(shared)
    refs = [remote.remote(fn, shared_ref, item) for item in items]
    if not keep:
        return _gather(refs, desc, progress, fail_fast, what)
    return list(zip(_gather([r for r, _ in refs], desc, progress, fail_fast, what), [kept for _, kept in refs]))


def _last_line(exc: BaseException) -> str:
    """What a Ray error says in one line: its message's last line (Ray's put the traceback first), at most
    300 characters, or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[-1][:300] if text else type(exc).__name__


class TaskCrashed(ClusterError):
    """A task's worker or node died past its retries (e.g. out of memory): the item itself may be fine."""


def put(value: Any) -> Any:
    """`value` in the object store, once: a reference any task can `fetch`."""
    import ray

    return ray.put(value)


def fetch(ref: Any) -> Any:
    """The value of a reference from `put` or `map_tasks(keep=True)`, in a driver or a task."""
    import ray

    return ray.get(ref)


def _call_catching(fn: Callable[..., Any], shared: Any, item: Any) -> Any:
    from selection.errors import ZooselectError

    try:
        return fn(shared, item)
    except ZooselectError as exc:
        return exc


def _call_keeping(fn: Callable[..., Any], shared: Any, item: Any) -> tuple[Any, Any]:
    out = _call_catching(fn, shared, item)
    return out if isinstance(out, tuple) else (out, None)


def _wait(refs: list[Any], what: str) -> tuple[list[Any], list[Any]]:
    """ray.wait for one of `refs`; every WAIT_NOTICE_S that none finishes, a warning says how many wait
    (under --autoscaling, a request no node type can meet waits for ever, silently in Ray)."""
    import ray

    waited = 0.0
    while True:
        done, pending = ray.wait(refs, num_returns=1, timeout=WAIT_NOTICE_S)
        if done:
            return done, pending
        waited += WAIT_NOTICE_S
        log.warning("%d %s unfinished, none done in the last %.0f s; if they wait for resources, `ray status` "
                    "shows the demand no node meets", len(pending), what, waited)


def _gather(refs: list[Any], desc: str, progress: bool, fail_fast: bool = False, what: str = "a task") -> list[Any]:
    import ray

    from selection.errors import ZooselectError

    index = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    pending = list(refs)
    with progress_bar(total=len(refs), desc=desc, disable=not progress, unit="item") as bar:
        while pending:
            done, pending = _wait(pending, f"{desc or 'Ray'} task(s)")
            for ref in done:
                try:
                    results[index[ref]] = ray.get(ref)
                except ray.exceptions.RayError as exc:  # e.g. its worker died (out of memory) past its retries
                    crashed = isinstance(exc, (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError,
                                               ray.exceptions.NodeDiedError))
                    results[index[ref]] = (TaskCrashed if crashed else ClusterError)(
                        f"{what} failed: {_last_line(exc)}")
                else:
                    if fail_fast and isinstance(results[index[ref]], ZooselectError):
                        for other in pending:
                            ray.cancel(other)
                        raise results[index[ref]]
                bar.update(1)
    return results


class _EmbedActor:
    """Embeds candidates one at a time (one per actor by default): loads the model, embeds, writes its
    own row, and lets the model go before the next."""

    def __init__(self, store_url: str, s3_endpoint: str | None, threads: int, gpus: float = 1.0) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.store_url, self.s3_endpoint = store_url, s3_endpoint
        # Actors holding a fraction of a GPU run side by side on it: each sizes its batch to its share.
        self.memory_share = 0.5 * min(1.0, gpus)

    def embed(self, entry: CatalogEntry, std: Standard, prepared: Any = None) -> EmbedResult:
        import ray
        import torch

        from selection.embedder import embed_entry
        from selection.models import check_device
        from selection.storage import Store

        store = Store(self.store_url, s3_endpoint=self.s3_endpoint)
        on_gpu = bool(ray.get_gpu_ids())  # only on a GPU Ray gave this actor, and then never the CPU instead:
        if on_gpu:  # a table must not mix bf16 GPU rows with float32 CPU ones unnoticed
            check_device("cuda", "the device of an actor given a GPU (--gpus-per-actor)")
        try:
            if on_gpu:
                result = embed_entry(entry, std, store, device="cuda", amp_dtype=torch.bfloat16,
                                     prepared=prepared, memory_share=self.memory_share)
            else:
                result = embed_entry(entry, std, store, prepared=prepared)
            return dataclasses.replace(result, worker=f"{socket.gethostname()}:{os.getpid()}")
        finally:  # the model is out of scope: give its memory back before the next one
            gc.collect()
            if on_gpu:
                torch.cuda.empty_cache()


# A preprocessed probe set larger than this is not shared: float32 at the model's size, it grows with the
# square of it (1,000 images: 0.6 GB at 224 px, 2.9 GB at 512 px, built in the driver in 45 s; a review,
# session 36), while each actor preprocesses one batch at a time.
SHARED_PROBE_BYTES = 1 << 30


class _SharedProbe:
    """The probe set preprocessed once per preprocessing config shared by >= 2 models (CPU), up to
    SHARED_PROBE_BYTES.

    Each group's tensor is put in the object store when its first model starts and
    released when its last finishes, so memory holds only the groups in flight. On GPUs
    the actors resize uint8 images on the device instead (cheaper than shipping floats).
    """

    def __init__(self, entries: list[CatalogEntry], std: Standard, enabled: bool) -> None:
        from selection.models import expected_data_config, preprocess_key

        self.std = std
        self.key: dict[str, tuple] = {}
        self.cfg: dict[tuple, dict] = {}
        for e in entries if enabled else []:
            cfg = expected_data_config(e, std.input_size)
            if cfg is not None and cfg["input_size"][-2] == cfg["input_size"][-1]:  # else its actor refuses it
                self.key[e.id] = preprocess_key(cfg)
                self.cfg[self.key[e.id]] = cfg
        self.left = {k: list(self.key.values()).count(k) for k in self.cfg}  # models not yet done
        n_images = len(std.probe_images) if self.cfg else 0
        self.shared = {k for k, n in self.left.items() if n >= 2 and
                       n_images * 4 * math.prod(self.cfg[k]["input_size"]) <= SHARED_PROBE_BYTES}
        self.refs: dict[tuple, Any] = {}

    def order(self, entries: list[CatalogEntry]) -> list[CatalogEntry]:
        """Entries grouped by preprocessing config (first-appearance order kept)."""
        first = {}
        for i, e in enumerate(entries):
            first.setdefault(self.key.get(e.id), i)
        return sorted(entries, key=lambda e: first[self.key.get(e.id)])

    def acquire(self, entry: CatalogEntry) -> Any:
        import ray

        from selection.models import prepare

        key = self.key.get(entry.id)
        if key not in self.shared:
            return None
        if key not in self.refs:
            self.refs[key] = ray.put(prepare(self.std.probe_images, self.cfg[key]))
        return self.refs[key]

    def release(self, entry: CatalogEntry) -> None:
        key = self.key.get(entry.id)
        if key is not None:
            self.left[key] -= 1
            if self.left[key] == 0:
                self.refs.pop(key, None)


def check_amount(name: str, value: Any, gpus: bool = False) -> None:
    """A Ray resource amount: a finite number >= 0, none or at least 0.0001 (Ray's unit); of GPUs (`gpus`)
    at most 1: a process uses one device, and Ray refuses fractions above 1 (when the work is submitted)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
    if 0 < value < 1e-4:
        raise ConfigError(f"{name} must be 0 or at least 0.0001 (Ray's smallest share), got {value!r}")
    if gpus and value > 1:
        raise ConfigError(f"{name} must be at most 1 (each process uses one GPU; a fraction shares one), "
                          f"got {value!r}")


@dataclass(frozen=True)
class ActorOptions:
    """How `embed_with_actors` sizes its actors; checked before any Ray work."""

    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 1
    max_in_flight: int | None = None  # None: what the cluster's resources allow
    retries: int = 2
    autoscaling: bool = False  # the cluster adds nodes on demand: actors it cannot hold now wait
    # Models one actor embeds, one after another, before it is replaced: 1 (the default) gives every
    # model a fresh process; more saves the process start and imports per model (large zoos).
    models_per_actor: int = 1

    def __post_init__(self) -> None:
        if self.gpus_per_actor is not None:
            check_amount("gpus_per_actor", self.gpus_per_actor, gpus=True)
        check_amount("cpus_per_actor", self.cpus_per_actor)
        if self.max_in_flight is not None and (isinstance(self.max_in_flight, bool)
                                               or not isinstance(self.max_in_flight, int)
                                               or self.max_in_flight < 1):
            raise ConfigError(f"max_in_flight must be an integer >= 1, got {self.max_in_flight!r}")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ConfigError(f"retries must be an integer >= 0, got {self.retries!r}")
        if isinstance(self.models_per_actor, bool) or not isinstance(self.models_per_actor, int) \
                or self.models_per_actor < 1:
            raise ConfigError(f"models_per_actor must be an integer >= 1, got {self.models_per_actor!r}")
        if self.autoscaling and self.max_in_flight is None:
            raise ConfigError("autoscaling needs max_in_flight (how many actors to run at once when "
                              "the nodes are up: the resources now do not tell), got None")
        if self.gpus_per_actor == 0 and self.cpus_per_actor == 0 and self.max_in_flight is None:
            _unbounded()  # here too, not only with the cluster's resources: a dry run refuses it as the run


def _unbounded() -> NoReturn:
    raise ConfigError("actors that take no CPU and no GPU are not bounded by the cluster: give "
                      "--max-in-flight, or --cpus-per-actor > 0")


def check_fits(what: str, need: dict[str, tuple[float, str]], nodes: Sequence[dict[str, float]],
               autoscaling: bool, where: str = "") -> None:
    """ConfigError if no one node has now all that `what` needs (resource name -> (amount, option);
    `nodes`: each node's resources, `node_resources`), unless `autoscaling`: then it waits
    for the nodes its demand makes the autoscaler add (a warning says so). Without the check Ray waits
    for ever. `where`: the resources are one node's (e.g. "its node … has"), which no new node changes."""
    if not any(amount for amount, _ in need.values()):
        return  # nothing asked of a node
    most = _most(nodes)
    short = [f"{what} needs {amount:g} {name}(s) ({option}) but {where or 'no node has more than'} "
             f"{most.get(name, 0):g} {name}s" for name, (amount, option) in need.items() if amount > most.get(name, 0)]
    if not short and not any(all(n.get(r, 0) >= a for r, (a, _) in need.items()) for n in nodes):
        # 2 CPUs and 1 GPU: one node has the CPUs, another the GPU (Ray waited for ever)
        wants = " and ".join(f"{a:g} {r}(s) ({o})" for r, (a, o) in need.items() if a)
        sizes = "; ".join(", ".join(f"{n.get(r, 0):g} {r}" for r in need) for n in nodes[:4])
        short = [f"{what} needs {wants} on one node, but no node has them all (nodes: {sizes}"
                 f"{'; …' if len(nodes) > 4 else ''})"]
    if short and where:
        raise ConfigError(short[0])
    if short and not autoscaling:
        raise ConfigError(f"{short[0]} (if the cluster adds nodes on demand: --autoscaling)")
    if short:
        log.warning("%s now; waiting for the autoscaler to add nodes", short[0])


def size_actors(opts: ActorOptions, res: dict[str, float],
                nodes: Sequence[dict[str, float]] | None = None) -> tuple[float, int]:
    """(GPUs per actor, actors in flight) on a cluster whose total resources now are `res` and whose
    nodes have `nodes` (each node's resources; default: `res`, one node; see `check_fits` for one that
    cannot hold an actor). In flight by default: as many actors as the nodes hold, each node counted
    whole (CPUs of a node without GPUs hold no GPU actor)."""
    nodes = [res] if nodes is None else nodes
    node = _most(nodes)
    if opts.gpus_per_actor is None and opts.autoscaling and node.get("GPU", 0) < 1:
        # GPU nodes scaled to zero look like a CPU cluster: guessing 0 would embed on CPUs of GPU nodes
        raise ConfigError("with autoscaling, say how many GPUs an actor takes (--gpus-per-actor: 1 for GPU "
                          "workers, 0 for CPU ones): no node has a GPU now, which may only mean none is up yet")
    gpus_per_actor = (opts.gpus_per_actor if opts.gpus_per_actor is not None
                      else 1.0 if node.get("GPU", 0) >= 1 else 0.0)
    if gpus_per_actor == 0 and opts.cpus_per_actor == 0 and opts.max_in_flight is None:
        _unbounded()
    need = {"GPU": (gpus_per_actor, "gpus_per_actor"), "CPU": (opts.cpus_per_actor, "cpus_per_actor")}
    check_fits("an actor", need, nodes, opts.autoscaling)
    if opts.max_in_flight is not None:
        return gpus_per_actor, opts.max_in_flight
    def held(node: dict[str, float]) -> int:  # the actors one node holds
        return min(math.floor(node.get(kind, 0) / each + 1e-9) if each else math.inf
                   for kind, each in (("CPU", opts.cpus_per_actor), ("GPU", gpus_per_actor)))
    return gpus_per_actor, max(1, sum(held(n) for n in nodes))


def row_seen_here(result: EmbedResult, local: Store | None, std: Standard) -> EmbedResult:
    """An embedded model's result, failed if `local` (a local-directory store) does not hold the row its
    actor wrote: the actor ran on a node whose disk this driver does not see (the
    job said "3 embedded" and the store held none). A row written during a compaction is the job's to
    check after it (`HeldRows`); one a compaction folded into a segment since is in its key index (a few
    reads: the whole index was read for each such model, 4 s at a million models)."""
    if local is None or result.status != "embedded" or not result.path or result.written_during_compaction \
            or local.exists(result.path) or segments_hold(local, std, result.model_id):
        return result
    host = result.worker.rsplit(":", 1)[0] or "another node"
    return dataclasses.replace(result, status="failed", reason=(
        f"model {result.model_id!r}: its row was written to {local.root} on {host}, but this driver does not "
        f"see it there (unless removed meanwhile): on a cluster of several nodes a local-directory store must "
        f"be a folder every node mounts at the same path; use s3:// or such a folder"))


def embed_with_actors(entries: Iterable[CatalogEntry], std: Standard, store: Store,
                      opts: ActorOptions = ActorOptions(), *,
                      progress: bool = True, held: HeldRows | None = None) -> list[EmbedResult]:
    """Fan the entries out over actors, at most max_in_flight alive at once (see `size_actors`); each
    actor embeds `opts.models_per_actor` entries in turn (default one) and is then replaced.
    With `held`, the bytes of rows written during a compaction move there as each result arrives
    (`EmbedResult.written_during_compaction` then empty): the driver's memory does not grow with them.

    `std` is put in the object store once and shared by every actor. A killed actor is
    restarted and its call retried (`opts.retries` per model); a model that fails is reported,
    the others finish, and an actor whose call failed is replaced.
    """
    import ray

    entries = list(entries)
    gpus_per_actor, max_in_flight = size_actors(opts, cluster_resources(), node_resources())
    cpus_per_actor, retries = opts.cpus_per_actor, opts.retries
    per_actor = opts.models_per_actor
    actor_cls = ray.remote(_EmbedActor).options(  # each of its models may restart it `retries` times
        num_cpus=cpus_per_actor, num_gpus=gpus_per_actor, max_restarts=retries * per_actor,
        max_task_retries=retries)
    std_ref = ray.put(std)
    local = store if store.scheme == "file" else None  # whose rows the driver checks
    shared = _SharedProbe(entries, std, enabled=gpus_per_actor == 0)
    results: list[EmbedResult] = []
    queue = shared.order(entries)
    running: dict[Any, tuple[Any, CatalogEntry, float, int]] = {}
    idle: list[tuple[Any, int]] = []  # (actor, models it has embedded) ready for another
    threads = max(1, int(cpus_per_actor))
    with progress_bar(total=len(entries), desc="embed", disable=not progress, unit="model") as bar:
        while queue or running:
            while queue and len(running) < max_in_flight:
                entry = queue.pop(0)
                actor, used = idle.pop() if idle else (actor_cls.remote(store.url, store.endpoint, threads,
                                                                        gpus_per_actor), 0)
                running[actor.embed.remote(entry, std_ref, shared.acquire(entry))] = (actor, entry,
                                                                                      time.perf_counter(), used)
            done, _ = _wait(list(running), "embedding actor(s)")
            for ref in done:
                actor, entry, started, used = running.pop(ref)
                try:
                    result = ray.get(ref)
                    if result.stage_seconds:  # the rest of the wall time: actor start, imports, queueing
                        start = max(0.0, time.perf_counter() - started - result.seconds)
                        result = dataclasses.replace(result, stage_seconds={"actor start": start,
                                                                            **result.stage_seconds})
                    healthy = result.status != "failed"  # a model that failed may leave its process unusable
                except ray.exceptions.RayError as exc:
                    how = (f"worker failed after {retries} retries" if isinstance(exc, ray.exceptions.RayActorError)
                           else "raised")
                    result = EmbedResult(entry.id, "failed", f"{how}: {_last_line(exc)}")
                    healthy = False
                result = row_seen_here(result, local, std)
                if healthy and used + 1 < per_actor and queue:
                    idle.append((actor, used + 1))
                else:
                    ray.kill(actor)
                shared.release(entry)
                if held is not None and result.written_during_compaction:
                    held.add(result.model_id, result.written_during_compaction, result.compactions_at_write)
                    result = dataclasses.replace(result, written_during_compaction=b"")
                results.append(result)
                bar.update(1)
                bar.set_postfix_str(f"{entry.id[:30]}: {result.status}")
    for actor, _ in idle:
        ray.kill(actor)
    return results


if __name__ == "__main__":  # `python -m jobs.runtime --help` printed nothing, exit 0
    import sys

    print("error: jobs.runtime is not a command: it holds the jobs' Ray calls (`zooselect --help` lists the "
          "commands)", file=sys.stderr)
    sys.exit(2)
