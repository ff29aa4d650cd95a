"""flash_attn_with_kvcache against the float64 reference, each sequence's keys gathered from its cache by hand:
contiguous and paged caches (pages out of order, several page sizes), ragged lengths with 0 and 1, appending
new keys in place, masks, softcap, ALiBi, grouped-query heads up to 32:1, forced splits on the GPU."""

import pytest
import torch

from flashattn import flash_attn_with_kvcache

from conftest import assert_close, device_dtypes, generator, randn, reference


def _paged(cache, lens, page, g):
    """The contiguous `cache` (batch, capacity, h, d) as pages in a shuffled order, and the block table."""
    b, cap, h, d = cache.shape
    blocks = cap // page
    order = torch.randperm(b * blocks + 2, generator=g)
    table = order[: b * blocks].reshape(b, blocks).to(torch.int32)
    pages = torch.zeros(b * blocks + 2, page, h, d, dtype=cache.dtype)
    pages[table.flatten().long()] = cache.reshape(b * blocks, page, h, d).cpu()
    return pages.to(cache.device), table.to(cache.device)


def _expected(q, k_cache, v_cache, lens, opts):
    """Per sequence: its queries against its first lens[b] cached keys, float64 and in q's dtype."""
    outs, lses, outs_lp, lses_lp = [], [], [], []
    for b, n in enumerate(lens):
        args = (q[b : b + 1], k_cache[b : b + 1, :n], v_cache[b : b + 1, :n])
        alibi = opts.get("alibi")
        kw = dict(opts, alibi=None if alibi is None else alibi)
        o, l = reference(*args, **kw)
        o2, l2 = reference(*args, **kw, dtype=q.dtype)
        outs.append(o), lses.append(l), outs_lp.append(o2), lses_lp.append(l2)
    return torch.cat(outs), torch.cat(lses), torch.cat(outs_lp), torch.cat(lses_lp)


CASES = [
    # batch, seqlen_q, heads_q, heads_kv, head_dim, page (0: contiguous), append, options
    (3, 1, 32, 8, 128, 0, 0, {}),
    (4, 1, 8, 2, 64, 16, 1, {"causal": True}),
    (2, 4, 8, 1, 128, 256, 4, {"causal": True}),
    (3, 5, 6, 3, 96, 48, 2, {"window": (40, 0), "softcap": 20.0}),
    (2, 1, 32, 1, 64, 32, 1, {"alibi": True}),
    (2, 33, 4, 4, 32, 0, 0, {"causal": True}),
]


@pytest.mark.parametrize("device,dtype", device_dtypes())
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_kvcache(device, dtype, case):
    batch, sq, hq, hkv, d, page, new, opts = case
    g = generator("kvcache", repr(case))
    capacity = 768  # a whole number of pages of every size tested
    lens = [0, 1, 300, 77][:batch]
    lens = [min(n, capacity - new) for n in lens]
    q = randn((batch, sq, hq, d), dtype, device, g)
    k_full = randn((batch, capacity, hkv, d), dtype, device, g)
    v_full = randn((batch, capacity, hkv, d), dtype, device, g)
    k_new = randn((batch, new, hkv, d), dtype, device, g) if new else None
    v_new = randn((batch, new, hkv, d), dtype, device, g) if new else None
    alibi = torch.rand(hq, generator=g).to(device) if opts.get("alibi") else None
    ref_opts = {k: v for k, v in opts.items() if k != "alibi"}
    if alibi is not None:
        ref_opts["alibi"] = alibi
    # The expected cache after appending, and the attention over it.
    k_want, v_want = k_full.clone(), v_full.clone()
    for b, n in enumerate(lens):
        if new:
            k_want[b, n : n + new] = k_new[b]
            v_want[b, n : n + new] = v_new[b]
    o64, l64, olp, llp = _expected(q, k_want, v_want, [n + new for n in lens], ref_opts)

    if page:
        k_cache, table = _paged(k_full, lens, page, g)
        v_cache = torch.zeros_like(k_cache)
        v_cache[table.flatten().long()] = v_full.reshape(-1, page, hkv, d)
    else:
        k_cache, v_cache, table = k_full.clone(), v_full.clone(), None
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    splits = [0, 1, 3] if device == "cuda" else [0]
    for num_splits in splits:
        kc, vc = k_cache.clone(), v_cache.clone()
        out, lse = flash_attn_with_kvcache(
            q, kc, vc, k_new, v_new, cache_seqlens=seqlens, block_table=table, causal=opts.get("causal", False),
            window_size=opts.get("window", (-1, -1)), softcap=opts.get("softcap", 0.0), alibi_slopes=alibi,
            num_splits=num_splits, return_softmax_lse=True)
        assert_close(f"out (splits {num_splits})", out, o64, olp, dtype)
        assert_close(f"lse (splits {num_splits})", lse, l64, llp, dtype)
        got_k = kc[table.long()].reshape(batch, capacity, hkv, d) if page else kc
        assert torch.equal(got_k, k_want), "the appended keys are not where they belong"


