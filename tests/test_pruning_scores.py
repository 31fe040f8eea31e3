"""Saliency scores on a tiny conv model: shapes, determinism, no side effects."""

import copy

import pytest
import torch
from torch import nn

from pruning.masks import prunable_names
from pruning.scores import (
    gradient_scores,
    loss_gradients,
    magnitude_scores,
    random_scores,
    snip_from_gradients,
    snip_scores,
    synflow_iterative_masks,
    synflow_scores,
)
from pruning.selection import global_topk, keep_count, layerwise_topk


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


def test_loss_gradients_by_hand():
    net = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, 2.0]]))
    mse = nn.functional.mse_loss
    # d mean((w.x - y)^2) / dw = 2 * mean((w.x - y) * x)
    data = [(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.zeros(2, 1)),  # residuals 1, 2: g = [1, 2]
            (torch.tensor([[1.0, -1.0]]), torch.ones(1, 1))]  # residual -2: g = [-4, 4]
    g = loss_gradients(net, mse, data, ["weight"])
    assert g["weight"].dtype == torch.float32
    assert torch.equal(g["weight"], torch.tensor([[-1.5, 3.0]]))  # signed mean over the batches
    assert net.weight.grad is None
    assert torch.equal(snip_from_gradients({"weight": net.weight}, g)["weight"], torch.tensor([[1.5, 6.0]]))
    # snip_scores keeps its semantics: |g * w| with g summed over the batches
    assert torch.equal(snip_scores(net, mse, data, ["weight"])["weight"], torch.tensor([[3.0, 12.0]]))


def test_loss_gradients_match_autograd_and_have_no_side_effects(net):
    names = prunable_names(net, include_bias=True)
    net.train()
    snap = snapshot(net)
    data = batches(3)
    grads = loss_gradients(net, nn.functional.cross_entropy, data, names)
    assert_untouched(net, snap)
    ref = copy.deepcopy(net)
    for x, y in data:
        nn.functional.cross_entropy(ref(x), y).backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    assert list(grads) == names
    assert all(torch.allclose(grads[n], ref_grads[n] / 3, atol=1e-7) for n in names)
    assert any(bool((g < 0).any()) for g in grads.values())
    with pytest.raises(ValueError, match="empty"):
        loss_gradients(net, nn.functional.cross_entropy, [], names)


def test_union_gradient_differs_from_averaged_client_scores():
    net = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[2.0, 1.0]]))
    linear = lambda out, y: (out * y).sum()  # noqa: E731 - d loss / dw = sum_i y_i x_i
    clients = [[(torch.tensor([[1.0, 1.0]]), torch.ones(1, 1))],  # g1 = [1, 1]
               [(torch.tensor([[1.0, -1.0]]), -torch.ones(1, 1))]]  # g2 = [-1, 1]: cancels on w[0]
    union = snip_from_gradients(
        {"weight": net.weight},
        {"weight": sum(loss_gradients(net, linear, c, ["weight"])["weight"] for c in clients)})
    averaged = sum(snip_scores(net, linear, c, ["weight"])["weight"] for c in clients) / 2
    assert torch.equal(union["weight"], torch.tensor([[0.0, 2.0]]))  # |(g1 + g2) * w|
    assert torch.equal(averaged, torch.tensor([[2.0, 1.0]]))  # (|g1 * w| + |g2 * w|) / 2
    assert global_topk(union, 0.5)["weight"].tolist() == [[False, True]]
    assert global_topk({"weight": averaged}, 0.5)["weight"].tolist() == [[True, False]]
    with pytest.raises(ValueError, match="no gradient"):
        snip_from_gradients({"weight": net.weight}, {})
    with pytest.raises(ValueError, match="shape"):
        snip_from_gradients({"weight": net.weight}, {"weight": torch.zeros(2)})


def test_synflow_iterative_exact_density_and_harmless(net):
    names = prunable_names(net)
    net.train()
    snap = snapshot(net)
    masks = synflow_iterative_masks(net, (1, 8, 8), names, 0.05, iterations=20)
    assert_untouched(net, snap)
    params = dict(net.named_parameters())
    assert list(masks) == names
    assert all(masks[n].dtype == torch.bool and masks[n].shape == params[n].shape for n in names)
    total = sum(params[n].numel() for n in names)
    assert sum(int(m.sum()) for m in masks.values()) == keep_count(0.05, total)
    lw = synflow_iterative_masks(net, (1, 8, 8), names, 0.05, iterations=20, select=layerwise_topk)
    assert all(int(lw[n].sum()) == keep_count(0.05, params[n].numel()) for n in names)
    # one iteration is single-shot SynFlow
    one = synflow_iterative_masks(net, (1, 8, 8), names, 0.05, iterations=1)
    ref = global_topk(synflow_scores(net, (1, 8, 8), names), 0.05)
    assert all(torch.equal(one[n], ref[n]) for n in names)


def small_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))


def synaptic_flow(model, masks):
    """``R`` of the masked, linearized model without biases: 0 iff no input-output path survives."""
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in pruned.named_parameters():
            p.mul_(masks[n] if n in masks else 0.0)
    return float(sum(s.sum() for s in synflow_scores(pruned, (1, 16, 16), ["9.weight"]).values()))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("density", [0.003, 0.01, 0.05])
def test_synflow_iterative_avoids_layer_collapse(seed, density):
    # The 8192-weight FC layer holds 90% of the weights, so each of its weights carries little flow:
    # single-shot SynFlow prunes all of it at these densities (layer collapse, Tanaka et al. Fig. 1),
    # iterative SynFlow keeps every layer and a path from input to output.
    model = small_cnn(seed)
    names = ["0.weight", "3.weight", "7.weight", "9.weight"]
    iterative = synflow_iterative_masks(model, (1, 16, 16), names, density)
    single = global_topk(synflow_scores(model, (1, 16, 16), names), density)
    assert not bool(single["7.weight"].any()) and synaptic_flow(model, single) == 0.0
    assert all(bool(m.any()) for m in iterative.values()) and synaptic_flow(model, iterative) > 0.0
    total = sum(m.numel() for m in iterative.values())
    assert sum(int(m.sum()) for m in iterative.values()) == keep_count(density, total)


def test_unknown_names(net):
    with pytest.raises(ValueError, match="unknown"):
        magnitude_scores(net, ["nope"])
    with pytest.raises(ValueError, match="empty"):
        synflow_scores(net, (1, 8, 8), [])
    with pytest.raises(ValueError, match="unknown"):
        synflow_iterative_masks(net, (1, 8, 8), ["nope"], 0.1)
