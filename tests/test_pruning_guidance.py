"""AutoFLIP's guidance (pruning/guidance.py) and the physically smaller model of a masked chain
(pruning/slim.py), in plain torch."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from fedprune.models import build_model
from pruning.guidance import (cut, hybrid_masks, mean_deviation, normalize, quantile_threshold, random_like,
                              select_units, shuffled_units, squared_deviation)
from pruning.masks import apply_masks, mask_gradients, prunable_names
from pruning.slim import chain_of


def test_guidance_is_the_example_weighted_mean_of_squared_deviations():
    base = {"w": torch.tensor([1.0, 2.0, 3.0])}
    a = squared_deviation({"w": torch.tensor([2.0, 2.0, 1.0])}, base)
    b = squared_deviation({"w": torch.tensor([1.0, 5.0, 3.0])}, base)
    assert a["w"].tolist() == [1.0, 0.0, 4.0] and b["w"].tolist() == [0.0, 9.0, 0.0]
    mean = mean_deviation([a, b], [30, 10])
    assert mean["w"].dtype == torch.float64
    assert mean["w"].tolist() == pytest.approx([0.75, 2.25, 3.0])
    with pytest.raises(ValueError):
        mean_deviation([a, b], [1, 0])


def test_minmax_maps_each_tensor_to_the_unit_interval_and_robust_centres_on_the_median():
    g = {"a": torch.tensor([2.0, 4.0, 6.0]), "b": torch.tensor([100.0, 300.0]), "flat": torch.tensor([5.0, 5.0])}
    m = normalize(g, "minmax")
    assert m["a"].tolist() == [0.0, 0.5, 1.0] and m["b"].tolist() == [0.0, 1.0] and m["flat"].tolist() == [0, 0]
    r = normalize({"a": torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])}, "robust")
    assert r["a"].tolist() == pytest.approx([-1.0, -0.5, 0.0, 0.5, 1.0])  # median 3, IQR 2
    assert normalize({"c": torch.tensor([7.0, 7.0])}, "robust")["c"].tolist() == [0.0, 0.0]  # IQR 0 counts as 1
    with pytest.raises(ValueError):
        normalize(g, "zscore")


def test_one_global_quantile_over_all_tensors_prunes_q_of_the_positions():
    g = normalize({"a": torch.rand(400, generator=torch.Generator().manual_seed(0)),
                   "b": torch.rand(600, generator=torch.Generator().manual_seed(1)) ** 3})
    flat = torch.cat([v for v in g.values()])
    assert quantile_threshold(g, 0.3) == pytest.approx(float(torch.quantile(flat, 0.3)))
    masks = cut(g, 0.3)
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == 1000 - 300
    assert all(bool((g[k][m] > g[k][~m].max()).all()) for k, m in masks.items() if (~m).any())
    # one threshold for all: the cubed tensor, whose guidance is mostly small, loses more
    assert masks["b"].float().mean() < masks["a"].float().mean()


def test_units_of_lowest_mean_guidance_are_selected_per_layer():
    g = {"w": torch.tensor([[0.9, 0.9], [0.1, 0.2], [0.5, 0.5], [0.0, 0.4], [1.0, 0.0]])}
    keep = select_units(g, ["w"], 0.4)  # floor(0.4 * 5) = 2 units: means 0.15 and 0.2
    assert keep["w"].tolist() == [True, False, True, False, True]
    assert select_units(g, ["w"], 0.0)["w"].all()
    assert int(select_units({"one": torch.ones(1, 3)}, ["one"], 0.9)["one"].sum()) == 1


def test_kept_units_can_be_rounded_down_to_a_multiple():
    g = {"w": torch.rand(32, 9, generator=torch.Generator().manual_seed(0))}
    means = g["w"].mean(1)
    assert int(select_units(g, ["w"], 0.2)["w"].sum()) == 26  # 32 - floor(6.4)
    keep = select_units(g, ["w"], 0.2, multiple=8)["w"]
    assert int(keep.sum()) == 24 and means[keep].min() >= means[~keep].max()
    assert select_units(g, ["w"], 0.0, multiple=8)["w"].all()  # no structured pruning: no rounding
    small = {"w": torch.rand(5, 2)}
    assert int(select_units(small, ["w"], 0.4, multiple=8)["w"].sum()) == 3  # fewer than 8 stay: as they are


def test_random_like_keeps_the_shape_of_a_mask_within_the_allowed_positions():
    gen = torch.Generator().manual_seed(0)
    masks = {"w": torch.rand(6, 8, generator=gen) > 0.5, "b": torch.tensor([True, False, True])}
    allowed = {"w": torch.ones(6, 8, dtype=torch.bool)}
    allowed["w"][:2] = False
    masks["w"][:2] = False
    out = random_like(masks, allowed, torch.Generator().manual_seed(1))
    assert int(out["w"].sum()) == int(masks["w"].sum()) and not out["w"][:2].any()
    assert int(out["b"].sum()) == 2 and not torch.equal(out["w"], masks["w"])
    units = shuffled_units({"w": torch.tensor([True, False, True, True, False])}, torch.Generator().manual_seed(2))
    assert int(units["w"].sum()) == 3
    with pytest.raises(ValueError):
        random_like({"w": torch.ones(3, dtype=torch.bool)}, {"w": torch.tensor([True, False, True])}, gen)


# ------------------------------------------------------------------------------ slim chains

def _masked_cnn(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(name, 1, 10, 28)
    names = prunable_names(model, include_bias=True, include_norm=True)
    chain = chain_of(model, torch.randn(2, 1, 28, 28))
    gen = torch.Generator().manual_seed(seed)
    guidance = {k: torch.rand(p.shape, generator=gen) for k, p in model.named_parameters() if k in names}
    units = select_units(guidance, [layer.weight for layer in chain.removable(names)], 0.25)
    structural = chain.unit_positions(units, {k: v.shape for k, v in guidance.items()})
    masks = hybrid_masks(guidance, 0.3, structural)
    apply_masks(model, masks)
    return model, chain, masks, units


@pytest.mark.parametrize("name", ["cnn", "cnn-bn", "vgg11-bn"])
def test_chain_models_are_recognised_and_branching_ones_are_not(name):
    model = build_model(name, 1, 10, 28)
    chain = chain_of(model, torch.randn(2, 1, 28, 28))
    assert chain is not None and chain.layers[-1].units == 10
    for other in ("resnet20", "fedlp-cnn"):
        assert chain_of(build_model(other, 1, 10, 28), torch.randn(2, 1, 28, 28)) is None


@pytest.mark.parametrize("name", ["cnn", "cnn-bn"])
def test_removed_units_make_a_smaller_model_with_the_same_outputs(name):
    model, chain, masks, units = _masked_cnn(name)
    kept = chain.kept_units(masks)
    assert [int(k.sum()) for k in kept[:3]] == [int(u.sum()) for u in units.values()]
    assert kept[-1].all()
    slim = chain.slim(model, kept)
    full_params = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in slim.model.parameters()) < 0.65 * full_params
    x = torch.randn(8, 1, 28, 28)
    for mode in (False, True):
        model.train(mode), slim.model.train(mode)
        torch.testing.assert_close(slim.model(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["cnn", "cnn-bn"])
def test_training_the_smaller_model_is_training_the_masked_model(name):
    model, chain, masks, _ = _masked_cnn(name, seed=3)
    slim = chain.slim(model, chain.kept_units(masks))
    slim_masks = slim.masks(masks)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    for net, m in ((model, masks), (slim.model, slim_masks)):
        net.train()
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            mask_gradients(net, m)
            opt.step()
            apply_masks(net, m)
    back = slim.full_state(model.state_dict())
    live = {f"{layer.norm_path}.{stat}": kept for layer, kept in zip(chain.layers, chain.kept_units(masks))
            if layer.norm_path for stat in ("running_mean", "running_var")}
    for k, v in model.state_dict().items():
        # statistics of removed channels differ, and have no effect on any output
        keep = masks.get(k, live.get(k, torch.ones_like(v, dtype=torch.bool)))
        torch.testing.assert_close(back[k][keep], v[keep], rtol=1e-4, atol=1e-5, msg=k)


def test_the_smaller_model_costs_fewer_counted_flops():
    from pruning.accounting import count_flops

    model, chain, masks, _ = _masked_cnn("cnn")
    slim = chain.slim(model, chain.kept_units(masks))
    x = torch.randn(1, 1, 28, 28)
    dense = count_flops(model, x, training=True).dense
    small = count_flops(slim.model, x, training=True).dense
    # every hidden layer kept 3/4 of its units: conv2 and fc1 keep (3/4)^2 of their work
    assert small / dense == pytest.approx(0.5625, abs=0.05)
    assert math.isclose(count_flops(model, x, masks, training=True).ratio,
                        count_flops(slim.model, x, slim.masks(masks), training=True).effective / dense, rel_tol=0.02)


def test_a_unit_stays_when_an_unmaskable_parameter_sets_its_output():
    model, chain, masks, _ = _masked_cnn("cnn")
    without_bias = {k: v for k, v in masks.items() if k != "features.0.bias"}
    assert chain.kept_units(without_bias)[0].all()
    assert [layer.path for layer in chain.removable([k for k in masks if k != "features.3.bias"])] == \
        ["features.0", "classifier.1"]
    alive = masks["features.0.weight"].reshape(32, -1).any(1) | masks["features.0.bias"]
    np.testing.assert_array_equal(chain.kept_units(masks)[0].numpy(), alive.numpy())
