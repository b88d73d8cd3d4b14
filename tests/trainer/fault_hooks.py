"""Test-only hooks for `mrpo.train` (MRPO_TEST_HOOK=tests.trainer.fault_hooks:<function>), called once with
the Trainer after it is built; they wrap trainer methods, so nothing test-specific runs in the hot path."""
import os
import signal


def sigkill_after_scoring(trainer):
    """SIGKILL this process right after the completions of step MRPO_FAULT_STEP are scored (mid-step)."""
    step = int(os.environ["MRPO_FAULT_STEP"])
    advantages = trainer.global_advantages

    def wrapped(rewards):
        if trainer.step + 1 == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return advantages(rewards)

    trainer.global_advantages = wrapped


def sigkill_during_save(trainer):
    """SIGKILL this process in the middle of writing the checkpoint of step MRPO_FAULT_STEP: the model and
    optimizer files are written, the trainer state and the COMPLETE marker are not."""
    step = int(os.environ["MRPO_FAULT_STEP"])
    save_weights = trainer.engine.save_weights

    def wrapped(folder):
        save_weights(folder)
        if trainer.step == step:
            os.kill(os.getpid(), signal.SIGKILL)

    trainer.engine.save_weights = wrapped


def disk_full(trainer):
    """Every file system reports 1 MiB free to shutil.disk_usage (what the space checks of checkpoints and
    the export read)."""
    import shutil

    real = shutil.disk_usage
    shutil.disk_usage = lambda path: real(path)._replace(free=2**20)


def raise_a_bug(trainer):
    """A plain ValueError from our own code at the first RL step (must keep its traceback)."""
    def broken(*args, **kwargs):
        raise ValueError("a bug in our code")

    trainer.train_step = broken


def record_prompts_and_check_load(trainer):
    """World-size tests: append each RL step's sampled prompt indices as a JSON line {"step", "rank",
    "indices"} to $MRPO_PROMPT_LOG.rank<r>; after a resume, compare the loaded model and optimizer state
    with the checkpoint's (read back whole with DCP's dcp_to_torch_save) and print 'rank R: loaded ok
    (P tensors, O optimizer states)' or raise naming the first difference."""
    import json

    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    log_path = f"{os.environ['MRPO_PROMPT_LOG']}.rank{trainer.rank}"
    sampler_next = trainer.sampler.next

    def next_prompts(per_rank):
        indices = sampler_next(per_rank)
        with open(log_path, "a") as f:
            f.write(json.dumps({"step": trainer.step + 1, "rank": trainer.rank, "indices": indices}) + "\n")
        return indices

    trainer.sampler.next = next_prompts
    load = trainer.engine.load

    def checked_load(path):
        state = load(path)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True) if dist.is_initialized() else None
        model_sd, optim_sd = get_state_dict(trainer.model, trainer.engine.optimizer, options=options)
        if trainer.rank == 0:
            whole = f"{log_path}.saved.pt"
            dcp_to_torch_save(str(path), whole)
            saved = torch.load(whole, weights_only=False)
            assert saved["model"].keys() == model_sd.keys(), sorted(saved["model"].keys() ^ model_sd.keys())[:5]
            for k, v in saved["model"].items():
                assert torch.equal(model_sd[k].float().cpu(), v.float()), f"model {k} differs from the checkpoint"
            n_states = 0
            for fqn, per_param in saved["optim"]["state"].items():
                for name, v in per_param.items():
                    assert torch.equal(torch.as_tensor(optim_sd["state"][fqn][name]).cpu(), torch.as_tensor(v)), \
                        f"optimizer {fqn}.{name} differs from the checkpoint"
                    n_states += torch.is_tensor(v) and v.numel() > 1 and bool(v.abs().sum() > 0)
            print(f"rank 0: loaded ok ({len(saved['model'])} tensors, {n_states} non-zero optimizer moments)",
                  flush=True)
        return state

    trainer.engine.load = checked_load


def completion_chars(completions):
    """A custom reward that differs between the completions of a group (their length in characters), so
    the tiny random policy gets non-zero advantages, gradients and AdamW moments."""
    return [float(len(c)) for c in completions]


# ----------------------------------------------------------------------------- one rank of several (torchrun)
# MRPO_FAULT_RANK (default 1) is the rank that gets the fault; MRPO_FAULT_STEP the RL step (1-based) it hits.


def _faulty_rank() -> bool:
    return os.environ.get("RANK", "0") == os.environ.get("MRPO_FAULT_RANK", "1")


