"""CRD (issue 21): the NCE loss against the official ContrastLoss/ContrastMemory, re-derived in float64; the
memory's momentum update and fixed Z; negatives; the embedding heads; bad input; resume exact; the CLI."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from kdlab import registry
from kdlab.cli import main
from kdlab.config import MethodConfig
from kdlab.engine.build import build_method
from kdlab.engine.state import load_model_tensors, model_tensors
from kdlab.errors import KdlabError
from kdlab.losses import cross_entropy, kl
from kdlab.losses.crd import contrast_scores, l2_normalize, nce_loss, sample_negatives
from kdlab.methods.base import Batch, Outputs
from kdlab.models import Taps
from kdlab.store import Store

SHAPE = (3, 8, 8)
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "zoo" / "crd.yaml"


def resnet(arch):
    return registry.get("model", arch)(input_shape=SHAPE, num_classes=4, mean=(0.0,) * 3, std=(1.0,) * 3)


def build(train_size=12, **options):
    torch.manual_seed(0)
    student, teacher = resnet("resnet8"), resnet("resnet14")
    method = build_method(MethodConfig("crd", {"nce_k": 5, **options}), student=student, teacher=teacher,
                          input_shape=SHAPE, train_size=train_size)
    return method, student, teacher


def forward(method, student, teacher, rows, labels):
    inputs = torch.rand(len(rows), *SHAPE, generator=torch.Generator().manual_seed(int(sum(rows))))
    with Taps(student, method.student_taps) as s_taps:
        s_out = Outputs(student(inputs), dict(s_taps.captured))
    with Taps(teacher, method.teacher_taps, detach=True) as t_taps, torch.no_grad():
        t_out = Outputs(teacher(inputs), dict(t_taps.captured))
    return Batch(inputs, torch.tensor(labels), torch.tensor(rows)), s_out, t_out


def capture_index(method):
    """Record the (B, K+1) index each loss_terms call draws."""
    drawn, draw = [], method.contrast_index
    method.contrast_index = lambda *args: drawn.append(draw(*args)) or drawn[-1]
    return drawn


def test_defaults_are_the_official_ones():
    """RepDistiller train_student.py argparse + README's CRD command (-r 1 -a 0 -b 0.8); mdistiller cfg.py CRD."""
    h = registry.get("method", "crd").Hparams()
    assert (h.ce_weight, h.kl_weight, h.crd_weight, h.temperature) == (1.0, 0.0, 0.8, 4.0)
    assert (h.feat_dim, h.nce_k, h.nce_t, h.nce_m) == (128, 16384, 0.07, 0.5)
    assert (h.negatives, h.student_tap, h.teacher_tap) == ("other_classes", "pool", "pool")


def test_nce_loss_on_a_hand_worked_batch():
    # N = 4 samples, K = 2 negatives: K·P_n = 0.5. Row: P⁺ = 0.5, P⁻ = (0.1, 0.2).
    # −ln(0.5/1.0) − ln(0.5/0.6) − ln(0.5/0.7) = 0.69314718 + 0.18232156 + 0.33647224 = 1.21194097 (ε = 1e-7 aside)
    # Second row: P⁺ = 1.5, P⁻ = (0.5, 0.0): −ln(1.5/2) − ln(0.5/1) − ln(0.5/0.5) = 0.28768207 + 0.69314718 + 0
    probs = torch.tensor([[0.5, 0.1, 0.2], [1.5, 0.5, 0.0]], dtype=torch.float64)
    assert nce_loss(probs, 4).item() == pytest.approx((1.21194097 + 0.98082925) / 2, abs=1e-6)


def _official_nce(p, n_data):
    """ContrastLoss.forward, transcribed with Python floats."""
    eps, m = 1e-7, len(p[0]) - 1
    pn = 1.0 / n_data
    total = 0.0
    for row in p:
        total += math.log(row[0] / (row[0] + m * pn + eps))
        total += sum(math.log((m * pn) / (x + m * pn + eps)) for x in row[1:])
    return -total / len(p)


