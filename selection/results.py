"""A selection's results as records (what `jobs.select --json` writes), a table (`--parquet`) and text
(what the jobs print): the same from `select_models` in a notebook as from the job on a cluster.

    sels = select_models(store, tasks, config)
    records = [selection_record(name, s, config, std) for name, s in zip(names, sels)]
    results_table(records, std.id).to_pandas()
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import os
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any, TextIO

import pyarrow as pa

from selection.errors import ConfigError, StoreError, brief
from selection.storage import Store, as_store, parquet_bytes, write_file_atomically

if TYPE_CHECKING:  # not imported at run time: `jobs.table` prints with this module and needs no torch
    from selection.select import Ranked, SelectConfig, Selection
    from selection.standard import Standard

# The Parquet results: one row per task and ranked model.
RESULT_SCHEMA = pa.schema([
    ("rank", pa.int64()), ("model_id", pa.string()), ("score", pa.float64()),
    ("score_parts", pa.list_(pa.float64())), ("verified", pa.float64()), ("is_baseline", pa.bool_()),
    ("arch", pa.string()), ("num_params", pa.int64()), ("gflops", pa.float64()),
    ("tags", pa.list_(pa.string())), ("verify_error", pa.string()), ("task", pa.string()),
    ("standard_id", pa.string()),
    ("on_pareto_front", pa.bool_()),  # null: no Pareto front asked; a front member not listed has a null rank
    # what `score` and `verified` measure (a folder of results mixes runs): the record's, as `--json` says
    ("scored_by", pa.string()), ("verified_by", pa.string()), ("task_method", pa.string()),
    ("weigh_parts", pa.bool_()),
    # what makes two runs' scores comparable (a rank mean's score is a fraction among the run's candidates),
    # and which run and task folder a row is of: the record's, as `--json` says
    ("models_swept", pa.int64()), ("models_ranked", pa.int64()), ("where", pa.list_(pa.string())), ("task_path", pa.string()),
    ("run_id", pa.string()), ("created_at", pa.timestamp("ms", tz="UTC"))])

VERIFIED_BY = {"logme": "LogME evidence on", "ridge-loo": "ridge probe's leave-one-out error (negated) on",
               "probe": "probe accuracy on a held-out half of"}  # ... the task's labelled images


def ranked_record(r: Ranked) -> dict[str, Any]:
    """One ranked model as a JSON-ready dict (a GFLOPs count that is NaN, not counted, becomes None)."""
    gflops = r.row["gflops"]
    return {"rank": r.rank or None, "model_id": r.model_id, "score": round(r.score, 9),
            "score_parts": [round(x, 9) for x in r.parts] or None, "verified": r.verified,
            "is_baseline": r.is_baseline,
            "arch": r.row["arch"], "num_params": r.row["num_params"],
            "gflops": gflops if gflops is not None and math.isfinite(gflops) else None,
            "tags": r.row["tags"], "verify_error": r.verify_error}


def selection_record(task: str | os.PathLike[str], sel: Selection, config: SelectConfig | None,
                     std: Standard) -> dict[str, Any]:
    """One task's result as a JSON-ready dict: its ranking and front as `ranked_record`s, and the query
    that made it (an archived result can be read and run again). `task`: the name to show for it;
    `config`: the one `sel` was made with (another is a ConfigError: the record would describe another query;
    None: `sel.config`)."""
    from selection.select import SelectConfig, default_score, task_image_size

    if isinstance(task, os.PathLike):  # a local task's path: the records are JSON
        task = os.fspath(task)
    if not isinstance(task, str):
        raise ConfigError(f"task should be the name to show for the task (a string), got {type(task).__name__} "
                          f"{brief(task)}")
    config = sel.config if config is None else config
    if not isinstance(config, SelectConfig):
        raise ConfigError(f"config should be the SelectConfig the selection was made with, got {brief(config)}")
    if sel.config is not None and config != sel.config:
        changed = [f.name for f in dataclasses.fields(config) if getattr(config, f.name) != getattr(sel.config, f.name)]
        raise ConfigError(f"config is not the one this selection was made with (it differs in {', '.join(changed)}): "
                          f"pass the same SelectConfig, `sel.config`")

    return {"task": task, "n_images": sel.embedding.n_images, "n_classes": sel.embedding.n_classes,
            "task_embedding_seconds": round(sel.embedding.seconds, 3), "n_verified": sel.n_verified,
            "n_unverified": sel.n_unverified,
            "ranking": [ranked_record(r) for r in sel.ranking],
            # a front member's rank is null unless it is listed; verified when it was
            "pareto": [ranked_record(r) for r in sel.pareto] if config.pareto else None,
            "pareto_cost": config.pareto, "models_swept": sel.models_swept, "models_ranked": sel.candidates,
            "verified_by": config.verify_by if config.verify_top_k else None,
            "scored_by": config.score or default_score(std.form),
            "task_method": config.task_method, "weigh_parts": config.weigh_parts,
            "task_image_size": task_image_size(config, std),
            "top_k": config.top_k, "verify_top_k": config.verify_top_k,
            "where": [f"{c.field}{c.op}{c.value}" for c in config.constraints]}


def _text(value: str | None) -> str | None:
    """A path as Parquet text: bytes that are not UTF-8 (a POSIX name may hold them; Python keeps them as
    lone surrogates, which Arrow refuses) become U+FFFD."""
    return None if value is None else value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def results_table(records: list[dict[str, Any]], std_id: str, run_id: str | None = None,
                  created_at: float | None = None) -> pa.Table:
    """The records' ranked models (and front members not listed) as one table, RESULT_SCHEMA. `run_id`,
    `created_at` (seconds since the epoch): the run's, on every row (what the job's JSON holds once)."""
    when = None if created_at is None else datetime.datetime.fromtimestamp(round(created_at, 3), datetime.timezone.utc)
    rows = []
    for res in records:
        front = None if res.get("pareto") is None else {r["model_id"] for r in res["pareto"]}
        listed = [r["model_id"] for r in res["ranking"]]
        extra = [r for r in res.get("pareto") or [] if r["model_id"] not in listed]
        rows += [dict(r, task=_text(res["task"]), standard_id=std_id,
                      on_pareto_front=None if front is None else r["model_id"] in front,
                      scored_by=res.get("scored_by"), verified_by=res.get("verified_by"),
                      task_method=res.get("task_method"), weigh_parts=res.get("weigh_parts"),
                      models_swept=res.get("models_swept"), models_ranked=res.get("models_ranked"),
                      where=res.get("where"), task_path=_text(res.get("task_path")),
                      run_id=run_id, created_at=when)
                 for r in res["ranking"] + extra]
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def format_gflops(value: float | None) -> str:
    """GFLOPs as printed: '?' unknown, two decimals, a tiny model's 0.0046 as 4.6e-03 (not 0.00)."""
    if value is None:
        return "?"
    return f"{value:.2f}" if value >= 0.01 or not value else f"{value:.1e}"


