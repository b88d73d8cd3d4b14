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
