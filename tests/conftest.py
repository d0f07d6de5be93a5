"""Fixtures shared by the whole suite."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Run on one intra-op thread: the tensors are tiny, and on a busy 2-core machine a second
    spinning thread makes these tests many times slower. Restored after each module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def refuses_before_work(tmp_path, capsys):
    """``check(method, options, key, fragment)``: ``kdlab run --dry-run`` of a small MLP config with ``method``
    (plus ``options``' other sections) exits 2 with one line naming ``key``, and writes nothing."""
    import yaml

    from kdlab.cli import main

    def check(method: str, options: dict, key: str, fragment: str) -> None:
        options = dict(options)
        config = {"data": {"dataset": "synthetic", "num_train": 64, "num_test": 16, "input_shape": [1, 8]},
                  "teacher": {"model": "mlp", "train": {"epochs": 1}}, "student": {"model": "mlp"},
                  "method": {"name": method, **options.pop("method", {})}, **options}
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        workspace = tmp_path / "ws"
        code = main(["--workspace", str(workspace), "run", str(path), "--dry-run", "--quiet"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1, lines
        assert lines[0].removeprefix("kdlab: error: ").startswith(key) and fragment in lines[0], lines
        assert not workspace.exists()

    return check
