"""flash_attn_func and flash_attn_varlen_func against the float64 reference: outputs, log-sum-exp and gradients
on random shapes and options, on every device under test."""

import random

import pytest
import torch

import flashattn
from conftest import SEED, assert_close, device_dtypes, generator, randn, reference

# (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim): odd lengths, seqlen 1, Sq != Sk both ways, GQA, MQA.
SHAPES = [
    (2, 64, 64, 4, 4, 64),
    (1, 1, 77, 8, 2, 128),
    (3, 45, 13, 6, 3, 64),
    (2, 130, 257, 4, 1, 32),
    (1, 200, 200, 2, 2, 256),
    (2, 33, 33, 4, 4, 96),
    (1, 17, 90, 32, 1, 64),
    (2, 50, 50, 2, 2, 40),
]


def _options(case: int):
    """A random combination of masks and score modifiers for a case (different each run, seeded)."""
    rng = random.Random(hash((SEED, "options", case)))
    causal = rng.random() < 0.5
    window = (rng.choice([-1, 0, 5, 31]), rng.choice([-1, 0, 9])) if rng.random() < 0.4 else (-1, -1)
    softcap = rng.choice([0.0, 0.0, 5.0, 30.0])
    return dict(causal=causal, window_size=window, softcap=softcap, alibi=rng.random() < 0.3)


def _run_case(device, dtype, shape, opts, case, backward):
    b, sq, sk, hq, hkv, d = shape
    g = generator("case", case, str(dtype))
    q = randn((b, sq, hq, d), dtype, device, g, backward)
    k = randn((b, sk, hkv, d), dtype, device, g, backward)
    v = randn((b, sk, hkv, d), dtype, device, g, backward)
    alibi = (torch.rand(hq, generator=g) * 0.3).to(device) if opts["alibi"] else None
    out, lse, none = flashattn.flash_attn_func(q, k, v, causal=opts["causal"], window_size=opts["window_size"],
                                               softcap=opts["softcap"], alibi_slopes=alibi, return_attn_probs=True)
    assert none is None
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (b, hq, sq) and lse.dtype == torch.float32
    kw = dict(causal=opts["causal"], window=opts["window_size"], softcap=opts["softcap"], alibi=alibi)
    leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)]
    ref64, lse64 = reference(*[t.double() for t in leaves], **kw) if backward else reference(q, k, v, **kw)
    ref_lp, lse_lp = reference(q.detach(), k.detach(), v.detach(), dtype=dtype, **kw)
    name = f"{shape} {opts} {dtype}"
    assert_close(f"out {name}", out.detach(), ref64.detach(), ref_lp, dtype)
    assert_close(f"lse {name}", lse, lse64.detach(), lse_lp, dtype)
    if backward:
        dout = randn(out.shape, dtype, device, g)
        out.backward(dout)
        ref64.backward(dout.double())
        lp = [t.detach().requires_grad_() for t in (q, k, v)]
        reference(*lp, dtype=dtype, **kw)[0].backward(dout)
        for label, ours, r64, rlp in zip("qkv", (q, k, v), leaves, lp):
            assert_close(f"d{label} {name}", ours.grad, r64.grad, rlp.grad, dtype)


@pytest.mark.parametrize("device,dtype", device_dtypes())
@pytest.mark.parametrize("case", range(len(SHAPES)))
def test_forward(device, dtype, case):
    _run_case(device, dtype, SHAPES[case], _options(case), case, backward=False)


@pytest.mark.parametrize("device,dtype", device_dtypes())
@pytest.mark.parametrize("case", range(len(SHAPES)))
def test_backward(device, dtype, case):
    _run_case(device, dtype, SHAPES[case], _options(case + 100), case, backward=True)


@pytest.mark.parametrize("device,dtype", device_dtypes())
def test_every_option(device, dtype):
    """Each option alone, so that a failure names it."""
    shape = (2, 40, 70, 4, 2, 64)
    for i, opts in enumerate([
        dict(causal=True, window_size=(-1, -1), softcap=0.0, alibi=False),
        dict(causal=False, window_size=(7, 3), softcap=0.0, alibi=False),
        dict(causal=True, window_size=(12, -1), softcap=0.0, alibi=False),
        dict(causal=False, window_size=(-1, -1), softcap=8.0, alibi=False),
        dict(causal=False, window_size=(-1, -1), softcap=0.0, alibi=True),
    ]):
        _run_case(device, dtype, shape, opts, 200 + i, backward=True)


@pytest.mark.parametrize("device,dtype", device_dtypes())
def test_scale_and_per_sequence_alibi(device, dtype):
    g = generator("scale")
    q, k, v = (randn((2, 24, 4, 64), dtype, device, g) for _ in range(3))
    slopes = (torch.rand(2, 4, generator=g) * 0.5).to(device)
    out = flashattn.flash_attn_func(q, k, v, softmax_scale=0.3, alibi_slopes=slopes, causal=True)
    ref64, _ = reference(q, k, v, scale=0.3, alibi=slopes, causal=True)
    ref_lp, _ = reference(q, k, v, scale=0.3, alibi=slopes, causal=True, dtype=dtype)
    assert_close("out", out, ref64, ref_lp, dtype)


