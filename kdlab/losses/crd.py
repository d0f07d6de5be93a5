"""CRD's pieces (Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020, §3.2–3.4).

The critic of the paper, for an anchor embedding a and an embedding m from the other network,

    h(a, m) = P / (P + K/N),        P = exp(aᵀm / τ) / Z

(K negatives, N train samples, Z a normalisation constant), and the NCE objective it is trained with,

    L = −(1/B) Σ_b [ log h(a_b, m_b⁺) + Σ_{k=1}^{K} log(1 − h(a_b, m_bk⁻)) ]

As the official code (HobbitLong/RepDistiller ``crd/criterion.py`` ``ContrastLoss``, ``Embed``/``Normalize``
and ``crd/memory.py`` ``ContrastMemory``; mdistiller's ``distillers/CRD.py`` is the same code): ``1 − h`` is
written ``(K/N) / (P + K/N + ε)`` and ``h`` as ``P / (P + K/N + ε)`` with ε = 1e-7; memory rows are updated
with momentum and renormalised. Not registered: the memory bank and its indices belong to the method.
"""
from __future__ import annotations

import torch

from kdlab.errors import KdlabError

EPS = 1e-7  # official criterion.py ``eps``


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows divided by their L2 norm (official ``Normalize(2)``: no epsilon)."""
    return x / x.pow(2).sum(1, keepdim=True).pow(0.5)


def contrast_scores(anchor: torch.Tensor, memory: torch.Tensor, index: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """``exp(m_{index[b, j]}ᵀ a_b / τ)``: ``anchor`` (B, d), ``memory`` (N, d), ``index`` (B, K+1) → (B, K+1).

    The memory rows are constants (detached), as in ``ContrastMemory.forward``; column 0 is the positive.
    """
    batch, width = anchor.shape
    rows = memory.index_select(0, index.reshape(-1)).detach().view(batch, -1, width)
    return torch.exp(torch.bmm(rows, anchor.unsqueeze(-1)).squeeze(-1) / temperature)


def nce_loss(probs: torch.Tensor, n_data: int) -> torch.Tensor:
    """The official ``ContrastLoss``: ``probs`` (B, K+1), column 0 the positive's P, the rest the negatives'.

    −(1/B)·[Σ_b log(P⁺/(P⁺ + K/N + ε)) + Σ_{b,k} log((K/N)/(P⁻ + K/N + ε))], a 0-dim tensor.
    """
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise KdlabError(f"loss crd: scores must be (B, K+1) with K ≥ 1 negatives, got {tuple(probs.shape)}")
    k = probs.shape[1] - 1
    noise = k / float(n_data)  # K · P_n with the uniform noise distribution P_n = 1/N
    pos, neg = probs[:, 0], probs[:, 1:]
    log_d1 = torch.log(pos / (pos + noise + EPS))
    log_d0 = torch.log(noise / (neg + noise + EPS))
    return -(log_d1.sum() + log_d0.sum()) / probs.shape[0]


def momentum_rows(rows: torch.Tensor, values: torch.Tensor, momentum: float) -> torch.Tensor:
    """``normalize(m · rows + (1 − m) · values)``: the memory's update of the positives' rows."""
    return l2_normalize(rows * momentum + values * (1.0 - momentum))


def sample_negatives(positives: torch.Tensor, k: int, n_data: int, generator: torch.Generator, *,
                     excluded: torch.Tensor | None = None) -> torch.Tensor:
    """(B, K) negative indices per row: uniform over ``range(n_data)`` without the row's own sample.

    ``excluded`` (B, N) bool marks further samples a row must avoid (CRD's samples of the anchor's class).
    Drawn without replacement (uniform random keys, the K smallest kept); a row left with fewer than K
    candidates draws them with replacement, as the official dataset's ``np.random.choice(..., replace=k > n)``.
    """
    batch = positives.shape[0]
    device = positives.device
    allowed = torch.arange(n_data, device=device).unsqueeze(0) != positives.unsqueeze(1)
    if excluded is not None:
        allowed = allowed & ~excluded
    keys = torch.rand(batch, n_data, generator=generator, device=device)
    keys = keys.masked_fill(~allowed, float("inf"))
    chosen = keys.topk(k, dim=1, largest=False).indices
    short = allowed.sum(1) < k
    if bool(short.any()):
        if not bool(allowed[short].any(1).all()):
            raise KdlabError("method crd: a sample has no negative to contrast with (every other sample shares its "
                             "class); use more classes or method.negatives: any")
        chosen[short] = torch.multinomial(allowed[short].float(), k, replacement=True, generator=generator)
    return chosen
