"""Masks: which parameters are prunable, applying masks, gradient and optimizer-state masking."""

import pytest
import torch
from torch import nn

from pruning.masks import (
    apply_masks,
    check_masks,
    density,
    full_masks,
    layer_density,
    mask_gradients,
    mask_optimizer_state,
    prunable_names,
)
from pruning.scores import magnitude_scores
from pruning.selection import global_topk


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 6 * 6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3),
    )


def test_prunable_names_defaults_and_options():
    net = tiny_net()
    assert prunable_names(net) == ["0.weight", "3.weight", "7.weight", "10.weight"]
    assert prunable_names(net, include_first=False, include_last=False) == ["3.weight", "7.weight"]
    assert prunable_names(net, include_bias=True, include_first=False) == [
        "3.weight", "3.bias", "7.weight", "7.bias", "10.weight", "10.bias"]
    everything = prunable_names(net, include_bias=True, include_norm=True)
    assert everything == [n for n, _ in net.named_parameters()]


def test_prunable_names_skips_absent_bias_and_nested_names():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1, bias=False)
            self.bn = nn.BatchNorm2d(3)
            self.scale = nn.Parameter(torch.ones(1))  # free parameter: never prunable

    net = nn.Sequential(Block(), Block())
    names = prunable_names(net, include_bias=True, include_norm=True, include_first=False)
    assert names == ["0.bn.weight", "0.bn.bias", "1.conv.weight", "1.bn.weight", "1.bn.bias"]


def test_apply_masks_zeroes_to_positive_zero():
    net = tiny_net()
    masks = global_topk(magnitude_scores(net, prunable_names(net)), 0.3)
    apply_masks(net, masks)
    params = dict(net.named_parameters())
    for name, mask in masks.items():
        pruned = params[name].detach()[~mask]
        assert torch.equal(pruned.view(torch.int32), torch.zeros_like(pruned).view(torch.int32))
        assert bool((params[name].detach()[mask] != 0).all())


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
])
def test_masked_gradients_keep_pruned_weights_zero_under_momentum(make_opt):
    net = tiny_net()
    masks = global_topk(magnitude_scores(net, prunable_names(net)), 0.2)
    apply_masks(net, masks)
    opt = make_opt(net.parameters())
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        mask_gradients(net, masks)
        for name, p in net.named_parameters():
            if name in masks:
                assert bool((p.grad[~masks[name]] == 0).all())
        opt.step()
        params = dict(net.named_parameters())
        for name, mask in masks.items():
            assert bool((params[name].detach()[~mask] == 0).all()), name
    assert bool((params["3.weight"].detach()[masks["3.weight"]] != 0).any())


def test_changed_mask_needs_optimizer_state_masking():
    net = tiny_net()
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(2):  # build dense moments
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    masks = global_topk(magnitude_scores(net, prunable_names(net)), 0.3)
    apply_masks(net, masks)

    def step():
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        mask_gradients(net, masks)
        opt.step()
        return max(float(p.detach()[~masks[n]].abs().max()) for n, p in net.named_parameters()
                   if n in masks)

    assert step() > 0  # stale Adam moments move pruned weights
    apply_masks(net, masks)
    mask_optimizer_state(opt, net, masks)
    assert step() == 0.0


def test_check_masks_errors():
    net = tiny_net()
    good = full_masks(net)
    check_masks(net, good)
    check_masks(net.state_dict(), good)
    with pytest.raises(ValueError, match="unknown parameter 'nope'"):
        check_masks(net, {"nope": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        check_masks(net, {"0.weight": torch.ones(4, 1, 3, 1, dtype=torch.bool)})
    with pytest.raises(ValueError, match="torch.bool"):
        check_masks(net, {"0.weight": torch.ones(4, 1, 3, 3)})
    with pytest.raises(ValueError, match="torch.bool"):
        apply_masks(net, {"0.weight": [[True]]})
    with pytest.raises(TypeError):
        check_masks([1, 2], good)
    with pytest.raises(ValueError, match="unknown"):
        full_masks(net, ["0.weight", "missing"])


def test_full_masks_and_density():
    net = tiny_net()
    masks = full_masks(net)
    assert list(masks) == prunable_names(net)
    assert density(masks) == 1.0
    masks["0.weight"][:2] = False  # 18 of 36 dropped
    total = sum(m.numel() for m in masks.values())
    assert density(masks) == pytest.approx((total - 18) / total)
    assert layer_density(masks)["0.weight"] == 0.5
    assert layer_density(masks)["3.weight"] == 1.0
    with pytest.raises(ValueError):
        density({})
