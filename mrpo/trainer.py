"""The MRPO trainer: rollout -> rewards/judge -> advantages + step tensors -> fused loss -> optimizer.

One RL step on each rank:
  1. take `prompts_per_rank` records, roll out G completions each (HF generate, KV cache);
  2. score them (answer, process = step judge, length, format) and compute group advantages;
  3. map each completion's steps to its tokens (step index, K, validity, answer correctness);
  4. `num_iterations` passes of micro-batches: hidden states from the backbone (lm_head not run),
     fused MRPO loss with the lm_head weight, backward; clip, AdamW, scheduler.
`algo.name` (mrpo | grpo | gdpo | dr_grpo) changes only the advantage and the shaping.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import platform
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from mrpo_kernels import fused_linear_mrpo_loss, linear_logprobs

from mrpo import checkpoint as ckpt
from mrpo.algo.advantages import compute_advantages
from mrpo.config import Config
from mrpo.data.records import load_record_images, load_records
from mrpo.data.synthetic import generate_synthetic
from mrpo.eval.reasoning import evaluate_generations, ffp_stage, first_failure_index
from mrpo.judges import build_judge
from mrpo.models.backbone import PromptTooLongError
from mrpo.models.load import load_backbone
from mrpo.models.parallelize import (
    apply_fsdp2,
    freeze_vision_tower,
    hidden_states_mode,
    init_distributed,
    install_passthrough_head,
)
from mrpo.models.tiny import build_tiny
from mrpo.rewards import RewardModel
from mrpo.rewards.steps import token_offsets, token_step_index

log = logging.getLogger("mrpo")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ADVANTAGE_METHOD = {"mrpo": "grpo", "grpo": "grpo", "gdpo": "gdpo", "dr_grpo": "dr_grpo"}


@dataclass
class Rollout:
    """G completions for each of a rank's prompts, scored, with per-token MRPO step tensors."""
    records: list[dict]          # one per completion (prompt records repeated G times, group-major)
    completion_ids: list[list[int]]
    advantages: torch.Tensor     # [n] fp32, one per completion
    step_index: list[torch.Tensor]   # per completion [T_i] int32
    num_steps: list[int]
    step_valid: list[torch.Tensor]   # per completion [T_i] bool
    answer_correct: list[bool]
    old_logprobs: list[torch.Tensor] | None = None
    ref_logprobs: list[torch.Tensor] | None = None


class PromptSampler:
    """Deterministic per-rank prompt order: a seeded permutation per epoch, a global position."""

    def __init__(self, n: int, seed: int, shuffle: bool, rank: int, world: int):
        self.n, self.seed, self.shuffle, self.rank, self.world = n, seed, shuffle, rank, world
        self.epoch, self.position = 0, 0

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next(self, per_rank: int) -> list[int]:
        need = per_rank * self.world
        if self.position + need > self.n:
            self.epoch, self.position = self.epoch + 1, 0
        order = self._order()
        start = self.position + self.rank * per_rank
        self.position += need
        return order[start:start + per_rank]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


