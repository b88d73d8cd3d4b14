"""Varlen attention for packed (padding-free) training forwards, registered in transformers' AttentionInterface.

A packed forward concatenates the B sequences of a micro-batch into one row of L = sum(L_i) tokens
(Backbone.packed_completion_hidden_states). The sequence boundaries reach every decoder layer explicitly,
as the forward kwarg `packed_sequences` (a PackedSequences, built once per micro-batch from lengths the
caller already knows): transformers passes a model's forward kwargs down to its attention function.
Nothing is inferred from position_ids, and no [L, L] mask is built.

`use_varlen_attention(model)` switches the language model's attention to `mrpo_varlen_<base>`, where
<base> is the implementation it had (sdpa, eager, flash_attention_2, ...). That function
  - with `packed_sequences`: causal attention within each sequence, by the first kernel that applies:
      flash-attn's flash_attn_varlen_func   CUDA, fp16/bf16, base flash_attention_2 and flash-attn installed
      torch's varlen_attn                   CUDA, fp16/bf16, torch >= 2.9 (torch.nn.attention.varlen)
      per-sequence SDPA (is_causal=True)    otherwise, CPU included: work ~ sum L_i^2, no mask
  - without: calls <base> with transformers' own mask (generation, the padded forward), so the model
    behaves exactly as before the switch.
Its mask function returns no mask for a forward without padding mask and cache (the packed forward: the
boundaries come from the kwarg) and defers to <base>'s mask function otherwise. Position ids play no part
in the boundaries: Qwen gets its 3 M-RoPE rows only (no text row, so transformers looks for no packed
sequences); InternVL's 1-D ids still pass through transformers' O(L) packed-sequence detection before the
mask function is called, whose result that function ignores.

Why not transformers' `cu_seq_lens_q/k`, `max_length_q/k` kwargs: the forward kwargs of Qwen2.5-VL,
Qwen3-VL and InternVL also reach their vision towers, whose flash_attention_2 path would get the text
boundaries (InternVL) or the same keyword twice (Qwen, which passes its own cu_seq_lens_q). The vision
towers ignore `packed_sequences`. The switch changes the text config only, so the vision tower keeps its
implementation; `_attn_implementation` is not saved with the config, so an exported model is unaffected.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PREFIX = "mrpo_varlen_"
KWARG = "packed_sequences"


@dataclass(frozen=True)
class PackedSequences:
    """Boundaries of the B sequences concatenated in one packed row of L tokens.

    cu_seqlens: [B + 1] int32 on the row's device, (0, L_0, L_0 + L_1, ..., L)
    max_seqlen: max L_i (tokens)
    lengths:    (L_0, ..., L_{B-1}) on the host (the per-sequence fallback splits by them without a sync)
    """
    cu_seqlens: torch.Tensor
    max_seqlen: int
    lengths: tuple[int, ...]

    @classmethod
    def from_lengths(cls, lengths: list[int], device: torch.device | str) -> "PackedSequences":
        """From the host list of sequence lengths (each >= 1)."""
        lengths = tuple(int(n) for n in lengths)
        if not lengths or min(lengths) < 1:
            raise ValueError(f"PackedSequences: every sequence needs a token, got lengths {list(lengths)}")
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
        return cls(cu.to(device), max(lengths), lengths)

    @property
    def total(self) -> int:
        return sum(self.lengths)


# ----------------------------------------------------------------------------- kernels
@functools.lru_cache(maxsize=None)
def _torch_varlen():
    """(varlen_attn, its keyword parameters) where torch has it (>= 2.9), else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


@functools.lru_cache(maxsize=None)
def _flash_attn_varlen():
    if importlib.util.find_spec("flash_attn") is None:
        return None
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


