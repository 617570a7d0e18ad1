import pytest

from secateur.errors import ConfigError
from secateur.schedules import Cubic, Iterative, OneShot


def test_cubic_values_at_known_steps():
    s = Cubic(final_sparsity=0.9, start=100, every=10, n=10, initial_sparsity=0.0)
    assert s.sparsity_at(0) == 0.0
    assert s.update_at(100) == pytest.approx(0.0)
    # Halfway: s_f + (s_i - s_f) * (1 - 1/2)^3 = 0.9 - 0.9 / 8
    assert s.update_at(150) == pytest.approx(0.9 - 0.9 / 8)
    # One update in: 0.9 - 0.9 * 0.9^3
    assert s.update_at(110) == pytest.approx(0.9 - 0.9 * 0.9**3)
    assert s.update_at(200) == pytest.approx(0.9)
    assert s.update_at(105) is None
    assert s.update_at(210) is None
    assert s.sparsity_at(10_000) == pytest.approx(0.9)
    assert s.update_steps == list(range(100, 201, 10))


def test_cubic_with_initial_sparsity_and_monotone():
    s = Cubic(final_sparsity=0.8, start=0, every=5, n=4, initial_sparsity=0.2)
    vals = [s.update_at(t) for t in s.update_steps]
    assert vals[0] == pytest.approx(0.2) and vals[-1] == pytest.approx(0.8)
    assert all(a < b for a, b in zip(vals, vals[1:]))
    # Increments shrink: pruning is fast early, slow late (the point of the cubic shape).
    diffs = [b - a for a, b in zip(vals, vals[1:])]
    assert all(a > b for a, b in zip(diffs, diffs[1:]))


def test_iterative_linear_and_geometric():
    lin = Iterative(0.8, steps=4, every=10, start=5)
    assert [lin.update_at(t) for t in lin.update_steps] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lin.update_at(6) is None and lin.update_at(45) is None
    geo = Iterative(0.75, steps=2, every=1, mode="geometric")
    # density (1 - 0.75)^(1/2) = 0.5 after the first of two stages
    assert geo.update_at(0) == pytest.approx(0.5)
    assert geo.update_at(1) == pytest.approx(0.75)


def test_one_shot():
    s = OneShot(0.5, at=3)
    assert s.update_at(3) == 0.5 and s.update_at(2) is None and s.update_at(4) is None


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.5", True])
def test_bad_sparsity_rejected(bad):
    with pytest.raises(ConfigError, match="sparsity"):
        Cubic(final_sparsity=bad, start=0, every=1, n=1)
    with pytest.raises(ConfigError, match="sparsity"):
        OneShot(bad)


def test_bad_schedule_arguments():
    with pytest.raises(ConfigError, match="every"):
        Cubic(0.5, start=0, every=0, n=3)
    with pytest.raises(ConfigError, match="exceeds"):
        Cubic(0.5, start=0, every=1, n=3, initial_sparsity=0.6)
    with pytest.raises(ConfigError, match="mode"):
        Iterative(0.5, steps=2, mode="exp")
