"""Padding-free (packed) training forwards on the tiny backbones (Qwen2.5-VL, Qwen3-VL, InternVL3):
per-token log-probs and gradients of Backbone.completion_hidden_states(packed=True) equal the padded
forward's (fp32, 1e-5) on micro-batches mixing 0, 1 and 2 images per record and different prompt /
completion lengths; no padding token is computed; a recording attention function sees every decoder
layer get the true sequence boundaries (and no mask), also in the recomputation of gradient
checkpointing; the test detects sequences attending to each other (negative control); switching to the
varlen attention leaves the padded forward and generation unchanged; unsupported attention kernels
raise, or fall back to the padded path once warned."""
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from mrpo.config import LossConfig
from mrpo.data.synthetic import make_example
from mrpo.models import teacher_forcing as teacher_forcing_mod
from mrpo.models.backbone import Backbone
from mrpo.models.load import load_backbone
from mrpo.models.parallelize import decoder_layers, hidden_states_mode, install_passthrough_head, vision_tower
from mrpo.models.tiny import FAMILIES, build_tiny
from mrpo.models.varlen_attention import KWARG, PREFIX

TOL = 1e-5
QS = ["Is there a lesion?", "How many lesions are seen in the kidneys, and on which side are they?",
      "Size?", "Compare the two scans: is the lesion larger?"]
COMP_LENS = [5, 11, 1, 8]


@pytest.fixture(scope="module", params=FAMILIES)
def bb(request, tmp_path_factory) -> Backbone:
    bb = load_backbone(build_tiny(request.param, tmp_path_factory.mktemp("tiny") / request.param, seed=0))
    assert bb.model.dtype == torch.float32
    return bb


@pytest.fixture(scope="module")
def images():
    a = make_example(0, "train", 0, image_size=56)[1]
    b = make_example(0, "train", 1, image_size=56)[1].resize((112, 56))   # non-square: more image tokens
    c = make_example(0, "train", 2, image_size=56)[1]
    return a, b, c


