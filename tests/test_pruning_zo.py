"""pruning.zo: seeded perturbations regenerated per layer, the K-scalar estimate, bit-identical
replay, and the memory of a forward-only step."""

import numpy as np
import pytest
import torch
from torch import nn

from fedprune.models import build_model
from pruning.accounting import training_step_memory
from pruning.sparse_training import dense_state_dict
from pruning.zo import (apply_update_, directional_derivatives, forwards_per_step, kept_indices, perturb_,
                        perturbation_generator, replay_, sparse_copy, zo_step_memory)

LOSS = nn.functional.cross_entropy


def cnn_with_mask(density=0.1, seed=0):
    torch.manual_seed(seed)
    model = build_model("cnn", 1, 10, 28)
    g = torch.Generator().manual_seed(seed)
    masks = {n: torch.rand(p.shape, generator=g) < density for n, p in model.named_parameters() if n.endswith("weight")}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    return model, masks


def test_a_perturbation_touches_only_kept_positions_and_leaves_the_global_rng_alone():
    model, masks = cnn_with_mask()
    before = {n: p.clone() for n, p in model.named_parameters()}
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    perturb_(dict(model.named_parameters()), kept_indices(masks), seed=5, k=2, scale=0.1)
    assert torch.equal(torch.rand(3), expected_next)  # the global stream was not consumed
    for n, p in model.named_parameters():
        changed = p != before[n]
        if n in masks:
            assert not changed[~masks[n]].any() and not p[~masks[n]].any()  # pruned stay exactly 0
            assert changed[masks[n]].float().mean() > 0.99
        else:
            assert changed.float().mean() > 0.99  # unmasked parameters (biases) are perturbed densely


def test_the_same_seed_and_k_give_the_same_direction_and_another_k_another():
    model, masks = cnn_with_mask()
    support = kept_indices(masks)

    def direction(seed, k):
        zeros = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        perturb_(zeros, support, seed, k, 1.0)
        return torch.cat([v.reshape(-1) for v in zeros.values()])

    a, b, c = direction(7, 0), direction(7, 0), direction(7, 1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert perturbation_generator(7, 0).initial_seed() != perturbation_generator(8, 0).initial_seed()
    kept = torch.cat([m.reshape(-1) for m in masks.values()]).sum() + sum(
        p.numel() for n, p in model.named_parameters() if n not in masks)
    assert int((a != 0).sum()) == int(kept) and a[a != 0].std() == pytest.approx(1.0, abs=0.02)


def test_perturb_and_restore_returns_the_weights_up_to_rounding():
    model, masks = cnn_with_mask()
    params = dict(model.named_parameters())
    before = {n: p.clone() for n, p in params.items()}
    support = kept_indices(masks)
    perturb_(params, support, 3, 0, 1e-3)
    perturb_(params, support, 3, 0, -1e-3)
    assert all(torch.allclose(params[n], before[n], atol=1e-8, rtol=0) for n in params)


def test_a_replay_with_a_step_size_per_step_is_the_steps_one_by_one():
    model, masks = cnn_with_mask(seed=2)
    arrays = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    seeds, lrs = [5, 6, 7], [0.02, 0.01, 0.0]
    scalars = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    replay_({n: torch.from_numpy(a) for n, a in arrays.items()}, masks, seeds, scalars, lrs)
    params = dict(model.named_parameters())
    for seed, row, lr in zip(seeds, scalars, lrs):
        apply_update_(params, masks, seed, row, lr)
    assert all(np.array_equal(arrays[n], p.detach().numpy()) for n, p in model.named_parameters())
    with pytest.raises(ValueError):
        replay_({n: torch.from_numpy(a) for n, a in arrays.items()}, masks, seeds, scalars, lrs[:2])


@pytest.mark.parametrize("threads", [1, 2])
def test_a_replay_on_numpy_arrays_is_bit_identical_to_one_on_the_model(threads):
    """What the server does (numpy arrays, its own thread count) and what a node does (its model)."""
    model, masks = cnn_with_mask(seed=1)
    arrays = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    seeds = [11, 22, 33]
    scalars = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32) * 5
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        replay_({n: torch.from_numpy(a) for n, a in arrays.items()}, masks, seeds, scalars, 1e-2)
        torch.set_num_threads(1)
        params = dict(model.named_parameters())
        for seed, row in zip(seeds, scalars):
            apply_update_(params, masks, seed, row, 1e-2)
    finally:
        torch.set_num_threads(saved)
    for n, p in model.named_parameters():
        assert np.array_equal(arrays[n], p.detach().numpy()), n
        if n in masks:
            assert not arrays[n][~masks[n].numpy()].any()


