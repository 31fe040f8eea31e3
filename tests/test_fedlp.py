"""FedLP without training: the authors' CNN, its depth levels, the draws, the communication model
against the paper's table (seeds.md 3.3), and the experiment keys."""

import numpy as np
import pytest
import torch

from fedprune.experiment import ExperimentError, load_experiment
from fedprune.fedlp import (
    draw_level,
    hetero_params_per_client_round,
    homo_params_per_client_round,
    kept_keys,
    level_shared_params,
    preference_probs,
    shared_keys,
    units,
)
from fedprune.models import FedLPCNN, build_model

# The paper's README table (CIFAR-10, EnhancedCNNCifar): parameters exchanged per client and round, in k.
PAPER_HOMO_K = {0.1: 606.61, 0.3: 716.91, 0.5: 827.20, 0.7: 937.49}
PAPER_HETERO_K = {1: 169.60, 3: 225.28, None: 318.66, 5: 710.80}  # None: Hetero(u), uniform levels


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_the_authors_cnn_has_551466_parameters_and_the_published_level_sizes():
    model = build_model("fedlp-cnn", 3, 10, 32)
    assert n_params(model) == 551_466
    assert [name for name, _ in model.named_children() if "fc" in name] == ["global_fc1", "global_fc2"]
    assert level_shared_params() == {1: 10_272, 2: 28_896, 3: 65_952, 4: 140_064, 5: 551_466}


@pytest.mark.parametrize("channels, size", [(3, 32), (1, 28)])
def test_every_level_runs_and_shares_a_prefix_of_the_global_state(channels, size):
    global_keys = list(FedLPCNN(channels, 10, size, 5).state_dict())
    for level in range(1, 6):
        model = FedLPCNN(channels, 10, size, level)
        assert model(torch.randn(2, channels, size, size)).shape == (2, 10)
        shared = shared_keys(model)
        assert shared == global_keys[: len(shared)]
        convs = {k.split(".")[0] for k in shared if k.startswith("conv")}
        assert convs == {f"conv{i}" for i in range(1, level + 2)} or level == 5
        private = set(model.state_dict()) - set(shared)
        assert (level == 5) == (not private) and all(k.startswith("private_fc") for k in private)


@pytest.mark.parametrize("p", sorted(PAPER_HOMO_K))
def test_homo_communication_model_reproduces_the_paper(p):
    model = FedLPCNN(3, 10, 32)
    count = homo_params_per_client_round(model, p)
    assert count == pytest.approx(551_466 * (1 + p))
    assert abs(count / 1e3 - PAPER_HOMO_K[p]) <= 0.01


@pytest.mark.parametrize("flag", [1, 3, None, 5])
def test_hetero_communication_model_reproduces_the_paper(flag):
    count = hetero_params_per_client_round(level_shared_params(), preference_probs(flag))
    assert abs(count / 1e3 - PAPER_HETERO_K[flag]) <= 0.01


def test_buffers_are_counted_only_when_asked():
    model = FedLPCNN(3, 10, 32)
    with_buffers = homo_params_per_client_round(model, 0.0, include_buffers=True)
    assert with_buffers - 551_466 == 2 * (32 + 32 + 64 + 64 + 128 + 128) + 6
    assert level_shared_params(include_buffers=True)[1] == 10_272 + 2 * 64 + 2


def test_preference_distributions():
    assert preference_probs(2) == pytest.approx((0.1, 0.6, 0.1, 0.1, 0.1))
    assert preference_probs(None) == pytest.approx((0.2,) * 5)
    assert preference_probs(5, 0.8) == pytest.approx((0.05, 0.05, 0.05, 0.05, 0.8))
    with pytest.raises(ValueError, match="preferred_level"):
        preference_probs(6)


def test_levels_are_fixed_per_partition_and_follow_the_preference():
    probs = preference_probs(1)
    levels = [draw_level(3, pid, probs) for pid in range(3000)]
    assert levels[:50] == [draw_level(3, pid, probs) for pid in range(50)]
    assert levels != [draw_level(4, pid, probs) for pid in range(3000)]
    share = np.bincount(levels, minlength=6)[1:] / len(levels)
    assert share == pytest.approx(probs, abs=0.03)


def test_keep_draws_are_reproducible_and_keep_a_share_p():
    keys = list(FedLPCNN().state_dict())
    a = kept_keys(1, 3, 7, keys, 0.3)
    assert a == kept_keys(1, 3, 7, keys, 0.3) and a != kept_keys(1, 4, 7, keys, 0.3)
    shares = [len(kept_keys(1, r, pid, keys, 0.3)) / len(keys) for r in range(40) for pid in range(20)]
    assert np.mean(shares) == pytest.approx(0.3, abs=0.01)
    assert kept_keys(1, 1, 1, keys, 1.0) == keys


def test_module_units_keep_a_layer_with_all_its_entries():
    keys = list(FedLPCNN().state_dict())
    groups = units(keys, "module")
    assert ["bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked"] in groups
    assert len(groups) == 14 and sum(map(len, groups)) == len(keys)
    for r in range(20):
        kept = set(kept_keys(0, r, 0, keys, 0.5, "module"))
        assert all(set(g) <= kept or not set(g) & kept for g in groups)


def test_fedlp_experiment_keys_are_validated(tmp_path):
    hetero = load_experiment("configs/fedlp-hetero.yaml", {"fedlp.preferred_level": 3})
    assert hetero.fedlp.preferred_level == 3 and hetero.model.name == "fedlp-cnn"
    assert hetero.fedlp.keep_head is False  # the authors' code restarts private heads every round
    with pytest.raises(ExperimentError, match="fedlp.keep_head"):
        load_experiment("configs/fedlp-hetero.yaml", {"fedlp.keep_head": "yes"})
    homo = load_experiment("configs/fedlp-homo.yaml")
    assert homo.fedlp.unit == "tensor" and homo.fedlp.weighted is True
    with pytest.raises(ExperimentError, match="fedlp.preferred_level"):
        load_experiment("configs/fedlp-hetero.yaml", {"fedlp.preferred_level": 6})
    with pytest.raises(ExperimentError, match="fedlp.unit"):
        load_experiment("configs/fedlp-homo.yaml", {"fedlp.unit": "block"})
    with pytest.raises(ExperimentError, match="fedlp.p"):
        load_experiment("configs/fedlp-homo.yaml", {"fedlp.p": 0.0})
    with pytest.raises(ExperimentError, match="model.name.*fedlp-cnn"):
        load_experiment("configs/fedlp-hetero.yaml", {"model.name": "cnn"})
    assert load_experiment("configs/fedlp-homo.yaml", {"model.name": "cnn-bn"}).method == "fedlp-homo"
