"""FedTiny's pure building blocks: candidate pools, top-K gradients in bounded memory, prune-and-grow,
layer schedules and training with a sparse state."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from fedprune.models import build_model
from pruning.accounting import training_step_memory
from pruning.candidates import candidate_masks, noisy_keep_counts
from pruning.masks import apply_masks, mask_gradients, prunable_names
from pruning.prune_grow import adjust_counts, blocks, layers_to_adjust, mean_sparse, prune_and_grow, topk_at_pruned
from pruning.selection import layerwise_topk
from pruning.sparse_training import SparseConv2d, SparseLinear, dense_state_dict, sparse_layers, sparsify

CNN_NAMES = ["features.4.weight", "classifier.1.weight", "classifier.3.weight"]


def cnn_bn(seed=0):
    torch.manual_seed(seed)
    return build_model("cnn-bn", 1, 10, 28)


def magnitude_masks(model, density):
    return layerwise_topk({n: p.detach().abs() for n, p in model.named_parameters() if n in CNN_NAMES}, density)


# ------------------------------------------------------------------ candidate pool

@pytest.mark.parametrize("density", [0.05, 0.01, 0.003])
def test_candidates_have_noisy_layer_densities_and_a_global_density_within_2_percent(density):
    numels = {"conv": 18432, "fc1": 401408, "fc2": 1280}
    rng = np.random.default_rng(0)
    draws = [noisy_keep_counts(numels, density, 0.5, rng) for _ in range(20)]
    for kept in draws:
        assert abs(sum(kept.values()) / sum(numels.values()) - density) <= 0.02 * density
        assert all(1 <= kept[k] <= numels[k] for k in numels)
    conv = [kept["conv"] / numels["conv"] / density for kept in draws]
    assert max(conv) > 1.2 and min(conv) < 0.8  # the small layers move over the +-50% range


def test_the_candidate_pool_is_reproducible_and_each_keeps_the_largest_weights_per_layer():
    model = cnn_bn()
    scores = {n: p.detach().abs() for n, p in model.named_parameters() if n in CNN_NAMES}
    pool = candidate_masks(scores, 0.05, 4, np.random.default_rng(3))
    again = candidate_masks(scores, 0.05, 4, np.random.default_rng(3))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(pool, again) for k in CNN_NAMES)
    assert len({tuple(int(m[k].sum()) for k in CNN_NAMES) for m in pool}) == 4
    for masks in pool:
        for k in CNN_NAMES:
            kept, pruned = scores[k][masks[k]], scores[k][~masks[k]]
            assert kept.min() >= pruned.max()


def test_an_impossible_target_is_refused():
    with pytest.raises(ValueError, match="no noisy densities"):
        noisy_keep_counts({"a": 10, "b": 10}, 0.01, 0.5, np.random.default_rng(0))  # >= 1 kept each: 0.1


# ------------------------------------------------------------------ schedules

def test_blocks_put_a_top_level_classifier_with_the_last_stage():
    names = prunable_names(build_model("resnet20", 3, 10, 32), include_first=False)
    groups = blocks(names)
    assert [g[0].split(".")[0] for g in groups] == ["layer1", "layer2", "layer3"]
    assert groups[-1][-1] == "fc.weight" and sum(len(g) for g in groups) == len(names)
    assert blocks(CNN_NAMES) == [["features.4.weight"], ["classifier.1.weight", "classifier.3.weight"]]


def test_adjustments_fall_every_delta_rounds_until_t_end_on_the_granularitys_layers():
    entire = [r for r in range(1, 13) if layers_to_adjust(r, CNN_NAMES, "entire", 3, 9)]
    assert entire == [3, 6, 9]
    block = [layers_to_adjust(r, CNN_NAMES, "block", 2, 8) for r in (2, 4, 6)]
    assert block == [CNN_NAMES[1:], CNN_NAMES[:1], CNN_NAMES[1:]]  # deepest block first, cycled
    layer = [layers_to_adjust(r, CNN_NAMES, "layer", 5, 4) for r in range(1, 6)]
    assert layer == [[CNN_NAMES[2]], [CNN_NAMES[1]], [CNN_NAMES[0]], [CNN_NAMES[2]], []]
    assert adjust_counts({"a": 100, "b": 7}, 0.1) == {"a": 10, "b": 1}
    assert adjust_counts({"a": 100}, 0.0) == {"a": 0}


# ------------------------------------------------------------------ top-K, averaging, prune and grow

def brute_topk(grad, kept, n):
    g = grad.reshape(-1).clone()
    pruned = torch.ones_like(g, dtype=torch.bool)
    pruned[kept] = False
    idx = pruned.nonzero().squeeze(1)
    top = idx[torch.argsort(g[idx].abs(), descending=True, stable=True)[:n]]
    return torch.sort(top).values


@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_streamed_topk_equals_the_dense_topk_at_pruned_positions(chunk):
    gen = torch.Generator().manual_seed(1)
    grad = torch.randn(50, 20, generator=gen)
    kept = torch.sort(torch.randperm(1000, generator=gen)[:300]).values
    starts = list(range(0, 1000, chunk))[::-1]  # any chunk order
    index, values = topk_at_pruned(((s, grad.reshape(-1)[s:s + chunk]) for s in starts), kept, 25)
    assert torch.equal(index, brute_topk(grad, kept, 25))
    assert torch.equal(values, grad.reshape(-1)[index])
    few, _ = topk_at_pruned([(0, grad.reshape(-1))], torch.arange(995), 25)
    assert few.tolist() == [995, 996, 997, 998, 999]


def test_streamed_topk_holds_order_n_plus_one_chunk_not_the_gradient():
    from torch.profiler import ProfilerActivity, profile

    numel, chunk, n = 1 << 21, 1 << 15, 64
    kept = torch.arange(0, numel, 64)  # the mask's kept positions: the node holds them anyway

    def chunks():
        gen = torch.Generator().manual_seed(0)
        for s in range(0, numel, chunk):
            yield s, torch.randn(chunk, generator=gen)

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        topk_at_pruned(chunks(), kept, n)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    assert peak < 24 * chunk * 4 < numel * 4 / 2  # a few chunk-sized temporaries, not the 8 MiB gradient


def test_mean_sparse_counts_a_missing_entry_as_zero_and_weights_by_examples():
    index, mean = mean_sparse([(np.array([1, 5]), np.array([2.0, 4.0]), 1),
                               (np.array([5, 9]), np.array([1.0, -3.0]), 3)])
    assert index.tolist() == [1, 5, 9]
    assert mean.tolist() == pytest.approx([2.0 / 4, (4.0 + 3.0) / 4, -9.0 / 4])


def test_prune_and_grow_swaps_the_smallest_weights_for_the_largest_gradients_at_constant_density():
    weight = np.array([0.0, 0.5, -0.1, 0.0, 0.3, 0.0, -0.2, 0.0], np.float32)
    mask = weight != 0
    new = prune_and_grow(weight, mask, np.array([0, 3, 5, 7]), np.array([0.1, -0.9, 0.0, 0.9]), 2)
    assert new.sum() == mask.sum()
    assert new.tolist() == [False, True, False, True, True, False, False, True]  # -0.1, -0.2 out; 3, 7 in
    capped = prune_and_grow(weight, mask, np.array([0, 5]), np.array([0.3, 0.0]), 3)
    assert capped.sum() == mask.sum() and capped[0] and not capped[2]  # one non-zero gradient: one swap
    with pytest.raises(ValueError, match="pruned positions"):
        prune_and_grow(weight, mask, np.array([1]), np.array([1.0]), 1)


# ------------------------------------------------------------------ sparse training state

@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_sparse_training_follows_masked_dense_training(optimizer):
    model = cnn_bn()
    masks = magnitude_masks(model, 0.05)
    apply_masks(model, masks)
    sparse = sparsify(copy.deepcopy(model), masks)
    assert {type(m) for _, m in sparse_layers(sparse)} == {SparseConv2d, SparseLinear}
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-4),
            "adam": lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-4)}[optimizer]
    opt_dense, opt_sparse = make(model.parameters()), make(sparse.parameters())
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        x, y = torch.randn(16, 1, 28, 28, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        for net, opt in ((model, opt_dense), (sparse, opt_sparse)):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            if net is model:
                mask_gradients(model, masks)
            opt.step()
        apply_masks(model, masks)
    dense, ours = model.state_dict(), dense_state_dict(sparse)
    assert ours.keys() == dense.keys()
    for k in dense:
        assert torch.allclose(ours[k].float(), dense[k].float(), atol=1e-5), k
    for name, layer in sparse_layers(sparse):
        assert not ours[name][~masks[name]].any()
        assert layer.values.grad.numel() == int(masks[name].sum())
        assert all(v.numel() in (1, int(masks[name].sum())) for v in opt_sparse.state[layer.values].values())


def test_measured_training_memory_falls_with_density_under_a_sparse_state():
    model, batch = cnn_bn(), (torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,)))
    adam = lambda p: torch.optim.Adam(p, lr=1e-3)  # noqa: E731
    dense = training_step_memory(model, nn.functional.cross_entropy, batch, optimizer_factory=adam)
    reports = {}
    for d in (0.05, 0.01):
        masked = copy.deepcopy(model)
        masks = magnitude_masks(masked, d)
        reports[d] = training_step_memory(sparsify(masked, masks), nn.functional.cross_entropy, batch,
                                          optimizer_factory=adam)
        masked_dense = training_step_memory(model, nn.functional.cross_entropy, batch, optimizer_factory=adam,
                                            masks=masks)
        assert masked_dense.peak == dense.peak  # masking alone keeps every dense tensor
    state = {d: r.weights + r.grads + r.optimizer_state for d, r in reports.items()}
    dense_state = dense.weights + dense.grads + dense.optimizer_state
    assert state[0.05] < 0.1 * dense_state and state[0.01] < state[0.05]
    # the dense weights and gradients are gone from the peak (the fresh optimizer's state is allocated
    # after the activations are freed, so it is not part of either peak)
    assert reports[0.01].peak < reports[0.05].peak < dense.peak - 0.8 * (dense.weights + dense.grads)


@pytest.mark.parametrize("layer_name", ["features.4.weight", "classifier.1.weight"])
def test_a_sparse_layer_collects_the_topk_gradient_at_pruned_positions_of_its_batch(layer_name):
    model = cnn_bn()
    masks = magnitude_masks(model, 0.05)
    apply_masks(model, masks)
    sparse = sparsify(copy.deepcopy(model), masks)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    nn.functional.cross_entropy(model(x), y).backward()  # the dense gradient, everywhere
    layer = dict(sparse_layers(sparse))[layer_name]
    layer.topk = 40
    nn.functional.cross_entropy(sparse(x), y).backward()
    index, values = layer.topk_result
    grad = dict(model.named_parameters())[layer_name].grad
    kept = masks[layer_name].reshape(-1).nonzero().squeeze(1)
    assert torch.equal(index, brute_topk(grad, kept, 40))
    assert torch.allclose(values, grad.reshape(-1)[index], atol=1e-6)


def test_sparsify_refuses_masks_that_are_not_conv_or_linear_weights():
    with pytest.raises(ValueError, match="not the weight"):
        sparsify(cnn_bn(), {"features.1.weight": torch.ones(32, dtype=torch.bool)})
