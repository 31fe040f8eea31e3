"""Saliency scores on a tiny conv model: shapes, determinism, no side effects."""

import copy

import pytest
import torch
from torch import nn

from pruning.masks import prunable_names
from pruning.scores import (
    gradient_scores,
    magnitude_scores,
    random_scores,
    snip_scores,
    synflow_scores,
)


def tiny_convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 5),
    )


def batches(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 1, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g))
            for _ in range(n)]


def snapshot(model):
    return copy.deepcopy(model.state_dict()), [m.training for m in model.modules()], \
        [p.grad for p in model.parameters()]


def assert_untouched(model, snap):
    state, modes, grads = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert [m.training for m in model.modules()] == modes
    assert all(g is None for g in grads) and all(p.grad is None for p in model.parameters())


@pytest.fixture
def net():
    return tiny_convnet()


def check_shapes(model, names, scores, dtype=torch.float32):
    params = dict(model.named_parameters())
    assert list(scores) == names
    for n in names:
        assert scores[n].shape == params[n].shape and scores[n].dtype == dtype
        assert bool(torch.isfinite(scores[n]).all()) and bool((scores[n] >= 0).all())


def test_magnitude(net):
    names = prunable_names(net, include_bias=True)
    scores = magnitude_scores(net, names)
    check_shapes(net, names, scores)
    assert torch.equal(scores["0.weight"], net[0].weight.detach().abs())


def test_random_is_reproducible(net):
    names = prunable_names(net)
    a = random_scores(net, names, torch.Generator().manual_seed(3))
    b = random_scores(net, names, torch.Generator().manual_seed(3))
    c = random_scores(net, names, torch.Generator().manual_seed(4))
    check_shapes(net, names, a)
    assert all(torch.equal(a[n], b[n]) for n in names)
    assert not torch.equal(a["8.weight"], c["8.weight"])


def test_snip_matches_g_times_w_and_has_no_side_effects(net):
    names = prunable_names(net)
    net.train()
    snap = snapshot(net)
    data = batches()
    scores = snip_scores(net, nn.functional.cross_entropy, data, names)
    check_shapes(net, names, scores)
    assert_untouched(net, snap)
    ref = copy.deepcopy(net)
    for x, y in data:
        nn.functional.cross_entropy(ref(x), y).backward()
    for n, p in ref.named_parameters():
        if n in names:
            assert torch.allclose(scores[n], (p.grad * p.detach()).abs(), atol=1e-7)
    with pytest.raises(ValueError, match="empty"):
        snip_scores(net, nn.functional.cross_entropy, [], names)


def test_gradient_scores_only_rank_pruned_positions(net):
    names = prunable_names(net)
    masks = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(0)) < 0.5
             for n, p in net.named_parameters() if n in names}
    snap = snapshot(net)
    scores = gradient_scores(net, nn.functional.cross_entropy, batches(), names, masks)
    assert_untouched(net, snap)
    for n in names:
        assert bool(torch.isneginf(scores[n][masks[n]]).all())
        assert bool((scores[n][~masks[n]] >= 0).all())
    dense = gradient_scores(net, nn.functional.cross_entropy, batches(), names)
    check_shapes(net, names, dense)
    with pytest.raises(ValueError, match="bool"):
        gradient_scores(net, nn.functional.cross_entropy, batches(), names, {"0.weight": torch.ones(1)})


def test_synflow_is_data_free_deterministic_and_harmless(net):
    names = prunable_names(net)
    net.train()
    snap = snapshot(net)
    a = synflow_scores(net, (1, 8, 8), names)
    b = synflow_scores(net, (1, 8, 8), names)
    check_shapes(net, names, a, dtype=torch.float64)
    assert_untouched(net, snap)
    assert all(torch.equal(a[n], b[n]) for n in names)
    assert all(bool((a[n] > 0).any()) for n in names)
    # depends only on |theta|: flipping signs changes nothing
    flipped = copy.deepcopy(net)
    with torch.no_grad():
        for p in flipped.parameters():
            p.neg_()
    c = synflow_scores(flipped, (1, 8, 8), names)
    assert all(torch.allclose(a[n], c[n]) for n in names)


def test_synflow_linear_chain_closed_form():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False))
    w1, w2 = net[0].weight.detach().double().abs(), net[1].weight.detach().double().abs()
    scores = synflow_scores(net, (3,), ["0.weight", "1.weight"])
    # R = 1^T |W2| |W1| 1  ->  dR/dW1[i,j] = sum_k |W2|[k,i]
    assert torch.allclose(scores["0.weight"], w1 * w2.sum(0)[:, None])
    assert torch.allclose(scores["1.weight"], w2 * (w1 @ torch.ones(3, dtype=torch.float64))[None, :])


def test_synflow_does_not_overflow_deep_nets():
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Linear(64, 64) for _ in range(30)])
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(30.0)
    scores = synflow_scores(net, (64,), ["0.weight", "29.weight"])
    assert all(bool(torch.isfinite(s).all()) for s in scores.values())


def test_unknown_names(net):
    with pytest.raises(ValueError, match="unknown"):
        magnitude_scores(net, ["nope"])
    with pytest.raises(ValueError, match="empty"):
        synflow_scores(net, (1, 8, 8), [])
