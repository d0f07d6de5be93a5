"""Feature taps: capture, per-forward overwrite, errors, hook removal, detach, tap_shapes."""
import pytest
import torch
from torch import nn

from kdlab import registry
from kdlab.errors import KdlabError
from kdlab.models import Taps, parameter_count, tap_shapes, taps, valid_tap_names


def resnet8(*, seed: int = 0, **options) -> nn.Module:
    torch.manual_seed(seed)
    return registry.get("model", "resnet8")(input_shape=(3, 16, 16), num_classes=4, mean=(0.5, 0.4, 0.3),
                                            std=(0.2, 0.2, 0.25), **options)


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class Branchy(nn.Module):
    """Toy model: ``extra`` only runs when ``use_extra``; ``pair`` returns a tuple."""

    def __init__(self):
        super().__init__()
        self.main = nn.Linear(3, 3)
        self.extra = nn.Linear(3, 3)
        self.pair = PairOut()
        self.use_extra = True

    def forward(self, x):
        x = self.main(x)
        if self.use_extra:
            x = self.extra(x)
        return self.pair(x)[1]


class PairOut(nn.Module):
    def forward(self, x):
        return x * 2, x + 1


def test_taps_match_a_manual_forward_through_the_stages():
    model = resnet8().eval()
    x = torch.rand(2, 3, 16, 16)
    with Taps(model, model.feature_stages) as tapped, torch.no_grad():
        logits = model(x)
        h = model.normalize(x)
        for stage in model.feature_stages:
            h = model.get_submodule(stage)(h)
            assert torch.equal(tapped[stage], h), stage
        assert torch.equal(model.head(h), logits)
        assert list(tapped.captured) == list(model.feature_stages)
        assert [name for name, _ in tapped.items()] == list(model.feature_stages)


def test_nested_module_paths_and_tuple_outputs():
    model = resnet8().eval()
    x = torch.rand(2, 3, 16, 16)
    with taps(model, ["stage2.0.conv1", "stage2.0.shortcut"]) as tapped, torch.no_grad():
        model(x)
        stem_out = model.stage1(model.stem(model.normalize(x)))
        assert torch.equal(tapped["stage2.0.conv1"], model.stage2[0].conv1(stem_out))
        assert tapped["stage2.0.shortcut"].shape == (2, 32, 8, 8)
    toy = Branchy()
    x = torch.rand(2, 3)
    with Taps(toy, ["pair"]) as tapped:
        out = toy(x)
        assert torch.allclose(tapped["pair"], (out - 1) * 2)  # the first element of the returned tuple


def test_each_forward_overwrites_and_clears_skipped_modules():
    model = resnet8()
    with Taps(model, ["stage3", "pool"]) as tapped:
        model(torch.rand(2, 3, 16, 16))
        first = tapped["pool"]
        model(torch.rand(5, 3, 16, 16))
        assert tapped["pool"].shape == (5, 64) and tapped["pool"] is not first
        tapped.clear()
        assert len(tapped) == 0 and tapped.captured == {}
        with pytest.raises(KdlabError, match="forward"):
            tapped["pool"]
    toy = Branchy()
    with Taps(toy, ["main", "extra"]) as tapped:
        toy(torch.rand(2, 3))
        assert "extra" in tapped
        toy.use_extra = False
        toy(torch.rand(2, 3))
        assert "main" in tapped and "extra" not in tapped  # no stale tensor from the earlier forward
        with pytest.raises(KdlabError, match="no output yet"):
            tapped["extra"]


def test_unknown_tap_name_lists_valid_names_and_installs_nothing():
    model = resnet8()
    with pytest.raises(KdlabError) as error:
        Taps(model, ["stage1", "stage9"])
    message = str(error.value)
    assert "'stage9'" in message and "\n" not in message
    for name in model.feature_stages:
        assert name in message
    assert "stage1.0" in message  # a few module paths too
    assert hook_count(model) == 0


def test_requesting_an_untapped_name_is_a_clear_error():
    model = resnet8()
    with Taps(model, ["stem"]) as tapped:
        model(torch.rand(1, 3, 16, 16))
        with pytest.raises(KdlabError, match="not requested"):
            tapped["pool"]


def test_close_removes_every_hook():
    model = resnet8()
    assert hook_count(model) == 0
    with Taps(model, list(model.feature_stages) + ["stage1.0.conv2"]) as tapped:
        assert hook_count(model) > 0
        model(torch.rand(1, 3, 16, 16))
    assert hook_count(model) == 0
    assert len(tapped) == 0  # captured tensors dropped with the hooks
    explicit = Taps(model, ["pool"])
    explicit.close()
    explicit.close()  # idempotent
    assert hook_count(model) == 0
    model(torch.rand(1, 3, 16, 16))
    assert len(explicit) == 0


def test_student_taps_keep_grad_and_detached_taps_drop_it():
    student, teacher = resnet8(seed=1), resnet8(seed=2)
    x = torch.rand(2, 3, 16, 16)
    with Taps(student, ["stage2"]) as student_taps, Taps(teacher, ["stage2"], detach=True) as teacher_taps:
        student(x)
        teacher(x)
        assert student_taps["stage2"].requires_grad and student_taps["stage2"].grad_fn is not None
        assert not teacher_taps["stage2"].requires_grad
        (student_taps["stage2"] - teacher_taps["stage2"]).pow(2).mean().backward()
    assert student.stem[0].weight.grad.abs().sum() > 0
    assert student.stage3[0].conv1.weight.grad is None  # after the tap: untouched by the feature loss
    assert all(p.grad is None for p in teacher.parameters())


def test_two_taps_on_one_model_are_independent():
    model = resnet8()
    first, second = Taps(model, ["stem"]), Taps(model, ["pool"])
    model(torch.rand(1, 3, 16, 16))
    first.close()
    model(torch.rand(3, 3, 16, 16))
    assert len(first) == 0 and second["pool"].shape == (3, 64)
    second.close()
    assert hook_count(model) == 0


def test_tap_shapes_restores_modes_and_leaves_batchnorm_statistics():
    model = resnet8().train()
    model.stage1.eval()  # a frozen part keeps its own mode
    running = model.stem[1].running_mean.clone()
    shapes = tap_shapes(model, ["stem", "stage3", "pool"], torch.rand(2, 3, 16, 16))
    assert shapes == {"stem": (2, 16, 16, 16), "stage3": (2, 64, 4, 4), "pool": (2, 64)}
    assert model.training and model.stem.training and model.stage2.training
    assert not model.stage1.training and not model.stage1[0].training
    assert torch.equal(model.stem[1].running_mean, running)
    assert hook_count(model) == 0
    model.eval()
    tap_shapes(model, ["pool"], torch.rand(1, 3, 16, 16))
    assert not model.training


def test_valid_tap_names_and_parameter_count():
    model = resnet8()
    names = valid_tap_names(model)
    assert names[: len(model.feature_stages)] == list(model.feature_stages)
    assert "stage1.0.conv1" in names and "" not in names and len(names) == len(set(names))
    for name in names[:12]:
        model.get_submodule(name)
    manual = sum(p.numel() for p in model.parameters())
    assert parameter_count(model) == manual
    model.stem.requires_grad_(False)
    frozen = sum(p.numel() for p in model.stem.parameters())
    assert parameter_count(model, trainable_only=True) == manual - frozen
    toy = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    assert parameter_count(toy) == 9 and valid_tap_names(toy) == ["0", "1"]
