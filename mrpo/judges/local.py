"""Step judge running a local Hugging Face model (causal LM or image-text-to-text VLM), same prompt as
the HTTP judge.

cfg (JudgeConfig): local_model_path (folder, loaded offline), prompt_template (None = the paper's prompt), max_new_tokens, max_retries (re-samples
of failed requests), temperature (for the re-samples; 0 -> 0.7), max_concurrency (requests per
generate batch), cache_dir (None = no cache). The first attempt is greedy. The image is passed only
when the folder holds a VLM with an image processor; otherwise the prompt is text only.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from mrpo.judges.base import JudgeRequest, JudgeStats, StepVerdict, Unjudged
from mrpo.judges.cache import JudgeCache, judge_cached
from mrpo.judges.prompt import DEFAULT_PROMPT, JudgePrompt, JudgeResponseError, parse_verdict

log = logging.getLogger(__name__)


class LocalJudge:
    prompt: JudgePrompt = DEFAULT_PROMPT   # judge.prompt_template, set in __init__
    def __init__(self, cfg, device: str | None = None):
        from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText,
                                  AutoProcessor, AutoTokenizer)

        path = cfg.local_model_path
        if not path:
            raise ValueError("LocalJudge: judge.local_model_path is not set")
        self.cfg = cfg
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        config = AutoConfig.from_pretrained(path)
        is_vlm = getattr(config, "vision_config", None) is not None
        self.processor = None
        if is_vlm:
            try:
                proc = AutoProcessor.from_pretrained(path)
                self.processor = proc if getattr(proc, "image_processor", None) is not None else None
            except Exception as e:  # e.g. Qwen-VL video processors need torchvision
                log.warning("LocalJudge: cannot build the processor of %s (%s: %s); judging text only",
                            path, type(e).__name__, str(e).strip().splitlines()[0] if str(e).strip() else "")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.processor is not None:
            self.processor.tokenizer.padding_side = "left"
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        cls = AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM
        self.model = cls.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.with_image = self.processor is not None
        # the cache key names the model and whether it saw the image
        self.model_name = f"local:{path}" + ("" if self.with_image else "#text")
        self.cache = JudgeCache(cfg.cache_dir) if cfg.cache_dir else None
        self.prompt = JudgePrompt.load(getattr(cfg, "prompt_template", None))
        self.stats = JudgeStats()

    def __repr__(self) -> str:
        return f"LocalJudge(path={self.cfg.local_model_path!r}, with_image={self.with_image}, device={self.device!r})"

    def _prompt(self, req: JudgeRequest) -> str:
        messages = self.prompt.messages(req, with_image=False)
        if self.with_image and req.image_paths:
            messages[1]["content"] = ([{"type": "image"}] * len(req.image_paths)
                                      + [{"type": "text", "text": messages[1]["content"]}])
        templater = self.processor if self.with_image else self.tokenizer
        if getattr(templater, "chat_template", None):
            return templater.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return f"{self.prompt.system}\n\n{self.prompt.user_text(req)}\n\n"

    @torch.no_grad()
    def _generate(self, batch: list[JudgeRequest], sample: bool) -> list[str]:
        texts = [self._prompt(r) for r in batch]
        if self.with_image and any(r.image_paths for r in batch):
            from PIL import Image

            images = [Image.open(p).convert("RGB") for r in batch for p in r.image_paths]
            inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt")
        else:
            inputs = self.tokenizer(texts, padding=True, return_tensors="pt")
        inputs = inputs.to(self.device)
        kwargs = dict(max_new_tokens=int(self.cfg.max_new_tokens), pad_token_id=self.tokenizer.pad_token_id)
        if sample:
            kwargs.update(do_sample=True, temperature=float(self.cfg.temperature) or 0.7, top_p=1.0)
        else:
            kwargs.update(do_sample=False)
        out = self.model.generate(**inputs, **kwargs)
        new = out[:, inputs["input_ids"].shape[1]:]
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)

    def _run(self, todo: list[JudgeRequest]) -> list[StepVerdict | Unjudged]:
        results: list[StepVerdict | Unjudged] = [Unjudged("invalid_reply")] * len(todo)
        pending = list(range(len(todo)))
        bs = max(1, int(self.cfg.max_concurrency))
        for attempt in range(int(self.cfg.max_retries) + 1):
            if attempt:
                self.stats.retries += len(pending)
            failed = []
            for lo in range(0, len(pending), bs):
                idx = pending[lo:lo + bs]
                replies = self._generate([todo[i] for i in idx], sample=attempt > 0)
                for i, reply in zip(idx, replies):
                    try:
                        results[i] = parse_verdict(reply, len(todo[i].steps))
                    except JudgeResponseError as e:
                        detail = f"sample {todo[i].sample_id} attempt {attempt + 1} invalid reply: {e}"
                        log.debug("LocalJudge: %s", detail)
                        results[i] = Unjudged("invalid_reply", detail)
                        failed.append(i)
            pending = failed
            if not pending:
                break
        return results

    def judge(self, requests: Sequence[JudgeRequest]) -> list[StepVerdict | None]:
        """One verdict per request, in order; None = no valid reply after greedy + max_retries samples."""
        before = self.stats.failures
        out = judge_cached(list(requests), self.cache, self.model_name, self.stats, self._run, self.prompt.version)
        if self.stats.failures > before:
            log.warning("LocalJudge: %d of %d requests unjudged (invalid_reply) after %d attempts; last error: %s",
                        self.stats.failures - before, len(out), int(self.cfg.max_retries) + 1, self.stats.last_error)
        return out
