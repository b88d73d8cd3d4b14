"""Which decoder serves a generation call (rollouts, the trainer's evaluation, mrpo.infer), and the call.

rollout.decode (and `python -m mrpo.infer --decode`):
  loop             the default: our decode loop, mrpo.models.decode.decode_groups (each distinct prompt
                   prefilled once and its KV copied into its rows, one preallocated KV cache, finished rows
                   compacted out in bucketed batch sizes, CUDA graphs per bucket on CUDA). Where it cannot
                   serve the model or the options (decode.unsupported_reason), or where the weights are not
                   gathered for generation (sharded with distributed.gather_for_generation=false: every
                   token would all-gather, so the ranks must step in lockstep, which only generate's
                   synced_gpus does), the call falls back to `hf` with a one-time warning naming why.
  hf               transformers' generate, dynamic KV cache: the reference path. `eager` is its old name.
  static           generate with a pre-allocated static KV cache (Backbone.decode_kwargs).
  static_compiled  static cache + torch.compile'd decode step (CUDA graphs) on CUDA; `static` elsewhere.

The loop's CUDA workspace (KV buffers, fused weight copies, captured graphs; decode.workspace) is kept
between calls with unsharded weights (graphs captured once per run) and freed after each call when the
weights are sharded (FSDP2 / ZeRO-3 over several ranks: gathered anew each rollout).

Both paths return each token's log-prob under the distribution it was drawn from (temperature, top-k,
top-p and the vision-token suppression applied; greedy: log_softmax of the suppressed logits): the
rollout-vs-trainer mismatch metric (mrpo.rollout.Rollout.logprob_diff_metrics) compares them with the
trainer's first log-prob pass.

Seeds: the loop seeds each ROW (`group_row_seeds`: call_seed of the run seed, the step, the prompt's id
and the sample's index within its group; decode.row_uniforms), so a prompt's G completions are the same
whichever rank or call it lands in and whatever other prompts share the call, a resumed run draws the
completions an unbroken one drew, and nothing that ran before in the process matters. The hf path is
seeded per CALL (`call_seed` of the run seed, the step and the prompts' ids, seeding the global RNG around
generate, whose noise is drawn for the whole batch): the same call gives the same completions, but the
same prompt in another split of the prompts over ranks draws differently.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field

import torch
from transformers.generation import (
    LogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mrpo.models.hf_generate import warn_once

DECODE_CHOICES = ("loop", "hf", "eager", "static", "static_compiled")
HF_PATH = {"hf": "eager", "eager": "eager", "static": "static", "static_compiled": "static_compiled"}


@dataclass
class Generation:
    """completion_ids: one per requested row, cut after (and including) the first EOS; logprobs: per row
    [T_i] fp32 on the CPU (see module docstring); path: "loop" or "hf:<eager|static|static_compiled>";
    stats: the loop's DecodeOutput.stats ({} on the hf path)."""
    completion_ids: list[list[int]]
    logprobs: list[torch.Tensor]
    path: str
    stats: dict = field(default_factory=dict)


