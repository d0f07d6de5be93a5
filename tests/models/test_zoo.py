"""Contract tests for every registered model, plus family-specific checks."""
import copy
import inspect
import typing

import numpy as np
import pytest
import torch
from torch import nn

from kdlab import registry
from kdlab.errors import KdlabError
from kdlab.models import parameter_count, tap_shapes

SEQUENCE_MODELS = {"mlp", "cnn1d", "vit_tiny"}
SEQUENCE_SHAPE = (2, 40)  # two channels, so per-channel statistics are exercised
IMAGE_SHAPE = (3, 32, 32)
HEAVY_MODELS = {"resnet110", "resnet32x4", "mobilenetv2", "wrn_40_2"}  # forward/backward with batch 1
SIMPLE_TYPES = (int, float, str, bool, dict)


def input_shape_for(name: str) -> tuple[int, ...]:
    return SEQUENCE_SHAPE if name in SEQUENCE_MODELS else IMAGE_SHAPE


def build(name: str, *, num_classes: int = 3, input_shape=None, **options) -> nn.Module:
    shape = input_shape or input_shape_for(name)
    channels = shape[0]
    mean = tuple(0.3 + 0.1 * c for c in range(channels))
    std = tuple(0.2 + 0.05 * c for c in range(channels))
    return registry.get("model", name)(input_shape=shape, num_classes=num_classes, mean=mean, std=std, **options)


def is_simple(annotation) -> bool:
    if annotation in SIMPLE_TYPES:
        return True
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is tuple:
        return len(args) == 2 and args[1] is Ellipsis and args[0] in SIMPLE_TYPES
    if origin is typing.Union:
        return type(None) in args and all(a is type(None) or is_simple(a) for a in args)
    return False


MODEL_NAMES = registry.names("model")
# Token models (kdlab.seq; the text encoders) take int64 token ids and are tested in tests/seq and
# tests/models/test_encoder.py; the image-contract tests skip them.
TOKEN_MODELS = {"tinygpt", "hf_causal_lm", "bert_encoder", "minilm", "hf_encoder"}
# The timm/torchvision adapters need an architecture name and the vision extra: tests/models/test_vision_zoo.py.
EXTERNAL_MODELS = {"timm", "torchvision"}
IMAGE_MODELS = [name for name in MODEL_NAMES if name not in TOKEN_MODELS | EXTERNAL_MODELS]


def test_all_families_registered():
    expected = {"mlp", "cnn1d", "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56",
                "resnet110", "resnet8x4", "resnet32x4", "resnet_cifar", "wrn", "wrn_16_1", "wrn_16_2",
                "wrn_40_2", "mobilenetv2", "vit_tiny"}
    assert expected <= set(MODEL_NAMES)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_factory_signature_is_introspectable(name):
    factory = registry.get("model", name)
    assert registry.summary("model", name), "first docstring line is shown by `kdlab list models`"
    hints = typing.get_type_hints(factory)
    params = inspect.signature(factory).parameters
    for reserved in ("input_shape", "num_classes", "mean", "std"):
        assert reserved in params
    for param in params.values():
        assert param.kind is inspect.Parameter.KEYWORD_ONLY, param.name
        assert is_simple(hints[param.name]), f"{param.name}: {hints[param.name]}"
        if param.name not in ("input_shape", "num_classes", "mean", "std"):
            assert param.default is not inspect.Parameter.empty, param.name


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_contract_logits_backward_and_stages(name):
    torch.manual_seed(0)
    model = build(name)
    batch = 1 if name in HEAVY_MODELS else 2
    x = torch.rand(batch, *input_shape_for(name))
    logits = model(x)
    assert logits.shape == (batch, 3)
    assert torch.isfinite(logits).all()
    logits.logsumexp(dim=1).sum().backward()
    for path, parameter in model.named_parameters():
        assert parameter.grad is not None, f"{path} gets no gradient"
        assert torch.isfinite(parameter.grad).all(), path

    stages = model.feature_stages
    assert isinstance(stages, tuple) and stages[-1] == "pool"
    assert isinstance(model.head, nn.Linear)
    shapes = tap_shapes(model, stages, x)
    assert list(shapes) == list(stages), "every feature stage is reached by forward"
    assert shapes["pool"] == (batch, model.head.in_features)
    # The stages are the model's top-level children, in forward order, between normalize and head.
    children = [n for n, _ in model.named_children()]
    assert children == ["normalize", *stages, "head"]


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_normalisation_is_inside_forward(name):
    torch.manual_seed(0)
    model = build(name).eval()
    plain = copy.deepcopy(model)
    plain.normalize.mean.zero_()
    plain.normalize.std.fill_(1.0)
    x = torch.rand(2, *input_shape_for(name))
    mean, std = model.normalize.mean, model.normalize.std
    with torch.no_grad():
        assert torch.allclose(model(x), plain((x - mean) / std), atol=1e-5)
        assert not torch.allclose(model(x), plain(x), atol=1e-3)
    # Persistent buffers: a checkpoint carries the statistics.
    state = model.state_dict()
    assert torch.equal(state["normalize.mean"].flatten(), torch.tensor([0.3, 0.4, 0.5][: x.shape[1]]))
    assert "normalize.std" in state