def _normalize(v):
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def test_crd_term_equals_a_float64_rederivation_of_the_official_memory_and_loss():
    method, student, teacher = build(train_size=12, kl_weight=1.0)
    drawn = capture_index(method)
    mem_s0, mem_t0 = method.memory_s.double().tolist(), method.memory_t.double().tolist()
    rows, labels = [3, 7, 0, 10], [0, 1, 1, 2]
    batch, s_out, t_out = forward(method, student, teacher, rows, labels)
    terms = method.loss_terms(batch, s_out, t_out)
    (index,) = drawn
    assert index.shape == (4, 6) and index[:, 0].tolist() == rows

    def embed(linear, f):
        w, b = linear.weight.double().tolist(), linear.bias.double().tolist()
        return [_normalize([sum(wi * fi for wi, fi in zip(wr, row)) + bi for wr, bi in zip(w, b)]) for row in f]

    e_s = embed(method.embed_s.linear, s_out.features["pool"].detach().double().tolist())
    e_t = embed(method.embed_t.linear, t_out.features["pool"].double().tolist())
    n, tau = 12, 0.07
    # ContrastMemory.forward: out_v1 scores the student anchor on the teacher memory (memory_v2), out_v2 the reverse
    out_s = [[math.exp(sum(a * m for a, m in zip(e_s[b], mem_t0[j])) / tau) for j in index[b].tolist()] for b in range(4)]
    out_t = [[math.exp(sum(a * m for a, m in zip(e_t[b], mem_s0[j])) / tau) for j in index[b].tolist()] for b in range(4)]
    z_s = sum(map(sum, out_s)) / (4 * 6) * n  # Z = mean · N, set on the first batch
    z_t = sum(map(sum, out_t)) / (4 * 6) * n
    expected = _official_nce([[x / z_s for x in r] for r in out_s], n) + _official_nce([[x / z_t for x in r] for r in out_t], n)
    assert terms["crd"].item() == pytest.approx(0.8 * expected, rel=1e-5)
    assert method.z.tolist() == pytest.approx([z_s, z_t], rel=1e-5)
    assert terms["ce"].item() == pytest.approx(cross_entropy(s_out.logits, batch.labels).item(), rel=1e-6)
    assert terms["kl"].item() == pytest.approx(kl(s_out.logits, t_out.logits, temperature=4.0).item(), rel=1e-6)
    # The memory update: the batch's rows move halfway to the new embedding, renormalised; the rest are untouched.
    for b, r in enumerate(rows):
        want_s = _normalize([0.5 * m + 0.5 * e for m, e in zip(mem_s0[r], e_s[b])])
        want_t = _normalize([0.5 * m + 0.5 * e for m, e in zip(mem_t0[r], e_t[b])])
        assert method.memory_s[r].tolist() == pytest.approx(want_s, abs=1e-6)
        assert method.memory_t[r].tolist() == pytest.approx(want_t, abs=1e-6)
    others = [r for r in range(12) if r not in rows]
    assert method.memory_s[others].double().tolist() == [mem_s0[r] for r in others]
    # The gradients: the student through its embedding, the teacher's embedding head too; not the memories.
    sum(terms.values()).backward()
    assert next(student.parameters()).grad.abs().sum() > 0
    assert method.embed_s.linear.weight.grad.abs().sum() > 0 and method.embed_t.linear.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_z_is_fixed_after_the_first_batch():
    method, student, teacher = build()
    method.loss_terms(*forward(method, student, teacher, [0, 1, 2], [0, 1, 2]))
    z = method.z.clone()
    assert (z > 0).all()
    method.set_progress(1, 10)
    method.loss_terms(*forward(method, student, teacher, [5, 6, 7], [1, 2, 3]))
    assert torch.equal(method.z, z)


def test_the_contrast_runs_in_float32_under_autocast():
    """exp(1/0.07) ≈ 1.6e6 overflows fp16: the contrast ignores the loop's autocast and matches fp32."""
    plain, student, teacher = build()
    mixed, _, _ = build()
    batch, s_out, t_out = forward(plain, student, teacher, [0, 1, 2], [0, 1, 2])
    want = plain.loss_terms(batch, s_out, t_out)["crd"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mixed.loss_terms(batch, s_out, t_out)["crd"]
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want.item(), rel=1e-6)
    assert mixed.memory_s.dtype == torch.float32 and torch.equal(mixed.memory_s, plain.memory_s)


def test_nce_gradcheck_through_the_scores():
    torch.manual_seed(0)
    memory = l2_normalize(torch.randn(9, 5, dtype=torch.float64))
    index = torch.tensor([[0, 3, 4, 8], [1, 2, 5, 6]])
    anchor = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a: nce_loss(contrast_scores(l2_normalize(a), memory, index, 0.07) / 7.5, 9), (anchor,))


