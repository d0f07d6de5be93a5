"""A BERT-style transformer encoder for text classification, and the pretrained MiniLM.

Post-LayerNorm BERT (Devlin et al. 2019): embeddings (word + position + token
type, LayerNorm) then layers of

    probs  = softmax(Q Kᵀ / √d_head + padding mask)            (per head)
    attn   = LayerNorm(W_o · (probs V) + x)                     "attention output"
    layer  = LayerNorm(W_2 · GELU(W_1 · attn) + attn)           "hidden state"

and a classification head on the mean of the last hidden states over real tokens.
Module names mirror Hugging Face BERT checkpoints (``embeddings.word_embeddings``,
``encoder.layer.3.attention.self.query``, ...) so pretrained weights load by name
and ``kdlab.quant.BERT_LINEARS`` patterns select the same layers here and there.

The internals the QAT distillation losses compare are published as tap names
(``encoder_tap(kind, layer)``): ``"hidden"`` (a layer's output; layer -1 is the
embedding output), ``"attention_probs"`` (B, H, L, L) and ``"attention_output"``
(B, L, D). Padding is token id ``pad_token_id``: the attention mask and the mean
pooling are built from it, so models take just the (B, L) ids.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.config.validate import Depth, Width
from kdlab.errors import KdlabError
from kdlab.registry import register

ENCODER_TAP_KINDS = ("hidden", "attention_probs", "attention_output")


class _SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.probs = nn.Identity()  # a tap point: the attention probabilities, before dropout
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape

        def heads(t):
            return t.view(batch, length, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + additive_mask
        probs = self.probs(scores.softmax(dim=-1))
        context = self.dropout(probs) @ v
        return context.transpose(1, 2).reshape(batch, length, -1)


class _AddNorm(nn.Module):
    """LayerNorm(dense(x) + residual): BERT's SelfOutput / Output blocks."""

    def __init__(self, d_in: int, hidden: int, dropout: float, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, hidden)
        self.dropout = nn.Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)  # noqa: N815  (checkpoint name)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class _Attention(nn.Module):
    def __init__(self, hidden, heads, dropout, eps):
        super().__init__()
        self.self = _SelfAttention(hidden, heads, dropout)
        self.output = _AddNorm(hidden, hidden, dropout, eps)

    def forward(self, x, additive_mask):
        return self.output(self.self(x, additive_mask), x)


class _Intermediate(nn.Module):
    def __init__(self, hidden, intermediate):
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)

    def forward(self, x):
        return F.gelu(self.dense(x))  # exact (erf) GELU, as BERT's "gelu"


class _Layer(nn.Module):
    def __init__(self, hidden, heads, intermediate, dropout, eps):
        super().__init__()
        self.attention = _Attention(hidden, heads, dropout, eps)
        self.intermediate = _Intermediate(hidden, intermediate)
        self.output = _AddNorm(intermediate, hidden, dropout, eps)

    def forward(self, x, additive_mask):
        attended = self.attention(x, additive_mask)
        return self.output(self.intermediate(attended), attended)


class _Embeddings(nn.Module):
    def __init__(self, vocab_size, hidden, max_positions, type_vocab_size, dropout, eps, pad_token_id):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden, padding_idx=pad_token_id)
        self.position_embeddings = nn.Embedding(max_positions, hidden)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)  # noqa: N815  (checkpoint name)
        self.dropout = nn.Dropout(dropout)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))


class _Encoder(nn.Module):
    def __init__(self, layers, **kwargs):
        super().__init__()
        self.layer = nn.ModuleList([_Layer(**kwargs) for _ in range(layers)])