def completions(bb, lens, seed=0):
    """Random completion ids (no vision / EOS tokens) of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([t for t in range(len(bb.tokenizer))
                            if t not in bb.suppress_token_ids and t not in bb.eos_token_ids])
    return [allowed[torch.randint(len(allowed), (n,), generator=g)].tolist() for n in lens]


def mixed_batch(bb, images):
    """4 records: 1 image, text-only, a wide image, 2 images: different prompt lengths (left padding)."""
    a, b, c = images
    batch = bb.encode_prompts(QS, [[a], [], [b], [a, c]])
    lengths = batch["attention_mask"].sum(-1).tolist()
    assert len(set(lengths)) == 4, lengths                                 # every row has its own padding
    return batch


def token_logprobs(bb, hidden, targets):
    return torch.log_softmax(hidden @ bb.lm_head_weight.T, -1).gather(-1, targets[:, None])[:, 0]


def both(bb, batch, comps, model=None):
    """(padded, packed) outputs: per-token log-probs [N], targets [N], cu_seqlens [B+1], padding fraction."""
    out = []
    for packed in (False, True):
        hidden, targets, cu = bb.completion_hidden_states(batch, comps, model=model, packed=packed)
        assert hidden.shape == (sum(map(len, comps)), bb.model.config.get_text_config().hidden_size)
        out.append((token_logprobs(bb, hidden, targets), targets, cu, bb.last_padding_fraction))
    return out


def test_logprobs_equal_padded(bb, images):
    batch = mixed_batch(bb, images)
    comps = completions(bb, COMP_LENS)
    (lp0, t0, cu0, pad0), (lp1, t1, cu1, pad1) = both(bb, batch, comps)
    assert torch.equal(t0, t1) and torch.equal(t1, torch.tensor([t for c in comps for t in c]))
    assert torch.equal(cu0, cu1) and cu1.tolist() == [0, 5, 16, 17, 25] and cu1.dtype == torch.int32
    diff = (lp0 - lp1).abs().max().item()
    print(f"{bb.family}: max |packed - padded| log-prob = {diff:.3g}")
    assert diff <= TOL, diff
    assert pad0 > 0.05 and pad1 == 0.0                                     # the padded forward did pad


def test_text_only_and_single_sequence(bb, images):
    """Edge layouts: a micro-batch without images, and one sequence alone (nothing to pack)."""
    batch = bb.encode_prompts(QS[:3], [[], [], []])
    assert "pixel_values" not in batch
    comps = completions(bb, [3, 1, 6], seed=1)
    (lp0, *_), (lp1, *_ , pad1) = both(bb, batch, comps)
    assert (lp0 - lp1).abs().max().item() <= TOL and pad1 == 0.0
    one = bb.encode_prompts(QS[3:], [list(images[:2])])
    (lp0, *_), (lp1, *_) = both(bb, one, completions(bb, [4], seed=2))
    assert (lp0 - lp1).abs().max().item() <= TOL


def test_select_rows_repeated_prompts(bb, images):
    """What the trainer feeds: select_rows of the rollout prompts, each prompt G times (equal prompts of
    different completions next to each other, images repeated)."""
    a, b, c = images
    prompts = bb.encode_prompts(QS, [[a], [], [b], [a, c]])
    batch = bb.select_rows(prompts, [3, 3, 1, 0, 0])
    comps = completions(bb, [2, 9, 4, 7, 3], seed=3)
    (lp0, *_), (lp1, *_) = both(bb, batch, comps)
    assert (lp0 - lp1).abs().max().item() <= TOL


def test_gradients_equal_padded(bb, images):
    """Gradients of a weighted log-prob loss wrt decoder and vision weights, through the hidden-states
    mode the trainer uses (passthrough lm_head, root model call)."""
    batch = mixed_batch(bb, images)
    comps = completions(bb, COMP_LENS, seed=4)
    install_passthrough_head(bb.model)
    weights = torch.linspace(-1.0, 1.0, sum(COMP_LENS))
    params = {"q_proj": decoder_layers(bb.model)[0].self_attn.q_proj.weight,
              "mlp": decoder_layers(bb.model)[-1].mlp.down_proj.weight,
              "vision": next(p for p in vision_tower(bb.model).parameters() if p.ndim == 2)}
    grads = []
    for packed in (False, True):
        bb.model.zero_grad(set_to_none=True)
        with hidden_states_mode(bb.model):
            hidden, targets, _ = bb.completion_hidden_states(batch, comps, packed=packed)
        (token_logprobs(bb, hidden, targets) * weights).sum().backward()
        grads.append({k: p.grad.clone() for k, p in params.items()})
    bb.model.zero_grad(set_to_none=True)
    for k in params:
        scale = grads[0][k].abs().max().item()
        assert scale > 0, k                                                # the gradient reaches the weight
        diff = (grads[0][k] - grads[1][k]).abs().max().item()
        print(f"{bb.family}: grad {k}: max |packed - padded| = {diff:.3g} (max |grad| {scale:.3g})")
        assert diff <= TOL and diff <= 1e-4 * scale, (k, diff, scale)        # also relative: vision grads are small


def true_lengths(batch, comps) -> list[int]:
    """Tokens of each packed sequence: the prompt without its padding, then the completion."""
    return [p + len(c) for p, c in zip(batch["attention_mask"].sum(-1).tolist(), comps)]


@pytest.fixture
def recorder(monkeypatch):
    """Replace the registered varlen attention functions by recording wrappers: calls[] gets (module,
    attention_mask, packed_sequences) of every call."""
    from transformers import AttentionInterface

    calls = []
    for name, fn in list(AttentionInterface._global_mapping.items()):
        if name.startswith(PREFIX):
            def recording(module, query, key, value, attention_mask, *args, _fn=fn, **kwargs):
                calls.append((module, attention_mask, kwargs.get(KWARG)))
                return _fn(module, query, key, value, attention_mask, *args, **kwargs)
            monkeypatch.setitem(AttentionInterface._global_mapping, name, recording)
    return calls


def test_every_layer_receives_the_boundaries(bb, images, recorder):
    """Every decoder layer's attention gets the true boundaries of the packed row and no mask, in the
    forward and again in the recomputation of gradient checkpointing (its backward)."""
    batch = mixed_batch(bb, images)
    comps = completions(bb, COMP_LENS, seed=7)
    bb.packed_completion_hidden_states(batch, comps)                       # switches to the varlen attention
    assert bb.model.config.get_text_config()._attn_implementation == f"{PREFIX}sdpa"
    recorder.clear()
    attention = [layer.self_attn for layer in decoder_layers(bb.model)]
    lengths = true_lengths(batch, comps)
    bb.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    bb.model.train()
    try:
        hidden, _, _ = bb.packed_completion_hidden_states(batch, comps)
        assert [c[0] for c in recorder] == attention                       # each decoder layer once, in order
        hidden.sum().backward()
    finally:
        bb.model.gradient_checkpointing_disable()
        bb.model.eval()
        bb.model.zero_grad(set_to_none=True)
    assert sorted(map(id, (c[0] for c in recorder))) == sorted(map(id, attention * 2))   # + the recomputation
    for module, mask, seqs in recorder:
        assert mask is None and seqs is not None
        assert list(seqs.lengths) == lengths and seqs.max_seqlen == max(lengths)
        assert seqs.cu_seqlens.tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]


def test_detects_sequences_attending_to_each_other(bb, images):
    """Negative control: the same packed inputs without the boundaries make the varlen attention treat the
    row as one causal sequence: the first sequence is unchanged (same positions, nothing new to see), the
    log-probs of every other change far beyond the tolerance, so the equality tests above can fail."""
    batch = mixed_batch(bb, images)
    comps = completions(bb, COMP_LENS)
    inputs, pick, targets, _ = bb._packed_inputs(batch, comps, bb.model)
    L = inputs["input_ids"].shape[1]
    assert inputs["position_ids"].shape == ((3, 1, L) if bb.is_qwen else (1, L))
    assert "attention_mask" not in inputs and inputs[KWARG].total == L
    ref = token_logprobs(bb, bb._run(bb.model, inputs)[0, pick], targets)
    leaky = {k: v for k, v in inputs.items() if k != KWARG}
    bad = token_logprobs(bb, bb._run(bb.model, leaky)[0, pick], targets)
    first = COMP_LENS[0]
    assert (bad[:first] - ref[:first]).abs().max() <= TOL
    assert (bad[first:] - ref[first:]).abs().max() > 100 * TOL


def test_switch_leaves_padded_forward_and_generate_unchanged(bb, images):
    """After use_varlen_attention, the padded forward and (greedy) generation give the same results as
    with the plain implementation (the varlen attention defers to it without boundaries)."""
    from mrpo.models.varlen_attention import use_varlen_attention

    fresh = load_backbone(bb.model.config._name_or_path)
    a, b, c = images
    batch = fresh.encode_prompts(QS[:3], [[a], [], [b, c]])
    comps = completions(fresh, [4, 7, 2], seed=8)
    assert fresh.model.config.get_text_config()._attn_implementation == "sdpa"
    before = (fresh.completion_hidden_states(batch, comps)[0], fresh.generate(batch, 6, do_sample=False))
    assert use_varlen_attention(fresh.model) == f"{PREFIX}sdpa"
    assert fresh.model.config.vision_config._attn_implementation == "sdpa"   # the vision tower keeps its own
    after = (fresh.completion_hidden_states(batch, comps)[0], fresh.generate(batch, 6, do_sample=False))
    assert torch.equal(before[0], after[0]) and before[1] == after[1]


def test_eager_attention(bb, images):
    """With the eager kernel: the padded forward uses its additive float mask, the packed one the varlen
    attention over eager."""
    batch = mixed_batch(bb, images)
    comps = completions(bb, COMP_LENS, seed=5)
    before = bb.model.config._attn_implementation
    bb.model.set_attn_implementation("eager")
    try:
        assert bb.model.config.get_text_config()._attn_implementation == "eager"
        (lp0, *_), (lp1, *_) = both(bb, batch, comps)
        assert bb.model.config.get_text_config()._attn_implementation == f"{PREFIX}eager"
    finally:
        bb.model.set_attn_implementation(before)
    assert (lp0 - lp1).abs().max().item() <= TOL


def test_unsupported_attention(bb, images, monkeypatch):
    """An attention kernel that transformers does not isolate packed sequences for: the packed method
    raises; completion_hidden_states(packed=True) warns once and runs the padded forward."""
    batch = bb.encode_prompts(QS[:2], [[images[0]], []])
    comps = completions(bb, [3, 2], seed=6)
    ref = bb.completion_hidden_states(batch, comps)[0]
    with monkeypatch.context() as m:
        m.setattr(bb.model.config.get_text_config(), "_attn_implementation", "some_kernel")
        assert "'some_kernel'" in bb.packing_unsupported()
        with pytest.raises(RuntimeError, match="cannot pack with attention implementation 'some_kernel'"):
            bb.packed_completion_hidden_states(batch, comps)
    # the model cannot run an unknown kernel, so for the fallback only the check reports one
    monkeypatch.setattr(teacher_forcing_mod, "_PACKING_FALLBACK_WARNED", set())
    monkeypatch.setattr(bb, "packing_unsupported", lambda model=None: "attention implementation 'some_kernel'")
    with pytest.warns(UserWarning, match="loss.packing: cannot pack with attention implementation 'some_kernel'"):
        got = bb.completion_hidden_states(batch, comps, packed=True)[0]
    assert bb.last_padding_fraction > 0 and torch.equal(got, ref)          # the padded forward ran
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                     # warned once, not per micro-batch
        bb.completion_hidden_states(batch, comps, packed=True)


def test_config_default():
    assert LossConfig().packing is True


@pytest.mark.slow
def test_packed_fsdp2(tmp_path_factory):
    """The packed forward on FSDP2-sharded weights (2 gloo ranks), one rank without images (its packed
    row carries the vision filler sequence): log-probs and gradients equal the unsharded padded ones."""
    import subprocess
    import sys
    from pathlib import Path

    root = tmp_path_factory.mktemp("tiny_fsdp")
    paths = [str(build_tiny(f, root / f, seed=0)) for f in FAMILIES]
    worker = Path(__file__).with_name("packing_fsdp_worker.py")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(worker), *paths], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count(" ok") == 2 * len(FAMILIES)
