"""Selection: task embeddings, the sweep over the table, constraints, verification."""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import math
import json
import logging
import operator
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from selection.catalog import CatalogEntry
from selection.data import DEFAULT_TASK_SIZE, ImageSet, load_dataset, resize_images, stratified_split
from selection.embedding import (TASK_METHODS, RankQuery, TaskQuery, linear_queries, plan_queries, query_scores,
                                 source_covariance, source_weights, task_matrix, task_query, weigh_parts)
from selection.errors import ConfigError, ModelError, StandardMismatchError, StoreError, ZooselectError, brief
from selection.linear_probe import ProbeProtocol, probe_accuracy
from selection.models import LoadedModel, base_arch, check_device, extract_features, load_model
from selection.standard import Standard, StandardModels, load_standard, load_standard_models, standard_features
from selection.storage import Store, as_store
from selection.table import (EmbeddingTable, Listing, Part, hidden_keys, iter_part, iter_shards, may_have_rows,
                             read_consistently, refuse_first_layout, table_parts)

log = logging.getLogger(__name__)

_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt,
        "==": operator.eq, "=": operator.eq, "!=": operator.ne}
# How verification measures a shortlisted candidate on the task's labelled images: a scorer of
# selection.scorers on its features of all of them (LogME evidence, the default; the ridge probe's
# leave-one-out error), or linear-probe accuracy under the protocol (fit and measured on halves). The dev
# rule (docs/method-experiments.md session 43) replaces LogME by a verifier ahead of it with both
# standards at top 3 and top 5; under the default task method none is.
VERIFIERS = ("logme", "probe", "ridge-loo")
# How a task scores the rows: one stored form, or the mean of a row's ranks under two (TaskEmbedding.query).
SCORES = ("per-source", "full", "diagonal", "rank-mean")
# What a Pareto front weighs the score against: a row's column of that cost (lower is better).
PARETO_COSTS = {"gflops": "gflops", "params": "num_params"}
NUMERIC_FIELDS = ("num_params", "params", "gflops", "input_size", "feature_dim")
TEXT_FIELDS = ("tag", "tags", "license", "arch")


