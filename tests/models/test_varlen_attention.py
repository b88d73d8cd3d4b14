"""mrpo.models.varlen_attention without a model: the packed attention equals a plain per-sequence softmax
attention (float64 reference, GQA, causal and not, outputs and gradients); the kernel choice per device,
dtype and base; torch's varlen_attn called with either of its signatures (is_causal up to torch 2.10,
window_size later; with or without enable_gqa / scale); the registered mask function; and on CUDA the
varlen kernels against per-sequence SDPA in bf16."""
import math

import pytest
import torch

from mrpo.models import varlen_attention as va
from mrpo.models.varlen_attention import PackedSequences, packed_attention, packed_kernel

LENGTHS = [5, 1, 9, 3]
HQ, HKV, D = 4, 2, 16


def qkv(dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    L = sum(LENGTHS)
    make = lambda h: torch.randn(1, h, L, D, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return make(HQ), make(HKV), make(HKV)


def reference(q, k, v, lengths, scale, causal):
    """Plain softmax attention per sequence, in float64: [1, Hq, L, D] -> [1, L, Hq, D]."""
    q, k, v = (t.double() for t in (q, k, v))
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    out, start = [], 0
    for n in lengths:
        s = slice(start, start + n)
        scores = q[:, :, s] @ k[:, :, s].transpose(-1, -2) * scale
        if causal:
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        out.append(scores.softmax(-1) @ v[:, :, s])
        start += n
    return torch.cat(out, dim=2).transpose(1, 2)


def test_packed_sequences_from_lengths():
    seqs = PackedSequences.from_lengths(LENGTHS, "cpu")
    assert seqs.cu_seqlens.tolist() == [0, 5, 6, 15, 18] and seqs.cu_seqlens.dtype == torch.int32
    assert seqs.max_seqlen == 9 and seqs.lengths == tuple(LENGTHS) and seqs.total == 18
    with pytest.raises(ValueError, match="every sequence needs a token"):
        PackedSequences.from_lengths([3, 0], "cpu")


@pytest.mark.parametrize("causal", [True, False])
def test_per_sequence_sdpa_equals_reference(causal):
    q, k, v = (t.requires_grad_() for t in qkv())
    seqs = PackedSequences.from_lengths(LENGTHS, "cpu")
    scale = 0.3
    out = packed_attention(None, q, k, v, seqs, scaling=scale, is_causal=causal)
    ref = reference(q, k, v, LENGTHS, scale, causal)
    assert out.shape == (1, sum(LENGTHS), HQ, D)
    assert (out.double() - ref).abs().max() <= 1e-5
    w = torch.randn_like(ref)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for got, want in zip(grads, ref_grads):
        assert (got.double() - want).abs().max() <= 1e-5
    # a sequence sees nothing of the others: changing sequence 3's keys leaves sequences 0-2 unchanged
    k2 = k.detach().clone()
    k2[:, :, 6:15] += 1.0
    moved = packed_attention(None, q, k2, v, seqs, scaling=scale, is_causal=causal)
    assert torch.equal(moved[:, :6], out[:, :6]) and not torch.allclose(moved[:, 6:15], out[:, 6:15])


def test_wrong_row_length_is_refused():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="one row of 17 tokens"):
        packed_attention(None, q, k, v, PackedSequences.from_lengths([8, 9], "cpu"))


def test_kernel_choice(monkeypatch):
    cuda = torch.device("cuda")
    assert packed_kernel(torch.device("cpu"), torch.bfloat16, 64) == "sdpa_per_sequence"
    assert packed_kernel(cuda, torch.float32, 64) == "sdpa_per_sequence"      # the flash kernels are fp16/bf16
    monkeypatch.setattr(va, "_torch_varlen", lambda: (object(), frozenset()))
    monkeypatch.setattr(va, "_flash_attn_varlen", lambda: object())
    assert packed_kernel(cuda, torch.bfloat16, 64, "flash_attention_2") == "flash_attn_varlen"
    assert packed_kernel(cuda, torch.bfloat16, 64, "sdpa") == "torch_varlen"
    assert packed_kernel(cuda, torch.float16, 36, "sdpa") == "sdpa_per_sequence"   # head dim not a multiple of 8
    monkeypatch.setattr(va, "_flash_attn_varlen", lambda: None)
    assert packed_kernel(cuda, torch.bfloat16, 64, "flash_attention_2") == "torch_varlen"
    monkeypatch.setattr(va, "_torch_varlen", lambda: None)
    assert packed_kernel(cuda, torch.bfloat16, 64, "flash_attention_2") == "sdpa_per_sequence"


def _fake_varlen(new_signature: bool, calls: list):
    """A varlen_attn stand-in with torch's newer (window_size, enable_gqa, scale) or older (is_causal only)
    keywords, computing the reference from [L, H, D] inputs."""
    def run(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, gqa):
        assert torch.equal(cu_q, cu_k) and max_q == max_k == max(LENGTHS)
        assert gqa or q.shape[1] == k.shape[1]
        lengths = torch.diff(cu_q).tolist()
        scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
        return reference(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                         lengths, scale, causal)[0].float()

    if new_signature:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1), enable_gqa=False):
            calls.append(dict(window_size=window_size, enable_gqa=enable_gqa, scale=scale))
            return run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size == (-1, 0), scale, enable_gqa)
    else:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
            calls.append(dict(is_causal=is_causal))
            return run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, None, False)
    import inspect

    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


