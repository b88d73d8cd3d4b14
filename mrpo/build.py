"""Builders the trainer calls once at start-up: data splits, the policy backbone, the reference policy."""
from __future__ import annotations

import json
import logging
import math
import platform
from pathlib import Path

import torch
from safetensors import SafetensorError

from mrpo.errors import UserInputError
from mrpo.data.records import load_records
from mrpo.data.synthetic import generate_synthetic
from mrpo.distributed import barrier
from mrpo.models.load import load_backbone
from mrpo.models.lora import apply_lora_from_config
from mrpo.models.parallelize import freeze_vision_tower, install_passthrough_head
from mrpo.models.tiny import build_tiny

log = logging.getLogger("mrpo")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_splits(cfg, is_main: bool, min_train: int) -> tuple[list[dict], list[dict]]:
    """Train and test records (the synthetic set, generated once, when data.train_path is unset); bad rows
    are skipped and reported (or raise with data.on_bad_row=error)."""
    d = cfg.data
    train_path, test_path = d.train_path, d.test_path
    if train_path is None:
        if is_main:
            generate_synthetic(d.synthetic_dir, d.synthetic_train, d.synthetic_test, d.synthetic_seed)
        barrier()
        train_path = Path(d.synthetic_dir) / "train.jsonl"
        test_path = test_path or Path(d.synthetic_dir) / "test.jsonl"
    strict = d.on_bad_row == "error"
    splits = []
    for path in (train_path, test_path):
        if path is None:
            splits.append(([], None))
            continue
        key = "data.train_path" if path is train_path else "data.test_path"
        try:
            records, report = load_records(path, strict=strict, family=cfg.model.family)
        except FileNotFoundError:
            raise UserInputError(f"{key}={path}: file not found; point it at a prepared JSONL file "
                                 f"(python -m mrpo.data prepare)") from None
        except UnicodeDecodeError as e:
            raise UserInputError(f"{key}={path}: not UTF-8 text ({e.reason} at byte {e.start}); the record "
                                 f"file must be UTF-8 JSONL") from None
        except ValueError as e:   # data.on_bad_row=error: the first bad row, with its line and key
            raise UserInputError(f"{e}; fix the row, or set data.on_bad_row=skip to skip bad rows") from None
        if is_main and getattr(report, "skipped", 0):
            log.warning("%s: skipped %d bad rows (first: %s)", path, report.skipped,
                        getattr(report, "examples", [])[:5])
        splits.append((records, report))
    (train, report), (test, _) = splits
    if len(train) < min_train:
        why = f" ({report})" if report is not None and report.skipped else ""
        key = "data.train_path" if d.train_path is not None else "data.synthetic_train"
        raise UserInputError(f"{key}={d.train_path or d.synthetic_train}: {len(train)} usable training records, "
                             f"but one step needs {min_train} prompts{why}; fix the rows or use a larger file")
    return train, test


def model_path(cfg, is_main: bool) -> Path:
    """model.path, or the tiny offline model (built once next to the synthetic data)."""
    if cfg.model.path is not None:
        return Path(cfg.model.path)
    path = Path(cfg.data.synthetic_dir).parent / "models" / f"tiny_{cfg.model.family}_seed{cfg.model.tiny_seed}"
    if is_main:
        build_tiny(cfg.model.family, path, seed=cfg.model.tiny_seed)
    barrier()
    return path


def _load_backbone(cfg, path: Path, device: torch.device):
    """load_backbone with model.* settings; a user's model folder that cannot be loaded (missing or
    incomplete, unreadable files, another family) raises UserInputError naming model.path. The tiny
    model (model.path null) is ours: its failures keep their tracebacks."""
    m = cfg.model
    try:
        return load_backbone(path, family=m.family, dtype=DTYPES[m.dtype], attn_implementation=m.attn_implementation,
                             device=device)
    except (OSError, ValueError, SafetensorError) as e:
        if m.path is None:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserInputError(f"model.path={m.path}: cannot load the model: {first}; point model.path at a local "
                             f"Hugging Face folder of a {m.family} model (or set model.family to its family)") from None


def load_policy(cfg, path: Path, device: torch.device):
    """The trainable Backbone: pass-through lm_head (the fused loss reads hidden states), LoRA adapters
    (lora.rank > 0; everything else frozen), optional frozen vision tower and gradient checkpointing."""
    m = cfg.model
    backbone = _load_backbone(cfg, path, device)
    backbone.max_pixels = cfg.data.max_pixels
    backbone.reasoning_tag = m.reasoning_tag or backbone.reasoning_tag   # the prompt and the rewards agree
    install_passthrough_head(backbone.model)
    apply_lora_from_config(backbone.model, cfg.lora, seed=cfg.seed)   # rank 0: no-op; same init on every rank
    if m.freeze_vision:
        freeze_vision_tower(backbone.model)
    if m.gradient_checkpointing:
        backbone.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    backbone.model.train()
    return backbone


def load_reference(cfg, path: Path, device: torch.device) -> torch.nn.Module | None:
    """A frozen copy of the initial policy for the KL term (loss.beta > 0); None when not needed, or with
    LoRA, whose reference is the policy with its adapters disabled (no second copy)."""
    if cfg.loss.beta == 0 or cfg.lora.rank > 0:
        return None
    ref = _load_backbone(cfg, path, device).model
    install_passthrough_head(ref)
    ref.requires_grad_(False).eval()
    return ref


def write_run_files(cfg, out: Path, is_main: bool) -> None:
    """The resolved config and the library versions of the run (rank 0 writes; every rank calls)."""
    import transformers
    import triton

    if not is_main:
        barrier()
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(cfg.to_yaml())
    versions = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
                "triton": triton.__version__, "cuda": torch.version.cuda, "platform": platform.platform()}
    (out / "versions.json").write_text(json.dumps(versions, indent=1))
    barrier()


def lr_schedule(optim_cfg, total_steps: int):
    """LambdaLR factor per step: linear warm-up over optim.warmup_steps, then constant or cosine to 0."""
    def factor(step: int) -> float:
        warm = optim_cfg.warmup_steps
        if step < warm:
            return (step + 1) / warm
        if optim_cfg.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def progress_bar(total: int, desc: str, done: int, show: bool):
    """A tqdm bar starting at `done` of `total` (disabled unless show: rank 0 with logging.progress)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc=desc, dynamic_ncols=True, disable=not show)
