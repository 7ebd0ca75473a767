"""Select models for tasks: `python -m jobs.select --store STORE --task TASK [--task TASK ...]`.

Task embeddings are computed in parallel (one Ray task per task), the table is swept
once for all tasks (a table of several segments in parallel, one Ray task per segment), and the top-k
may be verified on the task in parallel (LogME, a ridge probe's leave-one-out error, or a linear probe).
A TASK is an ImageFolder directory, a .parquet file (local or s3://), or a built-in
spec such as `builtin:fashion-mnist?classes=5,7,9&per_class=40`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from typing import Any, Callable, Sequence

from jobs import runtime
from jobs.common import (add_ray_args, add_store_args, as_flags, command, open_store, prog, progress_bar,
                         run_program)
from selection.data import ImageSet, check_spec, local_path
from selection.errors import ConfigError, StoreError, ZooselectError
from selection.linear_probe import ProbeProtocol
from selection.models import check_device
from selection.results import format_results, selection_record, write_results
from selection.select import (PARETO_COSTS, SCORES, VERIFIERS, Constraint, MapParts, Queries, SelectConfig, SweepPart,
                              TaskEmbedding, apply_verification, check_score, embed_task, entry_of, load_task,
                              selection_of, shortlist_table, sweep_part, verification_shortlist, verify_candidate,
                              warn_task_image_size)
from selection.standard import Standard, list_standards, load_standard
from selection.storage import Store, check_output, check_outside_store
from selection.table import EmbeddingTable, Part, may_have_rows, refuse_first_layout

log = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("jobs.select"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_store_args(p)
    add_ray_args(p)
    p.add_argument("--task", action="append", required=True, metavar="TASK", help="task dataset (repeatable)")
    p.add_argument("--top-k", type=int, default=10,
                   help="candidates listed per task (default 10; with more verified, the best verified are listed)")
    p.add_argument("--verify-top-k", type=int, default=0,
                   help="run the top K on the task's labelled images and re-rank them by what --verify-by measures "
                        "(default 0: none; the benchmark measures 3); models tied in score with the K-th are run "
                        "too, up to 2K in all")
    p.add_argument("--verify-by", choices=list(VERIFIERS), default=None,
                   help="with --verify-top-k: LogME evidence of the labelled images (default, kept by the dev "
                        "tasks' rule), the ridge probe's leave-one-out error on them (ridge-loo), or linear-probe "
                        "accuracy on a held-out half (probe)")
    p.add_argument("--verify-gpus", type=float, default=0, metavar="G",
                   help="GPUs per verification (a Ray task each; features on CUDA, float32); default 0: CPU")
    p.add_argument("--task-gpus", type=float, default=0, metavar="G",
                   help="GPUs per task embedding (a Ray task each; the standard's networks on CUDA, float32); "
                        "default 0: CPU")
    p.add_argument("--autoscaling", action="store_true",
                   help="the cluster adds nodes on demand: task embeddings, sweep parts and verifications may wait "
                        "for a node (a GPU node for --task-gpus/--verify-gpus; one with CPUs where no node has any "
                        "now, e.g. a KubeRay head with num-cpus 0) instead of being refused")
    p.add_argument("--task-method", choices=["probe", "fisher"], default="probe",
                   help="task embedding: a ridge probe (default, chosen on the dev tasks) or Fisher ratios")
    p.add_argument("--no-part-weights", action="store_true",
                   help="keep the task matrix as the task method gives it, instead of scaling the baseline's "
                        "and the companion's parts by how well each predicts the labels")
    p.add_argument("--score", choices=list(SCORES), default=None,
                   help="how rows are scored: one stored form, or the mean of each row's ranks under the per-source "
                        "and full forms (rank-mean). Default: rank-mean on a per-source table (chosen on the dev "
                        "tasks), the table's own form otherwise")
    p.add_argument("--task-image-size", type=int, default=None, metavar="PX",
                   help="task images are resized to this (default: the standard's probe image size, 64 for the "
                        "default standard: the size its rows were measured at)")
    p.add_argument("--where", action="append", default=[], metavar="EXPR",
                   help="constraint, e.g. 'params<=5e6', 'gflops<1', 'input_size<=224', 'tag=x' (repeatable)")
    p.add_argument("--pareto", choices=list(PARETO_COSTS), default=None,
                   help="also list each task's Pareto front of score against this cost, found in the same sweep: "
                        "the models that no other model matches or beats in score at no more cost (one of the two "
                        "strictly), cheapest first")
    p.add_argument("--serial-sweep", action="store_true",
                   help="sweep the table in this process, one segment after another (default: a table of several "
                        "segments of one compaction, or of more than 4,096 row objects, is swept in Ray tasks, one per "
                        "segment or batch of row objects: on any node for an s3:// store, for a local one on this "
                        "machine's node if it has a CPU and is in the cluster, not under ray://)")
    p.add_argument("--json", default=None, metavar="OUT",
                   help="write the results as JSON to this file ('-': to standard output, the table then to stderr)")
    p.add_argument("--parquet", default=None, metavar="OUT", help="write the results as Parquet")
    p.add_argument("--no-save", action="store_true",
                   help="do not keep the results next to the table (STORE/results/<run>.{json,parquet})")
    return p


def _device(on_gpu: bool, what: str, flag: str) -> str:
    """The worker's torch device: "cuda" when the Ray task was given a GPU (and torch sees one)."""
    return check_device("cuda", f"{what}'s device ({flag})") if on_gpu else "cpu"


