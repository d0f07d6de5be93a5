"""A checkpoint is complete and consistent or refused (one line naming the file and the fix)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kdlab.config import MethodConfig, TrainConfig
from kdlab.data import build_splits
from kdlab.engine.build import build_method, build_model
from kdlab.engine.checkpoint import load_latest_checkpoint, save_checkpoint
from kdlab.engine.loop import fit
from kdlab.engine.run_files import RunFolderError


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    return build_splits("synthetic", {"num_classes": 3, "input_shape": (1, 12), "num_train": 96, "num_test": 30},
                        root=None, cache_dir=tmp_path_factory.mktemp("cache"), val_fraction=0.2, split_seed=0)


def _fit(splits, run_dir, **kwargs):
    torch.manual_seed(0)
    student = build_model("mlp", {"width": 8}, splits)
    method = build_method(MethodConfig("scratch", {}), student=student, teacher=None)
    train = TrainConfig(epochs=4, batch_size=32, lr=0.01, checkpoint_every=1, device="cpu",
                        **kwargs.pop("train", {}))
    return fit(student=student, method=method, teacher=None, splits=splits, train=train, seed=0, run_dir=run_dir,
               **kwargs), student


class _Stop(Exception):
    pass


def _stopped_after(splits, run_dir, epoch=3):
    def stop(e, metrics):
        if e == epoch + 1:
            raise _Stop

    with pytest.raises(_Stop):
        _fit(splits, run_dir, on_epoch=stop)
    folder = run_dir / "checkpoints" / f"epoch-{epoch:04d}"
    assert folder.is_dir()
    return folder


def _refused(splits, run_dir, *words, fix="--no-resume"):
    with pytest.raises(RunFolderError) as info:
        _fit(splits, run_dir)
    message = str(info.value)
    assert "\n" not in message and fix in message
    for word in words:
        assert word in message, message
    return message


def test_a_state_whose_epoch_disagrees_with_its_folder_is_refused(splits, tmp_path):
    folder = _stopped_after(splits, tmp_path)
    state = json.loads((folder / "state.json").read_text())
    (folder / "state.json").write_text(json.dumps({**state, "epoch": 99}))
    _refused(splits, tmp_path, str(folder / "state.json"), "99")


def test_a_pointer_and_state_moved_to_a_later_epoch_are_refused_by_the_step_count(splits, tmp_path):
    folder = _stopped_after(splits, tmp_path, epoch=2)
    state = json.loads((folder / "state.json").read_text())
    later = folder.with_name("epoch-0003")
    folder.rename(later)
    (later / "state.json").write_text(json.dumps({**state, "epoch": 3}))
    (tmp_path / "checkpoints/latest.json").write_text(json.dumps({"epoch": 3, "dir": "epoch-0003"}))
    _refused(splits, tmp_path, "steps after epoch 3")


def test_a_checkpoint_without_its_optimiser_tensors_is_refused(splits, tmp_path):
    folder = _stopped_after(splits, tmp_path)
    tensors = load_file(str(folder / "weights.safetensors"))
    save_file({k: v for k, v in tensors.items() if not k.startswith("optimizer.")}, str(folder / "weights.safetensors"))
    _refused(splits, tmp_path, str(folder), "lacks optimizer.")


def test_a_checkpoint_without_a_tensor_list_or_optimiser_tensors_is_refused(splits, tmp_path):
    folder = _stopped_after(splits, tmp_path)
    tensors = load_file(str(folder / "weights.safetensors"))
    save_file({k: v for k, v in tensors.items() if not k.startswith("optimizer.")}, str(folder / "weights.safetensors"))
    state = json.loads((folder / "state.json").read_text())
    del state["tensors"]  # as written before the tensor list existed
    (folder / "state.json").write_text(json.dumps(state))
    _refused(splits, tmp_path, str(folder), "no optimiser state")


def test_a_checkpoint_from_before_the_tensor_list_still_resumes(splits, tmp_path):
    straight, _ = _fit(splits, tmp_path / "straight")
    folder = _stopped_after(splits, tmp_path / "old", epoch=2)
    state = json.loads((folder / "state.json").read_text())
    del state["tensors"]
    (folder / "state.json").write_text(json.dumps(state))
    resumed, _ = _fit(splits, tmp_path / "old")
    assert resumed.epochs_run == 2 and resumed.final == straight.final


@pytest.mark.parametrize("key", ["rng", "scheduler", "step"])
def test_a_state_without_a_part_is_refused(splits, tmp_path, key):
    folder = _stopped_after(splits, tmp_path)
    state = json.loads((folder / "state.json").read_text())
    del state[key]
    (folder / "state.json").write_text(json.dumps(state))
    _refused(splits, tmp_path, str(folder), key)


def test_a_state_with_a_damaged_rng_is_refused(splits, tmp_path):
    folder = _stopped_after(splits, tmp_path)
    state = json.loads((folder / "state.json").read_text())
    state["rng"] = {"python": "garbage"}
    (folder / "state.json").write_text(json.dumps(state))
    _refused(splits, tmp_path, str(folder), "cannot be restored")


def test_a_wrong_shaped_buffer_is_refused(splits, tmp_path):
    folder = _stopped_after(splits, tmp_path)
    tensors = load_file(str(folder / "weights.safetensors"))
    name = next(k for k in tensors if k.startswith("student."))
    tensors[name] = torch.zeros(3, 3)
    save_file(tensors, str(folder / "weights.safetensors"))
    _refused(splits, tmp_path, str(folder), name)
    # The tensor list in state.json updated to match: the model's own shapes still refuse it.
    state = json.loads((folder / "state.json").read_text())
    state["tensors"][name] = [[3, 3], "float32"]
    (folder / "state.json").write_text(json.dumps(state))
    _refused(splits, tmp_path, str(folder), name, "(3, 3)")


def test_a_wrong_shaped_rng_state_is_refused(splits, tmp_path):
    folder = _stopped_after(splits, tmp_path)
    tensors = load_file(str(folder / "weights.safetensors"))
    tensors["rng.torch"] = torch.zeros(7, dtype=torch.uint8)
    save_file(tensors, str(folder / "weights.safetensors"))
    state = json.loads((folder / "state.json").read_text())
    state["tensors"]["rng.torch"] = [[7], "uint8"]
    (folder / "state.json").write_text(json.dumps(state))
    _refused(splits, tmp_path, str(folder), "cannot be restored")


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"epoch": "3", "dir": "epoch-0003"}',
                                  '{"epoch": 3, "dir": 5}', '{"epoch": 3}', '{"epoch": 3, "dir": "../../x"}'])
def test_a_garbage_pointer_is_one_line(splits, tmp_path, text):
    _stopped_after(splits, tmp_path)
    (tmp_path / "checkpoints/latest.json").write_text(text)
    _refused(splits, tmp_path, str(tmp_path / "checkpoints/latest.json"))


def test_a_pointer_never_loads_a_checkpoint_from_outside_the_run_folder(splits, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    save_checkpoint(elsewhere, 3, {"w": torch.ones(1)}, {})
    run = tmp_path / "run"
    _stopped_after(splits, run)
    for target in (str((elsewhere / "epoch-0003").resolve()), "../../elsewhere/epoch-0003"):
        (run / "checkpoints/latest.json").write_text(json.dumps({"epoch": 3, "dir": target}))
        _refused(splits, run, "latest.json")
    # A folder inside that is a link to the outside one is refused too.
    (run / "checkpoints/latest.json").write_text(json.dumps({"epoch": 3, "dir": "epoch-0003"}))
    import shutil

    shutil.rmtree(run / "checkpoints/epoch-0003")
    os.symlink(elsewhere / "epoch-0003", run / "checkpoints/epoch-0003")
    _refused(splits, run, "symbolic link", fix="remove the link")


def test_checkpoints_are_never_written_through_a_linked_folder(splits, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(outside, run / "checkpoints")
    with pytest.raises(RunFolderError, match="symbolic link"):
        _fit(splits, run)
    assert list(outside.iterdir()) == []


def test_a_complete_checkpoint_still_resumes_to_the_uninterrupted_result(splits, tmp_path):
    straight, student = _fit(splits, tmp_path / "straight")
    _stopped_after(splits, tmp_path / "stopped", epoch=2)
    resumed, student2 = _fit(splits, tmp_path / "stopped")
    assert resumed.epochs_run == 2 and resumed.final == straight.final
    for name, value in student.state_dict().items():
        assert torch.equal(student2.state_dict()[name], value)


def test_the_best_checkpoint_is_checked_before_it_is_loaded(splits, tmp_path):
    _fit(splits, tmp_path, train={"selection": "best_val"}, resume=False)
    best = tmp_path / "checkpoints/best"
    folder = best / json.loads((best / "latest.json").read_text())["dir"]
    tensors = load_file(str(folder / "weights.safetensors"))
    save_file({k: v for k, v in tensors.items() if not k.endswith("bias")}, str(folder / "weights.safetensors"))
    assert load_latest_checkpoint(best) is not None  # readable: the model's own keys refuse it
    with pytest.raises(RunFolderError, match="lacks"):
        _fit(splits, tmp_path, train={"selection": "best_val"})
