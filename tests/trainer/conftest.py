import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def shared_data(tmp_path_factory):
    """Synthetic data + tiny model folder shared by the trainer tests (built once)."""
    root = tmp_path_factory.mktemp("trainer_data")
    return root / "data" / "synthetic"


def tiny_overrides(data_dir, out_dir, **extra):
    """A very small, fast MRPO run on the tiny default model."""
    ov = {
        "output_dir": str(out_dir), "data.synthetic_dir": str(data_dir), "data.synthetic_train": 32,
        "data.synthetic_test": 8, "rollout.group_size": 2, "rollout.max_new_tokens": 24,
        "optim.per_device_batch_size": 2, "optim.grad_accum_steps": 2, "optim.max_steps": 2,
        "optim.warmup_steps": 0, "sft.steps": 2, "sft.batch_size": 4, "checkpoint.every_steps": 1,
        "logging.eval_limit": 4, "logging.progress": False, "logging.tensorboard": True,
    }
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]


def read_metrics(out_dir) -> list[dict]:
    """The rows of OUTPUT/metrics.jsonl, a null (a value the step did not have; strict JSON) read back as NaN
    so that rows compare with pytest.approx(..., nan_ok=True)."""
    import json
    from pathlib import Path

    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: float("nan") if v is None else v for k, v in row.items()} for row in rows]