def test_normalisation_statistics_load_from_state_dict():
    trained = build("resnet8")
    fresh = registry.get("model", "resnet8")(input_shape=IMAGE_SHAPE, num_classes=3, mean=(0.0,), std=(1.0,))
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh.normalize.std, trained.normalize.std)


@pytest.mark.parametrize("name, num_classes, expected", [
    ("resnet20", 10, 0.27e6),   # He et al. 2016 table 6
    ("resnet56", 10, 0.85e6),
    ("resnet110", 10, 1.7e6),
    ("wrn_40_2", 100, 2.2e6),   # CRD (Tian et al. 2020) CIFAR-100 zoo
    ("wrn_16_2", 100, 0.70e6),
    ("resnet8x4", 100, 1.23e6),
    ("resnet32x4", 100, 7.43e6),
])
def test_parameter_counts_match_published(name, num_classes, expected):
    model = build(name, num_classes=num_classes)
    assert parameter_count(model) == pytest.approx(expected, rel=0.1)


def test_mobilenetv2_half_width_matches_crd_student():
    model = build("mobilenetv2", num_classes=100, width_multiplier=0.5)
    assert parameter_count(model) == pytest.approx(0.81e6, rel=0.1)


def test_resnet_cifar_generic_equals_named():
    torch.manual_seed(0)
    named = build("resnet32")
    torch.manual_seed(0)
    generic = build("resnet_cifar", depth=32)
    assert parameter_count(named) == parameter_count(generic)
    assert len(generic.stage2) == 5
    wide = build("resnet_cifar", depth=8, width_multiplier=4, stem_width=32)
    assert parameter_count(wide) == parameter_count(build("resnet8x4"))


@pytest.mark.parametrize("name, shape, fragment", [
    ("cnn1d", IMAGE_SHAPE, "(C, L)"),
    ("resnet20", SEQUENCE_SHAPE, "(C, H, W)"),
    ("wrn_16_2", SEQUENCE_SHAPE, "(C, H, W)"),
    ("mobilenetv2", (3, 32), "(C, H, W)"),
    ("vit_tiny", (3, 4, 4, 4), "(C, L) or (C, H, W)"),
])
def test_wrong_input_shape_names_model_and_expected_shape(name, shape, fragment):
    with pytest.raises(KdlabError) as error:
        build(name, input_shape=shape)
    message = str(error.value)
    assert message.startswith(name) and fragment in message and "\n" not in message


@pytest.mark.parametrize("name, options, fragment", [
    ("wrn", {"depth": 17}, "depth=17"),
    ("wrn", {"depth": 4}, "depth=4"),
    ("resnet_cifar", {"depth": 21}, "depth=21"),
    ("wrn", {"widen_factor": 0}, "widen_factor"),
    ("wrn", {"dropout": 1.5}, "dropout"),
    ("vit_tiny", {"patch_size": 3}, "patch_size"),
    ("vit_tiny", {"dim": 30, "heads": 4}, "heads"),
    ("cnn1d", {"width": 0}, "width"),
    ("cnn1d", {"widths": ()}, "widths"),
    ("mlp", {"widths": (4, -1)}, "widths"),
    ("mobilenetv2", {"width_multiplier": 0.0}, "width_multiplier"),
])
def test_bad_options_raise_kdlab_error(name, options, fragment):
    with pytest.raises(KdlabError, match=fragment):
        build(name, **options)


