"""The vision zoo's methods (NST, VID, CC, KDSVD, AB, FT, OFD, CTKD): defaults, terms, gradients, bad taps, CLI."""
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
from kdlab.errors import ConfigError, KdlabError
from kdlab.losses import cross_entropy, kl
from kdlab.losses.ctkd import kl_at_learned_temperature
from kdlab.losses.ofd import ofd_margin, ofd_partial_l2
from kdlab.losses.zoo import (activation_boundary, correlation_congruence, factor_transfer, kdsvd, nst,
                              vid_nll)
from kdlab.methods.base import Batch, Outputs
from kdlab.models import Taps
from kdlab.store import Store

SHAPE = (3, 8, 8)
ZOO = ("nst", "vid", "cc", "kdsvd", "ab", "ft", "ofd", "ctkd")
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "zoo"


def resnet(arch):
    return registry.get("model", arch)(input_shape=SHAPE, num_classes=4, mean=(0.0,) * 3, std=(1.0,) * 3)


def build(name, **options):
    torch.manual_seed(0)
    student, teacher = resnet("resnet8"), resnet("resnet14")
    method = build_method(MethodConfig(name, options), student=student, teacher=teacher, input_shape=SHAPE)
    return method, student, teacher


def forward(method, student, teacher, n=6):
    inputs = torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(n) % 4
    with Taps(student, method.student_taps) as s_taps:
        s_out = Outputs(student(inputs), dict(s_taps.captured))
    with Taps(teacher, method.teacher_taps, detach=True) as t_taps, torch.no_grad():
        t_out = Outputs(teacher(inputs), dict(t_taps.captured))
    return Batch(inputs, labels), s_out, t_out


def test_defaults_are_the_official_ones():
    """mdistiller cfg.py (NST, VID) and torchdistill's CCKD sample config (CC); docs/methods.md names them."""
    h = registry.get("method", "nst").Hparams()
    assert (h.ce_weight, h.feature_weight, h.student_taps) == (1.0, 50.0, ("stage1", "stage2", "stage3"))
    h = registry.get("method", "vid").Hparams()
    assert (h.ce_weight, h.feature_weight, h.init_variance, h.eps) == (1.0, 1.0, 5.0, 1e-5)
    h = registry.get("method", "cc").Hparams()
    assert (h.ce_weight, h.kl_weight, h.temperature, h.cc_weight) == (0.0, 1.0, 1.0, 0.003)
    assert (h.gamma, h.max_p, h.kernel, h.embed_dim) == (0.4, 2, "gaussian", 128)
    h = registry.get("method", "kdsvd").Hparams()
    assert (h.ce_weight, h.feature_weight, h.k) == (1.0, 1.0, 1)
    h = registry.get("method", "ab").Hparams()
    assert (h.feature_weight, h.margin, h.init_fraction, h.ce_weight) == (0.003, 1.0, 0.05, 0.0)
    assert (h.kd_weight, h.temperature, h.fresh_optimizer) == (1.0, 3.0, True)
    h = registry.get("method", "ft").Hparams()
    assert (h.ce_weight, h.ft_weight, h.rate, h.p, h.paraphraser_fraction) == (1.0, 500.0, 0.5, 1, 0.025)
    h = registry.get("method", "ofd").Hparams()
    assert (h.ce_weight, h.feature_weight, h.student_taps) == (1.0, 0.001, ("stage1", "stage2", "stage3"))
    h = registry.get("method", "ctkd").Hparams()
    assert (h.ce_weight, h.kl_weight, h.t_start, h.t_range, h.init, h.lambda_max, h.lambda_epochs) == \
        (0.1, 0.9, 1.0, 20.0, 1.0, 1.0, 10)


