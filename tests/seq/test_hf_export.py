"""Layer-dropped students, HF-folder export and the tokenizer check (kdlab.seq.hf_export), on tiny models."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kdlab.errors import KdlabError  # noqa: E402
from kdlab.seq.hf import HFCausalLM, load_hf_causal_lm  # noqa: E402
from kdlab.seq.hf_export import (check_same_tokenizer, drop_layers, export_student, layers_to_keep,  # noqa: E402
                                 plain_copy, save_hf_folder, tokenizer_difference)

from .conftest import CHAT_TEMPLATE, make_llama, make_tokenizer  # noqa: E402


def gpt2(layers=4):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_layer=layers, n_embd=32, n_head=2, n_positions=64,
                                     eos_token_id=1, bos_token_id=1)
    return transformers.GPT2LMHeadModel(config).eval()


def test_layers_to_keep_spreads_a_count_evenly_including_first_and_last():
    assert layers_to_keep(6, 30) == [0, 6, 12, 17, 23, 29]
    assert layers_to_keep(2, 30) == [0, 29] and layers_to_keep(1, 30) == [0] and layers_to_keep(30, 30) == list(range(30))
    assert layers_to_keep([0, 5, 10, 15, 20, 25], 30) == [0, 5, 10, 15, 20, 25]


@pytest.mark.parametrize("keep, expected", [
    ([0, 30], "layer 30 does not exist; the teacher has layers 0..29"), ([3, 1], "increasing order"),
    ([1, 1], "increasing order"), ([], "non-empty"), (0, "between 1 and"), (31, "between 1 and"),
    (True, "list of layer indices"), ([0.5], "integers"), ([-1], "layer -1 does not exist")])
def test_layers_to_keep_errors_are_one_line(keep, expected):
    with pytest.raises(KdlabError) as error:
        layers_to_keep(keep, 30)
    assert expected in str(error.value) and "keep_layers" in str(error.value) and "\n" not in str(error.value)


def reference_forward(teacher, keep, ids):
    """The layer-dropped forward written out by hand: embed, the kept blocks in order, norm, head."""
    inner = teacher.model
    hidden = inner.embed_tokens(ids)
    positions = torch.arange(ids.shape[1])[None]
    rotary = inner.rotary_emb(hidden, positions)
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]
    for index in keep:
        out = inner.layers[index](hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions)
        hidden = out[0] if isinstance(out, tuple) else out
    return teacher.lm_head(inner.norm(hidden))


def test_drop_layers_keeps_those_blocks_and_leaves_the_teacher_alone():
    teacher = make_llama(60, layers=5)
    before = copy.deepcopy(teacher.state_dict())
    student = drop_layers(teacher, [0, 2, 4])
    assert student.config.num_hidden_layers == 3 and len(student.model.layers) == 3
    assert teacher.config.num_hidden_layers == 5 and len(teacher.model.layers) == 5
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1, 2]
    assert [layer.self_attn.layer_idx for layer in teacher.model.layers] == [0, 1, 2, 3, 4]
    torch.testing.assert_close(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[2].mlp.up_proj.weight)
    assert student.model.layers[1].mlp.up_proj.weight.data_ptr() != teacher.model.layers[2].mlp.up_proj.weight.data_ptr()
    for name, value in teacher.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    ids = torch.randint(3, 60, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, reference_forward(teacher, [0, 2, 4], ids), atol=1e-5, rtol=1e-5)


def test_a_layer_dropped_student_decodes_with_a_kv_cache_as_without():
    """layer_idx renumbered: cached decoding must equal recomputing the whole sequence each step."""
    student = drop_layers(HFCausalLM(make_llama(60, layers=6)), 3)
    assert isinstance(student, HFCausalLM) and student.config.num_hidden_layers == 3 and student.source is None
    assert len(student.feature_stages) == 3
    prompt = torch.randint(3, 60, (1, 5))
    with torch.no_grad():
        cached = student.model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True,
                                        eos_token_id=None, pad_token_id=2)
        uncached = student.model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False,
                                          eos_token_id=None, pad_token_id=2)
    assert torch.equal(cached, uncached)


def test_drop_layers_on_gpt2():
    teacher = gpt2(layers=4)
    student = drop_layers(teacher, [1, 3])
    assert student.config.n_layer == 2 and len(student.transformer.h) == 2
    torch.testing.assert_close(student.transformer.h[0].attn.c_attn.weight, teacher.transformer.h[1].attn.c_attn.weight)
    with torch.no_grad():
        assert student(torch.tensor([[3, 4, 5]])).logits.shape == (1, 3, 50)
    with pytest.raises(KdlabError, match="layer 4 does not exist"):
        drop_layers(teacher, [0, 4])


def test_save_hf_folder_round_trips_through_from_pretrained(tmp_path):
    tokenizer = make_tokenizer()
    student = drop_layers(HFCausalLM(make_llama(len(tokenizer), layers=4)), [0, 3])
    generation = transformers.GenerationConfig(eos_token_id=2, pad_token_id=2, bos_token_id=1, max_new_tokens=7)
    folder = save_hf_folder(student, tmp_path / "hf", tokenizer=tokenizer, generation_config=generation)
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    reloaded_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert loaded.config.num_hidden_layers == 2 and loaded.generation_config.max_new_tokens == 7
    assert tokenizer_difference(tokenizer, reloaded_tokenizer) is None
    ids = reloaded_tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}],
                                                 add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        ours = student.model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=2)
        theirs = loaded.generate(**ids, do_sample=False)  # its own generation config: max_new_tokens 7
    assert torch.equal(theirs[:, :ours.shape[1]], ours)
    with pytest.raises(KdlabError, match="already exists and is not empty"):
        save_hf_folder(student, folder, tokenizer=tokenizer)
    save_hf_folder(student, folder, overwrite=True)
    assert (folder / "model.safetensors").is_file() and not (folder / "tokenizer.json").exists()


def test_plain_copy_rebuilds_a_model_that_refuses_save_pretrained():
    model = make_llama(60)
    model.config.quantization_config = {"quant_method": "gguf"}  # as a GGUF-loaded model carries
    rebuilt = plain_copy(model)
    assert rebuilt is not model and getattr(rebuilt.config, "quantization_config", None) is None
    for name, value in model.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[name], value, rtol=0, atol=0)
    plain = make_llama(60)
    assert plain_copy(plain) is plain


def test_tokenizer_check_names_the_first_difference():
    a = make_tokenizer()
    assert tokenizer_difference(a, make_tokenizer()) is None
    assert "vocabularies of 300 vs 280 tokens" == tokenizer_difference(a, make_tokenizer(vocab_size=280))
    assert tokenizer_difference(a, make_tokenizer(chat_template=None)) == "chat template present vs absent"
    assert tokenizer_difference(a, make_tokenizer(chat_template=CHAT_TEMPLATE + " ")) == "chat templates differ"
    other = make_tokenizer()
    other.pad_token = "<|endoftext|>"
    assert tokenizer_difference(a, other).startswith("pad_token '<|im_end|>' vs '<|endoftext|>'")
    with pytest.raises(KdlabError) as error:
        check_same_tokenizer(a, make_tokenizer(vocab_size=280))
    message = str(error.value)
    assert message.startswith("student: its tokenizer differs from the teacher's (vocabularies of 300 vs 280")
    assert "\n" not in message and "init: teacher" in message


def test_load_by_path_records_the_source_folder(tiny_llama_folder):
    model = load_hf_causal_lm(path=tiny_llama_folder, vocab_size=300)
    assert model.source == tiny_llama_folder and model.config.num_hidden_layers == 4
    assert load_hf_causal_lm(config={"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2}).source is None


def test_export_student_takes_the_teachers_tokenizer_and_generation_config(tiny_llama_folder, tmp_path):
    teacher = load_hf_causal_lm(path=tiny_llama_folder)
    generation = transformers.GenerationConfig.from_pretrained(tiny_llama_folder)
    folder = export_student(drop_layers(teacher, 2), tmp_path / "hf", tokenizer_source=teacher.source)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert loaded.config.num_hidden_layers == 2
    assert loaded.generation_config.eos_token_id == generation.eos_token_id == 2
    assert tokenizer_difference(transformers.AutoTokenizer.from_pretrained(folder),
                                transformers.AutoTokenizer.from_pretrained(tiny_llama_folder)) is None


def test_loading_and_exporting_print_nothing(tiny_llama_folder, tmp_path, capfd):
    capfd.readouterr()
    model = load_hf_causal_lm(path=tiny_llama_folder)
    export_student(model, tmp_path / "hf", tokenizer_source=tiny_llama_folder)
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""  # no "Loading weights" / "Writing model shards" bars
