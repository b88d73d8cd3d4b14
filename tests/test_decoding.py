"""mrpo.decoding: rollout.decode's paths (our loop by default, transformers' generate as `hf`), the
sampling log-probs both return, the per-call seed, the one-time fallback message, and the rollout-vs-trainer
log-prob metric (Rollout.logprob_diff_metrics)."""
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from mrpo import decoding
from mrpo.config import ConfigError, load_config
from mrpo.data.synthetic import make_example
from mrpo.models.load import load_backbone
from mrpo.models.tiny import FAMILIES, build_tiny
from mrpo.rollout import Rollout

NEW = 16


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=FAMILIES)
def bb(request, tmp_path_factory):
    return load_backbone(build_tiny(request.param, tmp_path_factory.mktemp("tiny") / request.param, seed=0))


def _prompts(bb):
    """Two DISTINCT prompts of different lengths (left padding), one with an image, one text-only."""
    image = make_example(0, "train", 0, image_size=56)[1]
    return bb.encode_prompts(["Is there a lesion?", "How many lesions are seen in the kidneys, and on which side?"],
                             [[image], []])


def _teacher_forced(bb, batch, completions, temperature=1.0, top_k=0):
    """Log-prob of every completion token under the sampling distribution, from one teacher-forced forward:
    suppression, then temperature, then top-k (generate's order), then log_softmax. Packed [N]."""
    hidden, targets, _ = bb.completion_hidden_states(batch, completions)
    logits = (hidden @ bb.lm_head_weight.T).float()
    logits[:, bb.suppress_token_ids] = -float("inf")
    logits = logits / temperature
    if top_k:
        logits = logits.masked_fill(logits < logits.topk(top_k, -1).values[:, -1:], -float("inf"))
    return logits.log_softmax(-1).gather(1, targets[:, None])[:, 0]


def test_config_decode_paths():
    assert load_config(None, []).rollout.decode == "loop"
    for name in ("hf", "eager", "static", "static_compiled"):
        assert load_config(None, [f"rollout.decode={name}"]).rollout.decode == name
    with pytest.raises(ConfigError, match="rollout.decode"):
        load_config(None, ["rollout.decode=vllm"])
    with pytest.raises(ValueError, match="rollout.decode"):
        decoding.generate(None, {}, [], decode="vllm", max_new_tokens=1)


@pytest.mark.parametrize("sample", [True, False], ids=["sample", "greedy"])
def test_hf_path_logprobs_equal_teacher_forced_and_ids_equal_generate(bb, sample):
    """hf: the warpers run as our processors, so for a seed the tokens are those of Backbone.generate with
    the same settings; the returned log-probs are the teacher-forced ones (fp32)."""
    prompts = _prompts(bb)
    rows = [0, 0, 0, 1, 1, 1]
    opts = dict(do_sample=sample, temperature=0.7 if sample else 1.0, top_k=20 if sample else 0)
    got = decoding.generate(bb, prompts, rows, decode="hf", max_new_tokens=NEW, seed=11, **opts)
    assert got.path == "hf:eager"
    batch = bb.select_rows(prompts, rows)
    torch.manual_seed(11)
    assert got.completion_ids == bb.generate(batch, NEW, **opts)
    assert [len(lp) for lp in got.logprobs] == [len(c) for c in got.completion_ids]
    want = _teacher_forced(bb, batch, got.completion_ids, opts["temperature"], opts["top_k"])
    torch.testing.assert_close(torch.cat(got.logprobs), want.detach(), rtol=0, atol=1e-5)


def test_seed_per_call(bb):
    """Same seed -> same completions (whatever ran before in the process); another seed -> others."""
    prompts, rows = _prompts(bb), [0] * 4 + [1] * 4
    run = lambda seed: decoding.generate(bb, prompts, rows, decode="hf", max_new_tokens=NEW, seed=seed).completion_ids
    first = run(decoding.call_seed(3, 7, "a", "b"))
    torch.rand(5)   # the global RNG moves on; the call's seed does not
    assert run(decoding.call_seed(3, 7, "a", "b")) == first
    assert run(decoding.call_seed(3, 8, "a", "b")) != first
    assert decoding.call_seed(1, 2) == decoding.call_seed(1, 2) != decoding.call_seed(2, 1)


def test_group_row_seeds():
    """One seed per (run seed, step, prompt id, index in the group), wherever the prompt sits in the call."""
    seeds = decoding.group_row_seeds((3, 7), ["a", "b"], [0, 0, 1, 1])
    assert seeds == [decoding.call_seed(3, 7, p, k) for p, k in (("a", 0), ("a", 1), ("b", 0), ("b", 1))]
    assert len(set(seeds)) == 4
    assert decoding.group_row_seeds((3, 7), ["c", "b"], [1, 0, 1, 0])[::2] == seeds[2:]   # b's, among others
    assert decoding.group_row_seeds((3, 8), ["a"], [0]) != seeds[:1]
    assert decoding.group_row_seeds((3, 7), ["a", "a"], [0, 1]) == seeds[:2]               # a repeated id counts on


