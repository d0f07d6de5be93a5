"""The qat_kd method (Kim et al. 2022): each term against a float64 hand computation, layer maps, build errors,
quantized students (student.quant / student.init: teacher) and a tiny end-to-end run."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from kdlab import registry
from kdlab.cli import main
from kdlab.config import MethodConfig, ModelConfig
from kdlab.engine.build import build_method, build_student, copy_teacher_weights
from kdlab.errors import KdlabError
from kdlab.methods.base import Batch, Outputs
from kdlab.methods.qat_kd import resolve_layer_map
from kdlab.models import Taps
from kdlab.models.encoder import BertEncoderClassifier
from kdlab.quant import QuantLinear, QuantSpec, quant_layers, quantize_model

VOCAB, HIDDEN = 40, 16
IDS = torch.tensor([[2, 5, 7, 9, 3, 0, 0, 0],
                    [2, 11, 12, 13, 14, 15, 16, 3],
                    [2, 30, 3, 0, 0, 0, 0, 0]])
LABELS = torch.tensor([0, 2, 1])


def encoder(layers, seed, heads=4, hidden=HIDDEN):
    torch.manual_seed(seed)
    model = BertEncoderClassifier(vocab_size=VOCAB, num_classes=3, hidden=hidden, layers=layers, heads=heads,
                                  dropout=0.0)
    with torch.no_grad():  # peaked attention maps, so the map term is far from 0
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return model


def qat(student, teacher, **options):
    return build_method(MethodConfig("qat_kd", options), student=student, teacher=teacher)


def forward(method, student, teacher, ids=IDS):
    with Taps(student, method.student_taps) as s_taps:
        student_out = Outputs(student(ids), dict(s_taps.captured))
    with Taps(teacher, method.teacher_taps, detach=True) as t_taps, torch.no_grad():
        teacher_out = Outputs(teacher(ids), dict(t_taps.captured))
    return Batch(ids, LABELS), student_out, teacher_out


def all_states(model, ids=IDS):
    """Every encoder tap of ``model`` on ``ids``, float64, by (kind, layer)."""
    keys = [("hidden", -1)] + [(k, i) for i in range(model.num_layers)
                               for k in ("hidden", "attention_probs", "attention_output")]
    with Taps(model, [model.encoder_tap(*key) for key in keys], detach=True) as taps, torch.no_grad():
        logits = model(ids)
        return logits.double(), {key: taps[model.encoder_tap(*key)].double() for key in keys}


# float64 references (written from the paper's definitions, not from kdlab.losses.attention)
def ref_mse(s, t, valid):
    keep = valid[..., None].double()
    return float(((s - t) ** 2 * keep).sum() / (keep.sum() * s.shape[-1]))


def ref_map_kl(s, t, valid, reduction="sequence"):
    """KL(t ‖ s) per query row over valid keys; 'sequence': mean over valid rows per (b, h), then over b, h."""
    kl_rows = (t * (t.clamp_min(1e-300).log() - s.clamp_min(1e-8).log()) * valid[:, None, None, :]).sum(-1)
    rows = valid[:, None, :].double()
    if reduction == "sequence":
        return float(((kl_rows * rows).sum(-1) / rows.sum(-1)).mean())
    return float((kl_rows * rows).sum() / (rows.sum() * s.shape[1]))


def ref_kd(s_logits, t_logits, temperature):
    p_t = F.softmax(t_logits / temperature, -1)
    return float(temperature ** 2 * (p_t * (p_t.log() - F.log_softmax(s_logits / temperature, -1))).sum(-1).mean())


# --------------------------------------------------------------------------- terms
ALL_TERMS = dict(logit_weight=1.0, ce_weight=0.5, hidden_weight=2.0, map_weight=3.0, output_weight=4.0)


def test_every_term_is_zero_for_a_copy_of_the_teacher():
    teacher = encoder(4, seed=0).eval()
    student = copy.deepcopy(teacher)
    method = qat(student, teacher, **{**ALL_TERMS, "ce_weight": 0.0})
    terms = method.loss_terms(*forward(method, student, teacher))
    assert set(terms) == {"kd", "hidden", "attn_map", "attn_output"}
    for name, value in terms.items():
        assert abs(float(value)) < 1e-6, name


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_each_term_equals_a_float64_hand_computation(reduction):
    teacher, student = encoder(4, seed=0).eval(), encoder(2, seed=1).eval()
    method = qat(student, teacher, **ALL_TERMS, temperature=2.0, layer_reduction=reduction)
    assert method.layer_map == {0: 1, 1: 3}
    terms = method.loss_terms(*forward(method, student, teacher))
    s_logits, s = all_states(student)
    t_logits, t = all_states(teacher)
    valid = IDS != 0
    pairs = [(0, 1), (1, 3)]
    agg = (lambda xs: sum(xs)) if reduction == "sum" else (lambda xs: sum(xs) / len(xs))
    hidden = agg([ref_mse(s["hidden", i], t["hidden", j], valid) for i, j in pairs]
                 + [ref_mse(s["hidden", -1], t["hidden", -1], valid)])  # the embeddings (hidden_embeddings)
    attn_map = agg([ref_map_kl(s["attention_probs", i], t["attention_probs", j], valid) for i, j in pairs])
    attn_out = agg([ref_mse(s["attention_output", i], t["attention_output", j], valid) for i, j in pairs])
    expected = {"kd": ref_kd(s_logits, t_logits, 2.0), "ce": 0.5 * float(F.cross_entropy(s_logits, LABELS)),
                "hidden": 2.0 * hidden, "attn_map": 3.0 * attn_map, "attn_output": 4.0 * attn_out}
    assert set(terms) == set(expected)
    for name, value in expected.items():
        assert value > 1e-3, name  # every term is exercised with a non-trivial value
        assert float(terms[name]) == pytest.approx(value, rel=1e-4), name


def test_hidden_term_without_embeddings_and_token_reduction():
    teacher, student = encoder(2, seed=0).eval(), encoder(2, seed=1).eval()
    method = qat(student, teacher, logit_weight=0.0, hidden_weight=1.0, map_weight=1.0,
                 hidden_embeddings=False, map_reduction="token")
    assert method.layer_map == {0: 0, 1: 1}
    terms = method.loss_terms(*forward(method, student, teacher))
    _, s = all_states(student)
    _, t = all_states(teacher)
    valid = IDS != 0
    assert float(terms["hidden"]) == pytest.approx(sum(ref_mse(s["hidden", i], t["hidden", i], valid)
                                                       for i in range(2)), rel=1e-4)
    assert float(terms["attn_map"]) == pytest.approx(sum(ref_map_kl(s["attention_probs", i], t["attention_probs", i],
                                                                    valid, "token") for i in range(2)), rel=1e-4)


def test_terms_ignore_padding_content():
    """Changing what follows the last real token (all padding ids) changes no term: the pad mask is used."""
    teacher, student = encoder(2, seed=0).eval(), encoder(2, seed=1).eval()
    method = qat(student, teacher, **ALL_TERMS)
    base = method.loss_terms(*forward(method, student, teacher))
    longer = torch.cat([IDS, torch.zeros(3, 4, dtype=torch.int64)], dim=1)
    more = method.loss_terms(*forward(method, student, teacher, longer))
    for name in base:
        assert float(more[name]) == pytest.approx(float(base[name]), rel=1e-4, abs=1e-6), name


def test_explicit_layer_map_is_used():
    teacher, student = encoder(4, seed=0).eval(), encoder(2, seed=1).eval()
    method = qat(student, teacher, logit_weight=0.0, output_weight=1.0, layer_map={0: 0, "1": 2})
    assert method.layer_map == {0: 0, 1: 2}
    terms = method.loss_terms(*forward(method, student, teacher))
    _, s = all_states(student)
    _, t = all_states(teacher)
    valid = IDS != 0
    expected = ref_mse(s["attention_output", 0], t["attention_output", 0], valid) + ref_mse(
        s["attention_output", 1], t["attention_output", 2], valid)
    assert float(terms["attn_output"]) == pytest.approx(expected, rel=1e-4)


def test_uniform_default_layer_map():
    assert resolve_layer_map(None, 2, 4) == {0: 1, 1: 3}
    assert resolve_layer_map(None, 3, 3) == {0: 0, 1: 1, 2: 2}
    assert resolve_layer_map(None, 3, 6) == {0: 1, 1: 3, 2: 5}
    # A deeper student: never a layer below 0 (the uniform map would give teacher layer -1); halves round up.
    assert resolve_layer_map(None, 4, 2) == {0: 0, 1: 0, 2: 1, 3: 1}
    assert resolve_layer_map(None, 4, 6) == {0: 1, 1: 2, 2: 4, 3: 5}


@pytest.mark.parametrize("layer_map, fragment", [
    ({0: 4}, "teacher layer 4"), ({2: 0}, "student layer 2"), ({0: -1}, "teacher layer -1"),
    ({"a": 1}, "not a pair"), ({}, "expected a mapping"),
])
def test_layer_map_errors_name_the_key(layer_map, fragment):
    teacher, student = encoder(4, seed=0), encoder(2, seed=1)
    with pytest.raises(KdlabError, match=fragment) as error:
        qat(student, teacher, hidden_weight=1.0, layer_map=layer_map)
    message = str(error.value)
    assert message.startswith("method.layer_map") and "\n" not in message


def test_head_count_mismatch_refused_only_for_the_map_term():
    teacher, student = encoder(2, seed=0, heads=4), encoder(2, seed=1, heads=2)
    with pytest.raises(KdlabError, match="method.map_weight.*2 heads.*4"):
        qat(student, teacher, map_weight=1.0)
    method = qat(student, teacher, hidden_weight=1.0, output_weight=1.0)  # shapes agree: allowed
    assert set(method.loss_terms(*forward(method, student, teacher))) == {"kd", "hidden", "attn_output"}


def test_teacher_without_attention_taps_is_refused():
    mlp = registry.get("model", "mlp")(input_shape=(8,), num_classes=3, mean=(0.0,), std=(1.0,))
    with pytest.raises(KdlabError, match="publishes no attention"):
        qat(encoder(2, seed=1), mlp, map_weight=1.0)
    with pytest.raises(KdlabError, match="student .*publishes no attention"):
        qat(mlp, encoder(2, seed=1), output_weight=1.0)
    qat(mlp, encoder(2, seed=1))  # logits only: no taps needed


@pytest.mark.parametrize("key, value", [("map_weight", -1.0), ("temperature", 0.0), ("map_reduction", "max"),
                                        ("layer_reduction", "median")])
def test_bad_hparams_name_the_key(key, value):
    with pytest.raises(KdlabError, match=f"method.{key}"):
        qat(encoder(2, seed=1), encoder(2, seed=0), **{key: value})


# --------------------------------------------------------------------------- quantized students
EXPECTED_SWAPPED = [f"encoder.layer.{i}.{name}" for i in range(2)
                    for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                                 "attention.output.dense", "intermediate.dense", "output.dense")]


def test_quantize_model_swaps_exactly_the_transformer_linears():
    model = encoder(2, seed=0)
    swapped = quantize_model(model, QuantSpec(weight_bits="ternary"))
    assert swapped == EXPECTED_SWAPPED
    assert sorted(quant_layers(model)) == sorted(EXPECTED_SWAPPED)
    assert type(model.classifier) is nn.Linear
    assert type(model.embeddings.word_embeddings) is nn.Embedding
    assert all(type(m) is nn.LayerNorm for n, m in model.named_modules() if n.endswith("LayerNorm"))
    ternary = model.get_submodule("encoder.layer.0.attention.self.query").quantized_weight()
    assert ternary.unique().numel() <= 3  # {-α, 0, α}


def test_build_student_from_teacher_then_quantize():
    teacher = encoder(2, seed=0)
    splits = _FakeSplits()
    cfg = ModelConfig(model="bert_encoder", options=dict(hidden=HIDDEN, layers=2, heads=4, dropout=0.0),
                      init="teacher", quant={"weight_bits": 2, "per_channel": True})
    student = build_student(cfg, splits, teacher=teacher)
    assert sorted(quant_layers(student)) == sorted(EXPECTED_SWAPPED)
    for name, value in teacher.state_dict().items():  # latent weights start as the teacher's
        torch.testing.assert_close(student.state_dict()[name], value, atol=0, rtol=0)
    layer = student.get_submodule(EXPECTED_SWAPPED[0])
    assert isinstance(layer, QuantLinear) and layer.spec.weight_bits == 2 and layer.quantized_weight().unique().numel() > 3
    with pytest.raises(KdlabError, match="student.init.*add a teacher"):
        build_student(cfg, splits, teacher=None)
    with pytest.raises(KdlabError, match="student.init.*differs"):
        copy_teacher_weights(encoder(1, seed=0), teacher)


def test_a_quantized_model_file_as_student_checkpoint_is_not_quantized_twice(tmp_path):
    from kdlab.engine.build import model_spec
    from kdlab.engine.checkpoint import save_model

    splits = _FakeSplits()
    options = dict(hidden=HIDDEN, layers=2, heads=4, dropout=0.0)
    quant = {"weight_bits": "ternary", "per_channel": True}
    built = build_student(ModelConfig(model="bert_encoder", options=options, quant=quant), splits)
    path = tmp_path / "student.safetensors"
    save_model(path, built, model_spec("bert_encoder", options, splits, quant=quant))
    for config_quant in (None, quant):  # the file's spec is used whether or not the config repeats it
        loaded = build_student(ModelConfig(model="bert_encoder", options=options, checkpoint=str(path),
                                           quant=config_quant), splits)
        assert loaded.quant_options == quant and sorted(quant_layers(loaded)) == sorted(EXPECTED_SWAPPED)
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(IDS), built.eval()(IDS), atol=0, rtol=0)
    with pytest.raises(KdlabError, match="student.quant: .* already holds a model quantized"):
        build_student(ModelConfig(model="bert_encoder", options=options, checkpoint=str(path),
                                  quant={"weight_bits": 4}), splits)


def test_map_loss_refuses_a_student_whose_probabilities_come_after_dropout():
    teacher, student = encoder(2, seed=0), encoder(2, seed=1)
    student.probs_dropout = 0.1  # as an hf_encoder student with attention_probs_dropout_prob 0.1 reports
    with pytest.raises(KdlabError, match="method.map_weight: .*after dropout"):
        qat(student, teacher, map_weight=1.0)
    qat(student, teacher, output_weight=1.0)  # other terms are fine


class _FakeSplits:
    """What build_model reads from a text dataset's Splits."""
    from kdlab.data.text import TextInfo

    num_classes, input_shape, mean, std, name = 3, (8,), (0.0,), (1.0,), "fake"
    text = TextInfo(tokenizer="fake", vocab_size=VOCAB, pad_id=0, max_length=8, vocab_sha256="0" * 64)
    sequence = None