def test_negatives_avoid_the_sample_and_its_class_and_are_distinct():
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    rows = torch.tensor([0, 4, 8])
    excluded = labels.unsqueeze(0) == labels[rows].unsqueeze(1)
    for seed in range(20):
        drawn = sample_negatives(rows, 6, 12, torch.Generator().manual_seed(seed), excluded=excluded)
        assert drawn.shape == (3, 6)
        for r, row in zip(rows.tolist(), drawn.tolist()):
            assert len(set(row)) == 6 and r not in row and all(labels[j] != labels[r] for j in row)
    # Nine other-class samples for 12 draws: with replacement, as the official np.random.choice(replace=k > n).
    drawn = sample_negatives(rows, 11, 12, torch.Generator().manual_seed(0), excluded=excluded)
    assert all(labels[j] != labels[r] for r, row in zip(rows.tolist(), drawn.tolist()) for j in row)
    # Any sample but itself: uniform (each of the 11 others about equally often).
    counts = torch.zeros(12)
    for seed in range(300):
        row = sample_negatives(torch.tensor([5]), 3, 12, torch.Generator().manual_seed(seed))[0]
        counts[row] += 1
    assert counts[5] == 0 and counts.sum() == 900 and counts.max() < 1.6 * counts[counts > 0].min()


def test_the_method_learns_labels_and_draws_per_step():
    method, student, teacher = build(train_size=12)
    drawn = capture_index(method)
    method.loss_terms(*forward(method, student, teacher, [0, 1, 2, 3], [0, 0, 1, 1]))
    assert method.labels.tolist() == [0, 0, 1, 1] + [-1] * 8
    first = drawn[0]
    assert 1 not in first[0, 1:].tolist() and 0 not in first[1, 1:].tolist()  # a seen classmate is never drawn
    method.set_progress(1, 10)
    method.loss_terms(*forward(method, student, teacher, [0, 1, 2, 3], [0, 0, 1, 1]))
    assert not torch.equal(drawn[1], first)  # a new step, new negatives
    method.set_progress(0, 10)
    assert torch.equal(method.contrast_index(torch.arange(4), method.labels[:4]), first)  # and the same again


def test_embedding_heads_and_memory_shapes():
    method, _, _ = build(train_size=30)
    assert method.embed_s.linear.weight.shape == (128, 64) and method.embed_t.linear.weight.shape == (128, 64)
    assert method.memory_s.shape == (30, 128) == method.memory_t.shape
    bound = 1 / math.sqrt(128 / 3)
    assert method.memory_s.abs().max() <= bound and method.memory_t.abs().max() <= bound
    torch.manual_seed(0)
    wide = build_method(MethodConfig("crd", {"nce_k": 5, "feat_dim": 16, "student_tap": "stage3"}),
                        student=resnet("resnet8"), teacher=resnet("resnet8x4"), input_shape=SHAPE, train_size=12)
    assert wide.embed_s.linear.weight.shape == (16, 64 * 2 * 2)  # a map tap is flattened, as the official Embed
    assert wide.embed_t.linear.weight.shape == (16, 256)


def test_bad_input_is_refused_before_training():
    with pytest.raises(KdlabError, match=r"^method.nce_k: 12 negatives per sample, but the train split has 12 "
                                         r"samples; set nce_k to at most 11$"):
        build(train_size=12, nce_k=12)
    with pytest.raises(KdlabError, match="needs the samples' indices"):
        build(train_size=None)
    with pytest.raises(KdlabError, match=r"method.student_taps: student tap 'penultimate' does not exist; named "
                                         r"stages: stem, stage1, stage2, stage3, pool"):
        build(student_tap="penultimate")
    method, student, teacher = build()
    batch, s_out, t_out = forward(method, student, teacher, [0, 1], [0, 1])
    batch.indices = None
    with pytest.raises(KdlabError, match="no sample indices"):
        method.loss_terms(batch, s_out, t_out)


