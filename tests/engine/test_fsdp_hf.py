"""Sharded Hugging Face students (train.sharding: fsdp, FSDP2 on gloo): a tiny random Llama student, wrapped by
kdlab's hf_causal_lm adapter, distilled from a tiny Llama teacher with GKD's on-policy generation (HF ``generate``
with a KV cache, ranks whose rows end at different steps): two processes equal one to 1e-5, a kill after epoch 1's
checkpoint resumes exactly; a torchrun CLI run exports an HF folder that transformers loads."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.engine.test_distributed import ROOT, _env, _free_port, _weights
from tests.engine.test_fsdp import _launch as launch

pytest.importorskip("transformers")

PROMPTS = [{"prompt": f"What is {a} plus {b}?", "completion": str(a + b)} for a, b in
           [(12, 30), (1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16), (17, 18)]]
# The student: kdlab's hf_causal_lm built from a config (hidden 32, 2 decoder layers, tied embeddings).
STUDENT = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 1, "intermediate_size": 64, "max_position_embeddings": 128,
           "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A 2-layer random Llama + the tiny tokenizer of tests/seq, as save_pretrained writes them; a prompt file."""
    from tests.seq.conftest import make_llama, make_tokenizer

    folder = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = make_tokenizer()
    make_llama(len(tokenizer), layers=2, seed=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS))
    return folder


# One fit() of the tiny Llama student under GKD, on-policy on every step (greedy: 1 and 2 processes decode the
# same responses; the ranks' HF generate loops step together, synced_gpus), Adam (sharded optimiser state),
# clipping (a global norm over shards), 2 epochs, a checkpoint per epoch. argv: out, run dir, world, epoch to stop after (0: none), teacher folder.
_CHILD = textwrap.dedent("""
    import json, os, sys, torch
    from pathlib import Path
    from kdlab import registry
    from kdlab.config import MethodConfig, TrainConfig
    from kdlab.data import build_splits
    from kdlab.engine import distributed, fsdp, loop
    from kdlab.engine.build import build_method
    from safetensors.torch import save_file

    out, run_dir, world, stop, folder = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    torch.set_num_threads(1)
    ctx = distributed.init_from_environment() if world > 1 else None
    splits = build_splits("prompts", {"path": f"{folder}/prompts.jsonl", "tokenizer": folder, "chat_template": True,
                                      "max_prompt_tokens": 40, "max_new_tokens": 4, "test_fraction": 0.2},
                          root=None, cache_dir=str(run_dir.parent / "cache"), val_fraction=0.25, split_seed=0)
    hf = registry.get("model", "hf_causal_lm")
    teacher = hf(input_shape=splits.input_shape, num_classes=splits.num_classes, path=folder)
    torch.manual_seed(2)
    student = hf(input_shape=splits.input_shape, num_classes=splits.num_classes, config=json.loads(sys.argv[6]))
    torch.manual_seed(0)
    method = build_method(MethodConfig("gkd", {"on_policy_fraction": 1.0, "sampling_temperature": 0.0,
                                               "divergence": "jsd", "beta": 0.5}),
                          student=student, teacher=teacher, input_shape=splits.input_shape,
                          train_size=len(splits.train[0]), sequence=splits.sequence)
    train = TrainConfig(epochs=2, batch_size=2, lr=0.01, optimizer="adam", schedule="constant", device="cpu",
                        checkpoint_every=1, grad_clip=0.5, sharding="fsdp" if world > 1 else "ddp")
    shard = fsdp.shard_student
    def shard_student(student, *args, **kwargs):
        shard(student, *args, **kwargs)
        units = sorted(name for name, m in student.named_modules() if fsdp.is_sharded(m))
        print("UNITS", units)
        return student
    fsdp.shard_student = shard_student
    save = loop._Fit.checkpoint
    def checkpoint(self):
        save(self)
        if self.state.epoch == stop:  # killed right after the checkpoint
            distributed.barrier(ctx)
            os._exit(3)
    loop._Fit.checkpoint = checkpoint
    result = loop.fit(student=student, method=method, teacher=teacher, splits=splits, train=train, seed=5,
                      run_dir=run_dir, resume=True)
    print("FINAL", sorted(result.final))
    if ctx is None or ctx.is_main:
        save_file({k: v.clone() for k, v in student.state_dict().items()}, out)
        print("TIED", student.model.lm_head.weight is student.model.model.embed_tokens.weight)
    distributed.shutdown()
    # Every result is written: skip the interpreter's teardown, where a 2-process run once aborted in a C++
    # destructor ("terminate called without an active exception", CI of stop 24) after finishing its work.
    sys.stdout.flush()
    os._exit(0)
""")


