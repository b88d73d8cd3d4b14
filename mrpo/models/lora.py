"""LoRA adapters (via peft) on the language model of a VL policy: apply, disable for the reference, save, merge.

Why `peft.inject_adapter_in_model` and not `get_peft_model`: injection replaces each targeted nn.Linear
in place by a `peft.tuners.lora.Linear` (base weight frozen, `lora_A` [r, in] and `lora_B` [out, r]
trainable) and returns the *same* model object. Its class, forward, `get_output_embeddings()` (and so
`install_passthrough_head` / `hidden_states_mode`), `model.model.language_model.layers` (FSDP2 units,
`Backbone.completion_hidden_states`), `generate` and the state-dict key names of every non-adapted
weight stay exactly as without LoRA. A `PeftModel` wrapper would insert `base_model.model.` into every
path and change the root module that FSDP2 / DeepSpeed wrap.

What is adapted (default): the decoder blocks' q/k/v/o and gate/up/down projections, matched by a
regular expression anchored at the decoder-layer list, so the vision tower's own `gate_proj` /
`up_proj` / `qkv` / `proj` (Qwen2.5-VL's visual blocks have the same names) stay untouched. All
other weights (vision tower, projector, embeddings, lm_head) are frozen. The lm_head is never
adapted: the fused MRPO loss reads `lm_head.weight` directly, so a low-rank delta on the head would be
silently ignored by the loss.

Output of an adapted projection, for input x [..., in]:
    y = x @ W.T + scaling * dropout(x) @ A.T @ B.T,   scaling = alpha / r   (alpha / sqrt(r) with rsLoRA)
B starts at zero (peft's default), so the freshly adapted policy equals the base model and the KL to
the reference starts at exactly 0.

Reference policy: `adapters_disabled(model)` runs the same module tree with every LoRA branch switched
off, i.e. the frozen base model; no second copy of the weights is needed.

Export: `save_adapter` writes a peft adapter folder (adapter_config.json + adapter_model.safetensors)
that `PeftModel.from_pretrained(base, folder)` loads; `merged_state_dict` folds W + scaling * B @ A
into plain base-model keys for a Hugging Face folder. Both accept a gathered full state dict, so they
work unchanged after FSDP2 (`get_model_state_dict(full_state_dict=True)`) or DeepSpeed consolidation.

How a trainer / engine uses it (cfg = the run config, cfg.lora.rank > 0):
  load       load_backbone -> install_passthrough_head -> apply_lora_from_config(model, cfg.lora, seed=cfg.seed)
             -> (freeze_vision_tower: already frozen) -> gradient checkpointing -> model.train()
             -> apply_fsdp2 / ZeROEngine -> optimizer over [p for p in model.parameters() if p.requires_grad]
  reference  no reference copy (skip _load_reference); with beta > 0:
             with torch.no_grad(), adapters_disabled(model): ref = <the policy's own log-prob path>
  checkpoint FSDP2 / single: get_state_dict / set_state_dict with options=checkpoint_state_dict_options()
             (adapters + their AdamW state only), then assert_adapters_loaded(model, result);
             DeepSpeed: engine.save_checkpoint(..., exclude_frozen_parameters=True) and
             load_checkpoint(..., load_module_strict=False)
  export     full state dict on rank 0 (FSDP2: get_model_state_dict(full_state_dict=True, cpu_offload=True);
             DeepSpeed: full_state_dict()) -> save_adapter(model, out/"adapter", sd) and, with
             cfg.lora.merge_on_export, backbone.save(out, state_dict=merged_state_dict(model, sd))
"""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from mrpo.errors import LoraError, UserInputError  # noqa: F401  (LoraError re-exported)

ADAPTER_NAME = "default"
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# peft's own file names (PeftModel.save_pretrained / from_pretrained)
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# PeftModel wraps the base model as PeftModel.base_model (LoraModel).model: its saved keys carry this prefix
_PEFT_PREFIX = "base_model.model."




