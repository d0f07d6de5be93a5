"""LoRA students (student.peft, issue 19): the adapter's forward against its equation in float64, only the adapter
trains and is checkpointed, a stopped run resumes to the same weights, the export loads and generates, bad input is
one line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from kdlab.cli import main
from kdlab.errors import KdlabError
from kdlab.store import Store

pytest.importorskip("peft")
pytest.importorskip("transformers")

PROMPTS = [{"prompt": f"What is {a} plus {b}?", "completion": str(a + b)} for a, b in
           [(12, 30), (1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16), (17, 18)]]
PEFT = {"lora_r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def _config(folder: Path, prompts: Path, **changes) -> dict:
    cfg = {
        "name": "lora-tiny",
        "data": {"dataset": "prompts", "path": str(prompts), "tokenizer": "teacher", "chat_template": True,
                 "max_prompt_tokens": 64, "max_new_tokens": 4, "test_fraction": 0.2},
        "teacher": {"model": "hf_causal_lm", "path": str(folder)},
        "student": {"init": "teacher", "keep_layers": 2, "peft": dict(PEFT)},
        "method": {"name": "gkd", "on_policy_fraction": 0.5, "divergence": "forward_kl"},
        "train": {"steps": 4, "batch_size": 4, "optimizer": "adamw", "lr": 1e-2, "device": "cpu",
                  "checkpoint_every": 1, "schedule": "constant"},
    }
    for key, value in changes.items():
        section, _, name = key.partition(".")
        cfg[section][name] = value
    return cfg


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS))
    return path


def _run(tmp_path: Path, cfg: dict, *args: str, workspace: str = "ws") -> int:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return main(["--workspace", str(tmp_path / workspace), "run", str(path), "--quiet", *args])


def _tiny_llama(seed: int = 0, dtype=torch.float32):
    from kdlab.seq.hf import HFCausalLM

    from .conftest import make_llama

    return HFCausalLM(make_llama(50, layers=2, seed=seed).to(dtype))


# --------------------------------------------------------------------------- the adapter itself


def test_lora_forward_is_base_plus_scaled_b_a_x_in_float64():
    """Hu et al. 2022, Eq. 3: h = W₀x + (α/r)·B·A·x on one adapted layer (B set non-zero: it starts at zero)."""
    from kdlab.seq.peft import apply_lora

    student = _tiny_llama(dtype=torch.float64)
    base = student.model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    apply_lora(student, {"lora_r": 3, "lora_alpha": 5.0, "target_modules": ["q_proj"]})
    layer = student.model.model.layers[0].self_attn.q_proj
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=generator,
                                                         dtype=torch.float64))
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    x = torch.randn(2, 5, base.shape[1], generator=generator, dtype=torch.float64)
    expected = x @ base.T + (5.0 / 3) * (x @ a.T) @ b.T
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
    # The merged weight is the same map.
    from kdlab.seq.peft import merged_state_dict

    merged = merged_state_dict(student.model)["model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(x @ merged.T, expected, rtol=0, atol=1e-12)


def test_only_the_adapter_requires_grad_and_the_student_starts_as_its_base():
    from kdlab.seq.peft import adapter_of, apply_lora

    student = _tiny_llama()
    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    before = student(tokens).detach()
    apply_lora(student, PEFT)
    trained = [name for name, p in student.named_parameters() if p.requires_grad]
    assert trained and all(".lora_A." in name or ".lora_B." in name for name in trained)
    assert tuple(trained) == adapter_of(student).trained_keys
    torch.testing.assert_close(student(tokens), before, rtol=0, atol=0)  # B = 0 at the start


def test_any_torch_student_takes_lora():
    from kdlab.seq.peft import apply_lora, merged_state_dict

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    plain_keys = set(net.state_dict())
    apply_lora(net, {"lora_r": 2, "lora_alpha": 4, "target_modules": ["0", "2"]})
    assert sum(p.requires_grad for p in net.parameters()) == 4
    assert set(merged_state_dict(net)) == plain_keys


@pytest.mark.parametrize("spec, expected", [
    ({"lora_r": 4, "target_modules": ["qkv"]}, r"student.peft.target_modules: 'qkv' matches no module of the "
                                               r"student; its adaptable layers are named embed_tokens, q_proj, k_proj"),
    ({"lora_r": 0, "target_modules": ["q_proj"]}, r"student.peft.lora_r: the adapter's rank must be an integer >= 1"),
])
def test_bad_adapter_settings_are_one_line(spec, expected):
    from kdlab.seq.peft import apply_lora

    with pytest.raises(KdlabError, match=expected) as error:
        apply_lora(_tiny_llama(), spec)
    assert "\n" not in str(error.value)


def test_a_model_without_adaptable_layers_is_refused():
    from kdlab.seq.peft import apply_lora

    with pytest.raises(KdlabError, match="has no linear, convolution or embedding layer"):
        apply_lora(torch.nn.Sequential(torch.nn.ReLU()), {"target_modules": ["0"]})


def test_peft_not_installed_names_the_pip_command(monkeypatch, tmp_path, tiny_llama_folder, prompts_file, capsys):
    import kdlab.seq.peft as peft_module

    monkeypatch.setattr(peft_module, "peft_installed", lambda: False)
    assert _run(tmp_path, _config(tiny_llama_folder, prompts_file)) == 2
    err = capsys.readouterr().err
    assert "student.peft: LoRA students need the `peft` package" in err and "pip install 'kdlab[peft]'" in err


def test_config_errors_before_any_work(tmp_path, tiny_llama_folder, prompts_file, capsys):
    cfg = _config(tiny_llama_folder, prompts_file)
    cfg["student"]["peft"] = {"lora_r": 0}
    assert _run(tmp_path, cfg) == 2
    assert "student.peft.lora_r" in capsys.readouterr().err
    cfg = _config(tiny_llama_folder, prompts_file)
    cfg["student"]["peft"]["target_modules"] = ["nothing_here"]
    assert _run(tmp_path, cfg) == 2
    err = capsys.readouterr().err.strip()
    assert "'nothing_here' matches no module" in err and "q_proj" in err and len(err.splitlines()) == 1
    assert not Store(tmp_path / "ws").runs(experiment="lora-tiny")  # nothing claimed
    cfg = _config(tiny_llama_folder, prompts_file)
    cfg["teacher"]["peft"] = dict(PEFT)
    assert _run(tmp_path, cfg) == 2
    assert "teacher.peft: only the student section takes peft" in capsys.readouterr().err


# --------------------------------------------------------------------------- a run


def _stop_after_first_epoch(monkeypatch):
    from kdlab.engine import loop

    real = loop._Fit.train_epoch

    def train_epoch(self, epoch):
        if epoch == 1:
            raise KdlabError("stopped for the test")
        return real(self, epoch)

    monkeypatch.setattr(loop._Fit, "train_epoch", train_epoch)
    return real


@pytest.mark.integration
def test_a_lora_run_trains_the_adapter_only_resumes_exactly_and_exports(tmp_path, tiny_llama_folder, prompts_file,
                                                                       monkeypatch):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from kdlab.engine import loop
    from kdlab.seq.hf import load_hf_causal_lm
    from kdlab.seq.hf_export import drop_layers

    cfg = _config(tiny_llama_folder, prompts_file)
    assert _run(tmp_path, cfg, workspace="whole") == 0
    (whole,) = Store(tmp_path / "whole").runs(experiment="lora-tiny")
    assert whole.status == "finished"
    run_dir = Path(whole.run_dir)

    # The checkpoint: the adapter's tensors and their optimiser state, no frozen base.
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())["dir"]
    saved = load_file(run_dir / "checkpoints" / latest / "weights.safetensors")
    student_keys = [k for k in saved if k.startswith("student.")]
    assert student_keys and all(".lora_A." in k or ".lora_B." in k for k in student_keys)
    assert len([k for k in saved if k.startswith("optimizer.") and k.endswith(".exp_avg")]) == len(student_keys)
    state = json.loads((run_dir / "checkpoints" / latest / "state.json").read_text())
    assert len(state["student_base_sha256"]) == 64

    # The base did not move: the merged weights differ from the teacher's kept layers only in q/v projections.
    teacher = load_hf_causal_lm(path=tiny_llama_folder)
    base = drop_layers(teacher, 2).model.state_dict()
    merged = load_file(run_dir / "model.safetensors")  # the student's (wrapper's) plain names
    assert set(merged) == {f"model.{k}" for k in base}
    changed = sorted(k for k in base if not torch.equal(base[k], merged[f"model.{k}"]))
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)

    # Stopped after epoch 1 (of 2), then resumed: the same final weights and metrics.
    _stop_after_first_epoch(monkeypatch)
    assert _run(tmp_path, cfg, workspace="stopped") == 1
    monkeypatch.undo()
    assert _run(tmp_path, cfg, "--retry-failed", workspace="stopped") == 0
    (resumed,) = Store(tmp_path / "stopped").runs(experiment="lora-tiny")
    assert resumed.run_id == whole.run_id and resumed.status == "finished"
    again = load_file(Path(resumed.run_dir) / "model.safetensors")
    assert all(torch.equal(merged[k], again[k]) for k in merged)
    assert {k: v for k, v in resumed.final.items() if k != "train_seconds"} == \
        {k: v for k, v in whole.final.items() if k != "train_seconds"}

    # hf/ is the merged model: transformers alone loads it, it generates, and it equals the adapted student.
    model = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(run_dir / "hf")
    ids = tokenizer("What is 1 plus 2?", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]
    # hf/adapter/ on its base (the teacher's kept layers) gives the same logits.
    adapted = peft.PeftModel.from_pretrained(drop_layers(teacher, 2).model, run_dir / "hf" / "adapter")
    torch.testing.assert_close(adapted(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert json.loads((run_dir / "hf" / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] \
        is None  # a layer-cut base exists only inside kdlab
    assert main(["--workspace", str(tmp_path / "whole"), "export", whole.run_id, str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "config.json").is_file()


def test_a_checkpoint_of_another_base_is_refused(tmp_path):
    """The frozen base is rebuilt at resume; an adapter trained on another base is not loaded onto it."""
    from kdlab.engine.run_files import RunFolderError
    from kdlab.engine.state import TrainingState
    from kdlab.seq.peft import apply_lora

    def state_of(seed):
        student = apply_lora(_tiny_llama(seed=seed), PEFT)
        method = torch.nn.Module()
        optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        return TrainingState(student, method, optimizer, None, scheduler, None)

    tensors, saved = state_of(0).save()
    assert all(".lora_" in k for k in tensors if k.startswith("student."))
    state_of(0).restore(tensors, saved, folder=tmp_path, expected_step=lambda epoch: 0)  # the same base: fine
    with pytest.raises(RunFolderError, match="was trained on another student base"):
        state_of(1).restore(tensors, saved, folder=tmp_path, expected_step=lambda epoch: 0)


def test_a_lora_mlp_student_trains_its_adapter_and_saves_merged_weights(tmp_path):
    """Any torch student: an MLP on synthetic data, through `kdlab run`; model.safetensors holds the merged weights
    under the plain names, which rebuild the plain MLP."""
    from kdlab.data import build_splits
    from kdlab.engine.build import load_model_file

    cfg = {"name": "lora-mlp", "data": {"dataset": "synthetic", "num_train": 64, "num_test": 32},
           "student": {"model": "mlp", "peft": {"lora_r": 2, "lora_alpha": 4, "target_modules": ["head"]}},
           "method": {"name": "scratch"}, "train": {"epochs": 2, "batch_size": 32, "device": "cpu"}}
    assert _run(tmp_path, cfg) == 0
    (run,) = Store(tmp_path / "ws").runs(experiment="lora-mlp")
    run_dir = Path(run.run_dir)
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())["dir"]
    saved = load_file(run_dir / "checkpoints" / latest / "weights.safetensors")
    assert sorted(k for k in saved if k.startswith("student.")) == ["student.head.lora_A.default.weight",
                                                                    "student.head.lora_B.default.weight"]
    splits = build_splits("synthetic", {"num_train": 64, "num_test": 32}, root=None, cache_dir=tmp_path / "c",
                          val_fraction=0.1, split_seed=0)
    model, _ = load_model_file(run_dir / "model.safetensors", splits)  # the plain MLP: no peft names
    assert "head.weight" in model.state_dict()