def _task_embedding(std: Standard, item: tuple[Any, SelectConfig, bool]) -> tuple[TaskEmbedding, ImageSet | None]:
    """A task's embedding, and the task when it was loaded here (from its spec) rather than passed in
    (a reference to the driver's copy): kept in the object store for its verifications."""
    source, config, on_gpu = item
    device = _device(on_gpu, "the task embedding", "--task-gpus")
    task = load_task(source, config, std) if isinstance(source, str) else runtime.fetch(source)
    return embed_task(std, task, config, device=device), task if isinstance(source, str) else None


def _verify(std: Standard, item: tuple[Any, SelectConfig, dict[str, Any], bool]) -> float:
    task_ref, config, row, on_gpu = item
    device = _device(on_gpu, "verification", "--verify-gpus")
    return verify_candidate(entry_of(row), runtime.fetch(task_ref), std.input_size, config, device=device,
                            weights_sha256=row["weights_sha256"])


def _sweep_part(shared: tuple[Standard, str, str | None, set[str], Queries, SelectConfig], part: Part) -> SweepPart:
    std, store_url, s3_endpoint, hidden, queries, config = shared
    return sweep_part(Store(store_url, s3_endpoint=s3_endpoint), std, part, hidden, queries, config)


def _map_parts(std: Standard, store: Store, queries: Queries, config: SelectConfig, progress: bool,
               autoscaling: bool = False, node: str | None = None) -> MapParts:
    """`shortlist_table`'s `map_parts`: one Ray task per part of the table (all on `node` if given). The
    first part that raises stops the others: ObjectGoneError (a listed object is gone: the listing is
    out of date, listed and swept again) or any other error of its read, or of Ray. A part whose worker
    crashed past its retries (e.g. out of memory) is swept here instead."""
    def map_parts(parts: list[Part], hidden: set[str]) -> list[SweepPart]:
        shared = (std, store.url, store.endpoint, hidden, queries, config)
        done = runtime.map_tasks(_sweep_part, parts, shared=shared, desc="sweep", progress=progress,
                                 what="a sweep part", autoscaling=autoscaling, node=node, fail_fast=True)
        for i, result in enumerate(done):
            if isinstance(result, runtime.TaskCrashed):
                log.warning("%s; sweeping its part (%s) here instead", result,
                            parts[i].segment or f"{len(parts[i].rows)} row objects")
                done[i] = sweep_part(store, std, parts[i], hidden, queries, config)
            elif isinstance(result, ZooselectError):  # Ray could not run it (e.g. a runtime env that fails)
                raise result
        return done
    return map_parts