def _require_peft():
    try:
        import peft  # noqa: F401
    except ImportError as e:   # pragma: no cover - peft is a core dependency
        raise ImportError("lora.rank > 0 needs the `peft` package (pip install 'peft>=0.18.1')") from e
    return peft


def _decoder_layers_prefix(model: nn.Module) -> str:
    """Dotted name of the language model's decoder-layer ModuleList, e.g. 'model.language_model.layers'."""
    from mrpo.models.parallelize import decoder_layers

    layers = decoder_layers(model)
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise LoraError(f"cannot locate the decoder layers of {type(model).__name__} by name")


def target_regex(model: nn.Module, target_modules: Sequence[str]) -> str:
    """peft `target_modules` regex (re.fullmatch on module names) for the given leaf names inside the
    language model's decoder layers only: e.g. r'model\\.language_model\\.layers\\.\\d+\\.(.*\\.)?(q_proj|...)'."""
    names = "|".join(re.escape(n) for n in target_modules)
    return rf"{re.escape(_decoder_layers_prefix(model))}\.\d+\.(?:.*\.)?(?:{names})"


def _check_targets(model: nn.Module, target_modules: Sequence[str]) -> list[str]:
    """Full names of the nn.Linear modules that will be adapted; errors name the `lora.target_modules` key."""
    if not target_modules:
        raise LoraError("lora.target_modules is empty: list at least one projection (e.g. q_proj)")
    if any(t in ("lm_head", "embed_tokens") for t in target_modules):
        raise LoraError(f"lora.target_modules={list(target_modules)}: lm_head / embed_tokens cannot be adapted "
                        f"(the fused loss reads lm_head.weight directly, so a low-rank delta would be ignored)")
    pattern = re.compile(target_regex(model, target_modules))
    found = {n: m for n, m in model.named_modules() if pattern.fullmatch(n)}
    leaf = {n.rsplit(".", 1)[-1] for n in found}
    missing = [t for t in target_modules if t not in leaf]
    if missing:
        available = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                            if isinstance(m, nn.Linear) and n.startswith(_decoder_layers_prefix(model) + ".")})
        raise LoraError(f"lora.target_modules: {missing} match no module in the decoder layers of "
                        f"{type(model).__name__}; linear layers there: {available}")
    not_linear = [n for n, m in found.items() if not isinstance(m, nn.Linear)]
    if not_linear:
        raise LoraError(f"lora.target_modules: {not_linear[:3]} are not nn.Linear layers")
    return sorted(found)


def apply_lora(model: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0,
               target_modules: Sequence[str] = DEFAULT_TARGET_MODULES, use_rslora: bool = False,
               adapter_dtype: torch.dtype | None = torch.float32, seed: int | None = None) -> nn.Module:
    """Inject LoRA adapters into `model` in place and freeze every other weight; returns the same model.

    rank: r (> 0); alpha: scaling numerator (None = 2 * rank); dropout on the adapter input;
    target_modules: leaf names of nn.Linear layers inside the decoder layers (never the vision tower,
    never lm_head); use_rslora: scaling alpha / sqrt(r); adapter_dtype: dtype of lora_A / lora_B
    (default float32 master weights even when the base is bf16: bf16 adapters lose small updates;
    None = the base layer's dtype); seed: makes lora_A's Kaiming init reproducible across ranks and runs
    (lora_B is zero, so the adapted model starts equal to the base).
    Call before FSDP2 / DeepSpeed wrapping and before building the optimizer (gradient checkpointing may
    be enabled before or after). Under torchrun pass the same seed on every rank: FSDP2 keeps each
    rank's own shard of its local initial values.
    """
    peft = _require_peft()
    if rank <= 0:
        raise LoraError(f"lora.rank={rank}: apply_lora needs rank > 0 (rank 0 means LoRA off)")
    if is_lora_model(model):
        raise LoraError("apply_lora: the model already has LoRA adapters")
    _check_targets(model, target_modules)
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank if alpha is None else alpha, lora_dropout=dropout,
                             target_modules=target_regex(model, target_modules), bias="none",
                             use_rslora=use_rslora, init_lora_weights=True)
    config.base_model_name_or_path = getattr(model, "name_or_path", None) or None
    fork = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with fork:
        if seed is not None:
            torch.manual_seed(seed)
        peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    # inject_adapter_in_model already leaves only the adapters trainable; make it explicit (and robust to
    # peft versions) so the vision tower, embeddings and lm_head are frozen whatever was set before
    for name, p in model.named_parameters():
        p.requires_grad_(_is_adapter_name(name))
    if adapter_dtype is not None:
        for name, p in model.named_parameters():
            if _is_adapter_name(name):
                p.data = p.data.to(adapter_dtype)
    model._mrpo_lora_config = config   # what save_adapter writes as adapter_config.json
    return model


