"""ReviewKD (issue 21): HCL against a float64 transcription of the official hcl, the ABF review path and its
shapes, the warm-up, pre-activation teacher taps, bad stage counts, checkpointing and the CLI."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from kdlab import registry
from kdlab.cli import main
from kdlab.config import MethodConfig
from kdlab.engine.build import build_method
from kdlab.engine.state import load_model_tensors, model_tensors
from kdlab.errors import ConfigError, KdlabError
from kdlab.losses import cross_entropy
from kdlab.losses.reviewkd import hcl
from kdlab.methods.base import Batch, Outputs
from kdlab.models import Taps
from kdlab.store import Store

SHAPE = (3, 8, 8)
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "zoo" / "reviewkd.yaml"


def resnet(arch):
    return registry.get("model", arch)(input_shape=SHAPE, num_classes=4, mean=(0.0,) * 3, std=(1.0,) * 3)


def build(teacher_arch="resnet14", **options):
    torch.manual_seed(0)
    student, teacher = resnet("resnet8"), resnet(teacher_arch)
    method = build_method(MethodConfig("reviewkd", options), student=student, teacher=teacher, input_shape=SHAPE)
    return method, student, teacher


def forward(method, student, teacher, n=6):
    inputs = torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(1))
    with Taps(student, method.student_taps) as s_taps:
        s_out = Outputs(student(inputs), dict(s_taps.captured))
    with Taps(teacher, method.teacher_taps, detach=True) as t_taps, torch.no_grad():
        t_out = Outputs(teacher(inputs), dict(t_taps.captured))
    return Batch(inputs, torch.arange(n) % 4), s_out, t_out


def test_defaults_are_the_official_ones():
    """mdistiller cfg.py REVIEWKD (CE 1, weight 1, warm-up 20, max mid 512, STU_PREACT False); train.py's defaults."""
    h = registry.get("method", "reviewkd").Hparams()
    assert (h.ce_weight, h.reviewkd_weight, h.warmup_epochs, h.max_mid_channel) == (1.0, 1.0, 20, 512)
    assert (h.student_preact, h.teacher_preact) == (False, True)
    assert h.student_taps == h.teacher_taps == ("stage1", "stage2", "stage3", "pool")
    assert h.in_channels is None and h.out_channels is None


def test_hcl_on_a_hand_worked_map():
    # One 2×2 map s = [[1, 2], [3, 4]] against zeros. Levels 4 and 2 are skipped (l ≥ H = 2); level 1 weighs ½.
    # mse = (1 + 4 + 9 + 16)/4 = 7.5; pooled mean 2.5 → mse 6.25; (7.5 + ½·6.25) / (1 + ½) = 7.0833333
    s = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    assert hcl([s], [torch.zeros_like(s)]).item() == pytest.approx(7.0833333, abs=1e-6)
    # A 1×1 map has no level below it: plain mse.
    assert hcl([torch.full((1, 2, 1, 1), 3.0)], [torch.ones(1, 2, 1, 1)]).item() == pytest.approx(4.0)


def _official_hcl(fs_list, ft_list):
    """The official hcl with Python floats; adaptive pooling of an H×H map to l×l (H divisible by l) as block means."""
    def pool(x, l):  # x: nested [n][c][h][w]
        h = len(x[0][0])
        k = h // l
        return [[[[sum(ch[i * k + a][j * k + b] for a in range(k) for b in range(k)) / (k * k) for j in range(l)]
                  for i in range(l)] for ch in sample] for sample in x]

    def mse(a, b):
        flat_a = [v for s in a for c in s for r in c for v in r]
        flat_b = [v for s in b for c in s for r in c for v in r]
        return sum((x - y) ** 2 for x, y in zip(flat_a, flat_b)) / len(flat_a)

    loss_all = 0.0
    for fs, ft in zip(fs_list, ft_list):
        h = len(fs[0][0])
        loss, cnt, tot = mse(fs, ft), 1.0, 1.0
        for l in (4, 2, 1):
            if l >= h:
                continue
            cnt /= 2.0
            loss += mse(pool(fs, l), pool(ft, l)) * cnt
            tot += cnt
        loss_all += loss / tot
    return loss_all


def test_hcl_against_a_float64_transcription_of_the_official_code():
    torch.manual_seed(0)
    shapes = [(2, 3, 8, 8), (2, 4, 4, 4), (2, 5, 2, 2), (2, 5, 1, 1)]
    s = [torch.randn(*shape, dtype=torch.float64) for shape in shapes]
    t = [torch.randn(*shape, dtype=torch.float64) for shape in shapes]
    expected = _official_hcl([x.tolist() for x in s], [x.tolist() for x in t])
    assert hcl(s, t).item() == pytest.approx(expected, rel=1e-12)


