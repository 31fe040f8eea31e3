"""Accounting: parameter counts, counted FLOPs, measured memory of a training step."""

import copy

import pytest
import torch
from torch import nn

from pruning.accounting import count_flops, param_counts, training_step_memory
from pruning.masks import full_masks, prunable_names
from pruning.scores import magnitude_scores
from pruning.selection import global_topk, layerwise_topk


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10),
    )


def half_mask(shape):
    m = torch.zeros(shape, dtype=torch.bool).reshape(-1)
    m[: m.numel() // 2] = True
    return m.reshape(shape)


def test_linear_forward_flops_and_scaling():
    lin = nn.Linear(100, 10)
    x = torch.randn(1, 100)
    dense = count_flops(lin, x)
    assert dense.dense == 2000 and dense.effective == 2000 and dense.other == 0
    sparse = count_flops(lin, x, {"weight": half_mask((10, 100))})
    assert sparse.dense == 2000
    assert sparse.effective == pytest.approx(1000)
    assert sparse.ratio == pytest.approx(0.5)
    assert [(r.name, r.dense, r.density) for r in sparse.layers] == [("", 2000, 0.5)]


def test_per_layer_rows_and_masks():
    net = convnet()
    x = torch.randn(2, 1, 16, 16)
    rep = count_flops(net, x)
    assert [r.name for r in rep.layers] == ["0", "4", "8", "10"]
    # conv 0: 2 * Cin * Cout * k^2 * H * W * batch
    assert rep.layers[0].dense == 2 * 1 * 8 * 9 * 16 * 16 * 2
    assert rep.layers[-1].dense == 2 * 32 * 10 * 2
    assert rep.dense == sum(r.dense for r in rep.layers)
    masks = layerwise_topk(magnitude_scores(net, prunable_names(net)), 0.25)
    sparse = count_flops(net, x, masks)
    for row in sparse.layers:
        assert row.density == pytest.approx(0.25, abs=0.01)
        assert row.effective == pytest.approx(row.dense * row.density)
    assert sparse.ratio == pytest.approx(0.25, abs=0.01)
    # only some layers masked: the others count dense
    part = count_flops(net, x, {"8.weight": masks["8.weight"]})
    assert part.effective == pytest.approx(rep.dense - rep.layers[2].dense * (1 - part.layers[2].density))


def test_training_flops_about_three_times_forward():
    net = convnet()
    x = torch.randn(4, 1, 16, 16)
    fwd = count_flops(net, x)
    train = count_flops(net, x, training=True)
    # every layer but the first also computes an input gradient: 3x; the first 2x
    for f, t in zip(fwd.layers[1:], train.layers[1:]):
        assert t.dense == 3 * f.dense
    assert train.layers[0].dense == 2 * fwd.layers[0].dense
    assert 2.5 < train.dense / fwd.dense <= 3.0
    mlp = nn.Sequential(nn.Linear(8, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    ratio = count_flops(mlp, torch.randn(4, 8), training=True).dense / count_flops(mlp, torch.randn(4, 8)).dense
    assert ratio == pytest.approx(3.0, abs=0.05)


def test_count_flops_leaves_model_alone():
    net = convnet().train()
    net[1].eval()
    state = copy.deepcopy(net.state_dict())
    count_flops(net, torch.randn(4, 1, 16, 16), training=True)
    count_flops(net, torch.randn(4, 1, 16, 16))
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert net.training and not net[1].training and net[0].training
    assert all(p.grad is None for p in net.parameters())
    with pytest.raises(ValueError, match="unknown"):
        count_flops(net, torch.randn(1, 1, 16, 16), {"x": torch.ones(1, dtype=torch.bool)})


def test_param_counts():
    net = convnet()
    masks = global_topk(magnitude_scores(net, prunable_names(net)), 0.1)
    counts = param_counts(net, masks)
    total = sum(p.numel() for p in net.parameters())
    assert counts.total == total
    masked = sum(m.numel() for m in masks.values())
    assert counts.kept == total - masked + sum(int(m.sum()) for m in masks.values())
    nonzero = sum(int((p != 0).sum()) for p in net.parameters())  # BN bias starts at 0
    assert counts.nonzero == nonzero
    assert counts.layers["0.weight"].kept == int(masks["0.weight"].sum())
    assert counts.layers["0.bias"].kept == counts.layers["0.bias"].total == 8
    with torch.no_grad():
        net[0].weight.zero_()
    assert param_counts(net).nonzero == nonzero - 72
    assert param_counts(net).kept == total and param_counts(net).density == 1.0


def step_memory(batch_size, **kw):
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(batch_size, 1, 16, 16, generator=g), torch.randint(0, 10, (batch_size,), generator=g))
    return training_step_memory(convnet(), nn.functional.cross_entropy, batch, **kw)


def test_memory_measured_peak_is_sane_and_grows_with_batch():
    small, big = step_memory(4), step_memory(128)
    n_params = sum(p.numel() for p in convnet().parameters())
    for rep in (small, big):
        assert rep.grads == 4 * n_params
        assert rep.optimizer_state == 4 * n_params  # SGD momentum buffer
        assert rep.weights >= 4 * n_params
        assert rep.peak >= rep.weights + rep.grads
        assert rep.peak == rep.baseline + rep.peak_increase
    assert big.peak > small.peak
    assert big.activations > 10 * small.activations
    # activations dominate a big batch, and the measured peak sees them
    assert big.peak_increase >= big.activations


def test_memory_adam_state_and_masks_and_no_side_effects():
    net = convnet()
    state = copy.deepcopy(net.state_dict())
    masks = full_masks(net)
    rep = training_step_memory(net, nn.functional.cross_entropy,
                               (torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))),
                               optimizer_factory=lambda p: torch.optim.Adam(p, lr=1e-3), masks=masks)
    n_params = sum(p.numel() for p in net.parameters())
    assert rep.optimizer_state >= 8 * n_params  # exp_avg + exp_avg_sq (+ step scalars)
    assert rep.analytic == rep.weights + rep.grads + rep.optimizer_state + rep.activations
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
