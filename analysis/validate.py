"""Input checks shared by loaders and fits: one clear ValueError naming the field, the bad value and the fix."""

from __future__ import annotations

import numpy as np


def check_positive_finite(values, name: str) -> np.ndarray:
    """Return `values` as a float array, or raise naming the first NaN / non-positive entry."""
    try:
        arr = np.asarray(values, dtype=float).ravel()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: values are not numeric ({exc}); give numbers") from None
    bad_nan = np.flatnonzero(~np.isfinite(arr))
    if bad_nan.size:
        i = int(bad_nan[0])
        raise ValueError(f"{name}: {bad_nan.size} value(s) are NaN or infinite (first at row {i}: {arr[i]}); "
                         "drop or fix those rows (the CLI's --dropna drops them)")
    bad_neg = np.flatnonzero(arr <= 0)
    if bad_neg.size:
        i = int(bad_neg[0])
        raise ValueError(f"{name}: {bad_neg.size} value(s) are <= 0 (first at row {i}: {arr[i]:g}); "
                         "power-law fits need positive values, fix or drop those rows")
    return arr


def check_min_points(n: int, need: int, what: str) -> None:
    if n < need:
        raise ValueError(f"{what}: got {n} point(s), need at least {need}; add runs or choose a smaller model")
