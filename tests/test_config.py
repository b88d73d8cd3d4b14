import glob
from pathlib import Path

import pytest

from mrpo.config import DEFAULT_CONFIG, Config, ConfigError, load_config, parse_args

REPO = Path(__file__).resolve().parents[1]


def test_default_is_tiny_cpu():
    cfg = load_config()
    assert DEFAULT_CONFIG.name == "tiny_cpu.yaml"
    assert cfg.output_dir == "runs/tiny_cpu" and cfg.model.path is None and cfg.judge.kind == "rule"


@pytest.mark.parametrize("path", sorted(glob.glob(str(REPO / "configs" / "*.yaml"))))
def test_shipped_configs_load(path):
    cfg = load_config(path)
    if "tiny" not in path:   # the paper's recipe
        assert cfg.rollout.group_size == 8 and cfg.rollout.max_new_tokens == 512
        assert cfg.data.max_prompt_length == 1024 and cfg.data.max_pixels == 802816
        assert (cfg.optim.per_device_batch_size, cfg.optim.grad_accum_steps, cfg.optim.epochs) == (2, 8, 1)
        assert cfg.optim.lr == (1e-5 if cfg.lora.rank else 1e-6) and cfg.loss.beta == 0.04   # LoRA: 10x and cfg.loss.eps_low == cfg.loss.eps_high == 0.2
        assert cfg.model.dtype == "bfloat16" and cfg.model.gradient_checkpointing
        assert cfg.model.attn_implementation == "flash_attention_2" and cfg.checkpoint.every_steps == 100
        assert cfg.model.reasoning_tag == ("thinking" if cfg.model.family == "qwen3_vl" else "think")
        assert cfg.algo.name in Path(path).stem


def test_overrides_are_typed():
    cfg = load_config(None, ["algo.tau=0.7", "optim.lr=3e-5", "algo.name=grpo", "model.path=null"])
    assert cfg.algo.tau == 0.7 and cfg.optim.lr == 3e-5 and cfg.algo.name == "grpo" and cfg.model.path is None
    cfg = parse_args(["--config", str(REPO / "configs" / "qwen3_vl_8b_mrpo.yaml"), "loss.beta=0"])
    assert cfg.loss.beta == 0.0 and cfg.model.family == "qwen3_vl"


@pytest.mark.parametrize("override, fragment", [
    ("algo.tua=0.5", "closest valid key: 'algo.tau'"),
    ("optimm.lr=1", "closest valid key: 'optim'"),
    ("optim.lr=fast", "optim.lr"),
    ("loss.eps_low=-0.1", "loss.eps_low"),
    ("rollout.group_size=1", "rollout.group_size"),
    ("algo.name=ppo", "algo.name"),
    ("optim.per_device_batch_size=3", "multiple of rollout.group_size"),
    ("judge.kind=none", "judge.kind"),
    ("optim.max_steps=true", "optim.max_steps"),
    ("lora.rank=4 lora.dropout=0.1 algo.num_iterations=2", "different dropout masks"),
])
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(None, override.split())
    assert fragment in str(err.value)


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout:\n  group_sise: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    msg = str(err.value)
    assert str(bad) in msg and "rollout.group_sise" in msg and "rollout.group_size" in msg


def test_roundtrip_yaml(tmp_path):
    cfg = load_config(None, ["seed=7"])
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg
    assert isinstance(Config().optim.adam_betas, list)


@pytest.mark.parametrize("override, key", [("rollout.top_p=0.9", "rollout.top_p"), ("rollout.top_k=20", "rollout.top_k"),
                                           ("loss.temperature=1.3", "loss.temperature")])
def test_sampling_mismatch_needs_opt_in(override, key):
    """Truncated rollouts (top_p < 1, top_k > 0) or another loss temperature are refused unless opted in."""
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert f"{key}=" in str(err.value) and "loss.allow_sampling_mismatch=true" in str(err.value)
    cfg = load_config(None, [override, "loss.allow_sampling_mismatch=true"])
    assert (cfg.rollout.top_p, cfg.rollout.top_k, cfg.loss.temperature) != (1.0, 0, cfg.rollout.temperature)


def test_sampling_defaults_and_the_older_temperature_key():
    cfg = load_config(None, [])
    assert cfg.rollout.top_p == 1.0 and cfg.rollout.top_k == 0 and not cfg.loss.allow_sampling_mismatch
    assert load_config(None, ["loss.temperature=1.3", "loss.allow_temperature_mismatch=true"]).loss.temperature == 1.3
    with pytest.raises(ConfigError, match="rollout.top_p"):   # the older key covers the temperature only
        load_config(None, ["rollout.top_p=0.9", "loss.allow_temperature_mismatch=true"])
    with pytest.raises(ConfigError, match="rollout.top_k"):
        load_config(None, ["rollout.top_k=-1"])


def test_engine_none_on_several_processes_is_refused(monkeypatch, capsys):
    from mrpo.config import check_world_size
    from mrpo.train import EXIT_CONFIG, main

    cfg = load_config(None, ["distributed.engine=none"])
    check_world_size(cfg, 1)
    check_world_size(load_config(None, []), 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["distributed.engine=none"]) == EXIT_CONFIG
    msg = capsys.readouterr().err
    assert "distributed.engine=none" in msg and "distributed.engine=fsdp2" in msg and "distributed.engine=deepspeed" in msg