def _signal_self(where: str) -> None:
    import sys

    print(f"MRPO_FAULT SIGTERM to rank {os.environ.get('RANK')} during {where}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)


def sigterm_one_rank(trainer):
    """SIGTERM to the faulty rank alone, in the phase MRPO_FAULT_PHASE, each time right after that phase's
    last synced stop check (the hard case: the other ranks learn of it only at the next one):
    warm-up: during the last warm-up step; rollout: after scoring step MRPO_FAULT_STEP; save: between the
    weights and the marker of the checkpoint of step MRPO_FAULT_STEP; evaluation: after the generation of
    the evaluation at step MRPO_FAULT_STEP, before its judging."""
    if not _faulty_rank():
        return
    phase, step = os.environ["MRPO_FAULT_PHASE"], int(os.environ.get("MRPO_FAULT_STEP", "1"))
    if phase == "warm-up":
        hidden_states = trainer.hidden_states

        def wrapped(*args):
            if not trainer.sft_done and trainer.sft_step == trainer.cfg.sft.steps:
                trainer.hidden_states = hidden_states
                _signal_self(phase)
            return hidden_states(*args)

        trainer.hidden_states = wrapped
    elif phase == "rollout":
        advantages = trainer.global_advantages

        def wrapped(rewards):
            if trainer.step + 1 == step:
                _signal_self(phase)
            return advantages(rewards)

        trainer.global_advantages = wrapped
    elif phase == "save":
        save_weights = trainer.engine.save_weights

        def wrapped(folder):
            save_weights(folder)
            if trainer.step == step:
                _signal_self(phase)

        trainer.engine.save_weights = wrapped
    elif phase == "evaluation":
        import mrpo.trainer

        evaluate = mrpo.trainer.evaluate_over_ranks

        def wrapped(*args):
            if trainer.step == step:
                _signal_self(phase)
            return evaluate(*args)

        mrpo.trainer.evaluate_over_ranks = wrapped
    else:
        raise ValueError(f"MRPO_FAULT_PHASE={phase!r}")


class InjectedBug(RuntimeError):
    pass


def raise_on_one_rank(trainer):
    """An unexpected exception on the faulty rank alone at RL step MRPO_FAULT_STEP, in MRPO_FAULT_PHASE:
    judge-thread (the scoring the judge thread runs, outside the judge's counted failures) or loss (the
    loss of the first micro-batch, while the other ranks go on into the backward's collectives)."""
    if not _faulty_rank():
        return
    import sys
    import time

    phase, step = os.environ["MRPO_FAULT_PHASE"], int(os.environ.get("MRPO_FAULT_STEP", "1"))

    def bug():
        print(f"MRPO_FAULT raise at {time.time():.3f}", file=sys.stderr, flush=True)
        raise InjectedBug(f"injected bug in the {phase} of rank {os.environ.get('RANK')}")

    if phase == "judge-thread":
        score = trainer.reward_model.score

        def wrapped(*args, **kwargs):
            if trainer.step + 1 == step:
                bug()
            return score(*args, **kwargs)

        trainer.reward_model.score = wrapped
    elif phase == "loss":
        import mrpo.trainer

        loss = mrpo.trainer.mrpo_loss

        def wrapped(*args, **kwargs):
            if trainer.sft_done and trainer.step + 1 == step:
                bug()
            return loss(*args, **kwargs)

        mrpo.trainer.mrpo_loss = wrapped
    else:
        raise ValueError(f"MRPO_FAULT_PHASE={phase!r}")


def slow_evaluation_judge(trainer):
    """Rank 0's judging of its share of every evaluation takes MRPO_JUDGE_DELAY_S seconds longer (an HTTP
    judge slower than the collective timeout); the other ranks judge at full speed and must wait."""
    if os.environ.get("RANK", "0") != "0":
        return
    import time

    import mrpo.eval.reasoning as reasoning

    judge_records, delay = reasoning.judge_records, float(os.environ["MRPO_JUDGE_DELAY_S"])

    def slow(*args, **kwargs):
        time.sleep(delay)
        return judge_records(*args, **kwargs)

    reasoning.judge_records = slow


def fails_on_rank_1(completions, **columns):
    """A custom reward (reward.custom) that raises on rank 1 only: counted there, the run goes on."""
    if os.environ.get("RANK") == "1":
        raise ConnectionError("reward service unreachable from rank 1")
    return [float(len(c) % 3) for c in completions]
