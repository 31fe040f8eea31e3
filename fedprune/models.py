"""Models, chosen by name; each takes 1- or 3-channel inputs of 28x28 or 32x32 pixels.

* ``cnn`` / ``cnn-bn``: a small CNN for 28x28 inputs (two 3x3 conv layers of 32 and 64 channels,
  each followed by 2x2 max-pooling, then FC 128 and the classifier), without or with BatchNorm.
* ``resnet20`` / ``resnet32``: CIFAR-style ResNets (He et al. 2016, 3 stages of 16/32/64 channels,
  3n+3n+3n basic blocks) with BatchNorm; shortcuts that change shape are 1x1 conv + BN (option B).
* ``vgg11-bn``: VGG-11 with BatchNorm (configuration A), global average pooling and one linear
  classifier, the usual CIFAR variant; a max-pool is skipped once the feature map is 1x1, so
  28x28 inputs work too.
* ``fedlp-cnn``: FedLP's CIFAR CNN (Zhu et al. 2023, ``EnhancedCNNCifar`` in the authors' code):
  six 3x3 conv layers of 32, 32, 64, 64, 128, 128 channels, each followed by ReLU and then
  BatchNorm, a 2x2 max-pool after conv 2, 4 and 6, then FC 128 and the classifier (no ReLU between
  the two FC layers, as in the authors' code); 551,466 parameters on 3x32x32 inputs (the flatten
  size adapts to 28x28). :class:`FedLPCNN` also builds FedLP-Hetero's shallower sub-models.
"""

from __future__ import annotations

import torch
from torch import nn


class MaxPool2x2(nn.MaxPool2d):
    """``nn.MaxPool2d(2)`` with a faster path where no gradient is needed (evaluation, forward-only
    ZO training): there the maximum of four strided views, the same values faster than torch's
    CPU kernel on N x C x H x W tensors; with autograd, torch's kernel, whose backward is the faster
    one (``python -m benchmarks.cpu_paths`` measures both)."""

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return super().forward(x)
        h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
        top = torch.maximum(x[..., 0:h:2, 0:w:2], x[..., 0:h:2, 1:w:2])
        return torch.maximum(top, torch.maximum(x[..., 1:h:2, 0:w:2], x[..., 1:h:2, 1:w:2]))


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 batchnorm: bool = False) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=not batchnorm)]
            if batchnorm:
                layers.append(nn.BatchNorm2d(cout))
            return layers + [nn.ReLU(inplace=True), MaxPool2x2()]

        self.features = nn.Sequential(*block(in_channels, 32), *block(32, 64))
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * side * side, 128), nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"resnet depth: got {depth}; allowed: 6n+2 (20, 32, 44, 56, ...)")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        stages, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11BN(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin, side = in_channels, image_size
        for item in VGG11:
            if item == "M":
                if side >= 2:
                    layers.append(MaxPool2x2())
                    side //= 2
                continue
            layers += [nn.Conv2d(cin, item, 3, padding=1, bias=False), nn.BatchNorm2d(item),
                       nn.ReLU(inplace=True)]
            cin = item
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


FEDLP_CHANNELS = (32, 32, 64, 64, 128, 128)
FEDLP_LEVELS = (1, 2, 3, 4, 5)
PRIVATE_PREFIX = "private_"
"""State-dict keys of a FedLP sub-model's private head start with this; they never leave a client."""


class FedLPCNN(nn.Module):
    """FedLP's CNN at a depth level (``CNNCifarComplexity`` in the authors' code).

    Level ``c`` in 1..4 is the shared trunk ``conv1..conv{c+1}`` (+ their BatchNorm) followed by a
    private head: a max-pool where the trunk ends between pools (levels 2 and 4), then FC 128 and
    the classifier (``private_fc1``, ``private_fc2``). Level 5 is the full global model: all six
    conv layers and the global head ``global_fc1``, ``global_fc2``, all shared. Shared keys are
    named as in the level-5 model, so a sub-model's shared entries are a subset of the global
    state dict; private keys start with ``private_``.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, level: int = 5) -> None:
        super().__init__()
        if level not in FEDLP_LEVELS:
            raise ValueError(f"fedlp-cnn level: got {level!r}; allowed: 1..5")
        self.level = level
        self.num_convs = level + 1
        cin = in_channels
        for i, cout in enumerate(FEDLP_CHANNELS[: self.num_convs], start=1):
            setattr(self, f"conv{i}", nn.Conv2d(cin, cout, 3, padding=1))
            setattr(self, f"bn{i}", nn.BatchNorm2d(cout))
            cin = cout
        self.pool = MaxPool2x2()
        # pools after conv 2, 4, 6; a trunk ending after conv 3 or 5 gets one more pool in its head
        pools = (self.num_convs + 1) // 2
        side = image_size // 2 ** pools
        flat = cin * side * side
        if level == 5:
            self.global_fc1 = nn.Linear(flat, 128)
            self.global_fc2 = nn.Linear(128, num_classes)
        else:
            self.private_fc1 = nn.Linear(flat, 128)
            self.private_fc2 = nn.Linear(128, num_classes)

    def forward(self, x):
        for i in range(1, self.num_convs + 1):
            x = getattr(self, f"bn{i}")(nn.functional.relu(getattr(self, f"conv{i}")(x)))
            if i % 2 == 0:
                x = self.pool(x)
        if self.num_convs % 2:
            x = self.pool(x)
        x = x.flatten(1)
        if self.level == 5:
            return self.global_fc2(self.global_fc1(x))
        return self.private_fc2(self.private_fc1(x))


def build_model(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    if name.startswith("gated-"):  # FedDP's gated variants (fedprune/gated.py) derive from the models above
        from fedprune.gated import build_gated

        return build_gated(name, in_channels, num_classes, image_size)
    if name in ("cnn", "cnn-bn"):
        return SmallCNN(in_channels, num_classes, image_size, batchnorm=name == "cnn-bn")
    if name in ("resnet20", "resnet32"):
        return CifarResNet(int(name[6:]), in_channels, num_classes)
    if name == "vgg11-bn":
        return VGG11BN(in_channels, num_classes, image_size)
    if name == "fedlp-cnn":
        return FedLPCNN(in_channels, num_classes, image_size)
    raise ValueError(f"model.name: got {name!r}; allowed: cnn, cnn-bn, resnet20, resnet32, vgg11-bn, fedlp-cnn")
