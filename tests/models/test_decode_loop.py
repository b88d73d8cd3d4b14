"""mrpo.models.decode (our decode loop) against plain references, on the three tiny backbones in fp32:
greedy ids identical to transformers' generate (0, 1 and 2 images, prompts of different lengths, rows that
stop early so that compaction runs, G rows per prompt); every sampled token's log-prob equal to the
teacher-forced one (completion_hidden_states @ lm_head, same temperature / suppression / top-k / top-p
through transformers' own warpers); same seed, same completions with compaction on and off; the static
(CUDA-graph) step equal to the dynamic one, eagerly and through a capture stand-in; each distinct prompt
prefilled once (its images through the vision tower once); unsupported cases named."""
import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers.generation import TopKLogitsWarper, TopPLogitsWarper

from mrpo.data.synthetic import make_example
from mrpo.models import decode as decode_mod
from mrpo.models import decode_step as step_mod
from mrpo.models.decode import bucket_size, decode_groups, unsupported_reason
from mrpo.models.load import load_backbone
from mrpo.models.parallelize import vision_tower
from mrpo.models.tiny import FAMILIES, build_tiny

NEW = 20


@pytest.fixture(scope="module", params=FAMILIES)
def bb(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_decode_loop")
    b = load_backbone(build_tiny(request.param, root / request.param, seed=0))
    b.model.eval()
    return b


@pytest.fixture(scope="module")
def prompts(bb):
    """Three distinct prompts of different lengths with 1, 0 and 2 images (left padding)."""
    a, b = make_example(0, "train", 0, image_size=56)[1], make_example(0, "train", 1, image_size=56)[1]
    return bb.encode_prompts(["Is there a lesion?", "How many lesions are seen in the kidneys, and on which side?",
                              "Compare the two images."], [[a], [], [a, b]])


@pytest.fixture(scope="module")
def early_eos(bb, prompts):
    """The backbone with one more EOS id: a token that row 0 emits early under greedy decoding and that
    some other row does not emit for a while, so rows finish at different steps (compaction runs)."""
    ref = bb.generate(prompts, NEW, do_sample=False)
    for cand in ref[0][1:6]:
        late = [len(r) if cand not in r else r.index(cand) for r in ref[1:]]
        if cand not in bb.eos_token_ids and max(late) >= 8:
            return dataclasses.replace(bb, eos_token_ids=bb.eos_token_ids + [cand])
    pytest.fail(f"no early-EOS candidate in {ref}")


SEED, G = 7, 4


@pytest.fixture(scope="module")
def sampling_eos(bb, prompts):
    """The backbone with more EOS ids: the third token that each row of the first two prompts samples
    (seed SEED, T = 0.5, G rows per prompt). Under that seed those rows then finish within 3 tokens, the
    others later or never (a row's tokens up to its EOS do not depend on the EOS set), so compaction runs."""
    rows = [i for i in range(3) for _ in range(G)]
    out = decode_groups(bb, prompts, rows, max_new_tokens=NEW, temperature=0.5,
                        generator=torch.Generator().manual_seed(SEED))
    extra = {c[min(2, len(c) - 1)] for c, r in zip(out.completion_ids, rows) if r < 2} - set(bb.eos_token_ids)
    return dataclasses.replace(bb, eos_token_ids=bb.eos_token_ids + sorted(extra))


def _teacher_forced_logprobs(bb, prompts, rows, completions, temperature=1.0, top_k=0, top_p=1.0):
    """Log-probs of the completion tokens from Backbone.completion_hidden_states @ lm_head, processed as
    generate would: suppression, temperature, then transformers' TopK / TopP warpers."""
    hidden, targets, cu = bb.completion_hidden_states(bb.select_rows(prompts, rows), completions)
    with torch.no_grad():
        logits = (hidden @ bb.lm_head_weight.T).float()
        logits[:, bb.suppress_token_ids] = float("-inf")
        logits = logits / temperature
        if top_k:
            logits = TopKLogitsWarper(top_k)(None, logits)
        if top_p < 1:
            logits = TopPLogitsWarper(top_p)(None, logits)
        lp = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
    return [lp[cu[i]:cu[i + 1]] for i in range(len(completions))]


def test_bucket_sizes():
    assert [bucket_size(n, 64) for n in (1, 2, 3, 5, 8, 9, 16, 17, 63, 64)] == [1, 2, 4, 8, 8, 16, 16, 24, 64, 64]
    assert bucket_size(11, 12) == 12 and bucket_size(3, 3) == 3


def test_greedy_equals_generate(bb, prompts):
    """Distinct prompts (one row each): the ids of transformers' generate, and the log-probs at T = 1."""
    out = decode_groups(bb, prompts, [0, 1, 2], max_new_tokens=NEW, do_sample=False)
    ref = bb.generate(prompts, NEW, do_sample=False)
    assert out.completion_ids == ref
    assert max(len(c) for c in ref) >= 10, ref
    tf = _teacher_forced_logprobs(bb, prompts, [0, 1, 2], ref)
    for ours, theirs in zip(out.logprobs, tf):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert out.stats["prefill_rows"] == 3 and out.stats["decode_steps"] == max(len(c) for c in ref) - 1


def test_bf16_greedy_equals_generate(bb, prompts):
    """bf16 (the GPU dtype) on CPU: the lean step rounds as the Hugging Face layers do (RMSNorm's fp32
    statistics, each RoPE product), so greedy ids still equal generate's."""
    half = load_backbone(bb.model.name_or_path, dtype=torch.bfloat16)
    half.model.eval()
    batch = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in prompts.items()}
    out = decode_groups(half, batch, [0, 1, 2], max_new_tokens=16, do_sample=False)
    assert out.completion_ids == half.generate(batch, 16, do_sample=False)


