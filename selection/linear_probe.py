"""One fixed linear-probe protocol: verification of the top-k, and benchmark ground truth.

Protocol: features standardised with the train split's mean and std; multinomial
logistic regression with L2 penalty `l2` on the weights, full-batch L-BFGS in float64
for at most `max_iter` iterations from zero; accuracy on the test split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from selection.errors import ConfigError, DataError
from selection.scorers import standardisation


@dataclass(frozen=True)
class ProbeProtocol:
    """The linear probe's protocol: a seeded, stratified split (`test_fraction` held out, `split_seed`),
    an L2-penalised (`l2`) softmax fitted by L-BFGS (`max_iter`) on standardised features."""

    test_fraction: float = 0.5
    split_seed: int = 0
    l2: float = 1e-3
    max_iter: int = 200

    def __post_init__(self) -> None:
        def number(v: object) -> bool:
            return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)

        def integer(v: object, least: int) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= least

        if not number(self.test_fraction) or not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"test_fraction must be in (0, 1), got {self.test_fraction!r}")
        if not number(self.l2) or self.l2 < 0:
            raise ConfigError(f"l2 must be a finite number >= 0, got {self.l2!r}")
        if not integer(self.max_iter, 1):
            raise ConfigError(f"max_iter must be an integer >= 1, got {self.max_iter!r}")
        if not integer(self.split_seed, 0):
            raise ConfigError(f"split_seed must be an integer >= 0, got {self.split_seed!r}")


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                   protocol: ProbeProtocol = ProbeProtocol()) -> float:
    """Test accuracy in [0, 1] of the protocol's logistic-regression probe (features as arrays, lists or
    CPU tensors)."""
    import torch

    if not isinstance(protocol, ProbeProtocol):
        raise ConfigError(f"protocol should be a ProbeProtocol, got {type(protocol).__name__}")
    train_x, test_x = (np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x)
                       for x in (train_x, test_x))  # their own dtype: the benchmark's ground truth as before
    for x in (train_x, test_x):
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise DataError(f"probe features should be (n, k) numbers, got {x.dtype} values")
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise DataError(f"probe features should be (n, k) with equal k, got {train_x.shape} and {test_x.shape}")
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        if y.shape != (len(x),) or not len(x):
            raise DataError(f"the probe's {name} split has features {x.shape} and labels {y.shape}: one label "
                            f"per image, at least one image")
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        if bad:
            raise DataError(f"the probe's {name} features hold {bad} non-finite value(s)")
    classes = np.unique(train_y)
    if len(classes) < 2:
        raise DataError(f"the probe's train split has {len(classes)} class(es); at least 2 are needed")
    index = {c: i for i, c in enumerate(classes)}
    mu, sd = standardisation(train_x)
    # The fit needs autograd whatever the caller's mode: `enable_grad` does not lift a caller's
    # `inference_mode` (its tensors cannot require grad), so both are set, and every tensor made inside.
    with torch.inference_mode(False), torch.enable_grad():
        xtr = torch.from_numpy((train_x - mu) / sd).double()
        xte = torch.from_numpy((test_x - mu) / sd).double()
        ytr = torch.tensor([index[c] for c in train_y])
        w = torch.zeros(xtr.shape[1], len(classes), dtype=torch.float64, requires_grad=True)
        b = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=protocol.max_iter, history_size=20,
                                tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(xtr @ w + b, ytr) + protocol.l2 * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            pred = classes[(xte @ w + b).argmax(1).numpy()]
    return float((pred == test_y).mean())
