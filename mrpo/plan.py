"""Will it fit? Per-GPU memory of every phase of an RL step, before any weights are loaded.

    python -m mrpo.plan --config configs/qwen2_5_vl_7b_mrpo.yaml --gpus 4 --gpu-mem-gib 80 [key=value ...] [--json PATH]

The model is built from its config.json on the meta device (exact parameter counts, no weights, no GPU):
model.path/config.json when it exists, else the published config.json of the recipe backbone of
model.family shipped in configs/backbones/ (the output says which). Per phase, per GPU:

  rollout   generation of G completions for every prompt of the rank at once: parameters (gathered whole
            for generation with distributed.gather_for_generation, else one unit at a time), the KV cache
            (2 x layers x KV heads x head_dim x (prompt + max_new_tokens) x completions), the prefill's
            working set and the vision tower on every row's image (rows repeat the prompt G times);
  logprobs  old / reference log-prob passes (num_iterations > 1 / loss.beta > 0): a no-grad forward of one
            micro-batch and linear_logprobs' [chunk, V] logits buffer;
  train     forward + backward of one micro-batch (activations with or without gradient checkpointing,
            the vision tower's when it trains), the fused loss (grad hidden [N, D], grad weight [V, D]
            fp32, [chunk, V] logits buffer), gradients (FSDP2 accumulates UNSHARDED gradients in
            reduce_dtype over the micro-batches of a step: no-sync accumulation), the AdamW step.

Every phase carries the persistent state: parameters (1/N under FSDP2 / ZeRO-3), AdamW state (FSDP2: trainable
parameters sharded as fp32 master weights, fp32 exp_avg + exp_avg_sq; one process: the parameters' dtype, no
fp32 master copy; DeepSpeed: fp32 master,
moments and gradient partitions), the reference model (none with LoRA: the policy with adapters off), and
on CUDA the headroom: CUDA context + NCCL buffers, and a fragmentation reserve of the caching allocator.
Activation costs per token and layer are the linear forms of mrpo/plan_calibration.json, measured on the
real model classes by mrpo.plan_measure. When the peak does not fit, the plan is redone with each knob
(micro-batch size, gradient checkpointing, gather_for_generation off, frozen vision tower, LoRA, more GPUs)
and the ones that fit are listed, cheapest first.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mrpo.config import UserInputError

GiB = 2 ** 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CUDA_CONTEXT = int(0.75 * GiB)          # CUDA context + cuBLAS workspaces: device memory outside torch's allocator
NCCL_BUFFERS = int(0.5 * GiB)           # NCCL communicator buffers (several ranks only)
FRAGMENTATION = 0.05                    # caching-allocator slack on top of the allocated peak
CUDA_CHUNK_BYTES = 2 * GiB              # mrpo_kernels.utils: a [chunk, V] buffer of at most 2 GiB on CUDA
CPU_CHUNK_BYTES = 128 * 2 ** 20         # ... and 128 MiB on CPU
ZERO_BUCKET = 500_000_000               # DeepSpeed reduce_bucket_size (elements)
SAMPLING_COPIES = 7                     # [rows, V] fp32 logits alive while sampling (logits, warped, probs, ...;
                                        # measured with V = 151936: tests/test_plan.py)
PHASES = ("rollout", "logprobs", "train")


class PlanDoesNotFit(UserInputError):
    """The plan's peak exceeds device memory (a user input error: mrpo.train exits 2 with this message)."""


# ----------------------------------------------------------------------------- the model's shape


@dataclass
class ModelShape:
    """Sizes read off the model built on the meta device (counts exact) and its config."""
    source: str
    family: str
    params_total: int
    params_vision: int      # vision tower (Qwen: with its patch merger)
    params_layer: int       # one decoder layer
    params_root: int        # outside decoder layers and vision tower: embeddings, lm_head, norm, projector
    lora_in_out: int        # sum of in + out features of the LoRA target projections (adapters = rank x this)
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    v_depth: int
    v_hidden: int
    v_intermediate: int
    v_heads: int
    patches_per_image: int  # vision-tower tokens of one image at data.max_pixels
    tokens_per_image: int   # language-model tokens of that image


