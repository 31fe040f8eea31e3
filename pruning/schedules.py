"""Pruning schedules: density (or adjustment rate) as a function of the step or round ``t``.

All schedules here speak in *density* (fraction kept), not sparsity.
"""

from __future__ import annotations

import math

__all__ = ["cosine_decay", "exponential_densities", "gradual_cubic", "one_shot"]


def _check_density(d: float, what: str) -> None:
    if not 0.0 < d <= 1.0:
        raise ValueError(f"{what} must be in (0, 1], got {d}")


def one_shot(t: int, *, at: int, final: float, initial: float = 1.0) -> float:
    """``initial`` before step ``at``, ``final`` from step ``at`` on."""
    _check_density(initial, "initial")
    _check_density(final, "final")
    return initial if t < at else final


def gradual_cubic(t: int, t0: int, n: int, dt: int, initial: float, final: float) -> float:
    """Gradual pruning of Zhu & Gupta (2017), written in density.

    The paper's sparsity ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3`` becomes, with
    ``d = 1 - s``, the same formula in density::

        d_t = d_f + (d_i - d_f) * (1 - (t - t0) / (n * dt)) ** 3

    Pruning happens every ``dt`` steps, ``n`` times: ``t`` is rounded down to the step grid
    ``t0 + j * dt``. Before ``t0`` the result is ``initial``; from ``t0 + n * dt`` on it is ``final``.
    """
    _check_density(initial, "initial")
    _check_density(final, "final")
    if n < 1 or dt < 1:
        raise ValueError(f"n and dt must be >= 1, got n={n}, dt={dt}")
    if t < t0:
        return initial
    j = min(n, (t - t0) // dt)
    return final + (initial - final) * (1.0 - j / n) ** 3


def exponential_densities(density: float, iterations: int) -> list[float]:
    """The exponential schedule of iterative SynFlow (Tanaka et al. 2020): ``density ** (j / n)`` for
    ``j = 1..n`` (``n = iterations``).

    Every iteration keeps the same fraction ``density ** (1 / n)`` of what the previous one kept; the
    last density is ``density`` itself.
    """
    _check_density(density, "density")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    return [density ** (j / iterations) for j in range(1, iterations + 1)]


def cosine_decay(t: float, alpha: float, t_end: float) -> float:
    """``alpha / 2 * (1 + cos(pi * t / t_end))`` for ``0 <= t <= t_end``, 0 after ``t_end``.

    The prune-and-regrow rate of RigL / FedTiny / FedDST.
    """
    if t_end <= 0:
        raise ValueError(f"t_end must be > 0, got {t_end}")
    if t < 0:
        raise ValueError(f"t must be >= 0, got {t}")
    if t > t_end:
        return 0.0
    return alpha / 2.0 * (1.0 + math.cos(math.pi * t / t_end))