def format_results(records: list[dict[str, Any]], std_id: str, m: int,
                   truth: dict[str, dict[str, float]] | None = None, ls_command: str = "python -m jobs.table ls") -> str:
    """The records as text: a ranked table per task (with `truth`, {task: {model_id: accuracy}}, a column
    of each model's measured accuracy) and its Pareto front. `ls_command`: named in a hint when no
    model passes the constraints."""
    lines = []
    for res in records:
        ranked = res.get("models_ranked")
        passed = f", {ranked} of them passing --where {' '.join(res['where'])}" \
            if res.get("where") and ranked is not None and ranked < m else ""
        lines.append(f"\ntask {res['task']}  ({res['n_images']} images, {res['n_classes']} classes; "
                     f"standard {std_id}, {m} models{passed})")
        if res.get("scored_by") == "rank-mean":
            lines.append("score: mean of the model's rank fractions under the per-source and full forms "
                         "(1 = alone first in both; ties share their mid-rank)")
        if res.get("verified_by"):
            lines.append(f"verified: {VERIFIED_BY[res['verified_by']]} the task's labelled images (listed first, "
                         f"best first; the rest by score)")
        if not res["ranking"] and res.get("where"):
            lines.append(f"no model ranked: none of the {m} models passes --where {' '.join(res['where'])} (a value "
                         f"that is unknown passes none; a tag is compared exactly, case included: `{ls_command}`), "
                         f"or every row was left out (the warnings say why)")
        elif not res["ranking"]:
            lines.append("no model ranked: every row was left out (the warnings say why)")
        w = _id_width(res["ranking"])
        head = f"{'rank':>4}  {'model':<{w}} {'score':>7} {'verified':>9}"
        if truth:
            head += f" {'measured':>9}"
        if res["ranking"]:  # no header over an empty table
            lines.append(head + f" {'params':>8} {'GFLOPs':>7}  note")
        for row in res["ranking"]:
            ver, params, gflops = _cells(row)
            line = f"{row['rank']:>4}  {row['model_id']:<{w}} {row['score']:>7.4f} {ver:>9}"
            if truth:
                acc = truth.get(res["task"], {}).get(row["model_id"])
                line += f" {'' if acc is None else f'{100 * acc:.1f}%':>9}"
            note = "; ".join(n for n in ("standard's own model (covers itself)" if row["is_baseline"] else "",
                                         (row.get("verify_error") or "")[:120]) if n)
            lines.append(line + f" {params:>8} {gflops:>7}  {note}")
        if res.get("pareto") is not None:
            lines += _format_front(res["pareto"], res["pareto_cost"])
    return "\n".join(lines)


