"""Our own decode loop for rollouts, greedy evaluation and inference (issue 28).

    out = decode_groups(backbone, prompts, rows=[i for i in range(P) for _ in range(G)], max_new_tokens=96,
                        temperature=0.7, row_seeds=[seed of each row])   # or generator=torch.Generator()...
    out.completion_ids[r], out.logprobs[r], out.stats

How a call runs:
1. Prefill: the DISTINCT prompts (an encode_prompts batch, left-padded, with their images) run once through
   the Hugging Face model forward (vision tower once per image, deepstack for Qwen3-VL), with the positions
   transformers' generate would pass (Qwen: the 3 M-RoPE rows from the model's get_rope_index, which hold
   each prompt's rope delta; InternVL: cumsum of the attention mask). Each prompt's K/V is copied into the
   rows that continue it, inside ONE preallocated cache per layer [rows, kv_heads, prompt_len +
   max_new_tokens (rounded up to 16), head_dim] for K and one for V; its left padding (and every column not
   written yet) is masked by an additive key mask [rows, columns] kept beside the cache.
2. Decode: the lean step of mrpo.models.decode_step over the same weights (q/k/v and gate/up fused once per
   call, RoPE table once per call, K/V written in place, one SDPA per layer). All rows decode in lockstep,
   so the cache column of step t is the same for every row; each row's rotary position is its prompt's
   start + t (1-D: during decode the three M-RoPE axes are equal).
3. Finished rows leave: a row that emitted an EOS id (any of backbone.eos_token_ids) is dead; when the
   live rows fit a smaller bucket (1, 2, 4, 8, then multiples of 8, capped at the row count) they are
   compacted to the front of the same buffers (an index_select copy per buffer) and the step runs on that
   bucket. Padding slots of a bucket compute on stale data and write nowhere (their output row is a trash row).
4. Sampling: suppression of backbone.suppress_token_ids, temperature, top-k, top-p (transformers' warpers'
   order and semantics), then an inverse-CDF draw: token = the first index where the row's cumulative
   probability (fp64) exceeds u * total, with one u ~ U[0, 1) per ORIGINAL row and step: with row_seeds,
   u[r, t] is entry t of a table drawn up front from a generator seeded with row r's seed (row_uniforms),
   so a row's completion depends only on its prompt, its seed and the weights (not on the call's other
   rows, their order, or the rank); with a generator, the call's generator draws a uniform for EVERY row
   at every step, live or not. Either way a row's noise does not depend on which other rows are live, so
   the same seed gives the same completions with compaction on or off. Each token's log-prob is
   log_softmax of the processed logits (the distribution it was drawn from); greedy: argmax, log-prob at
   T = 1 after suppression.

CPU vs CUDA: on CUDA the step of each (bucket, attention span) is the static-shape form, captured as a CUDA
graph on its first use and replayed (decode_step.StepGraphs); sampling runs eagerly between replays. The
graphs, the cache and mask they read and the fused weight copies form a workspace kept per language model
between calls (`workspace`, decode_step.Workspace; the same size as one call's buffers, sized by the
largest rows x columns seen): each call refreshes its weights in place and replays the graphs captured by
earlier calls, so in training (rows and columns fixed by the config) each (bucket, span) is captured once
per run; `release_workspace` frees it (mrpo.decoding does after each call with sharded weights). On CPU
the dynamic form runs eagerly. Why eager: measured on the tiny Qwen2.5-VL (16 rows, 1 thread, CPU time
per step, load ~10), the dynamic eager step costs 0.99 ms, the static eager one 1.07 ms (it attends the
masked columns too) and the static one under torch.compile (dynamic=False) 0.82 ms, but compiling took
~100 s and recurs for every new shape (bucket, cache length = prompt length + max_new_tokens): 17% of a
~0.1 s rollout decode does not pay that back. `static=True` runs the static form eagerly on any device
(the tests prove it gives the dynamic form's ids). Small CPU steps run on one intra-op thread
(_step_threads: OpenMP fork/join per tiny op costs more than the op, and stalls on a busy machine).

Not served (unsupported_reason says why; the caller falls back to transformers' generate): families other
than Qwen2.5-VL / Qwen3-VL / InternVL3, sliding-window layers, length-dependent RoPE (dynamic, longrope),
non-SiLU MLPs, LoRA variants other than plain peft Linear adapters, active dropout, beam search, penalties.
"""
from __future__ import annotations

