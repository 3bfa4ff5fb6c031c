"""Models: torchvision ResNets for ImageNet-sized inputs, CIFAR-style ResNets for 28-32 px inputs.

Every model ends in global average pooling + one linear layer named `fc`, after a last stage named
`layer<N>`, so Grad-CAM takes its closed form (no backward) and harvest mode works.
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for small images: a 3x3 stem (no max-pool), stages `layer1..layerN`, GAP, `fc`."""

    def __init__(self, widths: tuple[int, ...], blocks: tuple[int, ...], num_classes: int, in_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        channels = widths[0]
        for stage, (width, count) in enumerate(zip(widths, blocks, strict=True), start=1):
            stride = 1 if stage == 1 else 2
            layers = [BasicBlock(channels if i == 0 else width, width, stride if i == 0 else 1) for i in range(count)]
            self.add_module(f"layer{stage}", nn.Sequential(*layers))
            channels = width
        self.stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))  # (B, w0, H, W)
        for stage in range(1, self.stages + 1):
            x = getattr(self, f"layer{stage}")(x)  # last: (B, wN, H / 2^(N-1), W / 2^(N-1))
        return self.fc(torch.flatten(self.avgpool(x), 1))  # (B, classes)


# The CIFAR-style nets: (channels per stage, blocks per stage). Their last stage is `layer<N>`, 7x7 at 28 px.
CIFAR_NETS = {
    "small-resnet": ((16, 32, 64), (1, 1, 1)),  # ResNet-8: the fast default for <= 32 px data
    "resnet20": ((16, 32, 64), (3, 3, 3)),  # He et al. 2016's CIFAR ResNet-20 (Random Erasing's F-MNIST model)
    "resnet18-cifar": ((64, 128, 256, 512), (2, 2, 2, 2)),  # the Cutout paper's CIFAR ResNet-18
}
TORCHVISION_NETS = ("resnet18", "resnet34", "resnet50")
MODELS = (*CIFAR_NETS, *TORCHVISION_NETS)


def min_image_size(name: str) -> int:
    """The smallest input side whose last stage is still a 2 x 2 map (Grad-CAM needs a spatial map): each stage
    after the first halves the side (CIFAR-style nets); torchvision's ResNets reduce it 32-fold."""
    if name in CIFAR_NETS:
        return 2 ** len(CIFAR_NETS[name][0])
    return 64


def cifar_resnet(name: str, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> CifarResNet:
    """A CIFAR-style net by name, every stage's channels multiplied by `width` (rounded, at least 1)."""
    widths, blocks = CIFAR_NETS[name]
    return CifarResNet(tuple(max(1, round(w * width)) for w in widths), blocks, num_classes, in_channels)


def small_resnet(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return cifar_resnet("small-resnet", num_classes, in_channels)


def resnet18_cifar(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return cifar_resnet("resnet18-cifar", num_classes, in_channels)


def build_model(name: str, num_classes: int, in_channels: int, width: float = 1.0) -> nn.Module:
    """A model by name; ImageNet-sized torchvision ResNets take a 1-channel stem when the data is grayscale."""
    if name in CIFAR_NETS:
        return cifar_resnet(name, num_classes, in_channels, width)
    if name in TORCHVISION_NETS:
        if width != 1.0:
            raise ValueError(f"width multiplier {width} applies to the CIFAR-style nets only, not {name!r}")
        import torchvision

        model = getattr(torchvision.models, name)(num_classes=num_classes)
        if in_channels != 3:
            model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        return model
    raise ValueError(f"unknown model {name!r}")
