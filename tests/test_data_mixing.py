"""Mixing several datasets: concatenation order, interleaving with probabilities (same order for the
same seed, the expected proportions), oversampling, max_samples per dataset, config checks."""

import json
import math

import pytest

from moe_sft.config import ConfigError, from_dict
from moe_sft.data import read_records
from moe_sft.train.config import DataConfig


def _file(path, tag, n):
    path.write_text("".join(json.dumps({"instruction": f"{tag}{i}", "output": "x"}) + "\n" for i in range(n)))
    return str(path)


@pytest.fixture()
def two(tmp_path):
    return [_file(tmp_path / "a.jsonl", "a", 400), _file(tmp_path / "b.jsonl", "b", 400)]


def _order(files, **kw):
    return [r.data["instruction"] for r in read_records(DataConfig(files=files, **kw))]


def test_concat_keeps_dataset_order_and_max_samples_is_per_dataset(two):
    assert _order(two) == [f"a{i}" for i in range(400)] + [f"b{i}" for i in range(400)]
    assert _order(two, max_samples=3) == ["a0", "a1", "a2", "b0", "b1", "b2"]


def test_interleave_is_seeded_and_follows_the_probabilities(two):
    kw = dict(mix_strategy="interleave_under", interleave_probs=[0.75, 0.25])
    first, again, other = _order(two, seed=7, **kw), _order(two, seed=7, **kw), _order(two, seed=8, **kw)
    assert first == again and first != other
    # interleave_under stops when a dataset runs out: a (drawn 3 times as often) runs out first.
    n_a = sum(x.startswith("a") for x in first)
    n_b = len(first) - n_a
    assert n_a == 400 and n_b < 400
    # B's share is 0.25 up to binomial noise (4 standard deviations).
    assert abs(n_b / len(first) - 0.25) < 4 * math.sqrt(0.25 * 0.75 / len(first))
    # Each dataset's records keep their own order inside the mix.
    assert [x for x in first if x.startswith("b")] == [f"b{i}" for i in range(n_b)]


def test_interleave_over_uses_every_record_and_once_never_repeats(two, tmp_path):
    small = [two[0], _file(tmp_path / "c.jsonl", "c", 20)]
    over = _order(small, mix_strategy="interleave_over", interleave_probs="0.5,0.5", seed=1)
    assert {x for x in over} == {f"a{i}" for i in range(400)} | {f"c{i}" for i in range(20)}
    assert len(over) > 420  # the small dataset repeats
    once = _order(small, mix_strategy="interleave_once", interleave_probs=[0.5, 0.5], seed=1)
    assert sorted(once) == sorted({f"a{i}" for i in range(400)} | {f"c{i}" for i in range(20)})


def test_mixing_config_is_checked(tmp_path):
    files = ["a.jsonl", "b.jsonl"]
    cases = [
        (dict(interleave_probs=[0.5, 0.5]), "needs interleaving; set data.mix_strategy"),
        (dict(mix_strategy="interleave_under", interleave_probs=[0.5, 0.2]), r"give 2 .* sum to 1 \(they sum to 0\.7\)"),
        (dict(mix_strategy="interleave_under", interleave_probs=[1.0]), "give 2 non-negative"),
        (dict(mix_strategy="interleave_under", interleave_probs="0.5,x"), "expected numbers"),
        (dict(mix_strategy="shuffle"), "'shuffle' is not one of"),
    ]
    for kw, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            from_dict(DataConfig, {"files": files, **kw})
    assert from_dict(DataConfig, {"dataset": "a, b", "mix_strategy": "interleave_over", "interleave_probs": "0.3,0.7"}).interleave_probs == [0.3, 0.7]
    with pytest.raises(ConfigError, match="no data"):
        DataConfig()
