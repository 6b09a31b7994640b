"""sdpa without a tokens x tokens mask for packed sequences and sliding windows (training's `sdpa`).

transformers 5 gives sdpa a (batch, 1, tokens, tokens) mask whenever the position ids restart (packing) or a
sliding window is shorter than the sequence; torch's kernels then convert it to an additive float mask and save it
for backward (16 MiB per layer at 2,048 tokens on a CPU, 12.8 GB at 80,000 tokens), and a GPU's flash kernel is
off. Registered through transformers' attention interface as `qlora_sdpa` (its mask function builds no mask where
this attention needs none), each document of a packed row is attended on its own with sdpa's `is_causal`, and a
sliding window shorter than the document is attended block by block: window-sized query blocks
against their window of keys, with one small additive band mask (window x 2 window) shared by every block. Padded
batches and generation (a cache) keep transformers' sdpa path and its mask. flash-attn's varlen kernels do the same
on a GPU where installed; this one runs everywhere, the CPU included, with torch alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "qlora_sdpa"


def install() -> str:
    """Register `qlora_sdpa` with transformers (attention and mask functions); returns the name to load with."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, mask)
    return NAME


def mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, use_vmap=False, **kwargs):
    """No mask for a training forward (no padding, no cache, no custom mask functions): `attention` applies
    causality, documents and windows itself. Anything else: transformers' sdpa mask."""
    from transformers.masking_utils import sdpa_mask

    plain = attention_mask is None or bool(attention_mask.all())
    if plain and not use_vmap and q_length == kv_length and not q_offset and not kv_offset:
        return None
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        attention_mask=attention_mask,
        use_vmap=use_vmap,
        **kwargs,
    )


def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, **kwargs):
    """transformers' attention-function signature: (batch, heads, tokens, dim) in, (batch, tokens, heads, dim) out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    tokens = query.shape[2]
    documents = document_spans(kwargs.get("position_ids"), query.shape[0], tokens)
    window = sliding_window if sliding_window and sliding_window < tokens else None
    if attention_mask is not None or key.shape[2] != tokens or (documents is None and window is None):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    gqa = query.shape[1] != key.shape[1]
    out = query.new_empty(query.shape[0], tokens, query.shape[1], query.shape[3])  # the layout sdpa returns
    spans = documents or [[(0, tokens)]] * query.shape[0]
    for row, row_spans in enumerate(spans):
        for start, end in row_spans:
            q, k, v = (t[row : row + 1, :, start:end] for t in (query, key, value))
            out[row : row + 1, start:end] = windowed(q, k, v, window, scaling, dropout, gqa).transpose(1, 2)
    return out, None


def document_spans(position_ids, batch: int, tokens: int) -> list[list[tuple[int, int]]] | None:
    """Each row's documents as (start, end), where the position ids restart (packing); None when none restarts."""
    if position_ids is None or position_ids.shape[-1] != tokens:
        return None
    ids = position_ids.expand(batch, -1)
    starts = ids[:, 1:] != ids[:, :-1] + 1
    if not bool(starts.any()):
        return None
    spans = []
    for row in starts.cpu():
        cuts = [0, *(row.nonzero().flatten() + 1).tolist(), tokens]
        spans.append(list(zip(cuts[:-1], cuts[1:], strict=True)))
    return spans


def windowed(q, k, v, window: int | None, scaling, dropout: float, gqa: bool):
    """Causal attention over one document; with `window` shorter than it, block by block (see the module doc)."""
    tokens = q.shape[2]
    options = {"scale": scaling, "dropout_p": dropout, "enable_gqa": gqa}
    if window is None or tokens <= window:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **options)
    band = band_mask(window, q.dtype, q.device)
    if gqa and q.is_cuda:
        # CUDA's kernels that take a mask do not take grouped keys (torch would fall back to the math kernel, which
        # keeps every block's scores): the keys and values repeated once per document, each block a view of them
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
        options["enable_gqa"] = False
    blocks = [
        F.scaled_dot_product_attention(q[:, :, :window], k[:, :, :window], v[:, :, :window], is_causal=True, **options)
    ]
    for start in range(window, tokens, window):
        end = min(start + window, tokens)
        rows = end - start
        blocks.append(
            F.scaled_dot_product_attention(
                q[:, :, start:end],
                k[:, :, start - window : end],
                v[:, :, start - window : end],
                attn_mask=band[:rows, : window + rows],
                **options,
            )
        )
    return torch.cat(blocks, dim=2)


def band_mask(window: int, dtype, device) -> torch.Tensor:
    """Additive mask of a query block (window rows) against its keys (the window before it, then its own): query i
    sees key j when j - window is within (i - window, i], transformers' sliding-window rule."""
    rows = torch.arange(window, device=device)[:, None]
    cols = torch.arange(2 * window, device=device)[None]
    allowed = (cols > rows) & (cols <= rows + window)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
