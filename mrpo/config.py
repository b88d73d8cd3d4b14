"""Typed run configuration: YAML files in configs/ map onto these dataclasses, plus dotted CLI overrides.

    python -m mrpo.train --config configs/qwen2_5_vl_7b_mrpo.yaml algo.tau=0.6 optim.lr=2e-6

No --config means the embedded default, configs/tiny_cpu.yaml; the dataclass defaults below follow the
paper's recipe (G=8, 512 new tokens, lr 1e-6, ...) and fill every key a YAML file leaves out. A config
without output_dir writes to runs/<config file name>.
Unknown keys, wrong types and impossible values fail at start-up with the key, the file and the
closest valid key.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from mrpo.config_schema import (  # noqa: F401  (the schema's classes stay importable from mrpo.config)
    AlgoConfig, CheckpointConfig, Config, DataConfig, DistributedConfig, JudgeConfig, LoggingConfig, LoraConfig,
    LossConfig, ModelConfig, OptimConfig, PlanConfig, RewardConfig, RolloutConfig, SFTConfig)
from mrpo.errors import ConfigError, UserInputError  # noqa: F401  (re-exported for callers of mrpo.config)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "tiny_cpu.yaml"


# ----------------------------------------------------------------------------- parsing


def _check_type(value: Any, tp: Any, key: str, source: str) -> Any:
    """Return value coerced to tp (int -> float only), or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(a) for a in typing.get_args(tp))
            raise ConfigError(f"{source}: {key}={value!r} is not one of {choices}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, key, source)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{source}: {key}={value!r} has the wrong type")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):   # YAML 1.1 reads "1e-6" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is list and isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(tp, type) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise ConfigError(f"{source}: {key}={value!r} should be of type {tp.__name__}, "
                          f"got {type(value).__name__}")
    return value


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.0)
    return f" (closest valid key: '{match[0]}')" if match else ""