class BertEncoderClassifier(nn.Module):
    """BERT-style encoder + mean-pooled linear classifier; ``forward(ids) -> (B, num_classes)`` logits."""

    def __init__(self, *, vocab_size: int, num_classes: int, hidden: Width = 64, layers: Depth = 2, heads: Width = 4,
                 intermediate: int | None = None, max_positions: int = 512, type_vocab_size: int = 2,
                 dropout: float = 0.1, layer_norm_eps: float = 1e-12, pad_token_id: int = 0):
        super().__init__()
        if hidden % heads:
            raise KdlabError(f"student.hidden: {hidden} is not divisible by heads={heads}; pick a multiple")
        self.pad_token_id = pad_token_id
        self.max_positions = max_positions
        self.num_layers = layers
        self.num_heads = heads
        self.embeddings = _Embeddings(vocab_size, hidden, max_positions, type_vocab_size, dropout, layer_norm_eps,
                                      pad_token_id)
        self.encoder = _Encoder(layers, hidden=hidden, heads=heads, intermediate=intermediate or 4 * hidden,
                                dropout=dropout, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_classes)
        self.feature_stages = tuple(f"encoder.layer.{i}" for i in range(layers))
        self.apply(_init_bert)

    def encoder_tap(self, kind: str, layer: int) -> str:
        """The tap name of ``kind`` ("hidden", "attention_probs", "attention_output") at ``layer``."""
        if kind == "hidden" and layer == -1:
            return "embeddings"
        prefix = f"encoder.layer.{layer}"
        return {"hidden": prefix, "attention_probs": f"{prefix}.attention.self.probs",
                "attention_output": f"{prefix}.attention.output"}[kind]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        check_token_ids(ids, type(self).__name__)
        if ids.shape[1] > self.max_positions:
            raise KdlabError(f"data.max_length: {ids.shape[1]} tokens exceed the encoder's {self.max_positions} "
                             "positions; lower data.max_length")
        valid = ids != self.pad_token_id
        # Large negative (not -inf) on padded keys: an all-padding row stays finite.
        additive = (~valid)[:, None, None, :].to(torch.float32) * torch.finfo(torch.float32).min
        x = self.embeddings(ids)
        additive = additive.to(x.dtype) if x.dtype != torch.float32 else additive
        for layer in self.encoder.layer:
            x = layer(x, additive)
        return self.classifier(self.dropout(masked_mean(x, valid)))


def check_token_ids(ids: torch.Tensor, model_name: str) -> None:
    """Text encoders take (batch, length) int64 ids: anything else is a one-line error naming the fix."""
    if ids.dtype != torch.int64 or ids.dim() != 2:
        raise KdlabError(f"{model_name} takes (batch, length) int64 token ids, got {ids.dtype} {tuple(ids.shape)}; "
                         "use a text dataset (e.g. data.dataset: stdlib_docstrings)")


