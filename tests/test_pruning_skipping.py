"""Channel gates (pruning/gates.py), the gated models (fedprune/gated.py) and the inference that
skips the channels they zero (pruning/skipping.py): same outputs, fewer counted FLOPs, less time."""

import statistics
import time

import pytest
import torch
from torch import nn

from fedprune.gated import GATED_MODELS, build_gated
from fedprune.models import MaxPool2x2, build_model
from pruning.accounting import count_flops
from pruning.gates import GatedConv2d, keep_counts, set_keep_ratio, winners
from pruning import skipping
from pruning.skipping import export

SHAPE = (1, 28, 28)


def trained_stats(name: str, ratio: float, seed: int = 0) -> nn.Module:
    """A gated model with non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = set_keep_ratio(build_gated(name, 1, 10, 28), ratio)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, *SHAPE))
    return model.eval()


def test_winners_keeps_the_k_largest_entries_of_each_row_and_only_they_get_gradients():
    s = torch.tensor([[0.125, 0.875, 0.5, 0.25], [2.0, 0.0, 1.0, 3.0]], requires_grad=True)
    out = winners(s, 2)
    assert out.tolist() == [[0.0, 0.875, 0.5, 0.0], [2.0, 0.0, 0.0, 3.0]]
    out.sum().backward()
    assert s.grad.tolist() == [[0, 1, 1, 0], [1, 0, 0, 1]]
    assert winners(s, 4) is s


def test_a_gated_off_channel_gets_no_gradient_from_a_sample():
    torch.manual_seed(0)
    layer = GatedConv2d(3, 8)
    layer.keep.fill_(3)
    x = torch.randn(1, 3, 6, 6)  # one sample: BatchNorm's batch statistics couple nothing
    layer(x).square().sum().backward()
    kept = torch.zeros(8, dtype=torch.bool)
    kept[layer.saliency(x)[0].topk(3).indices] = True
    grad = layer.conv.weight.grad.flatten(1).abs().sum(1)
    assert (grad[~kept] == 0).all() and (grad[kept] > 0).all()


def test_in_a_batch_a_channel_no_sample_keeps_gets_no_gradient():
    torch.manual_seed(1)
    layer = GatedConv2d(4, 6)
    layer.keep.fill_(2)
    with torch.no_grad():  # channels 0 and 1 win for every sample
        layer.gate.weight.zero_()
        layer.gate.bias.copy_(torch.tensor([5.0, 4.0, 1.0, 1.0, 1.0, 1.0]))
    layer(torch.randn(8, 4, 5, 5)).sum().backward()
    grad = layer.conv.weight.grad.flatten(1).abs().sum(1)
    assert (grad[2:] == 0).all() and (grad[:2] > 0).all()


def test_keep_ratio_sets_round_r_times_channels_and_travels_in_the_state_dict():
    model = set_keep_ratio(build_gated("gated-cnn", 1, 10, 28), 0.3)
    assert keep_counts(model) == {"features.0.keep": 10, "features.2.keep": 19}
    assert set_keep_ratio(build_gated("gated-cnn", 1, 10, 28), 0.001).features[0].k == 1
    fresh = build_gated("gated-cnn", 1, 10, 28)
    assert keep_counts(fresh) == {"features.0.keep": 32, "features.2.keep": 64}
    fresh.load_state_dict(model.state_dict())
    assert keep_counts(fresh) == keep_counts(model)
    with pytest.raises(ValueError, match="keep ratio"):
        set_keep_ratio(model, 0.0)


@pytest.mark.parametrize("name", GATED_MODELS)
def test_gated_models_gate_their_convolutions_and_keep_the_base_models_other_layers(name):
    model = build_gated(name, 1, 10, 28)
    base = build_model(name.replace("gated-", "").replace("cnn", "cnn-bn").replace("vgg11", "vgg11-bn"), 1, 10, 28)
    gated_convs = {n for n, m in model.named_modules() if isinstance(m, GatedConv2d)}
    convs = [n for n, m in base.named_modules() if isinstance(m, nn.Conv2d)]
    # every conv is gated except a ResNet's stem and its 1x1 projection shortcuts
    assert len(gated_convs) == len([c for c in convs if c != "conv1" and "shortcut" not in c])
    assert model(torch.randn(2, *SHAPE)).shape == (2, 10)


@pytest.mark.parametrize("name, ratio, batch", [
    *[("gated-cnn", r, b) for r in (1.0, 0.5, 0.25) for b in (1, 4)],
    ("gated-resnet20", 0.5, 1), ("gated-resnet20", 0.5, 4),
    ("gated-vgg11", 0.5, 4),  # 3x3 and 1x1 maps: convolved over the batch's union of channels
])
def test_skipping_and_dense_inference_give_the_gated_models_output(name, ratio, batch):
    model = trained_stats(name, ratio)
    x = torch.randn(batch, *SHAPE)
    with torch.no_grad():
        reference = model(x)
    for skip in (False, True):
        assert torch.allclose(export(model, skip)(x), reference, atol=1e-4, rtol=1e-4), (skip, name)


@pytest.mark.parametrize("small_slices, gather_cost", [(2**62, 0), (0, 10**9)])  # per sample / over the union
def test_a_batch_gives_the_gated_models_output_convolved_per_sample_or_over_the_union(monkeypatch, small_slices,
                                                                                     gather_cost):
    monkeypatch.setattr(skipping, "SMALL_SLICES_BYTES", small_slices)
    monkeypatch.setattr(skipping, "GATHER_COST", gather_cost)
    for name in ("gated-cnn", "gated-resnet20"):
        model = trained_stats(name, 0.5)
        x = torch.randn(6, *SHAPE)
        with torch.no_grad():
            assert torch.allclose(export(model, skip=True)(x), model(x), atol=1e-4, rtol=1e-4), name


def test_counted_inference_flops_fall_with_r_and_halve_at_r_one_half():
    x, model = torch.randn(1, *SHAPE), trained_stats("gated-cnn", 1.0)
    dense = count_flops(export(model, skip=False), x).effective
    flops = [count_flops(export(set_keep_ratio(model, r), skip=True), x).effective for r in (1.0, 0.75, 0.5, 0.25)]
    assert flops[0] == dense and all(a > b for a, b in zip(flops, flops[1:]))
    assert flops[2] <= 0.5 * dense


def test_flops_are_counted_on_the_path_that_runs_batch_by_batch():
    model = trained_stats("gated-cnn", 0.5)
    per_sample = count_flops(export(model, skip=True), torch.randn(1, *SHAPE)).effective
    batch = count_flops(export(model, skip=True), torch.randn(8, *SHAPE)).effective
    assert batch == pytest.approx(8 * per_sample)


def test_skipping_runs_in_less_cpu_time_at_batch_64():
    torch.set_num_threads(1)
    model = trained_stats("gated-cnn", 0.25)
    x = torch.randn(64, *SHAPE)
    paths = {"dense": export(model, skip=False), "skip": export(model, skip=True)}
    times = {k: [] for k in paths}
    for _ in range(5):
        for k, net in paths.items():
            start = time.thread_time()
            net(x)
            times[k].append(time.thread_time() - start)
    assert statistics.median(times["skip"]) < 0.7 * statistics.median(times["dense"]), times


@pytest.mark.parametrize("size", [(8, 8), (7, 9)])
def test_the_models_max_pool_equals_torchs_with_and_without_autograd(size):
    x = torch.randn(2, 3, *size)
    assert torch.equal(MaxPool2x2()(x), nn.MaxPool2d(2)(x))  # the strided-view path
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = MaxPool2x2()(ours)
    assert torch.equal(out, nn.MaxPool2d(2)(theirs))
    out.sum().backward()
    nn.MaxPool2d(2)(theirs).sum().backward()
    assert torch.equal(ours.grad, theirs.grad)


def test_export_needs_a_gated_model_in_eval_mode():
    with pytest.raises(ValueError, match="eval mode"):
        export(build_gated("gated-cnn", 1, 10, 28).train())
    with pytest.raises(TypeError, match="skipping_layers"):
        export(build_model("cnn", 1, 10, 28).eval())


def test_the_export_is_a_snapshot():
    model = trained_stats("gated-cnn", 0.5)
    net = export(model)
    x = torch.randn(2, *SHAPE)
    before = net(x)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2)
    assert torch.equal(net(x), before)
