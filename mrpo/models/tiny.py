"""Tiny random-initialised Qwen2.5-VL / Qwen3-VL / InternVL3 backbones, built offline.

`build_tiny` writes a complete Hugging Face folder (config + safetensors via save_pretrained,
generation config, tokenizer with chat template, image processor config, processor_config.json) that
`load_backbone` (and
`AutoModelForImageTextToText.from_pretrained`) loads exactly like a real checkpoint. Each model uses
the real transformers classes at 2 text layers / hidden 128 / 2 vision layers (~1M parameters).

The tokenizer is a byte-level BPE trained locally with `tokenizers` on the synthetic corpus, with
the family's special tokens (pad <|endoftext|>, <|im_start|>, eos <|im_end|>, the vision tokens) and
the reasoning tags <think> </think> <thinking> </thinking> <answer> </answer> as normal added tokens
(they survive decoding with skip_special_tokens=True).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

FAMILIES = ("qwen2_5_vl", "qwen3_vl", "internvl3")
TAG_TOKENS = ["<think>", "</think>", "<thinking>", "</thinking>", "<answer>", "</answer>"]
BUILD_VERSION = 1
MARKER = "tiny_build.json"
VOCAB_SIZE = 2048          # BPE target (the corpus may saturate earlier); the model matches the tokenizer
HIDDEN = 128
IMAGE_SIZE = 56            # synthetic image side (InternVL tile size)

_QWEN_SPECIAL = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                 "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"}
_INTERNVL_SPECIAL = {"start_image_token": "<img>", "end_image_token": "</img>",
                     "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}

_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- IMAGE -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
_IMAGE_PLACEHOLDER = {"qwen2_5_vl": "'<|vision_start|><|image_pad|><|vision_end|>'",
                      "qwen3_vl": "'<|vision_start|><|image_pad|><|vision_end|>'",
                      "internvl3": "'<IMG_CONTEXT>\\n'"}


def build_tokenizer(family: str, corpus: list[str]):
    """Byte-level BPE trained on `corpus`, wrapped in PreTrainedTokenizerFast with the family's
    special tokens, the reasoning tags (normal added tokens) and a chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    extra = _INTERNVL_SPECIAL if family == "internvl3" else _QWEN_SPECIAL
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *extra.values()]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens=dict(extra), padding_side="left", model_max_length=4096,
        chat_template=_CHAT_TEMPLATE.replace("IMAGE", _IMAGE_PLACEHOLDER[family]),
    )
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    return tok


def _text_config(vocab: int, pad: int, eos: int, **extra) -> dict:
    return dict(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                pad_token_id=pad, eos_token_id=eos, bos_token_id=None, tie_word_embeddings=False, **extra)


