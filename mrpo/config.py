"""Typed run configuration: YAML files in configs/ map onto these dataclasses, plus dotted CLI overrides.

    python -m mrpo.train --config configs/qwen2_5_vl_7b_mrpo.yaml algo.tau=0.6 optim.lr=2e-6

No --config means the embedded default, configs/tiny_cpu.yaml; the dataclass defaults below follow the
paper's recipe (G=8, 512 new tokens, lr 1e-6, ...) and fill every key a YAML file leaves out.
Unknown keys, wrong types and impossible values fail at start-up with the key, the file and the
closest valid key.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "tiny_cpu.yaml"


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and where it came from."""


@dataclass
class ModelConfig:
    family: Literal["qwen2_5_vl", "qwen3_vl", "internvl3"] = "qwen2_5_vl"
    path: Optional[str] = None          # local HF folder; None = build the tiny random model (offline)
    tiny_seed: int = 0
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = "sdpa"
    gradient_checkpointing: bool = False
    freeze_vision: bool = False
    reasoning_tag: Optional[str] = None  # None = family default ("thinking" for qwen3_vl, else "think")


@dataclass
class DataConfig:
    train_path: Optional[str] = None     # prepared JSONL (python -m mrpo.data prepare); None = synthetic
    test_path: Optional[str] = None
    synthetic_dir: str = "data/synthetic"
    synthetic_train: int = 512
    synthetic_test: int = 64
    synthetic_seed: int = 0
    max_pixels: int = 802816
    max_prompt_length: int = 1024
    # User turn per record: a format string with {question} (required), {reasoning_tag} ("think", or
    # "thinking" for qwen3_vl) and {answer_tag} ("answer"), or the path of a text file holding one;
    # null = the MRPO paper's instruction "{question} Think step-by-step and enclose your reasoning in
    # <{reasoning_tag}>...</{reasoning_tag}> tags. Then provide your answer in <{answer_tag}>...</{answer_tag}> tags."
    prompt_template: Optional[str] = None
    on_bad_row: Literal["skip", "error"] = "skip"
    shuffle: bool = True


@dataclass
class RolloutConfig:
    group_size: int = 8                  # G completions per prompt
    max_new_tokens: int = 512            # max completion length
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class RewardConfig:
    answer_weight: float = 1.0           # a reward is enabled when its weight > 0
    process_weight: float = 1.0
    length_weight: float = 1.0
    format_weight: float = 0.0
    k_min: int = 4
    k_max: int = 10
    bert_model_path: Optional[str] = None  # local BERT (e.g. BiomedBERT) for BERTScore; None = fallback


@dataclass
class JudgeConfig:
    kind: Literal["http", "local", "rule", "labels", "none"] = "rule"
    model: str = "gpt-5-mini"
    base_url: str = "https://api.openai.com/v1"
    api_key_env: str = "OPENAI_API_KEY"  # name of the environment variable, never the key itself
    max_concurrency: int = 8
    timeout_s: float = 60.0
    max_retries: int = 3
    backoff_s: float = 1.0
    temperature: float = 0.0
    cache_dir: Optional[str] = None
    labels_path: Optional[str] = None
    local_model_path: Optional[str] = None
    max_new_tokens: int = 512


@dataclass
class AlgoConfig:
    name: Literal["mrpo", "grpo", "gdpo", "dr_grpo"] = "mrpo"
    tau: float = 0.6                     # answer counts as correct for shaping when R_ans > tau
    num_iterations: int = 1              # policy-update passes over each batch of rollouts
    advantage_scale: Literal["group", "batch", "none"] = "group"
    # valid steps of a wrong answer: "abs" +|A| (the paper), "signed" keep A (a negative advantage, e.g.
    # from the length penalty, stays negative), "zero" no credit
    valid_step_credit: Literal["abs", "signed", "zero"] = "abs"


@dataclass
class LossConfig:
    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.0                    # k3 KL to the reference policy; > 0 loads a frozen reference
    # log-probs of the ratio/gradient at this temperature; None = rollout.temperature (the distribution
    # that sampled the tokens); another value needs allow_temperature_mismatch=true
    temperature: Optional[float] = None
    allow_temperature_mismatch: bool = False
    # normalisation over the whole optimizer step (all micro-batches, all ranks); None = by algorithm:
    # dr_grpo -> seq-mean-token-sum-norm, otherwise seq-mean-token-mean
    loss_agg: Optional[Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"]] = None
    max_tokens_per_micro_batch: int = 0  # token budget (prompt + completion) per micro-batch; 0 = by count
    backend: Literal["auto", "triton", "torch"] = "auto"
    chunk_size: Optional[int] = None


@dataclass
class SFTConfig:
    """Supervised warm-up on the gold rationales before RL (used by the tiny default)."""
    steps: int = 0
    lr: float = 1e-3
    batch_size: int = 16


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.0
    adam_betas: list = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    per_device_batch_size: int = 2       # completions per micro-batch per device
    grad_accum_steps: int = 8            # micro-batches per optimizer step
    epochs: int = 1
    max_steps: Optional[int] = None      # stop after this many RL steps (None = epochs)


@dataclass
class LoraConfig:
    """LoRA adapters on the language model (mrpo.models.lora, via peft). rank 0 = off (full fine-tuning).
    With LoRA on, only the adapters train (vision tower, embeddings, lm_head frozen) and the reference
    policy for the KL term (loss.beta > 0) is the same model with its adapters disabled: no second copy."""
    rank: int = 0                        # r; 0 = LoRA off
    alpha: Optional[float] = None        # scaling = alpha / rank; None = 2 * rank
    dropout: float = 0.0                 # on the adapter input; > 0 makes old/new log-probs stochastic in RL
    target_modules: list = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])  # inside decoder layers
    use_rslora: bool = False             # scaling = alpha / sqrt(rank)
    merge_on_export: bool = False        # export also writes a merged Hugging Face folder