_SUFFIXES = {"k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9}  # as `table ls` prints params (4.9M); B: billions


def _number(text: str, field: str) -> float:
    """A constraint's number: `5e6`; for `params`, also a plain decimal with a K, M, G (or B) suffix, `5M`
    (GFLOPs and sizes have units of their own). ValueError if neither."""
    if field in ("params", "num_params") and re.fullmatch(r"(\d+\.?\d*|\.\d+)[kmgbKMGB]", text):
        return float(text[:-1]) * _SUFFIXES[text[-1].lower()]
    return float(text)


@dataclass(frozen=True)
class Constraint:
    """`field op value`, e.g. `params<=5e6`, `gflops<1`, `tag=footwear`, `license!=cc-by-nc`."""

    field: str
    op: str
    value: str

    def __post_init__(self) -> None:
        if isinstance(self.value, (int, float, np.integer, np.floating)) and not isinstance(self.value, bool) \
                and self.field in NUMERIC_FIELDS:  # Constraint("params", "<=", 5e6)
            object.__setattr__(self, "value", str(self.value))
        for name in ("field", "op", "value"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"a constraint's {name} must be a string, got {brief(getattr(self, name))}")
        text = f"{self.field}{self.op}{self.value}"
        if self.field not in NUMERIC_FIELDS + TEXT_FIELDS:
            raise ConfigError(f"unknown constraint field {self.field!r} in {text!r} "
                              f"(known: {', '.join(NUMERIC_FIELDS + TEXT_FIELDS)})")
        if self.op not in _OPS:
            raise ConfigError(f"constraint {text!r}: unknown operator {self.op!r} (known: {', '.join(_OPS)})")
        if self.field in NUMERIC_FIELDS:
            try:
                number = _number(self.value, self.field)
            except ValueError:
                raise ConfigError(f"constraint {text!r}: {self.value!r} is not a number"
                                  + (" (e.g. 5e6, 5M, 0.5G)" if self.field in ("params", "num_params") else
                                     f" (the K, M, G and B suffixes are for params; {self.field} is a plain number, "
                                     f"e.g. 0.5)" if self.value[-1:].lower() in _SUFFIXES else "")) from None
            if not math.isfinite(number):
                raise ConfigError(f"constraint {text!r}: {self.value!r} is not a finite number")
        elif self.op not in ("=", "==", "!="):
            raise ConfigError(f"constraint {text!r}: text fields take only = or !=")

    @classmethod
    def parse(cls, text: str) -> "Constraint":
        m = re.fullmatch(r"\s*(\w+)\s*(<=|>=|==|!=|<|>|=)\s*([^\s<>=!].*?)\s*", text or "")
        if not m:
            raise ConfigError(f"constraint must look like 'params<=5e6' or 'tag=x', got {text!r}")
        name, op, value = m.groups()
        if name not in NUMERIC_FIELDS + TEXT_FIELDS:  # named in the text as given (spaces and all)
            raise ConfigError(f"unknown constraint field {name!r} in {text!r} "
                              f"(known: {', '.join(NUMERIC_FIELDS + TEXT_FIELDS)})")
        return cls(name, op, value)

    def mask(self, meta: pa.Table) -> np.ndarray:
        name = "num_params" if self.field == "params" else self.field
        if name in NUMERIC_FIELDS:
            col = np.asarray(meta.column(name).to_numpy(zero_copy_only=False), np.float64)
            with np.errstate(invalid="ignore"):  # an unknown value (null, NaN GFLOPs) passes no constraint
                return np.asarray(_OPS[self.op](col, _number(self.value, self.field)), bool) & ~np.isnan(col)
        if name in ("tag", "tags"):  # in Arrow: a Python test per row took 0.95 s at a million rows (0.07 s)
            tags = meta.column("tags").combine_chunks()
            hit = pc.equal(pc.list_flatten(tags), pa.scalar(self.value, pa.string())).fill_null(False)
            has = np.zeros(len(meta), bool)
            has[np.asarray(pc.list_parent_indices(tags))[np.asarray(hit, bool)]] = True
            return has if self.op != "!=" else ~has
        if name == "license":  # SPDX identifiers are case-insensitive: MIT is mit; in Arrow, as tags
            same = pc.equal(pc.utf8_lower(meta.column(name)), pa.scalar(self.value.lower(), pa.string()))
            out = same if _OPS[self.op] is operator.eq else pc.invert(same)
            return np.asarray(out.fill_null(False).to_numpy(zero_copy_only=False), bool)  # unknown: neither
        values = meta.column(name).to_pylist()  # an unknown arch passes neither = nor !=
        col = np.array(["" if v is None else str(v) for v in values], dtype=str)
        value = self.value
        if name == "arch" and "." not in value:  # 'resnet10t' is resnet10t.c3_in1k too: a tag names weights
            col = np.array([base_arch(v) for v in col])
        return _OPS[self.op](col, value) & np.array([v is not None for v in values], bool)


@dataclass(frozen=True)
class SelectConfig:
    """How to select (`select_models`; the jobs' flags of the same names). `top_k`: models listed per
    task; `verify_top_k`: how many of the best to run on the task's labelled images and re-rank by
    `verify_by` (VERIFIERS); `task_method` (TASK_METHODS) and `weigh_parts`: how the task is embedded;
    `score`: how rows are scored (SCORES; None: the rank mean on a per-source table); `constraints`:
    `--where` texts or Constraint objects; `protocol`: the linear probe's (`verify_by="probe"`);
    `pareto`: a cost (PARETO_COSTS) whose score/cost front to find in the same sweep. Checked on creation."""

    top_k: int = 10
    verify_top_k: int = 0
    verify_by: str = "logme"  # kept by the benchmark's dev rule (docs/method-experiments.md, session 43)
    task_method: str = "probe"  # chosen on the benchmark's dev tasks (docs/benchmark.md; session 43)
    # Scale each part of z (the baseline's, the companion's) in G by how well it predicts the labels
    # (selection.embedding.weigh_parts; docs/method-experiments.md, "Session 15").
    weigh_parts: bool = True
    score: str | None = None     # SCORES; None: default_score(the table's form)
    # Task images are resized to this; None: the standard's probe image size (what its rows were measured on).
    task_image_size: int | None = None
    constraints: tuple[Constraint, ...] = ()
    protocol: ProbeProtocol = field(default_factory=ProbeProtocol)
    pareto: str | None = None  # PARETO_COSTS: also find each task's score/cost Pareto front in the sweep

    def __post_init__(self) -> None:
        for name, least in (("top_k", 1), ("verify_top_k", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
            if value < least:
                raise ConfigError(f"{name} must be >= {least}, got {value}")
            object.__setattr__(self, name, int(value))  # numpy's: the results' JSON cannot hold them
        if not isinstance(self.weigh_parts, (bool, np.bool_)):  # "no" read as true
            raise ConfigError(f"weigh_parts must be True or False, got {self.weigh_parts!r}")
        object.__setattr__(self, "weigh_parts", bool(self.weigh_parts))
        if not isinstance(self.protocol, ProbeProtocol):
            raise ConfigError(f"protocol must be a ProbeProtocol, got {brief(self.protocol)}")
        object.__setattr__(self, "constraints", as_constraints(self.constraints))
        if self.verify_by not in VERIFIERS:
            raise ConfigError(f"verify_by must be one of {VERIFIERS}, got {self.verify_by!r}")
        if self.score is not None and self.score not in SCORES:
            raise ConfigError(f"score must be one of {SCORES}, got {self.score!r}")
        if self.task_method not in TASK_METHODS:
            raise ConfigError(f"task method must be one of {TASK_METHODS}, got {self.task_method!r}")
        if self.pareto is not None and self.pareto not in PARETO_COSTS:
            raise ConfigError(f"pareto must be one of {tuple(PARETO_COSTS)} (or None), got {self.pareto!r}")
        if self.task_image_size is not None and (isinstance(self.task_image_size, bool) or not isinstance(
                self.task_image_size, (int, np.integer)) or not 8 <= self.task_image_size <= 1024):
            raise ConfigError(f"task_image_size must be in [8, 1024] (or None: the standard's probe image size), "
                              f"got {self.task_image_size}")
        if self.task_image_size is not None:
            object.__setattr__(self, "task_image_size", int(self.task_image_size))


@dataclass(frozen=True, eq=False)
class TaskEmbedding:
    """A task as the standard sees it (`embed_task`): what its `query` scores every row with."""

    name: str
    g: np.ndarray               # (d, d) task matrix, trace 1
    source_weights: np.ndarray  # (S,) share of the task's images nearest to each probe source
    n_images: int
    n_classes: int
    seconds: float = 0.0

    def query(self, std: Standard, score: str | None = None) -> TaskQuery | RankQuery:
        """The query against `std`'s table, scored by `score` (`SCORES`; default: `default_score(std.form)`).

        A stored form scores that form's part of the table (a per-source table holds the full
        form's block too); "rank-mean" ranks every row under the per-source and full forms and
        averages the two ranks.
        """
        score = check_score(std, score)
        if score == "rank-mean":
            return RankQuery((self.query(std, "per-source"), self.query(std, "full")))
        z_cov = source_covariance(std.z, std.sources) if score == "per-source" else None
        return task_query(self.g, score, std.width, self.source_weights, z_cov)


def check_score(std: Standard, score: str | None) -> str:
    """The score tasks get against `std`'s table: `score`, or `default_score` for None; ConfigError if
    the table cannot be scored so (checked before any task is embedded)."""
    score = score or default_score(std.form)
    if score not in SCORES:
        raise ConfigError(f"score must be one of {SCORES}, got {score!r}")
    if score == "rank-mean" and std.form != "per-source":
        raise ConfigError(f"score 'rank-mean' needs a 'per-source' table, standard {std.id} is {std.form!r}")
    if score not in ("rank-mean", std.form) and (score, std.form) != ("full", "per-source"):
        raise ConfigError(f"a {std.form!r} table cannot be scored in the {score!r} form")
    return score


def default_score(form: str) -> str:
    """How a task scores a table of `form` by default: the mean rank on a per-source table (chosen
    on the benchmark's dev tasks, docs/benchmark.md), the stored form's own score otherwise."""
    return "rank-mean" if form == "per-source" else form


def task_split(task: ImageSet, protocol: ProbeProtocol) -> tuple[np.ndarray, np.ndarray]:
    """The protocol's fixed split of a task for probe accuracy: fit on train, measure on test."""
    return stratified_split(task.labels, protocol.test_fraction, protocol.split_seed)


def task_image_size(config: SelectConfig, std: Standard | None = None) -> int:
    """The size task images are resized to: `config.task_image_size`, else the standard's probe image
    size (else the library's default, 64)."""
    return config.task_image_size or (std.probe_image_size if std is not None else DEFAULT_TASK_SIZE)


def warn_task_image_size(config: SelectConfig, std: Standard) -> None:
    """Log a warning when tasks will be resized to another size than the standard's probe images:
    allowed, but the rows were measured at the probe's size."""
    size = task_image_size(config, std)
    if size != std.probe_image_size:
        log.warning("task images at %d px, the standard's probe images at %d px: its rows were measured at %d px",
                    size, std.probe_image_size, std.probe_image_size)


def load_task(spec: str, config: SelectConfig, std: Standard | None = None,
              progress: Callable[[int, int], None] | None = None) -> ImageSet:
    """A task dataset, resized to `task_image_size(config, std)`, checked to be a classification task
    (JPEG photos decoded at a reduced scale first: `load_dataset`'s `draft`; `progress`: its)."""
    return prepare_task(load_dataset(spec, task_image_size(config, std), draft=True, progress=progress))


def prepare_task(task: ImageSet) -> ImageSet:
    """`task` without repeated images (logged), checked to be a classification task. A copy of an image
    under the same label adds nothing, and lets a model with as many features as images fit the labels
    exactly: LogME's evidence then grows without bound, and a copy on both sides of a split leaks."""
    task, dropped = task.without_repeats()
    if dropped:
        log.warning("task %s: %d repeated image(s) dropped (the same pixels under the same label)", task.name,
                    dropped)
    task = task.validate_task(2)  # one image of each class on each side of the split; before any warning
    near = task.near_repeats()
    if near:  # told, not dropped: they may be two real images that look alike
        log.warning("task %s: %d pair(s) of images under the same label are nearly the same picture (e.g. images "
                    "%d and %d of class %r, counted from 0 in the task's order): if they are copies (re-encoded, "
                    "slightly edited), remove them; like exact repeats, which are dropped, they let a model with "
                    "as many features as images fit the labels, and favour it in verification",
                    task.name, len(near), *_class_positions(task, near[0]), task.classes[task.labels[near[0][0]]])
    return task


def _class_positions(task: ImageSet, pair: tuple[int, int]) -> tuple[int, int]:
    """Where the two images of `pair` (same label) stand among their class's images."""
    members = np.flatnonzero(task.labels == task.labels[pair[0]]).tolist()
    return members.index(pair[0]), members.index(pair[1])


def embed_task(std: Standard, task: ImageSet, config: SelectConfig,
               models: StandardModels | None = None, device: str = "cpu") -> TaskEmbedding:
    """Task embedding from all the task's labelled images and the standard only (never a candidate).

    The standard's networks run on `device` (float32); the task matrix is computed on the CPU.
    """
    import time

    t0 = time.perf_counter()
    z = standard_features(std, task.images, models, device=device)
    emb = embed_task_features(std, z, task.labels, config, task.name)
    return dataclasses.replace(emb, seconds=time.perf_counter() - t0)


def embed_task_features(std: Standard, z: np.ndarray, labels: np.ndarray, config: SelectConfig,
                        name: str = "task") -> TaskEmbedding:
    """`embed_task` from the task images' standard features `z` (`standard_features`); `seconds` is 0."""
    g = task_matrix(z, labels, config.task_method, name)
    if config.weigh_parts:
        g = weigh_parts(g, z, labels, std.parts)
    weights = source_weights(z, std.z, std.sources) if std.form == "per-source" else np.ones(1)
    return TaskEmbedding(name, g, weights, len(labels), len(np.unique(labels)))


@dataclass(frozen=True)
class Ranked:
    """One candidate of a task's ranking: its `score` (higher is better; under the rank mean a fraction
    among the run's candidates, not an accuracy), its `rank` after verification re-ranked the verified
    ones, and its table `row` (metadata; the embedding left out)."""

    model_id: str
    score: float
    rank: int  # from 1; 0 in a Pareto front (the ranking gives its place)
    is_baseline: bool
    row: dict[str, Any]
    verified: float | None = None  # the verifier's measurement (SelectConfig.verify_by)
    parts: tuple[float, ...] = ()  # a rank-mean score's parts: the row's score under each form
    verify_error: str | None = None  # why its verification measured nothing (it failed, or not finite)


def as_constraints(constraints: Iterable[Constraint | str]) -> tuple[Constraint, ...]:
    """Constraints given as Constraint objects or texts (`params<=5e6`), as a tuple of Constraint."""
    if isinstance(constraints, (str, Constraint)) or not isinstance(constraints, (tuple, list)):
        raise ConfigError(f"constraints must be a tuple of Constraint (or of texts such as 'params<=5e6'), "
                          f"got {brief(constraints, 120)}")
    parsed = tuple(Constraint.parse(c) if isinstance(c, str) else c for c in constraints)
    bad = [c for c in parsed if not isinstance(c, Constraint)]
    if bad:
        raise ConfigError(f"constraints must be Constraint objects or texts such as 'params<=5e6', got {brief(bad[0])}")
    return parsed


def constraint_mask(table: EmbeddingTable, constraints: tuple[Constraint, ...]) -> np.ndarray:
    mask = np.ones(len(table), bool)
    for c in as_constraints(constraints):
        mask &= c.mask(table.meta)
    return mask


Query = TaskQuery | RankQuery
Queries = list[Query] | np.ndarray  # queries, or (T, D) weight vectors of a linear form


def _parts(query: Query) -> tuple[TaskQuery, ...]:
    return query.parts if isinstance(query, RankQuery) else (query,)


def unbeaten(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the rows of (n, V) `scores` that fewer than k other rows dominate (at least as large
    in every column, larger in one).

    A dominating row scores more under any score that grows strictly with each column (the column
    itself, a mean of mid-rank fractions), so the top k under it, and every row tied with the k-th,
    are among them, whatever the rest of the table holds. Rows that the k rows of highest rank sum
    all beat are dropped first; with two columns the rest are then counted exactly (one pass in order
    of the first column, then the second), with more, all the rest are kept. Rows equal in every
    column are all kept (`_cut_ties` cuts them by model id). Counting rows larger in both columns
    only kept every row of a value shared by many in one column: a share of a million rows clipped to
    one value made the pool, and each shard's merge, that large (a review, session 48).
    """
    n, v = scores.shape
    if n <= k:
        return np.arange(n)
    if v == 1:
        return np.flatnonzero(scores[:, 0] >= np.partition(scores[:, 0], n - k)[n - k])
    ranks = np.argsort(np.argsort(scores, axis=0, kind="stable"), axis=0, kind="stable").sum(1)
    lead = scores[np.argpartition(-ranks, k - 1)[:k]].min(0)
    idx = np.flatnonzero((scores >= lead).any(1))
    if v > 2:
        return idx
    keep = []
    best: list[float] = []  # the k largest second scores among rows with a larger first score
    order = idx[np.lexsort((-scores[idx, 1], -scores[idx, 0]))]  # first score down, then second down
    first, second = scores[order, 0].tolist(), scores[order, 1].tolist()
    group_start = 0
    for i in range(len(order) + 1):
        if i < len(order) and first[i] == first[group_start]:
            continue
        above = 0  # rows of this first score with a larger second score
        for j in range(group_start, i):
            if j > group_start and second[j] < second[j - 1]:
                above = j - group_start
            if above >= k:
                break  # so do the rest of the group
            if len(best) == k and best[0] >= second[j]:
                continue  # k rows of a larger first score are at least as large in the second
            if above + sum(b >= second[j] for b in best) < k:
                keep.append(order[j])
        for j in range(group_start, i):
            if len(best) < k:
                heapq.heappush(best, second[j])
            elif second[j] > best[0]:
                heapq.heapreplace(best, second[j])
        group_start = i
    return np.sort(np.array(keep, dtype=np.int64))


def _cut_ties(keep: np.ndarray, scores: np.ndarray, ids: list[str], k: int) -> np.ndarray:
    """`unbeaten` rows `keep` (ids `ids`) cut by model id, as the final order breaks ties: with one score
    to exactly k; with more, each set of rows equal in every score to its k smallest ids (copies of one
    model under many ids were all kept)."""
    if len(keep) <= k:
        return keep
    if scores.shape[1] == 1:
        return keep[sorted(range(len(keep)), key=lambda j: (-scores[keep[j], 0], ids[j]))[:k]]
    same: dict[bytes, list[int]] = {}
    for j in range(len(keep)):
        same.setdefault(np.ascontiguousarray(scores[keep[j]]).tobytes(), []).append(j)
    if all(len(js) <= k for js in same.values()):
        return keep
    kept = sorted(j for js in same.values() for j in sorted(js, key=lambda j: ids[j])[:k])
    return keep[kept]


def pareto_front(objectives: np.ndarray) -> np.ndarray:
    """Indices of the rows of (n, v) finite `objectives`, v <= 3, each to be maximised, that no other
    row dominates (at least as large in every column and larger in one); rows equal to each other are
    kept or dropped together. The distinct rows are taken in lexicographically decreasing order, so
    a row's dominators come before it: with two columns one sort decides; with three, each row is
    looked up (a bisection) in the staircase of the rows before it that no other of them dominates
    in the last two columns. O(n log n) either way; rows that one of the 8 of highest rank sum
    dominates are dropped first, at once.
    """
    n, v = objectives.shape
    if v > 3:
        raise ValueError(f"pareto_front takes at most 3 columns, got {v}")
    if n == 0:
        return np.zeros(0, np.int64)
    if v == 1:
        return np.flatnonzero(objectives[:, 0] == objectives[:, 0].max())
    candidates = np.arange(n)
    if v == 3 and n > 64:
        rank_sum = sum(np.searchsorted(np.sort(col), col) for col in objectives.T)
        strong = objectives[np.argsort(-rank_sum, kind="stable")[:8]]
        dominated = ((strong[None] >= objectives[:, None]).all(2) & (strong[None] > objectives[:, None]).any(2)).any(1)
        candidates = np.flatnonzero(~dominated)
    points, inverse = np.unique(objectives[candidates], axis=0, return_inverse=True)
    order = np.lexsort(points.T[::-1])[::-1]  # descending by the first column, then the next
    p = points[order]
    keep = np.ones(len(p), bool)
    if v == 2:  # the rows before are >= in the first column: one >= in the second dominates
        keep[1:] = p[1:, 1] > np.maximum.accumulate(p[:, 1])[:-1]
    else:
        second: list[float] = []   # the staircase, by its second column ascending ...
        third: list[float] = []    # ... so its third column descends
        for i, (_, b, c) in enumerate(p.tolist()):
            j = bisect.bisect_left(second, b)  # rows j.. are >= b in the second column; j has the most third
            if j < len(second) and third[j] >= c:
                keep[i] = False
                continue
            k = bisect.bisect_right(second, b)  # rows before k are <= b; those of them <= c leave the staircase
            lo = k
            while lo > 0 and third[lo - 1] <= c:
                lo -= 1
            second[lo:k], third[lo:k] = [b], [c]
    return candidates[np.isin(inverse.reshape(-1), order[keep])]


def mean_rank(scores: np.ndarray, swept: list[np.ndarray]) -> np.ndarray:
    """(n, V) scores -> (n,) mean over the columns of the rank fraction among the `swept` rows.

    Rank fraction: (rows scoring lower + (rows scoring the same, the row included, + 1) / 2) /
    rows swept: the mid-rank of its tie group, counted from 1, over the rows swept, so a row alone
    best in every column scores 1 (rows tied for best share their mid-rank, below 1; a unique row
    ranked r-th from the bottom scores r / rows swept).
    """
    every = np.concatenate(swept)
    out = np.zeros(len(scores))
    for j in range(scores.shape[1]):
        col = np.sort(every[:, j])
        lo = np.searchsorted(col, scores[:, j], "left")
        hi = np.searchsorted(col, scores[:, j], "right")
        out += (lo + (hi - lo + 1) / 2) / len(col)
    return out / scores.shape[1]


def sweep(table: EmbeddingTable, queries: Queries, top_k: int,
          constraints: tuple[Constraint, ...] = ()) -> list[list[Ranked]]:
    """Score every row for every task (one matrix product), return the top-k per task."""
    return sweep_shards([table], queries, top_k, constraints)


def sweep_shards(shards: Iterable[EmbeddingTable], queries: Queries, top_k: int,
                 constraints: tuple[Constraint, ...] = ()) -> list[list[Ranked]]:
    """The top-k of every task (`sweep_fronts` without a front)."""
    return sweep_fronts(shards, queries, top_k, constraints)[0]


def sweep_fronts(shards: Iterable[EmbeddingTable], queries: Queries, top_k: int,
                 constraints: tuple[Constraint, ...] = (),
                 pareto: str | None = None) -> tuple[list[list[Ranked]], list[list[Ranked]]]:
    """Sweep shard by shard (one matrix product each), keep each shard's contenders, merge.

    Memory stays at one shard, plus, for a RankQuery, its scores of every row (4 bytes a row
    a part). Contenders are the rows that fewer than top-k others beat under every part
    (`unbeaten`): the top-k of one query, and all that can still reach a rank mean's top-k.
    Ties are broken by model id (a rank mean's by its first part, then the id), so the result does not
    depend on how the table is sharded.
    A row of the standard's own baseline or companion (`is_baseline`) covers itself, so its score says
    nothing about the task: it is ranked after every other row (still listed, and flagged).

    With `pareto` (`PARETO_COSTS`), each task's Pareto front of score against that cost is found in
    the same sweep: the rows that no other row matches or beats in score at no more cost (one of the
    two strictly), cheapest first (rank 0; rows of unknown cost and the standard's own rows are left
    out). Its contenders are each shard's rows that no other row beats in every score part at no more
    cost (`pareto_front`): a rank mean grows with every part. Returns (top-k per task, front per
    task: empty without `pareto`).
    """
    state = Sweep(queries, top_k, constraints, pareto)
    for shard in shards:
        state.add(shard)
    return state.result()


@dataclass
class SweepPart:
    """What a sweep keeps of the rows it saw, per task: its contenders (score parts, model id, row), the
    standard's own rows (kept aside), for a rank mean every row's score parts, and the Pareto
    contenders (score parts, cost, model id, row); and how many rows of each probe-pass kind it saw.
    The sweeps of disjoint sets of rows (in other processes) merge into the sweep of their union
    (`Sweep.merge`)."""

    pools: list[list[tuple[np.ndarray, str, dict[str, Any]]]]
    aside: list[list[tuple[np.ndarray, str, dict[str, Any]]]]
    swept: list[list[np.ndarray]]
    fronts: list[list[tuple[np.ndarray, float, str, dict[str, Any]]]]
    computes: dict[str, int]
    rows: int = 0
    candidates: int = 0  # rows that pass the constraints and can be ranked: a rank fraction's denominator


class Sweep:
    """`sweep_fronts` one shard at a time (`add`), or from other sweeps' parts (`merge`), then `result`."""

    def __init__(self, queries: Queries, top_k: int, constraints: tuple[Constraint, ...] = (),
                 pareto: str | None = None) -> None:
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise ConfigError(f"top_k must be an integer >= 1, got {top_k!r}")
        if pareto is not None and pareto not in PARETO_COSTS:
            raise ConfigError(f"pareto must be one of {tuple(PARETO_COSTS)} (or None), got {pareto!r}")
        if isinstance(queries, np.ndarray):
            if queries.ndim != 2:
                raise ConfigError(f"task weights should be (T, D), got shape {queries.shape}")
            queries = linear_queries(queries)
        if isinstance(queries, (TaskQuery, RankQuery)):  # one task's query where the list goes
            raise ConfigError(f"queries should be a list of task queries, got one {type(queries).__name__}: "
                              f"pass [query]")
        if not isinstance(queries, (list, tuple)) or not all(isinstance(q, (TaskQuery, RankQuery)) for q in queries):
            raise ConfigError(f"queries should be a list of TaskQuery or RankQuery (TaskEmbedding.query), "
                              f"or (T, D) task weights, got {brief(queries)}")
        if pareto is not None and any(len(_parts(q)) > 2 for q in queries):
            raise ConfigError(f"a Pareto front takes scores of at most 2 parts, got a query of "
                              f"{max(len(_parts(q)) for q in queries)}")
        self.queries, self.top_k, self.constraints = list(queries), top_k, as_constraints(constraints)
        self.cost_of = PARETO_COSTS[pareto] if pareto is not None else None
        self.flat = [p for q in self.queries for p in _parts(q)]
        self.width = {p.num.shape[1] for p in self.flat} | {p.den.shape[1] for p in self.flat if p.den is not None}
        if len(self.width) > 1:
            raise ConfigError(f"the task queries of one sweep must have one width, got {sorted(self.width)}")
        self.plan = plan_queries(self.flat)
        n = len(self.queries)
        self.part = SweepPart([[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)],
                              [[] for _ in range(n)], {})

    def add(self, shard: EmbeddingTable) -> None:
        """Sweep one more shard (one matrix product) and keep its contenders."""
        if len(shard) == 0:
            return
        part = self.part
        part.rows += len(shard)
        if "compute" in shard.meta.column_names:
            for kind in pc.value_counts(shard.meta.column("compute")).to_pylist():
                if kind["values"] is not None:
                    part.computes[kind["values"]] = part.computes.get(kind["values"], 0) + kind["counts"]
        if not self.queries:
            raise ConfigError("no task queries to sweep the table with")
        if self.width != {shard.embeddings.shape[1]}:
            raise ConfigError(f"task queries have width {sorted(self.width)}, the table "
                              f"{shard.embeddings.shape[1]}")
        rows_ok = np.flatnonzero(constraint_mask(shard, self.constraints))
        if len(rows_ok) == 0:
            return
        s_all = query_scores(shard.embeddings, self.plan)[rows_ok]  # (m_ok, parts of every query)
        # The whole row, not only the blocks the queries weigh: a row written by another tool with NaN/inf
        # anywhere cannot be ranked (B105), whatever the tasks.
        finite = np.isfinite(shard.embeddings).all(1)[rows_ok] & np.isfinite(s_all).all(1)
        if not finite.all():
            bad = shard.meta.column("model_id").take(pa.array(rows_ok[~finite])).to_pylist()
            log.warning("%d model(s) left out: NaN or inf in the row, which cannot be ranked: %s",
                        len(bad), ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else ""))
            rows_ok, s_all = rows_ok[finite], s_all[finite]
            if len(rows_ok) == 0:
                return
        part.candidates += len(rows_ok)
        # The standard's own baseline or companion covers itself: its score says nothing about the task.
        # Such rows (a few at most) are kept aside, out of the pruning, and ranked after every other.
        flags = shard.meta.column("is_baseline") if "is_baseline" in shard.meta.column_names else None
        own = (np.flatnonzero(flags.fill_null(False).to_numpy(zero_copy_only=False)[rows_ok])
               if flags is not None and pc.any(flags).as_py() else np.array([], int))
        if len(own):
            own_rows = shard.meta.take(pa.array(rows_ok[own])).to_pylist()
            others = np.setdiff1d(np.arange(len(rows_ok)), own)
            rows_ok, s_all, s_own = rows_ok[others], s_all[others], s_all[own]
        col = 0
        for t, q in enumerate(self.queries):
            cols = slice(col, col + len(_parts(q)))
            col = cols.stop
            s = s_all[:, cols]
            if len(own):
                part.aside[t] += [(s_own[i, cols], row["model_id"], row) for i, row in enumerate(own_rows)]
            if isinstance(q, RankQuery):
                part.swept[t] += [s, s_own[:, cols]] if len(own) else [s]
            if len(rows_ok) == 0:
                continue
            keep = unbeaten(s, self.top_k)
            keep = _cut_ties(keep, s, shard.meta.column("model_id").take(pa.array(rows_ok[keep])).to_pylist(),
                             self.top_k)
            rows = shard.meta.take(pa.array(rows_ok[keep])).to_pylist()
            part.pools[t] = _prune(part.pools[t] + [(s[i], row["model_id"], row) for i, row in zip(keep, rows)],
                                   self.top_k)
            if self.cost_of is not None:
                part.fronts[t] = _front_contenders(part.fronts[t], shard, rows_ok, s, self.cost_of)

    def merge(self, other: SweepPart) -> None:
        """Take in the part of a sweep of other rows (the same queries, k, constraints and cost)."""
        part = self.part
        if len(other.pools) != len(self.queries):
            raise ConfigError(f"a sweep part of {len(other.pools)} task(s) cannot merge into a sweep of "
                              f"{len(self.queries)}")
        part.rows += other.rows
        part.candidates += other.candidates
        for kind, n in other.computes.items():
            part.computes[kind] = part.computes.get(kind, 0) + n
        for t in range(len(self.queries)):
            part.pools[t] = _prune(part.pools[t] + other.pools[t], self.top_k)
            part.aside[t] += other.aside[t]
            part.swept[t] += other.swept[t]
            part.fronts[t] = _prune_front(part.fronts[t] + other.fronts[t])

    def result(self) -> tuple[list[list[Ranked]], list[list[Ranked]]]:
        """(top-k per task, Pareto front per task) of every row added or merged."""
        part = self.part
        if len(part.computes) > 1:
            log.warning("the table mixes rows whose probe pass ran differently (%s): their scores differ slightly "
                        "(docs/performance.md); embed a table with one kind of actor",
                        ", ".join(f"{n} {k}" for k, n in sorted(part.computes.items())))
        out, front_out = [], []
        for t, q in enumerate(self.queries):
            front_out.append(_final_front(part.fronts[t], q, part.swept[t]))
            pool = part.pools[t] + part.aside[t]
            if not pool:
                out.append([])
                continue
            parts = np.stack([p[0] for p in pool]).astype(np.float64)
            score = mean_rank(parts, part.swept[t]) if isinstance(q, RankQuery) else parts[:, 0]
            last = len(part.pools[t])  # the standard's own models after every other
            order = sorted(range(len(pool)),
                           key=lambda i: (i >= last, -score[i], -parts[i, 0], pool[i][1]))[:self.top_k]
            out.append([Ranked(pool[i][1], float(score[i]), r, bool(pool[i][2]["is_baseline"]), pool[i][2],
                               parts=tuple(parts[i]) if isinstance(q, RankQuery) else ())
                        for r, i in enumerate(order, 1)])
        return out, front_out


def _prune(pool: list[tuple[np.ndarray, str, dict[str, Any]]], k: int) -> list[tuple[np.ndarray, str, dict[str, Any]]]:
    """The contenders of a pool (score parts, model id, row): `unbeaten`, ties cut by model id."""
    if not pool:
        return pool
    pooled = np.stack([p[0] for p in pool])
    keep = unbeaten(pooled, k)
    return [pool[i] for i in _cut_ties(keep, pooled, [pool[i][1] for i in keep], k)]


def _front_contenders(front: list[tuple[np.ndarray, float, str, dict[str, Any]]], shard: EmbeddingTable,
                      rows: np.ndarray, scores: np.ndarray,
                      cost_of: str) -> list[tuple[np.ndarray, float, str, dict[str, Any]]]:
    """`front` (score parts, cost, model id, row) with the shard's `rows` (their `scores`) merged in,
    keeping the rows that no other beats in every part at no more cost."""
    cost = pc.cast(shard.meta.column(cost_of), pa.float64()).to_numpy(zero_copy_only=False)[rows]
    known = np.flatnonzero(np.isfinite(cost))  # null or NaN: unknown
    if len(known) == 0:
        return front
    new = known[pareto_front(np.column_stack([scores[known], -cost[known]]))]
    metas = shard.meta.take(pa.array(rows[new])).to_pylist()
    return _prune_front(front + [(scores[i], float(cost[i]), row["model_id"], row) for i, row in zip(new, metas)])


def _prune_front(pool: list[tuple[np.ndarray, float, str, dict[str, Any]]]
                 ) -> list[tuple[np.ndarray, float, str, dict[str, Any]]]:
    """The rows of a pool (score parts, cost, model id, row) that no other beats in every part at no more cost."""
    if not pool:
        return pool
    keep = pareto_front(np.column_stack([np.stack([p[0] for p in pool]), -np.array([p[1] for p in pool])]))
    return [pool[i] for i in keep]


def _final_front(front: list[tuple[np.ndarray, float, str, dict[str, Any]]], query: Query,
                 swept: list[np.ndarray]) -> list[Ranked]:
    """The contenders' Pareto front under the final score, cheapest first (ties: higher score, id)."""
    if not front:
        return []
    parts = np.stack([p[0] for p in front]).astype(np.float64)
    score = mean_rank(parts, swept) if isinstance(query, RankQuery) else parts[:, 0]
    cost = np.array([p[1] for p in front])
    keep = sorted(pareto_front(np.column_stack([score, -cost])), key=lambda i: (cost[i], -score[i], front[i][2]))
    return [Ranked(front[i][2], float(score[i]), 0, False, front[i][3],
                   parts=tuple(parts[i]) if isinstance(query, RankQuery) else ()) for i in keep]


def entry_of(row: dict[str, Any]) -> CatalogEntry:
    """The catalog entry a row was embedded from: what verification loads (ModelError without one)."""
    raw = row.get("catalog_entry")
    try:
        value = json.loads(raw)
    except (TypeError, ValueError, RecursionError):
        raise ModelError(f"model {row['model_id']!r}: its row holds no readable catalog entry ({brief(raw, 60)}), so "
                         f"it cannot be verified; embed it again") from None
    return CatalogEntry.from_dict(value, f"row {row['model_id']!r}")


def model_task_accuracy(entry: CatalogEntry, task: ImageSet, std_input_size: int | None,
                        protocol: ProbeProtocol, loaded: LoadedModel | None = None, device: str = "cpu") -> float:
    """Linear-probe test accuracy of one model on one task under the fixed protocol."""
    loaded = loaded or load_model(entry, std_input_size)
    feats = extract_features(loaded, task.images, input_size=std_input_size, device=device)
    return features_accuracy(feats, task.labels, protocol)


def features_accuracy(feats: np.ndarray, labels: np.ndarray, protocol: ProbeProtocol) -> float:
    """Linear-probe accuracy on the protocol's held-out split of one labelled feature set."""
    train, test = stratified_split(labels, protocol.test_fraction, protocol.split_seed)
    return probe_accuracy(feats[train], labels[train], feats[test], labels[test], protocol)


def verify_candidate(entry: CatalogEntry, task: ImageSet, std_input_size: int | None, config: SelectConfig,
                     loaded: LoadedModel | None = None, device: str = "cpu",
                     weights_sha256: str | None = None) -> float:
    """One shortlisted candidate measured on the task (higher is better), by `config.verify_by`.

    "logme" / "ridge-loo": that scorer (selection.scorers) of the candidate's features of all the
    task's images; "probe": linear-probe accuracy, fit on the protocol's train split, measured on
    its test split. The features are computed on `device` in float32 (no autocast).
    `weights_sha256`: the digest its row was embedded from; weights that changed since are refused
    (ModelError), so a ranking is never re-ordered by other weights than those it scored.
    """
    loaded = loaded or load_model(entry, std_input_size)
    if weights_sha256 is not None and loaded.weights_sha256 != weights_sha256:
        raise ModelError(f"model {entry.id!r}: its weights changed since it was embedded (sha256 "
                         f"{loaded.weights_sha256[:12]}..., the table's row {weights_sha256[:12]}...); "
                         f"re-embed it (jobs.embed or jobs.reindex)")
    if config.verify_by == "probe":  # its split by position: made on the images, not on the order given
        return model_task_accuracy(entry, task.in_content_order(), std_input_size, config.protocol, loaded=loaded,
                                   device=device)
    from selection.scorers import SCORERS

    feats = extract_features(loaded, task.images, input_size=std_input_size, device=device)
    return SCORERS[config.verify_by](feats, task.labels)


TIE_CAP = 2  # a tie at the verification cut-off is verified whole, up to this many times K rows in all


def verification_shortlist(ranked: list[Ranked], k: int) -> list[Ranked]:
    """The rows verification runs on: the top k, and the rows after them that tie the k-th in score (the
    sweep orders equals by the rank mean's first part, then by model id, a weak guide to the task: a tie
    at the cut-off left the best model of the demo's footwear task unverified), at most TIE_CAP * k in all."""
    short = ranked[:k]
    for r in ranked[k:TIE_CAP * k]:
        if not short or r.score != short[-1].score or r.is_baseline != short[-1].is_baseline:
            break
        short.append(r)
    return short


Shortlist = tuple[list[list[Ranked]], int, list[list[Ranked]], int]


def shortlist(shards: Iterable[EmbeddingTable], queries: Queries, config: SelectConfig) -> Shortlist:
    """One sweep for every task (`config_sweep`), keeping the top max(top_k, TIE_CAP * verify_top_k):
    verification re-ranks its shortlist even when fewer are listed. Returns the rankings, the number of
    rows swept, each task's Pareto front (empty without `config.pareto`) and the number of candidates
    (the rows that pass the constraints and can be ranked: under the rank mean, what a score is a fraction
    among)."""
    state = config_sweep(queries, config)
    for shard in shards:
        state.add(shard)
    rankings, fronts = state.result()
    return rankings, state.part.rows, fronts, state.part.candidates


def config_sweep(queries: Queries, config: SelectConfig) -> Sweep:
    """The sweep a selection runs: the top max(top_k, TIE_CAP * verify_top_k) under the config's constraints
    (`verification_shortlist` may take ties at the cut-off), and its Pareto front."""
    return Sweep(queries, max(config.top_k, TIE_CAP * config.verify_top_k), config.constraints, config.pareto)


def sweep_part(store: Store, std: Standard, part: Part, hidden: set[str], queries: Queries,
               config: SelectConfig) -> SweepPart:
    """The sweep of one part of a listed table (`selection.table.table_parts`), for `shortlist_table`'s
    `map_parts` to merge; `hidden`: the listing's `hidden_keys`."""
    state = config_sweep(queries, config)
    for shard in iter_part(store, std, part, hidden):
        state.add(shard)
    return state.part


# Sweeps the parts of a listing (e.g. in parallel Ray tasks: jobs.select): `map_parts(parts, hidden)`
# returns each part's `sweep_part`, in any order, or raises (ObjectGoneError: the listing is out of date).
MapParts = Callable[[list[Part], set[str]], Iterable[SweepPart]]


def worth_parts(listing: Listing, parts: list[Part]) -> bool:
    """Whether `shortlist_table` sweeps a listing through `map_parts`: two segments or more, or more than
    one batch of row objects, and no segment hidden in part by another compaction's (segments named
    before session 30 each count as a compaction: their parts would read each other's keys, S^2 / 2
    reads; the next compaction fixes them)."""
    return ((len(listing.segments) >= 2 or len(parts) - len(listing.segments) >= 2)
            and not any(p.newer for p in parts))


def shortlist_table(std: Standard, table: Store | EmbeddingTable, queries: Queries, config: SelectConfig,
                    map_parts: MapParts | None = None) -> Shortlist:
    """`shortlist` over a table in memory, or over a store's table of `std` listed now (and again if
    it changes during the sweep: `read_consistently`). With `map_parts`, a listing `worth_parts` is
    swept part by part (segments, batches of row objects) through it, and the parts merged: the same
    result. Refuses a table with no rows."""
    if isinstance(table, EmbeddingTable):
        if table.standard_id != std.id:
            raise StandardMismatchError(f"the table given holds rows of standard {table.standard_id}, "
                                        f"not of {std.id}; refusing to mix standards")
        result = shortlist([table], queries, config)
        where = "the table given"
    else:
        store = table

        def read(listing: Listing) -> Shortlist:
            parts = table_parts(listing)
            if map_parts is None or not worth_parts(listing, parts):
                return shortlist(iter_shards(store, std, listing), queries, config)
            state = config_sweep(queries, config)
            for part in map_parts(parts, hidden_keys(listing) if listing.segments else set()):
                state.merge(part)
            rankings, fronts = state.result()
            return rankings, state.part.rows, fronts, state.part.candidates

        result = read_consistently(store, std, read)
        where = store.url
    if not result[1]:
        raise StoreError(f"no models are embedded under standard {std.id} in {where}")
    return result


def apply_verification(rankings: list[list[Ranked]], k: int, results: list[Any]) -> list[list[Ranked]]:
    """Re-rank each task's top k (`verification_shortlist`) by `results`: one per shortlisted row, task by
    task, in ranking order (a float, or the ZooselectError its verification raised: logged, the row keeps
    its place after the verified ones)."""
    want = sum(len(verification_shortlist(ranked, k)) for ranked in rankings)
    if len(results) != want:
        raise ValueError(f"one verification result per shortlisted row: {want} expected, got {len(results)}")
    it = iter(results)
    out = []
    for ranked in rankings:
        measured, errors = {}, {}
        for r in verification_shortlist(ranked, k):
            value = next(it)
            if isinstance(value, ZooselectError):
                errors[r.model_id] = f"verification failed: {value}"
            elif not np.isfinite(value):
                errors[r.model_id] = f"verification measured {value}; left unverified"
            else:
                measured[r.model_id] = value
            if r.model_id in errors:
                log.warning("verification of %s %s", r.model_id, errors[r.model_id][len("verification "):])
        out.append(rerank_verified(ranked, measured, errors))
    return out


def front_with_shortlist(front: list[Ranked], shortlist: list[Ranked], top_k: int) -> list[Ranked]:
    """A task's Pareto front with its members' places in the task's (verified) shortlist: a member's rank
    when it is among the top k listed (0 otherwise), its measurement whenever it was verified."""
    placed = {r.model_id: r for r in shortlist}
    return [f if f.model_id not in placed else
            dataclasses.replace(f, rank=placed[f.model_id].rank if placed[f.model_id].rank <= top_k else 0,
                                verified=placed[f.model_id].verified) for f in front]


def rerank_verified(ranked: list[Ranked], measured: dict[str, float],
                    errors: dict[str, str] | None = None) -> list[Ranked]:
    """Verified candidates first by their measurement, then the rest. `ranked` is in the sweep's order,
    which ties keep: the standard's own models after every other (their scores are their coverage of
    themselves, the highest), equal scores as the sweep broke them."""
    verified = [r for r in ranked if r.model_id in measured]
    rest = [r for r in ranked if r.model_id not in measured]
    verified.sort(key=lambda r: -measured[r.model_id])  # stable
    out = []
    for i, r in enumerate(verified + rest, 1):
        out.append(dataclasses.replace(r, rank=i, verified=measured.get(r.model_id),
                                       verify_error=(errors or {}).get(r.model_id)))
    return out


@dataclass(frozen=True, eq=False)
class Selection:
    """One task's result: its embedding, the ranking (top_k), how many of the shortlist were verified,
    with `SelectConfig.pareto` the score/cost Pareto front of every model swept (cheapest first), and
    how many of the shortlist measured nothing (their verification failed: `Ranked.verify_error`), and
    the `config` it was made with. `selection.results` writes it as the jobs do."""

    embedding: TaskEmbedding
    ranking: list[Ranked]
    n_verified: int
    models_swept: int
    pareto: list[Ranked] = field(default_factory=list)
    n_unverified: int = 0
    config: SelectConfig | None = None
    candidates: int | None = None  # of the models swept, those that passed the constraints and could be ranked


def select_models(store: Store | str, tasks: Iterable[ImageSet | str], config: SelectConfig | None = None, *,
                  standard_id: str | None = None, device: str = "cpu") -> list[Selection]:
    """Select models for `tasks` from a store's table, in this process (no Ray): what `jobs.select`
    runs on a cluster.

    A task is an ImageSet or a dataset spec (a path or spec string); either is resized to
    `task_image_size(config, std)`. Every task is embedded with the standard's networks alone
    (`embed_task`, on `device`), the table is swept once for all tasks, and with `config.verify_top_k`
    the top k of each are run on the task's labelled images and re-ranked (a verification that fails
    with a zooselect error, e.g. a checkpoint gone or corrupt, is logged; the row stays, unverified).
    `store`: a Store, or its URL. `standard_id`: the store's default standard when None.
    """
    if not isinstance(tasks, (str, os.PathLike, ImageSet)) and isinstance(tasks, Iterable):
        tasks = list(tasks)  # a generator is read once
    if isinstance(tasks, (str, os.PathLike, ImageSet)):  # one task where the list goes
        name = tasks.name if isinstance(tasks, ImageSet) else os.fspath(tasks)
        raise ConfigError(f"tasks should be a list of tasks, got one {type(tasks).__name__} {name!r}: pass [task]")
    if not isinstance(tasks, list) or not tasks:
        raise ConfigError(f"tasks should be a non-empty list of ImageSets or dataset specs, got {brief(tasks)}")
    odd = [t for t in tasks if not isinstance(t, (str, os.PathLike, ImageSet))]
    if odd:
        raise ConfigError(f"a task should be an ImageSet or a dataset spec, got {type(odd[0]).__name__} {brief(odd[0])}")
    config = SelectConfig() if config is None else config
    if not isinstance(config, SelectConfig):
        raise ConfigError(f"config should be a SelectConfig, got {type(config).__name__} {brief(config)}")
    check_device(device)
    store = as_store(store)  # or a store URL or path, as the jobs take it
    std = load_standard(store, standard_id)
    check_score(std, config.score)
    if not may_have_rows(store, std.id):
        refuse_first_layout(store, std.id)
        raise StoreError(f"no models are embedded under standard {std.id} in {store.url}")
    warn_task_image_size(config, std)
    size = task_image_size(config, std)
    tasks = [prepare_task(dataclasses.replace(t, images=resize_images(t.images, size)))
             if isinstance(t, ImageSet) else load_task(os.fspath(t), config, std) for t in tasks]
    models = load_standard_models(std)
    embs = [embed_task(std, task, config, models=models, device=device) for task in tasks]
    rankings, swept, fronts, candidates = shortlist_table(std, store, [e.query(std, config.score) for e in embs],
                                                          config)
    if config.constraints and not any(rankings):  # as the jobs' printed table says it
        log.warning("no model ranked: none of the %d models passes the constraints %s (a value that is unknown "
                    "passes none; a tag is compared exactly, case included)", swept,
                    " ".join(f"{c.field}{c.op}{c.value}" for c in config.constraints))
    k = config.verify_top_k
    if k:
        results: list[Any] = []
        for task, ranked in zip(tasks, rankings):
            for r in verification_shortlist(ranked, k):
                try:
                    results.append(verify_candidate(entry_of(r.row), task, std.input_size, config, device=device,
                                                    weights_sha256=r.row["weights_sha256"]))
                except ZooselectError as exc:
                    results.append(exc)
        rankings = apply_verification(rankings, k, results)
    return [selection_of(e, ranked, swept, front, config, candidates)
            for e, ranked, front in zip(embs, rankings, fronts)]


def selection_of(emb: TaskEmbedding, ranked: list[Ranked], swept: int, front: list[Ranked],
                 config: SelectConfig, candidates: int | None = None) -> Selection:
    """A task's Selection from its ranking as verified (every model kept by the sweep) and its front;
    `candidates`: how many of the `swept` rows passed the constraints and could be ranked."""
    n_verified = sum(r.verified is not None for r in ranked)
    return Selection(emb, ranked[:config.top_k], n_verified, swept, front_with_shortlist(front, ranked, config.top_k),
                     n_unverified=sum(r.verify_error is not None for r in ranked), config=config,
                     candidates=candidates)
