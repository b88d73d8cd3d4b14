"""The memory plan's arithmetic: a model's shape from its config.json (meta device, exact parameter
counts) and the per-GPU bytes of every phase of an RL step (`make_plan`). The CLI, the knobs that make a
plan fit and the start-up check are in mrpo/plan.py, which documents every term.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from mrpo.errors import UserInputError

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
LOOP_SAMPLING_COPIES = 5                # our decode loop's: noise, logits, log-probs, picked noise, the race
PHASES = ("rollout", "logprobs", "train")




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
        return _read_vl_config(path, cfg.model.family), f"{path}/config.json"
    shipped = BACKBONE_DIR / BACKBONE_NAMES[cfg.model.family]
    return (AutoConfig.from_pretrained(shipped),
            f"{_rel(shipped / 'config.json')} (model.path {path} not found: the published config of the "
            f"{cfg.model.family} recipe backbone)")


def _read_vl_config(path: Path, family: str):
    """path/config.json as a transformers config of `family`; UserInputError (one line) when it is not
    JSON, has no known model_type, is not a supported vision-language model or is of another family."""
    from transformers import AutoConfig

    from mrpo.models.load import MODEL_TYPES

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserInputError(f"model.path={path}: config.json cannot be read as a transformers config "
                             f"({' '.join(str(e).split())[:200]}); point model.path at a Qwen2.5-VL, Qwen3-VL or "
                             f"InternVL3 model folder") from None
    detected = MODEL_TYPES.get(config.model_type)
    if detected is None:
        raise UserInputError(f"model.path={path}: config.json has model_type {config.model_type!r}, not a supported "
                             f"vision-language model ({', '.join(sorted(MODEL_TYPES))}); the plan needs the "
                             f"VL model's config")
    if detected != family:
        raise UserInputError(f"model.path={path}: config.json is a {detected} model (model_type "
                             f"{config.model_type!r}) but model.family={family}; set model.family={detected}")
    return config


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
    has_master = not lora and (engine == "fsdp2" or (engine == "none" and p < 4))   # fp32 masters + moments
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
            if has_master:   # one process: fp32 masters next to the model.dtype weights (engines/master.py)
                t_bytes = 4
                base["float32 master weights (trainable)"] = trainable * 4
        master = "float32 master weights" if has_master else "no fp32 master"
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
    kv_token = 2 * s.layers * s.kv_heads * s.head_dim * pd                 # K + V of one token, all layers
    prompts, prompt_len = max(1, gen_rows // cfg.rollout.group_size), cfg.data.max_prompt_length
    held = 0   # the decode workspace that outlives the rollout (CUDA: its graphs are captured once per run)
    if cfg.rollout.decode == "loop" and not (shard > 1 and not d.gather_for_generation):
        # mrpo.models.decode: the distinct prompts prefilled once (vision tower once per image), their K/V
        # copied into one preallocated cache of every row (+ its additive key mask), then the lean step over
        # fused q/k/v and gate/up copies. The prefill's working set is gone before the decode buffers exist:
        # the phase peak is the larger of the two moments, so the prefill counts only beyond the decode's.
        kv = gen_rows * seq * (kv_token + pd)
        # q/k/v concatenated once per call (off CUDA also gate/up; decode_step.StepWeights); with LoRA a merged
        # copy of every adapted weight (bounded here by the whole blocks: all projections targeted)
        fused = s.layers * s.hidden * ((s.heads + 2 * s.kv_heads) * s.head_dim
                                       + (2 * s.intermediate if device != "cuda" else 0)) * pd
        if lora:
            fused = max(fused, s.layers * s.params_layer * pd)
        sampling = LOOP_SAMPLING_COPIES * gen_rows * s.vocab * 4
        prefill = (text_infer(prompts * prompt_len) + prompts * s.vocab * 4 + vision_infer(prompts)
                   + prompts * s.tokens_per_image * s.hidden * pd)
        ph.terms[f"KV cache (one preallocated, {gen_rows} rows x {seq} tokens)"] = kv
        ph.terms[f"prefill K/V of the {prompts} distinct prompts (until copied into their rows)"] = \
            prompts * prompt_len * kv_token
        ph.terms["decode step: fused q/k/v (CPU: + gate/up) copies; LoRA: merged weights"] = fused
        ph.terms[f"sampling ({gen_rows} rows x {s.vocab} fp32, {LOOP_SAMPLING_COPIES} buffers)"] = sampling
        ph.terms[f"prefill ({prompts} x {prompt_len} prompt tokens, {prompts} images), beyond the decode buffers"] = \
            max(0, prefill - (kv + fused + sampling))
        ph.notes.append(f"decode loop: prefill working set {prefill / GiB:.2f} GiB (vision tower once per prompt) "
                        f"before the decode buffers; finished rows are compacted within the same cache")
        if device == "cuda":
            # each captured step's [B, V] logits output (buckets sum to < 2 x rows, per SPAN = 256 columns)
            graph_out = 2 * gen_rows * s.vocab * pd * -(-seq // 256)
            ph.terms["CUDA graph outputs ([bucket, V] logits per captured step)"] = graph_out
            if shard == 1:
                # decode.workspace: unsharded weights stay put, so the KV cache, key mask, fused copies and
                # graphs stay allocated between rollouts (graphs captured once per run); sharded weights are
                # gathered anew each rollout and mrpo.decoding frees the workspace after each call
                held = kv + fused + graph_out
    else:   # transformers' generate: every row prefilled (its prompt repeated G times)
        static = cfg.rollout.decode in ("static", "static_compiled")
        ph.terms[f"KV cache ({'static' if static else 'dynamic'}, {gen_rows} rows x {seq} tokens)"] = \
            gen_rows * seq * kv_token
        ph.terms[f"prefill working set ({gen_rows} x {prompt_len} prompt tokens, no grad)"] = \
            text_infer(gen_rows * prompt_len) + SAMPLING_COPIES * gen_rows * s.vocab * 4
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
    if held:
        ph.terms["decode workspace held between rollouts (KV cache, fused copies, CUDA graphs)"] = held
    phases["logprobs"] = ph

    # ---- train: forward + backward of one micro-batch, then the optimizer step
    ph = Phase(dict(base))
    if working:
        ph.terms["parameters unsharded per unit (root + 2 blocks)"] = working
    if held:
        ph.terms["decode workspace held between rollouts (KV cache, fused copies, CUDA graphs)"] = held
    if engine == "fsdp2":
        # no-sync accumulation keeps every trainable parameter's gradient unsharded, upcast to reduce_dtype
        red = max(DTYPE_BYTES[d.reduce_dtype] if device == "cuda" else 4, t_bytes)
        if micro_batches > 1:   # reduce-scattered unit by unit into the shards at the last micro-batch
            ph.terms[f"gradients accumulated unsharded over {micro_batches} micro-batches"] = trainable * red
        else:
            ph.terms[f"gradients (1/{shard} shard)"] = trainable * t_bytes // shard
    elif engine == "deepspeed":
        ph.terms["ZeRO reduce bucket"] = min(ZERO_BUCKET, trainable) * pd
    elif has_master:   # one process with fp32 masters: gradients accumulate in fp32 buffers
        ph.terms["gradients (float32, accumulated over micro-batches)"] = trainable * 4
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