def test_bad_statistics_and_classes_raise_kdlab_error():
    factory = registry.get("model", "cnn1d")
    with pytest.raises(KdlabError, match="mean has 2 values"):
        factory(input_shape=(3, 40), num_classes=2, mean=(0.5, 0.5), std=(0.2,))
    with pytest.raises(KdlabError, match="std"):
        factory(input_shape=(1, 40), num_classes=2, mean=(0.5,), std=(0.0,))
    with pytest.raises(KdlabError, match="num_classes"):
        factory(input_shape=(1, 40), num_classes=0, mean=(0.5,), std=(0.2,))


def test_mlp_widths_override_width_and_depth():
    model = build("mlp", width=7, depth=5, widths=(6, 4))
    assert model.feature_stages == ("layer1", "layer2", "pool")
    assert model.layer1[1].out_features == 6 and model.head.in_features == 4
    logistic = build("mlp", depth=0)
    assert logistic.feature_stages == ("pool",)
    assert parameter_count(logistic) == 80 * 3 + 3  # flattened (2, 40) input -> 3 classes
    dropped = build("mlp", dropout=0.5).train()
    x = torch.rand(4, *SEQUENCE_SHAPE)
    assert not torch.equal(dropped(x), dropped(x))  # dropout active in train mode
    dropped.eval()
    assert torch.equal(dropped(x), dropped(x))


def test_mlp_accepts_any_input_shape():
    model = build("mlp", input_shape=(3, 8, 8), width=16)
    assert model(torch.rand(2, 3, 8, 8)).shape == (2, 3)


def test_cnn1d_widths_and_short_sequences():
    model = build("cnn1d", widths=(4, 8, 16, 32), input_shape=(1, 3), kernel_size=3)
    shapes = tap_shapes(model, model.feature_stages, torch.rand(2, 1, 3))
    assert shapes["block1"] == (2, 4, 3)
    assert shapes["block4"] == (2, 32, 1)  # lengths 3 -> 2 -> 1 -> 1: never zero
    assert shapes["pool"] == (2, 32)


def test_vit_token_counts_for_images_and_sequences():
    image = build("vit_tiny", input_shape=(3, 16, 16), dim=32, heads=2, depth=2)
    shapes = tap_shapes(image, image.feature_stages, torch.rand(2, 3, 16, 16))
    assert shapes["embed"] == (2, 1 + 16, 32) and shapes["block2"] == (2, 17, 32) and shapes["pool"] == (2, 32)
    sequence = build("vit_tiny", input_shape=(1, 40), dim=32, heads=4, patch_size=8)
    assert tap_shapes(sequence, ["embed"], torch.rand(2, 1, 40))["embed"] == (2, 1 + 5, 32)


def test_models_take_any_channel_count_and_class_count():
    for name, shape in (("resnet8", (1, 16, 16)), ("wrn_16_1", (5, 8, 8)), ("cnn1d", (7, 20))):
        model = build(name, input_shape=shape, num_classes=17)
        assert model(torch.rand(2, *shape)).shape == (2, 17)


def mnist1d_split(samples: int):
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = samples
    data = make_dataset(args)
    x_train, x_test = (torch.tensor(np.asarray(data[k]), dtype=torch.float32).unsqueeze(1) for k in ("x", "x_test"))
    low, high = x_train.min(), x_train.max()
    scale = lambda x: ((x - low) / (high - low)).clamp(0, 1)  # noqa: E731 - inputs arrive in [0, 1]
    y_train, y_test = (torch.tensor(np.asarray(data[k])).long() for k in ("y", "y_test"))
    return scale(x_train), y_train, scale(x_test), y_test


def test_cnn1d_learns_mnist1d_and_width_matters():
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = mnist1d_split(2000)
    mean, std = (x_train.mean().item(),), (x_train.std().item(),)

    def accuracy(width: int) -> float:
        torch.manual_seed(0)
        model = registry.get("model", "cnn1d")(input_shape=(1, 40), num_classes=10, mean=mean, std=std,
                                               width=width)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(8):
            model.train()
            for index in torch.randperm(len(x_train)).split(50):
                loss = nn.functional.cross_entropy(model(x_train[index]), y_train[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        model.eval()
        with torch.no_grad():
            return (model(x_test).argmax(1) == y_test).float().mean().item()

    wide, narrow = accuracy(64), accuracy(8)
    assert wide > 0.85
    assert wide - narrow > 0.1
