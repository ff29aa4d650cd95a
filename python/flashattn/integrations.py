"""flashattn inside other libraries: Hugging Face transformers' attention interface, and the kernels behind
``torch.nn.functional.scaled_dot_product_attention``'s flash path."""

import weakref
from typing import Optional

import torch

from ._ops import _aligned, _lse_shape, _Options, backward_into, forward_into
from .interface import flash_attn_func, flash_attn_varlen_func

Tensor = torch.Tensor

#: The name under which `register_transformers` registers the implementation. Transformers 5 takes any name
#: that contains "flash" for a request of the flash-attn package or a hub kernel, so this one does not.
TRANSFORMERS_NAME = "fattn"


def register_transformers(name: str = TRANSFORMERS_NAME) -> str:
    """Registers flashattn with transformers' attention and mask interfaces and returns the name to pass as
    ``attn_implementation`` (``from_pretrained(..., attn_implementation=name)`` or
    ``model.set_attn_implementation(name)``).

    Padding masks run through the variable-length path, as do packed batches (``cu_seq_lens_q/k`` in the
    attention kwargs, or ``position_ids`` that restart); scaling, sliding windows, softcapping and causality come
    from the model. Attention sinks, dropout during training and returned attention weights raise errors.
    """
    if "flash" in name.lower():
        raise ValueError(f"transformers would take {name!r} for the flash-attn package: choose a name without 'flash'")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, transformers_attention)
    # The flash-style mask: None without padding, else the 2-D padding mask that selects the varlen path.
    AttentionMaskInterface.register(name, _pass_mask)
    return name


def transformers_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    is_causal: Optional[bool] = None,
    s_aux: Optional[Tensor] = None,
    **kwargs,
):
    """transformers' attention function: q, k, v (batch, heads, seqlen, head_dim); returns the output as
    (batch, seqlen, heads, head_dim) and no attention weights."""
    if s_aux is not None:
        raise NotImplementedError("flashattn has no attention sinks (s_aux): use attn_implementation='eager'")
    if kwargs.get("output_attentions", False):
        raise NotImplementedError("flashattn does not materialize attention weights: use attn_implementation='eager'")
    if dropout > 0.0:
        raise NotImplementedError(f"flashattn has no attention dropout (the module asks for {dropout}): set the "
                                  "model's attention_dropout to 0 or call model.eval()")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"flashattn takes a 2-D padding mask, got one of shape {tuple(attention_mask.shape)}: "
                         f"register the mask interface too (flashattn.register_transformers does)")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    if q.is_cuda and q.dtype == torch.float32:
        from transformers.integrations.flash_attention import get_target_dtype

        dtype = get_target_dtype(q, module)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    options = dict(
        softmax_scale=scaling,
        causal=is_causal if is_causal is not None else getattr(module, "is_causal", True),
        window_size=(sliding_window - 1, sliding_window - 1) if sliding_window else (-1, -1),
        softcap=softcap or 0.0,
    )
    if attention_mask is not None:
        return _padded_attention(q, k, v, attention_mask, options), None
    packed = _packed_offsets(q, kwargs)
    if packed is not None:
        cu_q, cu_k, max_q, max_k = packed
        flat = [t.reshape(-1, t.shape[-2], t.shape[-1]) for t in (q, k, v)]
        out = flash_attn_varlen_func(*flat, cu_q, cu_k, max_q, max_k, **options)
        return out.view(q.shape[0], -1, q.shape[2], v.shape[-1]), None
    return flash_attn_func(q, k, v, **options), None


def _packed_offsets(q: Tensor, kwargs: dict):
    """Offsets of sequences packed into one batch row: given (``cu_seq_lens_q/k``, ``max_length_q/k``), or read
    from ``position_ids`` that restart at 0; None for an ordinary batch."""
    given = [kwargs.get(n) for n in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")]
    if all(x is not None for x in given):
        cu_q, cu_k, max_q, max_k = given
        return cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k)
    position_ids = kwargs.get("position_ids")
    if position_ids is None or q.shape[0] != 1 or position_ids.shape[-1] != q.shape[1] or q.shape[1] < 2:
        return None
    if torch.compiler.is_compiling():
        return _offsets_from_positions(position_ids)
    # Reading the positions waits for the GPU. Every layer of a forward pass gets the same position_ids tensor,
    # so the answer is kept for it: one wait per pass, not one per layer. It is dropped when the tensor is written
    # to (its version counter; inference tensors have none) and when a pass builds its masks (`_pass_mask`).
    seen, version, offsets = _last_positions
    now = None if position_ids.is_inference() else position_ids._version
    if seen is None or seen() is not position_ids or version != now:
        offsets = _offsets_from_positions(position_ids)
        _last_positions[:] = [weakref.ref(position_ids), now, offsets]
    return offsets


