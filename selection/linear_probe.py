"""One fixed linear-probe protocol: verification of the top-k, and benchmark ground truth.

Protocol: features standardised with the train split's mean and std; multinomial
logistic regression with L2 penalty `l2` on the weights, full-batch L-BFGS in float64
for at most `max_iter` iterations from zero; accuracy on the test split.

Ground truth uses one fixed train/test split (`test_fraction`, `split_seed`).
Verification estimates the same probe's accuracy from the labelled images a user has by
stratified `cv_folds`-fold cross-validation: every image is tested once, which matters
on small tasks where one split leaves a handful of test images per class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from selection.errors import ConfigError, DataError


@dataclass(frozen=True)
class ProbeProtocol:
    test_fraction: float = 0.5
    split_seed: int = 0
    l2: float = 1e-3
    max_iter: int = 200
    cv_folds: int = 5

    def __post_init__(self) -> None:
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.cv_folds < 2:
            raise ConfigError(f"cv_folds must be >= 2, got {self.cv_folds}")
        if self.l2 < 0 or self.max_iter < 1:
            raise ConfigError(f"l2 must be >= 0 and max_iter >= 1, got l2={self.l2} max_iter={self.max_iter}")


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                   protocol: ProbeProtocol = ProbeProtocol()) -> float:
    """Test accuracy in [0, 1] of the protocol's logistic-regression probe."""
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise DataError(f"probe features should be (n, k) with equal k, got {train_x.shape} and {test_x.shape}")
    classes = np.unique(train_y)
    if len(classes) < 2:
        raise DataError(f"the probe's train split has {len(classes)} class(es); at least 2 are needed")
    index = {c: i for i, c in enumerate(classes)}
    mu, sd = train_x.mean(0), train_x.std(0)
    sd = np.where(sd > 1e-8, sd, 1.0)
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

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        pred = classes[(xte @ w + b).argmax(1).numpy()]
    return float((pred == test_y).mean())


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold index in [0, k) for every item: each class dealt round-robin after a seeded shuffle."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        fold[idx[rng.permutation(len(idx))]] = np.arange(len(idx)) % k
    return fold


def cv_accuracy(x: np.ndarray, y: np.ndarray, protocol: ProbeProtocol = ProbeProtocol()) -> float:
    """Stratified k-fold cross-validated accuracy of the probe (all held-out predictions pooled).

    k is `protocol.cv_folds`, at most the size of the smallest class (at least 2).
    """
    _, counts = np.unique(y, return_counts=True)
    if len(counts) < 2:
        raise DataError(f"cross-validation needs at least 2 classes, got {len(counts)}")
    k = max(2, min(protocol.cv_folds, int(counts.min())))
    fold = stratified_folds(y, k, protocol.split_seed)
    correct = 0.0
    for f in range(k):
        test = fold == f
        correct += probe_accuracy(x[~test], y[~test], x[test], y[test], protocol) * int(test.sum())
    return correct / len(y)
