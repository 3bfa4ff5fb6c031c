"""Statistics over seeds: mean ± standard error, and paired differences with Student-t confidence intervals.

Runs of two configurations with the same seed share the initialisation, the data order and (with `--subset`)
the training samples, so their per-seed difference cancels most of the seed-to-seed noise; a paired interval
is therefore much narrower than the two unpaired ones would suggest.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


def t_two_sided_prob(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with `df` degrees of freedom (integer df, exact finite series:
    Abramowitz & Stegun 26.7.3-26.7.4)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if t <= 0:
        return 0.0
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2 == 1:  # (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)), df - 2 terms after theta
        term, total = 1.0, 0.0
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        series = math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0
        return 2 / math.pi * (theta + series)
    term, total = 1.0, 0.0  # sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...), df / 2 terms
    for k in range(1, df // 2 + 1):
        total += term
        term *= c2 * (2 * k - 1) / (2 * k)
    return math.sin(theta) * total


def t_quantile(confidence: float, df: int) -> float:
    """The t with P(|T| < t) = confidence (two-sided), by bisection on the exact CDF."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    lo, hi = 0.0, 1.0
    while t_two_sided_prob(hi, df) < confidence:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_prob(mid, df) < confidence else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Estimate:
    """A mean over n seeds with its standard error and a two-sided Student-t confidence interval."""

    mean: float
    se: float
    n: int
    lo: float  # nan when n < 2 (no interval from one value)
    hi: float

    @property
    def excludes_zero(self) -> bool:
        return self.n >= 2 and (self.lo > 0 or self.hi < 0)


def estimate(values: list[float], confidence: float = 0.95) -> Estimate:
    n = len(values)
    if n == 0:
        raise ValueError("no values to estimate from")
    mean = statistics.fmean(values)
    if n == 1:
        return Estimate(mean, math.nan, 1, math.nan, math.nan)
    se = statistics.stdev(values) / math.sqrt(n)
    half = t_quantile(confidence, n - 1) * se
    return Estimate(mean, se, n, mean - half, mean + half)


def paired_difference(values: dict[int, float], reference: dict[int, float], confidence: float = 0.95) -> Estimate:
    """values - reference over the seeds both have ({seed: value}); an error if they share none."""
    seeds = sorted(set(values) & set(reference))
    if not seeds:
        raise ValueError("no seed in common with the reference, so there is no paired difference")
    return estimate([values[s] - reference[s] for s in seeds], confidence)