def test_loop_greedy_equals_hf_and_falls_back_once(bb, monkeypatch, caplog):
    """The default path is our loop; its greedy ids are generate's. A model / option the loop cannot
    serve falls back to generate with one message naming why."""
    decode_loop = pytest.importorskip("mrpo.models.decode")
    prompts, rows = _prompts(bb), [0, 0, 1, 1]
    hf = decoding.generate(bb, prompts, rows, decode="hf", max_new_tokens=NEW, do_sample=False)
    if decode_loop.unsupported_reason(bb, bb.model, do_sample=False) is None:
        loop = decoding.generate(bb, prompts, rows, decode="loop", max_new_tokens=NEW, do_sample=False)
        assert loop.path == "loop" and loop.completion_ids == hf.completion_ids
        assert {"prefill_rows", "decode_steps"} <= loop.stats.keys() and loop.stats["prefill_rows"] == 2
        torch.testing.assert_close(torch.cat(loop.logprobs), torch.cat(hf.logprobs), rtol=0, atol=1e-4)
    why = f"test reason {bb.family}"
    monkeypatch.setattr(decode_loop, "unsupported_reason", lambda *a, **k: why)
    with caplog.at_level(logging.WARNING, logger="mrpo"):
        for _ in range(2):
            out = decoding.generate(bb, prompts, rows, decode="loop", max_new_tokens=NEW, do_sample=False)
            assert out.path == "hf:eager" and out.completion_ids == hf.completion_ids
    assert sum(why in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("sharded", [False, True])
def test_loop_workspace_kept_unless_sharded(bb, monkeypatch, sharded):
    """The loop's CUDA workspace (stand-in entry here) outlives a call with unsharded weights and is freed
    after a call with sharded ones (gathered anew each rollout)."""
    decode_loop = pytest.importorskip("mrpo.models.decode")
    if decode_loop.unsupported_reason(bb, bb.model, do_sample=False) is not None:
        pytest.skip("the loop does not serve this backbone")
    monkeypatch.setattr(type(bb), "_is_sharded", staticmethod(lambda model: sharded))
    monkeypatch.setattr(bb, "_vision_filler", lambda batch, model: None)   # no process group to ask
    lm = decode_loop.language_model(bb.model)
    decode_loop._WORKSPACES[lm] = "workspace"
    try:
        decoding.generate(bb, _prompts(bb), [0, 1], decode="loop", max_new_tokens=2, do_sample=False)
        assert (lm in decode_loop._WORKSPACES) == (not sharded)
    finally:
        decode_loop._WORKSPACES.pop(lm, None)


def test_sharded_without_gathered_weights_falls_back(bb, monkeypatch):
    monkeypatch.setattr(type(bb), "_is_sharded", staticmethod(lambda model: True))
    assert "gather_for_generation" in decoding.fallback_reason(bb, "loop", gathered=False, do_sample=True)
    assert decoding.fallback_reason(bb, "hf", gathered=False) is None


def _rollout(sampled, old=None):
    return Rollout(prompts={}, prompt_row=[0] * len(sampled), records=[{}] * len(sampled),
                   completion_ids=[[1] * len(s) for s in sampled], sample_logprobs=sampled, old_logprobs=old)


def test_logprob_diff_metrics():
    sampled = [torch.tensor([-1.0, -2.0]), torch.tensor([-0.5])]
    # from the loss pass: only the first time a completion is seen counts
    r = _rollout(sampled)
    r.note_trainer_logprobs([0], torch.tensor([-1.5, -2.0]))
    r.note_trainer_logprobs([1], torch.tensor([-0.25]))
    r.note_trainer_logprobs([0], torch.tensor([9.0, 9.0]))   # a second iteration, on updated weights
    m = r.logprob_diff_metrics(torch.device("cpu"))
    assert m["rollout/logprob_diff_mean"] == pytest.approx(0.75 / 3) and m["rollout/logprob_diff_max"] == 0.5
    # old log-probs, when a pass computed them, are the first pass
    r = _rollout(sampled, old=[torch.tensor([-1.0, -3.0]), torch.tensor([-0.5])])
    r.note_trainer_logprobs([0, 1], torch.tensor([5.0, 5.0, 5.0]))   # ignored
    m = r.logprob_diff_metrics(torch.device("cpu"))
    assert m["rollout/logprob_diff_mean"] == pytest.approx(1 / 3) and m["rollout/logprob_diff_max"] == 1.0
    # nothing sampled (e.g. scripted completions): NaN, not 0
    r = _rollout(sampled)
    r.sample_logprobs = None
    r.note_trainer_logprobs([0], torch.tensor([0.0, 0.0]))
    assert all(v != v for v in r.logprob_diff_metrics(torch.device("cpu")).values())


@pytest.mark.slow
def test_decode_loop_fsdp2_two_ranks(tmp_path):
    """FSDP2 on 2 gloo ranks (tests/models/decode_fsdp_worker.py): weights gathered once per rollout, no
    collective per token (ranks decode different lengths), completions = one unsharded process; greedy
    evaluation over 2 ranks = one process."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("mrpo.models.decode")
    paths = [str(build_tiny(f, tmp_path / f, seed=0)) for f in FAMILIES]
    worker = Path(__file__).parent / "models" / "decode_fsdp_worker.py"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(worker), *paths], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count(" ok") == 2 * len(FAMILIES)
