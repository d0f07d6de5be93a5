"""A small Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words").

Non-overlapping patches (2-D for images ``(C, H, W)``, 1-D along ``L`` for
sequences ``(C, L)``) are linearly embedded, a learned class token is prepended,
learned position embeddings are added, and pre-LayerNorm transformer blocks
follow; the class token's final (layer-normed) state is the feature vector.
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.config.validate import Depth, Width
from kdlab.errors import KdlabError
from kdlab.models.common import StagedNet, check_common, check_dropout, check_positive
from kdlab.registry import register


class PatchEmbed(nn.Module):
    """``(N, C, *spatial) -> (N, 1 + P, dim)`` tokens: patches, class token, position embedding."""

    def __init__(self, input_shape: tuple[int, ...], *, patch_size: int, dim: int, dropout: float):
        super().__init__()
        conv = nn.Conv2d if len(input_shape) == 3 else nn.Conv1d
        # A conv with stride = kernel = patch size is a linear map of each flattened patch.
        self.project = conv(input_shape[0], dim, patch_size, stride=patch_size)
        patches = math.prod(d // patch_size for d in input_shape[1:])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(torch.zeros(1, 1 + patches, dim))
        self.dropout = nn.Dropout(dropout)
        nn.init.trunc_normal_(self.position, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.project(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return self.dropout(torch.cat([cls, tokens], dim=1) + self.position)


class Attention(nn.Module):
    """Multi-head self-attention via ``F.scaled_dot_product_attention``; ``(N, T, dim) -> (N, T, dim)``."""

    def __init__(self, dim: int, *, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj_dropout(self.proj(out.transpose(1, 2).reshape(n, t, d)))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(LN(x))`` then ``x + mlp(LN(x))``."""

    def __init__(self, dim: int, *, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        hidden = max(1, round(dim * mlp_ratio))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads=heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ClassTokenPool(nn.Module):
    """Final LayerNorm, then the class token: ``(N, T, dim) -> (N, dim)``."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x)[:, 0]


class ViT(StagedNet):
    """``embed`` (tokens), ``block1..blockK`` (``(N, T, dim)``), ``pool`` (class token), ``head``."""

    def __init__(self, *, input_shape, num_classes, mean, std, patch_size: int, dim: int, depth: int,
                 heads: int, mlp_ratio: float, dropout: float):
        stages: list[tuple[str, nn.Module]] = [
            ("embed", PatchEmbed(input_shape, patch_size=patch_size, dim=dim, dropout=dropout))]
        for index in range(1, depth + 1):
            stages.append((f"block{index}", Block(dim, heads=heads, mlp_ratio=mlp_ratio, dropout=dropout)))
        stages.append(("pool", ClassTokenPool(dim)))
        super().__init__(input_shape=input_shape, num_classes=num_classes, mean=mean, std=std,
                         stages=stages, head=nn.Linear(dim, num_classes))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)


@register("model", "vit_tiny")
def vit_tiny(
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    patch_size: Width = 4,
    dim: Width = 128,
    depth: Depth = 4,
    heads: Width = 4,
    mlp_ratio: float = 2.0,
    dropout: float = 0.0,
) -> ViT:
    """Tiny Vision Transformer for images (C, H, W) or sequences (C, L) (Dosovitskiy et al. 2021).

    Input ``(N, *input_shape)`` -> logits ``(N, num_classes)``; each spatial size
    must be divisible by ``patch_size`` (MNIST-1D's L=40 with patch 4 gives 10 tokens).
    """
    model = "vit_tiny"
    shape, mean, std = check_common(model, input_shape=input_shape, num_classes=num_classes,
                                    mean=mean, std=std, ranks=(2, 3))
    for key, value in (("patch_size", patch_size), ("dim", dim), ("heads", heads), ("mlp_ratio", mlp_ratio)):
        check_positive(model, key, value)
    if depth < 0:
        raise KdlabError(f"{model}: depth={depth!r} must be >= 0; set depth to the number of blocks")
    check_dropout(model, dropout)
    if any(d % patch_size for d in shape[1:]):
        raise KdlabError(f"{model}: input size {shape[1:]} is not divisible by patch_size={patch_size}; "
                         "choose a patch_size dividing every spatial size")
    if dim % heads:
        raise KdlabError(f"{model}: dim={dim} is not divisible by heads={heads}; choose heads dividing dim")
    return ViT(input_shape=shape, num_classes=num_classes, mean=mean, std=std, patch_size=patch_size, dim=dim,
               depth=depth, heads=heads, mlp_ratio=mlp_ratio, dropout=dropout)