#: (a weak reference to the last position_ids seen, its version counter, its offsets).
_last_positions = [None, None, None]


def _pass_mask(*args, **kwargs):
    """transformers' flash-style mask, built once at the start of each forward pass."""
    from transformers.masking_utils import flash_attention_mask

    _last_positions[:] = [None, None, None]
    return flash_attention_mask(*args, **kwargs)


def _offsets_from_positions(position_ids: Tensor):
    """Offsets of the sequences whose positions restart at 0 in a row, or None when the positions just count up."""
    positions = position_ids.reshape(-1)
    if bool((positions[1:] - positions[:-1] == 1).all()):
        return None
    starts = torch.nonzero(positions == 0).flatten().to(torch.int32)
    total = torch.tensor([positions.numel()], dtype=torch.int32, device=positions.device)
    cu = torch.cat([starts, total])
    longest = int((cu[1:] - cu[:-1]).max())
    return cu, cu, longest, longest


def _unpad(mask: Tensor, *xs: Tensor):
    """The rows of each x (batch, seqlen, heads, dim) that `mask` (batch, seqlen) keeps, packed, with their
    indices, offsets and the longest length."""
    lengths = mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(mask.flatten()).flatten()
    cu = torch.nn.functional.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
    rows = [x.reshape(-1, x.shape[-2], x.shape[-1]).index_select(0, indices) for x in xs]
    return rows, indices, cu, int(lengths.max())


def _padded_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, options: dict) -> Tensor:
    """A padded batch through the variable-length path, as transformers' flash integration does: keys by the
    mask, queries by its last seqlen_q columns (left padding) or, one query per sequence, as they are."""
    batch, len_q = q.shape[:2]
    mask = mask.bool()
    (k_rows, v_rows), _, cu_k, max_k = _unpad(mask, k, v)
    if len_q == 1:
        q_rows = q.reshape(batch, q.shape[-2], q.shape[-1])
        indices = torch.arange(batch, device=q.device)
        cu_q, max_q = torch.arange(batch + 1, dtype=torch.int32, device=q.device), 1
    else:
        (q_rows,), indices, cu_q, max_q = _unpad(mask[:, -len_q:], q)
    out_rows = flash_attn_varlen_func(q_rows, k_rows, v_rows, cu_q, cu_k, max_q, max_k, **options)
    out = out_rows.new_zeros(batch * len_q, *out_rows.shape[1:])
    out = out.index_copy(0, indices, out_rows)
    return out.view(batch, len_q, *out_rows.shape[1:])


# ----------------------------------------------------------------------------------------------------------------
# scaled_dot_product_attention's flash path


SDPA_NAME = "flashattn"


def activate_sdpa() -> str:
    """Runs ``F.scaled_dot_product_attention``'s flash backend (and torch's varlen attention and context
    parallelism, which call the same operators) on flashattn's kernels, on CUDA tensors. Needs torch's
    flash-attention registry (``torch.nn.attention.register_flash_attention_impl``). Returns the implementation's
    name; ``torch.nn.attention.restore_flash_attention_impl()`` undoes it."""
    attention = torch.nn.attention
    if not hasattr(attention, "register_flash_attention_impl"):
        raise NotImplementedError(f"torch {torch.__version__} has no flash-attention registry "
                                  "(torch.nn.attention.register_flash_attention_impl): upgrade torch")
    attention.register_flash_attention_impl(SDPA_NAME, register_fn=_register_sdpa_kernels)
    attention.activate_flash_attention_impl(SDPA_NAME)
    return SDPA_NAME


class _SdpaHandle:
    """Keeps the dispatcher registrations alive; dropping the library removes them."""

    def __init__(self, library):
        self.library = library

    def remove(self) -> None:
        self.library = None