def test_nst_terms_are_ce_and_fifty_times_the_stage_sum():
    method, student, teacher = build("nst")
    batch, s_out, t_out = forward(method, student, teacher)
    terms = method.loss_terms(batch, s_out, t_out)
    stages = ("stage1", "stage2", "stage3")
    expected = 50.0 * sum(nst(s_out.features[k], t_out.features[k]) for k in stages)
    assert list(terms) == ["ce", "nst"]
    assert terms["nst"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms["ce"].item() == pytest.approx(cross_entropy(s_out.logits, batch.labels).item(), rel=1e-6)
    sum(terms.values()).backward()
    assert student.get_submodule("stage1").parameters().__next__().grad.abs().sum() > 0
    assert not list(method.parameters())  # NST owns nothing


def test_vid_starts_at_the_initial_variance_and_learns_it():
    method, student, teacher = build("vid", init_variance=2.5)
    assert len(method.regressors) == 3 and len(method.log_scales) == 3
    for log_scale, channels in zip(method.log_scales, (16, 32, 64)):
        assert log_scale.shape == (channels,)
        variance = torch.nn.functional.softplus(log_scale) + 1e-5
        assert torch.allclose(variance, torch.full_like(variance, 2.5))
    # the variances are the method's parameters (mdistiller leaves them out of its optimiser; see vid.py)
    owned = {id(p) for p in method.parameters()}
    assert all(id(p) in owned for p in method.log_scales)
    batch, s_out, t_out = forward(method, student, teacher)
    terms = method.loss_terms(batch, s_out, t_out)
    expected = sum(vid_nll(reg(s_out.features[k]), t_out.features[k], a, eps=1e-5)
                   for k, reg, a in zip(("stage1", "stage2", "stage3"), method.regressors, method.log_scales))
    assert terms["vid"].item() == pytest.approx(expected.item(), rel=1e-6)
    sum(terms.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.log_scales)
    assert all(p.grad is not None for p in method.regressors.parameters())
    assert next(student.parameters()).grad.abs().sum() > 0


def test_vid_equals_the_authors_branch_and_gaussian_loss():
    """The authors' release (wide_residual_network.py ``branch1..3``: conv1x1(C_S→C_T), conv1x1(C_T→C_T), no bias,
    nothing between; loss.py ``GaussianLoss``: mean of ½((μ − t)²/σ² + log σ²); summed over the stages), in float64
    with their weights copied in; σ² = softplus(α) + ε (theirs has no ε: set 0 here)."""
    method, student, teacher = build("vid", eps=1e-300)
    assert [type(m).__name__ for m in method.regressors[0]] == ["Conv2d", "Conv2d"]
    batch, s_out, t_out = forward(method, student, teacher)
    expected = 0.0
    for k, reg, alpha in zip(("stage1", "stage2", "stage3"), method.regressors, method.log_scales):
        w1, w2 = (conv.weight.detach().double()[:, :, 0, 0] for conv in reg)
        assert reg[0].bias is None and reg[1].bias is None
        z = s_out.features[k].detach().double()
        mean = torch.einsum("oc,nchw->nohw", w2, torch.einsum("oc,nchw->nohw", w1, z))
        var = torch.log(torch.exp(alpha.detach().double()) + 1.0).reshape(1, -1, 1, 1)
        expected += torch.mean(0.5 * ((mean - t_out.features[k].double()) ** 2 / var + torch.log(var))).item()
    assert method.loss_terms(batch, s_out, t_out)["vid"].item() == pytest.approx(expected, rel=1e-5)


def test_vid_pools_a_larger_student_map():
    method, student, teacher = build("vid", student_taps=["stage1"], teacher_taps=["stage2"])
    assert method.regressors[0][0].in_channels == 16 and method.regressors[0][-1].out_channels == 32
    batch, s_out, t_out = forward(method, student, teacher)
    assert torch.isfinite(method.loss_terms(batch, s_out, t_out)["vid"])


def test_cc_trains_both_embeddings_and_its_terms_are_the_formula():
    method, student, teacher = build("cc")
    assert method.student_embed.weight.shape == (128, 64) and method.teacher_embed.weight.shape == (128, 64)
    batch, s_out, t_out = forward(method, student, teacher)
    terms = method.loss_terms(batch, s_out, t_out)
    e_s, e_t = method.student_embed(s_out.features["pool"]), method.teacher_embed(t_out.features["pool"])
    assert terms["cc"].item() == pytest.approx(0.003 * correlation_congruence(e_s, e_t).item(), rel=1e-6)
    assert terms["kl"].item() == pytest.approx(kl(s_out.logits, t_out.logits).item(), rel=1e-6)
    assert terms["ce"].item() == 0.0
    sum(terms.values()).backward()
    assert method.student_embed.weight.grad.abs().sum() > 0 and method.teacher_embed.weight.grad.abs().sum() > 0
    assert next(student.parameters()).grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())  # the teacher network itself stays frozen