@pytest.mark.parametrize("device,dtype", device_dtypes())
def test_rows_that_see_no_key(device, dtype):
    """Causal with more queries than keys: the first rows see nothing, giving 0 and lse -inf (not NaN)."""
    g = generator("empty")
    q = randn((1, 20, 2, 64), dtype, device, g)
    k, v = randn((1, 5, 2, 64), dtype, device, g), randn((1, 5, 2, 64), dtype, device, g)
    out, lse, _ = flashattn.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert torch.all(out[:, :15] == 0)
    assert torch.all(torch.isneginf(lse[..., :15])) and torch.all(torch.isfinite(lse[..., 15:]))


@pytest.mark.parametrize("device,dtype", device_dtypes())
def test_strided_views(device, dtype):
    """Inputs read in place: slices of a packed qkv projection and (batch, heads, seqlen, dim) transposes."""
    g = generator("strided")
    b, s, h, d = 2, 50, 4, 64
    qkv = randn((b, s, 3, h, d), dtype, device, g, True)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    out = flashattn.flash_attn_func(q, k, v, causal=True)
    ref = flashattn.flash_attn_func(q.contiguous(), k.contiguous(), v.contiguous(), causal=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    bhsd = randn((b, h, s, d), dtype, device, g)
    t = bhsd.transpose(1, 2)
    torch.testing.assert_close(flashattn.flash_attn_func(t, t, t), flashattn.flash_attn_func(*(t.contiguous(),) * 3),
                               rtol=0, atol=0)
    out.sum().backward()
    assert qkv.grad is not None and qkv.grad.shape == qkv.shape


def _varlen_case(device, dtype, lens_q, lens_k, hq, hkv, d, opts, backward):
    g = generator("varlen", tuple(lens_q), tuple(lens_k), str(dtype))
    tq, tk = sum(lens_q), sum(lens_k)
    q = randn((tq, hq, d), dtype, device, g, backward)
    k = randn((tk, hkv, d), dtype, device, g, backward)
    v = randn((tk, hkv, d), dtype, device, g, backward)
    cu = lambda lens: torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)  # noqa
    out, lse, _ = flashattn.flash_attn_varlen_func(q, k, v, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k),
                                                   return_attn_probs=True, **opts)
    assert out.shape == q.shape and lse.shape == (hq, tq)
    dout = randn(out.shape, dtype, device, g)
    if backward:
        out.backward(dout)
    kw = dict(causal=opts.get("causal", False), window=opts.get("window_size", (-1, -1)),
              softcap=opts.get("softcap", 0.0))
    oq = ok = 0
    for lq, lk in zip(lens_q, lens_k):
        parts = [t.detach()[o:o + n][None] for t, o, n in ((q, oq, lq), (k, ok, lk), (v, ok, lk))]
        leaves64 = [p.double().requires_grad_() for p in parts]
        leaves_lp = [p.clone().requires_grad_() for p in parts]
        r64, l64 = reference(*leaves64, **kw)
        rlp, llp = reference(*leaves_lp, dtype=dtype, **kw)
        name = f"sequence ({lq}, {lk}) {opts} {dtype}"
        assert_close(f"out {name}", out[oq:oq + lq].detach()[None], r64.detach(), rlp.detach(), dtype)
        assert_close(f"lse {name}", lse[:, oq:oq + lq][None], l64.detach(), llp.detach(), dtype)
        if backward and lq and lk:
            d_part = dout[oq:oq + lq][None]
            r64.backward(d_part.double())
            rlp.backward(d_part)
            for label, ours, a, bb in zip("qkv", (q.grad[oq:oq + lq], k.grad[ok:ok + lk], v.grad[ok:ok + lk]),
                                          leaves64, leaves_lp):
                assert_close(f"d{label} {name}", ours[None], a.grad, bb.grad, dtype)
        oq, ok = oq + lq, ok + lk


@pytest.mark.parametrize("device,dtype", device_dtypes())
@pytest.mark.parametrize("opts", [dict(), dict(causal=True), dict(causal=True, window_size=(6, -1), softcap=10.0)],
                         ids=["plain", "causal", "window-softcap"])
def test_varlen(device, dtype, opts):
    rng = random.Random(hash((SEED, "varlen", str(opts))))
    lens_q = [rng.choice([0, 1, 7, 33, 64, 100]) for _ in range(5)]
    lens_k = [lq if rng.random() < 0.5 else rng.choice([0, 1, 19, 80]) for lq in lens_q]
    _varlen_case(device, dtype, lens_q, lens_k, 4, 2, 64, opts, backward=True)


@pytest.mark.parametrize("device,dtype", device_dtypes())
def test_deterministic_backward_is_reproducible(device, dtype):
    g = generator("det")
    q, k, v = (randn((2, 96, 4, 64), dtype, device, g, True) for _ in range(3))
    grads = []
    for _ in range(2):
        for t in (q, k, v):
            t.grad = None
        flashattn.flash_attn_func(q, k, v, causal=True, deterministic=True).sum().backward()
        grads.append([t.grad.clone() for t in (q, k, v)])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
