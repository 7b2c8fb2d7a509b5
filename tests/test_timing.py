import pytest
import torch

from effortless.experiments.timing import interleaved, paired_ratio


def test_interleaved_runs_each_callable_in_blocks_in_turn():
    calls = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=3, warmup=1,
                        block=2)  # fmt: skip
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 3  # warm-up rounds, then blocks alternating
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert all(t >= 0 for v in times.values() for t in v)


def test_interleaved_sees_a_slower_callable_as_slower():
    x = torch.randn(256, 256)
    times = interleaved({"one": lambda: x @ x, "four": lambda: [x @ x for _ in range(4)]}, reps=9, block=3)
    assert 2.0 < paired_ratio(times["four"], times["one"]) < 8.0


def test_paired_ratio_is_the_median_of_per_repetition_ratios():
    assert paired_ratio([2.0, 3.0, 10.0], [1.0, 1.0, 1.0]) == 3.0
    assert paired_ratio([2.0, 4.0], [2.0, 1.0]) == 2.5


@pytest.mark.parametrize("kwargs", [dict(reps=0), dict(block=0), dict(warmup=-1), dict(reps=1.5)])
def test_interleaved_refuses_bad_counts(kwargs):
    args = dict(reps=1, block=1, warmup=0) | kwargs
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        interleaved({"a": lambda: None}, **args)


def test_interleaved_and_paired_ratio_refuse_empty_input():
    with pytest.raises(ValueError, match="empty"):
        interleaved({}, reps=1)
    with pytest.raises(ValueError, match="equally long"):
        paired_ratio([1.0], [1.0, 2.0])