@pytest.mark.parametrize("name", ["nst", "vid"])
def test_unknown_tap_lists_the_valid_ones(name):
    with pytest.raises(KdlabError, match=r"method.student_taps: student tap 'block9' does not exist; named stages: "
                                         r"stem, stage1, stage2, stage3, pool"):
        build(name, student_taps=["block9"], teacher_taps=["stage1"])


@pytest.mark.parametrize("name", ["nst", "vid"])
def test_vector_taps_and_unequal_counts_are_refused(name):
    with pytest.raises(KdlabError, match=r"\(C, H, W\) feature maps.*pool"):
        build(name, student_taps=["pool"], teacher_taps=["pool"])
    with pytest.raises(ConfigError, match="2 teacher taps for 1 student taps"):
        build(name, student_taps=["stage1"], teacher_taps=["stage1", "stage2"])


def test_cc_refuses_a_map_tap():
    with pytest.raises(KdlabError, match="tap the 'pool' stage"):
        build("cc", student_tap="stage3")


# ---------------------------------------------------------------------------
# Through the CLI: configs/zoo/<method>.yaml, a dry run and one epoch
# ---------------------------------------------------------------------------


def _tiny(tmp_path, name):
    cfg = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    cfg["data"].update(num_train=64, num_test=16)
    cfg["teacher"]["train"].update(epochs=1, device="cpu")
    cfg["train"].update(epochs=1, batch_size=16, device="cpu")
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("name", ZOO)
def test_cli_dry_run_and_one_epoch(tmp_path, capsys, name):
    path = _tiny(tmp_path, name)
    ws = ["--workspace", str(tmp_path / "ws")]
    assert main([*ws, "run", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"method {name}:" in out and "stage1 (2, 16, 8, 8)" in out
    assert main([*ws, "run", str(path), "--quiet"]) == 0
    runs = [r for r in Store(tmp_path / "ws").runs() if r.config["method"]["name"] == name]
    assert len(runs) == 1 and runs[0].status == "finished"
    assert math.isfinite(runs[0].final["test/acc"])
    logged = (runs[0].run_dir / "metrics.jsonl").read_text()
    term = {"ctkd": "kl"}.get(name, name)
    assert f'"train/loss/{term}"' in logged  # the method's own term was trained and logged
    if name == "ctkd":  # its learned temperature, logged each epoch by the loop
        assert '"method/temperature"' in logged


def test_cli_bad_tap_exits_2(tmp_path, capsys):
    cfg = yaml.safe_load(_tiny(tmp_path, "nst").read_text())
    cfg["method"]["teacher_taps"] = ["stage1", "stage2"]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["--workspace", str(tmp_path / "ws"), "run", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "method.teacher_taps" in err and "Traceback" not in err


def test_kdsvd_terms_and_its_stage_rules():
    method, student, teacher = build("kdsvd")
    assert not list(method.parameters())
    batch, s_out, t_out = forward(method, student, teacher)
    terms = method.loss_terms(batch, s_out, t_out)
    stages = ("stage1", "stage2", "stage3")
    expected = kdsvd([s_out.features[k] for k in stages], [t_out.features[k] for k in stages], k=1)
    assert list(terms) == ["ce", "kdsvd"] and terms["kdsvd"].item() == pytest.approx(expected.item(), rel=1e-6)
    sum(terms.values()).backward()
    assert next(student.parameters()).grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="at least two taps"):
        build("kdsvd", student_taps=["stage1"], teacher_taps=["stage1"])
    with pytest.raises(KdlabError, match="equal channel counts"):
        build("kdsvd", student_taps=["stage1", "stage2"], teacher_taps=["stage2", "stage3"])


def build_wide_ab(**options):
    """AB with a teacher twice as wide as the student, so each stage has a connector."""
    torch.manual_seed(0)
    student = resnet("resnet8")
    teacher = registry.get("model", "resnet_cifar")(input_shape=SHAPE, num_classes=4, mean=(0.0,) * 3,
                                                     std=(1.0,) * 3, depth=14, width_multiplier=2)
    method = build_method(MethodConfig("ab", options), student=student, teacher=teacher, input_shape=SHAPE)
    return method, student, teacher


def test_ab_taps_pre_relu_and_connects_only_unequal_widths():
    """The authors' ``Active_Soft_WRN_norelu``: pre-ReLU features; no connector where the widths are equal,
    else a 1×1 conv (N(0, √(2/C_out)), no bias) and BatchNorm."""
    method, _, _ = build("ab")
    assert method.student_taps == ("stage1.0.relu2:input", "stage2.0.relu2:input", "stage3.0.relu2:input")
    assert method.teacher_taps == ("stage1.1.relu2:input", "stage2.1.relu2:input", "stage3.1.relu2:input")
    assert [len(c) for c in method.connectors] == [0, 0, 0] and not list(method.parameters())
    method, _, _ = build_wide_ab()
    assert [(c[0].in_channels, c[0].out_channels, c[0].bias) for c in method.connectors] == \
        [(16, 32, None), (32, 64, None), (64, 128, None)]
    assert all(isinstance(c[1], torch.nn.BatchNorm2d) for c in method.connectors)
    assert method.connectors[2][0].weight.std().item() == pytest.approx((2 / 128) ** 0.5, rel=0.1)
    torch.manual_seed(0)
    wrn = [registry.get("model", "wrn")(input_shape=SHAPE, num_classes=4, mean=(0.0,) * 3, std=(1.0,) * 3,
                                        depth=d, widen_factor=k) for d, k in ((10, 2), (16, 4))]
    method = build_method(MethodConfig("ab", {}), student=wrn[0], teacher=wrn[1], input_shape=SHAPE)
    # pre-activation blocks: the BatchNorm output the next ReLU receives (authors: block{k+1}.layer[0].bn1, bn1)
    assert method.student_taps == method.teacher_taps == ("stage2.0.relu1:input", "stage3.0.relu1:input",
                                                          "pool.1:input")


def test_ab_initialises_through_connectors_then_distils_logits():
    method, student, teacher = build_wide_ab(init_fraction=0.25)
    method.set_progress(1, 10)  # 10 % < 25 %: the initialisation phase
    assert method.teacher_needed()
    batch, s_out, t_out = forward(method, student, teacher)
    assert all(v.min() < 0 for v in s_out.features.values())  # pre-ReLU
    terms = method.loss_terms(batch, s_out, t_out)
    # authors: (AB_3 + AB_2 / 2 + AB_1 / 4) / 1000 · 3
    expected = 0.003 * sum(activation_boundary(c(s_out.features[s]), t_out.features[t]) / 2 ** (2 - i)
                           for i, (s, t, c) in enumerate(zip(method.student_taps, method.teacher_taps,
                                                             method.connectors)))
    assert list(terms) == ["ab", "ce", "kd"] and terms["ce"].item() == 0.0 == terms["kd"].item()
    assert terms["ab"].item() == pytest.approx(expected.item(), rel=1e-6) and terms["ab"].item() > 0
    sum(terms.values()).backward()
    assert all(c[0].weight.grad.abs().sum() > 0 for c in method.connectors)
    assert next(student.parameters()).grad.abs().sum() > 0
    method.set_progress(3, 10)  # past it: the authors' KD alone, KL at T = 3 without T²
    assert method.teacher_needed()
    terms = method.loss_terms(batch, s_out, t_out)
    assert list(terms) == ["ab", "ce", "kd"] and terms["ab"].item() == 0.0 == terms["ce"].item()
    p_t = torch.softmax(t_out.logits.double() / 3, 1)
    log_p_s = torch.log_softmax(s_out.logits.double() / 3, 1)
    kd = -(p_t * (log_p_s - torch.log(p_t))).sum() / len(p_t)  # authors' train_KD
    assert terms["kd"].item() == pytest.approx(kd.item(), rel=1e-5)
    method, student, teacher = build("ab", init_fraction=0.25, kd_weight=0.0, ce_weight=1.0)
    method.set_progress(3, 10)  # torchdistill's second stage: CE alone, and no teacher forward
    assert not method.teacher_needed()
    batch, s_out, _ = forward(method, student, teacher)
    terms = method.loss_terms(batch, s_out, None)
    assert list(terms) == ["ab", "ce", "kd"] and terms["ab"].item() == 0.0 == terms["kd"].item()
    assert terms["ce"].item() == pytest.approx(cross_entropy(s_out.logits, batch.labels).item(), rel=1e-6)
    with pytest.raises(ConfigError, match="kd_weight"):
        build("ab", kd_weight=0.0, ce_weight=0.0)


def test_ab_asks_for_a_fresh_optimiser_once_at_the_first_ce_step():
    for fraction, total, boundary in ((0.25, 10, 3), (0.05, 40, 2), (0.5, 16, 8), (0.05, 10, 1)):
        method, _, _ = build("ab", init_fraction=fraction)
        asked = []
        for step in range(total):
            method.set_progress(step, total)
            asked.append(method.resets_optimizer())
        assert asked == [step == boundary for step in range(total)], (fraction, total)
    method, _, _ = build("ab", init_fraction=0.25, fresh_optimizer=False)
    method.set_progress(3, 10)
    assert not method.resets_optimizer()


@pytest.mark.parametrize("fresh", [True, False])
def test_the_loop_clears_the_optimiser_state_where_ab_starts_ce(tmp_path, fresh):
    """Adam's per-parameter step count before each optimiser step: reset to 0 at the first CE step (step 8 of
    16) with fresh_optimizer, counting on without it."""
    from kdlab.config import TrainConfig
    from kdlab.data import build_splits
    from kdlab.engine.build import build_model
    from kdlab.engine.loop import fit

    splits = build_splits("synthetic", {"num_classes": 4, "input_shape": SHAPE, "num_train": 80, "num_test": 16},
                          root=None, cache_dir=tmp_path / "cache", val_fraction=0.2, split_seed=0)
    train = TrainConfig(epochs=4, batch_size=16, lr=0.01, optimizer="adam", device="cpu")
    torch.manual_seed(0)
    teacher, student = build_model("resnet14", {}, splits), build_model("resnet8", {}, splits)
    method = build_method(MethodConfig("ab", {"init_fraction": 0.5, "fresh_optimizer": fresh}), student=student,
                          teacher=teacher, input_shape=SHAPE)
    first = next(student.parameters())
    counts = []

    def record(optimizer, args, kwargs):
        if any(p is first for group in optimizer.param_groups for p in group["params"]):
            state = optimizer.state.get(first, {})
            counts.append(int(state["step"]) if "step" in state else 0)

    from torch.optim.optimizer import register_optimizer_step_pre_hook
    handle = register_optimizer_step_pre_hook(record)
    try:
        fit(student=student, method=method, teacher=teacher, splits=splits, train=train, seed=0,
            run_dir=tmp_path / "run")
    finally:
        handle.remove()
    assert counts == (list(range(8)) * 2 if fresh else list(range(16)))


def test_ab_refuses_unequal_spatial_sizes():
    with pytest.raises(KdlabError, match="equal spatial sizes"):
        build("ab", student_taps=["stage1"], teacher_taps=["stage2"])


def test_ft_trains_the_paraphraser_first_then_the_student_through_the_translator():
    method, student, teacher = build("ft", paraphraser_fraction=0.25)
    enc, dec = method.paraphraser.encoder, method.paraphraser.decoder
    assert [(m.in_channels, m.out_channels) for m in enc if isinstance(m, torch.nn.Conv2d)] == \
        [(64, 64), (64, 32), (32, 32)]
    assert [(m.in_channels, m.out_channels) for m in dec if isinstance(m, torch.nn.ConvTranspose2d)] == \
        [(32, 32), (32, 64), (64, 64)]
    assert [m.out_channels for m in method.translator if isinstance(m, torch.nn.Conv2d)] == [64, 32, 32]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in method.modules())  # uses_bn: False
    method.set_progress(1, 10)  # the paraphraser phase: reconstruction only, the student untouched
    batch, s_out, t_out = forward(method, student, teacher)
    terms = method.loss_terms(batch, s_out, t_out)
    t = t_out.features["stage3"]
    assert list(terms) == ["reconstruction", "ce", "ft"] and terms["ce"].item() == 0.0 == terms["ft"].item()
    assert terms["reconstruction"].item() == pytest.approx((method.paraphraser(t) - t).abs().mean().item(), rel=1e-6)
    sum(terms.values()).backward()
    assert all(p.grad is None for p in student.parameters())
    assert all(p.grad is None for p in method.translator.parameters())
    assert all(p.grad is not None for p in method.paraphraser.parameters())
    method.zero_grad(set_to_none=True)
    method.set_progress(3, 10)  # then: CE + FT through the translator, the paraphraser frozen
    batch, s_out, t_out = forward(method, student, teacher)
    terms = method.loss_terms(batch, s_out, t_out)
    expected = 500.0 * factor_transfer(method.translator(s_out.features["stage3"]), method.paraphraser.encoder(t))
    assert terms["reconstruction"].item() == 0.0 and terms["ft"].item() == pytest.approx(expected.item(), rel=1e-6)
    sum(terms.values()).backward()
    assert all(p.grad is None for p in method.paraphraser.parameters())
    assert all(p.grad is not None for p in method.translator.parameters())
    assert next(student.parameters()).grad.abs().sum() > 0


def test_ft_terms_equal_the_authors_code():
    """train_Paraphraser.py / train_student.py / FeatureProjection.py transcribed in float64: every conv then
    LeakyReLU(0.1); reconstruction nn.L1Loss(); student loss CE + 500 · L1Loss(FT(translator(s)), FT(encoder(t)))."""
    F = torch.nn.functional
    method, student, teacher = build("ft", paraphraser_fraction=0.25)

    def run(x, convs, transposed=False):
        for m in convs:
            op = F.conv_transpose2d if transposed else F.conv2d
            x = F.leaky_relu(op(x, m.weight.double(), m.bias.double(), stride=1, padding=1), 0.1)
        return x

    def unit(x):  # utils.FT
        x = x.reshape(len(x), -1)
        return x / x.square().sum(dim=1, keepdim=True).sqrt().clamp_min(1e-12)

    convs = [m for m in method.paraphraser.encoder if isinstance(m, torch.nn.Conv2d)]
    deconvs = [m for m in method.paraphraser.decoder if isinstance(m, torch.nn.ConvTranspose2d)]
    translator = [m for m in method.translator if isinstance(m, torch.nn.Conv2d)]
    method.set_progress(1, 10)
    batch, s_out, t_out = forward(method, student, teacher)
    t = t_out.features["stage3"].double()
    rebuilt = run(run(t, convs), deconvs, transposed=True)
    expected = (rebuilt - t).abs().sum() / t.numel()
    assert method.loss_terms(batch, s_out, t_out)["reconstruction"].item() == pytest.approx(expected.item(), rel=1e-5)
    method.set_progress(3, 10)
    s = s_out.features["stage3"].detach()
    factor_s, factor_t = run(s.double(), translator), run(t, convs)
    expected = 500.0 * (unit(factor_s) - unit(factor_t)).abs().sum() / factor_s.numel()
    s_out.features["stage3"] = s.clone().requires_grad_()
    ft = method.loss_terms(batch, s_out, t_out)["ft"]
    assert ft.item() == pytest.approx(expected.item(), rel=1e-5)
    theirs = s.double().requires_grad_()
    (500.0 * (unit(run(theirs, translator)) - unit(factor_t)).abs().mean()).backward()
    ft.backward()
    assert torch.allclose(s_out.features["stage3"].grad.double(), theirs.grad, rtol=1e-4, atol=1e-6)  # float32 run


def test_ft_factor_channels_round_as_the_authors():
    """train_student.py: ``int(round(C · k))`` channels (torchdistill truncates): 64 · 0.34 = 21.76 → 22."""
    method, _, _ = build("ft", rate=0.34)
    assert [m.out_channels for m in method.translator if isinstance(m, torch.nn.Conv2d)] == [64, 22, 22]
    assert method.paraphraser.encoder[-2].out_channels == 22


@pytest.mark.parametrize("name", ["ft", "vid", "cc", "ab", "ofd", "ctkd"])
def test_method_parameters_survive_a_checkpoint_exactly(name):
    """The paraphraser, VID's variances, CC's embeddings and AB's connectors are saved and restored with the run."""
    make = build_wide_ab if name == "ab" else (lambda: build(name))  # ab: equal widths have no connector
    method, student, _ = make()
    with torch.no_grad():
        for p in method.parameters():
            p.add_(torch.randn_like(p))  # as if trained
    saved = {k: v.clone() for k, v in model_tensors(student, method).items()}
    fresh, fresh_student, _ = make()
    load_model_tensors(saved, fresh_student, fresh)
    assert all(torch.equal(a, b) for a, b in zip(method.state_dict().values(), fresh.state_dict().values()))
    assert any(k.startswith("method.") for k in saved)


def test_ft_refuses_unequal_spatial_sizes():
    with pytest.raises(KdlabError, match="equal spatial sizes"):
        build("ft", student_tap="stage2")


def test_ofd_taps_pre_relu_outputs_and_weighs_stages_by_halves():
    method, student, teacher = build("ofd")
    assert method.student_taps == ("stage1.0.relu2:input", "stage2.0.relu2:input", "stage3.0.relu2:input")
    assert method.teacher_taps[-1] == "stage3.1.relu2:input"  # resnet14: two blocks per stage, the last one's
    for i, stage in enumerate(("stage1", "stage2", "stage3")):
        bn = teacher.get_submodule(f"{stage}.1.bn2")
        assert torch.equal(getattr(method, f"margin{i}"), ofd_margin(bn.weight, bn.bias).float())
    batch, s_out, t_out = forward(method, student, teacher)
    with Taps(student, ["stage3"]) as plain:
        student(batch.inputs)
        # the tap is what the stage's last ReLU receives: it turns it into the stage output
        assert torch.allclose(torch.relu(s_out.features["stage3.0.relu2:input"]), plain["stage3"].detach())
    assert (s_out.features["stage3.0.relu2:input"] < 0).any()
    terms = method.loss_terms(batch, s_out, t_out)
    expected = sum(ofd_partial_l2(c(s_out.features[s]), t_out.features[t], getattr(method, f"margin{i}")) * w
                   for i, (s, t, c, w) in enumerate(zip(method.student_taps, method.teacher_taps, method.connectors,
                                                        (0.25, 0.5, 1.0))))
    assert terms["ofd"].item() == pytest.approx(0.001 * expected.item(), rel=1e-6)
    sum(terms.values()).backward()
    assert all(c[0].weight.grad.abs().sum() > 0 for c in method.connectors)
    assert next(student.parameters()).grad.abs().sum() > 0


def test_ofd_on_wrns_taps_each_stage_output_through_the_next_bn_as_the_authors():
    """clovaai/overhaul-distillation WideResNet: ``get_bn_before_relu`` = block2.layer[0].bn1, block3.layer[0].bn1,
    bn1, and ``extract_feature(preReLU=True)`` passes each stage output through that BN."""
    torch.manual_seed(0)
    wrn = registry.get("model", "wrn")
    kw = dict(input_shape=SHAPE, num_classes=4, mean=(0.0,) * 3, std=(1.0,) * 3)
    student, teacher = wrn(depth=10, widen_factor=1, **kw), wrn(depth=16, widen_factor=2, **kw)
    for net in (student, teacher):  # BN statistics away from (1, 0) so the margins and the BN matter
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-1, 1), m.running_mean.uniform_(-1, 1)
    teacher.eval()
    method = build_method(MethodConfig("ofd", {}), student=student, teacher=teacher, input_shape=SHAPE)
    bns = ("stage2.0.bn1", "stage3.0.bn1", "pool.0")  # tapped as the input of the ReLU each one feeds
    points = ("stage2.0.relu1:input", "stage3.0.relu1:input", "pool.1:input")
    assert method.student_taps == points and method.teacher_taps == points
    for i, bn in enumerate(teacher.get_submodule(p) for p in bns):
        assert torch.equal(getattr(method, f"margin{i}"), ofd_margin(bn.weight, bn.bias).float())
    batch, s_out, t_out = forward(method, student, teacher)
    with Taps(teacher, ["stage1", "stage2", "stage3"]) as plain, torch.no_grad():
        teacher(batch.inputs)
        for p, bn, stage in zip(points, bns, ("stage1", "stage2", "stage3")):
            assert torch.allclose(t_out.features[p], teacher.get_submodule(bn)(plain[stage]))
    terms = method.loss_terms(batch, s_out, t_out)
    expected = 0.0  # the authors' distillation_loss per stage, float64, / 2^(n−1−i), then / batch / 1000
    for i, (p, conn) in enumerate(zip(points, method.connectors)):
        src = conn(s_out.features[p]).detach().double()
        tgt = torch.maximum(t_out.features[p].double(), getattr(method, f"margin{i}").double().reshape(1, -1, 1, 1))
        expected += (((src - tgt) ** 2) * ((src > tgt) | (tgt > 0))).sum().item() / 2 ** (2 - i)
    assert terms["ofd"].item() == pytest.approx(expected / batch.inputs.shape[0] / 1000, rel=1e-5)
    sum(terms.values()).backward()
    assert next(student.parameters()).grad.abs().sum() > 0