# --------------------------------------------------------------------------- config and CLI
def tiny_config(vocab: Path) -> dict:
    return {
        "name": "qat_tiny",
        "data": {"dataset": "stdlib_docstrings", "tokenizer": str(vocab), "max_per_class": 20, "max_length": 16},
        "teacher": {"model": "bert_encoder", "hidden": 16, "layers": 2, "heads": 4,
                    "train": {"epochs": 1, "batch_size": 32, "device": "cpu"}},
        "student": {"model": "bert_encoder", "hidden": 16, "layers": 2, "heads": 4, "init": "teacher",
                    "quant": {"weight_bits": "ternary"}},
        "method": {"name": "qat_kd", "logit_weight": 1.0, "ce_weight": 0.5, "hidden_weight": 1.0, "map_weight": 1.0,
                   "output_weight": 1.0},
        "train": {"epochs": 1, "batch_size": 32, "device": "cpu"},
        "seeds": [0],
    }


@pytest.fixture
def vocab(tmp_path):
    import string

    lines = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *(string.ascii_lowercase + string.digits + string.punctuation),
             *(f"##{c}" for c in string.ascii_lowercase + string.digits), "the", "return", "of", "##ing"]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(tmp_path, cfg) -> int:
    path = tmp_path / "qat.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return main(["--workspace", str(tmp_path / "ws"), "run", str(path), "--quiet"])


