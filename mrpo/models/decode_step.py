"""The lean decode step of mrpo.models.decode: one token per row through the language model's own weights.

Families: Qwen2.5-VL and InternVL3 (Qwen2 text: q/k/v biases) and Qwen3-VL (Qwen3 text: per-head RMSNorm
on q and k). Per decoder layer the step runs about 14 tensor ops instead of the ~250 of the Hugging Face
layer (see /work/shared/notes-offline-backbones.md, "For a decode loop of our own"):

    h = rms_norm(x)                     qkv = h @ [Wq; Wk; Wv].T + b     (one matmul)
    [q; k] *= cos, += roll(q; k) * sin  (RoPE on q and k together; Qwen3: per-head rms_norm first)
    K[:, :, col] = k, V[:, :, col] = v  (written in place into the preallocated cache)
    a = SDPA(q grouped per KV head, K, V, additive padding mask)      (one call; no repeat_kv)
    x += a @ Wo.T ; h = rms_norm(x) ; g, u = h @ [Wgate; Wup].T ; x += (silu(g) * u) @ Wdown.T

Rotary position: during decode all three M-RoPE axes carry the same text position (the prompt's last
position + 1 + t; the prompt's rope delta is inside that start), and M-RoPE with equal axes (Qwen2.5-VL's
sectioned or Qwen3-VL's interleaved layout) is the 1-D RoPE of that position. The cos / sin table is the
model's own `rotary_emb` evaluated once per call over every position the call can reach, so its
numbers are the Hugging Face ones (attention scaling and rope type included).

Two forms of one step, same math:
  dynamic (`static=False`): the cache column is a Python int and attention reads only the columns
    written so far (cheapest on CPU, where a decode step costs what its op count and sizes cost);
  static (`static=True`): the column is a 1-element device tensor, K/V are written with index_copy_ and
    attention reads a span of columns (the first multiple of SPAN = 256 that holds the written ones) with
    the not-yet-written columns masked (-inf): fixed shapes, no host values, so a CUDA graph can capture
    it once per (batch bucket, span) and replay it (StepGraphs). It also runs eagerly on CPU, which is
    how the tests prove it equal to the dynamic form.

Weights: `StepWeights.from_model` concatenates q/k/v (and, off CUDA, gate/up) once per call (the caller
runs inside engine.generation(), where sharded weights are gathered); peft LoRA layers are merged once per
call (W + scaling * B @ A, computed in fp32; the teacher-forced forward adds the branch instead, equal to
~1e-6). Memory held for the length of a call, besides the KV cache: the fused q/k/v copy (7B Qwen2.5-VL
bf16: 28 x 4608 x 3584 x 2 B = 0.9 GB); off CUDA also the gate/up copy (7.6 GB at 7B, which is why CUDA
keeps gate and up as two matmuls); with LoRA, a merged copy of every adapted weight. On CUDA (graphs)
these copies and the KV cache live in a `Workspace` kept between calls: each call builds its copies
again (transiently) and copies them into the workspace's tensors, whose addresses the graphs captured.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FAMILY_TEXT_MODELS = {"qwen2_5_vl": "Qwen2_5_VLTextModel", "qwen3_vl": "Qwen3VLTextModel", "internvl3": "Qwen2Model"}


def language_model(model) -> torch.nn.Module:
    """The decoder-only text model inside a VL model (embed_tokens, layers, norm, rotary_emb)."""
    model = getattr(model, "module", model)     # a DeepSpeed engine wraps the HF model
    return model.model.language_model


def linear_weight(module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [out, in], bias [out] or None) that `module` applies: an nn.Linear's own, or a peft LoRA
    Linear's base weight plus scaling * B @ A of each active adapter (unless merged or disabled)."""
    base = getattr(module, "base_layer", None)
    if base is None:
        return module.weight, module.bias
    weight, bias = base.weight, base.bias
    if getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
        return weight, bias
    delta = None
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        a, b = module.lora_A[name].weight.float(), module.lora_B[name].weight.float()   # [r, in], [out, r]
        d = module.scaling[name] * (b @ a)
        delta = d if delta is None else delta + d
    if delta is None:
        return weight, bias
    return (weight.float() + delta).to(weight.dtype), bias


