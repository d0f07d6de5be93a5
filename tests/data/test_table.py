"""table: CSV files written by the test with the csv module (Parquet when pyarrow is installed)."""
import builtins
import csv

import pytest
import torch

from kdlab.data.table import table
from kdlab.errors import KdlabError


def _csv(path, header, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _iris_like(n=12):
    species = ["setosa", "virginica", "versicolor"]
    return [[i * 0.5, 10 - i, species[i % 3], i % 2] for i in range(n)]


def test_csv_string_labels_sorted_and_minmax(tmp_path):
    _csv(tmp_path / "train.csv", ["length", "width", "species", "flag"], _iris_like())
    _csv(tmp_path / "test.csv", ["length", "width", "species", "flag"], [[100, 0, "versicolor", 1]])
    data = table(root=tmp_path, cache_dir=tmp_path, train="train.csv", test="test.csv", label="species")
    assert data.num_classes == 3 and data.x_train.shape == (12, 3)
    assert data.y_train.tolist()[:3] == [0, 2, 1]  # setosa, virginica, versicolor by sorted name
    assert data.y_test.tolist() == [1]
    assert torch.equal(data.x_train.amin(0), torch.zeros(3)) and torch.equal(data.x_train.amax(0), torch.ones(3))
    assert data.x_test[0].tolist() == pytest.approx([1.0, 1 / 11, 1.0])  # length 100 is beyond train: clipped
    assert data.x_train[1, 0] == pytest.approx(0.5 / 5.5)


def test_integer_labels_features_chosen_and_carved_test(tmp_path):
    rows = [[i, i / 10, i % 2 + 3] for i in range(10)]
    _csv(tmp_path / "t.csv", ["a", "b", "cls"], rows)
    data = table(root=tmp_path, cache_dir=tmp_path, train="t.csv", label="cls", features=["b"], test_fraction=0.2,
                 normalize="none")
    assert data.num_classes == 5 and data.x_train.shape == (8, 1) and data.x_test.shape == (2, 1)
    assert sorted(data.y_test.tolist()) == [3, 4]


@pytest.mark.parametrize("header, rows, options, message", [
    (["a", "y"], [[1, "x"], ["oops", "y"]], {}, r"t.csv: column 'a', row 3: 'oops' is not a finite number"),
    (["a", "y"], [[1, "x"], ["", "y"]], {}, r"column 'a', row 3: '' is not a finite number"),
    (["a", "y"], [[1, "x"], ["nan", "y"]], {}, r"column 'a', row 3: 'nan' is not a finite number"),
    (["a", "y"], [[1, "x"], [2, "x"]], {}, r"column 'y' holds a single class"),
    (["a", "b"], [[1, 0], [2, 1]], {}, r"t.csv: no column 'y' \(data.label\); its columns are a, b"),
    (["a", "y"], [[1, 0], [2, 1]], {"features": ["a", "c"]}, r"t.csv: no column 'c'"),
    (["a", "y"], [[1, 0], [2]], {}, r"t.csv: line 3 has 1 fields but the header has 2"),
    (["a", "y"], [], {}, r"t.csv: no rows"),
])
def test_bad_tables_are_one_line(tmp_path, header, rows, options, message):
    _csv(tmp_path / "t.csv", header, rows)
    with pytest.raises(KdlabError, match=message) as error:
        table(root=tmp_path, cache_dir=tmp_path, train="t.csv", label="y", **options)
    assert "\n" not in str(error.value)


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"f": [0.0, 1.0, 2.0, 3.0], "label": ["b", "a", "b", "a"]}), tmp_path / "t.parquet")
    data = table(root=tmp_path, cache_dir=tmp_path, train="t.parquet", label="label", test_fraction=0.5)
    assert data.num_classes == 2 and sorted(data.y_train.tolist()) == [0, 1]


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    with pytest.raises(KdlabError, match="t.parquet: reading Parquet needs pyarrow, which is not installed; pip install pyarrow"):
        table(root=tmp_path, cache_dir=tmp_path, train="t.parquet", label="y")
