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
from mrpo.models import backbone as backbone_mod
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
    assert calls[-1]["max_cache_len"] % backbone_mod.STATIC_CACHE_ROUND == 0
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
    monkeypatch.setattr(backbone_mod, "_WARNED", set())
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
    assert load_config(None, []).rollout.decode == "eager"
    assert load_config(None, ["rollout.decode=static_compiled"]).rollout.decode == "static_compiled"
    with pytest.raises(ConfigError, match="rollout.decode"):
        load_config(None, ["rollout.decode=fast"])