def linear_problem(d=6, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(d, 3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model, (torch.randn(n, d, generator=g), torch.randint(0, 3, (n,), generator=g))


@pytest.mark.parametrize("difference, tol", [("forward", 5e-2), ("central", 2e-3)])
def test_each_scalar_is_the_directional_derivative_along_its_direction(difference, tol):
    model, (x, y) = linear_problem()
    model.double()
    x = x.double()
    loss = LOSS(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    model.zero_grad(set_to_none=True)
    scalars, base = directional_derivatives(model, LOSS, (x, y), None, seed=9, num_perturbations=4, sigma=1e-4,
                                            difference=difference)
    params = dict(model.named_parameters())
    for k in range(4):
        zero = {n: torch.zeros_like(p) for n, p in params.items()}
        perturb_(zero, {}, 9, k, 1.0)
        exact = sum(float((g * z).sum()) for g, z in zip(grads, zero.values()))
        assert scalars[k].item() == pytest.approx(exact, abs=tol * max(1.0, abs(exact)))
    assert base == pytest.approx(loss.item(), abs=1e-6)


def test_the_estimate_is_unbiased_many_directions_point_along_the_gradient():
    model, (x, y) = linear_problem()
    g = torch.cat([v.reshape(-1) for v in torch.autograd.grad(LOSS(model(x), y), list(model.parameters()))])
    scalars, _ = directional_derivatives(model, LOSS, (x, y), None, seed=4, num_perturbations=600, sigma=1e-3,
                                         difference="central")
    estimate = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    apply_update_(estimate, None, 4, scalars.tolist(), lr=-1.0)  # += (1/K) sum_k c_k z_k
    est = torch.cat([v.reshape(-1) for v in estimate.values()])
    assert torch.nn.functional.cosine_similarity(est, g, dim=0) > 0.95


def test_zo_steps_alone_train_a_small_model():
    model, (x, y) = linear_problem(n=128)
    first = LOSS(model(x), y).item()
    params = dict(model.named_parameters())
    for step in range(80):
        scalars, _ = directional_derivatives(model, LOSS, (x, y), None, step, 8, 1e-3)
        apply_update_(params, None, step, scalars.tolist(), lr=0.1)
    assert LOSS(model(x), y).item() < 0.6 * first


def test_a_step_builds_no_autograd_graph_and_restores_the_model_flags():
    model, masks = cnn_with_mask()
    model.train()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        directional_derivatives(model, LOSS, (torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))), masks, 1, 3,
                                1e-3, "central", chunk=3)
    assert saved == [] and model.training
    assert all(p.grad is None for p in model.parameters())


def test_forward_passes_per_step():
    assert forwards_per_step(20, "forward") == 21 and forwards_per_step(20, "central") == 40
    with pytest.raises(ValueError, match="allowed: forward, central"):
        forwards_per_step(20, "backward")


def test_a_masked_zo_step_needs_a_fraction_of_a_backprop_step_and_no_model_sized_buffer():
    model, masks = cnn_with_mask()
    batch = (torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,)))
    weights = sum(p.numel() * 4 for p in model.parameters())
    backprop = training_step_memory(model, LOSS, batch, masks=masks).peak
    whole = zo_step_memory(model, LOSS, batch, masks=masks, num_perturbations=2)
    chunked = zo_step_memory(model, LOSS, batch, masks=masks, num_perturbations=2, chunk=1)
    more_k = zo_step_memory(model, LOSS, batch, masks=masks, num_perturbations=6, chunk=1)
    assert whole.peak < 0.7 * backprop and chunked.peak < 0.2 * backprop
    # no copy of the model, no full-size noise vector: the step adds less than half the weights' size,
    # and the same whatever K (but for the K scalars themselves)
    assert chunked.peak_increase < 0.5 * weights and 0 <= more_k.peak - chunked.peak <= 8 * 4


def test_a_step_on_the_sparse_copy_is_the_masked_step_in_a_ninth_of_a_backprop_steps_memory():
    model, masks = cnn_with_mask()
    sparse, rest = sparse_copy(model, masks)
    assert rest == {} and not any(n.endswith("weight") for n, _ in sparse.named_parameters())
    batch = (torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,)))
    dense_c, _ = directional_derivatives(model, LOSS, batch, masks, 7, 4, 1e-3)
    sparse_c, _ = directional_derivatives(sparse, LOSS, batch, rest, 7, 4, 1e-3)
    assert torch.allclose(dense_c, sparse_c, rtol=1e-3, atol=1e-3)
    # the same noise on the same numbers: the update is bit-identical
    apply_update_(dict(model.named_parameters()), masks, 7, dense_c.tolist(), 0.1)
    apply_update_(dict(sparse.named_parameters()), rest, 7, dense_c.tolist(), 0.1)
    stepped = dense_state_dict(sparse)
    assert all(torch.equal(stepped[k], v) for k, v in model.state_dict().items())
    backprop = training_step_memory(model, LOSS, batch, masks=masks).peak
    dense_zo = zo_step_memory(model, LOSS, batch, masks=masks, num_perturbations=4, chunk=4).peak
    sparse_zo = zo_step_memory(sparse, LOSS, batch, masks=rest, num_perturbations=4, chunk=4).peak
    assert sparse_zo <= backprop / 9 < dense_zo
