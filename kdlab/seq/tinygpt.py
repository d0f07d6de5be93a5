"""TinyGPT: a small decoder-only transformer (GPT-2 layout, Radford et al. 2019) with a KV cache.

Pre-LayerNorm blocks, learned token and position embeddings, causal
self-attention through ``F.scaled_dot_product_attention``, a GELU MLP of
ratio 4, a final LayerNorm and an LM head tied to the token embedding.

The forward signature is kdlab's *sequence-model protocol* (the Hugging Face
adapter follows it too)::

    logits = model(input_ids)                                   # (B, T) -> (B, T, V)
    logits, cache = model(input_ids, attention_mask=mask, position_ids=pos,
                          past_key_values=cache, use_cache=True)

Right-padded training batches need no mask: attention is causal, so padding
after the real tokens never reaches them (their logits are ignored through
labels = -100). Left-padded batches (generation) pass ``attention_mask`` and
``position_ids = (mask.cumsum(-1) - 1).clamp(min=0)``.

Fused losses (``kdlab.losses.fused``; GKD's ``method.fused``): ``output_layer()`` is the LM head's
``(weight (V, D), bias or None)``; with ``emit_hidden_states = True`` a *training-mode* forward without a
cache returns the final hidden states ``(B, T, D)`` (the head's input) instead of the logits, so no
``(B, T, V)`` tensor is formed; eval-mode forwards (evaluation, generation) still return logits.

Feature taps: ``embed`` (B, T, D), ``blocks.0`` .. ``blocks.{L-1}`` (B, T, D;
each block returns ``(x, (k, v))`` and taps keep ``x``), ``final_norm`` (B, T, D);
they are listed in ``model.feature_stages``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.config.validate import Depth, Width
from kdlab.errors import KdlabError
from kdlab.models.common import check_dropout, check_positive
from kdlab.registry import register


class KVCache:
    """Keys and values of every position seen so far, per layer: ``(B, heads, S, head_dim)`` each.

    Immutable in use: a forward with ``use_cache=True`` returns a *new* cache
    (the old tensors concatenated with the new ones), so a cache can be reused,
    e.g. to branch two continuations from one prefilled prompt.
    """

    def __init__(self, keys: list[Tensor] | None = None, values: list[Tensor] | None = None):
        self.keys = list(keys or [])
        self.values = list(values or [])

    @property
    def length(self) -> int:
        """Number of positions S held (0 for an empty cache)."""
        return self.keys[0].shape[2] if self.keys else 0

    def layer(self, index: int) -> tuple[Tensor, Tensor] | None:
        """``(k, v)`` of layer ``index``, or None for an empty cache."""
        return (self.keys[index], self.values[index]) if self.keys else None

    def __repr__(self) -> str:
        return f"KVCache(layers={len(self.keys)}, length={self.length})"


class Embedding(nn.Module):
    """Token + learned position embedding: ``(B, T)`` ids and positions -> ``(B, T, D)``."""

    def __init__(self, vocab_size: int, context_length: int, width: int, dropout: float):
        super().__init__()
        self.token = nn.Embedding(vocab_size, width)
        self.position = nn.Embedding(context_length, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        return self.dropout(self.token(input_ids) + self.position(position_ids))


class CausalSelfAttention(nn.Module):
    """Multi-head attention of the T new positions over the S cached + new ones."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.proj_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, *, attn_mask: Tensor | None, is_causal: bool,
                past: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        b, t, d = x.shape
        # (B, T, 3D) -> (3, B, heads, T, head_dim)
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, heads, S, head_dim)
            v = torch.cat([past[1], v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(b, t, d)  # (B, heads, T, head_dim) -> (B, T, D)
        return self.proj_dropout(self.proj(out)), (k, v)


class Block(nn.Module):
    """Pre-LN block: ``x + attn(LN(x))`` then ``x + mlp(LN(x))``; returns ``(x, (k, v))``."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width),
                                 nn.Dropout(dropout))

    def forward(self, x: Tensor, *, attn_mask: Tensor | None, is_causal: bool,
                past: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        attended, kv = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal, past=past)
        x = x + attended
        return x + self.mlp(self.norm2(x)), kv


def attention_mask_for(attention_mask: Tensor | None, *, past_length: int, new_length: int,
                       device: torch.device) -> tuple[Tensor | None, bool]:
    """``(attn_mask, is_causal)`` for SDPA; ``attn_mask`` is boolean, True = may attend.

    Without padding or cache: ``(None, True)``, SDPA's fast causal path (its
    ``is_causal`` aligns the triangle top-left, which is wrong once T < S, hence
    the explicit mask with a cache). A single new token without padding attends
    to everything: ``(None, False)``. Else a ``(T, S)`` causal mask with the cache
    offset, combined with the key-padding mask into ``(B, 1, T, S)``.
    """
    if attention_mask is None and past_length == 0:
        return None, True
    if attention_mask is None and new_length == 1:
        return None, False
    total = past_length + new_length
    query_positions = torch.arange(past_length, total, device=device)[:, None]  # (T, 1)
    key_positions = torch.arange(total, device=device)[None, :]  # (1, S)
    allowed = key_positions <= query_positions  # (T, S)
    if attention_mask is None:
        return allowed, False
    allowed = allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, :]  # (B, T, S)
    # A left-pad query sees only padding keys; an all-False row makes SDPA return NaN there, and in
    # the next layer that NaN value reaches real queries (0 weight * NaN = NaN): let it see itself.
    allowed = allowed | (key_positions == query_positions)
    return allowed[:, None], False  # (B, 1, T, S), broadcast over heads


class TinyGPT(nn.Module):
    """Decoder-only transformer over token ids ``(B, T)`` -> next-token logits ``(B, T, vocab_size)``."""

    emit_hidden_states = False  # True: training forwards return the head's input (see the module docstring)

    def __init__(self, vocab_size: int, context_length: int, layers: Depth = 2, width: Width = 128, heads: Width = 4,
                 dropout: float = 0.0, tie_embeddings: bool = True):
        super().__init__()
        model = "tinygpt"
        for key, value in (("vocab_size", vocab_size), ("context_length", context_length), ("width", width),
                           ("heads", heads)):
            check_positive(model, key, value)
        if layers < 0:
            raise KdlabError(f"{model}: layers={layers!r} must be >= 0; set layers to the number of blocks")
        if width % heads:
            raise KdlabError(f"{model}: width={width} is not divisible by heads={heads}; choose heads dividing width")
        check_dropout(model, dropout)
        self.vocab_size = int(vocab_size)
        self.context_length = int(context_length)
        self.embed = Embedding(self.vocab_size, self.context_length, width, dropout)
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(layers))
        self.final_norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, self.vocab_size, bias=False)
        self.feature_stages = ("embed", *(f"blocks.{i}" for i in range(layers)), "final_norm")
        self._init_weights(layers)
        if tie_embeddings:
            self.lm_head.weight = self.embed.token.weight

    def _init_weights(self, layers: int) -> None:
        # GPT-2 init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * layers) so the
        # residual stream's variance does not grow with depth.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            for projection in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(projection.weight, std=0.02 / math.sqrt(2 * max(layers, 1)))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                past_key_values: KVCache | None = None, use_cache: bool = False):
        """Logits ``(B, T, V)`` float; ``(logits, KVCache)`` when ``use_cache``.

        ``attention_mask``: ``(B, S)`` 1/0 or bool over past + current positions
        (0 = padding key), None = all valid. ``position_ids``: ``(B, T)``, None =
        ``past_length .. past_length + T - 1``; explicit ones must be < context_length.
        """
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"TinyGPT takes token ids (B, T) int64, got {input_ids.dtype} {tuple(input_ids.shape)}")
        batch, new_length = input_ids.shape
        past_length = past_key_values.length if past_key_values is not None else 0
        total = past_length + new_length
        if total > self.context_length:
            raise KdlabError(f"sequence of length {total} exceeds the model's context_length {self.context_length}; "
                             "shorten the sequences or raise the model's context_length")
        if attention_mask is not None and attention_mask.shape != (batch, total):
            raise ValueError(f"attention_mask must be (B, past + T) = {(batch, total)}, "
                             f"got {tuple(attention_mask.shape)}")
        if position_ids is None:
            position_ids = torch.arange(past_length, total, device=input_ids.device).expand(batch, new_length)
        attn_mask, is_causal = attention_mask_for(attention_mask, past_length=past_length,
                                                  new_length=new_length, device=input_ids.device)
        x = self.embed(input_ids, position_ids)
        keys, values = [], []
        for index, block in enumerate(self.blocks):
            past = past_key_values.layer(index) if past_key_values is not None else None
            x, (k, v) = block(x, attn_mask=attn_mask, is_causal=is_causal, past=past)
            keys.append(k)
            values.append(v)
        hidden = self.final_norm(x)
        if self.emit_hidden_states and self.training and not use_cache:
            return hidden
        logits = self.lm_head(hidden)
        return (logits, KVCache(keys, values)) if use_cache else logits

    def output_layer(self) -> tuple[Tensor, Tensor | None]:
        """The LM head's ``(weight (V, D), bias)``: logits = hidden @ weight.T (no bias)."""
        return self.lm_head.weight, self.lm_head.bias


@register("model", "tinygpt")
def tinygpt(
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    mean: Optional[tuple[float, ...]] = None,
    std: Optional[tuple[float, ...]] = None,
    layers: Depth = 2,
    width: Width = 128,
    heads: Width = 4,
    dropout: float = 0.0,
    context_length: Optional[int] = None,
    tie_embeddings: bool = True,
) -> TinyGPT:
    """Tiny decoder-only transformer (GPT-2 layout) for token sequences; vocab = num_classes.

    Input token ids ``(N, T)`` int64 -> next-token logits ``(N, T, num_classes)``.
    ``context_length`` defaults to ``input_shape[0]`` (the task's sequence
    length); ``mean``/``std`` are ignored (tokens are not normalised).
    """
    shape = tuple(input_shape)
    if len(shape) != 1 or isinstance(shape[0], bool) or not isinstance(shape[0], int) or shape[0] < 1:
        raise KdlabError(f"tinygpt: expects input_shape (T,) of token sequences, got {shape!r}; "
                         "use a sequence dataset (or a vision model for this data)")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise KdlabError(f"tinygpt: num_classes={num_classes!r} is the vocabulary size and must be an integer >= 2; "
                         "check the dataset's num_classes")
    if context_length is None:
        context_length = shape[0]
    if context_length < shape[0]:
        raise KdlabError(f"tinygpt: context_length={context_length} is shorter than the dataset's sequences "
                         f"({shape[0]} tokens); raise context_length or leave it null")
    return TinyGPT(num_classes, context_length, layers=layers, width=width, heads=heads, dropout=dropout,
                   tie_embeddings=tie_embeddings)