def _register_sdpa_kernels() -> _SdpaHandle:
    lib = torch.library.Library("aten", "IMPL", "CUDA")  # noqa: TOR901
    lib.impl("_flash_attention_forward", _flash_attention_forward, "CUDA")
    lib.impl("_flash_attention_backward", _flash_attention_backward, "CUDA")
    lib.impl("_scaled_dot_product_flash_attention", _sdpa_flash_forward, "CUDA")
    lib.impl("_scaled_dot_product_flash_attention_backward", _sdpa_flash_backward, "CUDA")
    return _SdpaHandle(lib)


def _sdpa_options(q, scale, is_causal, left, right, alibi_slopes, cu_q, cu_k, max_q, max_k) -> _Options:
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    left = -1 if left is None else left
    right = 0 if is_causal else (-1 if right is None else right)
    deterministic = torch.are_deterministic_algorithms_enabled()
    return _Options(scale, is_causal, left, right, 0.0, deterministic, alibi_slopes, cu_q, cu_k, max_q, max_k)


def _no_dropout(dropout_p: float) -> None:
    if dropout_p > 0.0:
        raise NotImplementedError(f"flashattn's SDPA kernels have no dropout (dropout_p = {dropout_p})")


def _write(result: Tensor, into: Optional[Tensor]) -> Tensor:
    """`result`, copied into `into` when the caller gave a buffer of its own layout."""
    if into is None or into.data_ptr() == result.data_ptr():
        return result
    return into.copy_(result)


def _contiguous_view_or_new(t: Tensor) -> Tensor:
    return t if t.is_contiguous() else torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _flash_attention_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                             return_debug_mask, *, scale=None, window_size_left=None, window_size_right=None,
                             seqused_k=None, alibi_slopes=None, out=None):
    _no_dropout(dropout_p)
    if seqused_k is not None:
        raise NotImplementedError("flashattn's SDPA kernels take no seqused_k")
    q, k, v = _aligned(query), _aligned(key), _aligned(value)
    opts = _sdpa_options(q, scale, is_causal, window_size_left, window_size_right, alibi_slopes, cum_seq_q, cum_seq_k,
                         max_q, max_k)
    result = _contiguous_view_or_new(out) if out is not None else torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(_lse_shape(q, cum_seq_q is not None), dtype=torch.float32, device=q.device)
    forward_into(q, k, v, result, lse, opts)
    rng_state = torch.zeros((2,), dtype=torch.uint64, device=q.device)
    philox_offset = torch.zeros((), dtype=torch.uint64, device=q.device)
    debug_mask = torch.empty(0, dtype=q.dtype, device=q.device)
    return _write(result, out), lse, rng_state, philox_offset, debug_mask


def _flash_attention_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k,
                              dropout_p, is_causal, rng_state, unused, *, scale=None, window_size_left=None,
                              window_size_right=None, into=None):
    _no_dropout(dropout_p)
    q, k, v, o, do = (_aligned(t) for t in (query, key, value, out, grad_out))
    opts = _sdpa_options(q, scale, is_causal, window_size_left, window_size_right, None, cum_seq_q, cum_seq_k, max_q,
                         max_k)
    targets = into or (None, None, None)
    grads = [torch.empty(t.shape, dtype=t.dtype, device=t.device) if d is None else _contiguous_view_or_new(d)
             for t, d in zip((q, k, v), targets)]
    backward_into(do, q, k, v, o, logsumexp, *grads, opts)
    return tuple(_write(g, d) for g, d in zip(grads, targets))


def _sdpa_flash_forward(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
    # SDPA's tensors are (batch, heads, seqlen, dim); the kernels' (batch, seqlen, heads, dim). The output keeps
    # the query's memory layout, as torch's shape function says.
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    out = torch.empty_like(query)
    _, lse, rng_state, philox_offset, debug_mask = _flash_attention_forward(
        q, k, v, None, None, q.shape[1], k.shape[1], dropout_p, is_causal, return_debug_mask, scale=scale,
        out=out.transpose(1, 2))
    return out, lse, None, None, query.shape[2], key.shape[2], rng_state, philox_offset, debug_mask


def _sdpa_flash_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                         is_causal, philox_seed, philox_offset, *, scale=None):
    q, k, v, o, do = (t.transpose(1, 2) for t in (query, key, value, out, grad_out))
    grads = [torch.empty_like(t) for t in (query, key, value)]
    _flash_attention_backward(do, q, k, v, o, logsumexp, None, None, q.shape[1], k.shape[1], dropout_p, is_causal,
                              philox_seed, philox_offset, scale=scale, into=[g.transpose(1, 2) for g in grads])
    return tuple(grads)
