"""transformers' generate as a rollout path (rollout.decode: hf, static, static_compiled): the reference the
decode loop of mrpo.models.decode is tested against, and the fallback for what the loop cannot serve.
Backbone gets `generate` and `decode_kwargs` from HFGenerate."""
from __future__ import annotations

import functools
import logging

import torch
from transformers.generation import LogitsProcessorList, SuppressTokensLogitsProcessor

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


STATIC_CACHE_ROUND = 128   # static KV cache lengths are rounded up to a multiple of this many tokens
_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    """logging warning, once per distinct message per process."""
    if message not in _WARNED:
        _WARNED.add(message)
        logging.getLogger("mrpo").warning(message)


@functools.lru_cache(maxsize=None)
def _generation_config_has(key: str) -> bool:
    """Whether this transformers' GenerationConfig knows `key` (generate() rejects unknown keys)."""
    from transformers import GenerationConfig

    return hasattr(GenerationConfig(), key)


class HFGenerate:
    """Backbone's generate path through transformers (a mixin: needs model, family, pad_token_id, eos_token_ids,
    suppress_token_ids, _suppress, _vision_filler and _append_row of Backbone)."""

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
            warn_once(f"rollout.decode={decode}: the {self.family} model class ({type(self.model).__name__}) "
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
