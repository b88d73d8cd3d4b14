"""The MRPO trainer: the loop and the RL step. Everything engine-specific lives in mrpo/engines/.

One RL step on each rank (`train_step`, read it top-down):
  1. take `prompts_per_rank` prompts, encode them once, roll out G completions each (engine.generation());
  2. score them (answer, process = step judge, length, format) and map each completion's steps to its
     tokens (step index, K, validity, answer correctness);
  3. advantages over the global batch (all ranks' completions);
  4. old log-probs (num_iterations > 1) and reference log-probs (beta > 0);
  5. per-token loss weights normalised over the whole step (all micro-batches, all ranks), so the
     objective does not depend on micro-batching or world size;
  6. micro-batches by count / token budget, as many on every rank (zero-weight fillers): hidden states
     from the backbone (lm_head not run), fused MRPO loss with the lm_head weight, backward (gradients
     synced on the last micro-batch only);
     engine.step() clips, skips a non-finite update, steps.
`algo.name` (mrpo | grpo | gdpo | dr_grpo) changes only the advantage, the shaping and the aggregation.
"""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
from mrpo_kernels import linear_logprobs, mrpo_loss

from mrpo import build, checkpoint
from mrpo.config import Config
from mrpo.data.sampler import PromptSampler
from mrpo.distributed import all_reduce_mean, shutdown, warnings_once
from mrpo.engines import build_engine
from mrpo.eval.reasoning import evaluate_over_ranks
from mrpo.judges import build_judge, clean_judge
from mrpo.judges.outage import UnjudgedGuard
from mrpo.judges.spend import JUDGE_STOPS, USAGE_KEYS, JudgeSpend
from mrpo.metrics_log import MetricsLogger
from mrpo.models.lora import adapters_disabled
from mrpo.models.parallelize import hidden_states_mode, init_distributed
from mrpo.plan import check_at_startup, compare_measured
from mrpo.plan_measure import PhaseMemory
from mrpo.rewards import COUNT_METRICS, RewardModel
from mrpo.run_safety import GracefulStop
from mrpo.rollout import (MicroBatch, PromptPool, Rollout, first_failure_stage, global_advantages, gold_rollout,
                          greedy_texts, in_background, loss_kwargs, rank_micro_batches, rank_token_weights,
                          sample_groups, score)

log = logging.getLogger("mrpo")