def apply_lora_from_config(model: nn.Module, cfg, seed: int | None = None) -> nn.Module:
    """apply_lora with the `lora:` section of mrpo.config.Config (a mrpo.config.LoraConfig); no-op at rank 0."""
    if cfg.rank == 0:
        return model
    return apply_lora(model, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout,
                      target_modules=tuple(cfg.target_modules), use_rslora=cfg.use_rslora, seed=seed)


def _is_adapter_name(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every peft LoRA layer in the model."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def is_lora_model(model: nn.Module) -> bool:
    try:
        return next(lora_layers(model), None) is not None
    except ImportError:
        return False


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Within this block the model computes the frozen base model (every LoRA branch off): the
    reference policy for the KL term. Use under torch.no_grad(). The adapters' requires_grad flags are
    restored exactly on exit (peft's enable_adapters toggles them), so optimizer and FSDP2 state stay valid.
    Raises when the model has no adapters (a silent no-op would make the KL term 0 against itself)."""
    layers = [m for _, m in lora_layers(model)]
    if not layers:
        raise RuntimeError("adapters_disabled: the model has no LoRA adapters (apply_lora first)")
    flags = [(p, p.requires_grad) for m in layers for p in m.parameters()]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)
        for p, flag in flags:
            p.requires_grad_(flag)


def trainable_parameter_summary(model: nn.Module) -> dict:
    """{'trainable': int, 'total': int, 'percent': float}; DTensor (FSDP2) parameters count globally."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}


def checkpoint_state_dict_options(**kwargs):
    """torch.distributed.checkpoint StateDictOptions for a LoRA run's checkpoints: only the trainable
    parameters (the adapters) and their optimizer state are saved; loading is non-strict because the
    frozen base weights come from the model folder, not from the checkpoint. kwargs: further options
    (e.g. full_state_dict=True, cpu_offload=True). Use the same options for get_state_dict and
    set_state_dict, then check the result with assert_adapters_loaded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False, **kwargs)


def assert_adapters_loaded(model: nn.Module, incompatible) -> None:
    """Raise when set_state_dict(..., options=checkpoint_state_dict_options()) left a trainable
    parameter unloaded (its `missing_keys` may list frozen weights only). incompatible: the returned
    torch.nn.modules.module._IncompatibleKeys."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(trainable & set(getattr(incompatible, "missing_keys", []) or []))
    if missing:
        raise RuntimeError(f"checkpoint holds no value for {len(missing)} adapter weights, e.g. {missing[:3]} "
                           f"(saved with different lora.target_modules / rank?)")


def adapter_state_dict(model: nn.Module, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """Adapter weights in peft's saved layout: '<module>.lora_A.weight' [r, in] / '.lora_B.weight'
    [out, r] (adapter name removed, no 'base_model.model.' prefix).

    state_dict: a full (gathered, unsharded) state dict of the model, e.g. from
    get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
    ignore_frozen_params=True)) under FSDP2; default model.state_dict() (single process)."""
    sd = model.state_dict() if state_dict is None else state_dict
    tag = f".{ADAPTER_NAME}."
    out = {}
    for k, v in sd.items():
        if _is_adapter_name(k):
            out[k.replace(tag, ".")] = v.detach()
    if not out:
        raise RuntimeError("adapter_state_dict: no LoRA weights in the state dict (apply_lora first?)")
    return out


def save_adapter(model: nn.Module, out_dir: str | Path, state_dict: dict | None = None) -> Path:
    """Write a peft adapter folder (adapter_config.json + adapter_model.safetensors) that
    PeftModel.from_pretrained(base_model, out_dir) loads. state_dict: as in adapter_state_dict."""
    from safetensors.torch import save_file

    config = getattr(model, "_mrpo_lora_config", None)
    if config is None:
        raise RuntimeError("save_adapter: the model has no LoRA adapters applied by apply_lora")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {_PEFT_PREFIX + k: v.contiguous().cpu() for k, v in adapter_state_dict(model, state_dict).items()}
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    config.save_pretrained(str(out_dir))
    return out_dir


def merged_state_dict(model: nn.Module, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """State dict of the base architecture (no LoRA keys) with each adapted weight merged:
    W' = W + scaling * B @ A, computed in float32 and cast back to W's dtype.

    state_dict: a full (gathered) state dict of the adapted model including the frozen weights;
    default model.state_dict(). The result's keys equal the un-adapted model's, so
    save_pretrained(state_dict=...) writes an ordinary Hugging Face folder."""
    sd = model.state_dict() if state_dict is None else state_dict
    out = {k: v for k, v in sd.items() if not _is_adapter_name(k) and ".base_layer." not in k}
    for name, layer in lora_layers(model):
        if getattr(layer, "use_dora", {}).get(ADAPTER_NAME, False):
            raise LoraError("merged_state_dict: DoRA adapters are not supported")
        if getattr(layer, "fan_in_fan_out", False):
            raise LoraError(f"merged_state_dict: {name} stores its weight transposed (fan_in_fan_out)")
        w = sd[f"{name}.base_layer.weight"]
        a = sd[f"{name}.lora_A.{ADAPTER_NAME}.weight"].float()                  # [r, in]
        b = sd[f"{name}.lora_B.{ADAPTER_NAME}.weight"].float()                  # [out, r]
        out[f"{name}.weight"] = (w.float() + layer.scaling[ADAPTER_NAME] * (b @ a)).to(w.dtype)
        if f"{name}.base_layer.bias" in sd:
            out[f"{name}.bias"] = sd[f"{name}.base_layer.bias"]
    return out


def load_adapter_merged(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Load a peft adapter folder onto a base model (in place) and merge it into the base weights;
    returns a plain model of the original class (for inference: no LoRA overhead per token)."""
    peft = _require_peft()
    adapter_dir = Path(adapter_dir)
    for f in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
        if not (adapter_dir / f).is_file():
            raise FileNotFoundError(f"adapter folder {adapter_dir} is missing {f}")
    cfg = json.loads((adapter_dir / ADAPTER_CONFIG_NAME).read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter folder {adapter_dir}: peft_type {cfg.get('peft_type')!r} is not LORA")
    from safetensors.torch import load_file

    saved = load_file(str(adapter_dir / ADAPTER_WEIGHTS_NAME))
    wrapped = peft.PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    # peft only warns about adapter weights that match no module (they would be left at their init, B = 0:
    # the base model, silently); check every saved tensor arrived
    params = dict(wrapped.named_parameters())
    tag = f".{ADAPTER_NAME}."
    bad = [k for k, v in saved.items()
           if (p := params.get(k.replace(".lora_A.", f".lora_A{tag}").replace(".lora_B.", f".lora_B{tag}"))) is None
           or not torch.equal(p.detach().cpu().to(v.dtype), v)]
    if bad or not saved:
        raise ValueError(f"adapter folder {adapter_dir} does not fit {type(model).__name__}: "
                         f"{len(bad)} of {len(saved)} adapter weights not loaded, e.g. {bad[:2]}")
    return wrapped.merge_and_unload()