def first_failure_stage(valid: list[bool]) -> str | None:
    """early / mid / late by First Failure Point = first invalid index / K; None if no invalid step."""
    first = first_failure_index(valid)
    return None if first is None else ffp_stage(first, len(valid))


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.rank, self.world, self.device = init_distributed()
        self.is_main = self.rank == 0
        self.out = Path(cfg.output_dir)
        self.stop_requested = False
        torch.manual_seed(cfg.seed + self.rank)
        random.seed(cfg.seed + self.rank)
        np.random.seed(cfg.seed + self.rank)

        per_rank = cfg.optim.per_device_batch_size * cfg.optim.grad_accum_steps
        self.completions_per_rank = per_rank
        self.prompts_per_rank = per_rank // cfg.rollout.group_size
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(cfg.to_yaml())
            (self.out / "versions.json").write_text(json.dumps(_versions(), indent=1))
        self._barrier()

        self.train_records, self.test_records = self._load_data()
        self.backbone = self._load_backbone()
        self.model = self.backbone.model
        self.reasoning_tag = cfg.model.reasoning_tag or self.backbone.reasoning_tag
        self.ref_model = self._load_reference() if cfg.loss.beta > 0 else None
        self._parallelize()

        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.adam_betas),
                                           eps=cfg.optim.adam_eps, weight_decay=cfg.optim.weight_decay)
        self.ds = None   # DeepSpeed ZeRO: wraps the model, the reference and the AdamW together
        if self.world > 1 and cfg.distributed.engine == "deepspeed":
            from mrpo.models.deepspeed_engine import ZeROEngine

            self.ds = ZeROEngine(self.model, self.optimizer, cfg, self.device, ref_model=self.ref_model)
            self.optimizer = self.ds.optimizer
        self.total_steps = self._total_steps()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.ds.base_optimizer if self.ds is not None else self.optimizer, self._lr_lambda)
        self.sampler = PromptSampler(len(self.train_records), cfg.seed, cfg.data.shuffle, self.rank, self.world)

        self.judge = build_judge(cfg.judge)
        self.reward_model = RewardModel(cfg.reward, self.judge, self.reasoning_tag, cfg.algo.tau)
        self.step = 0
        self.sft_done = cfg.sft.steps == 0
        self.too_long: set[str] = set()     # ids of over-long prompts (skipped)
        self.prompt_ok: set[str] = set()     # ids whose prompt length was checked
        self._metrics_file = None
        self._tb = None
        self._wandb = None

    # ------------------------------------------------------------------ setup
    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def _load_data(self) -> tuple[list[dict], list[dict]]:
        cfg = self.cfg.data
        train_path, test_path = cfg.train_path, cfg.test_path
        if train_path is None:
            if self.is_main:
                generate_synthetic(cfg.synthetic_dir, cfg.synthetic_train, cfg.synthetic_test, cfg.synthetic_seed)
            self._barrier()
            train_path = Path(cfg.synthetic_dir) / "train.jsonl"
            test_path = test_path or Path(cfg.synthetic_dir) / "test.jsonl"
        strict = cfg.on_bad_row == "error"
        train, report = load_records(train_path, strict=strict)
        self._report_bad_rows(train_path, report)
        test: list[dict] = []
        if test_path is not None:
            test, test_report = load_records(test_path, strict=strict)
            self._report_bad_rows(test_path, test_report)
        if len(train) < self.prompts_per_rank * self.world:
            raise ValueError(f"{train_path}: {len(train)} usable training records, but one step needs "
                             f"{self.prompts_per_rank * self.world} prompts")
        return train, test

    def _report_bad_rows(self, path, report) -> None:
        if self.is_main and getattr(report, "skipped", 0):
            log.warning("%s: skipped %d bad rows (first: %s)", path, report.skipped,
                        getattr(report, "examples", [])[:5])

    def _model_path(self) -> Path:
        cfg = self.cfg.model
        if cfg.path is not None:
            return Path(cfg.path)
        path = Path(self.cfg.data.synthetic_dir).parent / "models" / f"tiny_{cfg.family}_seed{cfg.tiny_seed}"
        if self.is_main:
            build_tiny(cfg.family, path, seed=cfg.tiny_seed)
        self._barrier()
        return path

    def _load_backbone(self):
        cfg = self.cfg.model
        self.model_path = self._model_path()
        backbone = load_backbone(self.model_path, family=cfg.family, dtype=DTYPES[cfg.dtype],
                                 attn_implementation=cfg.attn_implementation, device=self.device)
        backbone.max_pixels = self.cfg.data.max_pixels
        install_passthrough_head(backbone.model)
        if cfg.freeze_vision:
            freeze_vision_tower(backbone.model)
        if cfg.gradient_checkpointing:
            backbone.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        backbone.model.train()
        return backbone

    def _load_reference(self):
        ref = load_backbone(self.model_path, family=self.cfg.model.family, dtype=DTYPES[self.cfg.model.dtype],
                            attn_implementation=self.cfg.model.attn_implementation, device=self.device).model
        install_passthrough_head(ref)
        ref.requires_grad_(False).eval()
        return ref

    def _parallelize(self) -> None:
        cfg = self.cfg.distributed
        if self.world == 1 or cfg.engine == "none":
            return
        if cfg.engine == "deepspeed":
            return   # ZeROEngine wraps the model together with its optimizer (__init__)
        param_dtype = DTYPES[cfg.param_dtype] if self.device.type == "cuda" else torch.float32
        reduce_dtype = DTYPES[cfg.reduce_dtype]
        apply_fsdp2(self.model, self.device, param_dtype, reduce_dtype)
        if self.ref_model is not None:
            apply_fsdp2(self.ref_model, self.device, param_dtype, reduce_dtype)

    def _total_steps(self) -> int:
        if self.cfg.optim.max_steps is not None:
            return self.cfg.optim.max_steps
        per_step = self.prompts_per_rank * self.world
        return max(1, self.cfg.optim.epochs * len(self.train_records) // per_step)

    def _lr_lambda(self, step: int) -> float:
        warm = self.cfg.optim.warmup_steps
        if step < warm:
            return (step + 1) / warm
        if self.cfg.optim.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, self.total_steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    # ------------------------------------------------------------------ rollout + scoring
    def _images(self, records: list[dict]) -> list[list]:
        return [load_record_images(r, self.cfg.data.max_pixels) for r in records]

    def _encode(self, records: list[dict]) -> dict:
        batch = self.backbone.encode_prompts([r["problem"] for r in records], self._images(records),
                                             max_prompt_length=self.cfg.data.max_prompt_length,
                                             prompt_template=self.cfg.data.prompt_template)
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _prompt_fits(self, rec: dict) -> bool:
        """Whether the record's prompt (text + image tokens) fits data.max_prompt_length; checked once per
        id; a misfit is counted (the first few named) or, with data.on_bad_row=error, raises."""
        if rec["id"] in self.prompt_ok:
            return True
        if rec["id"] in self.too_long:
            return False
        try:
            self._encode([rec])
        except PromptTooLongError as err:
            if self.cfg.data.on_bad_row == "error":
                raise ValueError(f"record {rec['id']}: {err}") from None
            self.too_long.add(rec["id"])
            if len(self.too_long) <= 5:
                log.warning("skipping over-long prompt %s (%s tokens > data.max_prompt_length=%d)",
                            rec["id"], err.lengths[0] if err.lengths else "?", self.cfg.data.max_prompt_length)
            return False
        self.prompt_ok.add(rec["id"])
        return True

    def _usable_prompts(self, indices: list[int]) -> list[dict]:
        """The records at `indices`, an over-long prompt replaced by the next usable record of the data set."""
        n = len(self.train_records)
        chosen: list[int] = []
        for i in itertools.chain(indices, ((indices[-1] + k) % n for k in range(1, n))):
            if len(chosen) == self.prompts_per_rank:
                break
            if i not in chosen and self._prompt_fits(self.train_records[i]):
                chosen.append(i)
        if len(chosen) < self.prompts_per_rank:
            raise ValueError(f"only {len(chosen)} training prompts fit data.max_prompt_length="
                             f"{self.cfg.data.max_prompt_length}; {self.prompts_per_rank} are needed per step")
        return [self.train_records[i] for i in chosen]

    def _generation_context(self):
        """DeepSpeed ZeRO-3: gather the policy once for generate instead of every layer at every token."""
        if self.ds is not None and self.cfg.distributed.gather_for_generation:
            return self.ds.gathered_for_generation()
        return contextlib.nullcontext()

    @torch.no_grad()
    def rollout(self, prompt_records: list[dict]) -> tuple[list[dict], list[list[int]]]:
        """G completions per prompt (group-major): records repeated, completion token ids."""
        g = self.cfg.rollout.group_size
        records = [r for r in prompt_records for _ in range(g)]
        self.model.eval()
        with self._generation_context():
            ids = self.backbone.generate(self._encode(records), max_new_tokens=self.cfg.rollout.max_new_tokens,
                                         temperature=self.cfg.rollout.temperature, top_p=self.cfg.rollout.top_p,
                                         do_sample=True, synced_gpus=self.world > 1)
        self.model.train()
        return records, ids

    def score(self, records: list[dict], completion_ids: list[list[int]]) -> tuple[Rollout, dict]:
        texts, offsets = zip(*(token_offsets(self.backbone.tokenizer, ids) for ids in completion_ids))
        scored, stats = self.reward_model.score(list(texts), records)
        rewards = self.reward_model.reward_matrix(scored)
        advantages = compute_advantages(rewards, self.cfg.rollout.group_size,
                                        method=ADVANTAGE_METHOD[self.cfg.algo.name],
                                        scale=self.cfg.algo.advantage_scale)
        step_index, step_valid, num_steps = [], [], []
        for s, offs in zip(scored, offsets):
            if s.step_valid is None:   # unjudged: every token keeps the plain advantage
                idx = [-1] * len(offs)
                valid = torch.zeros(len(offs), dtype=torch.bool)
            else:
                idx = token_step_index(offs, s.steps)
                step_ok = torch.tensor(s.step_valid + [False], dtype=torch.bool)
                valid = step_ok[torch.tensor(idx, dtype=torch.long)]   # index -1 hits the padding False
            step_index.append(torch.tensor(idx, dtype=torch.int32))
            step_valid.append(valid)
            num_steps.append(len(s.steps))
        rollout = Rollout(records, list(completion_ids), advantages.float(), step_index, num_steps, step_valid,
                          [s.answer_correct for s in scored])
        return rollout, self._rollout_metrics(scored, stats, completion_ids)

    def _rollout_metrics(self, scored, stats: dict, completion_ids) -> dict:
        n = len(scored)
        wrong_judged = [s for s in scored if not s.answer_correct and s.step_valid is not None and s.steps]
        stages = [first_failure_stage(s.step_valid) for s in wrong_judged]
        failed = [st for st in stages if st is not None]
        processed = [s.r_process for s in scored if s.r_process is not None]
        m = {
            "reward": sum(s.total for s in scored) / n,
            "reward/answer": sum(s.r_answer for s in scored) / n,
            "reward/process": sum(processed) / len(processed) if processed else float("nan"),
            "reward/length": sum(s.r_length for s in scored) / n,
            "accuracy": sum(s.answer_correct for s in scored) / n,
            "num_steps": sum(len(s.steps) for s in scored) / n,
            "completion_len": sum(len(c) for c in completion_ids) / n,
            "early_failure_share": failed.count("early") / len(failed) if failed else float("nan"),
            "unjudged": float(stats.get("unjudged", 0)),
        }
        return m

    # ------------------------------------------------------------------ log-probs and loss
    def _micro_batches(self, n: int) -> list[list[int]]:
        size = self.cfg.optim.per_device_batch_size
        return [list(range(i, min(n, i + size))) for i in range(0, n, size)]

    def _hidden(self, model, records: list[dict], completions: list[list[int]]):
        """Packed completion hidden states [N, D], targets [N], cu_seqlens [B+1] and the lm_head weight."""
        runner = self.ds.runner(model) if self.ds is not None else model   # DeepSpeed: through the engine
        with hidden_states_mode(model):
            hidden, targets, cu = self.backbone.completion_hidden_states(self._encode(records), completions,
                                                                         model=runner)
        # read after the forward: under FSDP2 the root's parameters are unsharded (full) only from then on;
        # under ZeRO-3 the weight is gathered here (and kept so until backward when autograd is on)
        weight = self.ds.lm_head_weight(model) if self.ds is not None else model.get_output_embeddings().weight
        return hidden, targets.to(self.device), cu.to(self.device), weight

    @torch.no_grad()
    def _logprobs(self, model, rollout: Rollout) -> list[torch.Tensor]:
        out = []
        for mb in self._micro_batches(len(rollout.records)):
            hidden, targets, cu, weight = self._hidden(model, [rollout.records[i] for i in mb],
                                                       [rollout.completion_ids[i] for i in mb])
            lp = linear_logprobs(hidden, weight, targets, temperature=self.cfg.loss.temperature,
                                 backend=self.cfg.loss.backend)
            out.extend(lp[cu[j]:cu[j + 1]].float().cpu() for j in range(len(mb)))
        return out

    def forward_backward(self, rollout: Rollout, mb: list[int], loss_scale: float) -> dict:
        """Loss of one micro-batch, backward scaled by loss_scale; returns detached metrics."""
        cfg = self.cfg.loss
        hidden, targets, cu, weight = self._hidden(self.model, [rollout.records[i] for i in mb],
                                                   [rollout.completion_ids[i] for i in mb])
        lengths = torch.tensor([len(rollout.completion_ids[i]) for i in mb])

        def per_token(per_seq: list) -> torch.Tensor:   # one value per sequence -> one per token
            return torch.tensor(per_seq).repeat_interleave(lengths).to(self.device)

        def packed(values):   # per-token tensors of the micro-batch's sequences, concatenated
            return torch.cat(values).to(self.device) if values else None

        adv = rollout.advantages[mb].repeat_interleave(lengths).to(self.device)
        loss, metrics = fused_linear_mrpo_loss(
            hidden, weight, targets, adv,
            packed([rollout.step_index[i] for i in mb]),
            per_token([rollout.num_steps[i] for i in mb]).int(),
            packed([rollout.step_valid[i] for i in mb]),
            per_token([rollout.answer_correct[i] for i in mb]), cu,
            old_logprobs=packed([rollout.old_logprobs[i] for i in mb]) if rollout.old_logprobs else None,
            ref_logprobs=packed([rollout.ref_logprobs[i] for i in mb]) if rollout.ref_logprobs else None,
            eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta, temperature=cfg.temperature,
            loss_agg=cfg.loss_agg, max_completion_length=self.cfg.rollout.max_new_tokens,
            shaping="mrpo" if self.cfg.algo.name == "mrpo" else "none",
            backend=cfg.backend, chunk_size=cfg.chunk_size)
        self._backward(loss * loss_scale)
        return {"loss": loss.item(), "clip_fraction": float(metrics["clip_fraction"]),
                "kl": float(metrics["kl"]), "tokens": int(targets.numel())}

    def _backward(self, loss: torch.Tensor) -> None:
        if self.ds is not None:
            self.ds.backward(loss)   # engine.backward; releases the gathered lm_head weight
        else:
            loss.backward()

    def _optimizer_step(self) -> tuple[float, bool]:
        """Clip and step; a non-finite gradient norm skips the step and keeps the weights."""
        if self.ds is not None:   # DeepSpeed clips (gradient_clipping) and skips non-finite steps itself
            norm, ok = self.ds.step()
            if not ok:
                log.warning("step %d: non-finite gradient norm (%s), update skipped, weights untouched",
                            self.step, norm)
            return norm, ok
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.max_grad_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        norm = float(norm)
        ok = math.isfinite(norm)
        if ok:
            self.optimizer.step()
        else:
            log.warning("step %d: non-finite gradient norm (%s), update skipped, weights untouched", self.step, norm)
        self.optimizer.zero_grad(set_to_none=True)
        return norm, ok

    # ------------------------------------------------------------------ steps
    def train_step(self) -> dict:
        t0 = time.perf_counter()
        prompts = self._usable_prompts(self.sampler.next(self.prompts_per_rank))
        records, ids = self.rollout(prompts)
        t1 = time.perf_counter()
        rollout, metrics = self.score(records, ids)
        if os.environ.get("MRPO_FAULT_KILL_AT_STEP") == str(self.step + 1):   # fault injection for resume tests
            os.kill(os.getpid(), signal.SIGKILL)
        t2 = time.perf_counter()
        if self.cfg.algo.num_iterations > 1:
            rollout.old_logprobs = self._logprobs(self.model, rollout)
        if self.ref_model is not None:
            rollout.ref_logprobs = self._logprobs(self.ref_model, rollout)
        t3 = time.perf_counter()
        losses, clip, kl, grad_norms, tokens, skipped = [], [], [], [], 0, 0
        t_opt = 0.0
        micro = self._micro_batches(len(records))
        for _ in range(self.cfg.algo.num_iterations):
            for mb in micro:
                m = self.forward_backward(rollout, mb, 1.0 / len(micro))
                if not math.isfinite(m["loss"]):
                    skipped += 1
                losses.append(m["loss"]); clip.append(m["clip_fraction"]); kl.append(m["kl"])
                tokens += m["tokens"]
            t_o = time.perf_counter()
            if skipped:
                log.warning("step %d: non-finite loss in %d micro-batches, update skipped", self.step, skipped)
                self.optimizer.zero_grad(set_to_none=True)
            else:
                norm, ok = self._optimizer_step()
                grad_norms.append(norm)
                skipped += not ok
            t_opt += time.perf_counter() - t_o
        self.scheduler.step()
        t4 = time.perf_counter()
        gen_tokens = sum(len(c) for c in ids)
        metrics.update({
            "loss": sum(losses) / len(losses), "clip_fraction": sum(clip) / len(clip), "kl": sum(kl) / len(kl),
            "grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
            "lr": self.scheduler.get_last_lr()[0], "skipped_updates": float(skipped),
            "time/generate": t1 - t0, "time/judge": t2 - t1, "time/logprobs": t3 - t2,
            "time/loss_backward": t4 - t3 - t_opt, "time/optimizer": t_opt, "time/step": t4 - t0,
            "tokens_per_s": gen_tokens / (t4 - t0), "skipped_long_prompts": float(len(self.too_long)),
        })
        return self._all_reduce_mean(metrics)

    def _all_reduce_mean(self, metrics: dict) -> dict:
        if not dist.is_initialized():
            return metrics
        keys = sorted(metrics)
        vals = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
        finite = torch.isfinite(vals)
        count = finite.double()
        vals = torch.where(finite, vals, torch.zeros_like(vals))
        if self.device.type == "cuda":
            vals, count = vals.to(self.device), count.to(self.device)
        dist.all_reduce(vals)
        dist.all_reduce(count)
        mean = (vals / count).cpu().tolist()
        out = {k: (v if c > 0 else float("nan")) for k, v, c in zip(keys, mean, count.cpu().tolist())}
        out["tokens_per_s"] = out["tokens_per_s"] * self.world   # throughput adds up over ranks
        return out

    def sft_warmup(self) -> None:
        """Supervised warm-up on gold rationales, through the same fused loss (A = 1 gives the CE gradient)."""
        cfg = self.cfg.sft
        tok = self.backbone.tokenizer
        tag = self.reasoning_tag
        eos = self.backbone.eos_token_ids[0]
        sampler = PromptSampler(len(self.train_records), self.cfg.seed + 1, True, self.rank, self.world)
        if self.ds is None:
            opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=cfg.lr)
        else:   # ZeRO: the engine's optimizer, set up as a fresh AdamW(lr=sft.lr) clipped at 1.0
            opt = self.ds.warmup_optimizer(lr=cfg.lr, max_grad_norm=1.0)
        per_rank = max(1, cfg.batch_size // self.world)
        bar = self._progress(cfg.steps, "sft")
        for step in range(cfg.steps):
            records = [self.train_records[i] for i in sampler.next(per_rank)]
            targets = [tok.encode(f"<{tag}>{r['gold_reasoning']}</{tag}><answer>{r['solution']}</answer>",
                                  add_special_tokens=False) + [eos] for r in records]
            hidden, tgt, cu, weight = self._hidden(self.model, records, targets)
            n = tgt.numel()
            zeros_i = torch.zeros(n, dtype=torch.int32, device=self.device)
            loss, m = fused_linear_mrpo_loss(
                hidden, weight, tgt, torch.ones(n, device=self.device), zeros_i - 1, zeros_i,
                torch.zeros(n, dtype=torch.bool, device=self.device), torch.ones(n, dtype=torch.bool, device=self.device),
                cu, loss_agg="token-mean", shaping="none", backend=self.cfg.loss.backend)
            self._backward(loss)
            if self.ds is None:
                torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            nll = -float(m["logprobs"].mean())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(nll=f"{nll:.3f}")
            if self.is_main and (step % 10 == 0 or step == cfg.steps - 1):
                self._write_metrics({"phase": "sft", "sft_step": step, "sft_nll": nll})
        if bar is not None:
            bar.close()
        if self.ds is not None:
            opt.close()
        del opt
        self.sft_done = True

    # ------------------------------------------------------------------ loop
    def train(self) -> dict:
        self._install_signal_handlers()
        self._resume()
        if not self.sft_done:
            self.sft_warmup()
            self.save()
        if self.cfg.logging.eval_at_start and self.step == 0:
            self.evaluate("start")
        bar = self._progress(self.total_steps, "mrpo" if self.cfg.algo.name == "mrpo" else self.cfg.algo.name)
        if bar is not None:
            bar.update(self.step)
        last = {}
        while self.step < self.total_steps and not self.stop_requested:
            last = self.train_step()
            self.step += 1
            last["step"] = self.step
            if self.is_main:
                self._write_metrics(last)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{last['reward']:.3f}", acc=f"{last['accuracy']:.2f}",
                                early=f"{last['early_failure_share']:.2f}", tok_s=f"{last['tokens_per_s']:.0f}")
            self._sync_stop_flag()
            every = self.cfg.checkpoint.every_steps
            if (every and self.step % every == 0) or self.stop_requested:
                self.save()
            ev = self.cfg.logging.eval_every
            if ev and self.step % ev == 0 and self.step < self.total_steps:
                self.evaluate(f"step_{self.step:06d}")
        if bar is not None:
            bar.close()
        if self.stop_requested:
            log.warning("stopped by signal at step %d; checkpoint saved, rerun with checkpoint.resume=auto", self.step)
            return last
        self.save()
        if self.cfg.checkpoint.export_final:
            self.export(self.out / "final_model")
        if self.cfg.logging.eval_at_end:
            last.update({f"eval/{k}": v for k, v in self.evaluate("final").items()})
        return last

    def save(self) -> Path:
        state = {"step": self.step, "sft_done": self.sft_done, "sampler": self.sampler.state_dict(),
                 "scheduler": self.scheduler.state_dict()}
        if self.ds is not None:
            return self.ds.save(self.out / "checkpoints", self.step, state, keep_last=self.cfg.checkpoint.keep_last)
        return ckpt.save_checkpoint(self.out / "checkpoints", self.step, self.model, self.optimizer, state,
                                    keep_last=self.cfg.checkpoint.keep_last)

    def _resume(self) -> None:
        path = ckpt.resolve_resume(self.cfg.checkpoint.resume, self.out / "checkpoints")
        if path is None:
            return
        if self.ds is not None:
            state = self.ds.load(path)
        else:
            state = ckpt.load_checkpoint(path, self.model, self.optimizer)
        self.step, self.sft_done = state["step"], state["sft_done"]
        self.sampler.load_state_dict(state["sampler"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.is_main:
            log.info("resumed from %s (step %d)", path, self.step)

    def export(self, out_dir: Path) -> None:
        """Hugging Face folder (safetensors, config, tokenizer, image processor) of the current policy."""
        if self.ds is not None:   # consolidated on rank 0 (None elsewhere)
            state = self.ds.full_state_dict()
        else:
            state = ckpt.full_model_state_dict(self.model)
        if self.is_main:
            self.backbone.save(out_dir, state_dict=state)
        self._barrier()

    @torch.no_grad()
    def evaluate(self, tag: str) -> dict:
        """Greedy generation on the held-out split, answer accuracy and First Failure Point shares."""
        records = self.test_records[: self.cfg.logging.eval_limit] if self.cfg.logging.eval_limit else self.test_records
        records = [r for r in records if self._prompt_fits(r)]
        if not records:
            return {}
        mine = records[self.rank::self.world]
        self.model.eval()
        texts = []
        bs = max(1, self.cfg.optim.per_device_batch_size * 4)
        n_batches = math.ceil(len(records) / self.world / bs)
        with self._generation_context():
            for b in range(n_batches):   # same number of generate calls on every rank (synced_gpus)
                chunk = mine[b * bs:(b + 1) * bs] or records[:1]
                ids = self.backbone.generate(self._encode(chunk), max_new_tokens=self.cfg.rollout.max_new_tokens,
                                             temperature=1.0, do_sample=False, synced_gpus=self.world > 1)
                if mine[b * bs:(b + 1) * bs]:
                    texts.extend(self.backbone.tokenizer.decode(i, skip_special_tokens=False) for i in ids)
        self.model.train()
        if dist.is_initialized():   # rank r generated records[r::world]: gather them back in order
            gathered = [None] * self.world
            dist.all_gather_object(gathered, texts)
            texts = [gathered[i % self.world][i // self.world] for i in range(len(records))]
        if not self.is_main:
            self._barrier()   # wait for rank 0's scoring and writing, so no rank runs ahead
            return {}
        eval_dir = self.out / "eval" / tag
        summary = evaluate_generations(records, texts, self.judge, self.reasoning_tag, out_dir=eval_dir)
        (eval_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        flat = {k: v for k, v in summary.items() if isinstance(v, (int, float))}
        self._write_metrics({"phase": "eval", "tag": tag, "step": self.step, **flat})
        log.info("eval %s: accuracy %.3f, early-failure share %.3f (%d wrong answers judged)", tag,
                    summary["accuracy"], summary["early_failure_share"], summary["wrong_judged"])
        self._barrier()
        return flat

    # ------------------------------------------------------------------ logging
    def _progress(self, total: int, desc: str):
        if not (self.is_main and self.cfg.logging.progress):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, dynamic_ncols=True)

    def _write_metrics(self, metrics: dict) -> None:
        if self._metrics_file is None:
            self._metrics_file = open(self.out / "metrics.jsonl", "a")
        self._metrics_file.write(json.dumps({"time": time.time(), **metrics}) + "\n")
        self._metrics_file.flush()
        if "step" not in metrics or metrics.get("phase") is not None:
            return
        scalars = {k: v for k, v in metrics.items()
                   if isinstance(v, (int, float)) and k != "step" and math.isfinite(v)}
        if self.cfg.logging.tensorboard:
            if self._tb is None:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out / "tensorboard"))
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, metrics["step"])
        if self.cfg.logging.wandb:
            if self._wandb is None:
                try:
                    import wandb
                except ImportError:
                    raise RuntimeError("logging.wandb=true needs `pip install wandb`") from None
                self._wandb = wandb.init(project="mrpo", name=self.out.name, dir=str(self.out),
                                         config=self.cfg.to_dict())
            self._wandb.log(scalars, step=metrics["step"])

    def _sync_stop_flag(self) -> None:
        """Every rank stops (and saves) at the same step if any rank got SIGTERM/SIGINT."""
        if dist.is_initialized():
            flag = torch.tensor([float(self.stop_requested)], device=self.device if self.device.type == "cuda" else "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.stop_requested = bool(flag.item())

    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):
            log.warning("signal %d: saving a checkpoint after this step", signum)
            self.stop_requested = True

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def close(self) -> None:
        if self._metrics_file is not None:
            self._metrics_file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if dist.is_initialized():
            dist.barrier()   # no rank tears the process group down while another still uses it
            dist.destroy_process_group()


def _versions() -> dict:
    import transformers
    import triton

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "platform": platform.platform()}
