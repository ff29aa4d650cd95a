"""The forward and backward passes as torch custom operators.

``flashattn::fwd`` and ``flashattn::bwd`` are registered with ``torch.library.custom_op``, with fake (shape-only)
implementations for tracing and the backward wired in with ``register_autograd``, so that ``torch.compile``
traces through them without a graph break. Their implementations hand each tensor to the Rust extension as
(address, dtype, shape, strides): CPU tensors run on the CPU backend, CUDA tensors on the GPU backend on torch's
current stream, with outputs and workspace from torch's allocator.
"""

import ctypes
import glob
import os
import sys
from typing import List, Optional, Tuple

import torch

from . import _core

Tensor = torch.Tensor


_DTYPE_NAMES = {d: str(d).removeprefix("torch.") for d in (torch.float32, torch.float16, torch.bfloat16, torch.int32)}


def _describe(t: Tensor) -> tuple:
    name = _DTYPE_NAMES.get(t.dtype) or str(t.dtype).removeprefix("torch.")
    return (t.data_ptr(), name, list(t.shape), list(t.stride()))


class _Options:
    """A call's options for the extension, holding the tensors among them (made contiguous) alive."""

    def __init__(self, scale, causal, window_left, window_right, softcap, deterministic, alibi_slopes, cu_seqlens_q,
                 cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        self.tensors = [_contiguous(t) for t in (alibi_slopes, cu_seqlens_q, cu_seqlens_k)]
        described = [None if t is None else _describe(t) for t in self.tensors]
        self.items = {
            "scale": float(scale),
            "causal": bool(causal),
            "window_left": int(window_left),
            "window_right": int(window_right),
            "softcap": float(softcap),
            "deterministic": bool(deterministic),
            "alibi_slopes": described[0],
            "cu_seqlens_q": described[1],
            "cu_seqlens_k": described[2],
            "max_seqlen_q": int(max_seqlen_q),
            "max_seqlen_k": int(max_seqlen_k),
        }


def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def _aligned(t: Tensor) -> Tensor:
    """The tensor itself when the kernels can read it in place (last dimension contiguous; on a GPU, every other
    stride a multiple of 8 elements and the address 16-byte aligned), else a contiguous copy."""
    if t.stride(-1) != 1:
        return t.contiguous()
    if t.is_cuda and (t.data_ptr() % 16 or any(s % 8 for s in t.stride()[:-1])):
        return t.contiguous()
    return t


_nvrtc_loaded = False


def _load_nvrtc() -> None:
    """Makes NVRTC loadable for the GPU backend: the copy that torch's CUDA wheels bring (nvidia/cu13 or
    nvidia/cuda_nvrtc), else a CUDA toolkit's, loaded once by its soname so that the library finds it."""
    global _nvrtc_loaded
    if _nvrtc_loaded:
        return
    _nvrtc_loaded = True
    major = (torch.version.cuda or "13").split(".")[0]
    patterns = [f"nvidia/cu{major}/lib/libnvrtc.so.{major}", f"nvidia/cuda_nvrtc/lib/libnvrtc.so.{major}"]
    patterns += ["nvidia/cu13/lib/libnvrtc.so.13", "nvidia/cuda_nvrtc/lib/libnvrtc.so.12"]
    roots = [p for p in sys.path if os.path.isdir(p)]
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidates = [f for pattern in patterns for root in roots for f in glob.glob(os.path.join(root, pattern))]
    candidates += sorted(glob.glob(os.path.join(cuda_home, "lib64", "libnvrtc.so.*[0-9]")))
    for path in candidates:
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return
        except OSError:
            continue


def _device(t: Tensor) -> Optional[Tuple[int, int]]:
    """(GPU ordinal, torch's current stream there) for a CUDA tensor, None for a CPU one."""
    if t.device.type == "cpu":
        return None
    if t.device.type != "cuda":
        raise NotImplementedError(f"flashattn runs on CPU and CUDA tensors, not on {t.device.type}")
    _load_nvrtc()
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if _raw_stream is not None:  # the raw handle, without building a torch.cuda.Stream (host time per call)
        return (index, _raw_stream(index))
    return (index, torch.cuda.current_stream(t.device).cuda_stream)


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _allocator(device: torch.device):
    return lambda nbytes: torch.empty(nbytes, dtype=torch.uint8, device=device)


def _lse_shape(q: Tensor, varlen: bool) -> List[int]:
    if varlen:
        return [q.shape[1], q.shape[0]]
    return [q.shape[0], q.shape[2], q.shape[1]]


def forward_into(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, opts: _Options) -> None:
    """Attention forward into `out` (q's shape) and `lse` (float32), both contiguous; q, k, v readable in place
    (see `_aligned`). No autograd: the custom op and the SDPA override call this."""
    _core.forward(_describe(q), _describe(k), _describe(v), _describe(out), _describe(lse), opts.items, _device(q),
                  _allocator(q.device))


def backward_into(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dq: Tensor, dk: Tensor,
                  dv: Tensor, opts: _Options) -> None:
    """Attention backward into contiguous `dq`, `dk`, `dv`."""
    lse = lse.contiguous()
    tensors = [_describe(t) for t in (q, k, v, out, lse, dout, dq, dk, dv)]
    _core.backward(*tensors, opts.items, _device(q), _allocator(q.device))


def _forward(q, k, v, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, cu_seqlens_q,
             cu_seqlens_k, max_seqlen_q, max_seqlen_k, deterministic):
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(_lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32, device=q.device)
    forward_into(q, k, v, out, lse, _Options(softmax_scale, causal, window_left, window_right, softcap, deterministic,
                                             alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))
    return out, lse


def _backward(dout, q, k, v, out, lse, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes,
              cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, deterministic):
    q, k, v, out, dout = (_aligned(t) for t in (q, k, v, out, dout))
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    backward_into(dout, q, k, v, out, lse, dq, dk, dv,
                  _Options(softmax_scale, causal, window_left, window_right, softcap, deterministic, alibi_slopes,
                           cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))
    return dq, dk, dv


@torch.library.custom_op("flashattn::fwd", mutates_args=())
def _fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    softmax_scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi_slopes: Optional[Tensor],
    cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    deterministic: bool,
) -> Tuple[Tensor, Tensor]:
    return _forward(q, k, v, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, cu_seqlens_q,
                    cu_seqlens_k, max_seqlen_q, max_seqlen_k, deterministic)