@pytest.mark.parametrize("compaction", [True, False])
def test_greedy_groups_with_early_stops_equal_generate(early_eos, prompts, compaction):
    """G = 3 rows per prompt in shuffled request order, rows stopping at different steps: generate's ids
    on the repeated batch; with compaction the batch shrinks through buckets."""
    bb = early_eos
    rows = [2, 0, 1, 0, 2, 1, 1, 0, 2]
    out = decode_groups(bb, prompts, rows, max_new_tokens=NEW, do_sample=False, compaction=compaction)
    ref = bb.generate(bb.select_rows(prompts, rows), NEW, do_sample=False)
    assert out.completion_ids == ref
    assert len({len(c) for c in ref}) > 1, ref                                # rows stop at different steps
    if compaction:
        assert out.stats["compactions"] >= 1 and out.stats["buckets"][0] == 9
        assert out.stats["buckets"] == sorted(out.stats["buckets"], reverse=True)
    else:
        assert out.stats["compactions"] == 0 and out.stats["buckets"] == [9]


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (12, 0.9)])
def test_sampled_logprobs_equal_teacher_forced(bb, prompts, top_k, top_p):
    rows = [0, 0, 1, 1, 2, 2]
    out = decode_groups(bb, prompts, rows, max_new_tokens=NEW, temperature=0.7, top_k=top_k, top_p=top_p,
                        generator=torch.Generator().manual_seed(3))
    assert not {t for c in out.completion_ids for t in c} & set(bb.suppress_token_ids)
    assert len({tuple(c) for c in out.completion_ids}) > 1                    # the G rows of a prompt differ
    tf = _teacher_forced_logprobs(bb, prompts, rows, out.completion_ids, 0.7, top_k, top_p)
    for ours, theirs in zip(out.logprobs, tf):
        assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_same_seed_same_completions_with_compaction_on_and_off(sampling_eos, prompts):
    rows = [i for i in range(3) for _ in range(G)]
    runs = [decode_groups(sampling_eos, prompts, rows, max_new_tokens=NEW, temperature=0.5,
                          generator=torch.Generator().manual_seed(SEED), compaction=c) for c in (True, False)]
    on, off = runs
    assert on.stats["compactions"] >= 1 and off.stats["compactions"] == 0
    assert len({len(c) for c in on.completion_ids}) > 1
    assert on.completion_ids == off.completion_ids
    for a, b in zip(on.logprobs, off.logprobs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    other = decode_groups(sampling_eos, prompts, rows, max_new_tokens=NEW, temperature=0.5,
                          generator=torch.Generator().manual_seed(SEED + 1))
    assert other.completion_ids != on.completion_ids                          # the seed matters


def test_static_step_equals_dynamic_step(early_eos, sampling_eos, prompts, monkeypatch):
    """The graph-capturable form (fixed shapes, masked attention over a span of SPAN-multiple columns,
    index_copy_ at a device column) run eagerly gives the dynamic form's ids, greedy and sampled, through
    compactions and span changes (SPAN = 8 here, so the decoded columns cross several)."""
    monkeypatch.setattr(step_mod, "SPAN", 8)
    rows = [i for i in range(3) for _ in range(G)]
    for bb, kwargs in ((early_eos, {"do_sample": False}), (sampling_eos, {"temperature": 0.5})):
        outs = [decode_groups(bb, prompts, rows, max_new_tokens=NEW, static=static,
                              generator=torch.Generator().manual_seed(SEED), **kwargs) for static in (False, True)]
        assert outs[1].stats["compactions"] >= 1
        assert outs[0].completion_ids == outs[1].completion_ids
        for a, b in zip(outs[0].logprobs, outs[1].logprobs):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_unfused_mlp_step_equals_fused(bb, prompts):
    """The CUDA weight layout (gate and up as two matmuls, no fused copy) gives the CPU layout's logits."""
    logits = []
    for fuse in (True, False):
        w = step_mod.StepWeights.from_model(bb.model, fuse_mlp=fuse)
        w.rope_tables(bb.model, 64, mrope=bb.is_qwen)
        buf = step_mod.DecodeBuffers(w, 3, 8, "cpu", torch.float32)
        buf.tokens.copy_(torch.tensor([10, 11, 12]))
        buf.pos.copy_(torch.tensor([3, 5, 7]))
        with torch.no_grad():
            logits.append(torch.stack([step_mod.decode_step(w, buf, 3, col) for col in range(4)]))
        assert (w.layers[0].gate_up_w is None) == (not fuse)
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=0)


