"""FlashAttention-2's Python API: the same names, argument order, layouts and return conventions.

q is (batch, seqlen_q, heads_q, head_dim), k and v (batch, seqlen_k, heads_kv, head_dim); heads_q a multiple of
heads_kv (grouped-query attention). CUDA tensors (float16, bfloat16) run on the GPU on torch's current stream;
CPU tensors (float32, float16, bfloat16) on the CPU. One difference from FlashAttention-2: a query row that sees
no key gets log-sum-exp -inf (FlashAttention-2 gives +inf), the value that merges partial results correctly.
"""

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ._ops import attention, kvcache

Tensor = torch.Tensor

_GPU_DTYPES = (torch.float16, torch.bfloat16)
_CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(q: Tensor, k: Tensor, v: Tensor, dropout_p: float, rank: int) -> None:
    if dropout_p > 0.0:
        raise ValueError(f"dropout_p = {dropout_p}: flashattn has no dropout (attention is exact); pass 0.0")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != rank:
            layout = "(batch, seqlen, heads, head_dim)" if rank == 4 else "(total_tokens, heads, head_dim)"
            raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"q, k and v must be on one device: q on {q.device}, {name} on {t.device}")
        if t.dtype != q.dtype:
            raise ValueError(f"q, k and v must share a dtype: q is {q.dtype}, {name} is {t.dtype}")
    allowed = _GPU_DTYPES if q.is_cuda else _CPU_DTYPES
    if q.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise ValueError(f"flashattn on {q.device.type} takes {names}; got {q.dtype}")


def _window(window_size: Tuple[int, int], causal: bool) -> Tuple[int, int]:
    left, right = window_size
    return (max(left, -1), 0 if causal else max(right, -1))


def _padded(q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor, Tensor, int]:
    """On a GPU, head dims are multiples of 8: pad with zeros (which change no score) and crop the output."""
    d = q.shape[-1]
    if not q.is_cuda or d % 8 == 0:
        return q, k, v, d
    pad = [0, 8 - d % 8]
    return F.pad(q, pad), F.pad(k, pad), F.pad(v, pad), d


def _run(q, k, v, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, varlen):
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    left, right = _window(window_size, causal)
    q, k, v, d = _padded(q, k, v)
    cu_q, cu_k, max_q, max_k = varlen
    out, lse = attention(q, k, v, float(softmax_scale), bool(causal), int(left), int(right), float(softcap), alibi_slopes,
                    cu_q, cu_k, int(max_q), int(max_k), bool(deterministic))
    return out[..., :d] if out.shape[-1] != d else out, lse


def flash_attn_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """Exact attention softmax(q k^T * scale) v over (batch, seqlen, heads, head_dim) tensors.

    Args:
        q: (batch, seqlen_q, heads_q, head_dim).
        k, v: (batch, seqlen_k, heads_kv, head_dim); heads_q must be a multiple of heads_kv.
        dropout_p: must be 0.0 (no dropout here).
        softmax_scale: defaults to 1 / sqrt(head_dim).
        causal: causal mask, aligned to the bottom-right corner when seqlen_q != seqlen_k.
        window_size: (left, right) sliding window in tokens around each query's diagonal; -1 is unbounded.
        softcap: if > 0, scores become softcap * tanh(scores / softcap) (after the scale).
        alibi_slopes: float32 (heads_q,) or (batch, heads_q); adds -slope * |i + seqlen_k - seqlen_q - j|.
        deterministic: bit-reproducible backward pass (GPU; the CPU backward always is).
        return_attn_probs: also return the log-sum-exp: (out, softmax_lse, None).

    Returns:
        out (batch, seqlen_q, heads_q, head_dim); with return_attn_probs, (out, softmax_lse, None) where
        softmax_lse is float32 (batch, heads_q, seqlen_q), natural log, -inf for a row that sees no key.
    """
    _check(q, k, v, dropout_p, 4)
    out, lse = _run(q, k, v, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                    (None, None, 0, 0))
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """Exact attention over a batch of sequences of different lengths, packed along the first dimension.

    Args:
        q: (total_q, heads_q, head_dim); k, v: (total_k, heads_kv, head_dim).
        cu_seqlens_q, cu_seqlens_k: int32 (batch + 1,) cumulative offsets on q's device, starting at 0.
        max_seqlen_q, max_seqlen_k: the longest sequence of each (no sequence may be longer).
        The rest as `flash_attn_func`; masks and ALiBi apply per sequence.

    Returns:
        out (total_q, heads_q, head_dim); with return_attn_probs, (out, softmax_lse, None), softmax_lse float32
        (heads_q, total_q).
    """
    _check(q, k, v, dropout_p, 3)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.device != q.device:
            raise ValueError(f"{name} must be a 1-dimensional int32 tensor on {q.device}, got {cu.dtype} "
                             f"{tuple(cu.shape)} on {cu.device}")
    out, lse = _run(q, k, v, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                    (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))
    return (out, lse, None) if return_attn_probs else out


