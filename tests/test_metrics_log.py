"""MetricsLogger: metrics.jsonl truncation on resume, tensorboard run folder, W&B run identity (offline)."""
import json
from pathlib import Path

import pytest

from mrpo.config import load_config
from mrpo.metrics_log import WANDB_ID_FILE, MetricsLogger


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _cfg(out, **extra):
    ov = {"output_dir": str(out), "logging.tensorboard": False, **extra}
    return load_config(None, [f"{k}={v}" for k, v in ov.items()])


def _write_run(out, cfg, rl_steps, sft=(0, 10), evals=(("start", 0),)):
    logger = MetricsLogger(out, cfg)
    for s in sft:
        logger.log({"phase": "sft", "sft_step": s, "sft_nll": 1.0})
    for tag, s in evals:
        logger.log({"phase": "eval", "tag": tag, "step": s, "accuracy": 0.5})
    for s in rl_steps:
        logger.log({"step": s, "loss": float(s)})
    logger.close()


def test_truncate_after_drops_later_steps_and_keeps_them_aside(tmp_path):
    cfg = _cfg(tmp_path)
    _write_run(tmp_path, cfg, [1, 2, 3, 4, 5], evals=(("start", 0), ("step_000004", 4)))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')                      # torn by a crash mid-write
    resumed = MetricsLogger(tmp_path, cfg)
    assert resumed.truncate_after(3) == 4               # steps 4, 5, eval at 4, the torn line
    for s in (4, 5):                                    # the resumed run logs them again
        resumed.log({"step": s, "loss": -1.0})
    resumed.close()
    rows = _rows(tmp_path / "metrics.jsonl")
    rl = [r["step"] for r in rows if "phase" not in r]
    assert rl == [1, 2, 3, 4, 5] and [r["loss"] for r in rows if "phase" not in r][3:] == [-1.0, -1.0]
    assert [r["tag"] for r in rows if r.get("phase") == "eval"] == ["start"]
    assert len([r for r in rows if r.get("phase") == "sft"]) == 2
    dropped = (tmp_path / "metrics.dropped.jsonl").read_text().splitlines()
    assert [json.loads(x).get("step") for x in dropped[:3]] == [4, 4, 5] and dropped[3] == '{"step": 6, "lo'


def test_truncate_before_warmup_done_drops_warmup_rows(tmp_path):
    cfg = _cfg(tmp_path)
    _write_run(tmp_path, cfg, [])
    assert MetricsLogger(tmp_path, cfg).truncate_after(0, sft_done=False) == 3   # 2 sft rows + start eval
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    _write_run(tmp_path, cfg, [], sft=(0, 10, 20), evals=())
    assert MetricsLogger(tmp_path, cfg).truncate_after(0, sft_done=False, sft_step=15) == 1
    assert [r["sft_step"] for r in _rows(tmp_path / "metrics.jsonl")] == [0, 10]


def test_nothing_to_truncate_leaves_the_file_alone(tmp_path):
    cfg = _cfg(tmp_path)
    assert MetricsLogger(tmp_path, cfg).truncate_after(5) == 0        # no file yet
    _write_run(tmp_path, cfg, [1, 2])
    before = (tmp_path / "metrics.jsonl").read_text()
    assert MetricsLogger(tmp_path, cfg).truncate_after(2) == 0
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert not (tmp_path / "metrics.dropped.jsonl").exists()


def test_tensorboard_folder_is_the_run_name(tmp_path):
    cfg = _cfg(tmp_path / "myrun", **{"logging.tensorboard": True})
    logger = MetricsLogger(tmp_path / "myrun", cfg)
    logger.log({"step": 1, "loss": 0.5, "nan_metric": float("nan")})
    logger.close()
    assert any((tmp_path / "myrun" / "tensorboard" / "myrun").iterdir())
    named = MetricsLogger(tmp_path / "myrun", _cfg(tmp_path / "myrun", **{"logging.run_name": "lr_1e-4"}))
    assert named.run_name == "lr_1e-4"


def test_not_main_rank_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "r", _cfg(tmp_path / "r"), is_main=False)
    logger.log({"step": 1, "loss": 0.5})
    assert logger.truncate_after(0) == 0
    logger.close()
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_wandb_resumed_logger_reuses_the_run_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = _cfg(tmp_path / "run", **{"logging.wandb": True, "logging.wandb_project": "mrpo-test",
                                    "logging.tags": "[a, b]", "logging.group": "sweep1"})
    first = MetricsLogger(tmp_path / "run", cfg)
    first.log({"step": 1, "loss": 0.5})
    run = first.wandb()
    run_id = run.id
    assert run.name == "run" and run.project == "mrpo-test" and list(run.tags) == ["a", "b"] and run.group == "sweep1"
    first.close()
    assert (tmp_path / "run" / WANDB_ID_FILE).read_text().strip() == run_id
    second = MetricsLogger(tmp_path / "run", cfg)
    second.truncate_after(1)
    second.log({"step": 2, "loss": 0.4})
    assert second.wandb().id == run_id
    second.close()
    other = MetricsLogger(tmp_path / "other", _cfg(tmp_path / "other", **{"logging.wandb": True}))
    other.log({"step": 1, "loss": 0.5})
    assert other.wandb().id != run_id and other.wandb().project == "mrpo"
    other.close()


def test_metrics_jsonl_is_strict_json(tmp_path):
    """NaN / inf (e.g. reward/<name> when no completion had a value) are written as null, nested too: a
    strict parser (no NaN / Infinity tokens) reads every row; finite values are untouched."""
    logger = MetricsLogger(tmp_path, _cfg(tmp_path))
    nan, inf = float("nan"), float("inf")
    logger.log({"step": 1, "reward/brevity": nan, "grad_norm": inf, "kl": -inf, "loss": 0.25, "ok": True,
                "nested": {"a": [1.0, nan], "b": "text"}})
    logger.close()

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    rows = [json.loads(line, parse_constant=refuse) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    row = rows[0]
    assert row["reward/brevity"] is None and row["grad_norm"] is None and row["kl"] is None
    assert row["loss"] == 0.25 and row["ok"] is True and row["nested"] == {"a": [1.0, None], "b": "text"}
