"""What the user-file datasets share: bounded options from their signatures, a val split they bring, scaling."""
import pytest
import torch

from kdlab.config import load_experiment
from kdlab.data.base import DatasetArrays, make_splits
from kdlab.data.user_files import scale_to_unit
from kdlab.errors import KdlabError


@pytest.mark.parametrize("data, message", [
    ("{dataset: image_folder, size: 0}", "data.size: must be"),
    ("{dataset: image_folder, size: [4, 4, 4]}", "data.size: expected"),
    ("{dataset: image_folder, channels: 2}", "data.channels: 2 is not allowed; choose one of 1, 3"),
    ("{dataset: arrays, test_fraction: 1.0}", "data.test_fraction: must be in (0, 1)"),
    ("{dataset: arrays, normalize: zscore}", "data.normalize: 'zscore' is not allowed"),
    ("{dataset: table, features: []}", "data.features: must be non-empty"),
    ("{dataset: table, augment: crop_flip}", "data.augment: crop_flip needs image inputs"),
    ("{dataset: cifar10, download: 'yes'}", "data.download: expected true or false"),
])
def test_options_are_checked_when_the_config_loads(tmp_path, data, message):
    config = tmp_path / "c.yaml"
    config.write_text(f"name: x\ndata: {data}\nstudent: {{model: mlp}}\nmethod: {{name: scratch}}\n")
    with pytest.raises(KdlabError) as error:
        load_experiment(str(config))
    assert message in str(error.value)


def _arrays(**val):
    x = torch.rand(8, 2)
    y = torch.arange(8) % 2
    return DatasetArrays(x_train=x, y_train=y, x_test=x[:2], y_test=y[:2], num_classes=2, **val)


def test_a_val_split_the_data_brings_is_kept_and_checked():
    splits = make_splits("d", _arrays(x_val=torch.rand(3, 2), y_val=torch.tensor([0, 1, 1])), val_fraction=0.5,
                         split_seed=0)
    assert len(splits.train[0]) == 8 and splits.val[1].tolist() == [0, 1, 1]
    with pytest.raises(KdlabError, match=r"train inputs have shape \(2,\) but val inputs \(3,\)"):
        make_splits("d", _arrays(x_val=torch.rand(3, 3), y_val=torch.tensor([0, 1, 1])), val_fraction=0.1, split_seed=0)
    with pytest.raises(KdlabError, match="y_val has labels outside"):
        make_splits("d", _arrays(x_val=torch.rand(1, 2), y_val=torch.tensor([5])), val_fraction=0.1, split_seed=0)


def test_scale_to_unit():
    train, test = torch.tensor([[0.0, 10.0], [255.0, 20.0]]), torch.tensor([[300.0, 15.0]])
    out = scale_to_unit(train, [test], scale=None, normalize="per_channel", source="f", dims=(0,))
    assert out[0].tolist() == [[0.0, 0.0], [1.0, 1.0]] and out[1].tolist() == [[1.0, 0.5]]
    assert torch.equal(scale_to_unit(train, [], scale=255.0, normalize="none", source="f", dims=(0,))[0], train / 255)
    with pytest.raises(KdlabError, match=r"f: input values span \[0, 255\], not \[0, 1\]; set scale: 255"):
        scale_to_unit(train, [], scale=None, normalize="none", source="f", dims=(0,))
    with pytest.raises(KdlabError, match="remove the NaN/infinite values"):
        scale_to_unit(torch.tensor([[float("nan")], [1.0]]), [], scale=None, normalize="per_channel", source="f",
                      dims=(0,))