def build_model(family: str, tok):
    """Random-initialised model of `family` (uses the current torch RNG) sized for `tok`."""
    from transformers import (InternVLConfig, InternVLForConditionalGeneration, Qwen2_5_VLConfig,
                              Qwen2_5_VLForConditionalGeneration, Qwen3VLConfig, Qwen3VLForConditionalGeneration)

    ids = tok.convert_tokens_to_ids
    vocab, pad, eos = len(tok), ids("<|endoftext|>"), ids("<|im_end|>")
    # head_dim 32: the M-RoPE sections (temporal, height, width) sum to head_dim / 2
    if family == "qwen2_5_vl":
        config = Qwen2_5_VLConfig(
            text_config=_text_config(vocab, pad, eos, rope_parameters={
                "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}),
            vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=14,
                               spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                               out_hidden_size=HIDDEN, fullatt_block_indexes=[1]),
            image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
            tie_word_embeddings=False)
        cls = Qwen2_5_VLForConditionalGeneration
    elif family == "qwen3_vl":
        config = Qwen3VLConfig(
            text_config=_text_config(vocab, pad, eos, head_dim=32, rope_parameters={
                "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 5, 5],
                "mrope_interleaved": True}),
            vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=16,
                               spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=HIDDEN,
                               num_position_embeddings=64, deepstack_visual_indexes=[0]),
            image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
            tie_word_embeddings=False)
        cls = Qwen3VLForConditionalGeneration
    elif family == "internvl3":
        patch = 14
        config = InternVLConfig(
            text_config=dict(model_type="qwen2", **_text_config(vocab, pad, eos)),
            vision_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                               image_size=[IMAGE_SIZE, IMAGE_SIZE], patch_size=[patch, patch]),
            image_token_id=ids("<IMG_CONTEXT>"), downsample_ratio=0.5,
            image_seq_length=int((IMAGE_SIZE // patch) ** 2 * 0.25), tie_word_embeddings=False)
        cls = InternVLForConditionalGeneration
    else:
        raise ValueError(f"unknown tiny family {family!r}; expected one of {FAMILIES}")
    model = cls(config)
    model.generation_config.eos_token_id = [eos, pad]   # like Qwen's generation_config: im_end, endoftext
    model.generation_config.pad_token_id = pad
    model.generation_config.bos_token_id = None
    return model


def build_image_processor(family: str):
    """The PIL image processor of the family at tiny sizes (see notes: no torchvision here)."""
    from transformers import GotOcr2ImageProcessorPil, Qwen2VLImageProcessorPil

    if family == "qwen2_5_vl":
        return Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2,
                                        min_pixels=56 * 56, max_pixels=112 * 112)
    if family == "qwen3_vl":
        return Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2,
                                        min_pixels=64 * 64, max_pixels=128 * 128,
                                        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    if family == "internvl3":
        return GotOcr2ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, crop_to_patches=False,
                                        min_patches=1, max_patches=4,
                                        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    raise ValueError(f"unknown tiny family {family!r}; expected one of {FAMILIES}")


def _marker(family: str, seed: int, corpus: list[str] | None) -> dict:
    digest = None if corpus is None else hashlib.sha256("\x00".join(corpus).encode()).hexdigest()[:16]
    return {"version": BUILD_VERSION, "family": family, "seed": seed, "corpus": digest}


def _read_marker(path: Path) -> dict | None:
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None


def build_tiny(family: str, out_dir: str | Path, seed: int = 0, corpus: list[str] | None = None) -> Path:
    """Write a tiny random `family` model folder to out_dir (reused when it already holds the same
    build: marker file tiny_build.json with family, seed and corpus hash). Returns out_dir.

    The folder is built in a temporary sibling and renamed into place, so concurrent callers (one per
    rank) are safe. Weights depend only on `seed`; the default corpus is synthetic_corpus(seed=0).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; expected one of {FAMILIES}")
    out_dir = Path(out_dir)
    want = _marker(family, seed, corpus)
    if _read_marker(out_dir) == want:
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()) and _read_marker(out_dir) is None:
        raise FileExistsError(f"{out_dir} exists and is not a tiny-model build; refusing to overwrite it")

    from mrpo.data.synthetic import synthetic_corpus

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tok = build_tokenizer(family, corpus if corpus is not None else synthetic_corpus())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_model(family, tok)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        image_processor = build_image_processor(family)
        image_processor.save_pretrained(tmp)
        from mrpo.models.backbone import Backbone   # processor_config.json, as Backbone.save writes it

        config = Backbone(model=model, tokenizer=tok, image_processor=image_processor, family=family).processor_config()
        (tmp / "processor_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / MARKER).write_text(json.dumps(want))
        for _ in range(3):
            try:
                os.rename(tmp, out_dir)
                return out_dir
            except OSError:
                current = _read_marker(out_dir)
                if current == want:            # another process finished the same build first
                    return out_dir
                if current is not None or not any(out_dir.iterdir()):
                    shutil.rmtree(out_dir, ignore_errors=True)   # an older tiny build or empty folder
        raise OSError(f"could not move the tiny build into {out_dir}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
