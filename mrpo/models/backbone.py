"""Backbone: one VL policy model (Qwen2.5-VL, Qwen3-VL or InternVL3) with its tokenizer and image processor.

The three things training needs from a backbone:
  encode_prompts           questions (+ prompt template) + 0..n images per row -> a left-padded batch for generate
  generate                 batched HF generate with KV cache -> completion token ids (no padding)
  completion_hidden_states teacher-forced forward over prompt + completion through the inner model
                           (no lm_head): hidden states that predict each completion token, packed
The processor is assembled here by hand (image processor + placeholder expansion + tokenizer), as
transformers' processor classes cannot be built without a video processor, which needs torchvision.
It follows their rules: Qwen puts prod(image_grid_thw) // merge_size**2 image tokens per image and marks
them 1 in mm_token_type_ids; InternVL puts <img>, then image_seq_length <IMG_CONTEXT> per tile (tiles +
thumbnail, crop_to_patches=True), then </img>. A row holds 0..n images, placed before the question in
the user turn; their tensors are concatenated row-major. `save` writes the processor_config.json those
classes read, so AutoProcessor loads an exported folder where torchvision is installed.

Under FSDP2 / ZeRO-3 over several ranks, a rank whose batch holds no image while another's does gets one
throwaway blank-image row in generate and completion_hidden_states, so that every rank runs the vision
tower and the ranks' collectives keep matching.

Positions: Qwen's 3D M-RoPE index is computed by the model from `mm_token_type_ids` and the attention
mask (so left padding of the prompt and right padding of the completion do not move any token);
InternVL (1-D RoPE) gets position_ids = cumsum(attention_mask) - 1, as generate computes them.

Padding-free training forwards (completion_hidden_states(packed=True), config loss.packing): the
sequences of a micro-batch are concatenated into one row without padding, positions restart per
sequence and the varlen attention of mrpo.models.varlen_attention keeps the sequences apart, with their
boundaries passed explicitly (per-sequence SDPA on CPU, varlen FlashAttention kernels on CUDA); see
packed_completion_hidden_states.
"""
from __future__ import annotations

import functools
import json
import logging
import string
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image
from transformers.generation import LogitsProcessorList, SuppressTokensLogitsProcessor

from mrpo.data.records import fit_max_pixels
from mrpo.models.varlen_attention import KWARG as PACKED_KWARG
from mrpo.models.varlen_attention import PackedSequences, base_implementation, text_config, use_varlen_attention

# The instruction of the MRPO paper (dmis-lab/MRPO, grpo_vqa_MRPO.py QUESTION_TEMPLATE), for every backbone;
# reasoning_tag is "thinking" for Qwen3-VL and "think" otherwise.
DEFAULT_PROMPT_TEMPLATE = ("{question} Think step-by-step and enclose your reasoning in "
                           "<{reasoning_tag}>...</{reasoning_tag}> tags. Then provide your answer in "
                           "<{answer_tag}>...</{answer_tag}> tags.")
PROMPT_FIELDS = ("question", "reasoning_tag", "answer_tag")
ANSWER_TAG = "answer"   # what mrpo.rewards.answer extracts
_PACKING_FALLBACK_WARNED: set[str] = set()   # reasons already warned about (completion_hidden_states(packed=True))


@functools.lru_cache(maxsize=32)
def load_prompt_template(spec: str | None) -> str:
    """The prompt template (data.prompt_template) as a format string.

    spec: None = DEFAULT_PROMPT_TEMPLATE (the paper's instruction); a string holding "{question}" is the
    template itself; any other string is the path of a UTF-8 text file holding one (read once; a
    trailing newline is dropped). Fields: {question} (required), {reasoning_tag} ("think", or "thinking"
    for Qwen3-VL), {answer_tag} ("answer"); write literal braces as {{ and }}.
    Raises FileNotFoundError / ValueError naming the file, a missing {question} or an unknown field."""
    if spec is None:
        return DEFAULT_PROMPT_TEMPLATE
    template, where = spec, "data.prompt_template"
    if "{question}" not in spec:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"data.prompt_template: {spec!r} holds no {{question}} field and is not a "
                                    f"file (a template, or the path of a text file holding one)")
        template, where = path.read_text(encoding="utf-8").removesuffix("\n"), f"data.prompt_template file {path}"
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise ValueError(f"{where}: not a valid format string ({e}); write literal braces as {{{{ and }}}}") from None
    unknown = sorted(fields - set(PROMPT_FIELDS))
    if unknown or "question" not in fields:
        why = f"unknown fields {unknown}" if unknown else "no {question} field"
        raise ValueError(f"{where}: {why}; allowed fields: {', '.join('{' + f + '}' for f in PROMPT_FIELDS)}")
    return template


