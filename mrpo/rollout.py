"""Prompts in, scored completions out: prompt encoding (once per step), generation, rewards, and the
per-token MRPO step tensors that the loss needs.

A step's prompts are encoded once (images loaded, image processor run) into one batch of DISTINCT
prompts; the rollout decodes G rows per prompt from it (mrpo.decoding: our decode loop prefills each
prompt once and copies its KV into its rows) and every log-prob / loss pass selects its rows from that same
batch (`Backbone.select_rows`), so pixel values are computed once per step.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from mrpo_kernels import LossInputs, step_token_weights

from mrpo import decoding
from mrpo.algo.advantages import compute_advantages
from mrpo.distributed import all_gather_rows, all_reduce_max, all_reduce_sum
from mrpo.errors import UserInputError
from mrpo.data.records import load_record_images
from mrpo.eval.reasoning import ffp_stage, first_failure_index
from mrpo.models.backbone import PromptTooLongError
from mrpo.rewards import custom_reward_metrics, judge_metrics
from mrpo.rewards.steps import (reasoning_tags, special_token_ids, special_token_strings, token_offsets,
                                token_step_index)

log = logging.getLogger("mrpo")


def first_failure_stage(valid: list[bool]) -> str | None:
    """early / mid / late by First Failure Point = first invalid index / K; None if no invalid step."""
    first = first_failure_index(valid)
    return None if first is None else ffp_stage(first, len(valid))


class PromptPool:
    """A split's records, encoded for the backbone; over-long prompts are found once and skipped.

    records: the split; backbone: the policy's Backbone; data_cfg: cfg.data; device: where batches go."""

    def __init__(self, records: list[dict], backbone, data_cfg, device: torch.device):
        self.records, self.backbone, self.cfg, self.device = records, backbone, data_cfg, device
        self.too_long: set[str] = set()     # ids of over-long prompts (skipped)
        self.fits_ok: set[str] = set()      # ids whose prompt length was checked

    def encode(self, records: list[dict]) -> dict:
        """Left-padded prompt batch (input ids, masks, pixel values, grid sizes; 0..n images per record,
        data.prompt_template) on the device."""
        images = [load_record_images(r, self.cfg.max_pixels) for r in records]
        batch = self.backbone.encode_prompts([r["problem"] for r in records], images,
                                             max_prompt_length=self.cfg.max_prompt_length,
                                             prompt_template=self.cfg.prompt_template)
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def fits(self, rec: dict) -> bool:
        """Whether the record's prompt (text + image tokens) fits data.max_prompt_length; checked once per
        id; a misfit is counted (the first few named) or, with data.on_bad_row=error, raises."""
        if rec["id"] in self.fits_ok:
            return True
        if rec["id"] in self.too_long:
            return False
        try:
            self.encode([rec])
        except PromptTooLongError as err:
            if self.cfg.on_bad_row == "error":
                raise UserInputError(f"record {rec['id']}: {err} (data.on_bad_row=error; shorten the question, "
                                     f"raise data.max_prompt_length or lower data.max_pixels, or set "
                                     f"data.on_bad_row=skip)") from None
            self.too_long.add(rec["id"])
            if len(self.too_long) <= 5:
                log.warning("skipping over-long prompt %s (%s tokens > data.max_prompt_length=%d)",
                            rec["id"], err.lengths[0] if err.lengths else "?", self.cfg.max_prompt_length)
            return False
        self.fits_ok.add(rec["id"])
        return True

    def usable(self, indices: list[int], count: int) -> list[dict]:
        """`count` records starting from `indices`, an over-long prompt replaced by the next usable one."""
        n = len(self.records)
        chosen: list[int] = []
        for i in itertools.chain(indices, ((indices[-1] + k) % n for k in range(1, n))):
            if len(chosen) == count:
                break
            if i not in chosen and self.fits(self.records[i]):
                chosen.append(i)
        if len(chosen) < count:
            raise UserInputError(f"only {len(chosen)} of {n} training prompts fit data.max_prompt_length="
                                 f"{self.cfg.max_prompt_length} (text + image tokens; {len(self.too_long)} too "
                                 f"long, e.g. {sorted(self.too_long)[:3]}), {count} are needed per step: raise "
                                 f"data.max_prompt_length or lower data.max_pixels")
        return [self.records[i] for i in chosen]


