"""torch.compile, Hugging Face transformers and the SDPA override."""

import pytest
import torch

import flashattn
from conftest import DEVICES, generator, randn


class Block(torch.nn.Module):
    """A small attention block calling flash_attn_func the way models do."""

    def __init__(self, dim=128, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = torch.nn.Linear(dim, dim)
        self.kv = torch.nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.o = torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.head_dim)
        k, v = self.kv(x).view(b, s, 2, self.kv_heads, self.head_dim).unbind(2)
        return self.o(flashattn.flash_attn_func(q, k, v, causal=True).reshape(b, s, -1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(device, backend):
    """No graph break (fullgraph=True), and the compiled model's output and gradients equal eager's."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    block = Block().to(device=device, dtype=dtype)
    x = randn((2, 48, 128), dtype, device, generator("compile"), True)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend=backend)
    y_eager = block(x)
    y_eager.square().sum().backward()
    eager_grads = [p.grad.clone() for p in block.parameters()] + [x.grad.clone()]
    block.zero_grad()
    x.grad = None
    y = compiled(x)
    y.square().sum().backward()
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y, y_eager, **tol)
    for g, e in zip([p.grad for p in block.parameters()] + [x.grad], eager_grads):
        torch.testing.assert_close(g, e, **tol)


def test_custom_ops_pass_torch_checks():
    """torch.library.opcheck: schemas, fake kernels and autograd registration agree with the real kernels."""
    g = generator("opcheck")
    q, k, v = (randn((1, 16, 2, 32), torch.float32, "cpu", g, True) for _ in range(3))
    args = (q, k, v, 0.2, True, -1, 0, 0.0, None, None, None, 0, 0, False)
    torch.library.opcheck(torch.ops.flashattn.fwd.default, args)


# ------------------------------------------------------------------------------------------------------------------
# transformers

transformers = pytest.importorskip("transformers")


def _tiny_model(kind, device, dtype, impl, **extra):
    torch.manual_seed(1234)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, attention_dropout=0.0)
    if kind == "llama":
        config = transformers.LlamaConfig(**common, **extra)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.MistralConfig(**common, sliding_window=8, **extra)
        model = transformers.MistralForCausalLM(config)
    model = model.to(device=device, dtype=dtype)
    model.set_attn_implementation(impl)
    return model


def _logits_and_grads(model, ids, mask=None):
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask).logits
    if mask is not None:
        logits = logits * mask[..., None]
    logits.float().square().mean().backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,padded", [("llama", False), ("llama", True), ("mistral", False)],
                         ids=["llama", "llama-padded", "mistral-sliding-window"])
def test_transformers_matches_sdpa(device, kind, padded):
    """A 2-layer model with random weights: logits and every parameter's gradient as with sdpa."""
    name = flashattn.register_transformers()
    assert "flash" not in name
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    ids = torch.randint(0, 128, (3, 40), generator=generator("ids", kind)).to(device)
    mask = None
    if padded:
        mask = torch.ones_like(ids)
        mask[0, :9] = 0  # left padding
        mask[2, :25] = 0
    ours = _logits_and_grads(_tiny_model(kind, device, dtype, name), ids, mask)
    theirs = _logits_and_grads(_tiny_model(kind, device, dtype, "sdpa"), ids, mask)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(ours[0], theirs[0], **tol)
    for n in theirs[1]:
        torch.testing.assert_close(ours[1][n], theirs[1][n], **tol, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_transformers_generate_with_padding(device):
    """Greedy decoding of a left-padded batch (prefill, then one query per step over the cache) as with sdpa."""
    name = flashattn.register_transformers()
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    ids = torch.randint(1, 128, (2, 12), generator=generator("gen")).to(device)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    outs = []
    for impl in (name, "sdpa"):
        model = _tiny_model("llama", device, dtype, impl).eval()
        outs.append(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                   pad_token_id=0))
    assert torch.equal(outs[0], outs[1])


def test_transformers_refusals():
    name = flashattn.register_transformers()
    with pytest.raises(ValueError, match="flash"):
        flashattn.register_transformers("my_flash")
    model = _tiny_model("llama", "cpu", torch.float32, name)
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 5, 16)
    k = v = torch.randn(1, 2, 5, 16)
    fn = flashattn.integrations.transformers_attention
    with pytest.raises(NotImplementedError, match="sinks"):
        fn(attn, q, k, v, None, s_aux=torch.zeros(4))
    with pytest.raises(NotImplementedError, match="dropout"):
        fn(attn, q, k, v, None, dropout=0.1)
    with pytest.raises(ValueError, match="2-D"):
        fn(attn, q, k, v, torch.ones(1, 1, 5, 5))
    out, weights = fn(attn, q, k, v, None)
    assert weights is None and out.shape == (1, 5, 4, 16)


def test_transformers_packed_position_ids():
    """Sequences packed in one row (position_ids restart at 0) do not see each other."""
    g = generator("packed")
    q = randn((1, 4, 30, 16), torch.float32, "cpu", g)
    k = v = randn((1, 2, 30, 16), torch.float32, "cpu", g)
    module = torch.nn.Module()
    module.is_causal = True
    positions = torch.cat([torch.arange(10), torch.arange(20)])[None]
    out, _ = flashattn.integrations.transformers_attention(module, q, k, v, None, position_ids=positions)
    first, _ = flashattn.integrations.transformers_attention(module, q[:, :, :10], k[:, :, :10], v[:, :, :10], None)
    second, _ = flashattn.integrations.transformers_attention(module, q[:, :, 10:], k[:, :, 10:], v[:, :, 10:], None)
    torch.testing.assert_close(out, torch.cat([first, second], dim=1), rtol=0, atol=0)
    # The offsets found for a position_ids tensor are kept for it, but not once it is written to.
    positions.copy_(torch.arange(30)[None])
    whole, _ = flashattn.integrations.transformers_attention(module, q, k, v, None, position_ids=positions)
    plain, _ = flashattn.integrations.transformers_attention(module, q, k, v, None)
    torch.testing.assert_close(whole, plain, rtol=0, atol=0)
    # Inference tensors have no version counter: a new pass's mask drops what was kept.
    with torch.inference_mode():
        positions = torch.cat([torch.arange(10), torch.arange(20)])[None]
        out, _ = flashattn.integrations.transformers_attention(module, q, k, v, None, position_ids=positions)
        torch.testing.assert_close(out, torch.cat([first, second], dim=1), rtol=0, atol=0)
        positions.copy_(torch.arange(30)[None])
        assert flashattn.integrations._pass_mask(batch_size=1, q_length=30, kv_length=30) is None
        whole, _ = flashattn.integrations.transformers_attention(module, q, k, v, None, position_ids=positions)
        torch.testing.assert_close(whole, plain, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------------------
# scaled_dot_product_attention


def test_activate_sdpa_registers():
    """The override registers and restores (its kernels run on CUDA tensors only)."""
    attention = torch.nn.attention
    if not hasattr(attention, "register_flash_attention_impl"):
        with pytest.raises(NotImplementedError, match="registry"):
            flashattn.activate_sdpa()
        return
    try:
        assert flashattn.activate_sdpa() in attention.list_flash_attention_impls()
        assert attention.current_flash_attention_impl() == flashattn.integrations.SDPA_NAME
    finally:
        attention.restore_flash_attention_impl()


@pytest.mark.skipif("cuda" not in DEVICES, reason="SDPA's flash path runs on CUDA")
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_flash_path_runs_flashattn(causal):
    if not hasattr(torch.nn.attention, "register_flash_attention_impl"):
        pytest.skip("this torch has no flash-attention registry")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = generator("sdpa", causal)
    q, k, v = (randn((2, 4, 300, 64), torch.bfloat16, "cuda", g, True) for _ in range(3))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=causal)
    ref.sum().backward()
    try:
        flashattn.activate_sdpa()
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
            out.sum().backward()
    finally:
        torch.nn.attention.restore_flash_attention_impl()
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
    for ours, r in zip((q, k, v), leaves):
        torch.testing.assert_close(ours.grad.double(), r.grad, rtol=5e-2, atol=5e-2)


def test_prefill_exercise(tmp_path, capsys):
    """`python -m flashattn.prefill` end to end on a one-layer model: rows for every cell, slopes, a chart."""
    from flashattn import prefill

    chart = tmp_path / "prefill.png"
    device = "cuda" if "cuda" in DEVICES else "cpu"
    argv = ["--impl", "sdpa,flashattn", "--seqlens", "16,32", "--layers", "1", "--min-time", "0", "--max-reps", "1",
            "--train", "--json", "--no-progress", "--plot", str(chart), "--device", device]
    assert prefill.main(argv) == 0
    rows = [__import__("json").loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {(r["impl"], r["seqlen"], r["phase"]) for r in rows} == {
        (i, n, p) for i in ("sdpa", "flashattn") for n in (16, 32) for p in ("prefill", "train")}
    assert all(r["ms"] > 0 for r in rows)
    assert chart.stat().st_size > 0
    fits = prefill.slopes(rows)
    assert set(fits) == {(i, p) for i in ("sdpa", "flashattn") for p in ("prefill", "train")}
