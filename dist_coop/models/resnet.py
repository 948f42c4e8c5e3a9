"""Plain ResNet backbones (no knowledge of depth masks or distribution).

Laid out like torchvision's ResNet (``conv1/bn1/layer1..N/fc``, blocks with ``conv1 bn1 conv2
bn2 downsample``) so one adaptive wrapper serves ours and torchvision's.

* CIFAR ResNets (He et al. 2016, sec. 4.2): 3 stages of n BasicBlocks, widths w, 2w, 4w (w = 16),
  depth 6n + 2: ResNet-20/32/56/110 (n = 3/5/9/18). Designed for 32x32 input.
* ResNets for 64x64 input (Tiny ImageNet): ResNet-18/34 stages with a 3x3 stride-1 stem and no
  max-pool, widths w..8w (w = 64).
Every net takes ``in_channels`` and ``num_classes`` and any input size (global average pool).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class BasicBlock(nn.Module):
    """relu(shortcut(x) + bn2(conv2(relu(bn1(conv1(x))))))."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, C, H / stride, W / stride)
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Stem, stages ``layer1..layerN`` of BasicBlocks, global pool, linear head."""

    def __init__(
        self,
        blocks_per_stage: Sequence[int],
        widths: Sequence[int],
        *,
        in_channels: int = 3,
        num_classes: int = 10,
        head_norm: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.stage_names = tuple(f"layer{i + 1}" for i in range(len(blocks_per_stage)))
        in_planes = widths[0]
        for i, (n, planes) in enumerate(zip(blocks_per_stage, widths)):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(in_planes, planes, stride)] + [BasicBlock(planes, planes) for _ in range(n - 1)]
            setattr(self, self.stage_names[i], nn.Sequential(*blocks))
            in_planes = planes
        self.avgpool: nn.Module = nn.AdaptiveAvgPool2d(1)
        if head_norm:  # normalise the pooled features the classifier sees (B, C, 1, 1)
            self.avgpool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(in_planes))
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def stem(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, widths[0], H, W)
        return self.relu(self.bn1(self.conv1(x)))

    def head(self, x: Tensor) -> Tensor:  # (B, C_last, H', W') -> (B, num_classes)
        return self.fc(self.avgpool(x).flatten(1))

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, num_classes)
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.head(x)


def cifar_resnet(
    depth: int, *, width: int = 16, in_channels: int = 3, num_classes: int = 10, head_norm: bool = False
) -> ResNet:
    if (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
    n = (depth - 2) // 6
    widths = [width, 2 * width, 4 * width]
    return ResNet([n, n, n], widths, in_channels=in_channels, num_classes=num_classes, head_norm=head_norm)


def resnet64(
    blocks_per_stage: Sequence[int],
    *,
    width: int = 64,
    in_channels: int = 3,
    num_classes: int = 200,
    head_norm: bool = False,
) -> ResNet:
    widths = [width, 2 * width, 4 * width, 8 * width]
    return ResNet(blocks_per_stage, widths, in_channels=in_channels, num_classes=num_classes, head_norm=head_norm)
