"""Small real datasets shipped with vigrad (nothing is downloaded at run time).

- :func:`load_digits`: 1797 8x8 images of handwritten digits, the UCI "Optical Recognition of
  Handwritten Digits" test set as distributed with scikit-learn (E. Alpaydin, C. Kaynak, 1998;
  UCI Machine Learning Repository, CC BY 4.0).  See LICENSE-digits.txt beside this file.
- :func:`make_blundell_curve`: the toy regression curve of Blundell et al. (2015), generated.
"""

from __future__ import annotations

import os
from typing import Tuple

import numpy as np

from .._validation import check_num_samples, check_real, resolve_rng

__all__ = ["load_digits", "make_blundell_curve", "train_test_split"]

_HERE = os.path.dirname(os.path.abspath(__file__))


def load_digits(dtype=np.float32) -> Tuple[np.ndarray, np.ndarray]:
    """The digits: X (1797, 64) with pixel intensities scaled from 0..16 to [0, 1], y (1797,) in 0..9.

    Examples
    --------
    >>> from vigrad.datasets import load_digits
    >>> X, y = load_digits()
    >>> X.shape, y.shape, int(y.max()), float(X.max())
    ((1797, 64), (1797,), 9, 1.0)
    """
    with np.load(os.path.join(_HERE, "digits.npz")) as f:
        X = f["images"].astype(dtype) / dtype(16)
        y = f["labels"].astype(np.int64)
    return X, y


def make_blundell_curve(n, *, low=0.0, high=0.5, noise=0.02, rng=None, dtype=np.float32):
    """y = x + 0.3 sin(2 pi (x + e)) + 0.3 sin(4 pi (x + e)) + e, e ~ N(0, noise^2), x ~ U(low, high):
    the regression curve of Blundell et al. (2015, section 5.2).  Returns X (n, 1), y (n,).

    Examples
    --------
    >>> from vigrad.datasets import make_blundell_curve
    >>> X, y = make_blundell_curve(100, rng=0)
    >>> X.shape, y.shape, bool(0 <= X.min() and X.max() <= 0.5)
    ((100, 1), (100,), True)
    """
    n = check_num_samples(n, "n")
    low, high = check_real(low, "low"), check_real(high, "high")
    if not high > low:
        raise ValueError(f"high must be > low, got low={low}, high={high}")
    noise = check_real(noise, "noise", nonnegative=True)
    gen = resolve_rng(rng)
    x = gen.uniform(low, high, n)
    e = gen.normal(0.0, noise, n) if noise > 0 else np.zeros(n)
    y = x + 0.3 * np.sin(2 * np.pi * (x + e)) + 0.3 * np.sin(4 * np.pi * (x + e)) + e
    return x.reshape(n, 1).astype(dtype), y.astype(dtype)


def train_test_split(X, y, *, test_fraction=0.25, rng=None):
    """A random split: (X_train, X_test, y_train, y_test)."""
    frac = check_real(test_fraction, "test_fraction")
    if not 0 < frac < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {frac}")
    n = len(X)
    if len(y) != n:
        raise ValueError(f"X and y must have the same length, got {n} and {len(y)}")
    idx = resolve_rng(rng).permutation(n)
    k = int(round(n * frac))
    te, tr = idx[:k], idx[k:]
    return X[tr], X[te], y[tr], y[te]