def test_kvcache_refusals():
    q = torch.randn(1, 1, 2, 8)
    kc = torch.randn(1, 16, 2, 8)
    with pytest.raises(NotImplementedError, match="rotary"):
        flash_attn_with_kvcache(q, kc, kc.clone(), rotary_cos=torch.ones(1), rotary_sin=torch.ones(1))
    with pytest.raises(NotImplementedError, match="cache_batch_idx"):
        flash_attn_with_kvcache(q, kc, kc.clone(), cache_batch_idx=torch.zeros(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="cache_seqlens"):
        flash_attn_with_kvcache(q, kc, kc.clone(), cache_seqlens=17)
    with pytest.raises(ValueError, match="both k and v"):
        flash_attn_with_kvcache(q, kc, kc.clone(), k=torch.randn(1, 1, 2, 8), cache_seqlens=3)
    with pytest.raises(ValueError, match="block_table"):
        table = torch.tensor([[0, 5]], dtype=torch.int32)
        flash_attn_with_kvcache(q, kc, kc.clone(), cache_seqlens=20, block_table=table)
    # A full cache by default.
    out = flash_attn_with_kvcache(q, kc, kc.clone())
    ref, _ = reference(q, kc, kc)
    assert (out.double() - ref).abs().max() < 1e-5


@pytest.mark.parametrize("device,dtype", device_dtypes()[:1])
def test_kvcache_under_torch_compile(device, dtype):
    """One operator in a full graph: the output matches the eager call, and the caches are written in place."""
    g = generator("kvcache-compile")
    q = randn((2, 1, 8, 32), dtype, device, g)
    k_cache = randn((2, 64, 2, 32), dtype, device, g)
    v_cache = randn((2, 64, 2, 32), dtype, device, g)
    k_new, v_new = randn((2, 1, 2, 32), dtype, device, g), randn((2, 1, 2, 32), dtype, device, g)
    lens = torch.tensor([5, 40], dtype=torch.int32, device=device)

    def step(q, kc, vc, kn, vn, lens):
        return flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens, causal=True)

    kc1, vc1 = k_cache.clone(), v_cache.clone()
    want = step(q, kc1, vc1, k_new, v_new, lens)
    kc2, vc2 = k_cache.clone(), v_cache.clone()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, kc2, vc2, k_new, v_new, lens)
    assert torch.equal(got, want)
    assert torch.equal(kc2, kc1) and torch.equal(vc2, vc1)
    assert torch.equal(kc2[1, 40], k_new[1, 0]) and not torch.equal(kc2, k_cache)


def test_kvcache_operator_passes_opcheck():
    g = generator("kvcache-opcheck")
    q = randn((1, 2, 4, 16), torch.float32, "cpu", g)
    kc, vc = randn((1, 32, 2, 16), torch.float32, "cpu", g), randn((1, 32, 2, 16), torch.float32, "cpu", g)
    kn, vn = randn((1, 2, 2, 16), torch.float32, "cpu", g), randn((1, 2, 2, 16), torch.float32, "cpu", g)
    lens = torch.tensor([7], dtype=torch.int32)
    args = (q, kc, vc, lens, None, kn, vn, 0.25, True, -1, 0, 0.0, None, 0)
    torch.library.opcheck(torch.ops.flashattn.kvcache.default, args)
