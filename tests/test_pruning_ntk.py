"""pruning.ntk: NTK-SAP scores (against the closed form on a linear model), their data-free
properties, and the iterative mask on the exponential schedule."""

import pytest
import torch
from torch import nn

from fedprune.models import build_model
from pruning.masks import prunable_names
from pruning.ntk import iterative_masks, ntk_scores
from pruning.schedules import exponential_densities
from pruning.selection import keep_count


def test_scores_match_the_closed_form_of_a_linear_model():
    """f(x) = W x: the gap is eps^2 ||(delta*m) x||^2, so d/dm_ij = 2 eps^2 sum_s [(delta*m) x_s]_i delta_ij x_sj."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3, bias=False)
    mask = torch.rand(3, 5) < 0.6
    x = torch.randn(7, 5)
    eps = 0.1
    scores = ntk_scores(model, ["weight"], [x], {"weight": mask}, epsilon=eps,
                        generator=torch.Generator().manual_seed(4), resample_weights=False)
    delta = torch.randn((3, 5), generator=torch.Generator().manual_seed(4))  # the only draw
    out = x @ (delta * mask).T  # (7, 3)
    expected = (2 * eps**2 * torch.einsum("si,ij,sj->ij", out, delta, x)).abs() * mask
    assert torch.allclose(scores["weight"], expected, rtol=1e-4, atol=1e-9)
    assert not scores["weight"][~mask].any()


def test_scoring_changes_nothing_of_the_model_nor_the_global_rng():
    torch.manual_seed(1)
    model = build_model("cnn-bn", 1, 10, 28).train()
    model.features[1].running_mean.fill_(0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = [torch.randn(4, 1, 28, 28)] * 2
    torch.manual_seed(9)
    expected_next = torch.rand(2)
    torch.manual_seed(9)
    names = prunable_names(model)
    scores = ntk_scores(model, names, inputs, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.rand(2), expected_next)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.training and all(p.grad is None for p in model.parameters())
    assert set(scores) == set(names) and all(s.shape == state[n].shape and (s >= 0).all() for n, s in scores.items())


def test_with_resampled_weights_the_score_is_a_property_of_the_architecture_not_of_its_weights():
    torch.manual_seed(2)
    a, b = build_model("cnn", 1, 10, 28), build_model("cnn", 1, 10, 28)
    names = prunable_names(a)
    x = [torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))]

    def score(model, resample):
        return ntk_scores(model, names, x, generator=torch.Generator().manual_seed(3), resample_weights=resample)

    same, differ = score(a, True), score(b, True)
    assert all(torch.equal(same[n], differ[n]) for n in names)
    fixed_a, fixed_b = score(a, False), score(b, False)
    assert not torch.equal(fixed_a[names[0]], fixed_b[names[0]])


def test_iterative_masks_follow_the_exponential_schedule_and_never_regrow():
    shapes = {"a": (10, 20), "b": (50,)}
    seen = []

    def score(masks, j):
        seen.append((j, {n: m.clone() for n, m in masks.items()}))
        return {n: torch.rand(s, generator=torch.Generator().manual_seed(j)) for n, s in shapes.items()}

    final = iterative_masks(shapes, 0.05, 4, score)
    total = sum(torch.Size(s).numel() for s in shapes.values())
    assert [j for j, _ in seen] == [1, 2, 3, 4] and all(m.all() for m in seen[0][1].values())
    densities = [sum(int(m.sum()) for m in masks.values()) / total for _, masks in seen[1:]]
    assert densities == pytest.approx(exponential_densities(0.05, 4)[:3], abs=1 / total)
    assert sum(int(m.sum()) for m in final.values()) == keep_count(0.05, total)
    for (_, before), (_, after) in zip(seen[1:], seen[2:]):
        assert all(not (after[n] & ~before[n]).any() for n in shapes)
    assert all(not (final[n] & ~seen[-1][1][n]).any() for n in shapes)
