"""A table from the user's CSV (or Parquet) file: numeric feature columns and one label column, for tabular KD.

CSV is read with the standard library (a header row names the columns); Parquet needs pyarrow. Labels that
are all whole numbers are used as class indices; otherwise each distinct label is a class, ids in sorted
order of the names (over train and test together). Features become float32 (N, F) in [0, 1]: by default
each column is min-max scaled over train (``normalize: none`` keeps values that are already in [0, 1]).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Annotated, Literal, Optional

import torch
from annotated_types import Interval, MinLen

from kdlab.data.base import DatasetArrays
from kdlab.data.user_files import carve_test, scale_to_unit, user_file
from kdlab.errors import KdlabError
from kdlab.registry import register

Column = Annotated[str, MinLen(1)]
_PARQUET = (".parquet", ".pq")


def read_table(path: Path) -> tuple[list[str], list[list[object]]]:
    """``(column names, rows)`` of a CSV or Parquet file; the rows of a CSV hold strings."""
    if path.suffix.lower() in _PARQUET:
        return _read_parquet(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            rows = [row for row in reader if row]
    except (UnicodeDecodeError, csv.Error) as error:
        raise KdlabError(f"{path}: not a readable CSV file ({error}); save it as UTF-8 CSV with a header row") from None
    if not header:
        raise KdlabError(f"{path}: empty file; a CSV needs a header row naming the columns, then one row per sample")
    for number, row in enumerate(rows, start=2):
        if len(row) != len(header):
            raise KdlabError(f"{path}: line {number} has {len(row)} fields but the header has {len(header)}; "
                             "fix that line")
    return [name.strip() for name in header], rows


def _read_parquet(path: Path) -> tuple[list[str], list[list[object]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise KdlabError(f"{path}: reading Parquet needs pyarrow, which is not installed; pip install pyarrow, "
                         "or save the table as CSV") from None
    try:
        table = pq.read_table(path)
    except Exception as error:  # noqa: BLE001 - pyarrow raises its own error classes for bad files
        raise KdlabError(f"{path}: not a readable Parquet file ({type(error).__name__}); re-save it") from None
    columns = [table.column(i).to_pylist() for i in range(table.num_columns)]
    return list(table.column_names), [list(row) for row in zip(*columns)]


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(str(value).strip())
    except ValueError:
        return None


def _features(path: Path, header: list[str], rows: list[list[object]], columns: list[str]) -> torch.Tensor:
    index = [header.index(name) for name in columns]
    values = []
    for number, row in enumerate(rows, start=2):
        line = []
        for i in index:
            value = _number(row[i])
            if value is None or not math.isfinite(value):
                raise KdlabError(f"{path}: column {header[i]!r}, row {number}: {str(row[i])[:40]!r} is not a finite "
                                 "number; fix the value, or leave the column out of data.features")
            line.append(value)
        values.append(line)
    return torch.tensor(values, dtype=torch.float32).reshape(len(rows), len(index))


def _class_ids(labels: list[object]) -> tuple[list[int], int] | None:
    """Whole-number labels as they are (None if some are not)."""
    numbers = [_number(v) for v in labels]
    if any(n is None or not math.isfinite(n) or n != int(n) for n in numbers):
        return None
    return [int(n) for n in numbers], max(int(n) for n in numbers) + 1 if numbers else 0


@register("dataset", "table")
def table(
    *,
    root: Path | None,
    cache_dir: Path,
    train: Column = "train.csv",
    label: Column = "label",
    test: Optional[Column] = None,
    features: Optional[Annotated[list[Column], MinLen(1)]] = None,
    normalize: Literal["minmax", "none"] = "minmax",
    test_fraction: Annotated[float, Interval(gt=0, lt=1)] = 0.2,
) -> DatasetArrays:
    """Table: your CSV/Parquet file, numeric feature columns + a label column, for tabular KD.

    ``train``/``test``: CSV or Parquet paths (relative ones under data.root; train defaults to
    train.csv). ``label`` names the label column (default "label"); ``features`` the feature columns
    (default: every other column).
    String labels become class ids in sorted order. Features are min-max scaled per column over train
    (``normalize: minmax``). Without ``test`` a stratified ``test_fraction`` of train is held out.
    """
    paths = {"train": user_file(root, train, key="train")}
    if test is not None:
        paths["test"] = user_file(root, test, key="test")
    tables = {split: read_table(path) for split, path in paths.items()}
    header = tables["train"][0]
    if label not in header:
        raise KdlabError(f"{paths['train']}: no column {label!r} (data.label); its columns are {', '.join(header)}")
    columns = features if features is not None else [name for name in header if name != label]
    if not columns:
        raise KdlabError(f"{paths['train']}: no feature columns besides {label!r}; add columns or set data.features")
    for split, (names, rows) in tables.items():
        missing = [name for name in [*columns, label] if name not in names]
        if missing:
            raise KdlabError(f"{paths[split]}: no column {missing[0]!r}; its columns are {', '.join(names)}")
        if not rows:
            raise KdlabError(f"{paths[split]}: no rows; the file holds only a header")
    raw = {split: [row[names.index(label)] for row in rows] for split, (names, rows) in tables.items()}
    everything = [v for values in raw.values() for v in values]
    whole = _class_ids(everything)
    if whole is not None and min(whole[0]) >= 0:
        ids, num_classes = whole
    else:  # named classes: ids in sorted order of the names
        names_sorted = sorted({str(v).strip() for v in everything})
        lookup = {name: i for i, name in enumerate(names_sorted)}
        ids, num_classes = [lookup[str(v).strip()] for v in everything], len(names_sorted)
    if num_classes < 2:
        raise KdlabError(f"{paths['train']}: column {label!r} holds a single class; a classifier needs at least 2")
    labels = torch.tensor(ids, dtype=torch.int64)
    count = len(raw["train"])
    x = {split: _features(paths[split], names, rows, columns) for split, (names, rows) in tables.items()}
    x_train, y_train = x["train"], labels[:count]
    if "test" in x:
        x_test, y_test = x["test"], labels[count:]
    else:
        x_train, y_train, x_test, y_test = carve_test(x_train, y_train, test_fraction, source=str(paths["train"]))
    x_train, x_test = scale_to_unit(x_train, [x_test], scale=None, normalize=normalize, source=str(paths["train"]),
                                    dims=(0,))
    return DatasetArrays(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, num_classes=num_classes)

# Feature vectors, not images: crop_flip is refused at config validation.
table.image_inputs = False
