"""Hugging Face encoders (BERT-family ``AutoModel``) as kdlab classifiers, with attention taps.

``hf_encoder`` loads a local Hugging Face folder (``path``) or builds a random
model from a config dict (``config``, for tests; no download either way) with
**eager** attention, the only implementation that returns attention
probabilities. The encoder is wrapped with the same mean-pooled linear head as
``kdlab.models.encoder`` and publishes the same tap kinds:

* ``hidden``: ``encoder.layer.{i}`` outputs (``embeddings`` for layer -1);
* ``attention_output``: ``encoder.layer.{i}.attention.output`` (LayerNorm after the residual);
* ``attention_probs``: the self-attention module returns (context, probabilities); a
  forward hook passes the probabilities through the probe module ``attention_probs.{i}``,
  which ``kdlab.models.Taps`` captures like any module output.

Requires the ``hf`` extra (transformers).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from kdlab.errors import KdlabError
from kdlab.models.encoder import check_token_ids, masked_mean
from kdlab.registry import register


class _ProbsProbe(nn.Module):
    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        return probs


class HFEncoderClassifier(nn.Module):
    """A Hugging Face encoder + mean-pooled linear classifier; ``forward(ids) -> (B, num_classes)``."""

    def __init__(self, backbone: nn.Module, num_classes: int, dropout: float = 0.1):
        super().__init__()
        config = backbone.config
        if getattr(config, "_attn_implementation", "eager") != "eager":
            raise KdlabError(f"hf_encoder: attention implementation {config._attn_implementation!r} returns no "
                             "attention probabilities; load the model with attn_implementation='eager'")
        self.backbone = backbone
        self.pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        # Hugging Face returns the probabilities after attention dropout (qat_kd refuses a map loss on those).
        self.probs_dropout = float(getattr(config, "attention_probs_dropout_prob", 0.0) or 0.0)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, num_classes)
        self.attention_probs = nn.ModuleList([_ProbsProbe() for _ in range(self.num_layers)])
        self.feature_stages = tuple(f"backbone.encoder.layer.{i}" for i in range(self.num_layers))
        for index, layer in enumerate(self._layers()):
            layer.attention.self.register_forward_hook(self._probe_hook(index))

    def _layers(self):
        try:
            return self.backbone.encoder.layer
        except AttributeError:
            raise KdlabError(f"hf_encoder: {type(self.backbone).__name__} has no encoder.layer list; use a "
                             "BERT-family encoder") from None

    def _probe_hook(self, index: int):
        def hook(module, args, output):
            probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if probs is None:
                raise KdlabError("hf_encoder: the attention module returned no probabilities; load the model "
                                 "with attn_implementation='eager'")
            self.attention_probs[index](probs)
        return hook

    def encoder_tap(self, kind: str, layer: int) -> str:
        if kind == "hidden" and layer == -1:
            return "backbone.embeddings"
        return {"hidden": f"backbone.encoder.layer.{layer}", "attention_probs": f"attention_probs.{layer}",
                "attention_output": f"backbone.encoder.layer.{layer}.attention.output"}[kind]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        check_token_ids(ids, "hf_encoder")
        valid = ids != self.pad_token_id
        # output_attentions: older BERT attention modules return the probabilities only when asked.
        hidden = self.backbone(input_ids=ids, attention_mask=valid.long(), output_attentions=True).last_hidden_state
        return self.classifier(self.dropout(masked_mean(hidden, valid)))


@register("model", "hf_encoder")
def hf_encoder(*, input_shape: tuple[int, ...], num_classes: int, mean: Optional[tuple[float, ...]] = None,
                 std: Optional[tuple[float, ...]] = None, vocab_size: Optional[int] = None,
               pad_token_id: Optional[int] = None, path: Optional[str] = None, config: Optional[dict] = None,
               layers: Optional[int] = None, dropout: float = 0.1) -> HFEncoderClassifier:
    """A Hugging Face encoder (local ``path`` or a random one from ``config``), eager attention, linear head."""
    try:
        import transformers
    except ImportError:
        raise KdlabError("model hf_encoder needs transformers; install the extra: pip install -e '.[hf]'") from None
    if (path is None) == (config is None):
        raise KdlabError("student.path / student.config: hf_encoder needs exactly one: a local Hugging Face folder "
                         "(path) or a config dict (config, random weights)")
    overrides = {"attn_implementation": "eager"}
    if layers is not None:
        overrides["num_hidden_layers"] = layers
    if path is not None:
        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise KdlabError(f"student.path: {folder} has no config.json; pass a local Hugging Face model folder")
        backbone = transformers.AutoModel.from_pretrained(str(folder), add_pooling_layer=False, **overrides)
    else:
        settings = dict(config)
        model_type = settings.pop("model_type", "bert")
        hf_config = transformers.AutoConfig.for_model(model_type, **settings)
        if layers is not None:
            hf_config.num_hidden_layers = layers
        hf_config._attn_implementation = "eager"
        backbone = transformers.AutoModel.from_config(hf_config, add_pooling_layer=False)
    model_pad = backbone.config.pad_token_id if backbone.config.pad_token_id is not None else 0
    if pad_token_id is not None and pad_token_id != model_pad:
        raise KdlabError(f"data.tokenizer: the dataset pads with id {pad_token_id} but the Hugging Face model with "
                         f"{model_pad}; tokenize with the model's vocabulary")
    if vocab_size is not None and backbone.config.vocab_size != vocab_size:
        raise KdlabError(f"data.tokenizer: the dataset's vocabulary has {vocab_size} tokens but the Hugging Face "
                         f"model has {backbone.config.vocab_size}; tokenize with the model's vocabulary")
    return HFEncoderClassifier(backbone, num_classes, dropout=dropout)
