"""The suite's small data sets: float32 NumPy arrays from a seeded generator."""

import numpy as np


def make_data(n=16, in_dim=3, out_dim=2, seed=0):
    """A tiny float32 regression data set: inputs (n, in_dim) and targets (n, out_dim), both
    standard normal, drawn in that order from one generator seeded with `seed`."""
    g = np.random.default_rng(seed)
    x = g.normal(size=(n, in_dim)).astype("float32")
    y = g.normal(size=(n, out_dim)).astype("float32")
    return x, y


def normal_data(n=16, dim=3, seed=0):
    """Standard-normal float32 data of shape (n, dim)."""
    return np.random.default_rng(seed).normal(size=(n, dim)).astype("float32")


def image_data(n=12, seed=0):
    """Tiny 8x8 one-channel float32 images in [0, 1) and integer labels in [0, 10)."""
    g = np.random.default_rng(seed)
    x = g.random((n, 8, 8, 1), dtype=np.float32)
    y = g.integers(0, 10, size=(n,))
    return x, y
