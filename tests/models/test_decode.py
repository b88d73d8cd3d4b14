"""rollout.decode: the static-KV-cache generate path gives the same greedy token ids as the eager path for
every tiny family (CPU: static cache without compilation, as transformers compiles only on CUDA-type
devices); a model class without static-cache support falls back to eager with a one-time warning naming
the family; the config key is validated."""
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from mrpo.config import ConfigError, load_config
from mrpo.data.synthetic import make_example
from mrpo.models import hf_generate as hf_generate_mod
from mrpo.models.load import load_backbone
from mrpo.models.tiny import FAMILIES, build_tiny

NEW = 24


@pytest.fixture(scope="module", params=FAMILIES)
def bb(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_decode")
    return load_backbone(build_tiny(request.param, root / request.param, seed=0))


def _batch(bb):
    """Rows of different lengths (left padding), one with an image and one text-only."""
    image = make_example(0, "train", 0, image_size=56)[1]
    return bb.encode_prompts(["Is there a lesion?",
                              "How many lesions are seen in the kidneys, and on which side are they?"],
                             [[image], []])


def _spy(bb, monkeypatch) -> list[dict]:
    """Record the keyword arguments of every model.generate call."""
    calls, original = [], bb.model.generate

    def generate(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(bb.model, "generate", generate)
    return calls


@pytest.mark.parametrize("decode", ["static", "static_compiled"])
def test_static_greedy_ids_equal_eager(bb, decode, monkeypatch):
    batch = _batch(bb)
    eager = bb.generate(batch, NEW, do_sample=False)
    calls = _spy(bb, monkeypatch)
    fast = bb.generate(batch, NEW, do_sample=False, decode=decode)
    assert calls[-1]["cache_implementation"] == "static"                 # the static path really ran
    assert calls[-1]["max_cache_len"] >= batch["input_ids"].shape[1] + NEW
    assert calls[-1]["max_cache_len"] % hf_generate_mod.STATIC_CACHE_ROUND == 0
    if bb.model.device.type != "cuda":
        assert calls[-1].get("disable_compile") is True and "compile_config" not in calls[-1]
    assert max(len(c) for c in eager) >= 8, eager                        # enough decoded tokens to compare
    assert fast == eager, f"{bb.family} {decode}: {fast} != {eager}"


def test_eager_passes_no_cache_arguments(bb, monkeypatch):
    calls = _spy(bb, monkeypatch)
    bb.generate(_batch(bb), 4, do_sample=False, decode="eager")
    assert "cache_implementation" not in calls[-1] and "compile_config" not in calls[-1]


def test_unsupported_family_falls_back_once(bb, monkeypatch, caplog):
    batch = _batch(bb)
    eager = bb.generate(batch, NEW, do_sample=False)
    monkeypatch.setattr(bb.model, "_can_compile_fullgraph", False)
    monkeypatch.setattr(hf_generate_mod, "_WARNED", set())
    calls = _spy(bb, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="mrpo"):
        first = bb.generate(batch, NEW, do_sample=False, decode="static_compiled")
        second = bb.generate(batch, NEW, do_sample=False, decode="static_compiled")
    warnings = [r.getMessage() for r in caplog.records if "falling back to eager" in r.getMessage()]
    assert len(warnings) == 1 and bb.family in warnings[0], warnings
    assert all("cache_implementation" not in c for c in calls[-2:])
    assert first == second == eager


def test_unknown_decode_raises(bb):
    with pytest.raises(ValueError, match="rollout.decode"):
        bb.generate(_batch(bb), 2, do_sample=False, decode="cuda_graphs")


def test_config_key():
    assert load_config(None, []).rollout.decode == "loop"
    assert load_config(None, ["rollout.decode=static_compiled"]).rollout.decode == "static_compiled"
    with pytest.raises(ConfigError, match="rollout.decode"):
        load_config(None, ["rollout.decode=fast"])


# ----------------------------------------------------------------------------- lean decode
# The neutral settings Backbone.generate passed before it passed only the non-neutral ones: the reference
# its token ids must still equal (min_p=0.0 and min_new_tokens=0 added processors that change no token).
_ALL_NEUTRAL = dict(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, typical_p=1.0, epsilon_cutoff=0.0,
                    eta_cutoff=0.0, repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
                    min_new_tokens=0, num_beams=1, num_return_sequences=1, bad_words_ids=None,
                    begin_suppress_tokens=None, forced_bos_token_id=None, forced_eos_token_id=None, sequence_bias=None,
                    exponential_decay_length_penalty=None, renormalize_logits=False)


def _reference_generate(bb, batch, new, do_sample, temperature=0.7, top_p=1.0):
    """Plain model.generate with every neutral setting spelled out and transformers' own suppress_tokens."""
    kwargs = dict(_ALL_NEUTRAL, max_new_tokens=new, do_sample=do_sample, use_cache=True, pad_token_id=bb.pad_token_id,
                  eos_token_id=bb.eos_token_ids, suppress_tokens=bb.suppress_token_ids or None)
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    seqs = bb.model.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1]:].tolist()
    eos = set(bb.eos_token_ids)
    return [row[:next((i + 1 for i, t in enumerate(row) if t in eos), len(row))] for row in seqs]


