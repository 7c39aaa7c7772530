"""Scoring image tokens on plain tensors: which text rows count, which image tokens are valid, and the
attention each token receives per head. No model, no transformers.

Shapes use ``B`` batch, ``H`` query heads, ``G`` KV heads, ``L`` text rows, ``N`` image tokens,
``d`` head features. Additive masks follow transformers: ``0`` allowed, dtype-min masked.
"""

from __future__ import annotations

import torch


def scoring_rows(
    full_text_row_masked_out_mask: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    batch: int,
    length: int,
    device: torch.device,
) -> torch.Tensor:
    """Text rows ``(B, L)`` whose attention may score image tokens.

    transformers turns rows that may attend no image token (text before ``<|image|>``, left
    padding) into all-zero additive masks, i.e. uniform attention over every token, so the
    additive mask alone cannot tell them from rows that may attend everything. They are
    excluded through ``full_text_row_masked_out_mask`` (``(B, 1, L, 1)``, 0 for such rows) and
    padding through the 2-D ``attention_mask`` (its last ``L`` columns are this call's rows).
    """
    rows = torch.ones(batch, length, dtype=torch.bool, device=device)
    if full_text_row_masked_out_mask is not None:
        rows &= full_text_row_masked_out_mask.reshape(batch, length).to(device) != 0
    if attention_mask is not None and attention_mask.dim() == 2:
        rows &= attention_mask[:, -length:].to(device) != 0
    return rows


def valid_tokens(additive_mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Image tokens ``(B, N)`` that at least one scoring row may attend.

    Padding tiles (and images a sample does not have) are masked for every row, so they are
    never valid and can never be kept.
    """
    allowed = additive_mask[:, 0] == 0  # (B, L, N)
    return (allowed & rows[:, :, None]).any(dim=1)


def attention_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    additive_mask: torch.Tensor | None,
    rows: torch.Tensor,
    scaling: float,
    max_elements: int = 1 << 25,
) -> torch.Tensor:
    """Attention each image token receives, per head: softmax weights summed over scoring rows.

    Args:
        query: ``(B, H, L, d)`` queries after the layer's ``q_norm``.
        key: ``(B, G, N, d)`` keys after ``k_norm``; ``H`` must be a multiple of ``G`` (GQA).
        additive_mask: ``(B, 1, L, N)`` additive cross-attention mask or ``None``.
        rows: ``(B, L)`` bool, the rows that count (see :func:`scoring_rows`).
        scaling: softmax temperature, ``d ** -0.5`` in Mllama.
        max_elements: bound on probabilities materialised at once; query rows are chunked to fit,
            which is why an 11B prompt of thousands of tokens can be scored in little memory.

    Returns:
        ``(B, H, N)`` float32 scores. They equal the layer's eager attention weights summed over
        ``rows``; computing them beside the real attention keeps sdpa usable everywhere.
    """
    batch, heads, length, dim = query.shape
    kv_heads, tokens = key.shape[1], key.shape[2]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} KV heads")
    groups = heads // kv_heads
    # One GEMM per KV head covers every query head of its group: (B, G, groups * l, d) @ (B, G, d, N).
    # Broadcasting a (B, G, 1, d, N) key instead would copy it `groups` times per chunk. Mllama's keys
    # are a transposed view ((B, N, G, d) in memory), which bmm cannot batch without a copy: copy once
    # here, not once per chunk.
    key_t = key.contiguous().transpose(-1, -2)
    scores = torch.zeros(batch, heads, 1, tokens, dtype=torch.float32, device=query.device)
    chunk = max(1, max_elements // max(1, batch * heads * tokens))
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        weight = rows[:, start:stop]
        if not bool(weight.any()):
            continue
        rows_n = stop - start
        q = query[:, :, start:stop].reshape(batch, kv_heads, groups * rows_n, dim)
        logits = torch.matmul(q, key_t).view(batch, heads, rows_n, tokens).mul_(scaling)
        if additive_mask is not None:
            mask = additive_mask[:, :, start:stop]
            if bool(mask.any()):  # an all-zero mask (every token allowed, the common case) changes nothing
                logits.add_(mask)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        del logits
        # Sum over rows as a (B, H, 1, l) @ (B, H, l, N) product: one read of the probabilities.
        row_weight = weight.to(torch.float32)[:, None, None, :].expand(batch, heads, 1, rows_n)
        scores += torch.matmul(row_weight, probs)
    return scores[:, :, 0]


__all__ = ["attention_scores", "scoring_rows", "valid_tokens"]
