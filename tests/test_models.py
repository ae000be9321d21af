"""Specification of common/experiment/models.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.experiment.models import MODEL_NAMES, CifarResNet, ShortcutA, build_model


def count(model: nn.Module, kind: type[nn.Module]) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_resnet20_matches_the_paper() -> None:
    model = build_model("resnet20", in_channels=3, num_classes=10)
    # 1 stem conv + 3 stages x 3 blocks x 2 convs, each followed by BN: 19 BN layers.
    assert count(model, nn.BatchNorm2d) == 19
    assert count(model, nn.Conv2d) == 19
    # He et al. report 0.27M parameters; option-A shortcuts add none.
    assert num_params(model) == 269_722


def test_deeper_resnets_have_6n_plus_2_layers() -> None:
    model = build_model("resnet32", in_channels=3, num_classes=10)
    assert count(model, nn.BatchNorm2d) == 31
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("depth", [18, 21, 110])
def test_unsupported_depth_is_refused(depth: int) -> None:
    with pytest.raises(ValueError, match="depth"):
        CifarResNet(depth)


def test_unknown_model_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError) as info:
        build_model("resnet18", in_channels=3, num_classes=10)
    for name in MODEL_NAMES:
        assert name in str(info.value)


def test_unknown_norm_is_refused() -> None:
    with pytest.raises(ValueError, match="norm"):
        build_model("resnet20", in_channels=3, num_classes=10, norm="layer")


@pytest.mark.parametrize("name", ["resnet20", "small_cnn"])
def test_group_norm_replaces_every_batch_norm(name: str) -> None:
    model = build_model(name, in_channels=3, num_classes=10, norm="group")
    assert count(model, nn.modules.batchnorm._BatchNorm) == 0
    groups = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(groups) == (19 if name == "resnet20" else 3)
    assert all(g.num_groups == 2 for g in groups)  # Hsieh et al. 2020's choice


def test_group_count_is_configurable_and_checked() -> None:
    model = build_model("resnet20", in_channels=3, num_classes=10, norm="group", num_groups=4)
    assert {m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)} == {4}
    # Refused up front, with a message that says what is wrong (3 does not divide 16).
    with pytest.raises(ValueError, match="num_groups=3 must .* divide every channel width"):
        build_model("resnet20", in_channels=3, num_classes=10, norm="group", num_groups=3)


@pytest.mark.parametrize("name", ["resnet20", "small_cnn"])
def test_no_norm_has_no_normalization_layer(name: str) -> None:
    model = build_model(name, in_channels=3, num_classes=10, norm="none")
    assert count(model, nn.modules.batchnorm._BatchNorm) == 0
    assert count(model, nn.GroupNorm) == 0
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize(("shape", "classes"), [((3, 32, 32), 10), ((1, 8, 8), 7)])
def test_forward_shapes_for_cifar_and_digits_inputs(
    name: str, shape: tuple[int, int, int], classes: int
) -> None:
    model = build_model(name, in_channels=shape[0], num_classes=classes)
    assert model(torch.randn(4, *shape)).shape == (4, classes)


def test_option_a_shortcut_subsamples_and_zero_pads_without_parameters() -> None:
    model = build_model("resnet20", in_channels=3, num_classes=10)
    shortcuts = [m for m in model.modules() if isinstance(m, ShortcutA)]
    assert len(shortcuts) == 2  # entering stage 2 (16->32) and stage 3 (32->64)
    assert all(num_params(s) == 0 for s in shortcuts)

    x = torch.randn(2, 16, 8, 8)
    y = ShortcutA(16, 32)(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, :8]) == 0 and torch.count_nonzero(y[:, 24:]) == 0


def test_small_cnn_has_both_kinds_of_batch_norm() -> None:
    model = build_model("small_cnn", in_channels=1, num_classes=10)
    assert count(model, nn.BatchNorm2d) == 2
    assert count(model, nn.BatchNorm1d) == 1


def test_kaiming_init_and_default_affine_parameters() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", in_channels=3, num_classes=10)
    conv = model.layer3[0].conv1
    fan_in = conv.weight[0].numel()
    # kaiming_normal_ (fan_in, ReLU gain): std = sqrt(2 / fan_in).
    assert conv.weight.std().item() == pytest.approx((2 / fan_in) ** 0.5, rel=0.1)
    bn = model.layer3[0].bn1
    assert torch.equal(bn.weight, torch.ones_like(bn.weight))
    assert torch.equal(bn.bias, torch.zeros_like(bn.bias))