def test_graph_capture_and_replay_with_a_cpu_stand_in(early_eos, prompts, monkeypatch):
    """The CUDA-graph bookkeeping on CPU: a stand-in 'graph' records the step and re-runs it into the same
    output tensor at replay. Ids equal the dynamic step's; one capture per bucket used; the capture running
    the step again (a real capture runs nothing) changes nothing, as the static step is idempotent."""
    captured, replays = [], []

    class StandIn:
        def __init__(self, fn):
            self.fn, self.out = fn, fn()

        def replay(self):
            replays.append(1)
            self.out.copy_(self.fn())

    def capture(fn, pool):
        g = StandIn(fn)
        captured.append(g)
        return g, g.out

    monkeypatch.setattr(decode_mod, "use_graphs", lambda device: True)
    monkeypatch.setattr(step_mod, "capture_cuda_graph", capture)
    monkeypatch.setattr(step_mod, "SPAN", 8)
    rows = [i for i in range(3) for _ in range(3)]
    graphs = decode_groups(early_eos, prompts, rows, max_new_tokens=NEW, do_sample=False, static=True)
    eager = decode_groups(early_eos, prompts, rows, max_new_tokens=NEW, do_sample=False, static=False)
    assert graphs.completion_ids == eager.completion_ids
    # one capture per (bucket, span) used, each replayed at the later steps of that pair
    assert graphs.stats["graph_captures"] == len(captured) > len(set(graphs.stats["buckets"])) > 1
    assert len(captured) + len(replays) == graphs.stats["decode_steps"]
    assert eager.stats["graph_captures"] == 0
    decode_mod.release_workspace(early_eos)