def _launch(tmp_path, folder, name: str, world: int, stop: int = 0, run: str | None = None) -> list[str]:
    return launch(tmp_path, name, world, stop, run, child=_CHILD, extra=(str(folder), json.dumps(STUDENT)),
                  timeout=600)


@pytest.mark.integration
def test_a_sharded_hf_llama_under_on_policy_gkd_equals_one_process_and_resumes_exactly(tmp_path, tiny_llama):
    _launch(tmp_path, tiny_llama, "single", 1)
    outs = _launch(tmp_path, tiny_llama, "sharded", 2)
    assert "UNITS ['', 'model.model.layers.0', 'model.model.layers.1']" in outs[0]  # each decoder layer a unit
    assert "TIED True" in outs[0]  # a plain module again after fit, lm_head and embed_tokens one parameter
    assert "'test/sampled_acc'" in outs[0] and "FINAL []" in outs[1]  # every rank decodes; rank 0 returns
    reference, sharded = _weights(tmp_path / "single.st"), _weights(tmp_path / "sharded.st")
    assert sharded.keys() == reference.keys()
    start = _initial_student(vocab_size=reference["model.model.embed_tokens.weight"].shape[0])
    assert any(not torch.allclose(reference[k], start[k]) for k in reference)  # it trained
    for key in reference:
        torch.testing.assert_close(sharded[key], reference[key], atol=1e-5, rtol=1e-5, msg=key)

    _launch(tmp_path, tiny_llama, "killed", 2, stop=1)  # dies after epoch 1's checkpoint
    _launch(tmp_path, tiny_llama, "resumed", 2, run="killed")
    resumed = _weights(tmp_path / "resumed.st")
    for key in sharded:
        assert torch.equal(resumed[key], sharded[key]), key  # exact: the same ranks, the same state


def _initial_student(vocab_size: int) -> dict[str, torch.Tensor]:
    from kdlab.seq.hf import load_hf_causal_lm

    torch.manual_seed(2)
    return load_hf_causal_lm(config=dict(STUDENT), vocab_size=vocab_size).state_dict()