import contextlib
import time
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mrpo.models.decode_step import (FAMILY_TEXT_MODELS, DecodeBuffers, StepWeights, Workspace, decode_step,
                                     language_model, lora_unsupported, span_of)

# options unsupported_reason understands (the decode_groups keywords, and generate's that it may be asked about)
_OPTIONS = {"max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "generator", "row_seeds", "compaction", "static",
            "num_beams", "repetition_penalty", "synced_gpus", "min_new_tokens"}


@dataclass
class DecodeOutput:
    completion_ids: list[list[int]]   # one per requested row, in request order; cut after (and including) the
                                      # first EOS id; a row without EOS has max_new_tokens ids
    logprobs: list[torch.Tensor]      # one per row, [T_i] fp32 (model device): log-prob of each sampled token
                                      # under the distribution it was drawn from
    stats: dict = field(default_factory=dict)   # prefill_rows, decode_steps, compactions, buckets, prefill_s,
                                                # decode_s, graph_captures


def unsupported_reason(backbone, model=None, **options) -> str | None:
    """None when decode_groups can serve this model/options; else one line naming why (the caller falls
    back to transformers' generate with a one-time message)."""
    model = backbone.model if model is None else model
    family = backbone.family
    if family not in FAMILY_TEXT_MODELS:
        return f"family {family!r} (the decode loop serves {', '.join(FAMILY_TEXT_MODELS)})"
    try:
        lm = language_model(model)
    except AttributeError:
        return f"{type(model).__name__} has no model.language_model"
    if not any(c.__name__ == FAMILY_TEXT_MODELS[family] for c in type(lm).__mro__):   # FSDP2 subclasses it
        return f"text model class {type(lm).__name__} (expected {FAMILY_TEXT_MODELS[family]} for {family})"
    cfg = lm.config
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"MLP activation {cfg.hidden_act!r} (the lean step implements silu)"
    if getattr(cfg, "use_sliding_window", False) or any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or []):
        return "sliding-window attention layers"
    rope_type = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type in ("dynamic", "longrope"):
        return f"rope_type {rope_type!r} (its tables depend on the sequence length)"
    if model.training and getattr(cfg, "attention_dropout", 0.0):
        return "attention dropout is active (model in training mode)"
    for name, module in lm.named_modules():
        why = lora_unsupported(module)
        if why is not None:
            return f"{why} ({name})"
        if getattr(module, "base_layer", None) is not None and model.training and any(
                getattr(d, "p", 0.0) for d in getattr(module, "lora_dropout", {}).values()):
            return f"LoRA dropout is active (model in training mode; {name})"
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and not weight.is_floating_point():
            return f"non-float (quantized?) weights in {name}"
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        return f"option(s) {', '.join(unknown)}"
    if options.get("num_beams", 1) not in (None, 1):
        return "beam search (num_beams > 1)"
    if options.get("repetition_penalty", 1.0) not in (None, 1.0):
        return "repetition_penalty"
    if options.get("min_new_tokens") not in (None, 0):
        return "min_new_tokens"
    if options.get("do_sample", True) and not options.get("temperature", 1.0) > 0:
        return f"temperature {options.get('temperature')} with sampling"
    if not 0 < options.get("top_p", 1.0) <= 1:
        return f"top_p {options.get('top_p')} outside (0, 1]"
    return None