@_fwd.register_fake
def _(q, k, v, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, cu_seqlens_q, cu_seqlens_k,
      max_seqlen_q, max_seqlen_k, deterministic):
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = q.new_empty(_lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("flashattn::bwd", mutates_args=())
def _bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    softmax_scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi_slopes: Optional[Tensor],
    cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    deterministic: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    return _backward(dout, q, k, v, out, lse, softmax_scale, causal, window_left, window_right, softcap,
                     alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, deterministic)


@_bwd.register_fake
def _(dout, q, k, v, out, lse, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, cu_seqlens_q,
      cu_seqlens_k, max_seqlen_q, max_seqlen_k, deterministic):
    empty = lambda t: torch.empty(t.shape, dtype=t.dtype, device=t.device)  # noqa: E731
    return empty(q), empty(k), empty(v)


def _save(ctx, inputs, output):
    (q, k, v, softmax_scale, causal, window_left, window_right, softcap, alibi_slopes, cu_seqlens_q, cu_seqlens_k,
     max_seqlen_q, max_seqlen_k, deterministic) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, alibi_slopes, cu_seqlens_q, cu_seqlens_k)
    ctx.options = (softmax_scale, causal, window_left, window_right, softcap)
    ctx.rest = (max_seqlen_q, max_seqlen_k, deterministic)


def _gradients(ctx, dout, backward):
    q, k, v, out, lse, alibi_slopes, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    dq, dk, dv = backward(dout, q, k, v, out, lse, *ctx.options, alibi_slopes, cu_seqlens_q, cu_seqlens_k, *ctx.rest)
    return (dq, dk, dv) + (None,) * 11


_fwd.register_autograd(lambda ctx, dout, _dlse: _gradients(ctx, dout, _bwd), setup_context=_save)


class _Eager(torch.autograd.Function):
    """The same passes outside torch.compile, without the custom operators' dispatch (a few tens of
    microseconds of host time per call, which short sequences feel)."""

    @staticmethod
    def forward(ctx, *inputs):
        out, lse = _forward(*inputs)
        _save(ctx, inputs, (out, lse))
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        return _gradients(ctx, dout, _backward)


def attention(*inputs) -> Tuple[Tensor, Tensor]:
    """(out, lse) for `flashattn::fwd`'s arguments: the custom operator while torch.compile traces, else the same
    kernels through `_Eager` (or directly, when no gradient is wanted). Meta tensors take the operator's fake
    kernel."""
    if torch.compiler.is_compiling() or inputs[0].is_meta:
        return _fwd(*inputs)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs[:3]):
        return _Eager.apply(*inputs)
    return _forward(*inputs)


def decode_into(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, block_table: Optional[Tensor],
                new: Optional[Tuple[Tensor, Tensor]], out: Tensor, lse: Tensor, opts: _Options,
                num_splits: int) -> None:
    """Attention of `q` against a KV cache into contiguous `out` and `lse`, appending `new` to the caches first."""
    described_new = None if new is None else (_describe(new[0]), _describe(new[1]))
    table = None if block_table is None else _describe(block_table)
    _core.decode(_describe(q), _describe(k_cache), _describe(v_cache), _describe(cache_seqlens), table,
                 described_new, _describe(out), _describe(lse), opts.items, int(num_splits), _device(q),
                 _allocator(q.device))


def _kvcache_impl(q, k_cache, v_cache, cache_seqlens, block_table, k, v, softmax_scale, causal, window_left,
                  window_right, softcap, alibi_slopes, num_splits):
    q = _aligned(q)
    new = None if k is None else (_aligned(k), _aligned(v))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32, device=q.device)
    opts = _Options(softmax_scale, causal, window_left, window_right, softcap, False, alibi_slopes, None, None, 0, 0)
    decode_into(q, k_cache, v_cache, cache_seqlens.contiguous(),
                None if block_table is None else block_table.contiguous(), new, out, lse, opts, num_splits)
    return out, lse


@torch.library.custom_op("flashattn::kvcache", mutates_args=("k_cache", "v_cache"))
def _kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    block_table: Optional[Tensor],
    k: Optional[Tensor],
    v: Optional[Tensor],
    softmax_scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi_slopes: Optional[Tensor],
    num_splits: int,
) -> Tuple[Tensor, Tensor]:
    return _kvcache_impl(q, k_cache, v_cache, cache_seqlens, block_table, k, v, softmax_scale, causal, window_left,
                         window_right, softcap, alibi_slopes, num_splits)


@_kvcache.register_fake
def _(q, k_cache, v_cache, cache_seqlens, block_table, k, v, softmax_scale, causal, window_left, window_right,
      softcap, alibi_slopes, num_splits):
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    return out, lse


def kvcache(*inputs) -> Tuple[Tensor, Tensor]:
    """(out, lse) for `flashattn::kvcache`'s arguments: the custom operator (which writes the caches in place)
    while torch.compile traces or on meta tensors, else the same call without the operator's dispatch."""
    if torch.compiler.is_compiling() or inputs[0].is_meta:
        return _kvcache(*inputs)
    return _kvcache_impl(*inputs)