def masked_mean(hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (B, L, D) over the real tokens (``valid`` (B, L)); an all-padding row gives 0."""
    weights = valid.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def _init_bert(module: nn.Module) -> None:
    """BERT's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _vocab_size(vocab_size: int | None, where: str) -> int:
    if vocab_size is None:
        raise KdlabError(f"{where}.vocab_size: unknown; train on a text dataset (its tokenizer sets it) or set it")
    return vocab_size


@register("model", "bert_encoder")
def bert_encoder(*, input_shape: tuple[int, ...], num_classes: int, mean: Optional[tuple[float, ...]] = None,
                 std: Optional[tuple[float, ...]] = None, vocab_size: Optional[int] = None,
                 pad_token_id: Optional[int] = None, hidden: Width = 64, layers: Depth = 2, heads: Width = 4,
                 intermediate: Optional[Width] = None, dropout: float = 0.1) -> BertEncoderClassifier:
    """BERT-style encoder: post-LN transformer on token ids, mean-pooled linear classifier (from scratch)."""
    return BertEncoderClassifier(vocab_size=_vocab_size(vocab_size, "student"), num_classes=num_classes,
                                 hidden=hidden, layers=layers, heads=heads, intermediate=intermediate,
                                 max_positions=max(512, int(input_shape[0])), dropout=dropout,
                                 pad_token_id=0 if pad_token_id is None else pad_token_id)


# Hugging Face BERT checkpoint keys that the classifier does not use.
_UNUSED_KEYS = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")


def load_bert_checkpoint(model: BertEncoderClassifier, folder: str | Path, *, strict_layers: bool = True) -> None:
    """Load a Hugging Face BERT ``model.safetensors`` (BertModel keys, optionally prefixed ``bert.``).

    Layers beyond the model's depth are skipped (a truncated encoder keeps the
    first layers); the classifier keeps its fresh initialisation.
    """
    from safetensors.torch import load_file

    path = Path(folder) / "model.safetensors"
    try:
        tensors = load_file(str(path))
    except (OSError, RuntimeError) as error:
        raise KdlabError(f"{path}: cannot read the checkpoint ({error}); pass a folder with model.safetensors") from None
    tensors = {key.removeprefix("bert."): value for key, value in tensors.items()}
    own = model.state_dict()
    loaded = {}
    for key, value in tensors.items():
        if key in _UNUSED_KEYS:
            continue
        if key.startswith("encoder.layer."):
            if int(key.split(".")[2]) >= model.num_layers:
                continue
        if key not in own:
            if strict_layers:
                raise KdlabError(f"{path}: key {key!r} has no place in the encoder; is this a BERT checkpoint?")
            continue
        if own[key].shape != value.shape:
            raise KdlabError(f"{path}: {key} has shape {tuple(value.shape)} but the encoder's is "
                             f"{tuple(own[key].shape)}; set the model options from the checkpoint's config.json")
        loaded[key] = value
    missing = [k for k in own if k not in loaded and not k.startswith("classifier.")]
    if missing:
        raise KdlabError(f"{path}: the checkpoint lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    model.load_state_dict(loaded, strict=False)


def bert_config(folder: str | Path) -> dict:
    """Model options from a Hugging Face BERT ``config.json``."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise KdlabError(f"{path}: cannot read the model config ({error}); pass a Hugging Face BERT folder") from None
    if config.get("model_type") != "bert":
        raise KdlabError(f"{path}: model_type {config.get('model_type')!r} is not 'bert'; pass a BERT checkpoint")
    return {"vocab_size": config["vocab_size"], "hidden": config["hidden_size"], "layers": config["num_hidden_layers"],
            "heads": config["num_attention_heads"], "intermediate": config["intermediate_size"],
            "max_positions": config["max_position_embeddings"], "type_vocab_size": config["type_vocab_size"],
            "layer_norm_eps": config["layer_norm_eps"], "pad_token_id": config.get("pad_token_id", 0)}


@register("model", "minilm")
def minilm(*, input_shape: tuple[int, ...], num_classes: int, mean: Optional[tuple[float, ...]] = None,
           std: Optional[tuple[float, ...]] = None, vocab_size: Optional[int] = None, pad_token_id: Optional[int] = None,
           layers: Depth = 6, dropout: float = 0.1, path: Optional[str] = None, pretrained: bool = True
           ) -> BertEncoderClassifier:
    """Pretrained all-MiniLM-L6-v2 (6×384, 12 heads) with a fresh classifier; ``layers`` keeps the first ones."""
    from kdlab.data.text import minilm_dir

    folder = Path(path).expanduser() if path else minilm_dir()
    options = bert_config(folder)
    if not 1 <= layers <= options["layers"]:
        raise KdlabError(f"student.layers: {layers} is outside 1..{options['layers']} for {folder}; keep the first "
                         "layers with a value in that range")
    if vocab_size is not None and vocab_size != options["vocab_size"]:
        raise KdlabError(f"data.tokenizer: the dataset's vocabulary has {vocab_size} tokens but {folder} was trained "
                         f"with {options['vocab_size']}; tokenize with data.tokenizer: minilm")
    if int(input_shape[0]) > options["max_positions"]:
        raise KdlabError(f"data.max_length: {input_shape[0]} exceeds MiniLM's {options['max_positions']} positions")
    if pad_token_id is not None and pad_token_id != options["pad_token_id"]:
        raise KdlabError(f"data.tokenizer: the dataset pads with id {pad_token_id} but {folder} with "
                         f"{options['pad_token_id']}; tokenize with data.tokenizer: minilm")
    options.update(layers=layers, dropout=dropout)
    model = BertEncoderClassifier(num_classes=num_classes, **options)
    if pretrained:
        load_bert_checkpoint(model, folder)
    return model