SINGLE_THREAD_MACS = 2 ** 24   # decode steps whose MLP matmul is smaller than this run on one CPU thread


@contextlib.contextmanager
def _step_threads(w: StepWeights, rows: int, device: torch.device):
    """Run the decode steps on ONE intra-op thread when they are small (CPU; rows x D x I multiply-adds of
    the MLP matmul below SINGLE_THREAD_MACS): at such shapes each op's OpenMP fork/join costs more than
    its work, and on a busy machine a second thread that waits for a core stalls every op (measured on the
    tiny model at 2 threads under load 6-14: 16-43 ms of CPU per position against 0.9-1.4 ms on one
    thread). The prefill keeps the caller's threads. torch.set_num_threads is process-wide: restored after."""
    threads = torch.get_num_threads()
    down = w.layers[0].down_w
    small = device.type == "cpu" and threads > 1 and rows * down.shape[0] * down.shape[1] < SINGLE_THREAD_MACS
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small:
            torch.set_num_threads(threads)


def use_graphs(device: torch.device) -> bool:
    """Whether the static step runs as captured CUDA graphs (CUDA only; tests patch this with a stand-in)."""
    return device.type == "cuda"


def bucket_size(live: int, rows: int) -> int:
    """The batch size that `live` rows run at: the next power of two up to 8, then the next multiple of 8,
    never above `rows` (so at most ~rows / 8 + 4 distinct shapes, each captured once on CUDA)."""
    size = 1 << max(live - 1, 0).bit_length() if live <= 8 else -(-live // 8) * 8
    return min(size, rows)


def row_uniforms(row_seeds: list[int], steps: int, device) -> torch.Tensor:
    """[rows + 1, steps] fp64 uniforms in [0, 1): row r from a CPU torch.Generator seeded with row_seeds[r]
    (one draw of `steps` numbers per row: a row's noise depends only on its seed and the step); the last
    row is the trash row of bucket padding."""
    table = torch.zeros(len(row_seeds) + 1, steps, dtype=torch.float64)
    for r, seed in enumerate(row_seeds):
        table[r].uniform_(generator=torch.Generator().manual_seed(seed))
    return table.to(device)


class Sampler:
    """Picks one token per slot from logits [B, V] and returns (tokens [B], log-probs [B] fp32).
    slot_rows [B]: the original row of each slot (`rows` = a trash row for bucket padding). The uniforms
    come from `row_seeds` (a table drawn up front, see row_uniforms) or else from `generator` step by step."""

    def __init__(self, vocab: int, rows: int, steps: int, device, suppress: list[int], do_sample: bool,
                 temperature: float, top_p: float, top_k: int, generator: torch.Generator | None,
                 row_seeds: list[int] | None = None):
        ids = [i for i in suppress if 0 <= i < vocab]        # ids outside the vocabulary are ignored, as by generate
        self.suppress = torch.tensor(ids, dtype=torch.long, device=device) if ids else None
        self.do_sample, self.temperature, self.top_p = do_sample, temperature, top_p
        self.top_k = min(top_k, vocab) if top_k and top_k > 0 else 0
        self.generator, self.rows = generator, rows
        self.table = row_uniforms(row_seeds, steps, device) if row_seeds is not None and do_sample else None
        noise_device = generator.device if generator is not None else device
        self.noise = torch.zeros(rows + 1, 1, dtype=torch.float64, device=noise_device)   # row `rows`: trash row

    def __call__(self, logits: torch.Tensor, slot_rows: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = logits.float()                                   # in place below: the step's fresh output
        if self.suppress is not None:
            x.index_fill_(1, self.suppress, float("-inf"))
        if not self.do_sample:
            tok = x.argmax(-1)
            return tok, F.log_softmax(x, dim=-1).gather(1, tok[:, None])[:, 0]
        if self.temperature != 1.0:
            x.div_(self.temperature)
        if self.top_k:                                       # transformers' TopKLogitsWarper
            kth = torch.topk(x, self.top_k, dim=-1).values[:, -1:]
            x.masked_fill_(x < kth, float("-inf"))
        if self.top_p < 1.0:                                 # transformers' TopPLogitsWarper
            sorted_x, order = torch.sort(x, descending=False)
            drop = sorted_x.softmax(-1).cumsum(-1) <= 1 - self.top_p
            drop[:, -1] = False                              # keep at least one token
            x.masked_fill_(drop.scatter(1, order, drop), float("-inf"))
        logp = F.log_softmax(x, dim=-1)
        # inverse-CDF draw with one uniform per ORIGINAL row and step, drawn whether the row is live or not:
        # a row's draw does not depend on the others (compaction). One uniform per row instead of a Gumbel
        # per token: CPU random numbers cost ~10 ns each, a [rows, V] draw would cost more than the step.
        if self.table is not None:
            u = self.table[:, step : step + 1].index_select(0, slot_rows)                 # [B, 1] fp64
        else:
            self.noise[: self.rows].uniform_(generator=self.generator)
            u = self.noise.index_select(0, slot_rows.to(self.noise.device)).to(x.device)
        cdf = logp.double().exp_().cumsum_(-1)                                            # fp64: no drift
        tok = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)[:, 0].clamp_max_(x.shape[-1] - 1)
        return tok, logp.gather(1, tok[:, None])[:, 0]


def _prefill(backbone, model, prompts: dict) -> tuple[torch.Tensor, list, torch.Tensor]:
    """One forward of the distinct prompts. Returns (last-position logits [P, V], [(K, V) [P, KV, Lp, hd]
    per layer], start [P]: the rotary position of each prompt's first decoded token)."""
    ids, mask = prompts["input_ids"], prompts["attention_mask"]
    text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)               # generate's 1-D positions
    inputs = {k: v for k, v in prompts.items() if k not in ("input_ids", "attention_mask")}
    if backbone.is_qwen:
        inner = getattr(model, "module", model).model
        if prompts.get("image_grid_thw") is not None:                          # M-RoPE rows, rope deltas inside
            pos, _ = inner.get_rope_index(ids, mm_token_type_ids=prompts["mm_token_type_ids"],
                                          image_grid_thw=prompts["image_grid_thw"], attention_mask=mask)
        else:
            pos = text[None].expand(3, -1, -1)
        position_ids = torch.cat([text[None], pos])                            # [4, P, L] as generate passes
    else:
        pos, position_ids = text[None], text
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True, logits_to_keep=1,
                **inputs)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    last = pos[:, :, -1]                                                        # [axes, P]
    if not bool((last == last[:1]).all()):
        raise ValueError("decode_groups: a prompt ends in a vision token (its M-RoPE axes differ); "
                         "the decode loop needs prompts that end in text, as chat prompts do")
    return out.logits[:, -1], [(layer.keys, layer.values) for layer in cache.layers], last[0] + 1