def packed_kernel(device: torch.device, dtype: torch.dtype, head_dim: int, base: str = "sdpa") -> str:
    """Which kernel runs a packed attention call: "flash_attn_varlen", "torch_varlen" or "sdpa_per_sequence"."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256:
        if base.startswith("flash_attention") and _flash_attn_varlen() is not None:
            return "flash_attn_varlen"
        if _torch_varlen() is not None:
            return "torch_varlen"
    return "sdpa_per_sequence"


def _per_sequence_sdpa(q, k, v, seqs: PackedSequences, scaling, dropout: float, causal: bool) -> torch.Tensor:
    """q [1, Hq, L, D], k / v [1, Hkv, L, D] -> [1, Hq, L, D]: one SDPA call per sequence."""
    gqa = q.shape[1] != k.shape[1]
    parts = zip(q.split(seqs.lengths, dim=2), k.split(seqs.lengths, dim=2), v.split(seqs.lengths, dim=2))
    return torch.cat([F.scaled_dot_product_attention(qi, ki, vi, dropout_p=dropout, is_causal=causal,
                                                     scale=scaling, enable_gqa=gqa) for qi, ki, vi in parts], dim=2)


def _torch_varlen_attention(q, k, v, seqs: PackedSequences, scaling, causal: bool) -> torch.Tensor:
    """q [L, Hq, D], k / v [L, Hkv, D] -> [L, Hq, D] with torch's varlen_attn (its keywords differ by version:
    causal is is_causal=True up to 2.10 and window_size=(-1, 0) later; GQA needs enable_gqa or repeated heads)."""
    varlen_attn, params = _torch_varlen()
    kwargs = {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        kwargs["is_causal"] = causal
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    if "scale" in params:
        kwargs["scale"] = scaling
    elif scaling is not None:   # default scale 1/sqrt(D): fold the requested one into q
        q = q * (scaling * q.shape[-1] ** 0.5)
    cu = seqs.cu_seqlens
    return varlen_attn(q, k, v, cu, cu, seqs.max_seqlen, seqs.max_seqlen, **kwargs)


def packed_attention(module, query, key, value, seqs: PackedSequences, scaling=None, dropout: float = 0.0,
                     is_causal: bool = True, base: str = "sdpa") -> torch.Tensor:
    """Attention within each packed sequence.

    query [1, Hq, L, D], key / value [1, Hkv, L, D] (Hq a multiple of Hkv: GQA), L = seqs.total;
    scaling: softmax scale (None = 1/sqrt(D)). Returns [1, L, Hq, D], the layout of transformers'
    attention functions."""
    if query.shape[0] != 1 or query.shape[2] != seqs.total or key.shape[2] != seqs.total:
        raise ValueError(f"packed attention: expected one row of {seqs.total} tokens (the sum of the packed "
                         f"lengths), got query {tuple(query.shape)}, key {tuple(key.shape)}")
    kernel = packed_kernel(query.device, query.dtype, query.shape[-1], base)
    if kernel == "sdpa_per_sequence" or (kernel == "torch_varlen" and dropout > 0):
        return _per_sequence_sdpa(query, key, value, seqs, scaling, dropout, is_causal).transpose(1, 2)
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))         # [L, H, D]
    if kernel == "flash_attn_varlen":
        cu = seqs.cu_seqlens
        out = _flash_attn_varlen()(q, k, v, cu, cu, seqs.max_seqlen, seqs.max_seqlen, dropout_p=dropout,
                                   softmax_scale=scaling, causal=is_causal)
    else:
        out = _torch_varlen_attention(q, k, v, seqs, scaling, is_causal)
    return out[None]


# ----------------------------------------------------------------------------- transformers glue
def _base_attention(base: str, module):
    """The attention function of implementation `base` (eager: the one of the module's own modeling file)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    return ALL_ATTENTION_FUNCTIONS.get_interface(base, eager)


def _make_attention(base: str):
    def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                 scaling: float | None = None, is_causal: bool | None = None,
                                 packed_sequences: PackedSequences | None = None, **kwargs):
        """transformers attention function: query [B, Hq, S, D], key / value [B, Hkv, S_kv, D] ->
        ([B, S, Hq, D], None). With packed_sequences (B = 1, S = L): per-sequence causal attention;
        without: the base implementation."""
        if packed_sequences is None:
            return _base_attention(base, module)(module, query, key, value, attention_mask, dropout=dropout,
                                                 scaling=scaling, is_causal=is_causal, **kwargs)
        if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
            raise NotImplementedError("packed attention: sliding-window and softcap layers are not supported; "
                                      "set loss.packing=false")
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        return packed_attention(module, query, key, value, packed_sequences, scaling, dropout, causal, base), None

    varlen_attention_forward.__name__ = f"{PREFIX}{base}"
    return varlen_attention_forward


def _make_mask(base: str):
    def varlen_mask(*, attention_mask=None, q_length: int = 0, kv_length: int = 0, q_offset=0, kv_offset=0,
                    **kwargs):
        """No mask for a forward without padding mask and cache (a packed forward, or one causal sequence);
        otherwise the base implementation's mask (generation, the padded forward)."""
        full_row = isinstance(q_offset, int) and q_offset == 0 and kv_offset == 0 and q_length == kv_length
        if attention_mask is None and full_row:
            return None
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        base_mask = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(base)
        if base_mask is None:   # a base without a mask function runs without mask
            return None
        return base_mask(attention_mask=attention_mask, q_length=q_length, kv_length=kv_length,
                         q_offset=q_offset, kv_offset=kv_offset, **kwargs)

    return varlen_mask


def register(base: str) -> str:
    """Register `mrpo_varlen_<base>` (attention and mask function) in transformers; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    name = f"{PREFIX}{base}"
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _make_attention(base))
        AttentionMaskInterface.register(name, _make_mask(base))
    return name


def base_implementation(name: str | None) -> str:
    """The implementation a (possibly switched) attention name runs when not packed."""
    name = name or "eager"
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def text_config(model):
    """The language model's config (shared by its attention modules); unwraps a DeepSpeed engine."""
    model = getattr(model, "module", model)
    return model.config.get_text_config()


def use_varlen_attention(model) -> str:
    """Switch `model`'s language model to the varlen attention over its current implementation (idempotent;
    the vision tower is left alone). Returns the attention name now in use."""
    config = text_config(model)
    current = config._attn_implementation or "eager"
    if current.startswith(PREFIX):
        return current
    name = register(current)
    config._attn_implementation = name
    return name
