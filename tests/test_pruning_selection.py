"""Selection: exact keep counts, ties, ERK allocation, thresholds."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pruning.selection import (
    erk_densities,
    global_topk,
    keep_count,
    layerwise_topk,
    threshold,
    uniform_densities,
)

shapes_st = st.dictionaries(
    st.text("abcdefgh", min_size=1, max_size=3),
    st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple),
    min_size=1, max_size=5,
)
density_st = st.floats(0.001, 1.0)


def random_scores(shapes, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: many ties
        return {n: torch.randint(0, 3, s, generator=g).float() for n, s in shapes.items()}
    return {n: torch.rand(s, generator=g) for n, s in shapes.items()}


@settings(max_examples=80, deadline=None)
@given(shapes_st, density_st, st.integers(0, 1000), st.booleans())
def test_global_topk_exact_count_and_order(shapes, d, seed, ties):
    scores = random_scores(shapes, seed, ties)
    masks = global_topk(scores, d)
    total = sum(s.numel() for s in scores.values())
    assert sum(int(m.sum()) for m in masks.values()) == math.floor(d * total + 0.5)
    kept = torch.cat([s[m] for s, m in zip(scores.values(), masks.values())])
    dropped = torch.cat([s[~m] for s, m in zip(scores.values(), masks.values())])
    if len(kept) and len(dropped):
        assert kept.min() >= dropped.max()
    for n, m in masks.items():
        assert m.dtype == torch.bool and m.shape == scores[n].shape
    assert all(torch.equal(a, b) for a, b in zip(masks.values(), global_topk(scores, d).values()))
    # the same positions as a stable descending sort (ties to the earlier position)
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    ref = torch.zeros(total, dtype=torch.bool)
    ref[torch.sort(flat, descending=True, stable=True).indices[:math.floor(d * total + 0.5)]] = True
    assert torch.equal(torch.cat([m.reshape(-1) for m in masks.values()]), ref)


@settings(max_examples=80, deadline=None)
@given(shapes_st, density_st, st.integers(0, 1000))
def test_layerwise_topk_exact_counts(shapes, d, seed):
    scores = random_scores(shapes, seed, ties=True)
    masks = layerwise_topk(scores, d)
    for n, m in masks.items():
        assert int(m.sum()) == keep_count(d, m.numel())
        if m.any() and (~m).any():
            assert scores[n][m].min() >= scores[n][~m].max()


def test_ties_go_to_the_earlier_position():
    scores = {"a": torch.ones(2, 3), "b": torch.ones(4)}
    masks = global_topk(scores, 0.8)  # keep 8 of 10: all of a, first two of b
    assert masks["a"].all()
    assert masks["b"].tolist() == [True, True, False, False]
    masks = global_topk(scores, 0.5)  # keep 5 of 10: first five of a
    assert masks["a"].reshape(-1).tolist() == [True] * 5 + [False] and not masks["b"].any()
    lw = layerwise_topk({"a": torch.tensor([1.0, 2.0, 2.0, 1.0, 2.0])}, 0.4)
    assert lw["a"].tolist() == [False, True, True, False, False]


def test_minus_infinity_ranks_last():
    scores = {"a": torch.tensor([float("-inf"), 0.0, 2.0]), "b": torch.tensor([1.0, float("-inf")])}
    assert global_topk(scores, 0.6)["a"].tolist() == [False, True, True]
    masks = global_topk(scores, 0.8)  # one of the two -inf: the earlier
    assert masks["a"].all() and masks["b"].tolist() == [True, False]
    assert all(m.all() for m in global_topk(scores, 1.0).values())


def test_keep_count_rounds_half_up():
    assert keep_count(0.5, 3) == 2
    assert keep_count(0.5, 5) == 3
    assert keep_count(0.1, 4) == 0
    assert keep_count(1.0, 7) == 7


def test_layerwise_dict_densities():
    scores = {"a": torch.rand(100), "b": torch.rand(10, 10)}
    masks = layerwise_topk(scores, {"a": 0.25, "b": 1.0})
    assert int(masks["a"].sum()) == 25 and masks["b"].all()
    with pytest.raises(ValueError, match="no density"):
        layerwise_topk(scores, {"a": 0.5})


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_densities_are_validated(bad):
    scores = {"a": torch.rand(10)}
    with pytest.raises(ValueError, match="density"):
        global_topk(scores, bad)
    with pytest.raises(ValueError, match="density"):
        layerwise_topk(scores, bad)
    with pytest.raises(ValueError, match="density"):
        uniform_densities({"a": (10,)}, bad)
    with pytest.raises(ValueError, match="density"):
        erk_densities({"a": (10,)}, bad)


def test_bad_scores():
    with pytest.raises(ValueError, match="NaN"):
        global_topk({"a": torch.tensor([1.0, float("nan")])}, 0.5)
    with pytest.raises(ValueError, match="floating"):
        global_topk({"a": torch.tensor([1, 2])}, 0.5)
    with pytest.raises(ValueError, match="empty"):
        global_topk({}, 0.5)


CONVNET = {"conv1": (16, 3, 3, 3), "conv2": (32, 16, 3, 3), "conv3": (64, 32, 3, 3),
           "fc1": (128, 1024), "fc2": (10, 128), "bias": (10,)}


@pytest.mark.parametrize("d", [0.01, 0.05, 0.1, 0.3, 0.6, 0.9, 1.0])
@pytest.mark.parametrize("power", [1.0, 0.5])
def test_erk_meets_the_global_target(d, power):
    dens = erk_densities(CONVNET, d, erk_power_scale=power)
    numel = {n: math.prod(s) for n, s in CONVNET.items()}
    total = sum(numel.values())
    assert sum(dens[n] * numel[n] for n in CONVNET) == pytest.approx(d * total, rel=1e-9)
    assert all(0 < v <= 1.0 for v in dens.values())
    # ERK gives small / thin layers more density than big ones
    assert dens["conv1"] >= dens["conv3"] and dens["fc2"] >= dens["fc1"]


def test_erk_caps_dense_layers_and_redistributes():
    dens = erk_densities(CONVNET, 0.3)
    assert dens["bias"] == 1.0 and dens["conv1"] == 1.0
    assert erk_densities(CONVNET, 1.0) == dict.fromkeys(CONVNET, 1.0)
    flat = erk_densities(CONVNET, 0.2, erk_power_scale=0.0)  # no shape preference: uniform
    assert all(v == pytest.approx(0.2) for v in flat.values())
    tensors = {n: torch.zeros(s) for n, s in CONVNET.items()}
    assert erk_densities(tensors, 0.3) == dens


def test_uniform_and_threshold():
    assert uniform_densities({"a": (3,), "b": torch.zeros(2, 2)}, 0.4) == {"a": 0.4, "b": 0.4}
    masks = threshold({"w": torch.tensor([-2.0, 0.001, 0.0005, 1e-3])}, 1e-3)
    assert masks["w"].tolist() == [False, True, False, True]