@torch.no_grad()
def decode_groups(backbone, prompts: dict, rows: list[int], *, max_new_tokens: int, do_sample: bool = True,
                  temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                  generator: torch.Generator | None = None, row_seeds: list[int] | None = None,
                  compaction: bool = True, model=None, static: bool | None = None) -> DecodeOutput:
    """prompts: the DISTINCT encoded prompts (Backbone.encode_prompts / PromptPool.encode output, P rows,
    left-padded, with their image tensors); rows: for each output row the prompt row it continues
    (a rollout passes [i for i in range(P) for _ in range(G)]; greedy evaluation passes list(range(P))).
    Each distinct prompt is prefilled once (vision tower once per image) and its KV copied into its rows.
    Uses backbone.eos_token_ids and backbone.suppress_token_ids. model: defaults to backbone.model (the
    caller runs it inside engine.generation(), where sharded weights are gathered).
    generator / row_seeds (at most one; neither: the global RNG): the sampling noise from one generator
    for the call, or from one seed per output row (a row's completion then depends only on its prompt,
    its seed and the weights, not on the other rows of the call; see row_uniforms).
    static: None = the static-shape step as CUDA graphs on CUDA, the dynamic step elsewhere; True / False
    force the static (eagerly off CUDA) / dynamic form. Raises ValueError when unsupported_reason is set."""
    model = backbone.model if model is None else model
    why = unsupported_reason(backbone, model, do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k)
    if why is not None:
        raise ValueError(f"decode_groups cannot serve this call: {why}")
    R, T = len(rows), max_new_tokens
    if generator is not None and row_seeds is not None:
        raise ValueError("decode_groups: pass generator or row_seeds, not both")
    if row_seeds is not None and len(row_seeds) != R:
        raise ValueError(f"decode_groups: {len(row_seeds)} row_seeds for {R} rows")
    P = prompts["input_ids"].shape[0]
    if any(not 0 <= r < P for r in rows):
        raise ValueError(f"decode_groups: rows must index the {P} prompts, got {sorted(set(rows))}")
    stats = {"prefill_rows": 0, "decode_steps": 0, "compactions": 0, "buckets": [], "prefill_s": 0.0,
             "decode_s": 0.0, "graph_captures": 0}
    if R == 0 or T <= 0:
        return DecodeOutput([[] for _ in rows], [torch.zeros(0) for _ in rows], stats)
    t0 = time.perf_counter()
    used = sorted(set(rows))
    if len(used) < P:                                                          # prefill only the prompts in use
        prompts = backbone.select_rows(prompts, used)
        rows = [used.index(r) for r in rows]
    filler = backbone._vision_filler(prompts, model)   # sharded ranks: all run the vision tower (or none)
    if filler is not None:                             # an extra prefilled prompt that no row continues
        prompts = backbone._append_row(prompts, filler)
    on_cuda = prompts["input_ids"].device.type == "cuda"
    w = StepWeights.from_model(model, fuse_mlp=not on_cuda)                    # raises on sharded weights
    logits0, kv, start = _prefill(backbone, model, prompts)
    mask = prompts["attention_mask"]
    device, Lp = mask.device, mask.shape[1]
    # columns rounded up to 16: aligned mask rows for CUDA's memory-efficient SDPA; extra columns stay masked
    columns, positions = -(-(Lp + T) // 16) * 16, int(start.max()) + T
    static = device.type == "cuda" if static is None else static
    graphs = None
    if static and use_graphs(device):                       # the run's workspace: graphs captured once per run
        ws = workspace(model, w, R, columns, positions, backbone.is_qwen, device)
        w, buf, graphs = ws.w, ws.buf, ws.graphs
        captures0 = graphs.captures
    else:
        w.rope_tables(model, positions, mrope=backbone.is_qwen)
        buf = DecodeBuffers(w, R, columns, device, w.embed.dtype)
    idx = torch.tensor(rows, dtype=torch.long, device=device)
    for (k, v), kc, vc in zip(kv, buf.k, buf.v):                              # each prompt's K/V into its rows
        kc[:R, :, :Lp] = k.index_select(0, idx)                                  # a workspace may hold more rows
        vc[:R, :, :Lp] = v.index_select(0, idx)
    del kv
    buf.bias[:R, :Lp].masked_fill_(mask.index_select(0, idx).bool(), 0.0)    # left padding stays -inf
    buf.pos[:R] = start.index_select(0, idx)
    logits = logits0.index_select(0, idx)
    if on_cuda:
        torch.cuda.synchronize(device)                                         # times, not queued work
    stats.update(prefill_rows=prompts["input_ids"].shape[0], prefill_s=time.perf_counter() - t0)

    t0 = time.perf_counter()
    vocab = w.lm_head.shape[0]
    sampler = Sampler(vocab, R, T, device, backbone.suppress_token_ids, do_sample, temperature, top_p, top_k,
                      generator, row_seeds)
    eos = torch.tensor(sorted(set(backbone.eos_token_ids)), dtype=torch.long, device=device)
    out_tok = torch.full((R + 1, T), backbone.pad_token_id, dtype=torch.long, device=device)   # row R: trash
    out_lp = torch.zeros(R + 1, T, dtype=torch.float32, device=device)
    slot_rows = torch.arange(R, device=device)
    done = torch.zeros(R, dtype=torch.bool, device=device)
    B, steps = R, 0
    stats["buckets"].append(B)
    with _step_threads(w, R, device):
        for t in range(T):
            if t > 0:
                col = Lp + t - 1                                                   # where the input token's K/V go
                span = span_of(col, buf.bias.shape[1])
                if static:
                    buf.col.fill_(col)
                if graphs is not None:
                    logits = graphs(B, span)
                else:
                    logits = decode_step(w, buf, B, col, static=static, span=span)
                buf.pos[:B] += 1
                steps += 1
            tok, lp = sampler(logits, slot_rows, t)
            out_tok[:, t].index_copy_(0, slot_rows, tok)
            out_lp[:, t].index_copy_(0, slot_rows, lp)
            if t == T - 1:
                break
            done |= torch.isin(tok, eos)
            live = int((~done).sum())                                              # the one host sync per step
            if live == 0:
                break
            buf.tokens[:B] = tok
            if compaction and bucket_size(live, R) < B:
                keep = (~done).nonzero()[:, 0]
                buf.compact(keep)
                B = bucket_size(live, R)
                slot_rows = torch.cat([slot_rows[keep], slot_rows.new_full((B - live,), R)])
                done = torch.cat([done.new_zeros(live), done.new_ones(B - live)])
                stats["compactions"] += 1
                stats["buckets"].append(B)
    stats.update(decode_steps=steps, graph_captures=graphs.captures - captures0 if graphs is not None else 0)
    eos_set = set(backbone.eos_token_ids)
    ids_out, lps = [], []
    for r, row in enumerate(out_tok[:R, : steps + 1].tolist()):
        n = next((i + 1 for i, tid in enumerate(row) if tid in eos_set), len(row))
        ids_out.append(row[:n])
        lps.append(out_lp[r, :n])
    stats["decode_s"] = time.perf_counter() - t0
    return DecodeOutput(ids_out, lps, stats)


_WORKSPACES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # language model -> Workspace


def workspace(model, w: StepWeights, rows: int, columns: int, positions: int, mrope: bool, device) -> Workspace:
    """The model's decode workspace (decode_step.Workspace), refreshed with this call's weights `w`; built
    (or rebuilt, freeing the old one first, at the larger of each size) when the call does not fit it. In
    training the rows (prompts x G) and columns (max_prompt_length + max_new_tokens) are fixed by the
    config, so one workspace, and one capture per (bucket, span), serves the run."""
    key = language_model(model)
    ws = _WORKSPACES.get(key)
    if ws is not None and ws.fits(w, rows, columns, positions, device, w.embed.dtype):
        ws.refresh(w)
        return ws
    if ws is not None:
        rows, columns, positions = max(rows, ws.rows), max(columns, ws.length), max(positions, ws.positions)
        release_workspace(model)
        ws = None                                          # the old buffers go before the new ones exist
    _WORKSPACES[key] = ws = Workspace(w, model, rows, columns, max(positions, columns), mrope, device, w.embed.dtype)
    return ws


def release_workspace(model) -> None:
    """Free the model's decode workspace (KV buffers, fused weight copies, captured CUDA graphs); the next
    CUDA decode call builds it again and re-captures. `model`: the policy model or a Backbone."""
    _WORKSPACES.pop(language_model(model if isinstance(model, torch.nn.Module) else model.model), None)
