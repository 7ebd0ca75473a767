"""The embedding table: one Parquet object per model under embeddings/<standard_id>/.

    embeddings/<standard_id>/<shard>/<model_key>.parquet

Add and remove are single-object operations; a rerun overwrites identical content.
Reading validates every row against the standard (id, schema version, width) and
refuses to mix.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

import selection
from selection.errors import StandardMismatchError, StoreError
from selection.keys import model_key, shard_of
from selection.standard import Standard
from selection.storage import Store

log = logging.getLogger(__name__)

META_FIELDS = [
    pa.field("model_id", pa.string(), nullable=False),
    pa.field("model_key", pa.string(), nullable=False),
    pa.field("arch", pa.string()),
    pa.field("weights_source", pa.string()),
    pa.field("weights_sha256", pa.string()),
    pa.field("is_baseline", pa.bool_()),
    pa.field("tags", pa.list_(pa.string())),
    pa.field("license", pa.string()),
    pa.field("input_size", pa.int32()),
    pa.field("feature_dim", pa.int32()),
    pa.field("num_params", pa.int64()),
    pa.field("gflops", pa.float64()),
    pa.field("standard_id", pa.string(), nullable=False),
    pa.field("form", pa.string()),
    pa.field("schema_version", pa.int32()),
    pa.field("ridge_alpha", pa.float64()),
    pa.field("embed_seconds", pa.float64()),
    pa.field("images_per_second", pa.float64()),
    pa.field("library_versions", pa.string()),
    pa.field("catalog_entry", pa.string()),
]


def schema_for(std: Standard) -> pa.Schema:
    return pa.schema(META_FIELDS + [
        pa.field("embedding", pa.list_(pa.float32(), std.width), nullable=False),
        pa.field("coverage", pa.list_(pa.float32(), std.d)),
    ], metadata={b"zooselect.standard_id": std.id.encode(),
                 b"zooselect.schema_version": str(selection.SCHEMA_VERSION).encode()})


def row_path(standard_id: str, model_id: str) -> str:
    key = model_key(model_id)
    return f"embeddings/{standard_id}/{shard_of(key)}/{key}.parquet"


def make_row_table(std: Standard, row: dict[str, Any]) -> pa.Table:
    """One-row Parquet table; validates the embedding width."""
    emb = np.asarray(row["embedding"], np.float32)
    if emb.shape != (std.width,):
        raise StandardMismatchError(f"embedding of {row['model_id']!r} has width {emb.shape}, "
                                    f"standard {std.id} needs ({std.width},)")
    schema = schema_for(std)
    data = {f.name: [row.get(f.name)] for f in META_FIELDS}
    data["embedding"] = [emb.tolist()]
    data["coverage"] = [np.asarray(row["coverage"], np.float32).tolist()]
    return pa.table(data, schema=schema)


def write_row(store: Store, std: Standard, row: dict[str, Any]) -> str:
    path = row_path(std.id, row["model_id"])
    store.write_table(path, make_row_table(std, row))
    return path


def read_row(store: Store, std: Standard, model_id: str) -> dict[str, Any] | None:
    path = row_path(std.id, model_id)
    if not store.exists(path):
        return None
    t = store.read_table(path)
    _validate(t, std, path)
    return t.drop_columns(["embedding", "coverage"]).to_pylist()[0]


def delete_row(store: Store, std: Standard, model_id: str) -> bool:
    return store.delete(row_path(std.id, model_id))


def list_rows(store: Store, standard_id: str) -> list[str]:
    return store.list(f"embeddings/{standard_id}", ".parquet")


def _validate(t: pa.Table, std: Standard, where: str) -> None:
    names = set(t.column_names)
    if not {"model_id", "embedding", "standard_id", "schema_version"} <= names:
        raise StandardMismatchError(f"{where}: not a zooselect embedding object (columns {sorted(names)})")
    sids = set(t.column("standard_id").to_pylist())
    if sids != {std.id}:
        raise StandardMismatchError(f"{where}: rows of standard(s) {sorted(map(str, sids))} found in "
                                    f"the table of standard {std.id}; refusing to mix standards")
    versions = set(t.column("schema_version").to_pylist())
    if versions != {selection.SCHEMA_VERSION}:
        raise StandardMismatchError(f"{where}: schema version(s) {sorted(map(str, versions))}, this "
                                    f"zooselect reads {selection.SCHEMA_VERSION}")
    etype = t.schema.field("embedding").type
    width = getattr(etype, "list_size", None)
    if width != std.width:
        raise StandardMismatchError(f"{where}: embedding width {width}, standard {std.id} "
                                    f"({std.form}, d={std.d}) needs {std.width}")


@dataclass(frozen=True, eq=False)
class EmbeddingTable:
    """All rows of one standard: metadata (Arrow, no embedding) and an (m, D) float32 matrix."""

    standard_id: str
    meta: pa.Table
    embeddings: np.ndarray

    @property
    def model_ids(self) -> list[str]:
        return self.meta.column("model_id").to_pylist()

    def __len__(self) -> int:
        return self.meta.num_rows


def embeddings_matrix(t: pa.Table) -> np.ndarray:
    col = t.column("embedding").combine_chunks()
    if len(col) == 0:
        return np.zeros((0, col.type.list_size), np.float32)
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)


def load_table(store: Store, std: Standard) -> EmbeddingTable:
    """Read every row of `std`, validating each object; duplicates resolve to the last write."""
    paths = list_rows(store, std.id)
    tables = store.read_tables(paths)
    for p, t in zip(paths, tables):
        _validate(t, std, f"{store.url}/{p}")
    if tables:
        schema = schema_for(std)
        t = pa.concat_tables([t.select(schema.names).cast(schema) for t in tables])
    else:
        t = schema_for(std).empty_table()
    ids = t.column("model_id").to_pylist()
    if len(set(ids)) != len(ids):  # cannot happen with one object per key; guard anyway
        raise StoreError(f"table of standard {std.id} holds duplicate model ids")
    return EmbeddingTable(std.id, t.drop_columns(["embedding"]), embeddings_matrix(t))


def versions_json() -> str:
    import pyarrow
    import timm
    import torch

    return json.dumps({"zooselect": selection.__version__, "timm": timm.__version__,
                       "torch": torch.__version__, "numpy": np.__version__,
                       "pyarrow": pyarrow.__version__}, sort_keys=True)