@pytest.mark.parametrize("new_signature", [True, False])
def test_torch_varlen_signatures(monkeypatch, new_signature):
    calls = []
    monkeypatch.setattr(va, "_torch_varlen", lambda: _fake_varlen(new_signature, calls))
    q, k, v = qkv()
    seqs = PackedSequences.from_lengths(LENGTHS, "cpu")
    flat = [t[0].transpose(0, 1).contiguous() for t in (q, k, v)]
    out = va._torch_varlen_attention(*flat, seqs, 0.3, causal=True)
    assert (out.double() - reference(q, k, v, LENGTHS, 0.3, True)[0]).abs().max() <= 1e-5
    want = dict(window_size=(-1, 0), enable_gqa=True, scale=0.3) if new_signature else dict(is_causal=True)
    assert calls == [want]


def test_mask_function_defers_to_base():
    """No mask for a full row without padding mask (the packed forward); the base's mask otherwise."""
    from transformers.masking_utils import causal_mask_function

    mask = va._make_mask("sdpa")
    common = dict(batch_size=1, mask_function=causal_mask_function, allow_is_causal_skip=False,
                  dtype=torch.float32, config=None, use_vmap=False, device=torch.device("cpu"))
    assert mask(attention_mask=None, q_length=6, kv_length=6, q_offset=0, kv_offset=0, **common) is None
    padded = mask(attention_mask=torch.tensor([[0, 1, 1, 1]], dtype=torch.bool), q_length=4, kv_length=4,
                  q_offset=0, kv_offset=0, **common)
    assert padded.shape == (1, 1, 4, 4) and not padded[0, 0, :, 0].any()     # the padding column is masked
    decode = mask(attention_mask=None, q_length=1, kv_length=5, q_offset=4, kv_offset=0, **common)
    assert decode is not None and decode.all()                               # one new token sees the whole cache


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("base", ["sdpa", "flash_attention_2"])
def test_cuda_kernels_bf16(base):
    """The CUDA varlen kernel (torch's, or flash-attn's with base flash_attention_2 when installed) against
    per-sequence SDPA on the same bf16 inputs, forward and gradients."""
    kernel = packed_kernel(torch.device("cuda"), torch.bfloat16, D, base)
    if kernel == "sdpa_per_sequence":
        pytest.skip("no CUDA varlen kernel in this environment")
    seqs = PackedSequences.from_lengths(LENGTHS, "cuda")
    q, k, v = (t.requires_grad_() for t in qkv(torch.bfloat16, "cuda"))
    out = packed_attention(None, q, k, v, seqs, scaling=0.3, base=base)
    ref = va._per_sequence_sdpa(q, k, v, seqs, 0.3, 0.0, True).transpose(1, 2)
    assert (out.float() - ref.float()).abs().max() <= 2e-2
    exact = reference(q, k, v, LENGTHS, 0.3, True)
    assert (out.double() - exact).abs().max() <= 2e-2
    w = torch.randn_like(ref)
    g1 = torch.autograd.grad((out * w).sum(), (q, k, v))
    g2 = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(g1, g2):
        assert (a.float() - b.float()).abs().max() <= 5e-2 * max(1.0, b.float().abs().max().item())