def test_hcl_gradcheck():
    torch.manual_seed(0)
    s = torch.randn(1, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    t = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: hcl([x], [t]), (s,))


def test_abf_shapes_follow_the_student_and_teacher_taps():
    method, _, _ = build("resnet8x4")  # teacher stages of 64/128/256 channels, student 16/32/64
    assert len(method.abfs) == 4
    assert [a.conv1[0].in_channels for a in method.abfs] == [16, 32, 64, 64]
    assert [a.conv1[0].out_channels for a in method.abfs] == [64] * 4  # mid = min(512, 64)
    assert [a.conv2[0].out_channels for a in method.abfs] == [64, 128, 256, 256]
    assert [a.conv2[0].kernel_size for a in method.abfs] == [(3, 3)] * 4
    assert [a.att_conv is not None for a in method.abfs] == [True, True, True, False]  # the deepest fuses nothing
    assert method.abfs[0].att_conv[0].in_channels == 128 and method.abfs[0].att_conv[0].out_channels == 2
    assert method.out_sizes == [(8, 8), (4, 4), (2, 2), (1, 1)]
    wide, _, _ = build("resnet8x4", max_mid_channel=32)
    assert [a.conv1[0].out_channels for a in wide.abfs] == [32] * 4


def test_the_review_path_fuses_from_deep_to_shallow():
    method, student, teacher = build("resnet8x4")
    method.steps_per_epoch = 4
    method.set_progress(8, 100)  # epoch 3: warm-up weight 3/20
    batch, s_out, t_out = forward(method, student, teacher)
    terms = method.loss_terms(batch, s_out, t_out)
    # The chain written out: pool (as 1×1) → stage3 → stage2 → stage1, each ABF by hand.
    feats = [s_out.features[k] for k in ("stage1", "stage2", "stage3")] + [s_out.features["pool"][:, :, None, None]]
    outs, residual = [None] * 4, None
    for i in (3, 2, 1, 0):
        abf = method.abfs[i]
        x = abf.conv1(feats[i])
        if residual is not None:
            y = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            z = abf.att_conv(torch.cat([x, y], 1))
            x = x * z[:, 0:1] + y * z[:, 1:2]
        outs[i], residual = abf.conv2(x), x
    targets = [t_out.features[k] for k in method.teacher_taps[:3]] + [t_out.features["pool"][:, :, None, None]]
    assert [tuple(o.shape) for o in outs] == [tuple(t.shape) for t in targets]
    expected = 3 / 20 * hcl(outs, targets)
    assert list(terms) == ["ce", "reviewkd"]
    assert terms["reviewkd"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(cross_entropy(s_out.logits, batch.labels).item(), rel=1e-6)
    sum(terms.values()).backward()
    assert next(student.parameters()).grad.abs().sum() > 0
    assert all(p.grad is not None for p in method.abfs.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_a_fused_map_is_resized_to_the_teachers_size():
    # The student's stage2 (4×4) reviewed against the teacher's stage1 (8×8): official `x.shape[-1] != out_shape`.
    method, student, teacher = build(student_taps=["stage2", "stage3"], teacher_taps=["stage1", "stage2"])
    assert method.out_sizes == [(8, 8), (4, 4)]
    batch, s_out, t_out = forward(method, student, teacher)
    deep, residual = method.abfs[1](s_out.features["stage3"], None, (4, 4))
    assert deep.shape == (6, 32, 4, 4) and residual.shape == (6, 64, 4, 4)
    out, carried = method.abfs[0](s_out.features["stage2"], residual, (8, 8))
    assert out.shape == (6, 16, 8, 8) and carried.shape == (6, 64, 8, 8)  # fused at 4×4, then resized
    assert torch.isfinite(method.loss_terms(batch, s_out, t_out)["reviewkd"])


def test_warmup_is_linear_over_the_first_epochs_counted_from_one():
    method, _, _ = build()
    method.steps_per_epoch = 4
    for step, weight in ((0, 1 / 20), (3, 1 / 20), (4, 2 / 20), (76, 20 / 20), (400, 1.0)):
        method.set_progress(step, 1000)
        assert method.warmup() == pytest.approx(weight)
    none, _, _ = build(warmup_epochs=0)
    assert none.warmup() == 1.0


def test_teacher_taps_are_pre_activation_and_the_students_post():
    method, student, teacher = build()
    assert method.student_taps == ("stage1", "stage2", "stage3", "pool")
    assert method.teacher_taps == ("stage1.1.relu2:input", "stage2.1.relu2:input", "stage3.1.relu2:input", "pool")
    _, _, t_out = forward(method, student, teacher)
    with Taps(teacher, ["stage3"]) as plain, torch.no_grad():
        teacher(torch.rand(6, *SHAPE, generator=torch.Generator().manual_seed(1)))
        assert torch.allclose(torch.relu(t_out.features["stage3.1.relu2:input"]), plain["stage3"])
    assert (t_out.features["stage3.1.relu2:input"] < 0).any()
    post, _, _ = build(teacher_preact=False, student_preact=True)
    assert post.teacher_taps == ("stage1", "stage2", "stage3", "pool")
    assert post.student_taps[0] == "stage1.0.relu2:input"


def test_mismatched_stage_counts_are_refused():
    with pytest.raises(ConfigError, match=r"method.teacher_taps: 3 teacher stages for 4 student stages"):
        build(teacher_taps=["stage1", "stage2", "stage3"])
    with pytest.raises(ConfigError, match=r"method.in_channels: 3 ABF channel counts for 4 stages"):
        build(in_channels=[16, 32, 64])
    with pytest.raises(ConfigError, match=r"method.out_channels: 5 ABF channel counts for 4 stages"):
        build(out_channels=[16, 32, 64, 64, 64])
    with pytest.raises(KdlabError, match=r"method.out_channels: \[64, 128, 256, 256\] does not match the channels "
                                         r"of the teacher taps, \[16, 32, 64, 64\]"):
        build(out_channels=[64, 128, 256, 256])
    method, _, _ = build("resnet8x4", in_channels=[16, 32, 64, 64], out_channels=[64, 128, 256, 256])
    assert len(method.abfs) == 4  # the official lists, when they match the taps


def test_bad_taps_are_refused_with_the_valid_ones():
    with pytest.raises(KdlabError, match=r"method.student_taps: student tap 'layer4' does not exist; named stages: "
                                         r"stem, stage1, stage2, stage3, pool"):
        build(student_taps=["stage1", "layer4"], teacher_taps=["stage1", "stage2"])
    with pytest.raises(KdlabError, match="no pre-activation output.*teacher_preact: false"):
        build(student_taps=["stem", "stage1"], teacher_taps=["stem", "stage1"])


def test_a_single_sample_batch_is_refused_in_one_line():
    method, student, teacher = build()
    batch, s_out, t_out = forward(method, student, teacher, n=1)
    with pytest.raises(KdlabError, match=r"^method reviewkd: a training batch of 1 sample\(s\).*train.batch_size"):
        method.loss_terms(batch, s_out, t_out)
    method.eval()  # BatchNorm on running statistics: one sample is fine
    assert torch.isfinite(method.loss_terms(batch, s_out, t_out)["reviewkd"])


def test_abfs_survive_a_checkpoint_exactly():
    method, student, _ = build()
    with torch.no_grad():
        for p in method.parameters():
            p.add_(torch.randn_like(p))
    saved = {k: v.clone() for k, v in model_tensors(student, method).items()}
    fresh, fresh_student, _ = build()
    load_model_tensors(saved, fresh_student, fresh)
    assert all(torch.equal(a, b) for a, b in zip(method.state_dict().values(), fresh.state_dict().values()))
    assert any(k.startswith("method.abfs.0.att_conv") for k in saved)


def _tiny(tmp_path, **method):
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["data"].update(num_train=64, num_test=16)
    cfg["teacher"]["train"].update(epochs=1, device="cpu")
    cfg["train"].update(epochs=1, batch_size=16, device="cpu")
    cfg["method"].update(method)
    path = tmp_path / "reviewkd.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_dry_run(tmp_path, capsys):
    path = _tiny(tmp_path)
    ws = ["--workspace", str(tmp_path / "ws")]
    assert main([*ws, "run", str(path), "--dry-run"]) == 0
    assert "method reviewkd:" in capsys.readouterr().out
    assert not list(Store(tmp_path / "ws").runs())


@pytest.mark.integration
def test_cli_one_epoch(tmp_path):
    path = _tiny(tmp_path)
    ws = ["--workspace", str(tmp_path / "ws")]
    assert main([*ws, "run", str(path), "--quiet"]) == 0
    [run] = [r for r in Store(tmp_path / "ws").runs() if r.config["method"]["name"] == "reviewkd"]
    assert run.status == "finished" and math.isfinite(run.final["test/acc"])
    assert '"train/loss/reviewkd"' in (run.run_dir / "metrics.jsonl").read_text()


def test_cli_mismatched_stages_exit_2_before_any_run(tmp_path, capsys):
    path = _tiny(tmp_path, in_channels=[16, 32])
    assert main(["--workspace", str(tmp_path / "ws"), "run", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "method.in_channels: 2 ABF channel counts for 4 stages" in err and "Traceback" not in err
    assert not list(Store(tmp_path / "ws").runs())
