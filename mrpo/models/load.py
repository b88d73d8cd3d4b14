"""Load a backbone (model + tokenizer + image processor) from a local Hugging Face folder.

One code path for real checkpoints (Qwen2.5-VL, Qwen3-VL, InternVL3 "-hf" folders) and for the tiny
models of mrpo.models.tiny. Nothing touches the network. Image processors are the PIL ones
(Qwen2VLImageProcessorPil for both Qwen families, GotOcr2ImageProcessorPil for InternVL): torchvision
cannot be used beside the CPU torch wheel.
"""
from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import torch

from mrpo.models.backbone import Backbone

MODEL_TYPES = {"qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl", "internvl": "internvl3"}
FAMILIES = tuple(MODEL_TYPES.values())


def _check_folder(path: Path) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"model folder not found: {path}")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any((path / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json",
                                               "pytorch_model.bin", "pytorch_model.bin.index.json")):
        missing.append("model weights (model.safetensors or model.safetensors.index.json)")
    if not any((path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        missing.append("tokenizer (tokenizer.json / tokenizer_config.json)")
    if not any((path / n).is_file() for n in ("preprocessor_config.json", "processor_config.json")):
        missing.append("image processor (preprocessor_config.json)")
    if missing:
        raise FileNotFoundError(f"model folder {path} is incomplete, missing: {', '.join(missing)}")


def resolve_attn_implementation(requested: str, device: torch.device) -> str:
    """flash_attention_2 only when flash-attn is installed and the device is CUDA; else sdpa (warned)."""
    if requested == "flash_attention_2":
        if device.type != "cuda" or importlib.util.find_spec("flash_attn") is None:
            why = "the device is not CUDA" if device.type != "cuda" else "flash-attn is not installed"
            warnings.warn(f"attn_implementation=flash_attention_2 requested but {why}; using sdpa", stacklevel=3)
            return "sdpa"
    return requested


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tok.chat_template is None:  # older checkpoints keep the template with the processor
        for name in ("chat_template.jinja", "chat_template.json"):
            f = path / name
            if f.is_file():
                text = f.read_text()
                tok.chat_template = json.loads(text)["chat_template"] if name.endswith(".json") else text
                break
        else:
            raise FileNotFoundError(f"model folder {path}: the tokenizer has no chat template")
    return tok


def _load_image_processor(path: Path, family: str, max_pixels: int | None):
    from transformers import GotOcr2ImageProcessorPil, Qwen2VLImageProcessorPil

    if family == "internvl3":
        proc = GotOcr2ImageProcessorPil.from_pretrained(path)
        tile = proc.size["height"] * proc.size["width"]
        # InternVL tiles the image: never feed more pixels than max_patches tiles hold
        limit = tile * max(1, proc.max_patches)
        return proc, min(limit, max_pixels) if max_pixels else limit
    proc = Qwen2VLImageProcessorPil.from_pretrained(path)
    if max_pixels is not None:
        proc.size["longest_edge"] = max_pixels
    return proc, proc.size["longest_edge"]


def load_backbone(path: str | Path, family: str | None = None, dtype: torch.dtype = torch.float32,
                  attn_implementation: str = "sdpa", device: str | torch.device = "cpu",
                  max_pixels: int | None = None) -> Backbone:
    """Load model, tokenizer and image processor from a local folder into a Backbone.

    family: "qwen2_5_vl" | "qwen3_vl" | "internvl3"; None = from config.model_type.
    max_pixels: image pixel budget (None = the image processor's own limit).
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    path = Path(path)
    _check_folder(path)
    config = AutoConfig.from_pretrained(path)
    detected = MODEL_TYPES.get(config.model_type)
    if detected is None:
        raise ValueError(f"model folder {path}: model_type {config.model_type!r} is not supported "
                         f"(supported: {sorted(MODEL_TYPES)})")
    if family is not None and family != detected:
        raise ValueError(f"model folder {path} holds a {detected} model (model_type {config.model_type!r}), "
                         f"but family={family!r} was requested")
    device = torch.device(device)
    attn = resolve_attn_implementation(attn_implementation, device)
    model = AutoModelForImageTextToText.from_pretrained(path, config=config, dtype=dtype, attn_implementation=attn)
    model.to(device)
    tok = _load_tokenizer(path)
    image_processor, limit = _load_image_processor(path, detected, max_pixels)

    pad = tok.pad_token_id if tok.pad_token_id is not None else model.generation_config.pad_token_id
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tok.eos_token_id is not None and tok.eos_token_id not in eos:
        eos.append(tok.eos_token_id)
    if pad is None:
        pad = eos[0]
    if detected == "internvl3":
        vision = [config.image_token_id, tok.start_image_token_id, tok.end_image_token_id,
                  tok.convert_tokens_to_ids(tok.video_token)]
    else:
        vision = [config.image_token_id, config.video_token_id, config.vision_start_token_id,
                  config.vision_end_token_id]
    vision = sorted({t for t in vision if t is not None and t != tok.unk_token_id})
    return Backbone(model=model, tokenizer=tok, image_processor=image_processor, family=detected,
                    pad_token_id=pad, eos_token_ids=eos, suppress_token_ids=vision, max_pixels=limit)