@dataclass
class Rollout:
    """G completions for each of a rank's P prompts (group-major), scored, with per-token step tensors."""
    prompts: dict                    # the step's encoded prompt batch (P rows)
    prompt_row: list[int]            # per completion: its row in `prompts`
    records: list[dict]              # per completion (prompt records repeated G times)
    completion_ids: list[list[int]]
    advantages: torch.Tensor | None = None   # [n] fp32, set after the (global) advantage computation
    step_index: list[torch.Tensor] | None = None   # per completion [T_i] int32 (-1 outside steps)
    num_steps: list[int] | None = None
    step_valid: list[torch.Tensor] | None = None   # per completion [T_i] bool
    answer_correct: list[bool] | None = None
    old_logprobs: list[torch.Tensor] | None = None
    ref_logprobs: list[torch.Tensor] | None = None
    sample_logprobs: list[torch.Tensor] | None = None   # per completion [T_i] fp32: under the sampling distribution
    decode_stats: dict | None = None                     # the decoder's path and stats (mrpo.decoding.Generation)
    _diff: list = field(default_factory=list, repr=False)   # (seqs, |sampled - trainer| [N]) of the first pass

    @property
    def lengths(self) -> list[int]:
        return [len(c) for c in self.completion_ids]

    def note_trainer_logprobs(self, seqs: list[int], logprobs: torch.Tensor) -> None:
        """The trainer's log-probs [N] (packed, on its device) of the completions `seqs`, from the loss's
        forward: kept as |sampled - trainer| (no host sync) when no old log-prob pass ran, only the first
        time each completion is seen (later iterations run on updated weights)."""
        if self.sample_logprobs is None or self.old_logprobs is not None or any(
                i in done for done, _ in self._diff for i in seqs):
            return
        sampled = torch.cat([self.sample_logprobs[i] for i in seqs]).to(logprobs.device)
        self._diff.append((list(seqs), (sampled - logprobs.detach().float()).abs()))

    def logprob_diff_metrics(self, device: torch.device) -> dict:
        """rollout/logprob_diff_mean and _max: |log-prob under the sampling distribution - the trainer's| over
        all ranks' completion tokens, from the step's first log-prob pass: the old log-probs when
        algo.num_iterations > 1, else the first iteration's loss forward (note_trainer_logprobs); the
        reference pass (loss.beta > 0) is not the policy's. NaN when nothing was sampled (e.g. warm-up).
        Every rank calls it (one all-reduce of the sums, one of the max)."""
        if self.sample_logprobs is not None and self.old_logprobs is not None:
            diffs = [(s.float() - o.float()).abs() for s, o in zip(self.sample_logprobs, self.old_logprobs)]
        else:
            diffs = [d for _, d in self._diff]
        flat = torch.cat([d.to(device) for d in diffs]) if diffs else torch.zeros(0, device=device)
        sums = torch.stack([flat.double().sum(), torch.tensor(float(flat.numel()), device=device, dtype=torch.float64)])
        peak = flat.double().max() if flat.numel() else torch.tensor(float("-inf"), device=device, dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            comm = device if device.type == "cuda" else torch.device("cpu")
            sums, peak = sums.to(comm), peak.reshape(1).to(comm)
            dist.all_reduce(sums)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        total, count = sums.tolist()
        peak = float(peak.max())
        return {"rollout/logprob_diff_mean": total / count if count else float("nan"),
                "rollout/logprob_diff_max": peak if count else float("nan")}

    def loss_inputs(self, seqs: list[int], token_weights: torch.Tensor | None, device: torch.device) -> LossInputs:
        """Packed loss inputs of the completions `seqs` (in that order); token_weights: [N] or None."""
        lengths = torch.tensor([len(self.completion_ids[i]) for i in seqs])

        def per_token(values) -> torch.Tensor:   # one value per sequence -> one per token
            return torch.as_tensor(values).repeat_interleave(lengths)

        def packed(per_seq):
            return None if per_seq is None else torch.cat([per_seq[i] for i in seqs])

        cu = torch.zeros(len(seqs) + 1, dtype=torch.long)
        cu[1:] = lengths.cumsum(0)
        return LossInputs(
            targets=torch.tensor([t for i in seqs for t in self.completion_ids[i]], dtype=torch.long),
            advantages=per_token(self.advantages[seqs]), step_index=packed(self.step_index),
            num_steps=per_token([self.num_steps[i] for i in seqs]).int(), step_valid=packed(self.step_valid),
            answer_correct=per_token([self.answer_correct[i] for i in seqs]), cu_seqlens=cu,
            token_weights=token_weights, old_logprobs=packed(self.old_logprobs),
            ref_logprobs=packed(self.ref_logprobs)).to(device)


@torch.no_grad()
def sample_groups(engine, backbone, pool: PromptPool, prompts: list[dict], rollout_cfg,
                  seed: tuple | None = None) -> Rollout:
    """G = rollout.group_size sampled completions per prompt (group-major): the DISTINCT prompts are
    encoded once for the whole step and decoded into G rows each (mrpo.decoding.generate, rollout.decode)
    in the engine's generation() context (weights gathered once, no collective per token). seed: (run
    seed, step): the loop seeds each row from it, the prompt's id and the sample's index in the group (a
    prompt's completions do not depend on its rank or its call's other prompts; a resumed run draws the same
    completions); the hf path seeds the call from it and the prompts' ids; None = the global RNG. The
    sampled tokens' log-probs are kept (sample_logprobs)."""
    batch = pool.encode(prompts)
    rows = [i for i in range(len(prompts)) for _ in range(rollout_cfg.group_size)]
    backbone.model.eval()
    with engine.generation():
        out = decoding.generate(
            backbone, batch, rows, decode=rollout_cfg.decode, max_new_tokens=rollout_cfg.max_new_tokens,
            temperature=rollout_cfg.temperature, top_p=rollout_cfg.top_p, top_k=rollout_cfg.top_k, do_sample=True,
            seed=None if seed is None else decoding.call_seed(*seed, *(r["id"] for r in prompts)),
            row_seeds=None if seed is None else decoding.group_row_seeds(seed, [r["id"] for r in prompts], rows),
            gathered=decoding.weights_gathered(engine), synced_gpus=dist.is_initialized() and dist.get_world_size() > 1)
    backbone.model.train()
    return Rollout(batch, rows, [prompts[i] for i in rows], out.completion_ids, sample_logprobs=out.logprobs,
                   decode_stats={"path": out.path, **out.stats})


def score(rollout: Rollout, reward_model, tokenizer) -> tuple[list, dict]:
    """Rewards of every completion and its per-token step tensors (set on `rollout`).
    Returns (scored completions, rollout metrics)."""
    texts, offsets = zip(*(token_offsets(tokenizer, ids) for ids in rollout.completion_ids))
    special = special_token_strings(tokenizer, keep=reasoning_tags(reward_model.tag))   # EOS, pad, <|im_end|>, ...
    special_ids = special_token_ids(tokenizer, special)
    scored, stats = reward_model.score(list(texts), rollout.records, special_tokens=special)
    rollout.step_index, rollout.step_valid, rollout.num_steps = [], [], []
    for s, offs, ids in zip(scored, offsets, rollout.completion_ids):
        if s.step_valid is None:   # unjudged: every token keeps the plain advantage
            idx = [-1] * len(offs)
            valid = torch.zeros(len(offs), dtype=torch.bool)
        else:   # special tokens belong to no step: plain advantage
            idx = token_step_index(offs, s.steps, special=[int(t) in special_ids for t in ids])
            step_ok = torch.tensor(s.step_valid + [False], dtype=torch.bool)
            valid = step_ok[torch.tensor(idx, dtype=torch.long)]   # index -1 hits the padding False
        rollout.step_index.append(torch.tensor(idx, dtype=torch.int32))
        rollout.step_valid.append(valid)
        rollout.num_steps.append(len(s.steps))
    rollout.answer_correct = [s.answer_correct for s in scored]
    return scored, rollout_metrics(scored, stats, rollout.completion_ids)


def rollout_metrics(scored, stats: dict, completion_ids) -> dict:
    n = len(scored)
    wrong_judged = [s for s in scored if not s.answer_correct and s.step_valid is not None and s.steps]
    failed = [st for st in (first_failure_stage(s.step_valid) for s in wrong_judged) if st is not None]
    processed = [s.r_process for s in scored if s.r_process is not None]
    return {
        "reward": sum(s.total for s in scored) / n,
        "reward/answer": sum(s.r_answer for s in scored) / n,
        "reward/process": sum(processed) / len(processed) if processed else float("nan"),
        "reward/length": sum(s.r_length for s in scored) / n,
        "accuracy": sum(s.answer_correct for s in scored) / n,
        "num_steps": sum(len(s.steps) for s in scored) / n,
        "completion_len": sum(len(c) for c in completion_ids) / n,
        "early_failure_share": failed.count("early") / len(failed) if failed else float("nan"),
        **judge_metrics(stats),
        **custom_reward_metrics(scored, stats),
    }


@dataclass(frozen=True)
class MicroBatch:
    """The completions (indices into the rollout, in packing order) of one forward (+ backward).

    filler: a zero-weight micro-batch that only keeps the ranks' collectives matched (see
    pad_micro_batches): its loss is multiplied by token weights 0 and its log-probs are dropped."""
    seqs: list[int]
    filler: bool = False


def pad_micro_batches(micro: list[list[int]], count: int, lengths: list[int]) -> list[MicroBatch]:
    """`micro` followed by filler micro-batches up to `count` (the largest micro-batch count of any rank).

    Under FSDP2 / DeepSpeed ZeRO-3 every forward and backward is a sequence of collectives (parameter
    all-gathers, gradient reduce-scatters, the vision-filler all-reduce), so every rank must run the same
    number of them, whatever its own token-budget or count split gave. A filler forwards this rank's
    shortest sequence (lengths: tokens per sequence) with weight 0: it adds exactly 0 to the gradients."""
    shortest = min(range(len(lengths)), key=lengths.__getitem__)
    return [MicroBatch(seqs) for seqs in micro] + [MicroBatch([shortest], filler=True)] * (count - len(micro))


def micro_batches(lengths: list[int], max_seqs: int, max_tokens: int = 0) -> list[list[int]]:
    """Consecutive groups of sequence indices: at most `max_seqs` sequences and, when max_tokens > 0,
    at most `max_tokens` tokens (lengths: tokens per sequence; a longer sequence goes alone)."""
    out: list[list[int]] = []
    cur: list[int] = []
    tokens = 0
    for i, n in enumerate(lengths):
        if cur and (len(cur) >= max_seqs or (max_tokens and tokens + n > max_tokens)):
            out.append(cur)
            cur, tokens = [], 0
        cur.append(i)
        tokens += n
    if cur:
        out.append(cur)
    return out


def rank_micro_batches(rollout: Rollout, cfg, device: torch.device) -> list[MicroBatch]:
    """This rank's micro-batches (by count / loss.max_tokens_per_micro_batch), then zero-weight fillers
    up to the largest count on any rank: every rank runs the same collectives (pad_micro_batches)."""
    prompt_len = rollout.prompts["attention_mask"].sum(-1).tolist()
    lengths = [prompt_len[r] + n for r, n in zip(rollout.prompt_row, rollout.lengths)]
    micro = micro_batches(lengths, cfg.optim.per_device_batch_size, cfg.loss.max_tokens_per_micro_batch)
    return pad_micro_batches(micro, all_reduce_max(len(micro), device), lengths)


def rank_token_weights(rollout: Rollout, cfg, grad_world: int, device: torch.device) -> list[torch.Tensor]:
    """Per completion, its tokens' loss weights [T_i]: loss.loss_agg over all tokens/sequences of the step
    on all ranks, times `grad_world`, the ranks that gradient reduction averages over."""
    lengths = rollout.lengths
    total_tokens, total_seqs = all_reduce_sum([sum(lengths), sum(n > 0 for n in lengths)], device)
    w = step_token_weights(torch.tensor(lengths), cfg.loss.loss_agg, total_tokens=int(total_tokens),
                           total_seqs=int(total_seqs), max_completion_length=cfg.rollout.max_new_tokens,
                           scale=float(grad_world))
    return list(w.split(lengths))


def global_advantages(rewards: torch.Tensor, cfg, columns, rank: int, device: torch.device) -> torch.Tensor:
    """This rank's advantages [n] from its unweighted reward matrix [n, R] (RewardModel.reward_matrix,
    NaN = missing; columns: RewardModel.columns, (name, weight) pairs), computed over every rank's
    completions (GDPO's and scale=batch's batch statistics are global; group statistics are unchanged
    since groups never span ranks)."""
    n = rewards.shape[0]
    everyone = all_gather_rows(rewards.double(), device)
    method = "grpo" if cfg.algo.name == "mrpo" else cfg.algo.name   # MRPO: GRPO advantages, shaped
    weights = torch.tensor([w for _, w in columns], dtype=torch.float64)
    adv = compute_advantages(everyone, cfg.rollout.group_size, method=method, scale=cfg.algo.advantage_scale,
                             weights=weights)
    return adv[rank * n:(rank + 1) * n].float()


def loss_kwargs(cfg, direct_backward: bool) -> dict:
    """mrpo_loss keyword arguments of the run config (engine.direct_backward: see Engine)."""
    c = cfg.loss
    return dict(eps_low=c.eps_low, eps_high=c.eps_high, beta=c.beta, temperature=c.temperature,
                loss_agg=c.loss_agg, max_completion_length=cfg.rollout.max_new_tokens,
                shaping="mrpo" if cfg.algo.name == "mrpo" else "none",
                valid_step_credit=cfg.algo.valid_step_credit, backend=c.backend, chunk_size=c.chunk_size,
                unit_grad_output=direct_backward, validate=False)   # no host syncs


def gold_rollout(pool: PromptPool, records: list[dict], tokenizer, tag: str, eos: int) -> Rollout:
    """The gold rationale + answer of each record as its one completion, for the supervised warm-up:
    advantage 1, no steps, answer right (the fused loss then gives the cross-entropy gradient)."""
    targets = [tokenizer.encode(f"<{tag}>{r['gold_reasoning']}</{tag}><answer>{r['solution']}</answer>",
                                add_special_tokens=False) + [eos] for r in records]
    return Rollout(pool.encode(records), list(range(len(records))), records, targets,
                   advantages=torch.ones(len(records)),
                   step_index=[torch.full((len(c),), -1, dtype=torch.int32) for c in targets],
                   num_steps=[0] * len(records), step_valid=[torch.zeros(len(c), dtype=torch.bool) for c in targets],
                   answer_correct=[True] * len(records))


@torch.no_grad()
def greedy_texts(engine, backbone, pool: PromptPool, records: list[dict], max_new_tokens: int, batch_size: int,
                 stop, decode: str = "loop") -> list[str] | None:
    """Greedy completions of `records` (decoded with special tokens kept, the final EOS dropped, as
    mrpo.infer writes them, so it never joins the last step of truncated reasoning), the work split over
    ranks (rank r takes records[r::world]) and gathered back in order on every rank. stop(): polled before
    each batch (all ranks agree); None when it fired. decode: rollout.decode (mrpo.decoding; the loop runs
    no collective, generate's fallback runs in lockstep: every rank makes the same number of calls)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    mine, texts = records[rank::world], []
    eos = set(backbone.eos_token_ids)
    with engine.generation():
        for b in range(math.ceil(len(records) / world / batch_size)):   # same number of generate calls per rank
            if stop():
                return None
            chunk = mine[b * batch_size:(b + 1) * batch_size]
            chunk_or_filler = chunk or records[:1]   # a rank without records of its own still makes the call
            ids = decoding.generate(backbone, pool.encode(chunk_or_filler), list(range(len(chunk_or_filler))), decode=decode,
                                    max_new_tokens=max_new_tokens, do_sample=False,
                                    gathered=decoding.weights_gathered(engine), synced_gpus=world > 1).completion_ids
            if chunk:
                texts.extend(backbone.tokenizer.decode(i[:-1] if i and i[-1] in eos else i, skip_special_tokens=False)
                             for i in ids)
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, texts)
        texts = [gathered[i % world][i // world] for i in range(len(records))]
    return texts


_JUDGE_THREAD = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mrpo-judge")


def in_background(fn, *args) -> concurrent.futures.Future:
    """Run fn(*args) on the judge thread (HTTP judge calls, reward computation) while the caller's thread
    keeps the accelerator busy with the old/reference log-prob passes. Its .result() is (fn's value,
    seconds it ran) and re-raises fn's exception."""
    def timed():
        t0 = time.perf_counter()
        return fn(*args), time.perf_counter() - t0

    return _JUDGE_THREAD.submit(timed)