def _apply(obj: Any, data: dict, prefix: str, source: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            valid = [f"{prefix}{n}" for n in names]
            raise ConfigError(f"{source}: unknown key '{full}'{_closest(full, valid)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, f"{full}.", source)
        else:
            setattr(obj, key, _check_type(value, hints[key], full, source))


def _resolve(cfg: Config) -> None:
    """Fill the keys whose default depends on others (saved resolved in the run's config.yaml)."""
    if cfg.loss.temperature is None:
        cfg.loss.temperature = cfg.rollout.temperature
    if cfg.loss.loss_agg is None:
        cfg.loss.loss_agg = "seq-mean-token-sum-norm" if cfg.algo.name == "dr_grpo" else "seq-mean-token-mean"


def _validate(cfg: Config, source: str) -> None:
    def need(cond: bool, key: str, why: str) -> None:
        if not cond:
            raise ConfigError(f"{source}: {key}={_get(cfg, key)!r} is invalid: {why}")

    need(cfg.rollout.group_size >= 2, "rollout.group_size", "group-relative advantages need at least 2 completions per prompt")
    need(cfg.rollout.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
    need(cfg.rollout.temperature > 0, "rollout.temperature", "must be > 0 (sampling)")
    need(0 < cfg.rollout.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
    need(cfg.loss.eps_low >= 0, "loss.eps_low", "must be >= 0")
    need(cfg.loss.eps_high >= 0, "loss.eps_high", "must be >= 0")
    need(cfg.loss.eps_low < 1, "loss.eps_low", "must be < 1 (the lower clip bound is 1 - eps_low)")
    need(cfg.loss.beta >= 0, "loss.beta", "must be >= 0")
    need(cfg.loss.temperature > 0, "loss.temperature", "must be > 0")
    need(cfg.rollout.top_k >= 0, "rollout.top_k", "must be >= 0 (0 = off)")
    mismatch_ok = cfg.loss.allow_sampling_mismatch
    need(cfg.loss.temperature == cfg.rollout.temperature or cfg.loss.allow_temperature_mismatch or mismatch_ok,
         "loss.temperature", f"differs from rollout.temperature={cfg.rollout.temperature}: the ratio and the "
         "gradient would use log-probs of another distribution than the one that sampled the tokens; leave "
         "loss.temperature unset (it follows rollout.temperature) or set loss.allow_sampling_mismatch=true")
    truncated = ("the rollouts would sample from a truncated distribution while the loss takes log-probs of the "
                 "full softmax (an off-policy, biased ratio and gradient); set loss.allow_sampling_mismatch=true "
                 "to accept it")
    need(cfg.rollout.top_p == 1 or mismatch_ok, "rollout.top_p", truncated)
    need(cfg.rollout.top_k == 0 or mismatch_ok, "rollout.top_k", truncated)
    need(cfg.algo.name != "dr_grpo" or cfg.loss.loss_agg == "seq-mean-token-sum-norm", "loss.loss_agg",
         "algo.name=dr_grpo is defined with seq-mean-token-sum-norm (no length bias); leave loss.loss_agg unset")
    need(cfg.loss.max_tokens_per_micro_batch >= 0, "loss.max_tokens_per_micro_batch", "must be >= 0")
    need(cfg.loss.chunk_size is None or cfg.loss.chunk_size > 0, "loss.chunk_size", "must be > 0 or null")
    need(0 <= cfg.algo.tau <= 1, "algo.tau", "R_ans lies in [0, 1]")
    need(cfg.algo.num_iterations >= 1, "algo.num_iterations", "must be >= 1")
    need(cfg.optim.lr > 0, "optim.lr", "must be > 0")
    need(0 < cfg.distributed.timeout_s < float("inf"), "distributed.timeout_s", "must be a number of seconds > 0")
    need(cfg.optim.per_device_batch_size >= 1, "optim.per_device_batch_size", "must be >= 1")
    need(cfg.optim.grad_accum_steps >= 1, "optim.grad_accum_steps", "must be >= 1")
    need(cfg.optim.max_grad_norm > 0, "optim.max_grad_norm", "must be > 0")
    need(cfg.optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    need(cfg.optim.epochs >= 1, "optim.epochs", "must be >= 1")
    need(cfg.optim.max_steps is None or cfg.optim.max_steps >= 1, "optim.max_steps", "must be >= 1 or null")
    need(len(cfg.optim.adam_betas) == 2 and all(0 <= b < 1 for b in cfg.optim.adam_betas),
         "optim.adam_betas", "two numbers in [0, 1)")
    need((cfg.optim.per_device_batch_size * cfg.optim.grad_accum_steps) % cfg.rollout.group_size == 0,
         "optim.per_device_batch_size",
         f"per_device_batch_size * grad_accum_steps = "
         f"{cfg.optim.per_device_batch_size * cfg.optim.grad_accum_steps} completions per device and step "
         f"must be a multiple of rollout.group_size={cfg.rollout.group_size} (each device holds whole groups)")
    need(cfg.reward.k_min >= 1, "reward.k_min", "must be >= 1")
    need(cfg.reward.k_max >= cfg.reward.k_min, "reward.k_max", "must be >= reward.k_min")
    need(min(cfg.reward.answer_weight, cfg.reward.process_weight, cfg.reward.length_weight,
             cfg.reward.format_weight) >= 0, "reward.answer_weight", "reward weights must be >= 0")
    need(cfg.reward.answer_weight > 0, "reward.answer_weight", "MRPO shaping needs the answer reward")
    need(cfg.reward.bert_model_path is None or Path(cfg.reward.bert_model_path).is_dir(), "reward.bert_model_path",
         "not a folder: a local Hugging Face BERT folder for BERTScore, or null (ROUGE/BLEU fallback)")
    need(not (cfg.reward.process_weight > 0 and cfg.judge.kind == "none"), "judge.kind",
         "the process reward (reward.process_weight > 0) needs a step judge")
    need(not (cfg.algo.name == "mrpo" and cfg.judge.kind == "none"), "judge.kind",
         "MRPO shaping needs step validity from a step judge")
    need(cfg.judge.kind != "labels" or bool(cfg.judge.labels_path), "judge.labels_path",
         "judge.kind=labels needs a labels file")
    need(cfg.judge.kind != "local" or bool(cfg.judge.local_model_path), "judge.local_model_path",
         "judge.kind=local needs a local model path")
    need(cfg.judge.kind != "python" or bool(cfg.judge.function), "judge.function",
         "judge.kind=python needs a function \"pkg.module:fn\"")
    need(cfg.judge.function is None or cfg.judge.kind == "python", "judge.function",
         f"is used by judge.kind=python only (judge.kind={cfg.judge.kind!r}); set judge.function=null")
    need(cfg.judge.prompt_template is None or cfg.judge.kind in ("http", "local"), "judge.prompt_template",
         f"is used by judge.kind=http or local only (judge.kind={cfg.judge.kind!r}); set judge.prompt_template=null")
    cfg.reward.custom = _custom_rewards(cfg.reward.custom, source)
    _check_plugins(cfg, source)
    need(cfg.judge.max_retries >= 0, "judge.max_retries", "must be >= 0")
    need(cfg.judge.max_concurrency >= 1, "judge.max_concurrency", "must be >= 1")
    need(cfg.loss.loss_agg != "seq-mean-token-sum-norm" or cfg.rollout.max_new_tokens > 0,
         "loss.loss_agg", "needs rollout.max_new_tokens")
    need(cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps", "must be >= 0 (0 = only at the end)")
    need(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
    need(cfg.data.max_pixels >= 28 * 28, "data.max_pixels", "must be at least one 28x28 patch")
    need(cfg.data.max_prompt_length >= 16, "data.max_prompt_length", "must be >= 16")
    if cfg.data.prompt_template is not None:
        from mrpo.models.backbone import load_prompt_template

        try:
            load_prompt_template(cfg.data.prompt_template)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{source}: {e}") from None
    need(cfg.sft.steps >= 0, "sft.steps", "must be >= 0")
    need(cfg.logging.eval_every >= 0, "logging.eval_every", "must be >= 0")
    need(cfg.lora.rank >= 0, "lora.rank", "must be >= 0 (0 = LoRA off)")
    need(cfg.lora.alpha is None or cfg.lora.alpha > 0, "lora.alpha", "must be > 0 or null (= 2 * rank)")
    need(0 <= cfg.lora.dropout < 1, "lora.dropout", "must be in [0, 1)")
    need(cfg.lora.dropout == 0 or cfg.algo.num_iterations == 1, "lora.dropout",
         f"with algo.num_iterations={cfg.algo.num_iterations} the old log-probs and the loss's would come from "
         "different dropout masks: the ratio is not 1 on the first pass and clipping acts on noise; use lora.dropout=0")
    need(len(cfg.lora.target_modules) > 0 and all(isinstance(t, str) and t for t in cfg.lora.target_modules),
         "lora.target_modules", "a non-empty list of module names (e.g. [q_proj, v_proj])")
    need(not {"lm_head", "embed_tokens"} & set(cfg.lora.target_modules), "lora.target_modules",
         "lm_head / embed_tokens cannot be adapted (the fused loss reads lm_head.weight directly)")
    need(not (cfg.lora.merge_on_export and cfg.lora.rank == 0), "lora.merge_on_export",
         "needs lora.rank > 0 (without LoRA the export is already a full model)")
    need(all(isinstance(t, str) for t in cfg.logging.tags), "logging.tags", "a list of strings")
    need(0 <= cfg.judge.max_unjudged_fraction <= 1, "judge.max_unjudged_fraction", "a share in [0, 1] (1 = never stop)")
    need(cfg.judge.unjudged_window >= 1, "judge.unjudged_window", "must be >= 1 (RL steps)")
    for key in ("price_input_per_mtok", "price_output_per_mtok", "max_cost_usd", "max_requests_per_minute"):
        need(getattr(cfg.judge, key) >= 0, f"judge.{key}", "must be >= 0 (0 = off)")
    need(cfg.judge.max_cost_usd == 0 or cfg.judge.price_input_per_mtok + cfg.judge.price_output_per_mtok > 0,
         "judge.max_cost_usd", "a budget needs the prices: set judge.price_input_per_mtok and "
         "judge.price_output_per_mtok (USD per million tokens)")
    need(0 <= cfg.judge.noise_flip_rate <= 1, "judge.noise_flip_rate", "a share of step verdicts in [0, 1] (0 = off)")
    need(cfg.judge.noise_flip_rate == 0 or cfg.judge.kind != "none", "judge.noise_flip_rate",
         "flips step verdicts, so it needs a step judge (judge.kind is none)")
    need(bool(cfg.output_dir), "output_dir", "must name a folder")


_CUSTOM_KEYS = ("name", "function", "weight")
BUILTIN_REWARDS = ("answer", "process", "length", "format")   # mrpo.rewards.REWARD_COLUMNS, in column order


def _custom_rewards(items: list, source: str) -> list[dict]:
    """reward.custom normalised to [{name, function, weight: float}]; ConfigError naming reward.custom[i].<key>."""
    import math
    import re

    out, seen = [], {}
    for i, item in enumerate(items):
        key = f"reward.custom[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{source}: {key}={item!r} must be a mapping {{name, function, weight}}")
        for k in item:
            if k not in _CUSTOM_KEYS:
                raise ConfigError(f"{source}: unknown key '{key}.{k}'{_closest(str(k), list(_CUSTOM_KEYS))}")
        for k in ("name", "function"):
            if k not in item:
                raise ConfigError(f"{source}: {key}.{k} is missing (each custom reward needs a name and a function)")
        name, weight = item["name"], item.get("weight", 1.0)
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
            raise ConfigError(f"{source}: {key}.name={name!r} must be a word (letters, digits, _ . -): it names "
                              f"the metric reward/<name>")
        if name in BUILTIN_REWARDS:
            raise ConfigError(f"{source}: {key}.name={name!r} clashes with the built-in reward '{name}'")
        if name in seen:
            raise ConfigError(f"{source}: {key}.name={name!r} is already the name of reward.custom[{seen[name]}]")
        seen[name] = i
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ConfigError(f"{source}: {key}.weight={weight!r} must be a finite number (0 = off)")
        out.append({"name": name, "function": item["function"], "weight": float(weight)})
    return out


def _check_plugins(cfg: Config, source: str) -> None:
    """Import every user function and load the judge prompt template now, so a wrong path fails at start-up."""
    from mrpo.plugins import KeywordCall, PluginError, load_function

    try:
        for i, item in enumerate(cfg.reward.custom):
            key = f"reward.custom[{i}].function"
            KeywordCall(load_function(item["function"], key), None, key, item["function"])
        if cfg.judge.kind == "python":
            from mrpo.judges.python import load_judge_function

            load_judge_function(cfg.judge.function)
        if cfg.judge.prompt_template is not None:
            from mrpo.judges.prompt import JudgePrompt

            JudgePrompt.from_file(cfg.judge.prompt_template)
    except (PluginError, ValueError, OSError) as e:
        raise ConfigError(f"{source}: {e}") from None


def check_world_size(cfg: Config, world_size: int) -> None:
    """Start-up checks that depend on the number of processes (torchrun's WORLD_SIZE); raises ConfigError."""
    if world_size > 1 and cfg.distributed.engine == "none":
        raise ConfigError(f"distributed.engine=none with {world_size} processes: the single-process engine does "
                          "not average gradients over ranks, so each rank would train its own diverging copy; "
                          "use distributed.engine=fsdp2 or distributed.engine=deepspeed, or run one process")


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def parse_override(item: str) -> tuple[list[str], Any]:
    """'algo.tau=0.6' -> (['algo', 'tau'], 0.6); the value is parsed as YAML, and text that is not valid
    YAML (e.g. a prompt template "{question} ...") is kept as a string."""
    item = item[2:] if item.startswith("--") else item
    if "=" not in item:
        raise ConfigError(f"command line: override '{item}' must look like section.key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Build a Config from a YAML file (default: configs/tiny_cpu.yaml) and dotted overrides."""
    cfg = Config()
    if path is None:
        if not DEFAULT_CONFIG.exists():
            raise ConfigError(f"the embedded default {DEFAULT_CONFIG} is missing (installed without the "
                              f"repository's configs/?): pass --config FILE")
        path = DEFAULT_CONFIG
    source = str(path)
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    _apply(cfg, data, "", source)
    for item in overrides:
        keys, value = parse_override(item)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _apply(cfg, nested, "", "command line")
    if cfg.output_dir is None:   # never a shared default: two configs must not resume each other's runs
        cfg.output_dir = default_output_dir(path)
    _resolve(cfg)
    _validate(cfg, source if not overrides else f"{source} + command line")
    return cfg


def default_output_dir(config_path: str | Path) -> str:
    """runs/<config file name without .yaml>, e.g. configs/my_lr_sweep.yaml -> runs/my_lr_sweep."""
    return str(Path("runs") / Path(config_path).stem)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{'algo.tau': 0.6, ...} of a Config (or a nested dict such as a saved config.yaml)."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def describe_keys(obj: Any = None, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, meaning) for every key, from the dataclass fields' metadata["help"]."""
    obj = Config() if obj is None else obj
    rows: list[tuple[str, Any, str]] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            rows.extend(describe_keys(value, f"{prefix}{f.name}."))
        else:
            rows.append((f"{prefix}{f.name}", value, f.metadata.get("help", "")))
    return rows


def help_text() -> str:
    """--help: usage, then every key with its default and meaning, grouped by section."""
    lines = [__doc__.strip(), "", "Keys (dataclass default; configs/tiny_cpu.yaml overrides some of them):"]
    section = None
    for key, default, meaning in describe_keys():
        head = key.split(".")[0] if "." in key else ""
        if head != section:
            section = head
            lines.append("")
            if head:
                doc = next(f.metadata.get("help", "") for f in dataclasses.fields(Config) if f.name == head)
                lines.append(f"{head}:  {doc}")
        shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        lines.append(f"  {key} = {shown}\n      {meaning}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> Config:
    """CLI: [--config FILE] [section.key=value ...]."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    path = None
    rest = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("command line: --config needs a file")
            path, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg in ("-h", "--help"):
            print(help_text())
            raise SystemExit(0)
        else:
            rest.append(arg)
        i += 1
    return load_config(path, rest)
