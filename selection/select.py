"""Selection: task embeddings, the sweep over the table, constraints, verification."""

from __future__ import annotations

import json
import logging
import operator
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import pyarrow as pa

from selection.catalog import CatalogEntry
from selection.data import ImageSet, load_dataset, stratified_split
from selection.embedding import (TASK_METHODS, TaskQuery, linear_queries, query_scores, source_covariance,
                                 source_weights, task_matrix, task_query)
from selection.errors import ConfigError
from selection.linear_probe import ProbeProtocol, probe_accuracy
from selection.models import LoadedModel, extract_features, load_model
from selection.standard import Standard
from selection.table import EmbeddingTable

log = logging.getLogger(__name__)

_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt,
        "==": operator.eq, "=": operator.eq, "!=": operator.ne}
# How verification measures a shortlisted candidate on the task's labelled images: LogME evidence
# of its features (all of them, no split; chosen on the benchmark's dev tasks,
# docs/method-experiments.md) or linear-probe accuracy under the protocol (fit and measured on halves).
VERIFIERS = ("logme", "probe")
NUMERIC_FIELDS = ("num_params", "params", "gflops", "input_size", "feature_dim")
TEXT_FIELDS = ("tag", "tags", "license", "arch")


@dataclass(frozen=True)
class Constraint:
    """`field op value`, e.g. `params<=5e6`, `gflops<1`, `tag=footwear`, `license!=cc-by-nc`."""

    field: str
    op: str
    value: str

    @classmethod
    def parse(cls, text: str) -> "Constraint":
        m = re.fullmatch(r"\s*([a-z_]+)\s*(<=|>=|==|!=|<|>|=)\s*(\S.*?)\s*", text or "")
        if not m:
            raise ConfigError(f"constraint must look like 'params<=5e6' or 'tag=x', got {text!r}")
        name, op, value = m.groups()
        if name not in NUMERIC_FIELDS + TEXT_FIELDS:
            raise ConfigError(f"unknown constraint field {name!r} in {text!r} "
                              f"(known: {', '.join(NUMERIC_FIELDS + TEXT_FIELDS)})")
        if name in NUMERIC_FIELDS:
            try:
                float(value)
            except ValueError:
                raise ConfigError(f"constraint {text!r}: {value!r} is not a number") from None
        elif op not in ("=", "==", "!="):
            raise ConfigError(f"constraint {text!r}: text fields take only = or !=")
        return cls(name, op, value)

    def mask(self, meta: Any) -> np.ndarray:
        name = "num_params" if self.field == "params" else self.field
        if name in NUMERIC_FIELDS:
            col = np.asarray(meta.column(name).to_numpy(zero_copy_only=False), np.float64)
            with np.errstate(invalid="ignore"):
                return np.asarray(_OPS[self.op](col, float(self.value)), bool)
        if name in ("tag", "tags"):
            has = np.array([self.value in (t or []) for t in meta.column("tags").to_pylist()], bool)
            return has if self.op != "!=" else ~has
        col = np.array([str(v) for v in meta.column(name).to_pylist()])
        return _OPS[self.op](col, self.value)


@dataclass(frozen=True)
class SelectConfig:
    top_k: int = 10
    verify_top_k: int = 0
    verify_by: str = "logme"
    task_method: str = "fisher"  # chosen on the benchmark's dev tasks (docs/benchmark.md)
    task_image_size: int = 64
    constraints: tuple[Constraint, ...] = ()
    protocol: ProbeProtocol = field(default_factory=ProbeProtocol)

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {self.top_k}")
        if self.verify_top_k < 0:
            raise ConfigError(f"verify_top_k must be >= 0, got {self.verify_top_k}")
        if self.verify_by not in VERIFIERS:
            raise ConfigError(f"verify_by must be one of {VERIFIERS}, got {self.verify_by!r}")
        if self.task_method not in TASK_METHODS:
            raise ConfigError(f"task method must be one of {TASK_METHODS}, got {self.task_method!r}")


@dataclass(frozen=True, eq=False)
class TaskEmbedding:
    name: str
    g: np.ndarray               # (d, d) task matrix, trace 1
    source_weights: np.ndarray  # (S,) share of the task's images nearest to each probe source
    n_images: int
    n_classes: int
    seconds: float = 0.0

    def query(self, std: Standard, form: str | None = None) -> TaskQuery:
        """The query against `std`'s table; `form` scores that form's part of it (default: the table's)."""
        form = form or std.form
        if form != std.form and (form, std.form) != ("full", "per-source"):
            raise ConfigError(f"a {std.form!r} table cannot be scored in the {form!r} form")
        z_cov = source_covariance(std.z, std.sources) if form == "per-source" else None
        return task_query(self.g, form, std.width, self.source_weights, z_cov)


def task_split(task: ImageSet, protocol: ProbeProtocol) -> tuple[np.ndarray, np.ndarray]:
    """The protocol's fixed split of a task for probe accuracy: fit on train, measure on test."""
    return stratified_split(task.labels, protocol.test_fraction, protocol.split_seed)


def load_task(spec: str, config: SelectConfig) -> ImageSet:
    min_per_class = 2  # one image of each class on each side of the split
    return load_dataset(spec, config.task_image_size).validate_task(min_per_class)