def resolve_model_config(cfg, model_path: str | Path | None = None):
    """(transformers config, where it came from): model_path / model.path's config.json, the tiny offline
    model's, or the shipped published config.json of model.family's recipe backbone."""
    from transformers import AutoConfig

    from mrpo.plan_measure import BACKBONE_DIR, BACKBONE_NAMES

    path = Path(model_path) if model_path is not None else (Path(cfg.model.path) if cfg.model.path else None)
    if path is None:
        path = Path(cfg.data.synthetic_dir).parent / "models" / f"tiny_{cfg.model.family}_seed{cfg.model.tiny_seed}"
        if not (path / "config.json").is_file():
            from mrpo.models.tiny import build_tiny

            build_tiny(cfg.model.family, path, seed=cfg.model.tiny_seed)
        return AutoConfig.from_pretrained(path), f"{path}/config.json (the tiny offline model)"
    if (path / "config.json").is_file():
        return AutoConfig.from_pretrained(path), f"{path}/config.json"
    shipped = BACKBONE_DIR / BACKBONE_NAMES[cfg.model.family]
    return (AutoConfig.from_pretrained(shipped),
            f"{_rel(shipped / 'config.json')} (model.path {path} not found: the published config of the "
            f"{cfg.model.family} recipe backbone)")


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def model_shape(cfg, hf_config, source: str) -> ModelShape:
    """Build the model on the meta device and read its parameter counts and sizes."""
    import torch
    from transformers import AutoModelForImageTextToText

    from mrpo.models.parallelize import decoder_layers, vision_tower

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(hf_config)
    layers = decoder_layers(model)
    visual = vision_tower(model)
    count = lambda m: sum(p.numel() for p in m.parameters()) if m is not None else 0   # noqa: E731
    total, n_vision, n_layer = count(model), count(visual), count(layers[0])
    targets, lora_in_out = set(cfg.lora.target_modules), 0
    for layer in layers:
        for name, mod in layer.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
                lora_in_out += mod.in_features + mod.out_features
    text, vis = hf_config.get_text_config(), hf_config.vision_config
    heads = text.num_attention_heads
    family = cfg.model.family
    if family == "internvl3":
        side = vis.image_size[0] if isinstance(vis.image_size, (list, tuple)) else vis.image_size
        patch = vis.patch_size[0] if isinstance(vis.patch_size, (list, tuple)) else vis.patch_size
        tiles = max(1, min(cfg.data.max_pixels // (side * side), 12))
        tiles += tiles > 1   # the thumbnail tile
        patches = tiles * (side // patch) ** 2
        tokens = int(patches * hf_config.downsample_ratio ** 2)
        v_depth, v_heads = vis.num_hidden_layers, vis.num_attention_heads
    else:
        factor = vis.patch_size * vis.spatial_merge_size
        tokens = max(1, cfg.data.max_pixels // (factor * factor))
        patches = tokens * vis.spatial_merge_size ** 2
        v_depth, v_heads = vis.depth, vis.num_heads
    return ModelShape(
        source=source, family=family, params_total=total, params_vision=n_vision, params_layer=n_layer,
        params_root=total - n_vision - n_layer * len(layers), lora_in_out=lora_in_out, layers=len(layers),
        hidden=text.hidden_size, intermediate=text.intermediate_size, heads=heads,
        kv_heads=text.num_key_value_heads, head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab=text.vocab_size, v_depth=v_depth, v_hidden=vis.hidden_size, v_intermediate=vis.intermediate_size,
        v_heads=v_heads, patches_per_image=patches, tokens_per_image=tokens)


# ----------------------------------------------------------------------------- the plan


@dataclass
class Phase:
    terms: dict[str, int] = field(default_factory=dict)    # name -> bytes per GPU
    notes: list[str] = field(default_factory=list)
    step_temporaries: int = 0                              # train: AdamW step's temporaries (bytes)
    activation_keys: tuple = ()                            # train: the terms freed before the optimizer step

    @property
    def peak(self) -> int:
        return sum(self.terms.values())


@dataclass
class Plan:
    shape: ModelShape
    gpus: int
    gpu_mem_gib: float
    engine: str
    phases: dict[str, Phase]
    cfg: object = None
    knobs: list[dict] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(p.peak for p in self.phases.values())

    @property
    def fits(self) -> bool:
        return self.peak <= self.gpu_mem_gib * GiB

    def measurable_peak(self, name: str, first_step: bool = True) -> int:
        """The phase's planned peak as torch counts it (allocated bytes: no CUDA context, no fragmentation
        reserve). first_step: torch's AdamW creates its state at the first optimizer step, so the first
        step's rollout and log-prob passes run without it, and so does its backward pass unless
        algo.num_iterations > 1 (a second backward after the first optimizer step)."""
        ph = self.phases[name]
        skip = ("CUDA context", "allocator")
        if first_step and name == "train" and self.cfg.algo.num_iterations == 1:
            # backward without AdamW state, then the step with it: the larger of the two moments
            adam = sum(v for k, v in ph.terms.items() if k.startswith("AdamW exp_avg"))
            act = sum(ph.terms.get(k, 0) for k in ph.activation_keys)
            rest = sum(v for k, v in ph.terms.items() if not k.startswith(skip + ("AdamW",))
                       and k not in ph.activation_keys)
            return rest + max(act, adam + ph.step_temporaries)
        if first_step and name != "train":
            skip += ("AdamW exp_avg",)
        return sum(v for k, v in ph.terms.items() if not k.startswith(skip))

    def worst_phase(self) -> str:
        return max(self.phases, key=lambda k: self.phases[k].peak)

    def to_json(self) -> dict:
        s = self.shape
        trainable = _trainable(s, self.cfg)
        return {
            "model_config": s.source, "params_total": s.params_total, "params_trainable": trainable,
            "params_vision": s.params_vision, "params_lora": s.lora_in_out * self.cfg.lora.rank, "gpus": self.gpus,
            "gpu_mem_gib": self.gpu_mem_gib, "engine": self.engine, "fits": self.fits,
            "peak_gib": round(self.peak / GiB, 2), "peak_phase": self.worst_phase(),
            "phases": {name: {"peak_gib": round(p.peak / GiB, 2), "fits": p.peak <= self.gpu_mem_gib * GiB,
                              "terms_gib": {k: round(v / GiB, 3) for k, v in p.terms.items()}, "notes": p.notes}
                       for name, p in self.phases.items()},
            "knobs": self.knobs,
        }


def _trainable(s: ModelShape, cfg) -> int:
    if cfg.lora.rank > 0:
        return s.lora_in_out * cfg.lora.rank
    return s.params_total - (s.params_vision if cfg.model.freeze_vision else 0)


def _coefficients(family: str, dtype: str) -> dict:
    from mrpo.plan_measure import load_calibration

    table = load_calibration()
    key = f"{family}/{'float32' if dtype == 'float32' else 'bfloat16'}"
    return table[key]


def _per_token(coefs: dict, quantity: str, dims: dict) -> float:
    """Bytes per token (or patch) of `quantity` from the calibrated linear form."""
    from mrpo.plan_measure import features

    return max(0.0, sum(c * f for c, f in zip(coefs[quantity]["coef"], features(dims))))


def make_plan(cfg, gpus: int, gpu_mem_gib: float, shape: ModelShape, device: str = "cuda") -> Plan:
    """The per-GPU memory plan of `cfg` on `gpus` devices of `gpu_mem_gib` GiB. device="cpu" plans what the
    CPU path allocates (fp32 sharding, 128 MiB loss chunks, no CUDA headroom): the tests compare it with
    peaks measured on CPU."""
    s, m, d, o = shape, cfg.model, cfg.distributed, cfg.optim
    engine = d.engine if gpus > 1 else "none"
    p = DTYPE_BYTES[m.dtype]                                   # stored parameters
    if engine == "fsdp2" and device == "cuda":
        pd = DTYPE_BYTES[d.param_dtype]                        # compute (unsharded) parameters
    elif engine == "deepspeed" and device == "cuda":
        pd = 2 if (m.dtype == "bfloat16" or d.param_dtype == "bfloat16") else 4
    else:
        pd = p
    act_dtype = "float32" if pd == 4 else "bfloat16"
    lora = cfg.lora.rank > 0
    trainable = _trainable(s, cfg)
    t_bytes = 4 if lora else p                                 # LoRA adapters are fp32 (mrpo.models.lora)
    shard = gpus if engine == "fsdp2" or (engine == "deepspeed" and d.deepspeed_zero_stage == 3) else 1
    has_ref = cfg.loss.beta > 0 and not lora

    # sequence geometry: prompts are at most data.max_prompt_length tokens (image tokens included)
    seq = cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
    gen_rows = o.per_device_batch_size * o.grad_accum_steps            # prompts_per_rank x G
    budget = cfg.loss.max_tokens_per_micro_batch
    mb_seqs = max(1, budget // seq) if budget else o.per_device_batch_size
    mb_tokens = mb_seqs * seq
    mb_completion = mb_seqs * cfg.rollout.max_new_tokens
    micro_batches = math.ceil(gen_rows / mb_seqs)
    images_mb = mb_seqs

    coefs = _coefficients(s.family, act_dtype)
    text = dict(hidden=s.hidden, intermediate=s.intermediate, heads=s.heads, kv_heads=s.kv_heads, head_dim=s.head_dim)
    vis = dict(hidden=s.v_hidden, intermediate=s.v_intermediate, heads=s.v_heads)
    t_c, v_c = coefs["text"], coefs["vision"]
    chunk_bytes = CUDA_CHUNK_BYTES if device == "cuda" else CPU_CHUNK_BYTES

    # ---- persistent: every phase
    base: dict[str, int] = {}
    if engine == "deepspeed":
        base[f"parameters ({pd}-byte, 1/{shard} ZeRO partition)"] = s.params_total * pd // shard
        base["optimizer: fp32 master + AdamW moments + fp32 gradient partition"] = 16 * trainable // shard
    else:
        where = f"1/{shard} FSDP2 shard" if shard > 1 else "whole"
        if engine == "fsdp2" and not lora:   # FSDP2 shards trainable parameters as fp32 master weights
            t_bytes = 4
            base[f"parameters (trainable float32 master weights, {where})"] = trainable * 4 // shard
            if s.params_total > trainable:
                base[f"parameters (frozen, {m.dtype}, {where})"] = (s.params_total - trainable) * p // shard
        else:
            base[f"parameters ({m.dtype}, {where})"] = s.params_total * p // shard
        master = "float32 master weights" if engine == "fsdp2" and not lora else "no fp32 master"
        moments = "float32 adapters" if lora else ("float32" if t_bytes == 4 else m.dtype)
        base[f"AdamW exp_avg + exp_avg_sq ({moments}, {master})"] = \
            2 * trainable * t_bytes // shard
    if has_ref:
        ref_bytes = pd if engine == "deepspeed" else p
        base["reference model (frozen copy, sharded like the policy)"] = s.params_total * ref_bytes // shard
    if device == "cuda":
        nccl = NCCL_BUFFERS if gpus > 1 else 0
        base["CUDA context" + (" + NCCL buffers" if nccl else "")] = CUDA_CONTEXT + nccl

    # FSDP2 / ZeRO-3 working set of one forward: the root unit (embeddings, lm_head, norm, projector) stays
    # unsharded, plus the running and the prefetched decoder block (or the whole vision tower, one unit)
    working = 0
    if shard > 1:
        working = s.params_root * pd + max(2 * s.params_layer, s.params_vision) * pd

    def text_infer(tokens: int) -> int:
        return int(tokens * (_per_token(t_c, "infer", text) + s.hidden * pd))

    def vision_infer(images: int) -> int:
        return int(images * s.patches_per_image * _per_token(v_c, "infer", vis))

    phases: dict[str, Phase] = {}

    # ---- rollout
    ph = Phase(dict(base))
    if shard > 1 and d.gather_for_generation:
        ph.terms[f"parameters gathered for generation ({pd}-byte, whole model)"] = s.params_total * pd
    elif shard > 1:
        ph.terms["parameters unsharded per unit (gather_for_generation off)"] = working
    kv = 2 * s.layers * s.kv_heads * s.head_dim * gen_rows * seq * pd
    static = cfg.rollout.decode != "eager"
    ph.terms[f"KV cache ({'static' if static else 'dynamic'}, {gen_rows} rows x {seq} tokens)"] = kv
    prefill_rows_tokens = gen_rows * cfg.data.max_prompt_length
    ph.terms[f"prefill working set ({gen_rows} x {cfg.data.max_prompt_length} prompt tokens, no grad)"] = \
        text_infer(prefill_rows_tokens) + SAMPLING_COPIES * gen_rows * s.vocab * 4
    ph.terms[f"vision tower, no grad ({gen_rows} images x {s.patches_per_image} patches)"] = \
        vision_infer(gen_rows) + gen_rows * s.tokens_per_image * s.hidden * pd
    if not static:
        ph.notes.append("dynamic cache: torch.cat growth briefly holds two copies of one layer's K/V")
    phases["rollout"] = ph

    # ---- old / reference log-probs
    ph = Phase(dict(base))
    runs = [n for n, on in (("old", cfg.algo.num_iterations > 1), ("reference", cfg.loss.beta > 0)) if on]
    if runs:
        if working:
            # measured under FSDP2 on 2 CPU ranks (tests/test_plan.py): the no-grad passes hold about one unit
            # more than the training forward; the plan adds the vision tower's unit (the largest) there
            ph.terms["parameters unsharded per unit (root + vision + 2 blocks)"] = \
                s.params_root * pd + (2 * s.params_layer + s.params_vision) * pd
        ph.terms[f"forward working set ({mb_tokens} tokens, no grad)"] = text_infer(mb_tokens) + vision_infer(images_mb)
        rows = min(mb_completion, max(1, chunk_bytes // (s.vocab * pd)))
        ph.terms[f"linear_logprobs [{rows}, {s.vocab}] logits buffer"] = \
            rows * s.vocab * pd + mb_completion * s.hidden * pd
        ph.notes.append(f"passes: {' + '.join(runs)} log-probs, {micro_batches} micro-batches each")
    else:
        ph.notes.append("not run (num_iterations = 1 and loss.beta = 0)")
    phases["logprobs"] = ph

    # ---- train: forward + backward of one micro-batch, then the optimizer step
    ph = Phase(dict(base))
    if working:
        ph.terms["parameters unsharded per unit (root + 2 blocks)"] = working
    if engine == "fsdp2":
        # no-sync accumulation keeps every trainable parameter's gradient unsharded, upcast to reduce_dtype
        red = max(DTYPE_BYTES[d.reduce_dtype] if device == "cuda" else 4, t_bytes)
        if micro_batches > 1:   # reduce-scattered unit by unit into the shards at the last micro-batch
            ph.terms[f"gradients accumulated unsharded over {micro_batches} micro-batches"] = trainable * red
        else:
            ph.terms[f"gradients (1/{shard} shard)"] = trainable * t_bytes // shard
    elif engine == "deepspeed":
        ph.terms["ZeRO reduce bucket"] = min(ZERO_BUCKET, trainable) * pd
    else:
        ph.terms["gradients"] = trainable * t_bytes
    def activations(ckpt: bool) -> int:
        per_layer = _per_token(t_c, "ckpt" if ckpt else "train", text)
        one_layer = _per_token(t_c, "backward", text) + (_per_token(t_c, "train", text) if ckpt else 0)
        return int(mb_tokens * (s.layers * per_layer + one_layer + 2 * s.hidden * pd))

    ckpt = m.gradient_checkpointing
    ph.terms[f"activations ({mb_tokens} tokens, {'with' if ckpt else 'without'} gradient checkpointing)"] = \
        activations(ckpt)
    ph.notes.append(f"activations {'without' if ckpt else 'with'} gradient checkpointing would be "
                    f"{activations(not ckpt) / GiB:.2f} GiB")
    vision_trains = not (m.freeze_vision or lora)
    if vision_trains:
        v_layer = _per_token(v_c, "ckpt" if ckpt else "train", vis)
        v_one = _per_token(v_c, "backward", vis) + (_per_token(v_c, "train", vis) if ckpt else 0)
        ph.terms[f"vision tower activations ({images_mb} images x {s.patches_per_image} patches)"] = \
            int(images_mb * s.patches_per_image * (s.v_depth * v_layer + v_one))
    else:
        ph.terms[f"vision tower, frozen ({images_mb} images)"] = vision_infer(images_mb)
    rows = min(mb_completion, max(1, chunk_bytes // (s.vocab * pd)))
    grad_w = 0 if lora else s.vocab * s.hidden * 4
    ph.terms[f"fused loss: [{rows}, {s.vocab}] logits + grad hidden + fp32 grad weight"] = \
        rows * s.vocab * pd + 2 * mb_completion * s.hidden * pd + grad_w
    phases["train"] = ph
    # the AdamW step (foreach) holds one temporary the size of its parameters' state; it runs after the last
    # backward, when activations are gone, so the phase peak is the larger of the two moments
    step_tmp = trainable * t_bytes // shard
    act_keys = [k for k in ph.terms if k.startswith(("activations", "vision tower", "fused loss"))]
    ph.step_temporaries, ph.activation_keys = step_tmp, tuple(act_keys)
    if step_tmp > sum(ph.terms[k] for k in act_keys):
        for k in act_keys:
            del ph.terms[k]
        ph.terms["AdamW step temporaries (foreach)"] = step_tmp
        ph.notes.append("peak at the optimizer step (activations are freed by then)")

    if device == "cuda":
        for ph in phases.values():
            ph.terms["allocator fragmentation reserve (5%)"] = int(FRAGMENTATION * ph.peak)
    return Plan(shape=s, gpus=gpus, gpu_mem_gib=gpu_mem_gib, engine=engine, phases=phases, cfg=cfg)


# ----------------------------------------------------------------------------- knobs


def _with(cfg, **changes):
    new = copy.deepcopy(cfg)
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        setattr(getattr(new, section), key, value)
    return new


def knob_candidates(cfg, gpus: int) -> list[tuple[str, object, int]]:
    """(description, changed config, gpus), cheapest first."""
    o, out = cfg.optim, []
    if o.per_device_batch_size > 1 and not cfg.loss.max_tokens_per_micro_batch:
        b = max(1, o.per_device_batch_size // 2)
        accum = o.grad_accum_steps * o.per_device_batch_size // b
        out.append((f"optim.per_device_batch_size={b} optim.grad_accum_steps={accum} "
                    "(smaller micro-batches, same step)",
                    _with(cfg, optim__per_device_batch_size=b, optim__grad_accum_steps=accum), gpus))
    if not cfg.model.gradient_checkpointing:
        out.append(("model.gradient_checkpointing=true (~30% slower steps)",
                    _with(cfg, model__gradient_checkpointing=True), gpus))
    if gpus > 1 and cfg.distributed.gather_for_generation:
        out.append(("distributed.gather_for_generation=false (one all-gather per block per decoded token)",
                    _with(cfg, distributed__gather_for_generation=False), gpus))
    if not cfg.model.freeze_vision and cfg.lora.rank == 0:
        out.append(("model.freeze_vision=true (the vision tower stops training)",
                    _with(cfg, model__freeze_vision=True), gpus))
    if cfg.lora.rank == 0:
        out.append(("lora.rank=64 (adapters only; the reference is the policy without them)",
                    _with(cfg, lora__rank=64), gpus))
    for n in (2, 4, 8, 16, 32):
        if n > gpus:
            out.append((f"{n} GPUs", cfg, n))
            break
    return out


def find_knobs(cfg, plan: Plan, device: str = "cuda") -> list[dict]:
    """Re-plan with each knob alone; when none fits, add knobs in order of cost until the plan fits, then drop
    every knob the fit does not need. Returns [{knob, peak_gib, fits}], cheapest first."""
    found, same_gpus = [], []
    for text, new_cfg, n in knob_candidates(cfg, plan.gpus):
        alone = make_plan(new_cfg, n, plan.gpu_mem_gib, plan.shape, device)
        found.append({"knob": text, "peak_gib": round(alone.peak / GiB, 2), "fits": alone.fits})
        if n == plan.gpus:
            same_gpus.append((text.split(" (")[0], new_cfg))

    def combined(knobs):
        acc = cfg
        for _, new_cfg in knobs:
            acc = _merge(acc, new_cfg, cfg)
        return make_plan(acc, plan.gpus, plan.gpu_mem_gib, plan.shape, device)

    if not any(k["fits"] for k in found):
        for i in range(2, len(same_gpus) + 1):
            if combined(same_gpus[:i]).fits:
                chosen = same_gpus[:i]
                for knob in list(chosen):   # drop what the fit does not need
                    rest = [k for k in chosen if k is not knob]
                    if rest and combined(rest).fits:
                        chosen = rest
                result = combined(chosen)
                found.append({"knob": " + ".join(t for t, _ in chosen), "peak_gib": round(result.peak / GiB, 2),
                              "fits": True})
                break
    return found


def _merge(acc, new_cfg, original):
    """acc with every field where new_cfg differs from original."""
    out = copy.deepcopy(acc)
    for section in ("optim", "model", "distributed", "lora"):
        a, n, o = getattr(out, section), getattr(new_cfg, section), getattr(original, section)
        for f in dataclasses.fields(n):
            if getattr(n, f.name) != getattr(o, f.name):
                setattr(a, f.name, getattr(n, f.name))
    return out


# ----------------------------------------------------------------------------- entry points


def plan_for(cfg, gpus: int, gpu_mem_gib: float, device: str = "cuda", model_path=None, knobs: bool = True) -> Plan:
    hf_config, source = resolve_model_config(cfg, model_path)
    shape = model_shape(cfg, hf_config, source)
    plan = make_plan(cfg, gpus, gpu_mem_gib, shape, device)
    if knobs and not plan.fits:
        plan.knobs = find_knobs(cfg, plan, device)
    return plan


def plan_as_run(cfg, model_path, gpus: int, device: str, prompt_tokens: int, completion_tokens: int) -> Plan:
    """The plan of the shapes one step really ran (prompts padded to prompt_tokens, completions of
    completion_tokens): what measured peaks are compared with (tests/test_plan.py, benchmarks/bench_plan.py)."""
    cfg = copy.deepcopy(cfg)
    cfg.data.max_prompt_length, cfg.rollout.max_new_tokens = prompt_tokens, completion_tokens
    hf_config, source = resolve_model_config(cfg, model_path)
    return make_plan(cfg, gpus, float("inf"), model_shape(cfg, hf_config, source), device)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def format_plan(plan: Plan, title: str = "") -> str:
    s, cfg = plan.shape, plan.cfg
    names: list[str] = []
    for ph in plan.phases.values():
        names += [k for k in ph.terms if k not in names]
    width = max(len(n) for n in names) + 2
    bounded = math.isfinite(plan.gpu_mem_gib)
    where = f"{plan.gpus} x {plan.gpu_mem_gib:g} GiB" if bounded else f"{plan.gpus} process(es), no memory limit"
    lines = [f"memory plan{': ' + title if title else ''} on {where} (engine {plan.engine}, {cfg.model.dtype})",
             f"  model config: {s.source}",
             f"  parameters {_count(s.params_total)} (vision {_count(s.params_vision)}"
             + (f", LoRA {_count(s.lora_in_out * cfg.lora.rank)}" if cfg.lora.rank else "")
             + f"), trainable {_count(_trainable(s, cfg))}; image at data.max_pixels: {s.patches_per_image} "
               f"patches -> {s.tokens_per_image} tokens",
             f"  {'GiB per GPU':<{width}}" + "".join(f"{p:>10}" for p in PHASES)]
    for n in names:
        cells = "".join(f"{plan.phases[p].terms[n] / GiB:>10.2f}" if n in plan.phases[p].terms else f"{'-':>10}"
                        for p in PHASES)
        lines.append(f"  {n:<{width}}{cells}")
    lines.append(f"  {'peak':<{width}}" + "".join(f"{plan.phases[p].peak / GiB:>10.2f}" for p in PHASES))
    for p in PHASES:
        for note in plan.phases[p].notes:
            lines.append(f"  note ({p}): {note}")
    worst = plan.worst_phase()
    verdict = (f"peak {plan.peak / GiB:.2f} GiB ({worst})" if not bounded else
               f"fits: peak {plan.peak / GiB:.1f} GiB ({worst}) of {plan.gpu_mem_gib:g} GiB" if plan.fits else
               f"DOES NOT FIT: {worst} needs {plan.peak / GiB:.1f} GiB per GPU, {plan.gpu_mem_gib:g} GiB available")
    lines.append("  " + verdict)
    if not plan.fits:
        good = [k for k in plan.knobs if k["fits"]]
        lines.append("  knobs that make it fit (cheapest first): " +
                     ("; ".join(f"{k['knob']} -> {k['peak_gib']:.1f} GiB" for k in good) if good else
                      "none of micro-batch size, gradient checkpointing, gather_for_generation, frozen vision, "
                      "LoRA, more GPUs alone or together"))
    return "\n".join(lines)


def check_at_startup(cfg, model_path, world: int, device, is_main: bool, log=print) -> Plan | None:
    """Start-up plan of the trainer (rank 0 prints it). On CUDA every rank computes it and, with
    plan.enforce, raises PlanDoesNotFit when the peak exceeds the device's memory (all ranks stop alike);
    elsewhere only rank 0 needs it (None on the other ranks)."""
    import torch

    on_cuda = device.type == "cuda"
    if not (on_cuda or is_main):
        return None
    mem = torch.cuda.get_device_properties(device).total_memory / GiB if on_cuda else 0.0
    try:
        plan = plan_for(cfg, world, mem if on_cuda else float("inf"), "cuda" if on_cuda else "cpu", model_path,
                        knobs=on_cuda)
    except Exception as e:   # the plan must never be why a run that would work does not start
        if is_main:
            log(f"memory plan unavailable: {type(e).__name__}: {e}")
        return None
    if is_main:
        log(format_plan(plan, "start-up") if on_cuda else format_plan(plan, "start-up (CPU: nothing enforced)"))
    if on_cuda and not plan.fits and cfg.plan.enforce:
        worst = plan.worst_phase()
        good = [k["knob"] for k in plan.knobs if k["fits"]]
        raise PlanDoesNotFit(f"the memory plan's {worst} phase needs {plan.peak / GiB:.1f} GiB per GPU, the device "
                             f"has {mem:.1f} GiB; knobs that fit: {'; '.join(good) or 'none found'} "
                             f"(plan.enforce=false starts anyway)")
    return plan


def compare_measured(plan: Plan | None, peaks: dict[str, int]) -> str | None:
    """One line: planned vs measured peak per phase of the first step (Plan.measurable_peak: allocated bytes,
    no AdamW state before the first optimizer step)."""
    if plan is None or not peaks:
        return None
    parts = []
    for name, measured in peaks.items():
        planned = plan.measurable_peak(name, first_step=True)
        parts.append(f"{name} planned {planned / GiB:.2f} GiB, measured {measured / GiB:.2f} GiB "
                     f"({(planned - measured) / max(measured, 1):+.0%})")
    return "memory after the first step: " + "; ".join(parts)


def main(argv=None) -> int:
    from mrpo.config import ConfigError, load_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="run config (YAML); default configs/tiny_cpu.yaml")
    ap.add_argument("--gpus", type=int, default=1, help="GPUs (ranks) the run uses")
    ap.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory of one GPU, GiB")
    ap.add_argument("--json", help="also write the plan as JSON here")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. lora.rank=64")
    args = ap.parse_args(argv)
    if args.gpus < 1 or args.gpu_mem_gib <= 0:
        print("plan: --gpus must be >= 1 and --gpu-mem-gib > 0", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    plan = plan_for(cfg, args.gpus, args.gpu_mem_gib)
    print(format_plan(plan, args.config or "configs/tiny_cpu.yaml"))
    if args.json:
        Path(args.json).write_text(json.dumps(plan.to_json(), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