def lora_unsupported(module) -> str | None:
    """Why a peft LoRA layer cannot be merged here (None: it can, or it is not a LoRA layer)."""
    if getattr(module, "base_layer", None) is None:
        return None
    if type(module).__name__ != "Linear" or not isinstance(module.base_layer, torch.nn.Linear):
        return f"LoRA layer type {type(module).__name__} over {type(module.base_layer).__name__}"
    for name in module.active_adapters:
        if getattr(module, "use_dora", {}).get(name, False):
            return "DoRA adapters"
        if getattr(module, "lora_bias", {}).get(name, False):
            return "LoRA adapters with a bias"
    if getattr(module, "fan_in_fan_out", False):
        return "LoRA layers with fan_in_fan_out"
    return None


def _check_gathered(weight: torch.Tensor, name: str) -> None:
    """The lean step needs whole weights: a DTensor (FSDP2 shard) or an empty ZeRO-3 placeholder means
    the call runs outside engine.generation()."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:   # pragma: no cover - torch without distributed
        DTensor = ()
    if isinstance(weight, DTensor) or weight.numel() == 0:
        raise ValueError(f"decode_groups: {name} is sharded ({type(weight).__name__}, {weight.numel()} elements); "
                         f"call it inside engine.generation(), which gathers every weight once")


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim as transformers' Qwen RMSNorm computes it (fp32 statistics, the result
    cast back before the weight multiplies it); fp32 uses the fused F.rms_norm (the same numbers)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    y = x.float()
    y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if weight is None else weight * y


@dataclass
class LayerWeights:
    ln_in: torch.Tensor            # [D]
    ln_post: torch.Tensor          # [D]
    qkv_w: torch.Tensor            # [(H + 2 KV) * hd, D]
    qkv_b: torch.Tensor | None     # [(H + 2 KV) * hd]
    qk_norm: torch.Tensor | None   # Qwen3: [H + KV, hd] (q_norm weight per q head, then k_norm per k head)
    o_w: torch.Tensor              # [D, H * hd]
    o_b: torch.Tensor | None
    gate_up_w: torch.Tensor | None  # [2 I, D] fused (fuse_mlp), else None and gate_w / up_w [I, D]
    down_w: torch.Tensor           # [D, I]
    gate_w: torch.Tensor | None = None
    up_w: torch.Tensor | None = None


@dataclass
class StepWeights:
    """Everything the lean step reads, gathered from the model once per decode call."""
    layers: list[LayerWeights]
    embed: torch.Tensor            # [V, D]
    norm: torch.Tensor             # [D] final norm
    lm_head: torch.Tensor          # [V, D]
    eps: float                     # decoder RMSNorm epsilon
    qk_eps: float                  # Qwen3 q/k norm epsilon
    heads: int
    kv_heads: int
    head_dim: int
    scale: float                   # attention softmax scale (head_dim ** -0.5)
    cos: torch.Tensor | None = None        # [N, hd] RoPE table over positions 0..N-1 (set by rope_tables)
    sin_signed: torch.Tensor | None = None  # [N, hd]: (-sin, +sin) halves, so rotate_half(x) * sin = roll(x) * it

    @staticmethod
    def from_model(model, fuse_mlp: bool = True) -> StepWeights:
        """fuse_mlp: concatenate gate/up into one weight (one matmul per step; CPU, where a step costs its op
        count). Without it gate and up stay two matmuls over the model's own tensors: no copy of the
        largest weights (on CUDA the captured graph makes the extra op free)."""
        lm = language_model(model)
        out_emb = getattr(model, "module", model).get_output_embeddings()
        cfg = lm.config
        attn0 = lm.layers[0].self_attn
        down0 = lm.layers[0].mlp.down_proj
        _check_gathered(getattr(down0, "base_layer", down0).weight, "layers.0.mlp.down_proj.weight")
        _check_gathered(lm.embed_tokens.weight, "embed_tokens.weight")
        layers = []
        qk_eps = 0.0
        with torch.no_grad():
            for layer in lm.layers:
                at, mlp = layer.self_attn, layer.mlp
                (qw, qb), (kw, kb), (vw, vb) = (linear_weight(m) for m in (at.q_proj, at.k_proj, at.v_proj))
                qkv_b = None if qb is None else torch.cat([qb, kb, vb])
                qk_norm = None
                if getattr(at, "q_norm", None) is not None:
                    qk_eps = at.q_norm.variance_epsilon
                    qk_norm = torch.cat([at.q_norm.weight.expand(cfg.num_attention_heads, -1),
                                         at.k_norm.weight.expand(cfg.num_key_value_heads, -1)])
                ow, ob = linear_weight(at.o_proj)
                (gw, _), (uw, _), (dw, _) = (linear_weight(m) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
                layers.append(LayerWeights(
                    ln_in=layer.input_layernorm.weight, ln_post=layer.post_attention_layernorm.weight,
                    qkv_w=torch.cat([qw, kw, vw]), qkv_b=qkv_b, qk_norm=qk_norm, o_w=ow, o_b=ob,
                    gate_up_w=torch.cat([gw, uw]) if fuse_mlp else None, down_w=dw,
                    gate_w=None if fuse_mlp else gw, up_w=None if fuse_mlp else uw))
        return StepWeights(layers=layers, embed=lm.embed_tokens.weight, norm=lm.norm.weight,
                           lm_head=out_emb.weight, eps=lm.layers[0].input_layernorm.variance_epsilon,
                           qk_eps=qk_eps, heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
                           head_dim=attn0.head_dim, scale=attn0.scaling)

    def rope_tables(self, model, positions: int, mrope: bool) -> None:
        """cos / sin_signed over positions 0..positions-1, from the model's own rotary embedding
        (mrope: 3 equal axes, the text positions of Qwen's M-RoPE)."""
        lm = language_model(model)
        device, dtype = self.embed.device, self.embed.dtype
        ids = torch.arange(positions, device=device)[None]
        if mrope:
            ids = ids[None].expand(3, 1, -1)
        with torch.no_grad():
            cos, sin = lm.rotary_emb(torch.empty(0, device=device, dtype=dtype), ids)
        cos, sin = cos.reshape(positions, -1), sin.reshape(positions, -1)
        half = sin.shape[-1] // 2
        self.cos, self.sin_signed = cos.contiguous(), torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)