def test_cli_refuses_unsupported_bit_width(tmp_path, vocab, capsys):
    cfg = tiny_config(vocab)
    cfg["student"]["quant"] = {"weight_bits": 3}
    assert run_cli(tmp_path, cfg) == 2
    err = capsys.readouterr().err
    assert "student.quant.weight_bits" in err and "3" in err


def test_cli_refuses_init_teacher_with_a_student_checkpoint(tmp_path, vocab, capsys):
    cfg = tiny_config(vocab)
    cfg["student"]["checkpoint"] = str(tmp_path / "student.safetensors")
    assert run_cli(tmp_path, cfg) == 2
    assert "both set the starting weights" in capsys.readouterr().err


def test_cli_refuses_init_teacher_without_a_teacher(tmp_path, vocab, capsys):
    cfg = tiny_config(vocab)
    del cfg["teacher"]
    cfg["method"] = {"name": "scratch"}
    assert run_cli(tmp_path, cfg) == 2
    assert "student.init" in capsys.readouterr().err


@pytest.mark.integration
def test_end_to_end_quantized_student_reloads_with_identical_logits(tmp_path, vocab, capsys):
    from safetensors.torch import load_file

    from kdlab.data import build_splits
    from kdlab.engine.build import build_model, load_model_file
    from kdlab.store import Store

    cfg = tiny_config(vocab)
    assert run_cli(tmp_path, cfg) == 0, capsys.readouterr().err
    runs = Store(tmp_path / "ws").runs(experiment="qat_tiny")
    assert len(runs) == 1 and runs[0].status == "finished"
    path = Path(runs[0].run_dir) / "model.safetensors"
    data_options = {k: v for k, v in cfg["data"].items() if k != "dataset"}
    splits = build_splits("stdlib_docstrings", data_options, root=None, cache_dir=tmp_path / "cache",
                          val_fraction=0.1, split_seed=0)
    model, spec = load_model_file(path, splits, key="student.checkpoint")
    model.eval()
    assert spec["quant"]["weight_bits"] == "ternary"
    assert sorted(quant_layers(model)) == sorted(EXPECTED_SWAPPED)
    # Reference: the same architecture quantized by hand and loaded strictly from the file's tensors.
    reference = build_model("bert_encoder", dict(hidden=16, layers=2, heads=4), splits)
    quantize_model(reference, QuantSpec(weight_bits="ternary"))
    reference.load_state_dict(load_file(str(path)), strict=True)
    reference.eval()
    inputs, labels = splits.test
    with torch.no_grad():
        logits = model(inputs)
        torch.testing.assert_close(logits, reference(inputs), atol=0, rtol=0)
        # The fake quantization matters: the same latent weights in full precision give other logits.
        plain = build_model("bert_encoder", dict(hidden=16, layers=2, heads=4), splits)
        plain.load_state_dict(load_file(str(path)), strict=True)
        assert not torch.allclose(plain.eval()(inputs), logits)
    accuracy = float((logits.argmax(1) == labels).double().mean())
    assert accuracy == pytest.approx(runs[0].final["test/acc"], abs=1e-6)
    # The integer export written after training reproduces the fake-quant student exactly.
    from kdlab.quant import read_export
    from kdlab.quant.export import dequantized_forward

    assert runs[0].final["quant/export_max_error"] <= 1e-5
    exported = read_export(Path(runs[0].run_dir) / "quantized.safetensors")
    assert sorted(exported["layers"]) == sorted(EXPECTED_SWAPPED)
    assert {int(v) for v in exported["layers"][EXPECTED_SWAPPED[0]]["weight_int"].unique()} <= {-1, 0, 1}
    with torch.no_grad():
        torch.testing.assert_close(dequantized_forward(model, exported, inputs), logits, atol=1e-5, rtol=0)
    # The study table: one row (ternary, the five signals), the teacher's accuracy and the gap.
    from kdlab.study.views.qat import qat_table, render_qat_table

    table = qat_table(Store(tmp_path / "ws"), "qat_tiny")
    assert [(r.bits, r.signals) for r in table.rows] == [("ternary", "logits+ce+hidden+map+output")]
    assert table.rows[0].summary.mean == pytest.approx(runs[0].final["test/acc"])
    teacher_acc = table.teacher.mean
    assert table.rows[0].gap.mean == pytest.approx(teacher_acc - runs[0].final["test/acc"])
    assert "gap to teacher" in render_qat_table(table, fmt="markdown")
    # And through the CLI: the Markdown table, then the figures.
    capsys.readouterr()
    assert main(["--workspace", str(tmp_path / "ws"), "plot", "qat", "qat_tiny", "--out", str(tmp_path / "plots")]) == 0
    printed = capsys.readouterr().out
    assert "| ternary | logits+ce+hidden+map+output | 1 |" in printed
    assert (tmp_path / "plots" / "qat.png").stat().st_size > 0 and (tmp_path / "plots" / "qat.svg").exists()