def test_row_seeds_make_a_prompt_independent_of_its_batch(sampling_eos, prompts):
    """With one seed per row, prompt 2's G completions (and log-probs) are the same decoded alone (its own
    padding) as inside a batch with the other prompts in a shuffled row order (other rows finishing first,
    compaction): a row's noise depends only on its seed and the step."""
    bb = sampling_eos
    seed_of = lambda p, k: 1000 + 10 * p + k
    a, b = make_example(0, "train", 0, image_size=56)[1], make_example(0, "train", 1, image_size=56)[1]
    alone = decode_groups(bb, bb.encode_prompts(["Compare the two images."], [[a, b]]), [0, 0, 0],
                          max_new_tokens=NEW, temperature=0.7, row_seeds=[seed_of(2, k) for k in range(3)])
    rows = [2, 0, 1, 2, 0, 1, 2, 0]
    seen = {}
    seeds = [seed_of(r, seen.setdefault(r, []).append(1) or len(seen[r]) - 1) for r in rows]
    batch = decode_groups(bb, prompts, rows, max_new_tokens=NEW, temperature=0.7, row_seeds=seeds)
    mine = [i for i, r in enumerate(rows) if r == 2]
    assert [batch.completion_ids[i] for i in mine] == alone.completion_ids
    assert len({tuple(c) for c in alone.completion_ids}) > 1                   # the seeds differ, so do the rows
    for i, lp in zip(mine, alone.logprobs):
        torch.testing.assert_close(batch.logprobs[i], lp, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="not both"):
        decode_groups(bb, prompts, [0], max_new_tokens=2, row_seeds=[1], generator=torch.Generator())


class GraphStandIn:
    """A CPU 'CUDA graph': records the step and re-runs it into the same output tensor at replay, and
    checks, as a real graph needs, that every tensor the step reads is at the address it had at capture."""
    def __init__(self, fn, tensors):
        self.fn, self.tensors = fn, tensors
        self.ptrs = [t.data_ptr() for t in tensors()]
        self.out = fn()

    def replay(self):
        assert [t.data_ptr() for t in self.tensors()] == self.ptrs, "a tensor the graph reads moved"
        self.out.copy_(self.fn())


def _stand_in(monkeypatch):
    """Graphs on CPU through GraphStandIn; returns the list of stand-ins made."""
    def read(graphs):   # every tensor the static step reads
        w, buf = graphs.w, graphs.buf
        return lambda: [t for _, _, t in step_mod._weight_slots(w) if t is not None] + [
            w.cos, w.sin_signed, *buf.k, *buf.v, buf.bias, buf.tokens, buf.pos, buf.col]

    made = []

    def call(self, rows, span, original=step_mod.StepGraphs.__call__):
        def capture(fn, pool):
            made.append(GraphStandIn(fn, read(self)))
            return made[-1], made[-1].out

        self.capture = capture
        return original(self, rows, span)

    monkeypatch.setattr(step_mod.StepGraphs, "__call__", call)
    monkeypatch.setattr(decode_mod, "use_graphs", lambda device: True)
    monkeypatch.setattr(step_mod, "SPAN", 8)
    return made


