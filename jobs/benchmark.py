"""Benchmarks: `python -m jobs.benchmark quality --store DIR --out DIR [--small]` (the committed report is
`--out docs`).

quality: builds the benchmark zoo (training fanned out over Ray, seeded, resumable),
two standards held out of it, embeds the zoo under both (one actor per model),
measures every candidate's linear-probe accuracy and brute-force scores (LogME,
H-score, shrinkage H-score, ridge leave-one-out) on every task, times every model
operation of one selection in one serial pass (this process, one thread, nothing else
running; about 4 minutes for the full plan here), scores the Standardized Embedder
against them, and writes `OUT/benchmark.md`, `OUT/benchmark.json` and plots under `OUT/img/`.
`--small` runs the same pipeline on a few tiny models and tasks (CI, < 1 minute).

zoo: step 1 of quality alone: train the benchmark zoo and the general models (resumable: a
checkpoint of the same spec is reused) and write the catalog `STORE/benchmark/catalog.jsonl`.
On a cluster with GPUs the training runs there (`--train-gpus`).

compare: two reports side by side (`python -m jobs.benchmark compare OLD.json NEW.json`), e.g.
the committed `docs/benchmark.json` and a re-run: the zoo is retrained bit for bit only on the
same CPU type, so a run elsewhere measures another zoo.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import platform
import sys
import time
from typing import Any, Sequence

import numpy as np

from jobs import runtime
from jobs.common import add_ray_args, add_store_args, open_store, prog, progress_bar, prog_of_subcommand, run_program
from selection import benchmark as bench
from selection.catalog import CatalogEntry, catalog_bytes
from selection.embedding import RIDGE_GCVS
from selection.errors import ConfigError, ZooselectError
from selection.storage import Store, check_output, check_outside_store, write_file_atomically


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("jobs.benchmark"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{quality,zoo,compare,scaling}")
    q = sub.add_parser("quality", help="selection quality vs brute-force scorers (LogME, H-score, ...)",
                       description="Quality benchmark: zoo, standards, ground truth, scorers, report.")
    z = sub.add_parser("zoo", help="train the benchmark zoo only (step 1 of quality) and write its catalog",
                       description="Train the benchmark zoo and the general models; write "
                                   "STORE/benchmark/catalog.jsonl. Resumable.")
    for a in (q, z):
        add_store_args(a, standard=False, what="the store (of checkpoints, standards, embeddings and ground truth)")
        a.add_argument("--small", action="store_true",
                       help="the small plan: a few tiny models and tasks (the whole quality pipeline in < 1 min)")
        a.add_argument("--train-gpus", type=float, default=None,
                       help="GPUs per training task (default: 1/%d when the cluster has GPUs, else 0: the "
                            "zoo's models are small enough to share one); a GPU trains another zoo "
                            "than a CPU" % TRAIN_TASKS_PER_GPU)
        add_ray_args(a)
    q.add_argument("--out", required=True,
                   help="report directory (benchmark.md, benchmark.json, img/); the committed report is docs")
    q.add_argument("--ridge-gcv", choices=list(RIDGE_GCVS), default=None,
                   help="every standard's ridge GCV (default: each one's, as `jobs.standard` gives it: "
                        "python -m jobs.standard --help); with everything else cached, a run with one "
                        "value and one with the other are an A/B of it")
    c = sub.add_parser("compare", help="two quality reports side by side (targets, key rows, ground truth)",
                       description="Compare two benchmark.json files of `quality` runs; prints Markdown.")
    c.add_argument("old", help="a benchmark.json (e.g. docs/benchmark.json)")
    c.add_argument("new", help="another benchmark.json (e.g. a re-run's)")
    c.add_argument("--out", default=None, help="also write the Markdown to this file")
    sub.add_parser("scaling", add_help=False,
                   help="update, sweep, throughput and compaction-memory scaling "
                        "(options: python -m jobs.scaling --help)")
    p.set_defaults(subcommands=sub.choices)  # main names an unknown argument with its subcommand's usage
    return p


def _threads() -> None:
    """One thread per worker (as many workers as cores), warmed up so timings are comparable."""
    import torch

    torch.set_num_threads(1)
    bench.warm_up()


TRAIN_TASKS_PER_GPU = 8  # the default --train-gpus on a cluster with GPUs is 1 / this


def _train(device: str, item: tuple[Any, str, str | None]) -> CatalogEntry:
    from selection.zoo import train

    _threads()
    spec, url, endpoint = item
    return train(spec, Store(url, s3_endpoint=endpoint), device=device)


def train_gpus(requested: float | None) -> float:
    """GPUs per training task: `requested`, else 1/TRAIN_TASKS_PER_GPU when the cluster has GPUs, else 0."""
    gpus = runtime.cluster_resources().get("GPU", 0)
    if requested is None:
        return 1.0 / TRAIN_TASKS_PER_GPU if gpus >= 1 else 0.0
    if requested > gpus:  # a number >= 0: main checked it before any work
        raise ConfigError(f"--train-gpus {requested:g}: the cluster has {gpus:g} GPUs")
    return float(requested)


def build_zoo(plan: Any, store: Store, endpoint: str | None, gpus: float,
              progress: bool) -> tuple[dict[str, CatalogEntry], dict[str, CatalogEntry], str]:
    """Train the plan's zoo and general models in parallel (one Ray task each, `gpus` GPUs each;
    `train` reuses existing checkpoints). Returns the zoo's entries by id, the general models' by
    standard, and the catalog written to the store."""
    general_specs = {}
    for sp in plan.standards:
        if sp.general is not None:
            general_specs[sp.name] = bench.general_train_spec(sp, bench.prepare_general_data(store, sp))
    members = [m for m in plan.zoo if m.train is not None]
    specs = [m.train for m in members] + list(general_specs.values())
    if progress:
        print(f"[1/7] training {len(specs)} models ({len(members)} zoo members, {len(general_specs)} general)"
              + (f" on {gpus:g} GPU each" if gpus else ""), flush=True)
    trained = runtime.map_tasks(_train, [(s, store.url, endpoint) for s in specs], num_gpus=gpus,
                                shared="cuda" if gpus else "cpu", desc="train", progress=progress,
                                what="a training")
    _raise_first(trained, "training failed")
    entries: dict[str, CatalogEntry] = {m.id: m.entry for m in plan.zoo if m.entry is not None}
    for m, e in zip(members, trained):
        entries[m.id] = bench.with_provenance(m, e)
    general_entries = dict(zip(general_specs, trained[len(members):]))
    return entries, general_entries, _write_catalog(store, [entries[m.id] for m in plan.zoo])


def zoo(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    plan = bench.plan_by_name(args.small)
    store = open_store(args)
    runtime.init(args.address)
    gpus = train_gpus(args.train_gpus)
    entries, general, path = build_zoo(plan, store, args.s3_endpoint, gpus, not args.no_progress)
    print(f"zoo: {len(entries)} candidates ({sum(m.train is not None for m in plan.zoo)} trained) and "
          f"{len(general)} general model(s) in {time.perf_counter() - t0:.0f}s on "
          f"{f'{gpus:g} GPU per training task' if gpus else 'CPUs'}; catalog {path}")
    return 0


def _standard(_: None, item: tuple[Any, str, str | None]) -> Any:
    _threads()
    config, url, endpoint = item
    return bench.ensure_standard(config, Store(url, s3_endpoint=endpoint))


def _task_embeddings(shared: tuple[Any, list[Any]], item: tuple[int, tuple[str, ...], Any, int]) -> dict[str, Any]:
    _threads()
    standards, tasks = shared
    index, methods, protocols, size = item
    return bench.embed_benchmark_tasks(standards[index], tasks, methods, protocols, size)


def _evaluate(shared: tuple[list[Any], Any, str, str | None], entry: CatalogEntry) -> dict[str, Any]:
    _threads()
    tasks, plan, url, endpoint = shared
    input_size = plan.standards[0].input_size
    return bench.evaluate_candidate_cached(entry, tasks, plan, input_size, Store(url, s3_endpoint=endpoint))


def _measure_costs(plan: Any, stds: Sequence[Any], models: Sequence[CatalogEntry], tasks: Sequence[Any],
                   store: Store, progress: bool) -> dict[str, Any]:
    """bench.measure_costs in this process with one thread, torch's and the BLAS's numpy uses (the
    driver's own settings restored after), once Ray is shut down: its processes, idle or not, ran
    beside the pass (a 5-minute load average of 1.5 at its end) and nothing after it needs Ray."""
    import ray
    import torch
    from threadpoolctl import threadpool_limits

    ray.shutdown()  # a local Ray stops; a cluster's is only disconnected from
    threads = torch.get_num_threads()
    try:
        _threads()
        with threadpool_limits(limits=1), \
                progress_bar(total=len(stds) + len(models), desc="costs", disable=not progress, unit="item") as bar:
            return bench.measure_costs(plan, stds, models, tasks, store, step=lambda _: bar.update(1))
    finally:
        torch.set_num_threads(threads)


def _raise_first(results: Sequence[Any], what: str) -> None:
    errors = [r for r in results if isinstance(r, ZooselectError)]
    if errors:
        raise type(errors[0])(f"{what}: {errors[0]} ({len(errors)} failed)")


def _versions() -> dict[str, str]:
    import timm
    import torch

    import selection

    return {"zooselect": selection.__version__, "timm": timm.__version__, "torch": torch.__version__,
            "python": platform.python_version()}


def quality(args: argparse.Namespace) -> int:
    from jobs.embed import apply_plan
    from selection.embedder import make_plan
    from selection.table import load_table

    t_start = time.perf_counter()
    progress = not args.no_progress
    plan = bench.plan_by_name(args.small)
    if args.ridge_gcv:
        plan = dataclasses.replace(plan, standards=tuple(dataclasses.replace(s, ridge_gcv=args.ridge_gcv)
                                                         for s in plan.standards))
    check_output(args.out, directory=True, flag="--out")
    store = open_store(args)
    check_outside_store(store, {"--out": args.out})
    ep = args.s3_endpoint
    runtime.init(args.address)
    stages: dict[str, float] = {}
    clock = {"name": "start", "t": t_start}

    def say(name: str, text: str) -> None:
        now = time.perf_counter()
        stages[clock["name"]] = round(now - clock["t"], 2)
        clock.update(name=name, t=now)
        if not args.no_progress and text:
            print(text, flush=True)

    # 1. the zoo and the general models
    gpus = train_gpus(args.train_gpus)
    say("train", "")
    entries, general_entries, catalog_path = build_zoo(plan, store, ep, gpus, progress)
    catalog = [entries[m.id] for m in plan.zoo]

    # 2. the standards (held out of the zoo)
    configs = [sp.config(sp.baseline or general_entries[sp.name]) for sp in plan.standards]
    say("standards", f"[2/7] standards: {', '.join(sp.name for sp in plan.standards)}")
    stds = runtime.map_tasks(_standard, [(c, store.url, ep) for c in configs], desc="standards", progress=progress,
                            what="a standard's build")
    _raise_first(stds, "building a standard failed")

    # 3. tasks; SE task embeddings (one Ray task per standard). Run before the actors start, on the
    #    workers that trained the zoo (already warm)
    tasks = bench.load_tasks(plan)
    say("task embeddings", f"[3/7] task embeddings: {len(tasks)} tasks x {plan.splits} splits x {len(stds)} "
                           f"standards x {len(plan.methods)} methods")
    splits = [plan.task_protocols(r) for r in range(plan.splits)]
    temb = runtime.map_tasks(_task_embeddings, [(i, plan.methods, splits, plan.task_image_size)
                                                for i in range(len(stds))],
                             shared=(stds, tasks), desc="task embeddings", progress=progress,
                             what="a standard's task embeddings")
    _raise_first(temb, "task embedding failed")

    # 4. ground truth + brute force: every candidate on every task (cached per model and task in the store)
    say("ground truth", f"[4/7] ground truth and brute-force scores: {len(catalog)} models x {len(tasks)} tasks "
                        f"x {plan.splits} splits")
    truth_list = runtime.map_tasks(_evaluate, catalog, shared=(tasks, plan, store.url, ep),
                                   desc="ground truth", progress=progress, what="a model's ground truth")
    _raise_first(truth_list, "ground truth failed")
    truth = {e.id: r for e, r in zip(catalog, truth_list)}

    # 5. embed the candidates under each standard (one actor per model; unchanged rows skipped)
    embed_info: dict[str, dict[str, Any]] = {}
    for sp, std in zip(plan.standards, stds):
        cands = [entries[i] for i in plan.candidates(sp)]
        diff = make_plan(cands, std, store, prune=False)
        if diff.invalid:
            bad = diff.invalid[0]
            raise ZooselectError(f"cannot embed {bad.model_id} under {sp.name}: {bad.reason}")
        todo = list(diff.embed)
        say(f"embed {sp.name}", f"[5/7] embedding {len(todo)} of {len(cands)} candidates under standard "
                                f"{sp.name} ({std.id})")
        results, unchecked = apply_plan(diff, std, store, runtime.ActorOptions(), 600.0, progress)
        if unchecked:
            raise ZooselectError(f"rows embedded under {sp.name} while a compaction ran are unchecked: run again")
        failed = [r for r in results if r.status == "failed"]
        if failed:
            raise ZooselectError(f"embedding failed for {len(failed)} model(s) under {sp.name}: "
                                 f"{failed[0].model_id}: {failed[0].reason}")
        embed_info[sp.name] = {"embedded": len(todo), "refreshed": len(diff.refresh), "skipped": len(diff.skip)}

    # 6. costs: one serial pass in this process, after every parallel stage (nothing else should run)
    cost_models = [entries[i] for i in dict.fromkeys(i for sp in plan.standards for i in plan.candidates(sp))]
    say("costs", f"[6/7] costs: one serial pass over {len(stds)} standards and {len(cost_models)} models "
                 f"x {len(tasks)} tasks")
    costs = _measure_costs(plan, stds, cost_models, tasks, store, progress)
    if not bench.cost_pass_clean(costs):
        print("warning: other work ran beside the cost pass (5-minute load average "
              f"{costs['conditions']['load_average_at_end'][1]:.2f} at its end): its seconds and T3 are not clean")

    # 7. metrics and the report
    say("metrics", "[7/7] metrics and report")
    per_standard = {}
    for sp, std, te in zip(plan.standards, stds, temb):
        table = load_table(store, std)
        res = bench.standard_results(plan, sp, std, table, te, truth, costs)
        sub = bench.candidate_table(table, plan.candidates(sp))
        secs = sub.meta.column("embed_seconds").to_pylist()
        embed_info[sp.name].update({
            "n_probe": int(std.spec["n_probe"]), "mean_seconds_per_model": float(np.mean(secs)),
            "build_seconds": std.created.get("build_seconds"),
            "detail": f"{std.spec['n_probe']} probe images per model (forward passes), "
                      f"{float(np.mean(secs)):.1f} s per model on average "
                      f"(max {float(np.max(secs)):.1f} s); building the standard took "
                      f"{std.created.get('build_seconds', float('nan')):.1f} s."})
        per_standard[sp.name] = res
    summary = bench.compute_results(plan, per_standard)
    say("report", "")
    command = "python -m jobs.benchmark quality --store STORE --out " + args.out + (" --small" if args.small else "")
    from selection import zoo

    doc = {
        "benchmark": "quality", "version": bench.BENCH_VERSION, "plan": plan.name,
        "run": {"command": command, "total_seconds": time.perf_counter() - t_start, "cpus": os.cpu_count(),
                "host": f"{platform.system()} {platform.machine()}", "cpu_model": zoo.cpu_model(),
                "versions": _versions(),
                "catalog": catalog_path, "train_gpus": gpus, "embed": embed_info,
                "stages_seconds": stages, "ground_truth_cached": sum(r["cached"] for r in truth_list),
                "ground_truth_upgraded": sum(r["upgraded"] for r in truth_list)},
        "protocol": {"test_fraction": plan.protocol.test_fraction, "split_seed": plan.protocol.split_seed,
                     "splits": plan.splits,
                     "l2": plan.protocol.l2, "max_iter": plan.protocol.max_iter,
                     "task_image_size": plan.task_image_size},
        "zoo": bench.zoo_records(plan, entries, truth),
        "tasks": bench.task_records(plan, tasks),
        "truth": {t.name: {i: truth[i]["tasks"][t.name]["accuracy"] for i in entries} for t in plan.tasks},
        "summary": summary,
        "results": per_standard,
        "costs": costs,
    }
    paths = bench.write_report(os.path.abspath(os.path.expanduser(args.out)), plan, doc)
    say("end", "")
    for path in paths.values():  # where: under `ray job submit`, the head node's
        print(f"wrote {path}")
    met = [f"{name}:{t['id']}={'met' if t['met'] else 'not met'}"
           for name, ts in summary["targets"].items() for t in ts]
    print(f"summary: quality benchmark ({plan.name}) of {len(catalog)} models x {len(tasks)} tasks x "
          f"{len(stds)} standards in {time.perf_counter() - t_start:.0f}s; default {summary['default_variant']}; "
          f"{' '.join(met)}; report {paths['markdown']}")
    return 0


def _write_catalog(store: Store, entries: list[CatalogEntry]) -> str:
    """The zoo's catalog in the store (one atomic write), by its path (local) or URL."""
    rel = "benchmark/catalog.jsonl"
    store.write_bytes(rel, catalog_bytes(entries))
    return store.location(rel)


def compare(args: argparse.Namespace) -> int:
    text = bench.compare_reports(bench.load_report(args.old), bench.load_report(args.new),
                                 names=(args.old, args.new))
    if args.out is not None:
        check_output(args.out, flag="--out")
        out = os.path.abspath(os.path.expanduser(args.out))  # as check_output checked it
        write_file_atomically(out, text.encode())
        print(f"wrote {out}", file=sys.stderr)  # standard output holds the Markdown
    print(text, end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = parser().parse_known_args(argv)
    if args.command == "scaling":
        from jobs import scaling

        prog_of_subcommand("scaling")
        return scaling.main(rest)
    if rest:  # `quality --bogus`: with quality's usage, not the benchmark's
        args.subcommands[args.command].error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "compare":
        return compare(args)
    if args.command in ("quality", "zoo"):
        if args.train_gpus is not None:  # before the store is opened and Ray started
            runtime.check_amount("--train-gpus", args.train_gpus, gpus=True)
        if args.command == "quality" and importlib.util.find_spec("matplotlib") is None:  # before hours of work
            raise ConfigError("the quality report draws plots with matplotlib, which is not installed: "
                              "pip install 'zooselect[plots]' (or matplotlib)")
        return quality(args) if args.command == "quality" else zoo(args)
    return 2


if __name__ == "__main__":
    run_program(main)
