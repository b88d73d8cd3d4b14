"""Entry point: `torchrun --standalone --nproc_per_node=2 -m mrpo.train [--config FILE] [key=value ...]`.

With no arguments it runs the embedded default (configs/tiny_cpu.yaml): a tiny Qwen2.5-VL-shaped model on
generated medical VQA, on CPU: supervised warm-up, MRPO with the rule judge, held-out evaluation.
`--help` lists every key with its default and meaning.

Before training, rank 0 locks the output folder (a second run into it exits with code 3, naming the
holder), checks that a resumed checkpoint was trained with the same experiment (exit 2 with the differing
keys otherwise, see checkpoint.resume_ignore_config), moves metrics rows that the resumed run will write
again to metrics.dropped.jsonl, and checks an http judge's key and endpoint (exit 4). Workers started by
torchrun exit when torchrun dies. Exit codes: 0 done, 2 configuration or other bad input (a data or model
file, a judge file, a broken checkpoint given as checkpoint.resume, no intact checkpoint for resume=auto:
mrpo.errors.UserInputError, one line, no traceback), 3 output folder in use, 4 judge unavailable, outage or
budget (judge.max_cost_usd) reached (a checkpoint is saved; fix the judge or raise the budget, then rerun to
resume), 75 stopped by a signal (resumable; every rank, even when the signal reached one), 1 a bug
(traceback), 71 ended because another rank failed (rank 0 prints that rank's traceback;
mrpo.distributed.report_failure), 70 launcher gone.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EXIT_CONFIG, EXIT_LOCKED, EXIT_JUDGE, EXIT_STOPPED = 2, 3, 4, 75

log = logging.getLogger("mrpo")


def prepare_output(cfg) -> list:
    """Rank 0, with the output lock held, before the Trainer exists: check the resume against the saved
    config (raises ResumeConfigError; no checkpoint file is read here: the Trainer verifies it once the
    process group exists, split over the ranks) and keep a config.yaml the run will overwrite when it differs
    (config_history/). metrics.jsonl is truncated back to the resumed step by the Trainer itself
    (Trainer.train, after loading the checkpoint). Returns the allowed config changes [(key, old, new)]."""
    from mrpo import checkpoint as ckpt
    from mrpo.run_safety import archive_config, check_resume_config

    out = Path(cfg.output_dir)
    path = ckpt.resume_candidate(cfg.checkpoint.resume, out / "checkpoints")   # verified later, on every rank
    changes = check_resume_config(cfg, path) if path is not None else []
    saved = out / "config.yaml"
    if saved.is_file() and saved.read_text() != cfg.to_yaml():
        kept = archive_config(out)
        log.info("kept the previous %s as %s", saved, kept)
    return changes


def main(argv: list[str] | None = None) -> int:
    from mrpo.config import check_world_size, parse_args
    from mrpo.errors import ConfigError, UserInputError

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("mrpo").setLevel(logging.INFO)   # our progress lines; libraries stay at WARNING
    try:
        cfg = parse_args(argv)
        check_world_size(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    rank = int(os.environ.get("RANK", "0"))

    from mrpo.errors import JudgeBudgetError
    from mrpo.judges.outage import JudgeOutageError
    from mrpo.judges.preflight import JudgeUnavailableError, check_endpoint
    from mrpo.run_safety import (OutputLock, OutputLockedError, ResumeConfigError, describe_outputs,
                                 stop_message, watch_launcher)

    watch_launcher()
    lock = None
    if rank == 0:
        try:
            lock = OutputLock(cfg.output_dir).acquire()
        except OutputLockedError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return EXIT_LOCKED
        except OSError as e:   # not a folder, not writable
            print(f"error: output_dir={cfg.output_dir}: cannot create or lock the output folder ({e}); "
                  f"choose a writable folder", file=sys.stderr, flush=True)
            return EXIT_CONFIG
    failure = None   # (exit code, line): printed last, after the failed start-up's objects are gone
    try:
        if rank == 0:
            print("resolved config:\n" + cfg.to_yaml(), flush=True)
            try:
                prepare_output(cfg)
                if cfg.judge.kind == "http":
                    log.info("judge preflight: %s", check_endpoint(cfg.judge.base_url, cfg.judge.model,
                                                                   cfg.judge.api_key_env,
                                                                   min(cfg.judge.timeout_s, 10.0)))
            except ResumeConfigError as e:
                failure = (EXIT_CONFIG, f"error: {e}")
            except JudgeUnavailableError as e:
                failure = (EXIT_JUDGE, f"error: step judge unavailable: {e}")
        if failure is None:
            return _train(cfg, rank, (JudgeOutageError, JudgeBudgetError), describe_outputs, stop_message)
    except UserInputError as e:   # bad data, model folder, judge files or checkpoint: one line, every rank exits 2
        failure = (EXIT_CONFIG, f"error: {e}" if rank == 0 else None)
    finally:
        if lock is not None:
            lock.release()
    code, line = failure
    if line is not None:
        print_last(line)
    return code


def print_last(line: str) -> None:
    """Print `line` on stderr as the last thing the run prints: the objects of the failed start-up (whose
    finalizers print, e.g. a progress bar closing) are collected and stdout is flushed first, so in a
    combined log the error is not followed by, nor buried in, earlier output."""
    import gc

    gc.collect()
    sys.stdout.flush()
    sys.stderr.flush()
    print(line, file=sys.stderr, flush=True)


def _train(cfg, rank: int, judge_stops, describe_outputs, stop_message) -> int:
    import torch

    threads = os.environ.get("OMP_NUM_THREADS")
    if threads is None and not torch.cuda.is_available():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    from mrpo.distributed import report_failure
    from mrpo.errors import UserInputError
    from mrpo.trainer import Trainer

    trainer = None
    try:
        trainer = Trainer(cfg)   # a plan that does not fit raises PlanDoesNotFit, a UserInputError (exit 2)
        hook = os.environ.get("MRPO_TEST_HOOK")   # "module:function" called with the trainer (fault-injection tests)
        if hook:
            import importlib

            module, _, name = hook.partition(":")
            getattr(importlib.import_module(module), name)(trainer)
        final = trainer.train()
        return _report(cfg, rank, trainer, final, describe_outputs, stop_message)   # before the final barrier
    except judge_stops as e:   # an outage or the judge budget, raised alike on every rank: a checkpoint is saved, exit 4
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
            print(describe_outputs(cfg.output_dir), flush=True)
        return EXIT_JUDGE
    except UserInputError:          # raised alike on every rank; main prints it in one line
        raise
    except BaseException as e:      # this rank alone: the others end within a second, not at a collective timeout
        report_failure(e)
        raise
    finally:
        if trainer is not None:
            trainer.close()         # after rank 0's last line: no rank exits (and has torchrun end the rest) sooner


def _report(cfg, rank: int, trainer, final: dict, describe_outputs, stop_message) -> int:
    """Rank 0 prints the final lines; returns the exit code (75 on every rank after a stop, from the
    synced flag)."""
    from mrpo.checkpoint import complete_checkpoints

    stop = trainer.stop
    if rank == 0:
        keys = ["step", "reward", "accuracy", "early_failure_share", "eval/accuracy", "eval/early_failure_share"]
        print("done: " + ", ".join(f"{k}={final[k]:.4g}" if isinstance(final.get(k), float) else f"{k}={final.get(k)}"
                                   for k in keys if k in final), flush=True)
        if stop.stopping:
            ckpts = complete_checkpoints(Path(cfg.output_dir) / "checkpoints")
            saved = ckpts[-1] if ckpts and ckpts[-1].name == f"step_{trainer.step:06d}" else None
            print(stop_message(stop.signal_name or stop.reason or "a signal", trainer.stop_phase, trainer.step, saved,
                               trainer.stop_why_not), flush=True)
        print(describe_outputs(cfg.output_dir), flush=True)
    return EXIT_STOPPED if stop.stopping else 0


if __name__ == "__main__":
    sys.exit(main())
