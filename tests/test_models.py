"""Tests for :mod:`advtrain.models`: registry, normalisation, YOPO split and architectures."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import advtrain.models as models
from advtrain.models import (
    Classifier,
    MadryLeNet,
    PreActResNet18,
    SmallCNN,
    WideResNet,
    create_model,
    list_models,
    register_model,
)
from advtrain.models import registry as registry_module
from advtrain.models.preact_resnet import PreActBlock
from advtrain.models.wide_resnet import WideBasicBlock

BUILTIN_NAMES = {"preact_resnet18", "wide_resnet", "wrn28_10", "wrn34_10", "wrn28_4", "small_cnn", "madry_lenet"}
ALL_NAMES = list_models()
BATCH = 2


# The generic WideResNet defaults to WRN-28-10, which wrn28_10 already covers; a small configuration keeps
# the file fast while still exercising the class through its registered name.
TEST_KWARGS = {"wide_resnet": {"depth": 16, "widen_factor": 2}}


@functools.cache
def default_model(name: str) -> Classifier:
    """One eval-mode model per name, shared by tests that do not modify it (the WRNs are slow to build)."""
    torch.manual_seed(0)
    return create_model(name, **TEST_KWARGS.get(name, {})).eval()


def input_for(model: Classifier, batch: int = BATCH, seed: int = 0) -> torch.Tensor:
    """A batch in [0, 1] of the size the model expects (32x32 for size-agnostic models)."""
    side = model.input_size or 32
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, model.in_channels, side, side, generator=generator)


def channel_stats(channels: int) -> tuple[list[float], list[float]]:
    """Distinct, non-trivial per-channel mean and std."""
    mean = torch.linspace(0.2, 0.6, channels).tolist()
    std = torch.linspace(0.15, 0.35, channels).tolist()
    return mean, std


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- registry ---------------------------------------------------------------------------------------


def test_builtin_models_registered_and_sorted():
    assert BUILTIN_NAMES <= set(ALL_NAMES)
    assert ALL_NAMES == sorted(ALL_NAMES)
    assert len(ALL_NAMES) == len(set(ALL_NAMES))


def test_package_exports():
    for name in ("Classifier", "register_model", "create_model", "list_models"):
        assert name in models.__all__
    for cls in (PreActResNet18, WideResNet, SmallCNN, MadryLeNet):
        assert issubclass(cls, Classifier)


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("preact_resnet18", PreActResNet18),
        ("wide_resnet", WideResNet),
        ("wrn28_10", WideResNet),
        ("wrn34_10", WideResNet),
        ("wrn28_4", WideResNet),
        ("small_cnn", SmallCNN),
        ("madry_lenet", MadryLeNet),
    ],
)
def test_names_build_the_right_class(name, cls):
    assert type(default_model(name)) is cls


@pytest.mark.parametrize(("name", "depth", "widen"), [("wrn28_10", 28, 10), ("wrn34_10", 34, 10), ("wrn28_4", 28, 4)])
def test_wrn_aliases_fix_depth_and_width(name, depth, widen):
    model = default_model(name)
    assert (model.depth, model.widen_factor) == (depth, widen)
    assert model.block3[0].conv1.out_channels == 64 * widen


def test_unknown_model_name_lists_registered_names():
    with pytest.raises(ValueError) as excinfo:
        create_model("resnet9000")
    message = str(excinfo.value)
    assert "resnet9000" in message
    assert ", ".join(list_models()) in message


@pytest.mark.parametrize("name", ALL_NAMES)
def test_unknown_kwarg_names_model_key_and_accepted_keys(name):
    with pytest.raises(TypeError) as excinfo:
        create_model(name, num_clases=10)
    message = str(excinfo.value)
    assert name in message
    assert "num_clases" in message
    for accepted in ("num_classes", "in_channels", "mean", "std"):
        assert accepted in message


def test_alias_rejects_the_arguments_it_fixes():
    with pytest.raises(TypeError, match="depth"):
        create_model("wrn34_10", depth=28)


def test_kwargs_are_forwarded():
    model = create_model("small_cnn", num_classes=7, in_channels=3, input_size=32, width=8, hidden=16, dropout=0.1)
    assert model.num_classes == 7
    assert model.in_channels == 3
    assert model.input_size == 32
    assert model.first[0].out_channels == 8
    assert model.classifier[2].p == pytest.approx(0.1)


def test_duplicate_registration_raises_and_keeps_the_original():
    with pytest.raises(ValueError, match="small_cnn"):

        @register_model("small_cnn")
        class Impostor(SmallCNN):
            pass

    assert type(create_model("small_cnn")) is SmallCNN


def test_register_new_model_and_factory(monkeypatch):
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))

    @register_model("tiny_test_cnn")
    def tiny(*, num_classes: int = 3) -> SmallCNN:
        return SmallCNN(num_classes=num_classes, width=2, hidden=4)

    @register_model("not_a_classifier")
    def bad() -> nn.Module:
        return nn.Linear(2, 2)

    assert "tiny_test_cnn" in list_models()
    assert list_models() == sorted(list_models())
    assert create_model("tiny_test_cnn", num_classes=5).num_classes == 5
    with pytest.raises(TypeError, match="not_a_classifier"):
        create_model("not_a_classifier")
    with pytest.raises(ValueError):
        register_model("tiny_test_cnn")(tiny)


@pytest.mark.parametrize("bad_name", ["", None, 3])
def test_register_model_rejects_bad_names(bad_name):
    with pytest.raises(ValueError):
        register_model(bad_name)


# --- shapes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_NAMES)
def test_output_shape(name):
    model = default_model(name)
    with torch.no_grad():
        logits = model(input_for(model))
    assert logits.shape == (BATCH, 10)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ALL_NAMES)
def test_num_classes_and_in_channels(name):
    torch.manual_seed(0)
    in_channels = 1 if default_model(name).in_channels == 3 else 3
    model = create_model(name, num_classes=7, in_channels=in_channels, **TEST_KWARGS.get(name, {})).eval()
    x = input_for(model)
    assert x.shape[1] == in_channels
    with torch.no_grad():
        assert model(x).shape == (BATCH, 7)


def test_default_in_channels():
    for name in ("preact_resnet18", "wide_resnet", "wrn28_10", "wrn34_10", "wrn28_4"):
        assert default_model(name).in_channels == 3
    for name in ("small_cnn", "madry_lenet"):
        assert default_model(name).in_channels == 1
        assert default_model(name).input_size == 28


@pytest.mark.parametrize("side", [28, 32])
def test_preact_resnet18_any_input_size(side):
    model = default_model("preact_resnet18")
    with torch.no_grad():
        assert model(torch.rand(BATCH, 3, side, side)).shape == (BATCH, 10)


@pytest.mark.parametrize("name", ["small_cnn", "madry_lenet"])
def test_mnist_nets_on_32x32_and_wrong_size(name):
    torch.manual_seed(0)
    model = create_model(name, in_channels=3, input_size=32).eval()
    with torch.no_grad():
        assert model(torch.rand(BATCH, 3, 32, 32)).shape == (BATCH, 10)
        with pytest.raises(ValueError, match="input_size"):
            model(torch.rand(BATCH, 3, 28, 28))


@pytest.mark.parametrize(("name", "too_small"), [("small_cnn", 15), ("madry_lenet", 3)])
def test_mnist_nets_reject_tiny_input_size(name, too_small):
    with pytest.raises(ValueError, match="input_size"):
        create_model(name, input_size=too_small)


@pytest.mark.parametrize("depth", [27, 29, 4, 0])
def test_wide_resnet_rejects_bad_depth(depth):
    with pytest.raises(ValueError, match="6n"):
        create_model("wide_resnet", depth=depth, widen_factor=1)


def test_wide_resnet_small_config_and_dropout():
    torch.manual_seed(0)
    model = create_model("wide_resnet", depth=10, widen_factor=1, dropout=0.3)
    assert len(model.block1) == len(model.block2) == len(model.block3) == 1
    # k = 1 keeps 16 channels in the first group: identity shortcut, no projection.
    assert model.block1[0].shortcut is None
    assert model.block2[0].shortcut is not None
    x = torch.rand(4, 3, 32, 32)
    model.train()
    assert not torch.equal(model(x), model(x))  # dropout active in training
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    with pytest.raises(ValueError, match="dropout"):
        create_model("wide_resnet", depth=10, widen_factor=1, dropout=1.0)


def _randomise_batch_norm(module: nn.Module) -> None:
    """Non-trivial running statistics and affine parameters, so that skipping a BN would show."""
    generator = torch.Generator().manual_seed(1)
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            size = bn.num_features
            bn.running_mean.copy_(torch.randn(size, generator=generator))
            bn.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            with torch.no_grad():
                bn.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                bn.bias.copy_(torch.randn(size, generator=generator))


@pytest.mark.parametrize("block_cls", [PreActBlock, WideBasicBlock])
@pytest.mark.parametrize(("in_planes", "planes", "stride"), [(8, 8, 1), (8, 16, 2), (8, 16, 1)])
def test_pre_activation_block_matches_he_et_al(block_cls, in_planes, planes, stride):
    # Full pre-activation (He et al. 2016): the identity path carries x itself, a projection
    # shortcut reads the pre-activated input relu(bn1(x)).
    torch.manual_seed(0)
    if block_cls is WideBasicBlock:
        block = block_cls(in_planes, planes, stride, dropout=0.0)
    else:
        block = block_cls(in_planes, planes, stride)
    _randomise_batch_norm(block)
    block.eval()
    x = torch.randn(2, in_planes, 8, 8)
    with torch.no_grad():
        pre = F.relu(block.bn1(x))
        residual = block.conv2(F.relu(block.bn2(block.conv1(pre))))
        if in_planes == planes and stride == 1:
            assert block.shortcut is None
            expected = residual + x
        else:
            assert block.shortcut.kernel_size == (1, 1) and block.shortcut.stride == (stride, stride)
            expected = residual + block.shortcut(pre)
        torch.testing.assert_close(block(x), expected)


# --- parameter counts -------------------------------------------------------------------------------


def test_preact_resnet18_parameter_count():
    # Stem 1,728; stages 147,968 + 525,184 + 2,098,944 + 8,392,192; final BN 1,024; linear 5,130.
    assert n_params(default_model("preact_resnet18")) == 11_172_170


@pytest.mark.parametrize(("name", "expected"), [("wrn28_10", 36.48e6), ("wrn34_10", 46.16e6)])
def test_wrn_parameter_counts(name, expected):
    assert n_params(default_model(name)) == pytest.approx(expected, rel=0.01)


def test_wide_resnet_defaults_to_wrn28_10():
    model = create_model("wide_resnet")
    assert (model.depth, model.widen_factor) == (28, 10)
    assert n_params(model) == 36_479_194


def test_wrn_exact_parameter_counts():
    # Counts of the official WRN code (Zagoruyko and Komodakis 2016).
    assert n_params(default_model("wrn28_10")) == 36_479_194
    assert n_params(default_model("wrn34_10")) == 46_160_474


def test_small_cnn_parameter_count():
    # Published Carlini-Wagner MNIST model.
    assert n_params(default_model("small_cnn")) == 312_202
    # Cheap variant, from the layer list: 4 convs, FC(16*4*4 -> 32), FC(32 -> 32), FC(32 -> 10).
    w, hidden = 8, 32
    expected = (
        (1 * w * 9 + w)
        + (w * w * 9 + w)
        + (w * 2 * w * 9 + 2 * w)
        + (2 * w * 2 * w * 9 + 2 * w)
        + (2 * w * 4 * 4 * hidden + hidden)
        + (hidden * hidden + hidden)
        + (hidden * 10 + 10)
    )
    assert n_params(create_model("small_cnn", width=w, hidden=hidden)) == expected


def test_madry_lenet_parameter_count():
    # Madry et al. 2018 MNIST challenge model.
    assert n_params(default_model("madry_lenet")) == 3_274_634


# --- normalisation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_NAMES)
def test_normalisation_is_applied_inside_the_model(name):
    plain = default_model(name)
    mean, std = channel_stats(plain.in_channels)
    state = plain.state_dict()
    state["mean"] = torch.tensor(mean).view(1, -1, 1, 1)
    state["std"] = torch.tensor(std).view(1, -1, 1, 1)
    normalised = copy.deepcopy(plain)
    normalised.load_state_dict(state)

    x = input_for(plain, batch=1)
    shifted = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    with torch.no_grad():
        expected = plain(shifted)
        got = normalised(x)
        unnormalised = plain(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # The statistics must matter, or the comparison above proves nothing.
    assert not torch.allclose(got, unnormalised, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_mean_std_constructor_args_set_buffers(name):
    in_channels = default_model(name).in_channels
    mean, std = channel_stats(in_channels)
    # Validation happens before any layer is built, so a bad call is cheap; a good one builds the model.
    with pytest.raises(ValueError, match="mean"):
        create_model(name, mean=mean + [0.5], std=std)
    model = create_model(name, mean=mean, std=std, **TEST_KWARGS.get(name, {}))
    state = model.state_dict()
    assert state["mean"].shape == state["std"].shape == (1, in_channels, 1, 1)
    torch.testing.assert_close(state["mean"].flatten(), torch.tensor(mean))
    torch.testing.assert_close(state["std"].flatten(), torch.tensor(std))


@pytest.mark.parametrize("name", ALL_NAMES)
def test_identity_normalisation_by_default(name):
    model = default_model(name)
    assert torch.equal(model.mean, torch.zeros(1, model.in_channels, 1, 1))
    assert torch.equal(model.std, torch.ones(1, model.in_channels, 1, 1))
    x = input_for(model)
    torch.testing.assert_close(model.normalize(x), x)


BAD_STATS = {
    "mean_too_long": (lambda c: ([0.5] * (c + 1), None), "mean"),
    "std_too_long": (lambda c: (None, [0.5] * (c + 2)), "std"),
    "std_zero": (lambda c: ([0.5] * c, [0.5] * (c - 1) + [0.0]), "std"),
    "std_negative": (lambda c: (None, [-0.5] * c), "std"),
    "mean_nan": (lambda c: ([float("nan")] * c, None), "mean"),
}


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("case", sorted(BAD_STATS))
def test_bad_mean_std_raise(name, case):
    make_stats, match = BAD_STATS[case]
    mean, std = make_stats(default_model(name).in_channels)
    with pytest.raises(ValueError, match=match):
        create_model(name, mean=mean, std=std)


def test_scalar_or_string_mean_rejected():
    with pytest.raises(ValueError, match="mean"):
        Classifier(num_classes=10, in_channels=1, mean=0.5)
    with pytest.raises(ValueError, match="mean"):
        Classifier(num_classes=10, in_channels=1, mean="0")


@pytest.mark.parametrize("name", ALL_NAMES)
def test_state_dict_contains_and_restores_mean_std(name):
    model = default_model(name)
    state = model.state_dict()
    assert "mean" in state and "std" in state
    assert state["mean"].shape == (1, model.in_channels, 1, 1)
    mean, std = channel_stats(model.in_channels)
    state["mean"] = torch.tensor(mean).view(1, -1, 1, 1)
    state["std"] = torch.tensor(std).view(1, -1, 1, 1)
    restored = copy.deepcopy(model)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.mean.flatten(), torch.tensor(mean))
    torch.testing.assert_close(restored.std.flatten(), torch.tensor(std))
    # Normalisation statistics are part of the model: a checkpoint without them must not load silently.
    del state["mean"]
    with pytest.raises(RuntimeError, match="mean"):
        restored.load_state_dict(state)


# --- YOPO split -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_NAMES)
def test_forward_equals_rest_of_layer_one(name):
    model = default_model(name)
    x = input_for(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.rest(model.layer_one(x)))


@pytest.mark.parametrize("name", ALL_NAMES)
def test_layer_one_parameters_are_exactly_the_first_layer(name):
    model = default_model(name)
    params = list(model.parameters())
    layer_one = model.layer_one_parameters()
    assert layer_one
    assert {id(p) for p in layer_one} == {id(p) for p in model.first.parameters()}
    assert {id(p) for p in layer_one}.isdisjoint(id(p) for p in model.rest_parameters())
    assert len(layer_one) + len(model.rest_parameters()) == len(params)

    x = input_for(model, batch=1)
    # Layer one depends on exactly its parameters...
    h = model.layer_one(x)
    grads = torch.autograd.grad(h.square().sum(), params, allow_unused=True)
    used = {id(p) for p, g in zip(params, grads, strict=True) if g is not None}
    assert used == {id(p) for p in layer_one}
    # ...and the remainder never touches them.
    logits = model.rest(h.detach())
    grads = torch.autograd.grad(logits.square().sum(), params, allow_unused=True)
    used = {id(p) for p, g in zip(params, grads, strict=True) if g is not None}
    assert used.isdisjoint(id(p) for p in layer_one)
    assert used == {id(p) for p in model.rest_parameters()}


@pytest.mark.parametrize("name", ALL_NAMES)
def test_layer_one_definition(name):
    model = default_model(name)
    x = input_for(model)
    z = model.normalize(x)
    with torch.no_grad():
        h = model.layer_one(x)
    if isinstance(model, PreActResNet18 | WideResNet):
        # First conv only: no bias, no BN, no ReLU (pre-activation nets normalise inside the blocks).
        (weight,) = model.layer_one_parameters()
        assert weight.shape == ((64 if isinstance(model, PreActResNet18) else 16), model.in_channels, 3, 3)
        torch.testing.assert_close(h, F.conv2d(z, weight, padding=1))
        assert (h < 0).any()
    else:
        # First conv + ReLU.
        weight, bias = model.layer_one_parameters()
        assert weight.shape[1] == model.in_channels
        padding = 2 if isinstance(model, MadryLeNet) else 0
        torch.testing.assert_close(h, F.relu(F.conv2d(z, weight, bias, padding=padding)))
        assert (h == 0).any() and (h > 0).any()


def test_classifier_without_rest_raises():
    class Incomplete(Classifier):
        def __init__(self) -> None:
            super().__init__(num_classes=2, in_channels=1)
            self.first = nn.Identity()

    with pytest.raises(NotImplementedError):
        Incomplete()(torch.rand(1, 1, 4, 4))


def _weighted_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def test_small_cnn_torch_init_is_pytorchs_own_layer_init():
    torch.manual_seed(0)
    model = SmallCNN(init="torch")
    torch.manual_seed(0)  # the same layers, built in the same order, with nothing re-initialised
    fresh = [nn.Conv2d(1, 32, 3), nn.Conv2d(32, 32, 3), nn.Conv2d(32, 64, 3), nn.Conv2d(64, 64, 3),
             nn.Linear(64 * 4 * 4, 200), nn.Linear(200, 200), nn.Linear(200, 10)]  # fmt: skip
    for layer, expected in zip(_weighted_layers(model), fresh, strict=True):
        assert torch.equal(layer.weight, expected.weight) and torch.equal(layer.bias, expected.bias)


def test_small_cnn_he_init_has_he_statistics_and_reference_init_zeroes_the_last_layer():
    torch.manual_seed(0)
    he = SmallCNN(init="he")
    layers = _weighted_layers(he)
    for layer in layers[:-1]:
        fan_in = layer.weight[0].numel()
        if layer.weight.numel() >= 5000:  # enough draws for a 5% check of the standard deviation
            assert layer.weight.std().item() == pytest.approx((2.0 / fan_in) ** 0.5, rel=0.05)
        assert abs(layer.weight.mean().item()) < 0.1 * (2.0 / fan_in) ** 0.5
        assert not layer.bias.any()
    assert not layers[-1].bias.any() and layers[-1].weight.abs().max() <= 1 / 200**0.5  # PyTorch's bound
    torch.manual_seed(0)
    reference = _weighted_layers(SmallCNN(init="reference"))
    torch.manual_seed(0)
    torch_init = _weighted_layers(SmallCNN(init="torch"))
    for layer, same in zip(reference[4:6], torch_init[4:6], strict=True):  # hidden FC layers: PyTorch's default
        assert torch.equal(layer.weight, same.weight) and torch.equal(layer.bias, same.bias)
    for layer, redrawn in zip(reference[:4], torch_init[:4], strict=True):  # convolutions: He, zero bias
        assert not layer.bias.any() and not torch.equal(layer.weight, redrawn.weight)
    assert not reference[-1].weight.any() and not reference[-1].bias.any()
    with pytest.raises(ValueError, match="init must be"):
        SmallCNN(init="xavier")


def test_small_cnn_default_init_is_the_one_named_by_default_init():
    from advtrain.models.small_cnn import DEFAULT_INIT

    torch.manual_seed(0)
    default = _weighted_layers(SmallCNN())
    torch.manual_seed(0)
    named = _weighted_layers(SmallCNN(init=DEFAULT_INIT))
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(default, named, strict=True))


@pytest.mark.parametrize("name", models.list_models())
def test_every_registered_model_states_its_initialisation(name):
    doc = registry_module._REGISTRY[name].__doc__ or ""
    assert "Initialisation" in doc and "reference" in doc, f"{name}: say how it is initialised and after which code"


def test_preact_resnet_torch_init_keeps_pytorchs_default():
    torch.manual_seed(0)
    plain = PreActResNet18(init="torch")
    torch.manual_seed(0)
    he = PreActResNet18()
    convs = [(a, b) for a, b in zip(plain.modules(), he.modules(), strict=True) if isinstance(a, nn.Conv2d)]
    for default, redrawn in convs:
        bound = 1 / default.weight[0].numel() ** 0.5  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert default.weight.abs().max() <= bound and not torch.equal(default.weight, redrawn.weight)
    with pytest.raises(ValueError, match="init must be"):
        PreActResNet18(init="xavier")