def call_seed(*parts) -> int:
    """A 63-bit seed from ints / strings (stable across processes and Python runs, unlike hash())."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def group_row_seeds(seed: tuple, prompt_ids: list, rows: list[int]) -> list[int]:
    """One seed per output row: call_seed(*seed, id of the row's prompt, k) where k counts the earlier rows
    of the same prompt id (0..G-1 for a group; a prompt id repeated in one call continues the count)."""
    seen: dict = {}
    out = []
    for r in rows:
        pid = prompt_ids[r]
        k = seen[pid] = seen.get(pid, -1) + 1
        out.append(call_seed(*seed, pid, k))
    return out


def weights_gathered(engine) -> bool:
    """Whether engine.generation() gathers the whole model once (no collective inside a forward):
    distributed.gather_for_generation (default true); an engine without a config gathers nothing to
    begin with."""
    dist_cfg = getattr(getattr(engine, "cfg", None), "distributed", None)
    return bool(getattr(dist_cfg, "gather_for_generation", True))


def fallback_reason(backbone, decode: str, *, gathered: bool = True, **options) -> str | None:
    """None when `decode` runs our loop; else why it runs generate (only for decode=loop, see module docstring)."""
    if decode != "loop":
        return None
    if not gathered and backbone._is_sharded(backbone.model):
        return ("the weights are sharded and not gathered for generation (distributed.gather_for_generation="
                "false): each token's all-gather needs the ranks in lockstep, as generate's synced_gpus runs them")
    from mrpo.models import decode as decode_loop

    return decode_loop.unsupported_reason(backbone, backbone.model, **options)


def generate(backbone, prompts: dict, rows: list[int], *, decode: str = "loop", max_new_tokens: int,
             do_sample: bool = True, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             seed: int | None = None, row_seeds: list[int] | None = None, gathered: bool = True,
             synced_gpus: bool = False) -> Generation:
    """Completions of `rows` (for each output row, the row of `prompts` it continues) of the DISTINCT
    encoded prompts `prompts` (Backbone.encode_prompts / PromptPool.encode: P rows, left-padded, with
    their images). Run it inside engine.generation() when the model is sharded.

    decode: rollout.decode (module docstring); seed: the call's sampling seed (None: the global RNG);
    row_seeds: one seed per row (group_row_seeds), used by the loop instead of `seed` (hf uses `seed`);
    gathered: weights_gathered(engine); synced_gpus: the hf path's lockstep over ranks (only needed when
    a forward runs collectives)."""
    if decode not in DECODE_CHOICES:
        raise ValueError(f"rollout.decode={decode!r}: expected one of {', '.join(DECODE_CHOICES)}")
    options = dict(do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k)
    why = fallback_reason(backbone, decode, gathered=gathered, **options)
    if decode == "loop" and why is None:
        from mrpo.models import decode as decode_loop

        generator = None
        if seed is not None and row_seeds is None:
            generator = torch.Generator(device=backbone.model.device).manual_seed(seed)
        out = decode_loop.decode_groups(backbone, prompts, list(rows), max_new_tokens=max_new_tokens,
                                        generator=generator, row_seeds=row_seeds, **options)
        if backbone._is_sharded(backbone.model):
            # the loop's CUDA workspace (decode.workspace) pays off when its graphs are replayed in the next
            # call; weights gathered anew for each rollout need not be at the addresses the graphs read, so
            # it would be re-captured anyway: free its KV buffers and fused copies for the log-prob and
            # train phases (unsharded weights stay put: their workspace is kept and counted in the plan)
            decode_loop.release_workspace(backbone.model)
        return Generation(out.completion_ids, [lp.float().cpu() for lp in out.logprobs], "loop", dict(out.stats))
    if why is not None:   # one message per reason per process
        warn_once(f"rollout.decode=loop: {why}; generating with transformers' generate instead (rollout.decode=hf)")
    hf = HF_PATH.get(decode, "eager")
    rows = list(rows)
    batch = prompts if rows == list(range(len(next(iter(prompts.values()))))) else backbone.select_rows(prompts, rows)
    with _seeded(seed, lambda: backbone.model.device):
        ids, logprobs = hf_generate(backbone, batch, max_new_tokens, decode=hf, synced_gpus=synced_gpus, **options)
    return Generation(ids, logprobs, f"hf:{hf}")


class _SampledLogprobs(LogitsProcessor):
    """The last logits processor of a generate call: keeps log_softmax of the step's final scores (the
    distribution the token is drawn from) and, at the next step, reads the drawn token (input_ids[:, -1])
    off it. Holds one [rows, V] fp32 buffer, not one per step as output_scores would."""

    def __init__(self):
        self.prev: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []   # per decoded position [rows]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prev is not None:
            self.steps.append(self.prev.gather(1, input_ids[:, -1:].to(self.prev.device))[:, 0])
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def per_row(self, completions: list[list[int]]) -> list[torch.Tensor]:
        """[T_i] fp32 CPU log-probs of each completion (its ids as generate drew them)."""
        if self.prev is None:
            return [torch.zeros(0) for _ in completions]
        n, T = len(completions), len(self.steps) + 1                        # n: a vision filler row is dropped
        last = torch.tensor([c[T - 1] if len(c) >= T else 0 for c in completions], device=self.prev.device)
        table = torch.stack([s[:n] for s in self.steps] + [self.prev[:n].gather(1, last[:, None])[:, 0]], dim=1)
        table = table.cpu()                                                 # [n, T]
        return [table[i, : len(c)].clone() for i, c in enumerate(completions)]


def hf_generate(backbone, batch: dict, max_new_tokens: int, *, decode: str = "eager", do_sample: bool = True,
                temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, synced_gpus: bool = False
                ) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Backbone.generate of an encoded batch (one completion per row) and each token's sampling log-prob.
    The warpers run as our own processors, in generate's order (temperature, top-k, top-p, as generate
    builds them), followed by _SampledLogprobs: the same distribution, so the same tokens for a seed."""
    warpers = []
    if do_sample:
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k > 0:
            warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    recorder = _SampledLogprobs()
    ids = backbone.generate(batch, max_new_tokens=max_new_tokens, do_sample=do_sample, synced_gpus=synced_gpus,
                            decode=decode, logits_processors=[*warpers, recorder])
    return ids, recorder.per_row(ids)


@contextlib.contextmanager
def _seeded(seed: int | None, device):
    """The global torch RNG (the CPU's, and the CUDA device()'s) seeded with `seed` inside, restored after."""
    if seed is None:
        yield
        return
    device = device()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