__all__ = ["Trainer", "PromptSampler", "first_failure_stage"]


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.rank, self.world, self.device = init_distributed(cfg.distributed.timeout_s)
        self.is_main = self.rank == 0
        self.out = Path(cfg.output_dir)
        self.stop = GracefulStop()   # SIGTERM/SIGINT: every phase polls it; a checkpoint within the grace
        self.stop_phase, self.stop_why_not, self._save_s = "training", None, 10.0
        self.metrics = MetricsLogger(self.out, cfg, is_main=self.is_main)
        for seed_fn in (torch.manual_seed, random.seed, np.random.seed):
            seed_fn(cfg.seed + self.rank)
        self.prompts_per_rank = cfg.optim.per_device_batch_size * cfg.optim.grad_accum_steps // cfg.rollout.group_size
        build.write_run_files(cfg, self.out, self.is_main)

        train, test = build.load_splits(cfg, self.is_main, self.prompts_per_rank * self.world)
        self.model_path = build.model_path(cfg, self.is_main)
        self.memory_plan = check_at_startup(cfg, self.model_path, self.world, self.device, self.is_main, log.info)
        self.phase_memory = PhaseMemory(self.device)   # per-phase peaks (CUDA), compared with the plan once
        self.backbone = build.load_policy(cfg, self.model_path, self.device)
        self.model = self.backbone.model
        self.reasoning_tag = self.backbone.reasoning_tag
        self.ref_model = build.load_reference(cfg, self.model_path, self.device)
        self.engine = build_engine(self.model, self.ref_model, cfg, self.device)
        self.pool = PromptPool(train, self.backbone, cfg.data, self.device)
        self.test_pool = PromptPool(test, self.backbone, cfg.data, self.device)
        self.test_pool.too_long = self.pool.too_long   # one count of skipped prompts
        self.total_steps = cfg.optim.max_steps or max(1, cfg.optim.epochs * len(train) // (self.prompts_per_rank * self.world))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.engine.lr_optimizer,
                                                           build.lr_schedule(cfg.optim, self.total_steps))
        self.sampler = PromptSampler(len(train), cfg.seed, cfg.data.shuffle, self.rank, self.world)
        self.judge = build_judge(cfg.judge)
        self.reward_model = RewardModel(cfg.reward, self.judge, self.reasoning_tag, cfg.algo.tau)
        self.judge_guard = UnjudgedGuard.from_config(cfg.judge, self.judge)
        self.judge_spend = JudgeSpend.from_config(cfg.judge)   # judge usage, cost and budget (judge.max_cost_usd)
        self.step, self.sft_step, self.sft_done = 0, 0, cfg.sft.steps == 0

    def _stop_synced(self) -> bool:
        """Whether any rank was asked to stop (all ranks agree)."""
        return self.stop.sync(self.device if self.device.type == "cuda" else None)

    # ------------------------------------------------------------------ the RL step
    def train_step(self) -> dict:
        cfg, t = self.cfg, [time.perf_counter()]
        prompts = self.pool.usable(self.sampler.next(self.prompts_per_rank), self.prompts_per_rank)
        with self.phase_memory.phase("rollout"):
            rollout = sample_groups(self.engine, self.backbone, self.pool, prompts, cfg.rollout, seed=(cfg.seed, self.step))
        t.append(time.perf_counter())
        judged = in_background(score, rollout, self.reward_model, self.backbone.tokenizer)   # overlaps the passes
        with self.phase_memory.phase("logprobs"):
            if cfg.algo.num_iterations > 1:
                rollout.old_logprobs = self.logprobs(self.model, rollout)
            if cfg.loss.beta > 0:
                rollout.ref_logprobs = self.reference_logprobs(rollout)
        t.append(time.perf_counter())
        weights, micro = self.step_token_weights(rollout), self.micro_batches(rollout)   # need no scores: still overlap
        (scored, metrics), judge_s = judged.result()
        rollout.advantages = self.global_advantages(self.reward_model.reward_matrix(scored))
        t.append(time.perf_counter())
        sums, norms, skipped = 0, [], 0
        with self.phase_memory.phase("train"):
            for _ in range(cfg.algo.num_iterations):
                sums = sums + self.accumulate_gradients(rollout, weights, micro)
                norm, applied = self.engine.step()
                norms.append(norm)
                skipped += not applied
        self.scheduler.step()
        t.append(time.perf_counter())
        loss_sum, clipped, kl = sums.tolist()   # one host sync for the step's loss metrics
        tokens = sum(rollout.lengths) * cfg.algo.num_iterations
        metrics.update({
            "loss": loss_sum / cfg.algo.num_iterations, "clip_fraction": clipped / max(tokens, 1),
            "kl": kl / max(tokens, 1), "grad_norm": sum(norms) / len(norms), "lr": self.scheduler.get_last_lr()[0],
            "skipped_updates": float(skipped), "micro_batches": float(sum(not mb.filler for mb in micro)),
            "filler_micro_batches": float(sum(mb.filler for mb in micro)),
            "time/generate": t[1] - t[0], "time/judge": judge_s, "time/logprobs": t[2] - t[1],
            "time/loss_backward": t[4] - t[3], "time/step": t[4] - t[0],
            "tokens_per_s": sum(rollout.lengths) * self.world / (t[4] - t[0]),
            "skipped_long_prompts": float(len(self.pool.too_long)),
            "padding_fraction": float(self.backbone.last_padding_fraction or 0.0),   # of the last training forward
            **rollout.logprob_diff_metrics(self.device)})
        return all_reduce_mean(metrics, self.device, summed=COUNT_METRICS + USAGE_KEYS + ("skipped_long_prompts",))

    def accumulate_gradients(self, rollout: Rollout, weights: list[torch.Tensor], micro: list[MicroBatch]) -> torch.Tensor:
        """Forward + backward of every micro-batch, fillers with token weights 0 (gradients synced on the
        last one only, the same index on every rank). Returns [3] float64 on the device: loss, clipped
        tokens, KL summed over the real tokens (no host sync)."""
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        for j, mb in enumerate(micro):
            hidden, weight = self.hidden_states(self.model, rollout, mb.seqs)
            token_weights = torch.cat([weights[i] for i in mb.seqs]) * float(not mb.filler)
            inputs = rollout.loss_inputs(mb.seqs, token_weights, self.device)
            loss, m = mrpo_loss(hidden, weight, inputs, **self.loss_kwargs())   # a filler's loss is exactly 0
            rollout.note_trainer_logprobs(mb.seqs, m["logprobs"])   # rollout vs trainer (first pass only)
            self.engine.backward(loss, sync=j == len(micro) - 1)
            n = inputs.targets.numel() * (not mb.filler)   # real tokens
            sums += torch.stack([loss.detach().double(), m["clip_fraction"].double() * n, m["kl"].double() * n])
        return sums

    def global_advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        return global_advantages(rewards, self.cfg, self.reward_model.columns, self.rank, self.device)

    def step_token_weights(self, rollout: Rollout) -> list[torch.Tensor]:
        return rank_token_weights(rollout, self.cfg, self.engine.grad_average_world, self.device)

    def micro_batches(self, rollout: Rollout) -> list[MicroBatch]:
        return rank_micro_batches(rollout, self.cfg, self.device)

    def loss_kwargs(self) -> dict:
        return loss_kwargs(self.cfg, self.engine.direct_backward)

    def hidden_states(self, model, rollout: Rollout, seqs: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed completion hidden states [N, D] of the completions `seqs` and the lm_head weight [V, D]."""
        batch = self.backbone.select_rows(rollout.prompts, [rollout.prompt_row[i] for i in seqs])
        with hidden_states_mode(model):   # loss.packing: one padding-free row, positions restart per sequence
            hidden, _, _ = self.backbone.completion_hidden_states(
                batch, [rollout.completion_ids[i] for i in seqs], self.engine.runner(model), self.cfg.loss.packing)
        return hidden, self.engine.lm_head_weight(model)   # read after the forward (gathered by then)

    @torch.no_grad()
    def logprobs(self, model, rollout: Rollout) -> list[torch.Tensor]:
        """Per completion, log-probs [T_i] of its tokens under `model` at the loss temperature."""
        out = []
        for mb in self.micro_batches(rollout):
            hidden, weight = self.hidden_states(model, rollout, mb.seqs)   # a filler's forward only keeps ranks in step
            if mb.filler:
                continue
            targets = torch.tensor([t for i in mb.seqs for t in rollout.completion_ids[i]], device=self.device)
            lp = linear_logprobs(hidden, weight, targets, temperature=self.cfg.loss.temperature,
                                 backend=self.cfg.loss.backend).float().cpu()
            out.extend(lp.split([len(rollout.completion_ids[i]) for i in mb.seqs]))
        return out

    def reference_logprobs(self, rollout: Rollout) -> list[torch.Tensor]:
        """Log-probs under the reference policy: the frozen copy, or with LoRA the policy without adapters."""
        if self.ref_model is not None:
            return self.logprobs(self.ref_model, rollout)
        with adapters_disabled(self.model):
            return self.logprobs(self.model, rollout)

    # ------------------------------------------------------------------ warm-up and loop
    def sft_warmup(self) -> None:
        """Supervised warm-up on gold rationales, through the same fused loss (A = 1 gives the CE gradient)."""
        cfg = self.cfg.sft
        sampler = PromptSampler(len(self.pool.records), self.cfg.seed + 1, True, self.rank, self.world)
        opt = self.engine.warmup_optimizer(lr=cfg.lr, max_grad_norm=1.0)
        per_rank = max(1, cfg.batch_size // self.world)
        for _ in range(self.sft_step):   # resumed mid-warm-up: the same prompts as an unbroken run
            sampler.next(per_rank)
        bar = build.progress_bar(cfg.steps, "sft", self.sft_step, self.is_main and self.cfg.logging.progress)
        for step in range(self.sft_step, cfg.steps):
            if self._stop_synced():
                self.stop_phase = "warm-up"
                break
            self.sft_step = step + 1
            rollout = gold_rollout(self.pool, self.pool.usable(sampler.next(per_rank), per_rank),
                                   self.backbone.tokenizer, self.reasoning_tag, self.backbone.eos_token_ids[0])
            seqs = list(range(len(rollout.records)))
            hidden, weight = self.hidden_states(self.model, rollout, seqs)
            loss, m = mrpo_loss(hidden, weight, rollout.loss_inputs(seqs, None, self.device), loss_agg="token-mean",
                                shaping="none", backend=self.cfg.loss.backend)
            self.engine.backward(loss)
            opt.step()
            if step % 10 == 0 or step == cfg.steps - 1:
                nll = -float(m["logprobs"].mean())
                bar.set_postfix(nll=f"{nll:.3f}")
                self.metrics.log({"phase": "sft", "sft_step": step, "sft_nll": nll})
            bar.update(1)
        bar.close()
        opt.close()
        self.sft_done = self.sft_step >= cfg.steps

    def train(self) -> dict:
        self.stop.install()
        self._resume()
        self.judge_spend.check()   # a resumed run whose judge budget is spent stops before its first step
        self._saved_at = (self.step, self.sft_step)   # nothing to save before some progress
        self.metrics.truncate_after(self.step, self.sft_done, self.sft_step)
        if not self.sft_done:
            self.sft_warmup()
            if self.sft_done:
                self.save()
        if self.cfg.logging.eval_at_start and self.step == 0 and not self.stop.stopping:
            self.evaluate("start")
        bar = build.progress_bar(self.total_steps, self.cfg.algo.name, self.step,
                                 self.is_main and self.cfg.logging.progress)
        last = {}   # every stop decision reads the synced flag (stop.stopping), so all ranks take it alike
        while self.step < self.total_steps and not self._stop_synced():
            self.stop_phase = "rollout"
            with warnings_once(self.device):   # every rank's reward / judge warnings printed once, by rank 0
                last = self.judge_spend.account(self.train_step())   # + the judge's cost so far
            if self.is_main and (line := compare_measured(self.memory_plan, self.phase_memory.peaks)):
                log.info(line)
            self.phase_memory.stop()   # first step only: later steps leave the allocator's peak counters alone
            self.step += 1
            last["step"] = self.step
            self.metrics.log(last)
            try:
                self.judge_guard.update_from_metrics(self.step, last)
                self.judge_spend.check()
            except JUDGE_STOPS:
                self.save()
                raise
            bar.update(1)
            bar.set_postfix(reward=f"{last['reward']:.3f}", acc=f"{last['accuracy']:.2f}",
                            early=f"{last['early_failure_share']:.2f}", tok_s=f"{last['tokens_per_s']:.0f}",
                            **self.judge_spend.postfix())
            every = self.cfg.checkpoint.every_steps
            if every and self.step % every == 0:
                self.save()
            ev = self.cfg.logging.eval_every
            if ev and self.step % ev == 0 and self.step < self.total_steps:
                self.evaluate(f"step_{self.step:06d}")   # returns at once when a stop is requested
        bar.close()
        if self.stop.stopping:
            if self._saved_at != (self.step, self.sft_step):   # progress since the last checkpoint
                self.stop_why_not = self.stop.save_in_grace(self.save, self._save_s, self.device)
            return last
        if self._saved_at != (self.step, self.sft_step):   # the last step is saved once
            self.save()
        if self.cfg.checkpoint.export_final and not self._stop_synced():
            self.stop_phase = "export"
            self.engine.export(self.backbone, self.out / "final_model", self.cfg.lora.merge_on_export)
        if self.cfg.logging.eval_at_end and not self._stop_synced():
            last.update({f"eval/{k}": v for k, v in self.evaluate("final").items()})
        return last

    # ------------------------------------------------------------------ checkpoints, export, evaluation
    def save(self) -> Path:
        t0 = time.perf_counter()
        state = {"step": self.step, "sft_done": self.sft_done, "sft_step": self.sft_step,
                 "sampler": self.sampler.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "judge_guard": self.judge_guard.state_dict(), "judge_spend": self.judge_spend.state_dict()}
        path = self.engine.save(self.out / "checkpoints", self.step, state, keep_last=self.cfg.checkpoint.keep_last)
        self._save_s = time.perf_counter() - t0
        if path is not None:   # None: skipped for want of disk space (logged); the next save point tries again
            self._saved_at = (self.step, self.sft_step)
        return path

    def _resume(self) -> None:
        path = checkpoint.resolve_resume(self.cfg.checkpoint.resume, self.out / "checkpoints")   # split over ranks
        if path is None:
            return
        state = self.engine.load(path)
        self.step = state["step"]
        self.sft_done, self.sft_step = state["sft_done"], state.get("sft_step", 0)
        self.judge_guard.load_state_dict(state.get("judge_guard", {}))
        self.judge_spend.load_state_dict(state.get("judge_spend", {}))
        self.sampler.load_state_dict(state["sampler"])
        self.scheduler.load_state_dict(state["scheduler"])

    @torch.no_grad()
    def evaluate(self, tag: str) -> dict:
        """Held-out greedy generation and step judging, both split over the ranks: accuracy and FFP shares."""
        limit = self.cfg.logging.eval_limit
        records = [r for r in self.test_pool.records[:limit or None] if self.test_pool.fits(r)]
        if not records:
            return {}
        self.model.eval()
        texts = greedy_texts(self.engine, self.backbone, self.test_pool, records, self.cfg.rollout.max_new_tokens,
                             batch_size=max(1, self.cfg.optim.per_device_batch_size * 4), stop=self._stop_synced,
                             decode=self.cfg.rollout.decode)
        self.model.train()
        if texts is None:
            self.stop_phase = "evaluation"
            log.warning("evaluation %s interrupted by a stop: nothing written", tag)
            return {}
        summary = evaluate_over_ranks(records, texts, clean_judge(self.judge), self.reasoning_tag,   # no noise in evaluation
                                      self.out / "eval" / tag)
        if summary is None:   # not rank 0: its share is judged and handed over
            return {}
        flat = {k: v for k, v in summary.items() if isinstance(v, (int, float))}
        self.metrics.log({"phase": "eval", "tag": tag, "step": self.step, **flat})
        log.info("eval %s: accuracy %.3f, early-failure share %.3f (%d wrong answers judged)", tag,
                 summary["accuracy"], summary["early_failure_share"], summary["wrong_judged"])
        return flat

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        self.metrics.close()
        self.stop.uninstall()
        shutdown()   # final barrier, unless this rank failed (mrpo.distributed.report_failure)