@pytest.mark.integration
def test_torchrun_cli_distils_a_sharded_hf_student_and_exports_its_folder(tmp_path, tiny_llama):
    import transformers
    import yaml

    from kdlab.store import Store

    config = {
        "name": "fsdp-hf",
        "data": {"dataset": "prompts", "path": str(tiny_llama / "prompts.jsonl"), "tokenizer": "teacher",
                 "chat_template": True, "max_prompt_tokens": 40, "max_new_tokens": 4, "test_fraction": 0.2},
        "teacher": {"model": "hf_causal_lm", "path": str(tiny_llama)},
        "student": {"model": "hf_causal_lm", "config": STUDENT},
        "method": {"name": "gkd", "on_policy_fraction": 1.0, "divergence": "jsd", "beta": 0.5},
        "train": {"steps": 2, "batch_size": 4, "optimizer": "adamw", "lr": 1e-3, "device": "cpu", "sharding": "fsdp"},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(_free_port()), "-m", "kdlab", "--workspace", str(tmp_path / "ws"), "run", str(path),
                           "--quiet"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    (record,) = [r for r in Store(tmp_path / "ws").runs(experiment="fsdp-hf") if r.role == "student"]
    assert record.status == "finished" and "gen/reverse_kl" in record.final
    folder = tmp_path / "ws" / "runs" / record.run_id / "hf"
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 32
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied as the student was
    ids = tokenizer("What is 1 plus 2?", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]


def test_a_sharded_hf_wrapper_generates_through_its_root_unit_and_unshards_clean(tmp_path):
    """In one gloo process (world 1): HF's generate calls the wrapped model, not the wrapper's forward, so the
    root unit's hooks must run around kdlab_generate (else the embedding meets a DTensor); unshard_for_good
    then leaves a plain module, its tied head one parameter, its kdlab_generate the class's again."""
    import torch.distributed as dist

    from kdlab.config import TrainConfig
    from kdlab.engine import fsdp
    from kdlab.seq.hf import HFCausalLM, load_hf_causal_lm
    from kdlab.seq.sampling import generate

    torch.manual_seed(2)
    student = load_hf_causal_lm(config=dict(STUDENT), vocab_size=40)
    prompts, lengths = torch.tensor([[5, 6, 7], [8, 9, 2]]), torch.tensor([3, 2])
    expected = generate(student, prompts, lengths, max_new_tokens=3, eos_id=2, pad_id=2, temperature=0.0)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        fsdp.shard_student(student, torch.device("cpu"), method=object(), train=TrainConfig(sharding="fsdp"),
                           dist_ctx=object())
        assert fsdp.is_sharded(student) and "kdlab_generate" in student.__dict__
        sharded = generate(student, prompts, lengths, max_new_tokens=3, eos_id=2, pad_id=2, temperature=0.0)
        assert torch.equal(sharded.tokens, expected.tokens)
        fsdp.unshard_for_good(student)
    finally:
        dist.destroy_process_group()
    assert not fsdp.is_sharded(student) and "kdlab_generate" not in student.__dict__
    assert student.kdlab_generate.__func__ is HFCausalLM.kdlab_generate
    assert student.model.lm_head.weight is student.model.model.embed_tokens.weight
    again = generate(student, prompts, lengths, max_new_tokens=3, eos_id=2, pad_id=2, temperature=0.0)
    assert torch.equal(again.tokens, expected.tokens)


# Each rank decodes its own prompt through the sharded wrapper with an EOS chosen so that rank 0's row ends after
# its first token and rank 1's runs to max_new_tokens: every decoding step is collective, so rank 0 must keep
# stepping (HF generate's synced_gpus) or both hang. Each rank's result must equal its unsharded greedy decoding.
_GENERATE_CHILD = textwrap.dedent("""
    import json, sys, torch
    from kdlab.config import TrainConfig
    from kdlab.engine import distributed, fsdp
    from kdlab.seq.hf import load_hf_causal_lm
    from kdlab.seq.sampling import generate

    torch.set_num_threads(1)
    ctx = distributed.init_from_environment()
    torch.manual_seed(2)
    student = load_hf_causal_lm(config=json.loads(sys.argv[1]), vocab_size=40)
    prompt, length = torch.tensor([[5, 6, 7]]) + 3 * ctx.rank, torch.tensor([3])
    free = generate(student, prompt, length, max_new_tokens=6, eos_id=0, pad_id=0, temperature=0.0)
    response = free.tokens[0, 3:3 + int(free.response_lengths[0])].tolist()
    eos = response[0] if ctx.rank == 0 else next(t for t in range(1, 40) if t not in response)
    expected = generate(student, prompt, length, max_new_tokens=6, eos_id=eos, pad_id=0, temperature=0.0)
    fsdp.shard_student(student, torch.device("cpu"), method=object(), train=TrainConfig(sharding="fsdp"),
                       dist_ctx=ctx)
    got = generate(student, prompt, length, max_new_tokens=6, eos_id=eos, pad_id=0, temperature=0.0)
    assert torch.equal(got.tokens, expected.tokens), (got.tokens, expected.tokens)
    print("LENGTH", int(got.response_lengths[0]))
    distributed.shutdown()
""")


@pytest.mark.integration
def test_sharded_hf_generate_steps_every_rank_until_all_rows_end(tmp_path):
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", _GENERATE_CHILD, json.dumps(STUDENT)], env=_env(r, 2, port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "LENGTH 1" in outs[0][0] and "LENGTH 6" in outs[1][0]  # rank 0 ended after one token, rank 1 ran on
