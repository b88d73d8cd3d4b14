"""Backbone: one VL policy model (Qwen2.5-VL, Qwen3-VL or InternVL3) with its tokenizer and image processor.

The three things training needs from a backbone, one file each:
  encode_prompts           questions (+ prompt template, models/prompts.py) + 0..n images per row -> a
                           left-padded batch (this file)
  generate                 batched HF generate with KV cache -> completion token ids (models/hf_generate.py;
                           rollouts use our own loop, models/decode.py, and fall back to this)
  completion_hidden_states teacher-forced forward over prompt + completion through the inner model
                           (no lm_head): hidden states that predict each completion token, padded or
                           packed (models/teacher_forcing.py)
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

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image

from mrpo.data.records import fit_max_pixels
from mrpo.models.hf_generate import HFGenerate
from mrpo.models.prompts import (  # noqa: F401  (re-exported: callers import them from mrpo.models.backbone)
    ANSWER_TAG,
    DEFAULT_PROMPT_TEMPLATE,
    PROMPT_FIELDS,
    PromptTooLongError,
    format_prompt,
    load_prompt_template,
)
from mrpo.models.teacher_forcing import TeacherForcedPasses


@dataclass
class Backbone(TeacherForcedPasses, HFGenerate):
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
