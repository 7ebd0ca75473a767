"""Shared fixtures: a tiny standard and tiny models, fast on 2 CPU cores."""

from __future__ import annotations

import os
import signal
import zlib

import numpy as np
import pytest
import torch

from selection.catalog import CatalogEntry
from selection.standard import Standard, StandardConfig, build_standard, save_standard
from selection.storage import Store

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
torch.set_num_threads(2)

# What starting Ray in this process leaves behind (`runtime.init`'s SIGTERM handler, Ray's
# PYTHONBREAKPOINT): put back after each test, so that no test sees another's (a review, session 44: a CI
# timeout's SIGTERM became SystemExit inside whichever test ran; subprocesses inherited Ray's debugger).
_SIGNALS = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
_ENV = {key: os.environ.get(key) for key in ("PYTHONBREAKPOINT", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO")}


@pytest.fixture(autouse=True)
def _process_state_put_back():
    yield
    for sig, handler in _SIGNALS.items():
        signal.signal(sig, handler)
    for key, value in _ENV.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value

TINY_PROBE = ("builtin:fashion-mnist-probe?n=60", "builtin:digits-probe?n=40",
              "builtin:photos?n=40", "builtin:textures?n=60")
TINY_BASELINE = CatalogEntry("baseline/resnet10t", "resnet10t", None, input_size=32)


def tiny_config(**overrides) -> StandardConfig:
    kwargs = dict(baseline=TINY_BASELINE, probe_sources=TINY_PROBE, probe_image_size=32, d=8,
                  form="full", companion=None)  # the companion's own tests: tests/test_companion.py
    kwargs.update(overrides)
    return StandardConfig(**kwargs)


@pytest.fixture(scope="session")
def tiny_standard() -> Standard:
    return build_standard(tiny_config())


@pytest.fixture()
def store(tmp_path) -> Store:
    return Store(str(tmp_path / "store"))


@pytest.fixture()
def published(store: Store, tiny_standard: Standard) -> tuple[Store, Standard]:
    save_standard(store, tiny_standard)
    return store, tiny_standard


def save_checkpoint(model: torch.nn.Module, path: str) -> str:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


@pytest.fixture()
def rng(request) -> np.random.Generator:
    """A generator of each test's own, seeded by its id: what it draws does not depend on which tests ran
    before it (one shared generator made three tests pass or fail with the order; a review, session 44)."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
