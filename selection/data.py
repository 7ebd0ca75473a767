"""Image datasets: task data (ImageFolder, Parquet, built-ins) and probe-set material.

Every dataset is an `ImageSet`: uint8 images of one shape (N, H, W, 3) and integer
labels. A *dataset spec* string names one:

- a directory (local or `s3://`) with one subfolder per class (ImageFolder);
- a `.parquet` file (local or `s3://`) with an encoded `image` column (bytes, or a
  struct with a `bytes` field) and a `label` column (int or string);
- `builtin:fashion-mnist?classes=5,7,9&per_class=40&split=test&seed=0` (Debian
  package `dataset-fashion-mnist`), `builtin:digits?...` (scikit-learn),
  `builtin:photos?n=200` (random crops of scikit-learn's sample photos),
  `builtin:textures?n=200` (procedural textures and shapes).
"""

from __future__ import annotations

import collections
import functools
import gzip
import hashlib
import io
import logging
import math
import os
import struct
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import parse_qsl

import numpy as np

from selection.errors import ConfigError, DataError, brief

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = os.environ.get("ZOOSELECT_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                   "sneaker", "bag", "ankle-boot")
DEFAULT_TASK_SIZE = 64
# What an image folder task reads (as torchvision's ImageFolder, and the Netpbm formats it reads too).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jfif", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                    ".pgm", ".pbm", ".pnm")
DIGITS_CLASSES = tuple(str(i) for i in range(10))

# Digits 0..DIGITS_PROBE_COUNT-1 of a fixed permutation are reserved for probe sets;
# the rest serve tasks and training, so a task never shares an image with the probe.
DIGITS_PROBE_COUNT = 400
# Of the remaining digits, this leading fraction is the train split, the rest the test split.
DIGITS_TRAIN_FRACTION = 0.6
# Fashion-MNIST train images [0, FASHION_PROBE_COUNT) are reserved for probe sets.
FASHION_PROBE_COUNT = 2000


# `ImageSet.near_repeats`: thumbnails of THUMBNAIL x THUMBNAIL block means within NEAR_REPEAT_LEVELS of 255.
THUMBNAIL = 8
NEAR_REPEAT_LEVELS = 2.0
NEAR_REPEAT_MAX_IMAGES = 10_000


@dataclass(frozen=True, eq=False)
class ImageSet:
    """uint8 images (N, H, W, 3) with int64 labels (N,) in [0, len(classes))."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise DataError(f"an ImageSet's name should be a string, got {brief(self.name)}")
        if isinstance(self.classes, (str, bytes)) or not isinstance(self.classes, (tuple, list)) or \
                not all(isinstance(c, str) for c in self.classes):
            raise DataError(f"{self.name}: classes should be a tuple of class names, got {brief(self.classes)}")
        object.__setattr__(self, "classes", tuple(self.classes))
        for what, value in (("images", self.images), ("labels", self.labels)):
            if not isinstance(value, np.ndarray):  # a list or a torch tensor gave a raw AttributeError/TypeError
                raise DataError(f"{self.name}: {what} should be a numpy array, got {type(value).__module__}."
                                f"{type(value).__qualname__} (convert it with np.asarray, or tensor.numpy())")
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise DataError(f"{self.name}: images should be uint8 (N, H, W, 3), got "
                            f"{self.images.dtype} {self.images.shape}")
        if min(self.images.shape[1:3]) < 2:  # as an image file's: nothing to resize from
            raise DataError(f"{self.name}: images are {self.images.shape[2]}x{self.images.shape[1]} pixels; "
                            f"at least 2x2 needed")
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(f"{self.name}: labels should have shape ({self.images.shape[0]},), "
                            f"got {self.labels.shape}")
        if not np.issubdtype(self.labels.dtype, np.integer):
            raise DataError(f"{self.name}: labels should be integer class indices, got dtype {self.labels.dtype}")
        bad = self.labels[(self.labels < 0) | (self.labels >= len(self.classes))] if len(self.labels) else []
        if len(bad):
            raise DataError(f"{self.name}: labels should be class indices in [0, {len(self.classes)}) "
                            f"({len(self.classes)} classes), got {int(bad[0])}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, idx: np.ndarray, name: str | None = None) -> "ImageSet":
        return ImageSet(self.images[idx], self.labels[idx], self.classes, name or self.name)

    def _digests(self) -> list[bytes]:
        return [hashlib.blake2b(self.images[i].tobytes(), digest_size=16).digest() for i in range(len(self))]

    def in_content_order(self) -> "ImageSet":
        """This set ordered by its images' pixels (their digests), labels alongside: whatever depends on
        position (a seeded split) then depends on the images, not on the order a folder or file gave."""
        digests = self._digests()
        return self.subset(np.array(sorted(range(len(self)), key=lambda i: (digests[i], int(self.labels[i]))),
                                    np.int64))

    def without_repeats(self) -> tuple["ImageSet", int]:
        """This set without the later copies of an image under the same label (same pixels after resizing),
        and how many were dropped."""
        seen: set[tuple[bytes, int]] = set()
        keep = []
        for i, digest in enumerate(self._digests()):
            key = (digest, int(self.labels[i]))
            if key not in seen:
                seen.add(key)
                keep.append(i)
        dropped = len(self) - len(keep)
        return (self.subset(np.array(keep, np.int64)) if dropped else self), dropped

    def near_repeats(self, levels: float = NEAR_REPEAT_LEVELS, max_images: int = NEAR_REPEAT_MAX_IMAGES
                     ) -> list[tuple[int, int]]:
        """Pairs (i, j), i < j, of images under the same label that are nearly the same picture: their 8x8
        thumbnails (block means, per channel) differ by at most `levels` of 255 everywhere. A re-encoded,
        slightly edited or resized-back copy is; two photographs, or two drawings of a digit, are not.
        Sets of more than `max_images` are not looked at ([]): the search is quadratic within a class,
        and near-copies matter where a model has about as many features as there are images."""
        n, h, w, _ = self.images.shape
        if n > max_images or n < 2:
            return []
        side = min(THUMBNAIL, h, w)
        # Blocks of near-equal size that cover the whole image (whole blocks of h // side rows left the
        # rest out: at 12 px only the top-left 8 x 8 pixels were compared).
        rows, cols = (np.linspace(0, size, side + 1).astype(int) for size in (h, w))
        sums = np.add.reduceat(np.add.reduceat(self.images, rows[:-1], axis=1, dtype=np.uint32),
                               cols[:-1], axis=2, dtype=np.uint32)
        thumbs = (sums / np.outer(np.diff(rows), np.diff(cols))[None, :, :, None]).reshape(n, -1)
        bound = levels ** 2 * thumbs.shape[1]  # within `levels` everywhere: within this squared distance
        pairs = []
        for c in np.unique(self.labels):
            idx = np.flatnonzero(self.labels == c)
            x = thumbs[idx]
            sq = (x * x).sum(1)
            for start in range(0, len(idx), 1024):  # squared distances a block of rows at a time
                d2 = sq[start:start + 1024, None] + sq[None, :] - 2 * x[start:start + 1024] @ x.T
                for a, b in zip(*np.nonzero(d2 <= bound + 1e-6 * sq.max() + 1)):
                    a += start
                    if a < b and np.abs(x[a] - x[b]).max() <= levels:
                        pairs.append((int(idx[a]), int(idx[b])))
        return sorted(pairs)

    def validate_task(self, min_per_class: int = 2) -> "ImageSet":
        """Raise DataError unless this is usable as a classification task."""
        if len(self) == 0:
            raise DataError(f"task {self.name!r} is empty")
        present, counts = np.unique(self.labels, return_counts=True)
        if len(present) < 2:
            raise DataError(f"task {self.name!r} has only one class "
                            f"({self.classes[int(present[0])]!r}); at least 2 are needed")
        if counts.min() < min_per_class:
            c = int(present[int(np.argmin(counts))])
            raise DataError(f"task {self.name!r}: class {self.classes[c]!r} has {counts.min()} "
                            f"image(s); at least {min_per_class} per class are needed")
        if self.images.max() <= 1:  # ranked and verified as near-black images, without a word
            raise DataError(f"task {self.name!r}: every pixel is 0 or 1 (0-1 float images cast to uint8?); "
                            f"scale them to 0-255 before the cast: (images * 255).round().astype(np.uint8)")
        return self


# `resize_images` converts this many bytes of float32 pixels at a time (512 images of 1,024 x 1,024 took 6 GB)
RESIZE_STEP_BYTES = 64 << 20


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 (N, H, W, C) to (N, size, size, 3) with antialiased bilinear filtering; images that
    are not square are centre-cropped to their shorter side first (as image files are when loaded).
    C is 1 or 3, or 2 or 4 with alpha, composited over BACKGROUND as image files are; (N, H, W) is grey."""
    import torch
    import torch.nn.functional as F

    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise DataError(f"image size must be a positive integer, got {size!r}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 2, 3, 4) or images.dtype != np.uint8:
        raise DataError(f"images should be uint8 (N, H, W) or (N, H, W, C) with C of 1-4, got {images.dtype} "
                        f"{images.shape}")
    h, w = images.shape[1:3]
    if h != w:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        images = images[:, top:top + side, left:left + side]
    out = np.empty((images.shape[0], size, size, 3), dtype=np.uint8)
    pixels = max(images.shape[1] * images.shape[2], size * size)  # the float32 input or output, the larger
    step = max(1, min(512, RESIZE_STEP_BYTES // (4 * 3 * pixels)))
    for s in range(0, images.shape[0], step):
        rgb = _opaque_rgb(images[s:s + step])
        if images.shape[1:3] == (size, size):
            out[s:s + step] = rgb
            continue
        x = torch.from_numpy(rgb).permute(0, 3, 1, 2).float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[s:s + step] = y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def _opaque_rgb(images: np.ndarray) -> np.ndarray:
    """uint8 (n, H, W, 3) of (n, H, W, C): grey repeated, alpha composited over BACKGROUND."""
    colour = images[..., :images.shape[-1] - 1] if images.shape[-1] in (2, 4) else images
    rgb = np.repeat(colour, 3, axis=-1) if colour.shape[-1] == 1 else np.require(colour, requirements=["C", "W"])
    if images.shape[-1] in (1, 3):
        return rgb
    alpha = images[..., -1:].astype(np.float32) / 255
    return np.round(rgb * alpha + np.array(BACKGROUND, np.float32) * (1 - alpha)).astype(np.uint8)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) with at least one image of every class on each side (DataError for a class
    of one image)."""
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test fraction must be in (0, 1), got {test_fraction}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise DataError(f"labels should be a non-empty 1-D array, got shape {labels.shape}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    present, counts = np.unique(labels, return_counts=True)
    if len(counts) and counts.min() < 2:
        raise DataError(f"class {present[np.argmin(counts)].item()!r} has 1 image: a split needs at least 2 of "
                        f"every class, one on each side")
    for c in present:
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = min(max(1, int(round(len(idx) * test_fraction))), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


# -- built-in sources ------------------------------------------------------------------

def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as fh:
        data = fh.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Raw Fashion-MNIST (N, 28, 28) uint8 images and labels from the Debian package."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise DataError(f"fashion-mnist split must be 'train' or 'test', got {split!r}")
    paths = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        cands = [os.path.join(FASHION_MNIST_DIR, f"{prefix}-{kind}{ext}") for ext in (".gz", "")]
        found = [p for p in cands if os.path.exists(p)]
        if not found:
            raise DataError(f"Fashion-MNIST not found at {FASHION_MNIST_DIR!r} (install the Debian "
                            f"package dataset-fashion-mnist or set ZOOSELECT_FASHION_MNIST_DIR)")
        paths.append(found[0])
    return _read_idx(paths[0]), _read_idx(paths[1]).astype(np.int64)


def _digits_permutation(n: int) -> np.ndarray:
    return np.random.default_rng(12345).permutation(n)


def load_digits_raw(part: str = "task") -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits (N, 8, 8) uint8 and labels; `part` is 'probe', 'task' or 'all'."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(d.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    perm = _digits_permutation(len(images))
    if part == "probe":
        idx = perm[:DIGITS_PROBE_COUNT]
    elif part == "task":
        idx = perm[DIGITS_PROBE_COUNT:]
    elif part == "all":
        idx = perm
    else:
        raise DataError(f"digits part must be 'probe', 'task' or 'all', got {part!r}")
    return images[idx], d.target[idx].astype(np.int64)


def photo_crops(n: int, size: int, seed: int = 0) -> np.ndarray:
    """`n` random square crops (various scales) of scikit-learn's two sample photos."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(n):
        img = photos[rng.integers(len(photos))]
        h, w = img.shape[:2]
        side = int(rng.integers(min(h, w) // 8, min(h, w) // 2))
        y, x = int(rng.integers(0, h - side)), int(rng.integers(0, w - side))
        crop = img[y:y + side, x:x + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crops.append(resize_images(crop[None], size)[0])
    return np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8)


def procedural_textures(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` procedural images (gratings, checkers, blobs, shapes, noise); labels = kind."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.empty((n, size, size, 3), np.uint8)
    kinds = np.arange(n) % 5
    for i, kind in enumerate(kinds):
        c1, c2 = rng.random(3), rng.random(3)
        if kind == 0:    # oriented grating
            theta, freq = rng.uniform(0, np.pi), rng.uniform(2, 12)
            t = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)))
        elif kind == 1:  # checkerboard
            k = rng.integers(2, 10)
            t = ((np.floor(xx * k) + np.floor(yy * k)) % 2).astype(np.float32)
        elif kind == 2:  # gaussian blobs
            t = np.zeros_like(xx)
            for _ in range(int(rng.integers(1, 6))):
                cx, cy, s = rng.random(), rng.random(), rng.uniform(0.03, 0.2)
                t += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
            t = np.clip(t, 0, 1)
        elif kind == 3:  # filled disc or square
            cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.3)
            if rng.random() < 0.5:
                t = (((xx - cx) ** 2 + (yy - cy) ** 2) < r * r).astype(np.float32)
            else:
                t = ((np.abs(xx - cx) < r) & (np.abs(yy - cy) < r)).astype(np.float32)
        else:            # smoothed noise
            g = max(2, size // int(rng.integers(2, 8)))
            small = rng.random((1, g, g, 1)).astype(np.float32)
            import torch
            import torch.nn.functional as F
            t = F.interpolate(torch.from_numpy(small).permute(0, 3, 1, 2), size=(size, size),
                              mode="bicubic", align_corners=False)[0, 0].clamp(0, 1).numpy()
        img = t[..., None] * c1 + (1 - t[..., None]) * c2
        out[i] = np.clip(img * 255, 0, 255).astype(np.uint8)
    return out, kinds.astype(np.int64)


# -- spec parsing ------------------------------------------------------------------------

def _params(query: str, allowed: set[str], spec: str) -> dict[str, str]:
    pairs = parse_qsl(query, keep_blank_values=True)
    twice = sorted(k for k, n in collections.Counter(k for k, _ in pairs).items() if n > 1)
    if twice:  # the last one silently won
        raise DataError(f"option(s) {twice} given more than once in dataset spec {spec!r}")
    params = dict(pairs)
    unknown = set(params) - allowed
    if unknown:
        raise DataError(f"unknown option(s) {sorted(unknown)} in dataset spec {spec!r} "
                        f"(allowed: {sorted(allowed)})")
    return params


def _int(params: dict[str, str], key: str, default: int | None, spec: str) -> int | None:
    if key not in params:
        return default
    try:
        value = int(params[key])
    except ValueError:
        raise DataError(f"option {key}={params[key]!r} in dataset spec {spec!r} is not an integer") from None
    if value < 0:  # counts (n, per_class) and seeds; Python slicing would take a negative count from the end
        raise DataError(f"option {key}={value} in dataset spec {spec!r} must be >= 0")
    return value


def _classes(params: dict[str, str], n_names: int, spec: str) -> list[int]:
    """The class ids of a spec's `classes=` option (every class when it is absent or empty)."""
    if not params.get("classes"):
        return list(range(n_names))
    try:
        wanted = [int(c) for c in params["classes"].split(",")]
    except ValueError:
        raise DataError(f"classes={params['classes']!r} in {spec!r} must be comma-separated integers") from None
    bad = [c for c in wanted if not 0 <= c < n_names]
    if bad:
        raise DataError(f"class id(s) {bad} in {spec!r} are out of range 0..{n_names - 1}")
    twice = sorted({c for c in wanted if wanted.count(c) > 1})
    if twice:
        raise DataError(f"class id(s) {twice} appear more than once in classes={params['classes']} of {spec!r}")
    return wanted


def _select_classes(images: np.ndarray, labels: np.ndarray, names: tuple[str, ...],
                    wanted: list[int]) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    mask = np.isin(labels, wanted)
    remap = {c: i for i, c in enumerate(wanted)}
    new_labels = np.array([remap[int(y)] for y in labels[mask]], dtype=np.int64)
    return images[mask], new_labels, tuple(names[c] for c in wanted)


# Each built-in dataset's options and, where `classes=` may pick some, its class names.
_LABELLED = frozenset({"classes", "per_class", "n", "split", "half", "seed"})
_BUILTINS: dict[str, tuple[frozenset[str], tuple[str, ...] | None]] = {
    "fashion-mnist": (_LABELLED, FASHION_CLASSES),
    "digits": (_LABELLED, DIGITS_CLASSES),
    "photos": (frozenset({"n", "seed"}), None),
    "textures": (frozenset({"n", "seed"}), None),
    "fashion-mnist-probe": (frozenset({"n", "seed"}), None),
    "digits-probe": (frozenset({"n", "seed"}), None),
}


def check_builtin_spec(spec: str) -> tuple[str, dict[str, str]]:
    """The dataset name and options of a `builtin:NAME?OPTIONS` spec, every option checked without
    reading any data (so that a job refuses a bad spec before it starts any work)."""
    name, _, query = spec[len("builtin:"):].partition("?")
    if name not in _BUILTINS:
        raise DataError(f"unknown built-in dataset {name!r} in {spec!r} (known: {', '.join(_BUILTINS)})")
    allowed, names = _BUILTINS[name]
    params = _params(query, set(allowed), spec)
    for key in ("per_class", "n", "seed"):
        _int(params, key, None, spec)
    if params.get("half", "1") not in ("1", "2"):
        raise DataError(f"{name} half must be 1 or 2, got {params['half']!r} in {spec!r}")
    if params.get("split", "test") not in ("train", "test"):
        raise DataError(f"{name} split must be 'train' or 'test', got {params['split']!r} in {spec!r}")
    if names is not None:
        _classes(params, len(names), spec)
    return name, params


def _half(images: np.ndarray, labels: np.ndarray, half: str | None) -> tuple[np.ndarray, np.ndarray]:
    """`half=1` or `2`: every other image of each class, in the split's order, starting with its first
    or its second (two disjoint halves, for task groups that share no image); all without one."""
    if half is None:
        return images, labels
    idx = np.sort(np.concatenate([np.flatnonzero(labels == c)[int(half) - 1::2] for c in np.unique(labels)]))
    return images[idx], labels[idx]


def _per_class(images: np.ndarray, labels: np.ndarray, per_class: int | None, seed: int,
               n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if per_class is not None:
        idx = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class]
                              for c in np.unique(labels)]) if len(labels) else np.zeros(0, int)
        idx = np.sort(idx)
    else:
        idx = np.arange(len(labels))
    if n is not None:
        idx = np.sort(rng.permutation(idx)[:n])
    return images[idx], labels[idx]


def local_path(spec: str) -> str | None:
    """The local path a dataset spec names (a `file://` URL's, as `storage.file_url_path` reads it; `~`
    expanded); None for other URLs."""
    from selection.storage import file_url_path  # pyarrow and fsspec: not at every task read's import

    try:
        path = file_url_path(spec)
    except ConfigError as exc:
        raise DataError(f"dataset {spec!r}: {exc}") from None
    if path is None and "://" in spec:
        return None
    return os.path.expanduser(spec if path is None else path)


def check_spec(spec: str) -> None:
    """Refuse a dataset spec that cannot name a dataset, without reading any data: a built-in spec's
    name and options, a mistyped URL or one of a scheme no store serves, a local path that does not
    exist. Jobs call it before they start Ray, so that a bad spec is one line at once."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"dataset spec must be a non-empty string, got {spec!r}")
    if spec.startswith("builtin:"):
        check_builtin_spec(spec)
        return
    from selection.storage import SUPPORTED_SCHEMES, check_url

    check_url(spec)
    scheme = spec.split("://", 1)[0].lower() if "://" in spec else "file"
    if scheme not in SUPPORTED_SCHEMES:
        raise DataError(f"dataset {spec!r}: unsupported URL scheme {scheme!r} (a local path, s3://bucket/key "
                        f"or builtin:NAME)")
    path = local_path(spec)
    if path is not None and not os.path.exists(path.rstrip("/") or "/"):
        raise DataError(f"dataset {spec!r} does not exist (a local path; a built-in one is builtin:NAME)")


def load_dataset(spec: str | os.PathLike[str], size: int = DEFAULT_TASK_SIZE, *,
                 store_options: dict | None = None, draft: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> ImageSet:
    """Load the dataset a spec names (a `pathlib.Path` too), resized to (size, size) RGB. `draft`: JPEG
    files are decoded at a reduced scale no smaller than twice `size` before the resize (45 photos of
    1600x1200 to 64 px: 0.95 s -> 0.40 s, to 224 px: 0.90 s -> 0.50 s on one core; pixels within 1-3
    levels of the full decode's); what a task takes, not a standard's probe set, whose pixels its digest
    records. `progress(done, total)`: after each image file or Parquet row is decoded."""
    spec = os.fspath(spec) if isinstance(spec, os.PathLike) else spec
    check_spec(spec)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 8 <= size <= 1024:
        raise DataError(f"image size must be an integer in [8, 1024], got {size!r}")
    if spec.startswith("builtin:"):
        name, p = check_builtin_spec(spec)
        seed = _int(p, "seed", 0, spec)
        if name == "photos":
            n = _int(p, "n", 200, spec)
            return ImageSet(photo_crops(n, size, seed), np.zeros(n, np.int64), ("photo",), spec)
        if name == "textures":
            images, labels = procedural_textures(_int(p, "n", 200, spec), size, seed)
            return ImageSet(resize_images(images, size), labels,
                            ("grating", "checker", "blobs", "shape", "noise"), spec)
        if name == "fashion-mnist":
            split = p.get("split", "test")
            images, labels = load_fashion_mnist(split)
            if split == "train":
                images, labels = images[FASHION_PROBE_COUNT:], labels[FASHION_PROBE_COUNT:]
            names = FASHION_CLASSES
        elif name == "digits":
            images, labels = load_digits_raw("task")
            cut = int(len(images) * DIGITS_TRAIN_FRACTION)
            images, labels = (images[:cut], labels[:cut]) if p.get("split", "test") == "train" \
                else (images[cut:], labels[cut:])
            names = DIGITS_CLASSES
        elif name == "digits-probe":
            images, labels = load_digits_raw("probe")
            names = DIGITS_CLASSES
        else:  # fashion-mnist-probe
            images, labels = load_fashion_mnist("train")
            images, labels = images[:FASHION_PROBE_COUNT], labels[:FASHION_PROBE_COUNT]
            names = FASHION_CLASSES
        images, labels = _half(images, labels, p.get("half"))
        if p.get("classes"):
            images, labels, names = _select_classes(images, labels, names, _classes(p, len(names), spec))
        images, labels = _per_class(images, labels, _int(p, "per_class", None, spec), seed, _int(p, "n", None, spec))
        return ImageSet(resize_images(images, size), labels, names, spec)
    if spec.rstrip("/").endswith(".parquet"):
        return _load_parquet(spec, size, store_options or {}, draft, progress)
    return _load_image_folder(spec, size, store_options or {}, draft, progress)


# Transparent pixels are laid over this colour, as a page or a viewer shows them (dropping the alpha
# channel gave whatever colour a writer left under them: black for some tools, white for others).
BACKGROUND = (255, 255, 255)


def _upright(img: Any) -> Any:
    """`img` turned as its EXIF orientation says (a phone's photo, stored sideways), as viewers show
    it; as it is without one, or with an unreadable one."""
    from PIL import ImageOps

    try:
        if img.getexif().get(0x0112, 1) in (1, None):
            return img
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a corrupt EXIF block: the pixels as stored
        return img


def _rgb8(img: Any, where: str) -> np.ndarray:
    """An opened PIL image as uint8 RGB (H, W, 3), upright (`_upright`), transparent pixels over
    BACKGROUND. PIL's own conversion clips 16-bit grey levels to 255 (a 16-bit PNG came out almost
    white), so those are scaled to 8 bits; 32-bit integer and float pixels (no agreed range: 8-bit
    values in a 32-bit TIFF came out black) are refused."""
    from PIL import Image

    fmt = img.format  # before turning it: a turned copy has none
    img = _upright(img)
    # PNG and Netpbm (PGM/PPM): 16 bits at most, which PIL reads as mode I
    if img.mode in ("I", "F") and not (img.mode == "I" and fmt in ("PNG", "PPM")):
        kind = "signed or 32-bit integer" if img.mode == "I" else "32-bit float"  # PIL reads signed 16-bit as I
        raise DataError(f"image {where} has {kind} pixels (mode {img.mode}), whose range is not defined; "
                        f"save it with 8- or 16-bit pixels")
    if img.mode.startswith("I;16") or img.mode == "I":
        grey = np.asarray(img).astype(np.int64)
        if grey.min() < 0 or grey.max() > 65535:
            raise DataError(f"image {where} has {img.mode} pixels from {grey.min()} to {grey.max()}; "
                            f"8- or 16-bit images are supported")
        out = (grey >> 8).astype(np.uint8)
        if isinstance(img.info.get("transparency"), int):  # one grey level marked transparent
            out[grey == img.info["transparency"]] = BACKGROUND[0]
        return np.repeat(out[..., None], 3, axis=-1)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        over = Image.new("RGBA", img.size, BACKGROUND + (255,))
        img = Image.alpha_composite(over, img.convert("RGBA"))
    return np.asarray(img.convert("RGB"))


def _decode(data: bytes, where: str, size: int, draft: bool = False) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            if draft:  # JPEG's DCT scaling (1/2, 1/4, 1/8): a no-op for other formats
                img.draft(None, (2 * size, 2 * size))
            arr = _rgb8(img, where)
    except DataError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises SyntaxError, TypeError, ... on corrupt files
        # A decompression bomb: a header that claims more pixels than PIL's limit (or a corrupt one)
        if isinstance(exc, UnidentifiedImageError):
            reason = "not an image file"
        elif isinstance(exc, (Image.DecompressionBombError, OSError, ValueError)):
            reason = str(exc)
        else:
            reason = f"{type(exc).__name__}: {exc}"
        raise DataError(f"cannot decode image {where}: {reason}") from exc
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise DataError(f"image {where} is {arr.shape[1]}x{arr.shape[0]} pixels; at least 2x2 needed")
    return resize_images(arr[None], size)[0]  # centre-cropped to a square, then resized


def _split_url(url: str) -> tuple[str, str]:
    url = url.rstrip("/")
    path = local_path(url)
    if path is None:
        head, _, tail = url.rpartition("/")
        return head, tail
    return os.path.dirname(os.path.abspath(path)) or "/", os.path.basename(path)


HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"  # how Hive-style writers name the folder of null values


def _with_partition_keys(table: Any, part: str) -> Any:
    """A part file's table with the columns its folders name (`label=cat/part-0.parquet`: pandas'
    and Spark's `partition_cols`, which leave that column out of the files), as strings."""
    import pyarrow as pa
    from urllib.parse import unquote

    for step in part.split("/")[:-1]:
        key, eq, value = step.partition("=")
        if eq and key and key not in table.column_names:
            value = None if value == HIVE_NULL else unquote(value)
            table = table.append_column(key, pa.array([value] * table.num_rows, pa.string()))
    return table


def _load_parquet(url: str, size: int, store_options: dict, draft: bool = False,
                  progress: Callable[[int, int], None] | None = None) -> ImageSet:
    import pyarrow as pa

    from selection.storage import Store
    from selection.errors import StoreError

    parent, name = _split_url(url)
    try:
        store = Store(parent, **store_options)
        # A folder of part files, as Spark and Hive-style writers leave it (markers such as _SUCCESS and
        # hidden checksum files are not parts), read in name order; else the file itself.
        parts = [p for p in store.list(name, ".parquet") if p.startswith(name + "/")
                 and not any(step.startswith(("_", ".")) for step in p[len(name) + 1:].split("/"))]
        tables = [_with_partition_keys(store.read_table(p), p[len(name) + 1:]) for p in parts] \
            or [store.read_table(name)]
    except StoreError as exc:
        raise DataError(f"cannot read task {url!r}: {exc}") from exc
    try:
        table = pa.concat_tables(tables, promote_options="default")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DataError(f"task Parquet {url!r}: its {len(tables)} part files' columns do not match "
                        f"({str(exc).splitlines()[0]})") from exc
    missing = {"image", "label"} - set(table.column_names)
    if missing:
        raise DataError(f"task Parquet {url!r} lacks column(s) {sorted(missing)} "
                        f"(has {table.column_names})")
    images_col = table.column("image").to_pylist()
    raw_labels = table.column("label").to_pylist()
    images = []
    for i, cell in enumerate(images_col):
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        if data is None and isinstance(cell, dict) and cell.get("path"):  # an image stored by reference
            raise DataError(f"task Parquet {url!r} row {i}: 'image' holds the path {cell['path']!r}, not "
                            f"the image's bytes; store the encoded image in the column")
        if not isinstance(data, (bytes, bytearray)):
            raise DataError(f"task Parquet {url!r} row {i}: 'image' should be encoded image bytes, "
                            f"got {type(data).__name__}")
        images.append(_decode(bytes(data), f"{url!r} row {i}", size, draft))
        if progress is not None:
            progress(i + 1, len(images_col))
    missing = sum(y is None or (isinstance(y, float) and math.isnan(y)) for y in raw_labels)
    if missing:  # NaN: how pandas, Polars and Spark write a missing float label
        raise DataError(f"task Parquet {url!r} has {missing} missing label(s) (null or NaN)")
    # -0.0 + 0.0 is 0.0: the two zeros of a float column are one number, and one class
    named = [str(y + 0.0) if isinstance(y, float) else str(y) for y in raw_labels]
    names = tuple(sorted(set(named), key=lambda s: (len(s), s)))
    index = {n: i for i, n in enumerate(names)}
    labels = np.array([index[n] for n in named], dtype=np.int64)
    imgs = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return ImageSet(imgs, labels, names, url)


@functools.lru_cache(maxsize=1)
def image_extensions() -> tuple[str, ...]:
    """IMAGE_EXTENSIONS, and `.avif` where this Pillow reads it (its wheels since 11.3)."""
    import warnings

    from PIL import features

    with warnings.catch_warnings():  # an older Pillow warns of a feature it does not know
        warnings.simplefilter("ignore")
        return IMAGE_EXTENSIONS + ((".avif",) if features.check("avif") else ())


SPLIT_NAMES = frozenset({"train", "training", "val", "valid", "validation", "test", "testing", "dev", "eval"})


def _refuse_split_folders(url: str, by_class: dict[str, list[str]]) -> None:
    """A dataset's root (`train/<class>/`, `val/<class>/`: Kaggle's, torchvision's layout) read as a task would
    be a task of telling the splits apart, selected for without a word: refused when
    every class folder is named as a split and one holds its images only in subfolders (Kaggle's flat,
    unlabelled `test/` beside `train/<class>/` too)."""
    if not all(c.lower() in SPLIT_NAMES for c in by_class):
        return
    nested = [c for c, files in sorted(by_class.items()) if all(f.count("/") >= 2 for f in files)]
    if nested:
        inner = sorted({f.split("/")[1] for f in by_class[nested[0]]})
        raise DataError(f"task {url!r}: its class folders {sorted(by_class)} are a dataset's splits, {nested[0]!r} "
                        f"holding the images in subfolders (e.g. {inner[:5]}): pass one split as the task, "
                        f"e.g. {url.rstrip('/')}/{nested[0]}")


def _load_image_folder(url: str, size: int, store_options: dict, draft: bool = False,
                       progress: Callable[[int, int], None] | None = None) -> ImageSet:
    from selection.storage import Store
    from selection.errors import StoreError

    path = local_path(url)
    local = path is not None
    if local and not os.path.isdir(path):
        raise DataError(f"task {url!r} is neither a directory (of class folders or Parquet part files) nor a "
                        f".parquet file")
    try:
        store = Store(url, **store_options)
        listed = store.list("")
    except StoreError as exc:
        raise DataError(f"cannot read task {url!r}: {exc}") from exc
    # As torchvision's ImageFolder: a class is a top-level folder and holds every image below it.
    by_class: dict[str, list[str]] = {}
    folders = {d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))} if local else set()
    loose, skipped = [], []
    for f in listed:
        parts = f.split("/")
        if any(p.startswith(".") for p in parts):  # .ipynb_checkpoints/, .DS_Store and the like
            continue
        if len(parts) > 1:
            folders.add(parts[0])
        if not f.lower().endswith(image_extensions()):
            skipped.append(f)
        elif len(parts) == 1:
            loose.append(f)
        else:
            by_class.setdefault(parts[0], []).append(f)
    if not by_class and not loose and any(f.lower().endswith(".parquet") for f in skipped):
        # part files under any name: Spark's df.write.parquet(dir)
        return _load_parquet(url, size, store_options, draft, progress)
    if loose:
        log.warning("task %s: %d image(s) outside the class folders are left out (e.g. %r)", url, len(loose),
                    loose[0])
    if skipped:
        log.warning("task %s: %d file(s) of no image type read here are left out (e.g. %r; read: %s)", url,
                    len(skipped), skipped[0], " ".join(image_extensions()))
    empty = sorted(d for d in folders if not d.startswith(".") and d not in by_class)
    if empty:  # a class dropped without a word would select for another task
        raise DataError(f"task {url!r}: class folder(s) {empty[:5]}{' ...' if len(empty) > 5 else ''} hold no "
                        f"images of a type read here ({' '.join(image_extensions())})")
    if not by_class:
        raise DataError(f"task {url!r} has no images in class subfolders (expected {url}/<class>/<image>)")
    names = tuple(sorted(by_class))
    _refuse_split_folders(url, by_class)
    images, labels, total = [], [], sum(map(len, by_class.values()))
    for ci, cname in enumerate(names):
        for f in sorted(by_class[cname]):
            try:
                data = store.read_bytes(f)
            except StoreError as exc:
                raise DataError(f"cannot read task image {f!r}: {exc}") from exc
            images.append(_decode(data, f"{url}/{f}", size, draft))
            labels.append(ci)
            if progress is not None:
                progress(len(images), total)
    return ImageSet(np.stack(images), np.array(labels, np.int64), names, url)
