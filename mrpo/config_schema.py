"""The run configuration's schema: one dataclass per section, each field with its default and meaning
(units included). The defaults follow the paper's recipe (G=8, 512 new tokens, lr 1e-6, ...) and fill every
key a YAML file leaves out. Loading, overrides and validation live in mrpo/config.py.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml


def _f(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its meaning (units included) in metadata["help"]; --help prints it."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    family: Literal["qwen2_5_vl", "qwen3_vl", "internvl3"] = _f("qwen2_5_vl", "backbone family (chat template, vision tower, reasoning tag)")
    path: Optional[str] = _f(None, "local Hugging Face folder; null = build the tiny random model (offline)")
    tiny_seed: int = _f(0, "seed of the tiny random model's weights (model.path=null)")
    dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", "dtype of the policy weights")
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = _f("sdpa", "attention kernel")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward (less memory, ~30% slower)")
    freeze_vision: bool = _f(False, "train the language model only; the vision tower stays fixed")
    reasoning_tag: Optional[str] = _f(None, "tag around the reasoning; null = family default "
                                            "(\"thinking\" for qwen3_vl, else \"think\")")


@dataclass
class DataConfig:
    train_path: Optional[str] = _f(None, "prepared JSONL (python -m mrpo.data prepare); null = synthetic data")
    test_path: Optional[str] = _f(None, "held-out JSONL for evaluation; null = the synthetic test split (if any)")
    synthetic_dir: str = _f("data/synthetic", "where the synthetic data set is generated")
    synthetic_train: int = _f(512, "synthetic training records")
    synthetic_test: int = _f(64, "synthetic held-out records")
    synthetic_seed: int = _f(0, "seed of the synthetic data generator")
    max_pixels: int = _f(802816, "images are resized to at most this many pixels")
    max_prompt_length: int = _f(1024, "prompt tokens (text + image); longer prompts are skipped or an error")
    prompt_template: Optional[str] = _f(None, "user turn per record: a format string with {question} (required), "
                                        "{reasoning_tag} and {answer_tag}, or a file holding one; null = the "
                                        "paper's instruction")
    on_bad_row: Literal["skip", "error"] = _f("skip", "bad or over-long records: skip (counted) or stop")
    shuffle: bool = _f(True, "seeded shuffle of the training prompts each epoch")


@dataclass
class RolloutConfig:
    group_size: int = _f(8, "G: completions sampled per prompt")
    max_new_tokens: int = _f(512, "max completion length (tokens)")
    temperature: float = _f(1.0, "sampling temperature of the rollouts")
    top_p: float = _f(1.0, "nucleus sampling threshold of the rollouts; < 1 needs loss.allow_sampling_mismatch")
    top_k: int = _f(0, "top-k sampling of the rollouts (0 = off); > 0 needs loss.allow_sampling_mismatch")
    decode: Literal["loop", "hf", "eager", "static", "static_compiled"] = _f(
        "loop", "decoder of rollouts and evaluation: loop (our decode loop, mrpo.models.decode: prompts prefilled "
                "once per group, finished rows compacted out, CUDA graphs on CUDA; where it cannot serve the model "
                "or options, transformers' generate with a one-time warning naming why), hf (transformers' "
                "generate, dynamic KV cache: the reference path; eager is its old name), static (generate with a "
                "pre-allocated KV cache), static_compiled (static cache + compiled decode step, CUDA only, static "
                "elsewhere); see mrpo/decoding.py")


@dataclass
class RewardConfig:
    answer_weight: float = _f(1.0, "weight of the answer reward (a reward is enabled when its weight > 0)")
    process_weight: float = _f(1.0, "weight of the process reward (share of valid steps, from the step judge)")
    length_weight: float = _f(1.0, "weight of the length reward (penalty outside [k_min, k_max] steps)")
    format_weight: float = _f(0.0, "weight of the format reward (1 for exactly <think>...</think><answer>...</answer>)")
    k_min: int = _f(4, "fewest reasoning steps without a length penalty")
    k_max: int = _f(10, "most reasoning steps without a length penalty")
    bert_model_path: Optional[str] = _f(None, "local BERT (e.g. BiomedBERT) for BERTScore of open answers; "
                                              "null = token-overlap fallback")
    custom: list = _f(help="your own rewards, each its own reward column: a list of {name, function: "
                           "\"pkg.module:fn\", weight (default 1.0; 0 = off)} (README \"Your own rewards and judges\")",
                      factory=list)


@dataclass
class JudgeConfig:
    kind: Literal["http", "local", "rule", "labels", "python", "none"] = _f(
        "rule", "step judge: http (OpenAI-compatible), local (HF model), rule (synthetic facts), labels (file), "
                "python (your function, judge.function), none")
    function: Optional[str] = _f(None, "the step judge as a function \"pkg.module:fn\" (kind=python)")
    prompt_template: Optional[str] = _f(None, "YAML file {system, user} replacing the http/local judge's prompt; "
                                              "user holds {question} {gold_answer} {gold_reasoning} {steps} "
                                              "{num_steps}; null = the paper's prompt")
    model: str = _f("gpt-5-mini", "judge model name (http)")
    base_url: str = _f("https://api.openai.com/v1", "OpenAI-compatible endpoint (http)")
    api_key_env: str = _f("OPENAI_API_KEY", "name of the environment variable holding the key, never the key itself")
    max_concurrency: int = _f(8, "parallel judge requests (http) or requests per generate batch (local)")
    timeout_s: float = _f(60.0, "per-request timeout (seconds)")
    max_retries: int = _f(3, "extra attempts after the first for a failed request")
    backoff_s: float = _f(1.0, "first retry waits about this long (seconds), doubling each retry")
    temperature: float = _f(0.0, "judge sampling temperature")
    cache_dir: Optional[str] = _f(None, "on-disk verdict cache folder; null = no cache")
    labels_path: Optional[str] = _f(None, "precomputed step labels JSONL (kind=labels)")
    local_model_path: Optional[str] = _f(None, "local judge model folder (kind=local)")
    max_new_tokens: int = _f(512, "max tokens of a local judge's reply")
    max_unjudged_fraction: float = _f(0.5, "stop the run (checkpoint, error) when more than this share of the "
                                           "completions sent to the judge went unjudged over unjudged_window "
                                           "steps; 1.0 = never stop")
    unjudged_window: int = _f(5, "RL steps over which judge.max_unjudged_fraction is measured")
    price_input_per_mtok: float = _f(0.0, "USD per million prompt tokens of the http judge, for judge/cost_usd_total "
                                          "(0 with price_output_per_mtok 0 = cost not shown)")
    price_output_per_mtok: float = _f(0.0, "USD per million completion tokens (reasoning tokens included)")
    max_cost_usd: float = _f(0.0, "judge budget: when the next RL step could pass it, save a checkpoint and stop "
                                  "(exit 4; rerun with a higher budget to go on); 0 = no budget")
    max_requests_per_minute: float = _f(0.0, "cap on the http judge's requests per minute over the run (each of the "
                                             "WORLD_SIZE processes takes its share, shared by its threads); 0 = no cap")
    noise_flip_rate: float = _f(0.0, "research option: flip this share of step verdicts (valid <-> invalid) "
                                     "during training, seeded by judge.noise_seed (mrpo.judges.noisy); "
                                     "evaluation uses the clean judge; 0 = off")
    noise_seed: int = _f(0, "seed of judge.noise_flip_rate's flips (a keyed hash of sample, steps and step index)")


@dataclass
class AlgoConfig:
    name: Literal["mrpo", "grpo", "gdpo", "dr_grpo"] = _f("mrpo", "advantage and shaping: mrpo, grpo, gdpo, dr_grpo")
    tau: float = _f(0.6, "an answer counts as correct for shaping when R_ans > tau")
    num_iterations: int = _f(1, "policy-update passes over each batch of rollouts")
    advantage_scale: Literal["group", "batch", "none"] = _f("group", "advantages divided by the reward std of the group, "
                                                                     "of the batch, or not at all")
    valid_step_credit: Literal["abs", "signed", "zero"] = _f(
        "abs", "valid steps of a wrong answer get +|A| (abs, the paper), keep A's sign (signed: a negative "
               "advantage, e.g. from the length penalty, stays negative) or 0 (zero)")


@dataclass
class LossConfig:
    eps_low: float = _f(0.2, "ratio clip below: 1 - eps_low")
    eps_high: float = _f(0.2, "ratio clip above: 1 + eps_high")
    beta: float = _f(0.0, "k3 KL weight to the reference policy; > 0 loads a frozen reference")
    temperature: Optional[float] = _f(None, "log-probs of the ratio and gradient at this temperature; null = "
                                            "rollout.temperature (the distribution that sampled the tokens)")
    allow_temperature_mismatch: bool = _f(False, "accept a loss.temperature other than rollout.temperature")
    allow_sampling_mismatch: bool = _f(False, "accept rollouts sampled from another distribution than the loss's "
                                              "full softmax at loss.temperature: rollout.top_p < 1, rollout.top_k > 0 "
                                              "or a loss.temperature mismatch (off-policy, biased ratio and gradient)")
    loss_agg: Optional[Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"]] = _f(
        None, "token-loss averaging over the whole optimizer step (all micro-batches, all ranks); null = "
              "seq-mean-token-sum-norm for dr_grpo, else seq-mean-token-mean")
    max_tokens_per_micro_batch: int = _f(0, "token budget (prompt + completion) per micro-batch; 0 = by count "
                                            "(optim.per_device_batch_size)")
    packing: bool = _f(True, "padding-free training forwards: a micro-batch's sequences packed into one row with "
                             "per-sequence positions and explicit boundaries (varlen attention: FlashAttention "
                             "varlen kernels on CUDA, per-sequence SDPA otherwise); false = the padded "
                             "[B, prompt + completion] forward")
    backend: Literal["auto", "triton", "torch"] = _f("auto", "fused loss kernel: triton on GPU, torch elsewhere")
    chunk_size: Optional[int] = _f(None, "rows (tokens) per chunk of the fused loss's logits buffer; null = sized automatically")


@dataclass
class SFTConfig:
    """Supervised warm-up on the gold rationales before RL (used by the tiny default)."""
    steps: int = _f(0, "supervised warm-up steps on gold rationales before RL (0 = none)")
    lr: float = _f(1e-3, "learning rate of the warm-up")
    batch_size: int = _f(16, "records per warm-up step (over all ranks)")


@dataclass
class OptimConfig:
    lr: float = _f(1e-6, "AdamW learning rate of RL")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    adam_betas: list = _f(help="AdamW betas", factory=lambda: [0.9, 0.999])
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    max_grad_norm: float = _f(1.0, "gradient clipping norm")
    schedule: Literal["constant", "cosine"] = _f("constant", "learning-rate schedule after warm-up")
    warmup_steps: int = _f(0, "linear learning-rate warm-up (RL steps)")
    per_device_batch_size: int = _f(2, "completions per micro-batch per device")
    grad_accum_steps: int = _f(8, "micro-batches per optimizer step")
    epochs: int = _f(1, "passes over the training prompts (when max_steps is null)")
    max_steps: Optional[int] = _f(None, "stop after this many RL steps; null = epochs")


@dataclass
class LoraConfig:
    """LoRA adapters on the language model (mrpo.models.lora, via peft). rank 0 = off (full fine-tuning).
    With LoRA on, only the adapters train (vision tower, embeddings, lm_head frozen) and the reference
    policy for the KL term (loss.beta > 0) is the same model with its adapters disabled: no second copy."""
    rank: int = _f(0, "LoRA rank r; 0 = LoRA off")
    alpha: Optional[float] = _f(None, "scaling = alpha / rank; null = 2 * rank")
    dropout: float = _f(0.0, "dropout on the adapter input; > 0 makes old/new log-probs stochastic in RL")
    target_modules: list = _f(help="module names adapted inside the decoder layers", factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    use_rslora: bool = _f(False, "rank-stabilised scaling alpha / sqrt(rank)")
    merge_on_export: bool = _f(False, "the export also writes a merged Hugging Face folder")


@dataclass
class DistributedConfig:
    engine: Literal["fsdp2", "deepspeed", "none"] = _f("fsdp2", "sharding engine with several processes; none = one "
                                                                  "process only (refused with WORLD_SIZE > 1)")
    param_dtype: Literal["float32", "bfloat16"] = _f("float32", "FSDP2 mixed-precision compute dtype (bf16 on GPU)")
    reduce_dtype: Literal["float32", "bfloat16"] = _f("float32", "FSDP2 gradient reduction dtype")
    deepspeed_zero_stage: int = _f(3, "DeepSpeed ZeRO stage")
    gather_for_generation: bool = _f(True, "DeepSpeed ZeRO-3: full weights on each device during generate")
    timeout_s: float = _f(1800.0, "seconds a collective (all-reduce, gather) waits for the slowest rank before "
                                  "the run ends; waits on another rank's judge never count against it")


@dataclass
class PlanConfig:
    """The memory plan printed at start-up (python -m mrpo.plan does the same for any GPU count)."""
    enforce: bool = _f(True, "on CUDA, refuse to start (exit 2) when the plan's peak exceeds the device memory")


@dataclass
class CheckpointConfig:
    every_steps: int = _f(100, "RL steps between checkpoints (0 = only at the end)")
    keep_last: int = _f(2, "complete checkpoints kept")
    resume: str = _f("auto", "auto (newest intact checkpoint in output_dir), none (a new run), or a checkpoint "
                             "folder; none and an older folder (a rewind) move later checkpoints to abandoned/")
    resume_ignore_config: bool = _f(False, "resume even when the saved config differs in keys that change the "
                                           "experiment (algorithm, rewards, G, model, data, loss)")
    export_final: bool = _f(True, "write a Hugging Face folder (final_model/) at the end")


@dataclass
class LoggingConfig:
    tensorboard: bool = _f(True, "write tensorboard/<run name>/ event files")
    wandb: bool = _f(False, "log to Weights & Biases (pip install wandb)")
    wandb_project: str = _f("mrpo", "W&B project")
    wandb_entity: Optional[str] = _f(None, "W&B entity (user or team); null = your default")
    run_name: Optional[str] = _f(None, "run name in W&B and tensorboard; null = the output folder's name")
    tags: list = _f(help="W&B tags", factory=list)
    group: Optional[str] = _f(None, "W&B group (e.g. one per sweep)")
    progress: bool = _f(True, "progress bars")
    eval_every: int = _f(0, "RL steps between held-out evaluations (0 = only at the end)")
    eval_at_start: bool = _f(False, "evaluate once before RL (after the SFT warm-up): the baseline")
    eval_at_end: bool = _f(True, "evaluate after the last step")
    eval_limit: Optional[int] = _f(None, "evaluate on at most this many test records; null = all")


@dataclass
class Config:
    seed: int = _f(0, "seed of sampling, shuffling and initialisation")
    output_dir: Optional[str] = _f(None, "run folder (locked while a run uses it); null = runs/<config file name>")
    model: ModelConfig = _f(help="policy model", factory=ModelConfig)
    data: DataConfig = _f(help="training and held-out data", factory=DataConfig)
    rollout: RolloutConfig = _f(help="sampling of the completions", factory=RolloutConfig)
    reward: RewardConfig = _f(help="reward weights", factory=RewardConfig)
    judge: JudgeConfig = _f(help="step judge", factory=JudgeConfig)
    algo: AlgoConfig = _f(help="RL algorithm", factory=AlgoConfig)
    loss: LossConfig = _f(help="policy loss", factory=LossConfig)
    sft: SFTConfig = _f(help="supervised warm-up", factory=SFTConfig)
    optim: OptimConfig = _f(help="optimizer and schedule", factory=OptimConfig)
    lora: LoraConfig = _f(help="LoRA adapters (rank 0 = full fine-tuning)", factory=LoraConfig)
    distributed: DistributedConfig = _f(help="multi-process engine", factory=DistributedConfig)
    checkpoint: CheckpointConfig = _f(help="checkpoints and resume", factory=CheckpointConfig)
    plan: PlanConfig = _f(help="start-up memory plan", factory=PlanConfig)
    logging: LoggingConfig = _f(help="metrics, evaluation cadence", factory=LoggingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