def test_state_round_trip_restores_the_memory_exactly():
    method, student, teacher = build()
    method.loss_terms(*forward(method, student, teacher, [0, 1, 2], [0, 1, 2]))
    saved = {k: v.clone() for k, v in model_tensors(student, method).items()}
    rows = torch.arange(4)
    negatives = method.contrast_index(rows, method.labels[rows])  # step 0's draw, in this process
    assert {"method.memory_s", "method.memory_t", "method.z", "method.labels", "method.sample_seed"} <= set(saved)
    torch.manual_seed(99)  # another process: other initial memories and sampling seed, all restored
    fresh_student, fresh_teacher = resnet("resnet8"), resnet("resnet14")
    fresh = build_method(MethodConfig("crd", {"nce_k": 5}), student=fresh_student, teacher=fresh_teacher,
                         input_shape=SHAPE, train_size=12)
    assert not torch.equal(fresh.memory_s, method.memory_s)
    load_model_tensors(saved, fresh_student, fresh)
    for (name, a), b in zip(method.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(fresh.contrast_index(rows, fresh.labels[rows]), negatives)  # the saved seed, not the process's


class _Crash(Exception):
    pass


@pytest.mark.integration
def test_resume_after_a_kill_is_exact(tmp_path):
    """A run killed in epoch 3 (epoch 2 on disk) and resumed in a fresh build ends as the uninterrupted one."""
    from kdlab.config import TrainConfig
    from kdlab.data import build_splits
    from kdlab.engine.build import build_model
    from kdlab.engine.loop import fit

    splits = build_splits("synthetic", {"num_classes": 4, "input_shape": SHAPE, "num_train": 80, "num_test": 16},
                          root=None, cache_dir=tmp_path / "cache", val_fraction=0.2, split_seed=0)
    train = TrainConfig(epochs=4, batch_size=16, lr=0.01, checkpoint_every=1, eval_every=1, device="cpu")

    def fresh(seed):
        torch.manual_seed(123)
        teacher = build_model("resnet14", {}, splits)
        torch.manual_seed(seed)
        student = build_model("resnet8", {}, splits)
        method = build_method(MethodConfig("crd", {"nce_k": 20}), student=student, teacher=teacher,
                              input_shape=SHAPE, train_size=len(splits.train[0]))
        return teacher, student, method

    teacher, student, method = fresh(0)
    fit(student=student, method=method, teacher=teacher, splits=splits, train=train, seed=5, run_dir=tmp_path / "a")
    expected = {**{f"s.{k}": v.clone() for k, v in student.state_dict().items()},
                **{f"m.{k}": v.clone() for k, v in method.state_dict().items()}}

    def crash_in_epoch_3(epoch, metrics):
        if epoch == 3:
            raise _Crash

    teacher, student, method = fresh(0)
    with pytest.raises(_Crash):
        fit(student=student, method=method, teacher=teacher, splits=splits, train=train, seed=5,
            run_dir=tmp_path / "b", on_epoch=crash_in_epoch_3)
    teacher, student, method = fresh(7)
    fit(student=student, method=method, teacher=teacher, splits=splits, train=train, seed=5, run_dir=tmp_path / "b")
    got = {**{f"s.{k}": v for k, v in student.state_dict().items()},
           **{f"m.{k}": v for k, v in method.state_dict().items()}}
    assert (got["m.labels"] >= 0).all()  # every sample seen, its label learned
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=key)


def _tiny(tmp_path, **method):
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["data"].update(num_train=64, num_test=16)
    cfg["teacher"]["train"].update(epochs=1, device="cpu")
    cfg["train"].update(epochs=1, batch_size=16, device="cpu")
    cfg["method"].update({"nce_k": 16, **method})
    path = tmp_path / "crd.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_dry_run(tmp_path, capsys):
    path = _tiny(tmp_path)
    ws = ["--workspace", str(tmp_path / "ws")]
    assert main([*ws, "run", str(path), "--dry-run"]) == 0
    assert "method crd:" in capsys.readouterr().out
    assert not list(Store(tmp_path / "ws").runs())


@pytest.mark.integration
def test_cli_one_epoch(tmp_path):
    path = _tiny(tmp_path)
    ws = ["--workspace", str(tmp_path / "ws")]
    assert main([*ws, "run", str(path), "--quiet"]) == 0
    [run] = [r for r in Store(tmp_path / "ws").runs() if r.config["method"]["name"] == "crd"]
    assert run.status == "finished" and math.isfinite(run.final["test/acc"])
    logged = (run.run_dir / "metrics.jsonl").read_text()
    assert '"train/loss/crd"' in logged and '"method/z_student"' in logged


def test_cli_too_many_negatives_exits_2_before_any_run(tmp_path, capsys):
    path = _tiny(tmp_path, nce_k=16384)
    assert main(["--workspace", str(tmp_path / "ws"), "run", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "method.nce_k: 16384 negatives" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not list(Store(tmp_path / "ws").runs())