def format_prompt(prompt_template: str | None, question: str, reasoning_tag: str) -> str:
    """The user turn's text for one question (see load_prompt_template)."""
    return load_prompt_template(prompt_template).format(question=question, reasoning_tag=reasoning_tag,
                                                        answer_tag=ANSWER_TAG)

# Rollouts sample from the policy's own distribution (only temperature / top_p / top_k, as configured): a
# checkpoint's generation_config.json (e.g. Qwen's top_k=1, repetition_penalty=1.05) and transformers'
# global defaults (top_k=50) are overridden with these neutral values. Only the settings that are not
# neutral already are passed (see _sampling_overrides): some neutral values still make generate() add a
# logits processor that changes no token yet costs time at every decoded position (min_p=0.0 adds a
# MinPLogitsWarper; min_new_tokens=0 becomes min_length=prompt length, a MinLengthLogitsProcessor).
_NEUTRAL_SAMPLING = dict(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, typical_p=1.0, epsilon_cutoff=0.0,
                         eta_cutoff=0.0, repetition_penalty=1.0, encoder_repetition_penalty=1.0,
                         no_repeat_ngram_size=0, min_length=0, min_new_tokens=0, num_beams=1,
                         num_return_sequences=1, bad_words_ids=None, suppress_tokens=None,
                         begin_suppress_tokens=None, forced_bos_token_id=None, forced_eos_token_id=None,
                         sequence_bias=None, exponential_decay_length_penalty=None, renormalize_logits=False,
                         guidance_scale=None, watermarking_config=None, remove_invalid_values=False,
                         output_scores=False, output_logits=False, return_dict_in_generate=False)
