"""flashattn: fast exact attention for PyTorch, on NVIDIA GPUs and on CPUs, built in Rust.

- ``flash_attn_func`` / ``flash_attn_varlen_func`` / ``flash_attn_with_kvcache``: FlashAttention-2's API (same
  names, arguments and returns); the last attends to a contiguous or paged KV cache (decoding).
- ``register_transformers()``: an attention implementation for Hugging Face transformers; returns its name.
- ``activate_sdpa()``: ``F.scaled_dot_product_attention``'s flash path on these kernels (torch 2.13+).
- ``python -m flashattn.prefill``: prefill latency of a Llama-shaped model with eager, sdpa and flashattn.

GPU kernels compile at first use (a second or so each) and are cached on disk (``FLASHATTN_CACHE_DIR``, else
``~/.cache/flashattn/kernels``).
"""

from importlib import metadata as _metadata

from . import _core
from .integrations import activate_sdpa, register_transformers
from .interface import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

try:
    __version__ = _metadata.version("flashattn")
except _metadata.PackageNotFoundError:  # run from a source tree
    __version__ = "0.0.0"


def info() -> str:
    """What this machine offers: the CPU kernels, GPUs, NVRTC and the kernel cache."""
    from ._ops import _load_nvrtc

    _load_nvrtc()
    return _core.info()


__all__ = [
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "register_transformers",
    "activate_sdpa",
    "info",
    "__version__",
]