def flash_attn_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Optional[Tensor] = None,
    v: Optional[Tensor] = None,
    rotary_cos: Optional[Tensor] = None,
    rotary_sin: Optional[Tensor] = None,
    cache_seqlens=None,
    cache_batch_idx: Optional[Tensor] = None,
    cache_leftpad: Optional[Tensor] = None,
    block_table: Optional[Tensor] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: Optional[Tensor] = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
):
    """Attention of a few new queries per sequence against a key/value cache (decoding, speculative decoding,
    chunked prefill), optionally appending new keys and values to the cache in place first. No autograd; under
    torch.compile it is the operator `flashattn::kvcache`, which mutates the caches.

    Args:
        q: (batch, seqlen_q, heads_q, head_dim).
        k_cache, v_cache: (batch, capacity, heads_kv, head_dim), or with `block_table` a paged cache
            (num_blocks, page_size, heads_kv, head_dim), any page size (16 and up are typical).
        k, v: (batch, seqlen_new, heads_kv, head_dim): written into the caches at positions
            cache_seqlens[b] .. cache_seqlens[b] + seqlen_new, which the queries then attend to as well.
        rotary_cos, rotary_sin, rotary_interleaved: not implemented (apply rotary embeddings to q and k first).
        cache_seqlens: int or int32 (batch,) tokens in each cache before the new ones; None means full caches.
        cache_batch_idx, cache_leftpad: not implemented.
        block_table: int32 (batch, max_blocks) page indices of each sequence's tokens, in order.
        softmax_scale, causal, window_size, softcap, alibi_slopes: as `flash_attn_func` (causal and windows
            aligned bottom-right: the last query sits at the last key).
        num_splits: on a GPU, 0 lets the library split the keys to fill the GPU; n > 0 splits into at most n
            (1: never). The choice depends only on shapes, so calls can be captured in CUDA graphs.
        return_softmax_lse: also return the log-sum-exp, float32 (batch, heads_q, seqlen_q).

    Returns:
        out (batch, seqlen_q, heads_q, head_dim), or (out, softmax_lse) with return_softmax_lse.

    The lengths and page indices stay on the device and are not read back: a length past the capacity or a
    page outside the cache gives wrong results (never a write outside the caches).
    """
    for name, given in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin), ("cache_batch_idx", cache_batch_idx),
                        ("cache_leftpad", cache_leftpad)):
        if given is not None:
            raise NotImplementedError(f"flash_attn_with_kvcache: {name} is not implemented; "
                                      + ("apply rotary embeddings to q and k before the call" if "rotary" in name
                                         else "pass None"))
    if (k is None) != (v is None):
        raise ValueError("flash_attn_with_kvcache: give both k and v to append, or neither")
    _check(q, k_cache, v_cache, 0.0, 4)
    for name, t in (("k", k), ("v", v), ("block_table", block_table), ("cache_seqlens", cache_seqlens)):
        if isinstance(t, Tensor) and t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, is on {t.device}")
    if block_table is not None and block_table.dtype != torch.int32:
        raise ValueError(f"block_table must be int32, got {block_table.dtype}")
    batch = q.shape[0]
    capacity = k_cache.shape[1] * (block_table.shape[1] if block_table is not None and block_table.dim() == 2 else 1)
    if cache_seqlens is None:
        if k is not None:
            raise ValueError("flash_attn_with_kvcache: appending k and v needs cache_seqlens (the caches are full)")
        cache_seqlens = capacity
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)
    elif cache_seqlens.dtype != torch.int32:
        raise ValueError(f"cache_seqlens must be int32, got {cache_seqlens.dtype}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    left, right = _window(window_size, causal)
    out, lse = kvcache(q, k_cache, v_cache, cache_seqlens, block_table, k, v, float(softmax_scale), bool(causal),
                       int(left), int(right), float(softcap), alibi_slopes, int(num_splits))
    return (out, lse) if return_softmax_lse else out
