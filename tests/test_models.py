"""Every model takes 1- and 3-channel inputs of 28x28 and 32x32 pixels and gives class logits."""

import pytest
import torch

from fedprune.experiment import MODELS
from fedprune.models import build_model


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32), (3, 28), (1, 32)])
def test_forward_shapes(name, channels, size):
    model = build_model(name, channels, 10, size)
    out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, 10)


def test_batchnorm_only_where_named():
    has_bn = lambda m: any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())  # noqa: E731
    assert not has_bn(build_model("cnn", 1, 10, 28))
    assert all(has_bn(build_model(n, 3, 10, 32)) for n in ("cnn-bn", "resnet20", "resnet32", "vgg11-bn"))


def test_resnet_depths_have_the_published_sizes():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # He et al. 2016: ResNet-20 0.27M, ResNet-32 0.46M (ours adds 1x1 projection shortcuts)
    assert 0.26e6 < count(build_model("resnet20", 3, 10, 32)) < 0.29e6
    assert 0.45e6 < count(build_model("resnet32", 3, 10, 32)) < 0.48e6
