"""Embed a catalog into the table: `python -m jobs.embed --catalog CATALOG --store STORE`.

One Ray actor per candidate model (GPU where the cluster has them). Models already
embedded under the standard with the same weights digest and catalog entry are skipped; those
whose entry changed only in its tags, metadata, given license or checkpoint file's path (same
bytes) have their rows rewritten, with no model loaded ("refreshed").
"""

from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import replace
from typing import Sequence

from jobs import runtime
from jobs.common import add_ray_args, add_store_args, as_flags, command, open_store, prog, progress_bar, run_program
from selection.catalog import CatalogEntry, load_catalog
from selection.embedder import EmbedResult, Plan, make_plan, refresh_rows
from selection.models import timm_fingerprint
from selection.errors import ConfigError, ZooselectError
from selection.standard import Standard, load_standard
from selection.storage import Store
from selection.table import HeldRows, compaction_running, delete_rows, restore_rows


def parser(module: str = "jobs.embed", doc: str = __doc__) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog(module), description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--catalog", required=True, help="catalog file (YAML or JSON lines)")
    add_store_args(p)
    add_ray_args(p)
    p.add_argument("--gpus-per-actor", type=float, default=None,
                   help="GPUs per actor, at most 1 (default: 1 when the cluster has GPUs, else 0; a fraction shares one)")
    p.add_argument("--cpus-per-actor", type=float, default=1,
                   help="CPUs each embedding actor takes (default 1; it runs as many torch threads as whole CPUs, at least one)")
    p.add_argument("--max-in-flight", type=int, default=None,
                   help="actors alive at once (default: as many as the nodes hold, each node counted whole)")
    p.add_argument("--retries", type=int, default=2, help="restarts of a killed actor (per model; default 2)")
    p.add_argument("--models-per-actor", type=int, default=1, metavar="N",
                   help="models each actor embeds in turn before it is replaced (default 1: a fresh process per "
                        "model); more saves the process start and imports per model on large zoos")
    p.add_argument("--autoscaling", action="store_true",
                   help="the cluster adds nodes on demand: start actors it cannot hold now (they wait "
                        "for new nodes) instead of refusing them; needs --max-in-flight, and --gpus-per-actor while no "
                        "GPU node is up")
    p.add_argument("--compaction-wait", type=float, default=600, metavar="SECONDS",
                   help="rows written while a compaction ran are checked once it ends, waiting up to this long "
                        "(default 600); a row it deleted is written back. Rows to refresh wait as long for a "
                        "compaction to end, whether it runs at the start or starts during the refresh")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan, change nothing (exit status 1 if an entry is invalid, as the run's)")
    if module == "jobs.reindex":
        p.add_argument("--max-remove", type=float, default=0.5, metavar="FRACTION",
                       help="with a catalog smaller than the table, remove none of its models if more than this "
                            "fraction of them would go (the run goes on without them, exit 1; default 0.5: a "
                            "catalog cut short would remove the rest; 1 allows all)")
    return p


ACTOR_FLAGS = ("gpus_per_actor", "cpus_per_actor", "max_in_flight", "retries", "autoscaling", "models_per_actor")


def run(args: argparse.Namespace, prune: bool) -> int:
    with as_flags(*ACTOR_FLAGS):
        opts = runtime.ActorOptions(args.gpus_per_actor, args.cpus_per_actor, args.max_in_flight, args.retries,
                                    args.autoscaling, args.models_per_actor)
    if not args.compaction_wait >= 0:
        raise ConfigError(f"--compaction-wait must be >= 0 seconds, got {args.compaction_wait}")
    max_remove = getattr(args, "max_remove", 1.0)
    if not 0 <= max_remove <= 1:  # before the catalog and the store are read
        raise ConfigError(f"--max-remove must be a fraction from 0 to 1, got {max_remove}")
    entries = load_catalog(args.catalog)
    store = open_store(args, writable=not args.dry_run, write_prefix="embeddings")  # a dry run writes nothing
    std = load_standard(store, args.standard)
    t0 = time.perf_counter()
    with progress_bar(total=len(entries), desc="plan", unit="model", disable=args.no_progress, leave=False) as bar:
        plan = make_plan(entries, std, store, prune, dry_run=args.dry_run, progress=bar.update)
    head = (f"plan: {len(plan.embed)} to embed, {len(plan.refresh)} to refresh, {len(plan.skip)} unchanged, "
            f"{len(plan.remove)} to remove, {len(plan.invalid)} invalid (standard {std.id})")
    too_many = None  # a catalog cut short (a ConfigMap, the wrong file), not renames or a zoo retired and grown
    if len(plan.remove) > max_remove * plan.indexed and len(entries) < plan.indexed:
        too_many = (f"not removing {len(plan.remove)} of the table's {plan.indexed} models, more than --max-remove "
                    f"{max_remove:g} allows, with a catalog of only {len(entries)} (is {args.catalog!r} the whole "
                    f"zoo? --max-remove 1 removes them)")
    if args.dry_run:
        _print_plan(head, plan, too_many)
        return 1 if plan.invalid or too_many else 0  # as the run would: a catalog check in CI fails
    if too_many:  # the rest of the plan goes on; the run exits 1
        print(f"refused: {too_many}", flush=True)
        plan = replace(plan, remove=())
    if plan.embed:  # a cluster that cannot be reached, or cannot hold the actors, is refused before any change
        runtime.init(args.address)
        with as_flags(*ACTOR_FLAGS):  # `an actor needs 4 CPU(s) (--cpus-per-actor) but ...`
            runtime.size_actors(opts, runtime.cluster_resources(), runtime.node_resources())
    absent = set(delete_rows(store, std, list(plan.remove)))  # removed since the plan: nothing to say
    removed = [mid for mid in plan.remove if mid not in absent]
    for mid in removed:  # a nightly re-index's log names what it deleted
        print(f"removed: {mid}", flush=True)
    applied, unchecked = apply_plan(plan, std, store, opts, args.compaction_wait, not args.no_progress)
    results = list(plan.invalid) + applied
    ok = [r for r in results if r.status in ("embedded", "refreshed")]
    embedded = [r for r in ok if r.status == "embedded"]
    _warn_if_workers_decide_otherwise(plan.embed, embedded)
    failed = [r for r in results if r.status == "failed"]
    for r in failed:
        print(f"failed: {r.model_id}: {_reason(r)}")
    rates = [r.images_per_second for r in embedded]
    gpu = max((r.peak_gpu_mib for r in embedded), default=0.0)
    print(f"summary: {len(embedded)} embedded, {len(ok) - len(embedded)} refreshed, {len(plan.skip)} skipped, "
          f"{len(removed)} removed, {len(failed)} failed"
          + (f"; probe pass img/s per model mean {sum(rates) / len(rates):.0f} (min {min(rates):.0f}, "
             f"max {max(rates):.0f})" if rates else "")
          + (f", peak GPU memory {gpu:.0f} MiB" if gpu else "")
          + f"; standard {std.id}; {time.perf_counter() - t0:.1f}s")
    if embedded:
        workers = len({r.worker for r in embedded if r.worker})
        print(f"time per model (mean of {len(embedded)}, {workers} actor process(es)): {stage_means(embedded)}")
    return 1 if failed or unchecked or too_many else 0


def apply_plan(plan: Plan, std: Standard, store: Store, opts: runtime.ActorOptions, compaction_wait: float,
               progress: bool) -> tuple[list[EmbedResult], bool]:
    """Embed (on Ray actors) and refresh what `plan` says; then write back any row a compaction deleted
    right after it was written (`_check_held_rows`), also when the embedding stopped on a cluster
    error. Returns the results, and whether some such rows are left unchecked."""
    results: list[EmbedResult] = []
    with contextlib.closing(HeldRows()) as during:  # rows written while a compaction ran, on local disk
        try:
            if plan.embed:
                results += runtime.embed_with_actors(plan.embed, std, store, opts, progress=progress, held=during)
            if plan.refresh:  # after the embedding: a compaction running now may have ended by then
                with progress_bar(total=len(plan.refresh), desc="refresh", unit="model", disable=not progress) as bar:
                    results += refresh_rows(plan.refresh, std, store, wait_s=compaction_wait, progress=bar.update)
        except ZooselectError:  # the rows the actors wrote before it are checked all the same
            if during:
                _check_held_rows(store, std, during, compaction_wait)
            raise
        for r in results:
            if r.written_during_compaction:  # a refresh's (few: it pauses for one); the actors' are held already
                during.add(r.model_id, r.written_during_compaction, r.compactions_at_write)
        return results, bool(during) and not _check_held_rows(store, std, during, compaction_wait)


def _print_plan(head: str, plan: Plan, too_many: str | None) -> None:
    print(head)
    for e in plan.embed:
        print(f"  embed   {e.id}")
    for e, _ in plan.refresh:
        print(f"  refresh {e.id}")
    for mid in plan.remove:
        print(f"  remove  {mid}")
    for r in plan.invalid:
        print(f"  invalid {r.model_id}: {_reason(r)}")
    if too_many:
        print(f"refused: {too_many}")


def _check_held_rows(store: Store, std: Standard, during: HeldRows, wait_s: float) -> bool:
    """Once no compaction runs, write back the held rows one deleted (`restore_rows`); False if some are
    left unchecked (one still runs after `wait_s`, or a later one's rows cannot be told from them)."""
    if compaction_running(store, std.id):
        print(f"{len(during)} row(s) written while a compaction of standard {std.id} runs: waiting up to "
              f"{wait_s:.0f}s for it to end, to check them (one that crashed: `{command('jobs.table')} "
              f"compact --break-leases`)", flush=True)
    try:
        restored = restore_rows(store, std, during, wait_s=wait_s, seen=during.seen)
    except ZooselectError as exc:  # exit 1: the table may lack some of them until the next re-index
        print(f"warning: {exc}")
        return False
    print(f"{len(during)} row(s) written while a compaction ran; {len(restored)} of them written back "
          f"after it had deleted them")
    return True


def _warn_if_workers_decide_otherwise(entries: Sequence[CatalogEntry], embedded: Sequence[EmbedResult]) -> None:
    """A plan embeds a model again when timm's registry decides its preprocessing otherwise than its row
    records (`selection.embedder.plan_entry`): workers whose timm differs from this driver's would have
    every run embed those models again."""
    mine = {e.id: timm_fingerprint(e) for e in entries}
    other = [r.model_id for r in embedded if r.timm_config != mine.get(r.model_id)]
    if other:
        import timm

        print(f"warning: the workers' timm preprocesses {len(other)} model(s) otherwise than this driver's "
              f"(timm {timm.__version__}), e.g. {other[0]!r}: every run would embed them again; run the job "
              f"with the workers' libraries (`ray job submit`, or the cluster's image)")


def _reason(r: EmbedResult) -> str:
    """Why a model failed, without the `model 'ID': ` its error starts with (the line names it already)."""
    return r.reason.removeprefix(f"model {r.model_id!r}: ")


def stage_means(results: Sequence[EmbedResult]) -> str:
    """'actor start 3.1s, load 0.4s, ..., other 0.1s': where an embedding's wall time went, on average."""
    names = list(dict.fromkeys(k for r in results for k in r.stage_seconds))
    n = len(results)
    means = {k: sum(r.stage_seconds.get(k, 0.0) for r in results) / n for k in names}
    seconds = sum(r.seconds for r in results) / n
    means["other"] = max(0.0, seconds + means.get("actor start", 0.0) - sum(means.values()))
    return ", ".join(f"{k} {v:.2f}s" for k, v in means.items())


def main(argv: Sequence[str] | None = None) -> int:
    return run(parser().parse_args(argv), prune=False)


if __name__ == "__main__":
    run_program(main)