def test_ofd_refuses_models_without_residual_stages():
    torch.manual_seed(0)
    mlp = registry.get("model", "mlp")(input_shape=SHAPE, num_classes=4, mean=(0.0,) * 3, std=(1.0,) * 3, width=8)
    with pytest.raises(KdlabError, match="method.student_taps: student stage 'stage1' does not exist"):
        build_method(MethodConfig("ofd", {}), student=mlp, teacher=resnet("resnet14"), input_shape=SHAPE)
    with pytest.raises(KdlabError, match="blocks ending in bn2 and relu2"):
        build("ofd", student_taps=["stem"], teacher_taps=["stage1"])


def test_ctkd_temperature_ascends_the_kd_loss_with_the_curriculum_strength():
    method, student, teacher = build("ctkd")
    assert method.temperature().item() == pytest.approx(1 + 20 / (1 + math.exp(-1)), rel=1e-6)  # τ = 1
    method.steps_per_epoch = 4
    batch, s_out, t_out = forward(method, student, teacher)
    grads = {}
    for step in (0, 12):  # epoch 1 (λ = (1 − cos(π/10))/2) and epoch 4
        method.set_progress(step, 100)
        method.zero_grad(set_to_none=True)
        terms = method.loss_terms(batch, s_out, t_out)
        tau = method.tau.detach().clone().requires_grad_()  # the plain derivative of the KD term in τ
        h = method.hparams
        plain = h.kl_weight * kl_at_learned_temperature(s_out.logits.detach(), t_out.logits,
                                                        h.t_start + h.t_range * torch.sigmoid(tau))
        (d_plain,) = torch.autograd.grad(plain, tau)
        terms["kl"].backward(retain_graph=True)
        lam = (1 - math.cos(math.pi * (step // 4 + 1) / 10)) / 2
        assert method.tau.grad.item() == pytest.approx(-lam * d_plain.item(), rel=1e-5)
        grads[step] = method.tau.grad.item()
    assert abs(grads[12]) > abs(grads[0])
    assert method.metrics()["lambda"] == pytest.approx((1 - math.cos(math.pi * 4 / 10)) / 2)
    assert next(student.parameters()).grad.abs().sum() > 0  # the student descends as usual


# ---------------------------------------------------------------------------
# Resume exact: a run killed after epoch 3 (epoch 2 on disk) ends where the uninterrupted one does
# ---------------------------------------------------------------------------


class _Crash(Exception):
    pass


@pytest.mark.parametrize("name, options", [("ft", {"paraphraser_fraction": 0.3}),  # the switch falls in epoch 2
                                           ("ctkd", {"lambda_epochs": 3}),
                                           # the fresh CE optimiser starts at epoch 3's first step: the resumed one
                                           ("ab", {"init_fraction": 0.5})])
def test_resume_is_exact_for_the_stateful_zoo_methods(tmp_path, name, options):
    from kdlab.config import TrainConfig
    from kdlab.data import build_splits
    from kdlab.engine.build import build_model
    from kdlab.engine.loop import fit

    splits = build_splits("synthetic", {"num_classes": 4, "input_shape": SHAPE, "num_train": 80, "num_test": 16},
                          root=None, cache_dir=tmp_path / "cache", val_fraction=0.2, split_seed=0)
    train = TrainConfig(epochs=4, batch_size=16, lr=0.01, checkpoint_every=1, eval_every=1, device="cpu")

    def fresh(seed):
        torch.manual_seed(123)  # ab: a wider teacher, so there are connectors to restore
        teacher = build_model(*(("resnet_cifar", {"depth": 14, "width_multiplier": 2}) if name == "ab"
                                else ("resnet14", {})), splits)
        torch.manual_seed(seed)
        student = build_model("resnet8", {}, splits)
        method = build_method(MethodConfig(name, dict(options)), student=student, teacher=teacher, input_shape=SHAPE)
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
    teacher, student, method = fresh(7)  # a new process: other initial weights, all restored from the checkpoint
    fit(student=student, method=method, teacher=teacher, splits=splits, train=train, seed=5, run_dir=tmp_path / "b")
    got = {**{f"s.{k}": v for k, v in student.state_dict().items()},
           **{f"m.{k}": v for k, v in method.state_dict().items()}}
    assert any(k.startswith("m.") for k in got)  # the paraphraser and translator / the temperature
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=key)