def test_graphs_captured_once_per_run_and_weights_refreshed_in_place(early_eos, prompts, monkeypatch):
    """The workspace outlives a call: a second call (other prompts, weights changed in place as by an
    optimizer step) replays the first call's graphs at the same addresses and captures only new (bucket,
    span) pairs; its ids and log-probs equal a fresh call's and the eager step's; a repeat captures
    nothing; more rows rebuild it larger; a parameter that moved drops the graphs."""
    import copy

    made = _stand_in(monkeypatch)
    bb = dataclasses.replace(early_eos, model=copy.deepcopy(early_eos.model).eval())
    lm = step_mod.language_model(bb.model)
    greedy = dict(max_new_tokens=NEW, do_sample=False, static=True)
    rows = [i for i in range(3) for _ in range(3)]
    first = decode_groups(bb, prompts, rows, **greedy)
    ws = decode_mod._WORKSPACES[lm]
    assert first.stats["graph_captures"] == len(ws.graphs.graphs) == len(made) >= 2
    pairs = set(ws.graphs.graphs)
    with torch.no_grad():                                   # an optimizer step: in place, same addresses
        for i, p in enumerate(lm.parameters()):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.02)
    a = make_example(0, "train", 2, image_size=56)[1]
    other = bb.encode_prompts(["Any fracture?", "Describe the image."], [[], [a]])
    rows2 = [1, 0, 1, 0, 1]
    second = decode_groups(bb, other, rows2, **greedy)
    assert decode_mod._WORKSPACES[lm] is ws and second.stats["graph_captures"] == len(set(ws.graphs.graphs) - pairs)
    fresh_bb = dataclasses.replace(bb, model=copy.deepcopy(bb.model))        # its own (new) workspace
    fresh = decode_groups(fresh_bb, other, rows2, **greedy)
    eager = decode_groups(bb, other, rows2, max_new_tokens=NEW, do_sample=False, static=False)
    assert second.completion_ids == fresh.completion_ids == eager.completion_ids
    assert second.completion_ids != decode_groups(early_eos, other, rows2, max_new_tokens=NEW,
                                                  do_sample=False, static=False).completion_ids   # weights moved on
    for x, y, z in zip(second.logprobs, fresh.logprobs, eager.logprobs):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
        torch.testing.assert_close(x, z, atol=1e-5, rtol=0)
    again = decode_groups(bb, other, rows2, **greedy)
    assert again.stats["graph_captures"] == 0 and again.completion_ids == second.completion_ids
    big_rows = [i for i in range(3) for _ in range(5)]
    big = decode_groups(bb, prompts, big_rows, **greedy)
    assert decode_mod._WORKSPACES[lm] is not ws and decode_mod._WORKSPACES[lm].rows == 15
    assert big.stats["graph_captures"] >= 1
    assert big.completion_ids == decode_groups(bb, prompts, big_rows, max_new_tokens=NEW, do_sample=False,
                                               static=False).completion_ids
    with torch.no_grad():                                   # a parameter re-allocated elsewhere (FSDP2 re-gather)
        lm.norm.weight = torch.nn.Parameter(lm.norm.weight * 1.5)
    moved = decode_groups(bb, other, rows2, **greedy)
    assert moved.stats["graph_captures"] >= 1
    assert moved.completion_ids == decode_groups(bb, other, rows2, max_new_tokens=NEW, do_sample=False,
                                                 static=False).completion_ids
    decode_mod.release_workspace(bb)
    decode_mod.release_workspace(fresh_bb.model)
    assert lm not in decode_mod._WORKSPACES


def test_each_distinct_prompt_prefilled_once(bb, prompts):
    """G = 4 rows per prompt: one prefill row per distinct prompt, every image through the vision tower
    once; rows naming a subset of the prompts prefill only those."""
    seen = []
    def count(module, args, kwargs, out):      # the pixel rows (patches / tiles) the tower receives
        seen.append(next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)).shape[0])

    hook = vision_tower(bb.model).register_forward_hook(count, with_kwargs=True)
    try:
        out = decode_groups(bb, prompts, [i for i in range(3) for _ in range(4)], max_new_tokens=4, do_sample=False)
        sub = decode_groups(bb, prompts, [1, 1], max_new_tokens=4, do_sample=False)
    finally:
        hook.remove()
    assert out.stats["prefill_rows"] == 3 and sub.stats["prefill_rows"] == 1
    assert sum(seen) == prompts["pixel_values"].shape[0]                      # images of the first call, once
    assert sub.completion_ids == [bb.generate(bb.select_rows(prompts, [1]), 4, do_sample=False)[0]] * 2


def test_sharded_rank_without_images_prefills_the_vision_filler(bb, prompts, monkeypatch):
    """Under FSDP2 / ZeRO-3 a rank whose prompts hold no image prefills Backbone's vision filler row too
    (stand-in here: prompt 0, which has an image), so every rank runs the vision tower; no row continues it."""
    monkeypatch.setattr(bb, "_vision_filler", lambda batch, model: bb.select_rows(prompts, [0])
                        if "pixel_values" not in batch else None)
    out = decode_groups(bb, prompts, [1, 1], max_new_tokens=6, do_sample=False)
    assert out.stats["prefill_rows"] == 2
    assert out.completion_ids == [bb.generate(bb.select_rows(prompts, [1]), 6, do_sample=False)[0]] * 2


