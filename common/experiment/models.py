"""Models used by the FedTAN experiments.

- CIFAR-style ResNet (He et al. 2016, section 4.2) with option-A shortcuts, the network of the
  FedTAN reference (ResNet-20: widths 16/32/64, 19 BatchNorm2d layers, ~0.27M parameters).
- ``SmallCNN``: a tiny network with both BatchNorm2d and BatchNorm1d layers, for tests and quick
  runs (FedTAN must handle both kinds of BN layer).

Every model takes a ``norm`` knob so that the same architecture can be run with BatchNorm (the
FedTAN case), GroupNorm (the usual federated workaround, Hsieh et al. 2020) or no normalization.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("batch", "group", "none")
RESNET_DEPTHS = (20, 32, 44, 56)
MODEL_NAMES = tuple(f"resnet{d}" for d in RESNET_DEPTHS) + ("small_cnn",)


def _check_norm(norm: str, num_groups: int, widths: tuple[int, ...]) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")
    if norm == "group":
        bad = [w for w in widths if num_groups < 1 or w % num_groups != 0]
        if bad:
            raise ValueError(
                f"num_groups={num_groups} must be >= 1 and divide every channel width; "
                f"it does not divide {bad}"
            )


def make_norm(norm: str, num_features: int, *, num_groups: int = 2, dims: int = 2) -> nn.Module:
    """Normalization layer for ``num_features`` channels: BatchNorm{dims}d, GroupNorm or Identity.

    ``dims`` only matters for BatchNorm (1 for (N, C) inputs, 2 for (N, C, H, W)); GroupNorm
    accepts both shapes.
    """
    if norm == "batch":
        return nn.BatchNorm1d(num_features) if dims == 1 else nn.BatchNorm2d(num_features)
    if norm == "group":
        return nn.GroupNorm(num_groups, num_features)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")


def _kaiming_init(module: nn.Module) -> None:
    # He et al. initialize convolutions (and, in the common CIFAR ResNet code, the classifier)
    # with Kaiming-normal weights; norm layers keep PyTorch's weight=1, bias=0.
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ShortcutA(nn.Module):
    """Option-A shortcut: subsample spatially by 2 and zero-pad the new channels.

    It has no parameters, so ResNet-20 keeps exactly the parameter count of the paper.
    """

    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        extra = out_planes - in_planes
        if extra < 0:
            raise ValueError("option-A shortcut can only add channels")
        # Split the padding over both sides, as in the original code (planes // 4 each side).
        self.pad_front = extra // 2
        self.pad_back = extra - self.pad_front

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ::2 gives ceil(H / 2) rows, the same as a 3x3 stride-2 conv with padding 1.
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))


class BasicBlock(nn.Module):
    """Two 3x3 conv-norm layers with an identity (or option-A) shortcut."""

    def __init__(
        self, in_planes: int, planes: int, stride: int, *, norm: str, num_groups: int
    ) -> None:
        super().__init__()
        # Without a norm layer nothing provides a per-channel shift, so give the convs a bias.
        bias = norm == "none"
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=bias)
        self.bn1 = make_norm(norm, planes, num_groups=num_groups)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=bias)
        self.bn2 = make_norm(norm, planes, num_groups=num_groups)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = ShortcutA(in_planes, planes)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images (He et al. 2016, section 4.2), option-A shortcuts."""

    widths = (16, 32, 64)

    def __init__(
        self,
        depth: int = 20,
        *,
        in_channels: int = 3,
        num_classes: int = 10,
        norm: str = "batch",
        num_groups: int = 2,
    ) -> None:
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise ValueError(
                f"unsupported ResNet depth {depth}; valid depths (6n+2): "
                f"{', '.join(map(str, RESNET_DEPTHS))}"
            )
        _check_norm(norm, num_groups, self.widths)
        n = (depth - 2) // 6
        bias = norm == "none"
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=bias)
        self.bn1 = make_norm(norm, 16, num_groups=num_groups)
        layers = []
        in_planes = 16
        for stage, planes in enumerate(self.widths):
            blocks = []
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(
                    BasicBlock(in_planes, planes, stride, norm=norm, num_groups=num_groups)
                )
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        # Adaptive pooling makes the head independent of the input size (32x32 CIFAR, 8x8 digits).
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(torch.flatten(self.pool(out), 1))


class SmallCNN(nn.Module):
    """conv-norm-ReLU x2, flatten, Linear, norm(1d), ReLU, Linear.

    Small and fast, yet it has both BatchNorm2d and BatchNorm1d layers.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        num_classes: int = 10,
        norm: str = "batch",
        num_groups: int = 2,
        width: int = 16,
        hidden: int = 64,
    ) -> None:
        super().__init__()
        _check_norm(norm, num_groups, (width, 2 * width, hidden))
        bias = norm == "none"
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=bias)
        self.bn1 = make_norm(norm, width, num_groups=num_groups)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=bias)
        self.bn2 = make_norm(norm, 2 * width, num_groups=num_groups)
        # Pool to a fixed 4x4 grid so the Linear layer has the same size for 8x8 and 32x32 input
        # (a lazy layer would leave the parameters uninitialized until the first batch).
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc1 = nn.Linear(2 * width * 16, hidden, bias=bias)
        self.bn3 = make_norm(norm, hidden, num_groups=num_groups, dims=1)
        self.fc2 = nn.Linear(hidden, num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = torch.flatten(self.pool(out), 1)
        out = F.relu(self.bn3(self.fc1(out)))
        return self.fc2(out)


def build_model(
    name: str,
    *,
    in_channels: int,
    num_classes: int,
    norm: str = "batch",
    num_groups: int = 2,
) -> nn.Module:
    """Build a model by name: "resnet20", "resnet32", "resnet44", "resnet56" or "small_cnn"."""
    if name == "small_cnn":
        return SmallCNN(
            in_channels=in_channels, num_classes=num_classes, norm=norm, num_groups=num_groups
        )
    if name.startswith("resnet") and name[len("resnet") :].isdigit():
        depth = int(name[len("resnet") :])
        if depth in RESNET_DEPTHS:
            return CifarResNet(
                depth,
                in_channels=in_channels,
                num_classes=num_classes,
                norm=norm,
                num_groups=num_groups,
            )
    raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODEL_NAMES)}")