def _processors(bb, monkeypatch) -> list[list[str]]:
    """Names of the logits processors of every generate call (transformers' private hook: the test
    is about which per-token work generate does)."""
    if not hasattr(bb.model, "_get_logits_processor"):
        pytest.skip("this transformers builds its logits processors elsewhere")
    seen, original = [], bb.model._get_logits_processor

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append([type(p).__name__ for p in out])
        return out

    monkeypatch.setattr(bb.model, "_get_logits_processor", spy)
    return seen


@pytest.mark.parametrize("do_sample,top_p", [(True, 1.0), (True, 0.9), (False, 1.0)])
def test_lean_decode_same_ids_as_all_neutral_settings(bb, do_sample, top_p):
    """Same seed, same ids as the reference with every neutral setting passed (sampling at T=0.7 with and
    without top-p, and greedy); the suppressed (vision) ids never appear."""
    import torch

    batch = _batch(bb)
    torch.manual_seed(123)
    ours = bb.generate(batch, NEW, temperature=0.7, top_p=top_p, do_sample=do_sample)
    torch.manual_seed(123)
    ref = _reference_generate(bb, batch, NEW, do_sample, top_p=top_p)
    assert max(len(c) for c in ours) >= 8, ours
    assert ours == ref, f"{bb.family}: {ours} != {ref}"
    assert not {t for c in ours for t in c} & set(bb.suppress_token_ids)


def test_lean_decode_adds_only_the_processors_that_act(bb, monkeypatch):
    """Sampling: vision-token suppression and temperature; greedy: suppression only (no MinP, MinLength,
    TopK... with neutral values); and no unused flag warnings."""
    seen = _processors(bb, monkeypatch)
    calls = _spy(bb, monkeypatch)
    batch = _batch(bb)
    bb.generate(batch, 4, temperature=0.7, do_sample=True)
    bb.generate(batch, 4, do_sample=False)
    assert seen == [["_SuppressTokens", "TemperatureLogitsWarper"], ["_SuppressTokens"]]
    assert "min_p" not in calls[0] and "min_new_tokens" not in calls[0] and "top_k" in calls[0]  # top_k: default 50
    assert not {"top_k", "min_p", "temperature", "top_p"} & set(calls[1])


def test_checkpoint_sampling_settings_are_overridden(bb, monkeypatch):
    """A checkpoint's generation_config (Qwen's top_k=1, repetition_penalty=1.05; min_p, min_new_tokens) does
    not change the rollouts: the same ids as with every neutral setting passed."""
    import torch

    gc = bb.model.generation_config
    for key, value in dict(top_k=1, repetition_penalty=1.05, min_p=0.2, min_new_tokens=6, no_repeat_ngram_size=2).items():
        monkeypatch.setattr(gc, key, value)
    batch = _batch(bb)
    torch.manual_seed(5)
    ours = bb.generate(batch, NEW, temperature=0.7)
    torch.manual_seed(5)
    ref = _reference_generate(bb, batch, NEW, True)
    assert ours == ref


def test_suppress_tokens_processor_matches_transformers():
    import torch
    from transformers.generation import SuppressTokensLogitsProcessor

    scores = torch.randn(3, 50)
    ids = torch.zeros(3, 4, dtype=torch.long)
    ours = hf_generate_mod._SuppressTokens([1, 7, 49, 60])   # 60: outside the vocabulary, ignored as by transformers
    ref = SuppressTokensLogitsProcessor([1, 7, 49, 60])
    for _ in range(2):   # the cached mask is reused
        assert torch.equal(ours(ids, scores), ref(ids, scores))
    assert torch.equal(ours(ids, scores[:, :40]), ref(ids, scores[:, :40]))
