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