def embed_task(std: Standard, task: ImageSet, config: SelectConfig,
               baseline: LoadedModel | None = None) -> TaskEmbedding:
    """Task embedding from all the task's labelled images and the standard only (never a candidate)."""
    import time

    t0 = time.perf_counter()
    baseline = baseline or load_model(std.baseline)
    z = std.project(extract_features(baseline, task.images, input_size=std.input_size))
    g = task_matrix(z, task.labels, config.task_method, task.name)
    weights = source_weights(z, std.z, std.sources) if std.form == "per-source" else np.ones(1)
    return TaskEmbedding(task.name, g, weights, len(task), len(task.classes), time.perf_counter() - t0)


@dataclass(frozen=True)
class Ranked:
    model_id: str
    score: float
    rank: int
    is_baseline: bool
    row: dict[str, Any]
    verified: float | None = None  # the verifier's measurement (SelectConfig.verify_by)


def constraint_mask(table: EmbeddingTable, constraints: tuple[Constraint, ...]) -> np.ndarray:
    mask = np.ones(len(table), bool)
    for c in constraints:
        mask &= c.mask(table.meta)
    return mask


Queries = list[TaskQuery] | np.ndarray  # queries, or (T, D) weight vectors of a linear form


def sweep(table: EmbeddingTable, queries: Queries, top_k: int,
          constraints: tuple[Constraint, ...] = ()) -> list[list[Ranked]]:
    """Score every row for every task (one matrix product), return the top-k per task."""
    return sweep_shards([table], queries, top_k, constraints)


def sweep_shards(shards: Iterable[EmbeddingTable], queries: Queries, top_k: int,
                 constraints: tuple[Constraint, ...] = ()) -> list[list[Ranked]]:
    """Sweep shard by shard (one matrix product each), keep each shard's top-k, merge.

    Memory stays at one shard; ties are broken by model id, so the result does not
    depend on how the table is sharded.
    """
    if isinstance(queries, np.ndarray):
        if queries.ndim != 2:
            raise ConfigError(f"task weights should be (T, D), got shape {queries.shape}")
        queries = linear_queries(queries)
    width = {q.num.shape[1] for q in queries}
    best: list[list[tuple[float, str, dict[str, Any]]]] = [[] for _ in queries]
    for shard in shards:
        if len(shard) == 0:
            continue
        if width != {shard.embeddings.shape[1]}:
            raise ConfigError(f"task queries have width {sorted(width)}, the table "
                              f"{shard.embeddings.shape[1]}")
        s = query_scores(shard.embeddings, queries)  # (m_shard, T)
        mask = constraint_mask(shard, constraints)
        k = min(top_k, int(mask.sum()))
        if k == 0:
            continue
        if not mask.all():
            s[~mask] = -np.inf
        for t in range(len(queries)):
            col = s[:, t]
            idx = np.argpartition(-col, k - 1)[:k]
            rows = shard.meta.take(pa.array(idx)).to_pylist()
            best[t].extend((float(col[i]), row["model_id"], row) for i, row in zip(idx, rows))
            best[t] = sorted(best[t], key=lambda x: (-x[0], x[1]))[:top_k]
    return [[Ranked(mid, sc, r, bool(row["is_baseline"]), row)
             for r, (sc, mid, row) in enumerate(ranked, 1)] for ranked in best]


def entry_of(row: dict[str, Any]) -> CatalogEntry:
    return CatalogEntry.from_dict(json.loads(row["catalog_entry"]), f"row {row['model_id']!r}")


def model_task_accuracy(entry: CatalogEntry, task: ImageSet, std_input_size: int | None,
                        protocol: ProbeProtocol, loaded: LoadedModel | None = None) -> float:
    """Linear-probe test accuracy of one model on one task under the fixed protocol."""
    loaded = loaded or load_model(entry)
    feats = extract_features(loaded, task.images, input_size=std_input_size)
    return features_accuracy(feats, task.labels, protocol)


def features_accuracy(feats: np.ndarray, labels: np.ndarray, protocol: ProbeProtocol) -> float:
    """Linear-probe accuracy on the protocol's held-out split of one labelled feature set."""
    train, test = stratified_split(labels, protocol.test_fraction, protocol.split_seed)
    return probe_accuracy(feats[train], labels[train], feats[test], labels[test], protocol)


def verify_candidate(entry: CatalogEntry, task: ImageSet, std_input_size: int | None, config: SelectConfig,
                     loaded: LoadedModel | None = None) -> float:
    """One shortlisted candidate measured on the task (higher is better), by `config.verify_by`.

    "logme": LogME evidence of the candidate's features of all the task's images; "probe":
    linear-probe accuracy, fit on the protocol's train split, measured on its test split.
    """
    if config.verify_by == "probe":
        return model_task_accuracy(entry, task, std_input_size, config.protocol, loaded=loaded)
    from selection.scorers import logme

    loaded = loaded or load_model(entry)
    return logme(extract_features(loaded, task.images, input_size=std_input_size), task.labels)


def rerank_verified(ranked: list[Ranked], measured: dict[str, float]) -> list[Ranked]:
    """Verified candidates first by their measurement (ties: embedding score), then the rest."""
    verified = [r for r in ranked if r.model_id in measured]
    rest = [r for r in ranked if r.model_id not in measured]
    verified.sort(key=lambda r: (-measured[r.model_id], -r.score))
    out = []
    for i, r in enumerate(verified + rest, 1):
        out.append(Ranked(r.model_id, r.score, i, r.is_baseline, r.row, measured.get(r.model_id)))
    return out