def test_small_steps_run_on_one_thread(bb, prompts, monkeypatch):
    """The tiny model's decode steps run single-threaded (the prefill and the caller keep their threads)."""
    seen, step = [], step_mod.decode_step

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return step(*args, **kwargs)

    monkeypatch.setattr(decode_mod, "decode_step", spy)
    torch.set_num_threads(2)
    try:
        out = decode_groups(bb, prompts, [0, 1], max_new_tokens=4, do_sample=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert seen == [1] * out.stats["decode_steps"] and seen


def test_lora_adapters_are_merged(bb, prompts):
    """A peft-LoRA policy (non-zero B) decodes to the ids of transformers' generate on the same model."""
    import copy

    from mrpo.models.lora import apply_lora

    model = apply_lora(copy.deepcopy(bb.model), rank=4, seed=0).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    lora_bb = dataclasses.replace(bb, model=model)
    assert unsupported_reason(lora_bb) is None
    out = decode_groups(lora_bb, prompts, [0, 1, 2], max_new_tokens=12, do_sample=False)
    assert out.completion_ids == lora_bb.generate(prompts, 12, do_sample=False)
    assert out.completion_ids != decode_groups(bb, prompts, [0, 1, 2], max_new_tokens=12, do_sample=False).completion_ids
    for _, layer in model.named_modules():
        if hasattr(layer, "use_dora"):
            layer.use_dora["default"] = True
            break
    assert "DoRA" in unsupported_reason(lora_bb)


def test_unsupported_reasons(bb, monkeypatch):
    assert unsupported_reason(bb, do_sample=True, temperature=0.7, top_p=0.9, top_k=5) is None
    assert "family" in unsupported_reason(dataclasses.replace(bb, family="llava"))
    assert "beam" in unsupported_reason(bb, num_beams=4)
    assert "repetition_penalty" in unsupported_reason(bb, repetition_penalty=1.1)
    assert "temperature" in unsupported_reason(bb, do_sample=True, temperature=0.0)
    assert "option" in unsupported_reason(bb, length_penalty=2.0)
    cfg = step_mod.language_model(bb.model).config
    if hasattr(cfg, "layer_types"):
        monkeypatch.setattr(cfg, "layer_types", ["sliding_attention"] * len(cfg.layer_types))
        assert "sliding" in unsupported_reason(bb)
        with pytest.raises(ValueError, match="sliding"):
            decode_groups(bb, {"input_ids": torch.zeros(1, 2, dtype=torch.long)}, [0], max_new_tokens=2)


def test_sharded_weights_are_refused(bb, prompts):
    """Outside engine.generation() a ZeRO-3 parameter is an empty placeholder (FSDP2: a DTensor shard)."""
    import copy

    model = copy.deepcopy(bb.model)
    step_mod.language_model(model).embed_tokens.weight = torch.nn.Parameter(torch.empty(0))
    with pytest.raises(ValueError, match="engine.generation"):
        decode_groups(dataclasses.replace(bb, model=model), prompts, [0], max_new_tokens=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs(bb, prompts, early_eos):
    """On CUDA (fp32, no TF32): the captured-graph step gives generate's greedy ids and the eager dynamic
    step's, through compaction; one capture per (bucket, span); bf16 runs with graphs too."""
    cuda = dataclasses.replace(early_eos, model=copy_to(early_eos.model, "cuda", torch.float32))
    batch = {k: v.cuda() for k, v in prompts.items()}
    rows = [i for i in range(3) for _ in range(G)]
    graphs = decode_groups(cuda, batch, rows, max_new_tokens=NEW, do_sample=False)
    eager = decode_groups(cuda, batch, rows, max_new_tokens=NEW, do_sample=False, static=False)
    assert graphs.stats["graph_captures"] >= len(set(graphs.stats["buckets"])) >= 2
    assert graphs.completion_ids == eager.completion_ids == cuda.generate(cuda.select_rows(batch, rows), NEW,
                                                                          do_sample=False)
    half = dataclasses.replace(cuda, model=copy_to(early_eos.model, "cuda", torch.bfloat16))
    hb = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()}
    out = decode_groups(half, hb, rows, max_new_tokens=NEW, temperature=0.7,
                        generator=torch.Generator("cuda").manual_seed(SEED))
    assert out.stats["graph_captures"] >= 1 and all(torch.isfinite(lp).all() for lp in out.logprobs)


def copy_to(model, device, dtype):
    import copy

    return copy.deepcopy(model).to(device=device, dtype=dtype).eval()
