"""Bad input gets an exception that says what was wrong, never a crash."""

import pytest
import torch

import flashattn
from conftest import DEVICES


def _qkv(device="cpu", dtype=torch.float32, q=(1, 8, 4, 32), kv=(1, 8, 2, 32)):
    return torch.randn(q, dtype=dtype, device=device), torch.randn(kv, dtype=dtype, device=device), \
        torch.randn(kv, dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_arguments(device):
    q, k, v = _qkv(device, torch.float32 if device == "cpu" else torch.bfloat16)
    f = flashattn.flash_attn_func
    with pytest.raises(ValueError, match="dropout"):
        f(q, k, v, dropout_p=0.1)
    with pytest.raises(ValueError, match="takes"):
        f(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="share a dtype"):
        f(q, k.half(), v)
    with pytest.raises(ValueError, match=r"\(batch, seqlen, heads, head_dim\)"):
        f(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="multiple of heads_kv"):
        f(*_qkv(device, q.dtype, q=(1, 8, 3, 32)))
    with pytest.raises(ValueError, match="head_dim"):
        f(*_qkv(device, q.dtype, kv=(1, 8, 2, 16)))
    with pytest.raises(ValueError, match="batch"):
        f(*_qkv(device, q.dtype, kv=(2, 8, 2, 32)))
    with pytest.raises(ValueError, match="softcap"):
        f(q, k, v, softcap=-1.0)
    with pytest.raises(ValueError, match="alibi"):
        f(q, k, v, alibi_slopes=torch.ones(3, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_varlen(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v = (torch.randn(10, 2, 32, dtype=dtype, device=device) for _ in range(3))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=device)
    f = flashattn.flash_attn_varlen_func
    with pytest.raises(ValueError, match="int32"):
        f(q, k, v, cu.long(), cu, 6, 6)
    with pytest.raises(ValueError, match=r"\(total_tokens, heads, head_dim\)"):
        f(q[None], k[None], v[None], cu, cu, 6, 6)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        f(q, k, v, cu, cu[:2], 6, 6)
    if device == "cpu":  # offsets are read on the host only on the CPU (GPU calls trust them, as documented)
        with pytest.raises(ValueError, match="cu_seqlens_q"):
            f(q, k, v, torch.tensor([0, 7, 4], dtype=torch.int32), cu, 7, 6)
        with pytest.raises(ValueError, match="cu_seqlens_q"):
            f(q, k, v, torch.tensor([0, 4, 11], dtype=torch.int32), cu, 7, 6)


def test_dtypes_per_device():
    q, k, v = _qkv(dtype=torch.float16)
    assert flashattn.flash_attn_func(q, k, v).dtype == torch.float16
    if "cuda" in DEVICES:
        with pytest.raises(ValueError, match="float16, bfloat16"):
            flashattn.flash_attn_func(*_qkv("cuda", torch.float32))


def test_meta_tensors_give_shapes():
    """Meta tensors (shape propagation) run the fake kernels: shapes, no data."""
    q, k, v = (torch.randn(1, 4, 2, 32, device="meta") for _ in range(3))
    out, lse, _ = flashattn.flash_attn_func(q, k, v, return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (1, 2, 4) and out.device.type == "meta"


def test_extension_checks_its_own_arguments():
    """The extension is private, but still refuses outputs that alias inputs and unaligned addresses."""
    from flashattn import _core
    from flashattn._ops import _describe, _Options

    q = torch.randn(1, 8, 2, 32)
    lse = torch.empty(1, 2, 8)
    opts = _Options(0.1, False, -1, -1, 0.0, False, None, None, None, 0, 0).items
    with pytest.raises(ValueError, match="overlaps"):
        _core.forward(_describe(q), _describe(q), _describe(q), _describe(q), _describe(lse), opts)
    bad = list(_describe(q))
    bad[0] += 2
    with pytest.raises(ValueError, match="no float32 array"):
        _core.forward(tuple(bad), _describe(q), _describe(q), _describe(torch.empty_like(q)), _describe(lse), opts)
