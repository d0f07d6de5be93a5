"""Offline teacher targets for GKD's supervised arms (kdlab.engine.seq_teacher_cache, method.teacher_targets).

The loss references are written here in float64 from the equations (forward KL of Eq. 2 of GKD, the
per-sequence mean over response tokens), on the teacher log-probabilities as the cache stores them
(float16); the live teacher's loss agrees to float16's rounding.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kdlab import registry
from kdlab.config import MethodConfig, TrainConfig
from kdlab.data import build_splits
from kdlab.engine import loop
from kdlab.engine import seq_teacher_cache as stc
from kdlab.engine.build import build_method
from kdlab.engine.loop import fit
from kdlab.errors import KdlabError
from kdlab.methods import gkd
from kdlab.methods.base import Batch, Outputs

SUPERVISED = {"on_policy_fraction": 0.0, "divergence": "forward_kl"}


def _splits(num_train=12, val_fraction=0.0):
    return build_splits("reverse", {"num_train": num_train, "num_test": 4, "max_length": 4}, root=None,
                        cache_dir="/tmp/kdlab-test-seqcache", val_fraction=val_fraction, split_seed=0)


@pytest.fixture(scope="module")
def splits():
    return _splits()


def _tinygpt(splits, *, width, seed):
    torch.manual_seed(seed)
    return registry.get("model", "tinygpt")(input_shape=splits.input_shape, num_classes=splits.num_classes,
                                            layers=1, width=width, heads=2)


def _method(splits, teacher, student, **options):
    torch.manual_seed(5)
    return build_method(MethodConfig("gkd", {**SUPERVISED, **options}), student=student, teacher=teacher,
                        input_shape=splits.input_shape, train_size=len(splits.train[0]), sequence=splits.sequence)


def _run_teacher(teacher):
    def run(tokens):
        with torch.inference_mode():
            return teacher(tokens).float().clone(), {}
    return run


def _attach(method, splits, root, seed=0):
    method.attach_offline_targets(splits, run_teacher=_run_teacher(method._networks["teacher"]), root=root,
                                  seed=seed, precision="fp32/same", device=torch.device("cpu"))
    return method.offline


def _batch(splits, rows=6):
    tokens, labels = splits.train
    return Batch(tokens[:rows], labels[:rows], torch.arange(rows))


def _reference_kl(student_logits, log_p, labels):
    """Σ_v p_v (log p_v − log q_v) per response token (log p as given), per-sequence mean, batch mean; float64."""
    log_q = torch.log_softmax(student_logits[:, :-1].double(), -1)
    mask = labels[:, 1:] != -100
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    per_seq = [(per_token[b][mask[b]]).mean() for b in range(len(labels)) if mask[b].any()]
    return torch.stack(per_seq).mean()


# --------------------------------------------------------------------------- equality with the live teacher


def test_topk_with_k_equal_vocabulary_matches_the_live_teacher(splits, tmp_path):
    vocab = splits.num_classes
    teacher, student = _tinygpt(splits, width=16, seed=1), _tinygpt(splits, width=8, seed=2)
    cached = _method(splits, teacher, student, teacher_targets="topk", teacher_targets_k=vocab)
    live = _method(splits, teacher, student)
    cache = _attach(cached, splits, tmp_path)
    batch = _batch(splits)
    student_logits = student(batch.inputs).double().detach().requires_grad_(True)
    with torch.no_grad():
        teacher_logits = teacher(batch.inputs).double()
    loss = cached.loss_terms(batch, Outputs(student_logits, {}), None)["gkd"]
    (grad,) = torch.autograd.grad(loss, student_logits)
    # The reference: the teacher's log-probabilities as stored (float16), the full forward KL (no tail: k = V).
    stored_log_p = torch.log_softmax(teacher_logits[:, :-1], -1).half().double()
    logits_ref = student_logits.detach().clone().requires_grad_(True)
    reference = _reference_kl(logits_ref, stored_log_p, batch.labels)
    (grad_ref,) = torch.autograd.grad(reference, logits_ref)
    torch.testing.assert_close(loss, reference, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-9, atol=1e-12)
    # The live teacher's loss and gradient, to float16's rounding of the stored log-probabilities.
    logits_live = student_logits.detach().clone().requires_grad_(True)
    live_loss = live.loss_terms(batch, Outputs(logits_live, {}), Outputs(teacher_logits, {}))["gkd"]
    (grad_live,) = torch.autograd.grad(live_loss, logits_live)
    torch.testing.assert_close(loss, live_loss, rtol=2e-3, atol=2e-4)
    torch.testing.assert_close(grad, grad_live, rtol=0, atol=2e-4)
    assert cache.bytes_per_token > 0


def test_sampled_targets_are_the_teachers_draws_and_log_probabilities(splits, tmp_path):
    teacher, student = _tinygpt(splits, width=16, seed=1), _tinygpt(splits, width=8, seed=2)
    method = _method(splits, teacher, student, teacher_targets="sampled", teacher_targets_k=5)
    cache = _attach(method, splits, tmp_path)
    batch = _batch(splits)
    with torch.no_grad():
        log_p = torch.log_softmax(teacher(batch.inputs).double()[:, :-1], -1)
    mask = batch.labels[:, 1:] != -100
    t = cache.targets(batch.indices, mask)
    assert t["ids"].shape == (*mask.shape, 5) and "tail_log_mass" not in t
    torch.testing.assert_close(t["log_probs"][mask].double(), log_p.gather(-1, t["ids"])[mask], rtol=0, atol=2e-3)
    # The loss is the estimator (1/K) Σ_k (log p(i_k) − log q(i_k)) per token, per-sequence mean.
    student_logits = student(batch.inputs).double().detach()
    loss = method.loss_terms(batch, Outputs(student_logits, {}), None)["gkd"]
    log_q = torch.log_softmax(student_logits[:, :-1], -1)
    per_token = (t["log_probs"].double() - log_q.gather(-1, t["ids"])).mean(-1)
    reference = torch.stack([per_token[b][mask[b]].mean() for b in range(len(mask))]).mean()
    torch.testing.assert_close(loss, reference, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- storage


def test_bytes_per_token_are_ids_uint16_and_float16_values(splits, tmp_path):
    k = 4
    teacher, student = _tinygpt(splits, width=16, seed=1), _tinygpt(splits, width=8, seed=2)
    cache = _attach(_method(splits, teacher, student, teacher_targets="topk", teacher_targets_k=k), splits, tmp_path)
    tokens = int((splits.train[1][:, 1:] != -100).sum())
    folder = cache.folder
    ids = np.load(folder / "ids.npy", mmap_mode="r")
    log_probs = np.load(folder / "log_probs.npy", mmap_mode="r")
    tail = np.load(folder / "tail_log_mass.npy", mmap_mode="r")
    assert (ids.dtype, log_probs.dtype, tail.dtype) == (np.uint16, np.float16, np.float16)
    assert ids.shape == log_probs.shape == (tokens, k) and tail.shape == (tokens,)
    data = tokens * (2 * k + 2 * k + 2)  # per token: k uint16 ids, k float16 log p, one float16 tail
    on_disk = sum((folder / f"{n}.npy").stat().st_size for n in ("ids", "log_probs", "tail_log_mass"))
    assert data <= on_disk <= data + 3 * 128  # plus one .npy header (128 bytes) per file
    assert cache.bytes_per_token == pytest.approx(on_disk / tokens)


# --------------------------------------------------------------------------- keying and verification


def test_another_teacher_or_data_gets_its_own_cache(tmp_path):
    splits, other_data = _splits(), _splits(num_train=10)
    student = _tinygpt(splits, width=8, seed=2)
    options = {"teacher_targets": "topk", "teacher_targets_k": 3}
    first = _attach(_method(splits, _tinygpt(splits, width=16, seed=1), student, **options), splits, tmp_path)
    other_teacher = _attach(_method(splits, _tinygpt(splits, width=16, seed=7), student, **options), splits,
                            tmp_path)
    other = _attach(_method(other_data, _tinygpt(splits, width=16, seed=1), student, **options), other_data,
                    tmp_path)
    same = _attach(_method(splits, _tinygpt(splits, width=16, seed=1), student, **options), splits, tmp_path)
    assert len({first.path, other_teacher.path, other.path}) == 3
    assert same.path == first.path
    mask = splits.train[1][:4, 1:] != -100
    assert not torch.equal(first.targets(torch.arange(4), mask)["log_probs"],
                           other_teacher.targets(torch.arange(4), mask)["log_probs"])
    # The sampled kind is keyed on the seed too; top-k on none.
    sampled = {"teacher_targets": "sampled", "teacher_targets_k": 3}
    seeds = {_attach(_method(splits, _tinygpt(splits, width=16, seed=1), student, **sampled), splits, tmp_path,
                     seed=s).path for s in (0, 1)}
    assert len(seeds) == 2


def test_a_changed_or_foreign_cache_is_refused_with_one_line(splits, tmp_path):
    teacher, student = _tinygpt(splits, width=16, seed=1), _tinygpt(splits, width=8, seed=2)
    options = {"teacher_targets": "topk", "teacher_targets_k": 3}
    cache = _attach(_method(splits, teacher, student, **options), splits, tmp_path)
    log_probs = cache.folder / "log_probs.npy"
    raw = bytearray(log_probs.read_bytes())
    raw[-1] ^= 0xFF
    log_probs.write_bytes(bytes(raw))
    with pytest.raises(KdlabError, match="SHA-256") as error:
        _attach(_method(splits, teacher, student, **options), splits, tmp_path)
    assert "\n" not in str(error.value) and "delete the folder" in str(error.value)
    meta = json.loads((cache.path / "meta.json").read_text())
    meta["teacher"] = "0" * 32  # a folder whose meta says another teacher built it
    (cache.path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(KdlabError, match="another teacher"):
        _attach(_method(splits, teacher, student, **options), splits, tmp_path)


# --------------------------------------------------------------------------- bad input


def test_on_policy_arms_are_refused_with_offline_targets(splits):
    teacher, student = _tinygpt(splits, width=16, seed=1), _tinygpt(splits, width=8, seed=2)
    with pytest.raises(KdlabError, match="on_policy_fraction") as error:
        _method(splits, teacher, student, teacher_targets="topk", on_policy_fraction=0.5)
    assert "\n" not in str(error.value)
    for options, match in (({"divergence": "jsd"}, "forward KL"), ({"teacher_targets": "dense"}, "not one of"),
                           ({"seqkd": True, "teacher_sampling_temperature": 1.0}, "greedy")):
        with pytest.raises(KdlabError, match=match):
            _method(splits, teacher, student, **{"teacher_targets": "sampled", **options})
    # The config check says the same before anything is built (λ defaults to 0.5).
    errors: list[str] = []
    cfg = SimpleNamespace(method=SimpleNamespace(options={"teacher_targets": "topk"}), student=SimpleNamespace(
        model="tinygpt"), train=SimpleNamespace(steps=10, epochs=1))
    gkd.check_config(cfg, errors)
    assert any("on_policy_fraction" in e for e in errors)


def test_k_larger_than_the_vocabulary_is_refused_before_any_work(splits, tmp_path):
    teacher, student = _tinygpt(splits, width=16, seed=1), _tinygpt(splits, width=8, seed=2)
    too_many = splits.num_classes + 1
    with pytest.raises(KdlabError, match="teacher_targets_k.*larger than the vocabulary") as error:
        _method(splits, teacher, student, teacher_targets="topk", teacher_targets_k=too_many)  # the student's V
    assert "\n" not in str(error.value)
    # A student that does not say its vocabulary: the cache refuses on the task's, before building anything.
    with pytest.raises(KdlabError, match="larger than the vocabulary"):
        stc.SeqTargetCache(tmp_path / "cache", teacher=teacher, splits=splits, kind="sampled", k=too_many, seed=0,
                           temperature=1.0, precision="fp32/same", seqkd=False)
    assert not (tmp_path / "cache").exists()


# --------------------------------------------------------------------------- training from the file


class _Crash(Exception):
    pass


@pytest.mark.parametrize("options", [
    pytest.param({"teacher_targets": "topk", "teacher_targets_k": 4}, id="supervised-topk"),
    pytest.param({"teacher_targets": "sampled", "teacher_targets_k": 4}, id="supervised-sampled"),
    pytest.param({"teacher_targets": "topk", "teacher_targets_k": 4, "seqkd": True}, id="seqkd-topk"),
])
def test_resumed_run_reuses_the_cache_without_the_teacher_and_is_exact(tmp_path, monkeypatch, options):
    splits = _splits(num_train=12)
    train = TrainConfig(epochs=3, batch_size=6, lr=0.01, device="cpu", checkpoint_every=1)
    cache_root = tmp_path / "cache"

    def build():
        teacher, student = _tinygpt(splits, width=16, seed=1), _tinygpt(splits, width=8, seed=2)
        return teacher, student, _method(splits, teacher, student, **options)

    builds = []
    original_build = stc.SeqTargetCache.build
    monkeypatch.setattr(stc.SeqTargetCache, "build", lambda self, *a, **k: builds.append(1) or
                        original_build(self, *a, **k))
    teacher, student, method = build()
    fit(student=student, method=method, teacher=teacher, splits=splits, train=train, seed=0,
        run_dir=tmp_path / "straight", teacher_cache_dir=cache_root)
    straight = {k: v.clone() for k, v in student.state_dict().items()}
    assert builds == [1]
    # SeqKD: one batched greedy generation per BUILD_ROWS train rows while building, none while training
    assert method.generation_calls["teacher"] == (len(range(0, 12, stc.BUILD_ROWS)) if options.get("seqkd") else 0)

    # From here on the cache is complete: no teacher forward may run in training.
    def no_teacher(self, *args, **kwargs):
        raise AssertionError("the teacher ran a training forward despite a complete cache")

    monkeypatch.setattr(loop._Fit, "run_teacher", no_teacher)

    def crash_after_epoch_2(epoch, metrics):
        if epoch == 2:
            raise _Crash

    teacher, student, method = build()
    with pytest.raises(_Crash):
        fit(student=student, method=method, teacher=teacher, splits=splits, train=train, seed=0,
            run_dir=tmp_path / "killed", on_epoch=crash_after_epoch_2, teacher_cache_dir=cache_root)
    teacher, student, method = build()
    fit(student=student, method=method, teacher=teacher, splits=splits, train=train, seed=0,
        run_dir=tmp_path / "killed", teacher_cache_dir=cache_root)
    assert builds == [1]  # reused by both later runs
    assert method.generation_calls["teacher"] == 0  # SeqKD responses come from the file too
    for name, tensor in student.state_dict().items():
        torch.testing.assert_close(tensor, straight[name], rtol=0, atol=1e-6, msg=name)


# --------------------------------------------------------------------------- through the command line

TINY = {
    "name": "offline-tiny",
    "data": {"dataset": "reverse", "num_train": 32, "num_test": 8, "max_length": 4},
    "teacher": {"model": "tinygpt", "layers": 1, "width": 16, "heads": 2,
                "train": {"steps": 2, "batch_size": 16, "optimizer": "adamw", "lr": 0.003}},
    "student": {"model": "tinygpt", "layers": 1, "width": 8, "heads": 2},
    "method": {"name": "gkd", "divergence": "forward_kl", "on_policy_fraction": 0.0, "teacher_targets": "topk",
               "teacher_targets_k": 4},
    "train": {"steps": 2, "batch_size": 16, "optimizer": "adamw", "lr": 0.003},
    "seeds": [0],
}


def _cli(tmp_path: Path, cfg: dict, *args: str) -> int:
    import yaml

    from kdlab.cli import main

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return main(["--workspace", str(tmp_path / "ws"), "run", str(path), "--quiet", *args])


@pytest.mark.parametrize("method, fragment", [
    ({"on_policy_fraction": 0.5}, "on_policy_fraction"),
    ({"on_policy_fraction": None}, "on_policy_fraction"),  # left out: λ's default 0.5
    ({"teacher_targets_k": 1000}, "larger than the vocabulary"),
])
def test_bad_offline_targets_exit_2_before_training(tmp_path, capsys, method, fragment):
    options = {**TINY["method"], **method}
    options = {k: v for k, v in options.items() if v is not None}
    assert _cli(tmp_path, {**TINY, "method": options}, "--dry-run") == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_run_through_the_cli_builds_and_trains_from_the_cache(tmp_path):
    assert _cli(tmp_path, TINY) == 0
    folders = list((tmp_path / "ws").rglob("sequence_targets/*/targets/done.json"))
    assert len(folders) == 1
