"""Schedules: endpoints, monotonicity, validation."""

import math

import pytest

from pruning.schedules import cosine_decay, exponential_densities, gradual_cubic, one_shot


def test_one_shot():
    assert one_shot(0, at=3, final=0.1) == 1.0
    assert one_shot(2, at=3, final=0.1) == 1.0
    assert one_shot(3, at=3, final=0.1) == 0.1
    assert one_shot(100, at=3, final=0.1, initial=0.5) == 0.1
    with pytest.raises(ValueError, match="final"):
        one_shot(0, at=0, final=0.0)


def test_gradual_cubic_endpoints_and_shape():
    kw = dict(t0=10, n=5, dt=4, initial=1.0, final=0.1)
    assert gradual_cubic(0, **kw) == 1.0
    assert gradual_cubic(10, **kw) == 1.0
    assert gradual_cubic(30, **kw) == pytest.approx(0.1)
    assert gradual_cubic(1000, **kw) == pytest.approx(0.1)
    # first pruning step: d_f + (d_i - d_f) * (1 - 1/5)^3
    assert gradual_cubic(14, **kw) == pytest.approx(0.1 + 0.9 * 0.8**3)
    assert gradual_cubic(17, **kw) == gradual_cubic(14, **kw)  # held between steps of dt
    values = [gradual_cubic(t, **kw) for t in range(0, 40)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    # the schedule prunes fastest early (cubic): the first step drops more than the last
    steps = sorted(set(values), reverse=True)
    assert steps[0] - steps[1] > steps[-2] - steps[-1]


def test_gradual_cubic_is_zhu_gupta_in_sparsity():
    s_i, s_f = 0.0, 0.9
    for j in range(6):
        t = 10 + 4 * j
        s_t = s_f + (s_i - s_f) * (1 - (t - 10) / (5 * 4)) ** 3
        assert 1 - gradual_cubic(t, 10, 5, 4, 1 - s_i, 1 - s_f) == pytest.approx(s_t)


def test_gradual_cubic_validation():
    with pytest.raises(ValueError):
        gradual_cubic(0, 0, 0, 1, 1.0, 0.1)
    with pytest.raises(ValueError):
        gradual_cubic(0, 0, 5, 0, 1.0, 0.1)
    with pytest.raises(ValueError, match="initial"):
        gradual_cubic(0, 0, 5, 1, 1.5, 0.1)


def test_cosine_decay():
    assert cosine_decay(0, 0.2, 100) == pytest.approx(0.2)
    assert cosine_decay(50, 0.2, 100) == pytest.approx(0.1)
    assert cosine_decay(100, 0.2, 100) == pytest.approx(0.0, abs=1e-15)
    assert cosine_decay(101, 0.2, 100) == 0.0
    assert cosine_decay(25, 0.2, 100) == pytest.approx(0.1 * (1 + math.cos(math.pi / 4)))
    with pytest.raises(ValueError):
        cosine_decay(-1, 0.2, 100)
    with pytest.raises(ValueError):
        cosine_decay(0, 0.2, 0)


def test_exponential_densities():
    d, n = 0.01, 100
    dens = exponential_densities(d, n)
    assert len(dens) == n and dens[-1] == d
    assert all(dens[j] == d ** ((j + 1) / n) for j in range(n))
    # the same fraction of the remaining weights is pruned at every iteration
    assert all(b / a == pytest.approx(d ** (1 / n)) for a, b in zip(dens, dens[1:]))
    assert exponential_densities(0.3, 1) == [0.3]
    assert exponential_densities(1.0, 3) == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="iterations"):
        exponential_densities(0.1, 0)
    with pytest.raises(ValueError, match="density"):
        exponential_densities(0.0, 10)
