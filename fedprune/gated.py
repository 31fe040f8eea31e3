"""Gated models for FedDP (Yu et al.): fedprune/models.py's networks with every convolution of their
feature extractor a :class:`~pruning.gates.GatedConv2d` (per-sample top-k output channels).

* ``gated-cnn``: the small CNN with BatchNorm (``cnn-bn``), both conv layers gated.
* ``gated-resnet20`` / ``gated-resnet32``: the CIFAR ResNets with both convolutions of every basic
  block gated, as the authors' gated ResNet; the stem convolution and the 1x1 projection shortcuts
  stay dense (the authors' shortcuts are parameter-free; ours project, and the residual sum needs a
  dense shortcut).
* ``gated-vgg11``: VGG-11 with BatchNorm, all eight convolutions gated (the authors' gated VGG gates
  every convolution, the first included).

Gate weights are kaiming-normal with bias 1, as the authors' ``GatedConv`` (their ResNet's init loop
later resets the gate biases to 0; we keep 1 everywhere). Every model lists its layers in execution
order (``skipping_layers``) for pruning/skipping.py's inference path; ``keep`` buffers start at
``C_out`` (nothing pruned) until :func:`~pruning.gates.set_keep_ratio` sets them.
"""

from __future__ import annotations

from torch import nn

from fedprune.models import BasicBlock, CifarResNet, SmallCNN, VGG11BN
from pruning.gates import GatedConv2d

GATED_MODELS = ("gated-cnn", "gated-resnet20", "gated-resnet32", "gated-vgg11")


def gate_conv_bn_relu(features: nn.Sequential) -> nn.Sequential:
    """``features`` with every ``Conv2d, BatchNorm2d, ReLU`` run replaced by a :class:`GatedConv2d`
    of the same shape; other layers (pools) stay."""
    layers, mods, i = [], list(features), 0
    while i < len(mods):
        m = mods[i]
        if isinstance(m, nn.Conv2d):
            layers.append(GatedConv2d(m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0]))
            i += 3
        else:
            layers.append(m)
            i += 1
    return nn.Sequential(*layers)


class GatedCNN(SmallCNN):
    """``cnn-bn`` with gated convolutions: [gated conv 32, max-pool, gated conv 64, max-pool], FC 128, classifier."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> None:
        super().__init__(in_channels, num_classes, image_size, batchnorm=True)
        self.features = gate_conv_bn_relu(self.features)

    def skipping_layers(self) -> list[nn.Module]:
        return [*self.features, *self.classifier]


class GatedBlock(nn.Module):
    """A basic block whose two convolutions are gated: ``ReLU(gated2(gated1(x)) + shortcut(x))``."""

    def __init__(self, block: BasicBlock) -> None:
        super().__init__()
        cin, cout, stride = block.conv1.in_channels, block.conv1.out_channels, block.conv1.stride[0]
        self.conv1 = GatedConv2d(cin, cout, stride=stride)
        self.conv2 = GatedConv2d(cout, cout, relu=False)
        self.shortcut = block.shortcut

    def forward(self, x):
        return nn.functional.relu(self.conv2(self.conv1(x)) + self.shortcut(x))

    def skipping_parts(self) -> tuple[list[nn.Module], nn.Module]:
        return [self.conv1, self.conv2], self.shortcut


class GatedResNet(CifarResNet):
    """A CIFAR ResNet (6n+2 layers) whose basic blocks are :class:`GatedBlock`s."""

    def __init__(self, depth: int, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__(depth, in_channels, num_classes)
        self.layer1, self.layer2, self.layer3 = (nn.Sequential(*map(GatedBlock, stage))
                                                 for stage in (self.layer1, self.layer2, self.layer3))

    def skipping_layers(self) -> list[nn.Module]:
        return [self.conv1, self.bn1, self.relu, *self.layer1, *self.layer2, *self.layer3, self.pool,
                nn.Flatten(), self.fc]


class GatedVGG11(VGG11BN):
    """``vgg11-bn`` with every convolution gated (same pools, global average pool, one classifier)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32) -> None:
        super().__init__(in_channels, num_classes, image_size)
        self.features = gate_conv_bn_relu(self.features)

    def skipping_layers(self) -> list[nn.Module]:
        return [*self.features, self.pool, nn.Flatten(), self.classifier]


def build_gated(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """The gated model ``name`` (one of :data:`GATED_MODELS`)."""
    if name == "gated-cnn":
        return GatedCNN(in_channels, num_classes, image_size)
    if name in ("gated-resnet20", "gated-resnet32"):
        return GatedResNet(int(name[12:]), in_channels, num_classes)
    if name == "gated-vgg11":
        return GatedVGG11(in_channels, num_classes, image_size)
    raise ValueError(f"model.name: got {name!r}; gated models: {', '.join(GATED_MODELS)}")