@dataclass
class DistributedConfig:
    engine: Literal["fsdp2", "deepspeed", "none"] = "fsdp2"
    param_dtype: Literal["float32", "bfloat16"] = "float32"   # FSDP2 mixed precision (bf16 on GPU)
    reduce_dtype: Literal["float32", "bfloat16"] = "float32"
    deepspeed_zero_stage: int = 3
    gather_for_generation: bool = True   # DeepSpeed ZeRO-3: full weights on each device during generate


@dataclass
class CheckpointConfig:
    every_steps: int = 100
    keep_last: int = 2
    resume: str = "auto"                 # "auto" (newest complete checkpoint), "none", or a path
    export_final: bool = True            # write a Hugging Face folder at the end


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb: bool = False
    progress: bool = True
    eval_every: int = 0                  # RL steps between held-out evaluations (0 = only at the end)
    eval_at_start: bool = False          # evaluate once before RL (after the SFT warm-up): the baseline
    eval_at_end: bool = True
    eval_limit: Optional[int] = None     # evaluate on at most this many test records


@dataclass
class Config:
    seed: int = 0
    output_dir: str = "runs/tiny_cpu"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


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
    need(cfg.loss.temperature == cfg.rollout.temperature or cfg.loss.allow_temperature_mismatch,
         "loss.temperature", f"differs from rollout.temperature={cfg.rollout.temperature}: the ratio and the "
         "gradient would use log-probs of another distribution than the one that sampled the tokens; leave "
         "loss.temperature unset (it follows rollout.temperature) or set loss.allow_temperature_mismatch=true")
    need(cfg.algo.name != "dr_grpo" or cfg.loss.loss_agg == "seq-mean-token-sum-norm", "loss.loss_agg",
         "algo.name=dr_grpo is defined with seq-mean-token-sum-norm (no length bias); leave loss.loss_agg unset")
    need(cfg.loss.max_tokens_per_micro_batch >= 0, "loss.max_tokens_per_micro_batch", "must be >= 0")
    need(cfg.loss.chunk_size is None or cfg.loss.chunk_size > 0, "loss.chunk_size", "must be > 0 or null")
    need(0 <= cfg.algo.tau <= 1, "algo.tau", "R_ans lies in [0, 1]")
    need(cfg.algo.num_iterations >= 1, "algo.num_iterations", "must be >= 1")
    need(cfg.optim.lr > 0, "optim.lr", "must be > 0")
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
    need(not (cfg.reward.process_weight > 0 and cfg.judge.kind == "none"), "judge.kind",
         "the process reward (reward.process_weight > 0) needs a step judge")
    need(not (cfg.algo.name == "mrpo" and cfg.judge.kind == "none"), "judge.kind",
         "MRPO shaping needs step validity from a step judge")
    need(cfg.judge.kind != "labels" or bool(cfg.judge.labels_path), "judge.labels_path",
         "judge.kind=labels needs a labels file")
    need(cfg.judge.kind != "local" or bool(cfg.judge.local_model_path), "judge.local_model_path",
         "judge.kind=local needs a local model path")
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
    need(len(cfg.lora.target_modules) > 0 and all(isinstance(t, str) and t for t in cfg.lora.target_modules),
         "lora.target_modules", "a non-empty list of module names (e.g. [q_proj, v_proj])")
    need(not {"lm_head", "embed_tokens"} & set(cfg.lora.target_modules), "lora.target_modules",
         "lm_head / embed_tokens cannot be adapted (the fused loss reads lm_head.weight directly)")
    need(not (cfg.lora.merge_on_export and cfg.lora.rank == 0), "lora.merge_on_export",
         "needs lora.rank > 0 (without LoRA the export is already a full model)")


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
    _resolve(cfg)
    _validate(cfg, source if not overrides else f"{source} + command line")
    return cfg


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
            print(__doc__)
            print("Every key with its dataclass default (the paper's recipe; configs/tiny_cpu.yaml overrides "
                  "some of them):\n" + Config().to_yaml())
            raise SystemExit(0)
        else:
            rest.append(arg)
        i += 1
    return load_config(path, rest)
