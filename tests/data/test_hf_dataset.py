"""hf_dataset: save_to_disk folders and data files written by the test with the datasets library itself."""
import json

import numpy as np
import pytest
import torch

datasets = pytest.importorskip("datasets")
from PIL import Image  # noqa: E402

from kdlab.data.base import build_splits, clear_cache, make_splits  # noqa: E402
from kdlab.data.hf_dataset import hf_dataset  # noqa: E402
from kdlab.data.text import WordPiece  # noqa: E402
from kdlab.errors import KdlabError  # noqa: E402

COLOURS = {0: (255, 0, 0), 1: (0, 255, 0), 2: (0, 0, 255)}


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


def _image_set(count, *, size=(6, 4)):
    labels = [i % 3 for i in range(count)]
    images = [Image.new("RGB", size, COLOURS[y]) for y in labels]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["r", "g", "b"])})
    return datasets.Dataset.from_dict({"img": images, "label": labels}, features=features)


def _vocab(tmp_path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "good", "bad", "film", "!", "##s"]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(words) + "\n")
    return path


def test_save_to_disk_dict_uses_its_own_splits_and_resizes(tmp_path):
    datasets.DatasetDict(train=_image_set(9), validation=_image_set(3), test=_image_set(6, size=(20, 30))
                         ).save_to_disk(tmp_path / "ds")
    data = hf_dataset(root=tmp_path, cache_dir=tmp_path / "cache", path="ds", image_column="img", size=[5, 7])
    assert data.num_classes == 3 and data.x_train.shape == (9, 3, 5, 7) and data.x_test.shape == (6, 3, 5, 7)
    assert data.x_val.shape == (3, 3, 5, 7) and data.y_val.tolist() == [0, 1, 2]
    assert data.y_test.tolist() == [0, 1, 2, 0, 1, 2]
    # Solid colours survive the resize: the label's channel is 1, the others 0.
    for x, y in zip(torch.cat([data.x_train, data.x_test]), torch.cat([data.y_train, data.y_test])):
        assert torch.allclose(x[int(y)], torch.ones(5, 7)) and float(x.sum()) == pytest.approx(35.0)
    splits = make_splits("hf_dataset", data, val_fraction=0.5, split_seed=0)
    assert torch.equal(splits.val[0], data.x_val) and len(splits.train[0]) == 9  # its validation split, none carved


def test_resize_matches_pillow_bilinear_and_grayscale(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    part = datasets.Dataset.from_dict({"px": [pixels.tolist()] * 4, "y": [0, 1, 0, 1]})
    part.save_to_disk(tmp_path / "one")
    data = hf_dataset(root=None, cache_dir=tmp_path, path=str(tmp_path / "one"), image_column="px",
                      label_column="y", size=3, channels=1, test_fraction=0.5)
    expected = np.asarray(Image.fromarray(pixels).convert("L").resize((3, 3), Image.Resampling.BILINEAR))
    assert data.x_train.shape == (2, 1, 3, 3)
    assert torch.equal(data.x_train[0, 0], torch.tensor(expected).float() / 255)


def test_single_dataset_holds_out_a_fixed_stratified_test_split(tmp_path):
    _image_set(30).save_to_disk(tmp_path / "ds")
    data = hf_dataset(root=tmp_path, cache_dir=tmp_path, path="ds", image_column="img", size=4, test_fraction=0.2)
    assert data.x_train.shape[0] == 24 and sorted(data.y_test.tolist()) == [0, 0, 1, 1, 2, 2] and data.x_val is None
    again = hf_dataset(root=tmp_path, cache_dir=tmp_path, path="ds", image_column="img", size=4, test_fraction=0.2)
    assert torch.equal(again.x_test, data.x_test)
    splits = build_splits("hf_dataset", {"path": "ds", "image_column": "img", "size": 4}, root=str(tmp_path),
                          cache_dir=tmp_path, val_fraction=0.25, split_seed=3)
    assert len(splits.val[0]) == 6 and len(splits.test[0]) == 6 and len(splits.train[0]) == 18
    assert splits.input_shape == (3, 4, 4)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_text_classification_from_data_files(tmp_path, suffix):
    rows = {"text": ["good film", "bad films!", "good", "bad"], "sentiment": ["pos", "neg", "pos", "neg"]}
    frame = datasets.Dataset.from_dict(rows)
    for split in ("train", "test"):
        {".csv": frame.to_csv, ".jsonl": frame.to_json, ".parquet": frame.to_parquet}[suffix](
            str(tmp_path / f"{split}{suffix}"))
    vocab = _vocab(tmp_path)
    data = hf_dataset(root=tmp_path, cache_dir=tmp_path / "cache", data_files={"train": f"train{suffix}",
                                                                                "test": f"test{suffix}"},
                      text_column="text", label_column="sentiment", tokenizer=str(vocab), max_length=8)
    assert data.num_classes == 2 and data.y_train.tolist() == [1, 0, 1, 0]  # neg=0, pos=1 (sorted names)
    assert torch.equal(data.x_train, WordPiece(vocab).encode(rows["text"], 8))
    assert data.text.vocab_size == 9 and data.text.max_length == 8 and data.x_test.dtype == torch.int64


def test_single_data_file_is_the_train_split(tmp_path):
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t, "label": i % 2}) + "\n"
                                              for i, t in enumerate(["good", "bad"] * 5)))
    data = hf_dataset(root=tmp_path, cache_dir=tmp_path, path="t.jsonl", text_column="text",
                      tokenizer=str(_vocab(tmp_path)), max_length=8, test_fraction=0.2)
    assert data.x_train.shape == (8, 8) and sorted(data.y_test.tolist()) == [0, 1]


