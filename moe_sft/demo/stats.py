"""Seed statistics of the demo: mean ± sample std, and the rule that says a difference is
larger than the seed-to-seed noise.

Rule (`exceeds_noise`): two groups of per-seed values a and b differ beyond the noise when
    |mean(a) - mean(b)| > 2 * sqrt(std(a)^2 / n_a + std(b)^2 / n_b)
(twice the standard error of the difference of the means, Welch's form; std with ddof=1).
With fewer than 2 seeds in a group there is no noise estimate and no verdict (None).
"""

from __future__ import annotations

import math

NOISE_RULE = "|Δmean| > 2·√(s_a²/n_a + s_b²/n_b) (twice the standard error of the difference; s: sample std over seeds)"


def mean_std(values: list[float]) -> dict:
    """{"mean", "std" (ddof=1; 0 for one value), "n"}."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_std of no values")
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n}


def exceeds_noise(a: dict, b: dict) -> bool | None:
    """Whether mean_std `a` and `b` differ beyond the noise (module docstring); None without
    a noise estimate (a group with one seed)."""
    if min(a["n"], b["n"]) < 2:
        return None
    se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    return abs(a["mean"] - b["mean"]) > 2 * se