def _raise_failed(tasks: list[str], outcomes: list[Any]) -> None:
    """Raise the error of every task whose outcome is one (all of them named, not only the first)."""
    failed = [(t, e) for t, e in zip(tasks, outcomes) if isinstance(e, ZooselectError)]
    if len(failed) == 1:
        raise failed[0][1]
    if failed and len({str(e) for _, e in failed}) == 1:  # one cause (Ray's node died): said once
        raise type(failed[0][1])(f"{len(failed)} of {len(tasks)} tasks failed ({', '.join(repr(t) for t, _ in failed)}): "
                                 f"{failed[0][1]}")
    if failed:
        raise type(failed[0][1])(f"{len(failed)} of {len(tasks)} tasks failed: "
                                 + "; ".join(f"{t!r}: {e}" for t, e in failed))


def _outcome(fn: Callable[[], Any]) -> Any:
    """fn(), or the ZooselectError it raised (so that every failed task is named at once)."""
    try:
        return fn()
    except ZooselectError as exc:
        return exc


def select(std: Standard, table: Store | EmbeddingTable, tasks: list[str], config: SelectConfig,
           progress: bool = True, verify_gpus: float = 0, autoscaling: bool = False,
           task_gpus: float = 0, parallel_sweep: bool = True,
           loaded: dict[str, tuple[ImageSet, float]] | None = None) -> list[dict[str, Any]]:
    """Embed the tasks (in parallel, each a Ray task holding `task_gpus` GPUs), sweep the table once (a
    store's, listed after the tasks are embedded, or one in memory; with `parallel_sweep`, a store of
    several parts in one Ray task per part, on this machine's node for a local directory), verify (each verification a Ray
    task holding `verify_gpus` GPUs); on CUDA when > 0. One dict per task.

    Each task is read and decoded once: a local one here (the cluster's other nodes may not see this
    machine's disk), an s3:// or built-in one by its embedding's Ray task; the decoded images then stay
    in the object store for that task's verifications. `loaded`: local tasks read already (`load_local_tasks`,
    before Ray started), with the seconds that took; each is handed to the object store and let go here.
    """
    if config.verify_top_k and verify_gpus:  # checked before any work, not when the verification starts
        runtime.check_fits("a verification", {"CPU": (1, "1 per task"), "GPU": (verify_gpus, "--verify-gpus")},
                           runtime.node_resources(), autoscaling)
    loaded = loaded if loaded is not None else {}
    t0 = time.perf_counter() - sum(seconds for _, seconds in loaded.values())
    sources = [runtime.put(loaded.pop(t)[0]) if t in loaded
               else _outcome(lambda t=t: runtime.put(load_task(t, config, std))) if _local_task_path(t) is not None
               else t for t in tasks]
    _raise_failed(tasks, sources)  # every local task that fails to load, before any embedding runs
    done = runtime.map_tasks(_task_embedding, [(s, config, task_gpus > 0) for s in sources], shared=std,
                             num_gpus=task_gpus, desc="tasks", progress=progress, what="a task embedding",
                             option="--task-gpus", autoscaling=autoscaling, keep=True)
    embs = [emb for emb, _ in done]
    _raise_failed(tasks, embs)
    task_refs = [kept if isinstance(s, str) else s for s, (_, kept) in zip(sources, done)]
    t_sweep = time.perf_counter()
    queries = [e.query(std, config.score) for e in embs]
    map_parts = None
    if parallel_sweep and isinstance(table, Store) and table.scheme in ("s3", "file"):
        # A local directory is read by tasks on this machine only: other nodes may not see its disk.
        node = runtime.driver_node() if table.scheme == "file" else None
        if table.scheme == "s3" or node is not None:
            map_parts = _map_parts(std, table, queries, config, progress, autoscaling, node)
    rankings, m, fronts, candidates = shortlist_table(std, table, queries, config, map_parts)
    sweep_s = time.perf_counter() - t_sweep
    if config.verify_top_k:
        items = [(ref, config, r.row, verify_gpus > 0) for ref, ranked in zip(task_refs, rankings)
                 for r in verification_shortlist(ranked, config.verify_top_k)]
        accs = runtime.map_tasks(_verify, items, shared=std, num_gpus=verify_gpus, desc="verify",
                                 progress=progress, what="a verification", option="--verify-gpus",
                                 autoscaling=autoscaling)
        rankings = apply_verification(rankings, config.verify_top_k, accs)
    out = [selection_record(spec, selection_of(emb, ranked, m, front, config, candidates), config, std)
           for spec, emb, ranked, front in zip(tasks, embs, rankings, fronts)]
    for o in out:
        o["sweep_seconds"] = round(sweep_s, 6)
        o["total_seconds"] = round(time.perf_counter() - t0, 3)
        o["task_path"] = _local_task_path(o["task"])
    return out


