"""Mixing several datasets: which (source, row) pairs are used, in which order.

The order is computed by `datasets` itself (`concatenate_datasets`, `interleave_datasets` with
probabilities and a seed) on small index tables, one row per record of each source, so the
records themselves never need a shared schema (an alpaca file and a ShareGPT hub dataset mix).

    concat            every record of every source, source after source
    interleave_under  sample a source by `interleave_probs` each step; stop when one runs out
    interleave_over   ... until every source has been used whole (the others repeat)
    interleave_once   ... each record at most once, until every source runs out
"""

from __future__ import annotations

import numpy as np

STRATEGIES = ("concat", "interleave_under", "interleave_over", "interleave_once")
_STOPPING = {
    "interleave_under": "first_exhausted",
    "interleave_over": "all_exhausted",
    "interleave_once": "all_exhausted_without_replacement",
}


def select_rows(n: int, max_samples: int | None, num_samples: int | None, seed: int) -> list[int]:
    """Rows of one source: a seeded random sample of `num_samples` (LLaMA-Factory's per-entry
    `num_samples`: a permutation, repeated when larger than the source), then the first `max_samples`."""
    rows = list(range(n))
    if num_samples is not None:
        rng = np.random.default_rng(seed)
        reps = -(-num_samples // n)
        rows = np.concatenate([rng.permutation(n) for _ in range(reps)])[:num_samples].tolist()
    return rows if max_samples is None else rows[:max_samples]


def mix(lengths: list[int], strategy: str, probs: list[float] | None, seed: int) -> list[tuple[int, int]]:
    """(source index, position in that source's rows) for every record used, in training order."""
    import datasets

    tables = [datasets.Dataset.from_dict({"source": [k] * n, "row": list(range(n))}) for k, n in enumerate(lengths)]
    if len(tables) == 1 or strategy == "concat":
        mixed = datasets.concatenate_datasets(tables)
    else:
        mixed = datasets.interleave_datasets(tables, probabilities=probs, seed=seed, stopping_strategy=_STOPPING[strategy])
    cols = mixed.to_dict()
    return list(zip(cols["source"], cols["row"]))