_WARPER_KEYS = ("temperature", "top_p", "top_k", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")  # sampling only


def _sampling_overrides(generation_config, do_sample: bool) -> dict:
    """The entries of _NEUTRAL_SAMPLING whose value generate() would otherwise take from
    `generation_config` (the model's; unset fields fall back to transformers' global defaults) and
    which differ from the neutral value. Keys this transformers' GenerationConfig lacks are skipped,
    and so are the warpers' (_WARPER_KEYS) when not sampling (greedy search applies none)."""
    defaults = {}
    if hasattr(generation_config, "_get_default_generation_params"):  # transformers >= 5: unset fields are None
        defaults = generation_config._get_default_generation_params()
    out = {}
    for key, neutral in _NEUTRAL_SAMPLING.items():
        if not _generation_config_has(key) or (not do_sample and key in _WARPER_KEYS):
            continue
        value = getattr(generation_config, key, None)
        if value is None:
            value = defaults.get(key)
        if value is not None and value != neutral:
            out[key] = neutral
    return out


class _SuppressTokens(SuppressTokensLogitsProcessor):
    """SuppressTokensLogitsProcessor with its [V] boolean mask built once per vocabulary size and device
    instead of at every decoded position (arange + isin each call); the same scores (-inf at the
    suppressed ids), so the same tokens."""

    def __init__(self, suppress_tokens: list[int]):
        super().__init__(suppress_tokens)
        self._masks: dict[tuple[int, torch.device], torch.Tensor] = {}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        key = (scores.shape[-1], scores.device)
        mask = self._masks.get(key)
        if mask is None:
            mask = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
            ids = self.suppress_tokens.to(scores.device)
            mask[ids[ids < scores.shape[-1]]] = True
            self._masks[key] = mask
        return scores.masked_fill(mask, -float("inf"))


class PromptTooLongError(ValueError):
    """A prompt (text + image tokens) is longer than max_prompt_length. `index`: the first such row of
    the batch, `indices`: all of them, `lengths`: their token counts."""

    def __init__(self, index: int, indices: list[int] | None = None, lengths: list[int] | None = None,
                 limit: int | None = None):
        self.index, self.indices, self.lengths, self.limit = index, indices or [index], lengths or [], limit
        super().__init__(f"prompt {index} has {self.lengths[0] if self.lengths else '?'} tokens > "
                         f"max_prompt_length={limit} (over-long rows in this batch: {self.indices})")


STATIC_CACHE_ROUND = 128   # static KV cache lengths are rounded up to a multiple of this many tokens
_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """logging warning, once per distinct message per process."""
    if message not in _WARNED:
        _WARNED.add(message)
        logging.getLogger("mrpo").warning(message)


@functools.lru_cache(maxsize=None)
def _generation_config_has(key: str) -> bool:
    """Whether this transformers' GenerationConfig knows `key` (generate() rejects unknown keys)."""
    from transformers import GenerationConfig

    return hasattr(GenerationConfig(), key)


@dataclass
class Backbone:
    model: torch.nn.Module
    tokenizer: object
    image_processor: object
    family: str                                  # "qwen2_5_vl" | "qwen3_vl" | "internvl3"
    reasoning_tag: str = ""                      # "thinking" for qwen3_vl, else "think"
    pad_token_id: int = 0
    eos_token_ids: list[int] = field(default_factory=list)
    suppress_token_ids: list[int] = field(default_factory=list)   # vision tokens: never generated
    max_pixels: int | None = None                # images are downscaled to at most this many pixels
    _suppress: object = field(default=None, init=False, repr=False, compare=False)   # _SuppressTokens, built once

    def __post_init__(self):
        if not self.reasoning_tag:
            self.reasoning_tag = "thinking" if self.family == "qwen3_vl" else "think"

    # ------------------------------------------------------------------ prompts
    @property
    def is_qwen(self) -> bool:
        return self.family in ("qwen2_5_vl", "qwen3_vl")

    @property
    def image_token(self) -> str:
        if self.is_qwen:
            return getattr(self.tokenizer, "image_token", None) or "<|image_pad|>"
        return self.tokenizer.context_image_token

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    def chat_prompt(self, question: str, num_images: int = 1, prompt_template: str | None = None) -> str:
        """Chat-template text: one user turn = `num_images` image placeholders (in record order), then
        the question formatted with the prompt template (None = the paper's instruction, see
        load_prompt_template), followed by the generation prompt (assistant turn opened)."""
        text = format_prompt(prompt_template, question, self.reasoning_tag)
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
        messages = [{"role": "user", "content": content}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _expand_images(self, prompts: list[str], images: list[list[Image.Image]]) -> tuple[list[str], dict]:
        """Run the image processor over all images of the batch (row-major) and expand each image
        placeholder, in order, into the number of image tokens the model expects for that image.
        Returns (expanded prompts, image tensors; {} when the batch holds no image)."""
        placeholder = self.image_token
        for i, (p, ims) in enumerate(zip(prompts, images)):
            if p.count(placeholder) != len(ims):
                raise ValueError(f"prompt {i} holds {p.count(placeholder)} image placeholders {placeholder!r} "
                                 f"for {len(ims)} images")
        flat = [im for ims in images for im in ims]
        if not flat:
            return list(prompts), {}
        if self.is_qwen:
            kwargs = {}
            if self.max_pixels is not None:   # smart_resize rounds to the patch grid within this budget
                lo = min(self.image_processor.size["shortest_edge"], self.max_pixels)
                kwargs["size"] = {"shortest_edge": lo, "longest_edge": self.max_pixels}
            out = self.image_processor(images=flat, return_tensors="pt", **kwargs)
            merge = self.image_processor.merge_size ** 2
            tokens = [placeholder * n for n in (out["image_grid_thw"].prod(-1) // merge).tolist()]
            vision = {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}
        else:
            # InternVL: tiles (+ thumbnail) per image, image_seq_length tokens per tile, wrapped in <img>...</img>
            out = self.image_processor(images=flat, crop_to_patches=True, return_tensors="pt")
            seq, tok = self.model.config.image_seq_length, self.tokenizer
            tokens = [f"{tok.start_image_token}{placeholder * (seq * n)}{tok.end_image_token}"
                      for n in out["num_patches"].tolist()]
            vision = {"pixel_values": out["pixel_values"]}
        expanded, k = [], 0
        for p, ims in zip(prompts, images):
            parts = p.split(placeholder)
            expanded.append(parts[0] + "".join(tokens[k + j] + parts[j + 1] for j in range(len(ims))))
            k += len(ims)
        return expanded, vision

    def encode_prompts(self, questions: list[str], images: list[list[Image.Image]] | list[Image.Image],
                       max_prompt_length: int | None = None, prompt_template: str | None = None
                       ) -> dict[str, torch.Tensor]:
        """Left-padded batch for generate.

        questions: B question texts (the prompt template adds the instruction); images: B lists of PIL
        images, each list in the order the model sees them ([] = text-only row; a bare image counts as
        [image]); prompt_template: see load_prompt_template (None = the paper's instruction).
        Keys: input_ids [B, P], attention_mask [B, P]; when the batch holds N >= 1 images, pixel_values
        (Qwen: [sum of patches, C*T*p*p] with image_grid_thw [N, 3], images row-major; InternVL:
        [tiles, 3, H, W]); Qwen also mm_token_type_ids [B, P] (1 on image tokens). Images are
        downscaled to <= max_pixels first.
        Raises PromptTooLongError when a prompt (image tokens included) exceeds max_prompt_length."""
        if len(questions) != len(images):
            raise ValueError(f"encode_prompts: {len(questions)} questions but {len(images)} image lists")
        images = [[ims] if isinstance(ims, Image.Image) else list(ims) for ims in images]
        images = [[fit_max_pixels(im.convert("RGB"), self.max_pixels) for im in ims] for ims in images]
        prompts = [self.chat_prompt(q, len(ims), prompt_template) for q, ims in zip(questions, images)]
        prompts, vision = self._expand_images(prompts, images)
        enc = self.tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt",
                             add_special_tokens=False)
        if max_prompt_length is not None:
            lengths = enc["attention_mask"].sum(-1).tolist()
            bad = [i for i, n in enumerate(lengths) if n > max_prompt_length]
            if bad:
                raise PromptTooLongError(bad[0], bad, [lengths[i] for i in bad], max_prompt_length)
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], **vision}
        if self.is_qwen:
            batch["mm_token_type_ids"] = (enc["input_ids"] == self.image_token_id).int()
        device = self.model.device
        dtype = self.model.dtype
        return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None)
                for k, v in batch.items()}

    def select_rows(self, batch: dict, rows: list[int]) -> dict[str, torch.Tensor]:
        """Sub-batch (or repeated batch, e.g. each row G times) of an encode_prompts batch, with the
        image tensors split per row and the left-padding columns that every kept row shares removed;
        equal to encode_prompts of the selected rows."""
        idx = torch.as_tensor(list(rows), dtype=torch.long, device=batch["input_ids"].device)
        out = {k: batch[k][idx] for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in batch}
        if "pixel_values" in batch:
            row_tokens = (batch["input_ids"] == self.image_token_id).sum(-1).tolist()
            if self.is_qwen:   # flat patches; image i holds prod(image_grid_thw[i]) of them
                grid = batch["image_grid_thw"]
                per_image = grid.prod(-1).tolist()
                tokens = (grid.prod(-1) // self.image_processor.merge_size ** 2).tolist()
                images_of_row, k = [], 0   # images are row-major: consume them until the row's tokens are covered
                for n in row_tokens:
                    start = k
                    while n > 0:
                        n -= tokens[k]
                        k += 1
                    images_of_row.append(list(range(start, k)))
                chunks = batch["pixel_values"].split(per_image)
                picked = [i for r in idx.tolist() for i in images_of_row[r]]
                if picked:
                    out["image_grid_thw"] = grid[picked]
                    out["pixel_values"] = torch.cat([chunks[i] for i in picked])
            else:              # InternVL: tiles per row = image tokens / image_seq_length
                per_row = [n // self.model.config.image_seq_length for n in row_tokens]
                chunks = batch["pixel_values"].split(per_row)
                picked = [chunks[r] for r in idx.tolist() if per_row[r]]
                if picked:
                    out["pixel_values"] = torch.cat(picked)
        lead = int((out["attention_mask"].cumsum(-1) == 0).sum(-1).min()) if len(idx) else 0
        for k in ("input_ids", "attention_mask", "mm_token_type_ids"):
            if k in out:
                out[k] = out[k][:, lead:]
        return out

    # ------------------------------------------------------------------ sharded runs without images
    @staticmethod
    def _is_sharded(model) -> bool:
        """FSDP2 or DeepSpeed ZeRO-3 over several processes: every rank must call the same modules."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return False
        from torch.distributed.fsdp import FSDPModule

        return isinstance(model, FSDPModule) or hasattr(next(model.parameters()), "ds_id")   # ds_id: ZeRO-3

    def _vision_filler(self, batch: dict, model) -> dict | None:
        """A one-row batch with a blank image, for a sharded rank whose batch holds no image while
        another rank's does: that rank runs the vision tower (gathering its shards) and this one would
        not, so their collectives would stop matching and hang. The caller appends the row to its batch
        and drops the row's output. None when not needed (one flag all-reduced over the ranks)."""
        if not self._is_sharded(model):
            return None
        has = torch.tensor([float("pixel_values" in batch)], device=batch["input_ids"].device)
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        if "pixel_values" in batch or has.item() == 0:
            return None
        proc = self.image_processor
        side = proc.size["height"] if not self.is_qwen else proc.patch_size * proc.merge_size
        messages = [{"role": "user", "content": [{"type": "image"}]}]
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt, vision = self._expand_images([prompt], [[Image.new("RGB", (side, side))]])
        ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        filler = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **vision}
        if self.is_qwen:
            filler["mm_token_type_ids"] = (ids == self.image_token_id).int()
        device, dtype = batch["input_ids"].device, self.model.dtype
        return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in filler.items()}

    def _append_row(self, batch: dict, row: dict) -> dict:
        """batch + one more row (left-padded to a common length); the row brings the only image tensors."""
        P = max(batch["input_ids"].shape[1], row["input_ids"].shape[1])
        out = {}
        for k, pad in (("input_ids", self.pad_token_id), ("attention_mask", 0), ("mm_token_type_ids", 0)):
            if k in batch:
                a, b = batch[k], row[k]
                a = torch.nn.functional.pad(a, (P - a.shape[1], 0), value=pad)
                b = torch.nn.functional.pad(b, (P - b.shape[1], 0), value=pad)
                out[k] = torch.cat([a, b.to(a.dtype)])
        out.update({k: v for k, v in row.items() if k not in out})
        return out

    # ------------------------------------------------------------------ generation
    def decode_kwargs(self, decode: str, cache_len: int) -> dict:
        """generate() keyword arguments of a decode path (rollout.decode).

        eager: transformers' default dynamic KV cache, no compilation.
        static: a pre-allocated StaticCache of `cache_len` positions (rounded up to a multiple of
          STATIC_CACHE_ROUND tokens, so that steps whose prompts differ a little reuse one cache shape), no
          compilation (disable_compile).
        static_compiled: the same cache, and on CUDA transformers compiles the decode step
          (CompileConfig mode "reduce-overhead": CUDA graphs); elsewhere transformers does not compile
          (only CUDA/XPU-type devices qualify), so it runs as `static`.
        A model class without transformers' static-cache/compile support (`_can_compile_fullgraph` false)
        falls back to eager with a one-time warning naming the family."""
        if decode == "eager":
            return {}
        if decode not in ("static", "static_compiled"):
            raise ValueError(f"rollout.decode={decode!r}: expected eager, static or static_compiled")
        if not getattr(self.model, "_can_compile_fullgraph", False):
            _warn_once(f"rollout.decode={decode}: the {self.family} model class ({type(self.model).__name__}) "
                       f"does not support transformers' static KV cache; falling back to eager decoding")
            return {}
        n = STATIC_CACHE_ROUND
        kwargs = dict(cache_implementation="static")
        if _generation_config_has("max_cache_len"):   # transformers without it sizes the cache to the call
            kwargs["max_cache_len"] = -(-cache_len // n) * n
        if decode == "static_compiled" and self.model.device.type == "cuda":
            from transformers import CompileConfig

            kwargs["compile_config"] = CompileConfig(fullgraph=False, dynamic=False, mode="reduce-overhead")
        elif _generation_config_has("disable_compile"):
            kwargs["disable_compile"] = True
        return kwargs

    @torch.no_grad()
    def generate(self, batch: dict, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 do_sample: bool = True, synced_gpus: bool = False, decode: str = "eager", top_k: int = 0,
                 logits_processors: list | None = None) -> list[list[int]]:
        """Batched generate with KV cache. Returns each completion's token ids without padding,
        cut after (and including) the first EOS; a completion without EOS has max_new_tokens ids.
        decode: eager | static | static_compiled (see decode_kwargs; greedy ids are the same on every path).
        top_k: sample among the k most likely tokens only (0 = off). logits_processors: more processors run
        after the vision-token suppression (and before generate's own temperature / top-k / top-p warpers)."""
        kwargs = dict(_sampling_overrides(self.model.generation_config, do_sample), max_new_tokens=max_new_tokens,
                      do_sample=do_sample, use_cache=True, pad_token_id=self.pad_token_id,
                      eos_token_id=self.eos_token_ids, synced_gpus=synced_gpus)
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
            if top_k > 0:
                kwargs["top_k"] = top_k
        if self.suppress_token_ids:
            if self._suppress is None:
                self._suppress = _SuppressTokens(self.suppress_token_ids)
            kwargs["logits_processor"] = LogitsProcessorList([self._suppress])
        if logits_processors:
            kwargs["logits_processor"] = LogitsProcessorList([*kwargs.get("logits_processor", []), *logits_processors])
        rows = batch["input_ids"].shape[0]
        filler = self._vision_filler(batch, self.model)
        if filler is not None:
            batch = self._append_row(batch, filler)
        kwargs.update(self.decode_kwargs(decode, batch["input_ids"].shape[1] + max_new_tokens))
        # a sharded model generates inside its engine's generation() context (mrpo/engines)
        seqs = self.model.generate(**batch, **kwargs)
        new = seqs[:rows, batch["input_ids"].shape[1]:].tolist()
        eos = set(self.eos_token_ids)
        out = []
        for row in new:
            cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            out.append(row[:cut])
        return out

    # ------------------------------------------------------------------ teacher forcing
    def _teacher_forcing_batch(self, batch: dict, completions: list[list[int]], model
                               ) -> tuple[dict, list[list[int]], torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
        """The padded [B, P + T] teacher-forcing layout both forward paths start from (the sharded
        vision filler row appended when needed, see _vision_filler).
        Returns (batch, completions, ids [B, P+T], mask [B, P+T] (left-padded prompt, right-padded
        completion), comp_mask [B, T] bool, P, T)."""
        if len(completions) != batch["input_ids"].shape[0]:
            raise ValueError(f"completion_hidden_states: {len(completions)} completions for a batch of "
                             f"{batch['input_ids'].shape[0]}")
        filler = self._vision_filler(batch, model)
        if filler is not None:   # its empty completion adds no hidden state; its cu_seqlens entry is dropped
            batch, completions = self._append_row(batch, filler), list(completions) + [[]]
        input_ids, prompt_mask = batch["input_ids"], batch["attention_mask"]
        B, P = input_ids.shape
        device = input_ids.device
        lengths = torch.tensor([len(c) for c in completions], dtype=torch.long, device=device)
        T = int(lengths.max()) if B else 0
        comp = torch.full((B, T), self.pad_token_id, dtype=torch.long, device=device)
        for i, c in enumerate(completions):
            comp[i, : len(c)] = torch.as_tensor(c, dtype=torch.long, device=device)
        comp_mask = torch.arange(T, device=device)[None, :] < lengths[:, None]        # [B, T]
        ids = torch.cat([input_ids, comp], dim=1)
        mask = torch.cat([prompt_mask, comp_mask.to(prompt_mask.dtype)], dim=1)
        return batch, completions, ids, mask, comp_mask, P, T

    @staticmethod
    def _cu_seqlens(completions: list[list[int]], rows: int, device) -> torch.Tensor:
        """[rows + 1] int32 offsets of each completion's tokens in the packed outputs."""
        cu = torch.zeros(len(completions) + 1, dtype=torch.int32, device=device)
        cu[1:] = torch.cumsum(torch.tensor([len(c) for c in completions], device=device), 0).to(torch.int32)
        return cu[: rows + 1]

    @staticmethod
    def _run(model, inputs: dict) -> torch.Tensor:
        """Final-norm hidden states [rows, S, D] of one forward (see completion_hidden_states)."""
        if getattr(model.get_output_embeddings(), "passthrough", False):
            return model(**inputs).logits              # lm_head returns its input
        return model.model(**inputs).last_hidden_state

    def completion_hidden_states(self, batch: dict, completions: list[list[int]], model=None, packed: bool = False
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher-forced forward over prompt + completion, without computing logits.

        batch: encode_prompts output (B rows); completions: B lists of token ids; model: the model to
        run (default self.model; e.g. a reference copy of the same family); packed: run the padding-free
        forward instead (packed_completion_hidden_states: same outputs, no padding tokens; when
        packing_unsupported(model), the padded forward runs after a one-time warning).
        Returns hidden [N, D] (final-norm hidden states; row t predicts completion token t; N = total
        completion tokens, packed in batch order), targets [N] int64, cu_seqlens [B+1] int32.
        Gradients flow. Afterwards self.last_padding_fraction = padding tokens / tokens of the forward.
        Two ways to skip the lm_head: when the model's output embedding has `passthrough=True`
        (mrpo.models.parallelize.hidden_states_mode) the root model(...) runs and its "logits" are the
        hidden states, through every FSDP2 hook; otherwise the inner model.model(...) runs, and under
        FSDP2 the caller calls model.unshard() before and model.reshard() after the backward.
        """
        model = self.model if model is None else model
        if packed:
            why = self.packing_unsupported(model)
            if why is None:
                return self.packed_completion_hidden_states(batch, completions, model)
            if why not in _PACKING_FALLBACK_WARNED:   # once per reason, not at every micro-batch
                _PACKING_FALLBACK_WARNED.add(why)
                warnings.warn(f"loss.packing: cannot pack with {why}; running the padded forward instead",
                              stacklevel=2)
        rows = len(completions)
        batch, completions, ids, mask, comp_mask, P, T = self._teacher_forcing_batch(batch, completions, model)
        inputs = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
        if self.is_qwen:   # completion tokens are text (0): M-RoPE positions continue after the prompt
            inputs["mm_token_type_ids"] = self._full_mm_token_type_ids(batch, T)
        else:              # 1-D RoPE: positions skip the left padding, exactly as generate computes them
            inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        inputs.update(input_ids=ids, attention_mask=mask, use_cache=False)
        hidden = self._run(model, inputs)[:, P - 1 : P - 1 + T]                          # [B, T, D]
        self._last_tokens = (mask.sum(), mask.numel())                                 # read lazily: no host sync
        comp = ids[:, P:]
        return hidden[comp_mask], comp[comp_mask], self._cu_seqlens(completions, rows, ids.device)

    @property
    def last_padding_fraction(self) -> float | None:
        """Padding tokens / all tokens of the last completion_hidden_states forward (0.0 when packed;
        None before the first). Reading it syncs with the device once."""
        last = getattr(self, "_last_tokens", None)
        if last is None:
            return None
        real, total = last
        return 1.0 - float(real) / total if total else 0.0

    def _full_mm_token_type_ids(self, batch: dict, T: int) -> torch.Tensor:
        """Qwen: mm_token_type_ids [B, P + T] of prompt + completion (completion tokens are text, 0)."""
        mm = batch["mm_token_type_ids"]
        return torch.cat([mm, mm.new_zeros(mm.shape[0], T)], dim=1)

    def packing_unsupported(self, model=None) -> str | None:
        """Why the padding-free forward cannot run on `model` (None: it can). The packed forward switches the
        language model to the varlen attention over its implementation (mrpo.models.varlen_attention),
        which runs these bases unchanged when not packed; another kernel is refused."""
        model = self.model if model is None else model
        attn_text = base_implementation(text_config(model)._attn_implementation)   # the language model packs
        ok = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")
        if attn_text not in ok:
            return f"attention implementation {attn_text!r} (packing needs one of {', '.join(ok)})"
        return None

    def packed_completion_hidden_states(self, batch: dict, completions: list[list[int]], model=None
                                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """completion_hidden_states without padding: the B sequences (prompt without its left padding,
        then the completion) are concatenated into one row [1, L], L = sum of their lengths.

        Same arguments and outputs as completion_hidden_states (hidden [N, D], targets [N] int64,
        cu_seqlens [B+1] int32; equal to the padded forward's up to float rounding). Sets
        last_padding_fraction = 0.0 (no padding token is computed).

        How the sequences stay independent: the model's language model is switched (once, see
        mrpo.models.varlen_attention.use_varlen_attention) to the varlen attention, and the forward gets
        the sequence boundaries as the kwarg `packed_sequences` (PackedSequences: cu_seqlens, max length,
        lengths), which transformers hands to the attention function of every decoder layer; no attention
        mask is passed or built, and no boundary is inferred from the positions.
        Positions: InternVL (1-D RoPE) gets 0..len-1 per sequence, as in the padded forward; Qwen gets the 3
        M-RoPE rows [3, 1, L]: the prompts' from the model's own get_rope_index (it skips padding; once per
        distinct prompt), the completion's continuing one by one after the last prompt token: the padded
        forward's positions (for a batch without images, where the padded forward counts the left padding,
        they differ by a constant per sequence, which RoPE attention does not see).
        Images: pixel_values / image_grid_thw stay in batch order, which is the packed token order.
        Raises RuntimeError when packing_unsupported(model) (the caller uses the padded path)."""
        model = self.model if model is None else model
        rows = len(completions)
        inputs, pick, targets, completions = self._packed_inputs(batch, completions, model)
        hidden = self._run(model, inputs)[0, pick]                                # [N, D]
        L = inputs["input_ids"].shape[1]
        self._last_tokens = (L, L)
        return hidden, targets, self._cu_seqlens(completions, rows, targets.device)

    def _packed_inputs(self, batch: dict, completions: list[list[int]], model
                       ) -> tuple[dict, torch.Tensor, torch.Tensor, list[list[int]]]:
        """The model inputs of the packed forward (one row [1, L] and its PackedSequences, see
        packed_completion_hidden_states), pick [L] bool (the tokens whose hidden states predict the
        completion tokens, in order), targets [N] int64 and the completions (plus the vision filler's empty
        one when appended). Switches `model` to the varlen attention."""
        why = self.packing_unsupported(model)
        if why is not None:
            raise RuntimeError(f"packed_completion_hidden_states: cannot pack with {why}; "
                               f"use completion_hidden_states(packed=False)")
        use_varlen_attention(model)
        batch, completions, ids, mask, comp_mask, P, T = self._teacher_forcing_batch(batch, completions, model)
        real = mask.bool()                                                        # [B, S]; row-major = packed order
        prompt_lengths = batch["attention_mask"].sum(-1).tolist()                 # the boundaries, on the host
        seqs = PackedSequences.from_lengths([p + len(c) for p, c in zip(prompt_lengths, completions)], ids.device)
        inputs = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
        if self.is_qwen:
            prompt_pos = self._prompt_mrope(batch)                                               # [3, B, P]
            # completion tokens are text: positions continue one by one after the last prompt token
            comp_pos = prompt_pos[:, :, -1:] + 1 + torch.arange(T, device=ids.device)             # [3, B, T]
            mrope = torch.cat([prompt_pos, comp_pos], dim=-1)                                     # [3, B, S]
            inputs["position_ids"] = mrope[:, real][:, None]                                      # [3, 1, L]
            inputs["mm_token_type_ids"] = self._full_mm_token_type_ids(batch, T)[real][None]
        else:              # position of each real token within its own sequence: restarts at 0 for each one
            inputs["position_ids"] = (mask.long().cumsum(-1) - 1)[real][None]    # [1, L]
        inputs.update(input_ids=ids[real][None], use_cache=False, **{PACKED_KWARG: seqs})   # no attention_mask
        # the hidden state at column P-1+t of the padded layout predicts completion token t (a real token)
        pick = torch.zeros_like(real)
        pick[:, P - 1 : P - 1 + T] = comp_mask
        return inputs, pick[real], ids[:, P:][comp_mask], completions

    def _prompt_mrope(self, batch: dict) -> torch.Tensor:
        """Qwen: the M-RoPE positions [3, B, P] of the prompts (left padding 0) from the model's own
        get_rope_index (reads only the config: safe under FSDP), computed once per distinct prompt (a
        micro-batch repeats each prompt for its G completions; the call costs ~1 ms per row on CPU)."""
        ids, mask, mm = batch["input_ids"], batch["attention_mask"], batch["mm_token_type_ids"]
        grid = batch.get("image_grid_thw")
        # a row's images are its runs of image tokens, row-major in image_grid_thw (as get_rope_index reads them)
        run_starts = (mm == 1) & (torch.nn.functional.pad(mm, (1, 0))[:, :-1] != 1)
        first_image = [0] + torch.cumsum(run_starts.sum(-1), 0).tolist()
        grids = grid.tolist() if grid is not None else []
        keys = [(tuple(row), tuple(map(tuple, grids[first_image[b]:first_image[b + 1]])))
                for b, row in enumerate((ids * mask).tolist())]
        distinct: dict = {}
        of_row = torch.tensor([distinct.setdefault(k, len(distinct)) for k in keys], device=ids.device)
        rows = [keys.index(k) for k in distinct]                                  # first row of each distinct prompt
        sub_grid = None
        if grid is not None:
            picked = [i for b in rows for i in range(first_image[b], first_image[b + 1])]
            sub_grid = grid[torch.tensor(picked, dtype=torch.long, device=grid.device)] if picked else None
        pos, _ = self.model.model.get_rope_index(ids[rows], mm_token_type_ids=mm[rows], attention_mask=mask[rows],
                                                 image_grid_thw=sub_grid)                 # [3, U, P]
        return pos[:, of_row]

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The output embedding weight [V, D] (logits = hidden @ W.T)."""
        return self.model.get_output_embeddings().weight

    # ------------------------------------------------------------------ export
    def processor_config(self) -> dict:
        """processor_config.json as transformers 5 writes it for this family's processor (written by
        `save`, since the processor object cannot be built without torchvision, see module docstring):
        processor_class, the nested image_processor and video_processor configs (the video processor
        shares the image processor's patching and normalisation) and, for InternVL, image_seq_length."""
        image = self.image_processor.to_dict()
        same = {k: image[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean",
                                      "image_std", "do_convert_rgb") if k in image}
        if self.family == "internvl3":
            return {"processor_class": "InternVLProcessor", "image_seq_length": self.model.config.image_seq_length,
                    "image_processor": image,
                    "video_processor": {"video_processor_type": "InternVLVideoProcessor", **same,
                                        "size": dict(image["size"])}}
        cls = "Qwen3VL" if self.family == "qwen3_vl" else "Qwen2_5_VL"
        video = "Qwen3VLVideoProcessor" if self.family == "qwen3_vl" else "Qwen2VLVideoProcessor"
        return {"processor_class": f"{cls}Processor", "image_processor": image,
                "video_processor": {"video_processor_type": video, **same}}

    def save(self, out_dir: str | Path, state_dict: dict | None = None) -> Path:
        """Write a Hugging Face folder (safetensors, config, generation config, tokenizer + chat
        template, image processor, processor_config.json) loadable by load_backbone,
        AutoModelForImageTextToText, AutoTokenizer, AutoImageProcessor and, where torchvision is
        installed (transformers' video processors need it), AutoProcessor.
        state_dict: a full (gathered) state dict when the model is sharded (FSDP2)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out_dir, state_dict=state_dict)
        self.tokenizer.save_pretrained(out_dir)
        self.image_processor.save_pretrained(out_dir)
        (out_dir / "processor_config.json").write_text(json.dumps(self.processor_config(), indent=2) + "\n")
        return out_dir