def _dict_with_labels(tmp_path, labels, **features):
    datasets.Dataset.from_dict({"text": ["good"] * len(labels), "label": labels},
                               features=datasets.Features(features) if features else None).save_to_disk(tmp_path / "d")
    return dict(root=tmp_path, cache_dir=tmp_path, path="d", text_column="text", tokenizer=str(_vocab(tmp_path)))


def test_labels_out_of_range_name_the_file_and_row(tmp_path):
    options = _dict_with_labels(tmp_path, [0, 1, 2, 5], text=datasets.Value("string"), label=datasets.Value("int64"))
    with pytest.raises(KdlabError, match=r"d, row 4: label 5 in column 'label' is outside \[0, 3\)"):
        hf_dataset(**options, num_classes=3)
    assert hf_dataset(**options, test_fraction=0.5).num_classes == 6  # without num_classes: largest + 1


def test_unlabelled_classlabel_rows_are_refused(tmp_path):
    options = _dict_with_labels(tmp_path, [0, 1, -1, 0], text=datasets.Value("string"),
                                label=datasets.ClassLabel(names=["a", "b"]))
    with pytest.raises(KdlabError, match=r"d, row 3: label -1 in column 'label' is outside \[0, 2\); .*drop unlabelled"):
        hf_dataset(**options)


@pytest.mark.parametrize("options, message", [
    ({"path": "ds", "image_column": "picture"}, r"ds: no column 'picture' \(data.image_column\); its columns are img, label"),
    ({"path": "ds", "image_column": "img", "label_column": "y"}, r"no column 'y' \(data.label_column\)"),
    ({"path": "plain", "image_column": "img"}, r"plain: not a Hugging Face datasets folder \(no dataset_dict.json or "
                                               r"state.json; data.path\)"),
    ({"path": "missing", "image_column": "img"}, r"missing: not found \(data.path\)"),
    ({"path": "notes.txt", "image_column": "img"}, r"notes.txt: unknown data file type '.txt' \(data.path\)"),
    ({"data_files": {"train": "gone.csv"}, "image_column": "img"}, r"gone.csv: file not found \(data.data_files.train\)"),
    ({"path": "ds", "data_files": {"train": "a.csv"}, "image_column": "img"}, r"data.path: give exactly one of path"),
    ({"path": "ds"}, r"data.image_column: give exactly one of image_column"),
    ({"path": "ds", "text_column": "img"}, r"ds, row 1: column 'img' holds PngImageFile, not text"),
    ({"path": "bad.parquet", "image_column": "img"}, r"bad.parquet: not a readable parquet file"),
    ({"path": "broken", "image_column": "img"}, r"broken, row 2: unreadable image"),
])
def test_bad_input_is_one_line(tmp_path, options, message):
    _image_set(6).save_to_disk(tmp_path / "ds")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.csv").write_text("a\n1\n")
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    features = datasets.Features({"img": datasets.Image(decode=False), "label": datasets.Value("int64")})
    good = _image_set(1).cast_column("img", datasets.Image(decode=False))[0]["img"]
    broken = datasets.Dataset.from_dict({"img": [good, {"bytes": b"\x89PNG junk", "path": None}], "label": [0, 1]},
                                        features=features)
    broken.save_to_disk(tmp_path / "broken")
    with pytest.raises(KdlabError, match=message) as error:
        hf_dataset(root=tmp_path, cache_dir=tmp_path / "cache", tokenizer=str(_vocab(tmp_path)), **options)
    assert "\n" not in str(error.value)


def test_without_the_library_says_what_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(KdlabError, match=r"needs the datasets library; pip install 'kdlab\[datasets\]'"):
        hf_dataset(root=tmp_path, cache_dir=tmp_path, path="x", image_column="img")


def test_crop_flip_is_refused_for_text_only(tmp_path):
    from kdlab.registry import get

    rule = get("dataset", "hf_dataset").image_inputs
    assert rule({"image_column": "img"}) is True and rule({"text_column": "t"}) is False


def test_kdlab_run_refuses_a_missing_column_with_exit_2(tmp_path, capsys):
    from kdlab.cli import main

    _image_set(12).save_to_disk(tmp_path / "ds")
    config = tmp_path / "c.yaml"
    config.write_text(f"name: hf\ndata: {{dataset: hf_dataset, root: {tmp_path}, path: ds, image_column: picture, "
                      "size: 8}\nteacher: {model: mlp, train: {epochs: 1}}\nstudent: {model: mlp}\n"
                      "method: {name: kd}\ntrain: {epochs: 1}\n")
    capsys.readouterr()  # the library's own progress bar while the test saved the folder
    assert main(["--workspace", str(tmp_path / "ws"), "run", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"kdlab: error: {tmp_path / 'ds'}: no column 'picture' (data.image_column); its columns are img, label"


@pytest.mark.integration
def test_kdlab_run_on_a_saved_dataset_end_to_end(tmp_path):
    from kdlab.cli import main

    datasets.DatasetDict(train=_image_set(30), test=_image_set(9)).save_to_disk(tmp_path / "ds")
    config = tmp_path / "c.yaml"
    config.write_text(f"name: hf\ndata: {{dataset: hf_dataset, root: {tmp_path}, path: ds, image_column: img, "
                      "size: 8, augment: crop_flip}\nteacher: {model: mlp, train: {epochs: 1}}\n"
                      "student: {model: mlp}\nmethod: {name: kd}\ntrain: {epochs: 1}\n")
    args = ["--workspace", str(tmp_path / "ws"), "run", str(config), "--quiet"]
    assert main(args) == 0
    assert main(args) == 0  # finished: skipped