class DecodeBuffers:
    """The preallocated state of one decode call, indexed by slot (a row of the running batch; live rows
    are compacted to the front). rows = slots; length = prompt length + max_new_tokens columns."""

    def __init__(self, w: StepWeights, rows: int, length: int, device, dtype):
        shape = (rows, w.kv_heads, length, w.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in w.layers]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in w.layers]
        self.bias = torch.full((rows, length), float("-inf"), device=device, dtype=dtype)  # additive key mask
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)   # input token of the next step
        self.pos = torch.zeros(rows, dtype=torch.long, device=device)      # its rotary position
        self.col = torch.zeros(1, dtype=torch.long, device=device)         # its cache column (static step)

    def reset(self) -> None:
        """A new call in reused buffers: every column masked again (stale K/V under a -inf mask is unread)."""
        self.bias.fill_(float("-inf"))

    def compact(self, keep: torch.Tensor) -> None:
        """Move the slots `keep` (ascending) to the front, in order: copies within the buffers."""
        n = keep.numel()
        for buf in (*self.k, *self.v, self.bias, self.tokens, self.pos):
            buf[:n] = buf.index_select(0, keep)


SPAN = 256   # the static step attends the first multiple of SPAN columns that holds the written ones


def span_of(col: int, length: int) -> int:
    """Columns the static step attends when writing column `col`: a multiple of SPAN (at most `length`),
    so a graph serves SPAN consecutive steps and attention does not read the whole empty cache early on."""
    return min(length, -(-(col + 1) // SPAN) * SPAN)


def decode_step(w: StepWeights, buf: DecodeBuffers, rows: int, col: int | None = None, static: bool = False,
                span: int | None = None) -> torch.Tensor:
    """One decoded position for slots [0, rows): embeds buf.tokens, writes their K/V at the cache column
    (dynamic: the int `col`; static: buf.col), unmasks that column, returns logits [rows, V] (model dtype).
    Attention reads columns [0, col] (dynamic) or [0, span) with the unwritten ones masked (static; span
    default: the whole cache). The caller advances buf.pos / buf.col (and the tokens) between steps."""
    H, KV, hd = w.heads, w.kv_heads, w.head_dim
    x = F.embedding(buf.tokens[:rows], w.embed)                              # [B, D]
    cos = w.cos.index_select(0, buf.pos[:rows])[:, None]                     # [B, 1, hd]
    sin = w.sin_signed.index_select(0, buf.pos[:rows])[:, None]
    if static:
        span = buf.bias.shape[1] if span is None else span
        buf.bias[:rows].index_fill_(1, buf.col, 0.0)
        mask = buf.bias[:rows, None, None, :span]                            # [B, 1, 1, span]
    else:
        buf.bias[:rows, col] = 0.0
        mask = buf.bias[:rows, None, None, : col + 1]
    nq = (H + KV) * hd
    for lw, kc, vc in zip(w.layers, buf.k, buf.v):
        h = rms_norm(x, lw.ln_in, w.eps)
        qkv = F.linear(h, lw.qkv_w, lw.qkv_b)                                # [B, (H + 2 KV) hd]
        qk = qkv[:, :nq].view(rows, H + KV, hd)
        if lw.qk_norm is not None:                                           # Qwen3: per-head q / k norms
            qk = rms_norm(qk, None, w.qk_eps) * lw.qk_norm
        if qk.dtype == torch.float32:                                        # RoPE: x cos + rotate_half(x) sin
            qk = torch.addcmul(qk * cos, qk.roll(hd // 2, -1), sin)
        else:                                                                # bf16 / fp16: round each product, as HF
            qk = qk * cos + qk.roll(hd // 2, -1) * sin
        k = qk[:, H:, None]                                                  # [B, KV, 1, hd]
        v = qkv[:, nq:].view(rows, KV, 1, hd)
        if static:
            kc[:rows].index_copy_(2, buf.col, k)
            vc[:rows].index_copy_(2, buf.col, v)
            keys, values = kc[:rows, :, :span], vc[:rows, :, :span]
        else:
            kc[:rows, :, col : col + 1] = k
            vc[:rows, :, col : col + 1] = v
            keys, values = kc[:rows, :, : col + 1], vc[:rows, :, : col + 1]
        # the H / KV query heads of one KV head act as that head's queries: no repeat of K / V
        q = qk[:, :H].reshape(rows, KV, H // KV, hd)
        a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=w.scale)   # [B, KV, H/KV, hd]
        x = x + F.linear(a.reshape(rows, H * hd), lw.o_w, lw.o_b)
        h = rms_norm(x, lw.ln_post, w.eps)
        if lw.gate_up_w is not None:
            gate, up = F.linear(h, lw.gate_up_w).chunk(2, dim=-1)
        else:
            gate, up = F.linear(h, lw.gate_w), F.linear(h, lw.up_w)
        x = x + F.linear(F.silu(gate) * up, lw.down_w)
    return F.linear(rms_norm(x, w.norm, w.eps), w.lm_head)


def capture_cuda_graph(fn, pool=None):
    """Capture fn() (no host syncs, fixed shapes, only static buffers) as a CUDA graph in memory pool
    `pool` (None: a new one); returns (graph, output tensor that each graph.replay() overwrites). The
    caller has run fn() eagerly once on this bucket (the warm-up), so lazy library initialisation
    (cuBLAS handles and workspaces) happens outside the capture."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


class StepGraphs:
    """The static step of each (batch bucket, attention span) captured once (first use: an eager warm-up
    run, whose logits are that step's, then the capture, which executes nothing) and replayed at every
    later step of the call with that pair. `capture`: (fn, pool) -> (graph with .replay(), output); default capture_cuda_graph (CPU tests
    put a stand-in there). Replaying a capture is safe because the static step is idempotent for a given
    state: it reads buf.tokens / pos / col and writes K/V and the mask at col, so the warm-up run and the
    capture leave the buffers as one run does; the caller advances pos / col / tokens between steps."""

    def __init__(self, w: StepWeights, buf: DecodeBuffers, capture=None):
        self.w, self.buf = w, buf
        self.capture = capture or capture_cuda_graph
        self.graphs: dict[tuple[int, int], tuple] = {}
        self.pool = None          # one memory pool shared by the buckets' graphs (they never run at once)
        self.captures = 0         # graphs captured so far (a Workspace's graphs live over many calls)

    def reset(self) -> None:
        """Drop every graph (a tensor they read has moved): the next use of each pair captures anew."""
        self.graphs.clear()
        self.pool = None

    def __call__(self, rows: int, span: int) -> torch.Tensor:
        entry = self.graphs.get((rows, span))
        if entry is not None:
            entry[0].replay()
            return entry[1]
        logits = decode_step(self.w, self.buf, rows, static=True, span=span)   # warm-up = this step's real run
        graph, out = self.capture(lambda: decode_step(self.w, self.buf, rows, static=True, span=span), self.pool)
        self.graphs[(rows, span)] = (graph, out)
        self.captures += 1
        if hasattr(graph, "pool"):
            self.pool = graph.pool()
        return logits


def _weight_slots(w: StepWeights):
    """(holder, attribute name, tensor or None) of every weight the step reads (not the RoPE tables)."""
    for lw in w.layers:
        for f in dataclasses.fields(lw):
            yield lw, f.name, getattr(lw, f.name)
    for name in ("embed", "norm", "lm_head"):
        yield w, name, getattr(w, name)


class Workspace:
    """What the CUDA graphs read, kept between decode calls so that each (bucket, span) is captured once
    per run and replayed in every later call (mrpo.models.decode keeps one per language model on CUDA):
    the DecodeBuffers (rows x columns), the RoPE tables (positions), the step's weights and StepGraphs.
    A graph replays fixed addresses, so every call refreshes the weights IN PLACE (`refresh`): the copies
    the step made (fused q/k/v, Qwen3's q/k norms, fused biases, LoRA-merged weights) are copy_'d into the
    workspace's own tensors; the model's own parameters are read where they are, which is the same address
    after an in-place optimizer step; if one moved (re-gathered elsewhere by FSDP2 / ZeRO-3, a parameter
    replaced) the graphs are dropped and re-captured (stats' graph_captures shows it). Memory: the same as
    one call's buffers and fused copies, held until `decode.release_workspace` (or the model is freed)."""

    def __init__(self, w: StepWeights, model, rows: int, length: int, positions: int, mrope: bool, device, dtype):
        self.rows, self.length, self.positions, self.device, self.dtype = rows, length, positions, device, dtype
        w.rope_tables(model, positions, mrope=mrope)
        self.w, self.buf = w, DecodeBuffers(w, rows, length, device, dtype)
        self.graphs = StepGraphs(w, self.buf)
        self.layout = self._layout(w)

    @staticmethod
    def _layout(w: StepWeights) -> tuple:
        return w.heads, w.kv_heads, w.head_dim, tuple(name for _, name, t in _weight_slots(w) if t is not None)

    def fits(self, w: StepWeights, rows: int, length: int, positions: int, device, dtype) -> bool:
        """Whether a call of `rows` x `length` columns reaching `positions` rotary positions fits."""
        return (rows <= self.rows and length <= self.length and positions <= self.positions
                and torch.device(device) == torch.device(self.device) and dtype == self.dtype
                and self._layout(w) == self.layout)

    def refresh(self, fresh: StepWeights) -> None:
        """Take this call's weights (StepWeights.from_model of the current model) without moving a tensor
        the graphs read: copies into the workspace's own tensors; a model tensor that moved resets the graphs."""
        moved = False
        for (holder, name, old), (_, _, new) in zip(_weight_slots(self.w), _weight_slots(fresh)):
            if new is None or new is old:
                continue
            own = not isinstance(old, torch.nn.Parameter) and not isinstance(new, torch.nn.Parameter)
            if own and old.shape == new.shape and old.dtype == new.dtype:
                old.copy_(new)
            elif new.data_ptr() != old.data_ptr() or new.shape != old.shape:
                setattr(holder, name, new)
                moved = True
        if moved:
            self.graphs.reset()
        self.buf.reset()
