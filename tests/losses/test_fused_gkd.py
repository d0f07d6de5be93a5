"""GKD's ``method.fused``: the loss and the student's gradients equal the unfused GKD's; models expose
their hidden states and output layer; students that cannot are refused in one line."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from kdlab import registry
from kdlab.config import MethodConfig, TrainConfig
from kdlab.data import build_splits
from kdlab.engine.build import build_method
from kdlab.engine.loop import fit
from kdlab.errors import KdlabError
from kdlab.methods.base import Batch, Outputs
from kdlab.methods.gkd import check_config


@pytest.fixture(scope="module")
def splits():
    return build_splits("reverse", {"num_train": 24, "num_test": 6, "max_length": 4}, root=None,
                        cache_dir="/tmp/kdlab-test-gkd", val_fraction=0.25, split_seed=0)


def _tinygpt(splits, *, width, seed, **options):
    torch.manual_seed(seed)
    return registry.get("model", "tinygpt")(input_shape=splits.input_shape, num_classes=splits.num_classes,
                                            layers=1, width=width, heads=2, **options)


def _method(splits, student, teacher, **options):
    return build_method(MethodConfig("gkd", dict(options)), student=student, teacher=teacher,
                        input_shape=splits.input_shape, train_size=len(splits.train[0]), sequence=splits.sequence)


def _batch(splits):
    inputs, labels = splits.train
    return Batch(inputs[:6], labels[:6], torch.arange(6))


def _terms_and_grads(method, student, teacher, batch):
    student.train()
    student.zero_grad(set_to_none=True)
    with torch.no_grad():
        teacher_logits = teacher.eval()(batch.inputs)
    terms = method.loss_terms(batch, Outputs(student(batch.inputs)), Outputs(teacher_logits))
    sum(terms.values()).backward()
    return {k: v.item() for k, v in terms.items()}, {n: p.grad.clone() for n, p in student.named_parameters()}


@pytest.mark.parametrize("options", [
    {"divergence": "jsd", "beta": 0.3, "reduction": "sequence", "student_temperature": 1.5},
    {"divergence": "forward_kl", "reduction": "token", "chunk_size": 2},
    {"divergence": "skew_reverse_kl", "teacher_temperature": 0.7},
    {"divergence": "ce", "reduction": "sequence"},
    {"divergence": "tvd", "sft_steps": 5},  # the SFT warm-up's cross-entropy, fused too
])
@pytest.mark.parametrize("tied", [True, False])
def test_fused_gkd_equals_unfused(splits, options, tied):
    teacher = _tinygpt(splits, width=16, seed=1)
    plain = _tinygpt(splits, width=8, seed=2, tie_embeddings=tied)
    fused = copy.deepcopy(plain)
    batch = _batch(splits)
    reference = _terms_and_grads(_method(splits, plain, teacher, on_policy_fraction=0.0, **options), plain,
                                 teacher, batch)
    method = _method(splits, fused, teacher, on_policy_fraction=0.0, fused=True, **options)
    assert fused.emit_hidden_states and not plain.emit_hidden_states
    got = _terms_and_grads(method, fused, teacher, batch)
    for key, value in reference[0].items():
        assert math.isclose(got[0][key], value, rel_tol=1e-5, abs_tol=1e-6), key
    for name, grad in reference[1].items():
        torch.testing.assert_close(got[1][name], grad, rtol=1e-4, atol=1e-6)


def test_eval_and_generation_forwards_still_return_logits(splits):
    student = _tinygpt(splits, width=8, seed=2)
    student.emit_hidden_states = True
    tokens = splits.train[0][:2]
    assert student.train()(tokens).shape[-1] == 8
    assert student.eval()(tokens).shape[-1] == splits.num_classes
    logits, _ = student.train()(tokens, use_cache=True)
    assert logits.shape[-1] == splits.num_classes


def test_fit_with_fused_gkd(splits):
    teacher = _tinygpt(splits, width=16, seed=1)
    student = _tinygpt(splits, width=8, seed=2)
    torch.manual_seed(0)
    method = _method(splits, student, teacher, on_policy_fraction=0.5, divergence="jsd", fused=True, sft_steps=1)
    logged = []
    result = fit(student=student, method=method, teacher=teacher, splits=splits, seed=0,
                 train=TrainConfig(steps=3, batch_size=6, lr=0.01, device="cpu", eval_every=1, checkpoint_every=100),
                 on_epoch=lambda epoch, metrics: logged.append(metrics))
    assert all(math.isfinite(v) for k, v in logged[-1].items() if k.startswith("train/loss"))
    for key in ("val/acc", "val/nll", "test/acc"):
        assert math.isfinite(result.final[key]), key


LLAMA = {"model_type": "llama", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
         "intermediate_size": 32, "max_position_embeddings": 64}
GPT2 = {"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 64, "resid_pdrop": 0.0,
        "embd_pdrop": 0.0, "attn_pdrop": 0.0}


@pytest.mark.parametrize("config", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_hugging_face_student_exposes_hidden_states_and_head(splits, config):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = registry.get("model", "hf_causal_lm")(input_shape=splits.input_shape, num_classes=splits.num_classes,
                                                  config=dict(config))
    tokens = splits.train[0][:2]
    weight, bias = model.output_layer()
    logits = model.eval()(tokens)
    model.emit_hidden_states = True
    hidden = model.train()(tokens)
    assert hidden.shape == (*tokens.shape, 16)
    torch.testing.assert_close(hidden @ weight.T + (0 if bias is None else bias), logits, rtol=1e-5, atol=1e-5)


def test_hugging_face_soft_capped_logits_are_refused(splits):
    pytest.importorskip("transformers")
    model = registry.get("model", "hf_causal_lm")(input_shape=splits.input_shape, num_classes=splits.num_classes,
                                                  config=dict(LLAMA))
    model.model.config.final_logit_softcapping = 30.0
    with pytest.raises(KdlabError, match="final_logit_softcapping"):
        model.output_layer()


def test_a_student_without_an_output_layer_is_refused(splits):
    teacher = _tinygpt(splits, width=16, seed=1)

    class Plain(torch.nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(KdlabError, match=r"method\.fused: the student \(Plain\)"):
        _method(splits, Plain(), teacher, fused=True)


def test_config_refuses_fused_with_another_model():
    class Section:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    def problems(model):
        errors = []
        cfg = Section(student=Section(model=model), method=Section(options={"fused": True}),
                      train=Section(steps=10))
        check_config(cfg, errors)
        return errors

    assert problems("tinygpt") == [] and problems("tinygpt-w16") == [] and problems("hf_causal_lm") == []
    (error,) = problems("cnn1d")
    assert error.startswith("method.fused: student model 'cnn1d'")