def _id_width(rows: list[dict[str, Any]]) -> int:
    """The model column's width: the longest id printed (ids were cut to 36 characters, and timm's
    `vit_base_patch16_clip_224.openai_ft_in12k_in1k` and `..._in1k` printed alike)."""
    return max([36] + [len(r["model_id"]) for r in rows])


def _cells(row: dict[str, Any]) -> tuple[str, str, str]:
    """A result row's verified measurement, parameters and GFLOPs as printed."""
    return ("" if row["verified"] is None else f"{row['verified']:.4f}",
            "?" if row["num_params"] is None else f"{row['num_params'] / 1e6:.1f}M",
            format_gflops(row["gflops"]))


def _format_front(front: list[dict[str, Any]], cost: str) -> list[str]:
    name = {"gflops": "GFLOPs", "params": "parameters"}[cost]
    if not front:
        return [f"Pareto front (score against {name}): no model of known {name} passes the constraints"]
    w = _id_width(front)
    lines = [f"Pareto front (score against {name}): {len(front)} model(s), cheapest first; no other model "
             f"scores as high at no more {name} (one of the two strictly)",
             f"{'rank':>4}  {'model':<{w}} {'score':>7} {'verified':>9} {'params':>8} {'GFLOPs':>7}"]
    for row in front:
        ver, params, gflops = _cells(row)
        lines.append(f"{row['rank'] or '-':>4}  {row['model_id']:<{w}} {row['score']:>7.4f} {ver:>9} "
                     f"{params:>8} {gflops:>7}")
    return lines


def write_results(results: list[dict[str, Any]], std_id: str, json_path: str | None,
                  parquet_path: str | None, store: Store | str | None = None, json_stream: TextIO | None = None,
                  skip_save: str = "store=None skips that") -> str | None:
    """Write the results where asked: the local files (`json_path` "-": to `json_stream`, default standard
    output), then with `store` its copy in STORE/results/ (returns that prefix). Each file is written whole
    or not at all, every one that can be is, then a one-line error names those that could not (StoreError
    when the store's copy failed; `skip_save`: how its caller skips the store's copy, for that error)."""
    store = None if store is None else as_store(store)  # a URL or path too, as everywhere
    created_at, run_id = time.time(), uuid.uuid4().hex[:8]
    doc = json.dumps({"standard_id": std_id, "created_at": created_at, "run_id": run_id, "tasks": results}, indent=2)
    # built where written; plain zstd (`portable`) as `jobs.table export` writes, for any reader
    table = functools.cache(lambda: parquet_bytes(results_table(results, std_id, run_id, created_at), portable=True))
    if json_path == "-":
        print(doc, file=json_stream or sys.stdout, flush=True)
        json_path = None

    failed, written = [], []
    for path, write in ((json_path, lambda p: write_file_atomically(p, doc.encode())),
                        (parquet_path, lambda p: write_file_atomically(p, table()))):
        if not path:
            continue
        try:
            write(path)
            written.append(path)
        except OSError as exc:
            failed.append(f"cannot write {path!r}: {os.strerror(exc.errno) if exc.errno else exc}")
    saved = None
    if store is not None:
        run = f"results/select-{time.strftime('%Y%m%dT%H%M%S', time.gmtime(created_at))}-{run_id}"
        try:
            store.write_bytes(f"{run}.json", doc.encode())
            saved = f"{store.url}/{run}"
            store.write_bytes(f"{run}.parquet", table())
        except StoreError as exc:
            failed.append(f"cannot save the results in {store.url}/results/ ({exc}); {skip_save}")
            if saved:  # the JSON without its Parquet: not left behind unsaid
                saved = None
                try:
                    store.delete(f"{run}.json")
                except StoreError:
                    failed.append(f"{store.url}/{run}.json stays, without its .parquet")
    if failed:
        kept = written + ([f"{saved}.json"] if saved else [])
        error = StoreError if store is not None and saved is None else ConfigError
        raise error("; ".join(failed) + (f" (the results are in {', '.join(kept)})" if kept else ""))
    return saved