def load_local_tasks(tasks: list[str], config: SelectConfig, std: Standard,
                     progress: bool = True) -> dict[str, tuple[ImageSet, float]]:
    """The local tasks read and checked here, each with the seconds it took (a bar of its images each);
    every one that fails is named at once (before Ray starts: a task folder's mistakes took 10 s of Ray's
    start to be told)."""
    loaded: dict[str, Any] = {}
    for t in tasks:
        if _local_task_path(t) is not None:
            start = time.perf_counter()
            with contextlib.ExitStack() as stack:
                bars: list[Any] = []  # opened at the first image, when the total is known (a first line said "0img")

                def tick(done: int, total: int, t: str = t) -> None:
                    if not bars:
                        bars.append(stack.enter_context(progress_bar(
                            desc=f"read {os.path.basename(t.rstrip('/')) or t}"[:40], unit="img", total=total,
                            disable=not progress)))
                    bars[0].update(done - bars[0].n)

                task = _outcome(lambda t=t: load_task(t, config, std, progress=tick))
            loaded[t] = task if isinstance(task, ZooselectError) else (task, time.perf_counter() - start)
    _raise_failed(tasks, [loaded.get(t) for t in tasks])
    return loaded


def _local_task_path(spec: str) -> str | None:
    """The real path of a local task (a folder or file, `file://` or not), which other nodes may not
    see; None for others."""
    path = None if not spec.strip() or spec.startswith("builtin:") else local_path(spec)
    return None if path is None else os.path.realpath(path).rstrip(os.sep) or os.sep


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    with as_flags("top_k", "verify_top_k", "verify_by", "task_method", "score", "task_image_size", "pareto"):
        config = SelectConfig(top_k=args.top_k, verify_top_k=args.verify_top_k,
                              verify_by=args.verify_by or SelectConfig.verify_by,
                              task_method=args.task_method, weigh_parts=not args.no_part_weights,
                              score=args.score, task_image_size=args.task_image_size,
                              constraints=tuple(Constraint.parse(w) for w in args.where),
                              protocol=ProbeProtocol(), pareto=args.pareto)
    seen: dict[str, str] = {}
    for task in args.task:  # a local task by its real path: `task1` and `./task1/` are one task
        same = _local_task_path(task) or task
        if same in seen:
            raise ConfigError(f"the same task is given twice: {seen[same]!r} and {task!r}")
        seen[same] = task
    json_file = None if args.json == "-" else args.json
    check_output(json_file, flag="--json")
    check_output(args.parquet, flag="--parquet")
    outputs = {flag: os.path.realpath(os.path.expanduser(path)) for flag, path in
               (("--json", json_file), ("--parquet", args.parquet)) if path}
    if len(set(outputs.values())) < len(outputs):
        raise ConfigError(f"--json and --parquet name the same file {args.json!r}: one would overwrite the other")
    for task in args.task:  # a results file over a task's data (`--task t.parquet --parquet t.parquet`)
        local = _local_task_path(task)
        if local is None:
            continue  # an empty spec is refused as such below
        for flag, out in outputs.items():
            if (out + os.sep).startswith(local + os.sep):
                raise ConfigError(f"{flag} {out!r} would write over or into the task {task!r}")
    runtime.check_amount("--verify-gpus", args.verify_gpus, gpus=True)
    runtime.check_amount("--task-gpus", args.task_gpus, gpus=True)
    if args.verify_gpus and not args.verify_top_k:
        raise ConfigError(f"--verify-gpus {args.verify_gpus:g} is given but --verify-top-k is 0: nothing is verified")
    if args.verify_by and not args.verify_top_k:  # it ran no verification and exited 0
        raise ConfigError(f"--verify-by {args.verify_by} is given but --verify-top-k is 0: nothing is verified")
    store = open_store(args, writable=not args.no_save, write_prefix="results")  # it only reads unless it saves
    check_outside_store(store, {"--json": json_file, "--parquet": args.parquet})
    # Every bad task spec, before the standard is read or Ray started (not by its task embedding).
    _raise_failed(args.task, [_outcome(lambda t=t: check_spec(t)) for t in args.task])
    std = load_standard(store, args.standard)
    check_score(std, config.score)
    warn_task_image_size(config, std)
    if not may_have_rows(store, std.id):
        refuse_first_layout(store, std.id)
        others = [s for s in list_standards(store) if s != std.id and may_have_rows(store, s)]
        raise StoreError(f"no models are embedded under standard {std.id} in {store.url}; "
                         f"run `{command('jobs.embed')} --catalog CATALOG --store {store.url}` first"
                         + (f" (models are embedded under {', '.join(others)}: choose it with --standard)"
                            if others else ""))
    # `--json -`: standard output holds the JSON alone; all else, the workers' output Ray forwards too, on stderr
    json_stream = sys.stdout if args.json == "-" else None
    with contextlib.redirect_stdout(sys.stderr) if json_stream else contextlib.nullcontext():
        loaded = load_local_tasks(args.task, config, std, progress=not args.no_progress)
        runtime.init(args.address)
        results = select(std, store, args.task, config, progress=not args.no_progress,
                         verify_gpus=args.verify_gpus, autoscaling=args.autoscaling, task_gpus=args.task_gpus,
                         parallel_sweep=not args.serial_sweep, loaded=loaded)
        m = results[0]["models_swept"]
        try:  # printed even when the store's copy cannot be written
            saved = write_results(results, std.id, args.json, args.parquet, None if args.no_save else store,
                                  json_stream, skip_save="--no-save skips that")
        finally:
            print(format_results(results, std.id, m, ls_command=f"{command('jobs.table')} ls"))
        for path in (json_file, args.parquet):  # where: under `ray job submit`, the head node's
            if path:
                print(f"wrote {os.path.abspath(os.path.expanduser(path))}")
        if saved:
            print(f"results saved to {saved}.json and .parquet")
        total = max(r["total_seconds"] for r in results)
        unverified = sum(r["n_unverified"] for r in results)
        print(f"\nsummary: {len(results)} task(s), {m} models loaded and swept in "
              f"{results[0]['sweep_seconds'] * 1e3:.1f} ms, {sum(r['n_verified'] for r in results)} verified"
              + (f", {unverified} whose verification failed (the warnings above say why)" if unverified else "")
              + f"; {total:.1f}s")
    return 1 if unverified else 0


if __name__ == "__main__":
    run_program(main)
