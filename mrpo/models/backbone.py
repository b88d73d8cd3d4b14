"""Backbone: one VL policy model (Qwen2.5-VL, Qwen3-VL or InternVL3) with its tokenizer and image processor.

The three things training needs from a backbone:
  encode_prompts           chat-template prompts + images -> a left-padded batch for generate
  generate                 batched HF generate with KV cache -> completion token ids (no padding)
  completion_hidden_states teacher-forced forward over prompt + completion through the inner model
                           (no lm_head): hidden states that predict each completion token, packed
The processor is assembled here by hand (image processor + placeholder expansion + tokenizer), as
transformers' processor classes cannot be built without a video processor (see
/work/shared/notes-offline-backbones.md). It follows their rules: Qwen puts prod(image_grid_thw) //
merge_size**2 image tokens per image and marks them 1 in mm_token_type_ids; InternVL puts <img>, then
image_seq_length <IMG_CONTEXT> per tile (tiles + thumbnail, crop_to_patches=True), then </img>.

Positions: Qwen's 3D M-RoPE index is computed by the model from `mm_token_type_ids` and the attention
mask (so left padding of the prompt and right padding of the completion do not move any token);
InternVL (1-D RoPE) gets position_ids = cumsum(attention_mask) - 1, as generate computes them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from mrpo.data.records import fit_max_pixels

INSTRUCTION = ("Think step-by-step and enclose your reasoning in <{tag}>...</{tag}> tags. "
               "Then provide your answer in <answer>...</answer> tags.")

# Override a checkpoint's generation_config.json (e.g. Qwen's top_k=1, repetition_penalty=1.05): rollouts
# must sample from the policy's own distribution (only temperature / top_p, as configured).
_NEUTRAL_SAMPLING = dict(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, typical_p=1.0, epsilon_cutoff=0.0,
                         eta_cutoff=0.0, repetition_penalty=1.0, encoder_repetition_penalty=1.0,
                         no_repeat_ngram_size=0, min_new_tokens=0, num_beams=1,
                         num_return_sequences=1, bad_words_ids=None, begin_suppress_tokens=None,
                         forced_bos_token_id=None, forced_eos_token_id=None, sequence_bias=None,
                         exponential_decay_length_penalty=None, renormalize_logits=False)


class PromptTooLongError(ValueError):
    """A prompt (text + image tokens) is longer than max_prompt_length. `index`: the first such row of
    the batch, `indices`: all of them, `lengths`: their token counts."""

    def __init__(self, index: int, indices: list[int] | None = None, lengths: list[int] | None = None,
                 limit: int | None = None):
        self.index, self.indices, self.lengths, self.limit = index, indices or [index], lengths or [], limit
        super().__init__(f"prompt {index} has {self.lengths[0] if self.lengths else '?'} tokens > "
                         f"max_prompt_length={limit} (over-long rows in this batch: {self.indices})")


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

    def chat_prompt(self, problem: str) -> str:
        """Chat-template text: user turn = image + problem + the paper's reasoning instruction,
        followed by the generation prompt (assistant turn opened)."""
        text = f"{problem}\n{INSTRUCTION.format(tag=self.reasoning_tag)}"
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _expand_images(self, prompts: list[str], images: list[Image.Image]) -> tuple[list[str], dict]:
        """Run the image processor and expand each prompt's single image placeholder into the number
        of image tokens the model expects. Returns (expanded prompts, image tensors)."""
        placeholder = self.image_token
        for i, p in enumerate(prompts):
            if p.count(placeholder) != 1:
                raise ValueError(f"prompt {i} must hold exactly one image placeholder {placeholder!r}, "
                                 f"found {p.count(placeholder)}")
        if self.is_qwen:
            kwargs = {}
            if self.max_pixels is not None:   # smart_resize rounds to the patch grid within this budget
                lo = min(self.image_processor.size["shortest_edge"], self.max_pixels)
                kwargs["size"] = {"shortest_edge": lo, "longest_edge": self.max_pixels}
            out = self.image_processor(images=images, return_tensors="pt", **kwargs)
            merge = self.image_processor.merge_size ** 2
            counts = (out["image_grid_thw"].prod(-1) // merge).tolist()
            expanded = [p.replace(placeholder, placeholder * n) for p, n in zip(prompts, counts)]
            return expanded, {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}
        # InternVL: tiles (+ thumbnail) per image, image_seq_length tokens per tile, wrapped in <img>...</img>
        out = self.image_processor(images=images, crop_to_patches=True, return_tensors="pt")
        seq = self.model.config.image_seq_length
        tok = self.tokenizer
        expanded = [p.replace(placeholder, f"{tok.start_image_token}{placeholder * (seq * n)}{tok.end_image_token}")
                    for p, n in zip(prompts, out["num_patches"].tolist())]
        return expanded, {"pixel_values": out["pixel_values"]}

    def encode_prompts(self, problems: list[str], images: list[Image.Image],
                       max_prompt_length: int | None = None) -> dict[str, torch.Tensor]:
        """Left-padded batch for generate. Keys: input_ids [B, P], attention_mask [B, P], pixel_values
        (Qwen: [sum patches, C*T*p*p] with image_grid_thw [B, 3] and mm_token_type_ids [B, P];
        InternVL: [tiles, 3, H, W]). Images are downscaled to <= max_pixels first.
        Raises PromptTooLongError when a prompt (image tokens included) exceeds max_prompt_length."""
        if len(problems) != len(images):
            raise ValueError(f"encode_prompts: {len(problems)} problems but {len(images)} images")
        images = [fit_max_pixels(im.convert("RGB"), self.max_pixels) for im in images]
        prompts, vision = self._expand_images([self.chat_prompt(p) for p in problems], images)
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
        if self.is_qwen:   # pixel_values: flat patches, image i holds prod(image_grid_thw[i]) of them
            per_row = batch["image_grid_thw"].prod(-1).tolist()
            out["image_grid_thw"] = batch["image_grid_thw"][idx]
        else:              # InternVL: tiles per row = image tokens / image_seq_length
            per_row = ((batch["input_ids"] == self.image_token_id).sum(-1)
                       // self.model.config.image_seq_length).tolist()
        chunks = batch["pixel_values"].split(per_row)
        out["pixel_values"] = torch.cat([chunks[r] for r in idx.tolist()])
        lead = int((out["attention_mask"].cumsum(-1) == 0).sum(-1).min()) if len(idx) else 0
        for k in ("input_ids", "attention_mask", "mm_token_type_ids"):
            if k in out:
                out[k] = out[k][:, lead:]
        return out

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, batch: dict, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 do_sample: bool = True, synced_gpus: bool = False) -> list[list[int]]:
        """Batched generate with KV cache. Returns each completion's token ids without padding,
        cut after (and including) the first EOS; a completion without EOS has max_new_tokens ids."""
        kwargs = dict(_NEUTRAL_SAMPLING, max_new_tokens=max_new_tokens, do_sample=do_sample, use_cache=True,
                      pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_ids,
                      suppress_tokens=self.suppress_token_ids or None, synced_gpus=synced_gpus)
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        # a sharded model generates inside its engine's generation() context (mrpo/engines)
        seqs = self.model.generate(**batch, **kwargs)
        new = seqs[:, batch["input_ids"].shape[1]:].tolist()
        eos = set(self.eos_token_ids)
        out = []
        for row in new:
            cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            out.append(row[:cut])
        return out

    # ------------------------------------------------------------------ teacher forcing
    def completion_hidden_states(self, batch: dict, completions: list[list[int]], model=None
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher-forced forward over prompt + completion, without computing logits.

        batch: encode_prompts output (B rows); completions: B lists of token ids; model: the model to
        run (default self.model; e.g. a reference copy of the same family).
        Returns hidden [N, D] (final-norm hidden states; row t predicts completion token t; N = total
        completion tokens, packed in batch order), targets [N] int64, cu_seqlens [B+1] int32.
        Gradients flow.
        Two ways to skip the lm_head: when the model's output embedding has `passthrough=True`
        (mrpo.models.parallelize.hidden_states_mode) the root model(...) runs and its "logits" are the
        hidden states, through every FSDP2 hook; otherwise the inner model.model(...) runs, and under
        FSDP2 the caller calls model.unshard() before and model.reshard() after the backward.
        """
        input_ids, prompt_mask = batch["input_ids"], batch["attention_mask"]
        B, P = input_ids.shape
        if len(completions) != B:
            raise ValueError(f"completion_hidden_states: {len(completions)} completions for a batch of {B}")
        device = input_ids.device
        lengths = torch.tensor([len(c) for c in completions], dtype=torch.long, device=device)
        T = int(lengths.max()) if B else 0
        comp = torch.full((B, T), self.pad_token_id, dtype=torch.long, device=device)
        for i, c in enumerate(completions):
            comp[i, : len(c)] = torch.as_tensor(c, dtype=torch.long, device=device)
        comp_mask = torch.arange(T, device=device)[None, :] < lengths[:, None]        # [B, T]
        ids = torch.cat([input_ids, comp], dim=1)
        mask = torch.cat([prompt_mask, comp_mask.to(prompt_mask.dtype)], dim=1)
        inputs = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
        if self.is_qwen:   # completion tokens are text (0): M-RoPE positions continue after the prompt
            inputs["mm_token_type_ids"] = torch.cat(
                [batch["mm_token_type_ids"], torch.zeros_like(comp, dtype=batch["mm_token_type_ids"].dtype)], dim=1)
        else:              # 1-D RoPE: positions skip the left padding, exactly as generate computes them
            inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        model = self.model if model is None else model
        inputs.update(input_ids=ids, attention_mask=mask, use_cache=False)
        if getattr(model.get_output_embeddings(), "passthrough", False):
            hidden = model(**inputs).logits            # lm_head returns its input
        else:
            hidden = model.model(**inputs).last_hidden_state
        hidden = hidden[:, P - 1 : P - 1 + T]                                             # [B, T, D]
        cu_seqlens = torch.zeros(B + 1, dtype=torch.int32, device=device)
        cu_seqlens[1:] = torch.cumsum(lengths, 0).to(torch.int32)
        return hidden[comp_mask], comp[comp_mask], cu_seqlens

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The output embedding weight [V, D] (logits = hidden @ W.T)."""
        return self.model.get_output_embeddings().weight

    # ------------------------------------------------------------------ export
    def save(self, out_dir: str | Path, state_dict: dict | None = None) -> Path:
        """Write a Hugging Face folder (safetensors, config, generation config, tokenizer, image
        processor) loadable by load_backbone and AutoModelForImageTextToText.from_pretrained.
        state_dict: a full (gathered) state dict when the model is sharded (FSDP2)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out_dir, state_dict=state_dict)
        self.tokenizer.save_pretrained(out_dir)
        self.image_processor.save_pretrained(out_dir)
        return out_dir
