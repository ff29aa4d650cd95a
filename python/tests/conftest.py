"""Shared fixtures: the devices and dtypes under test, fresh random inputs, the float64 reference and the
tolerance rule (as FlashAttention's own tests: our error against float64 at most twice the error of standard
attention computed in the same dtype, plus a small slack)."""

import os
import random

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = {"cpu": [torch.float32, torch.bfloat16], "cuda": [torch.bfloat16, torch.float16]}
# Relative slack on top of twice the same-dtype reference's error: about two units in the last place of the
# largest value (bf16 2^-7, f16 2^-10), since rounding a result to the dtype alone may cost one.
SLACK = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}

SEED = int(os.environ.get("FLASHATTN_TEST_SEED", random.randrange(1 << 30)))


def pytest_report_header(config):
    return f"flashattn tests: devices {DEVICES}, seed {SEED} (FLASHATTN_TEST_SEED reproduces it)"


def device_dtypes():
    return [pytest.param(dev, dt, id=f"{dev}-{str(dt).removeprefix('torch.')}") for dev in DEVICES for dt in DTYPES[dev]]


def generator(*salt) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(hash((SEED,) + salt) % (1 << 62))
    return g


def randn(shape, dtype, device, g, requires_grad=False):
    t = torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def reference(q, k, v, *, causal=False, window=(-1, -1), softcap=0.0, alibi=None, scale=None, dtype=torch.float64):
    """Standard attention over (batch, seqlen, heads, dim) in `dtype`, materializing the scores: (out, lse).
    Masks are aligned to the bottom-right corner; a row that sees no key gives 0 and -inf."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    qf, kf, vf = (t.to(dtype) for t in (q, k, v))
    kf = kf.repeat_interleave(hq // hkv, dim=2)
    vf = vf.repeat_interleave(hq // hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(sq, device=q.device)[:, None]
    j = torch.arange(sk, device=q.device)[None, :]
    diag = i + sk - sq
    if alibi is not None:
        slopes = alibi.to(dtype).reshape(1 if alibi.dim() == 1 else b, hq)
        s = s - slopes[:, :, None, None] * (diag - j).abs().to(dtype)
    left, right = window[0], 0 if causal else window[1]
    visible = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if left >= 0:
        visible &= j >= diag - left
    if right >= 0:
        visible &= j <= diag + right
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s.float() if dtype != torch.float64 else s, dim=-1)
    seen = visible.any(dim=-1)[:, None]
    p = torch.softmax(torch.where(seen, s, torch.zeros_like(s)), dim=-1) * seen
    out = torch.einsum("bhqk,bkhd->bqhd", p.to(dtype), vf)
    return out, lse


def assert_close(name, ours, ref64, ref_lp, dtype):
    """|ours - ref64| <= 2 |ref_lp - ref64| + slack * max|ref64|, elementwise maxima."""
    ours, ref64, ref_lp = ours.double().cpu(), ref64.double().cpu(), ref_lp.double().cpu()
    finite = torch.isfinite(ref64)
    assert torch.equal(torch.isfinite(ours), finite) or torch.equal(ours[~finite], ref64[~finite]), (
        f"{name}: infinities differ (seed {SEED})")
    err = (ours - ref64)[finite].abs().max().item() if finite.any() else 0.0
    base = (ref_lp - ref64)[finite].abs().max().item() if finite.any() else 0.0
    scale = ref64[finite].abs().max().item() if finite.any() else 0.0
    bound = 2 * base + SLACK[dtype] * max(scale, 1.0)
    assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g} (same-dtype error {base:.3g}, seed {SEED})"
