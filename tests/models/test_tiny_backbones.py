"""Tiny offline backbones (Qwen2.5-VL, Qwen3-VL, InternVL3): build, load, encode, generate, teacher-forced
log-probs (against generate's own per-step logits), batch invariance under left/right padding, gradients,
save/reload round trip, and the loader's errors."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from PIL import Image

from mrpo.data.synthetic import make_example
from mrpo.models.backbone import Backbone, PromptTooLongError
from mrpo.models.load import load_backbone
from mrpo.models.tiny import FAMILIES, TAG_TOKENS, build_tiny



@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="module", params=FAMILIES)
def bb(request, tiny_root) -> Backbone:
    return load_backbone(build_tiny(request.param, tiny_root / request.param, seed=0))


@pytest.fixture(scope="module")
def images():
    a = make_example(0, "train", 0, image_size=56)[1]
    b = make_example(0, "train", 1, image_size=56)[1].resize((112, 56))   # non-square: more image tokens
    return a, b


SHORT = "Is there a lesion?"
LONG = "How many lesions are seen in the kidneys, and on which side of the image are they located?"


def logprobs(bb, batch, completions):
    """Per-row log-probs of the completion tokens via hidden @ W^T (what the fused loss computes)."""
    hidden, targets, cu = bb.completion_hidden_states(batch, completions)
    lp = torch.log_softmax(hidden.float() @ bb.lm_head_weight.float().T, -1)
    lp = lp.gather(-1, targets[:, None])[:, 0]
    assert torch.equal(targets, torch.tensor([t for c in completions for t in c]))
    return [lp[cu[i]:cu[i + 1]] for i in range(len(completions))]


def random_completion(bb, n, seed):
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([t for t in range(len(bb.tokenizer))
                            if t not in bb.suppress_token_ids and t not in bb.eos_token_ids])
    return allowed[torch.randint(len(allowed), (n,), generator=g)].tolist()


def test_build_encode_forward_generate(bb, images):
    fam = bb.family
    assert bb.reasoning_tag == ("thinking" if fam == "qwen3_vl" else "think")
    prompt = bb.chat_prompt(SHORT)
    assert f"<{bb.reasoning_tag}>...</{bb.reasoning_tag}>" in prompt and "<answer>...</answer>" in prompt
    assert prompt.endswith("assistant\n") and prompt.count(bb.image_token) == 1
    batch = bb.encode_prompts([SHORT, LONG], list(images))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 2
    assert mask[0, 0] == 0 and mask[1].all() and mask[0, -1] == 1            # left padding
    n_img = (ids == bb.image_token_id).sum(-1).tolist()
    assert n_img[1] > n_img[0] > 0                                           # wider image, more tokens
    if fam == "internvl3":
        assert batch["pixel_values"].shape[1:] == (3, 56, 56)
        assert n_img == [4 * 1, 4 * 3]                                       # 1 tile; 2 tiles + thumbnail
    else:
        assert torch.equal(batch["mm_token_type_ids"], (ids == bb.image_token_id).int())
        assert (batch["image_grid_thw"].prod(-1) // 4).tolist() == n_img
    with torch.no_grad():
        out = bb.model(**batch)
    assert out.logits.shape == (*ids.shape, bb.model.config.get_text_config().vocab_size)
    assert torch.isfinite(out.logits[mask.bool()]).all()
    comps = bb.generate(batch, max_new_tokens=8, temperature=1.0, top_p=0.9)
    assert len(comps) == 2 and all(1 <= len(c) <= 8 for c in comps)
    assert not set(t for c in comps for t in c) & set(bb.suppress_token_ids)
    greedy = bb.generate(batch, max_new_tokens=8, do_sample=False)
    assert greedy == bb.generate(batch, max_new_tokens=8, do_sample=False)  # greedy is deterministic
    assert bb.generate(batch, max_new_tokens=8, temperature=1.0, top_k=1) == greedy   # rollout.top_k reaches generate
    # a checkpoint's generation_config (repetition penalty, top_k, ...) must not bend the rollouts
    gc = bb.model.generation_config
    saved = gc.repetition_penalty, gc.no_repeat_ngram_size, gc.top_k
    gc.repetition_penalty, gc.no_repeat_ngram_size, gc.top_k = 5.0, 1, 1
    try:
        bent = bb.model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=bb.pad_token_id,
                                 suppress_tokens=bb.suppress_token_ids)
        bent = bent[:, batch["input_ids"].shape[1]:].tolist()
        assert any(b[: len(g)] != g for b, g in zip(bent, greedy))            # the settings do matter
        assert bb.generate(batch, max_new_tokens=8, do_sample=False) == greedy
    finally:
        gc.repetition_penalty, gc.no_repeat_ngram_size, gc.top_k = saved


def test_logprobs_match_generate_scores(bb, images):
    batch = bb.encode_prompts([SHORT, LONG], list(images))
    gen = bb.model.generate(**batch, max_new_tokens=10, do_sample=False, output_logits=True,
                            return_dict_in_generate=True, pad_token_id=bb.pad_token_id,
                            eos_token_id=bb.eos_token_ids, suppress_tokens=bb.suppress_token_ids)
    comps = bb.generate(batch, max_new_tokens=10, do_sample=False)
    ref = torch.log_softmax(torch.stack(gen.logits, 1).float(), -1)          # [B, T, V]
    hidden, targets, cu = bb.completion_hidden_states(batch, comps)
    full = torch.log_softmax(hidden @ bb.lm_head_weight.T, -1)
    for i, c in enumerate(comps):
        assert torch.equal(gen.sequences[i, batch["input_ids"].shape[1]:][: len(c)], torch.tensor(c))
        mine = full[cu[i]:cu[i + 1]]
        assert (mine - ref[i, : len(c)]).abs().max() < 1e-4
        mine_t = mine.gather(-1, targets[cu[i]:cu[i + 1], None])[:, 0]
        ref_t = ref[i, : len(c)].gather(-1, torch.tensor(c)[:, None])[:, 0]
        assert torch.allclose(mine_t, ref_t, atol=1e-4, rtol=0)
        assert torch.equal(mine.argmax(-1), torch.tensor(c))                  # greedy picked the argmax


def test_logprobs_do_not_depend_on_batch(bb, images):
    """Sample A alone vs. next to a longer prompt (A left-padded) with a longer completion (A right-padded),
    and next to a shorter prompt with a shorter completion (the other row padded)."""
    img_a, img_b = images
    ca, cb, cc = random_completion(bb, 9, 0), random_completion(bb, 17, 1), random_completion(bb, 3, 2)
    alone = logprobs(bb, bb.encode_prompts([LONG[:40]], [img_a]), [ca])[0]
    b1 = bb.encode_prompts([LONG, LONG[:40]], [img_b, img_a])
    assert b1["attention_mask"][1, 0] == 0                                   # A is left-padded here
    in_batch = logprobs(bb, b1, [cb, ca])[1]
    b2 = bb.encode_prompts([LONG[:40], "Size?"], [img_a, img_a])
    assert b2["attention_mask"][1, 0] == 0
    first = logprobs(bb, b2, [ca, cc])[0]
    assert torch.allclose(alone, in_batch, atol=2e-5, rtol=0), (alone - in_batch).abs().max()
    assert torch.allclose(alone, first, atol=2e-5, rtol=0), (alone - first).abs().max()
    # the check is sensitive: attending to the padding, or (Qwen M-RoPE) 1-D positions that ignore
    # the image grid, change A's log-probs (1-D RoPE is shift-invariant, so InternVL has no such bug)
    ids = torch.cat([b1["input_ids"], torch.tensor([cb, ca + [bb.pad_token_id] * 8])], 1)
    mask = torch.cat([b1["attention_mask"], torch.tensor([[1] * 17, [1] * 9 + [0] * 8])], 1)
    extra = {k: v for k, v in b1.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if bb.is_qwen:
        extra["mm_token_type_ids"] = torch.cat([b1["mm_token_type_ids"], torch.zeros(2, 17, dtype=torch.int)], 1)
    P = b1["input_ids"].shape[1]
    wrong = [dict(attention_mask=torch.ones_like(mask))]
    if bb.is_qwen:
        wrong.append(dict(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)))
    for kw in wrong:
        with torch.no_grad():
            h = bb.model.model(input_ids=ids, use_cache=False, **kw, **extra).last_hidden_state[1, P - 1:P - 1 + 9]
        bad = torch.log_softmax(h @ bb.lm_head_weight.T, -1).gather(-1, torch.tensor(ca)[:, None])[:, 0]
        assert (bad - alone).abs().max() > 1e-4, list(kw)


class _PassthroughHead(torch.nn.Module):
    """Stand-in for mrpo.models.parallelize.PassthroughHead: lm_head that returns its input."""

    def __init__(self, weight):
        super().__init__()
        self.weight, self.passthrough = weight, True

    def forward(self, hidden):
        return hidden if self.passthrough else hidden @ self.weight.T


def test_passthrough_head_and_other_model(bb, images, tiny_root):
    batch = bb.encode_prompts([SHORT, LONG], list(images))
    comps = [random_completion(bb, 6, 7), random_completion(bb, 11, 8)]
    with torch.no_grad():
        inner = bb.completion_hidden_states(batch, comps)
        head = bb.model.get_output_embeddings()
        bb.model.set_output_embeddings(_PassthroughHead(head.weight))
        try:
            root = bb.completion_hidden_states(batch, comps)      # through model(...), "logits" = hidden
        finally:
            bb.model.set_output_embeddings(head)
        assert all(torch.allclose(a.float(), b.float(), atol=1e-5) for a, b in zip(inner, root))
        other = load_backbone(build_tiny(bb.family, tiny_root / f"{bb.family}_seed1", seed=1))
        via = bb.completion_hidden_states(batch, comps, model=other.model)
        own = other.completion_hidden_states(other.encode_prompts([SHORT, LONG], list(images)), comps)
        assert torch.allclose(via[0], own[0], atol=1e-6) and not torch.allclose(via[0], inner[0], atol=1e-2)


def test_gradients_flow(bb, images):
    batch = bb.encode_prompts([SHORT, LONG], list(images))
    bb.model.zero_grad(set_to_none=True)
    lps = logprobs(bb, batch, [random_completion(bb, 5, 3), random_completion(bb, 2, 4)])
    torch.cat(lps).sum().backward()
    grads = {n: p.grad for n, p in bb.model.named_parameters() if p.grad is not None}
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert any("layers.1." in n and g.abs().sum() > 0 for n, g in grads.items())        # decoder
    assert any(("visual" in n or "vision_tower" in n) and g.abs().sum() > 0 for n, g in grads.items())
    assert bb.lm_head_weight.shape == (len(bb.tokenizer), 128)
    bb.model.zero_grad(set_to_none=True)


def test_select_rows_matches_encoding_the_subset(bb, images):
    problems, imgs = [SHORT, LONG, "Size?"], [images[0], images[1], images[0]]
    batch = bb.encode_prompts(problems, imgs)
    for rows in ([0, 2], [2, 2, 0, 0], [1], [2, 1, 0]):
        got = bb.select_rows(batch, rows)
        ref = bb.encode_prompts([problems[r] for r in rows], [imgs[r] for r in rows])
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref), rows


def test_generate_cuts_after_first_eos(bb, monkeypatch):
    eos, pad = bb.eos_token_ids[0], bb.pad_token_id
    batch = {"input_ids": torch.tensor([[7, 8], [7, 9]])}
    seqs = torch.tensor([[7, 8, 11, 12, eos, pad, pad], [7, 9, 11, eos, 13, 14, 15]])
    monkeypatch.setattr(bb.model, "generate", lambda **kw: seqs)
    assert bb.generate(batch, 5) == [[11, 12, eos], [11, eos]]
    seqs = torch.tensor([[7, 8, 11, 12, 13]])
    assert bb.generate({"input_ids": torch.tensor([[7, 8]])}, 3) == [[11, 12, 13]]


def test_prompt_too_long(bb, images):
    batch = bb.encode_prompts([SHORT, LONG], list(images))
    lengths = batch["attention_mask"].sum(-1).tolist()
    with pytest.raises(PromptTooLongError) as e:
        bb.encode_prompts([SHORT, LONG, SHORT], [images[0], images[1], images[1]], max_prompt_length=lengths[0])
    assert isinstance(e.value, ValueError) and e.value.index == 1 and e.value.indices == [1, 2]
    bb.encode_prompts([SHORT], [images[0]], max_prompt_length=lengths[0])   # exactly at the limit: fine


def test_tags_survive_decoding(bb):
    tok = bb.tokenizer
    text = "<think>The image is a CT scan.</think><thinking>x</thinking><answer>yes</answer>"
    ids = tok(text, add_special_tokens=False).input_ids
    for tag in TAG_TOKENS:
        assert tok.convert_tokens_to_ids(tag) in ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    vision = tok.decode(bb.suppress_token_ids, skip_special_tokens=True)
    assert vision == ""                                                      # vision tokens are special


def test_save_reload_round_trip(bb, images, tmp_path):
    from transformers import AutoModelForImageTextToText

    out = bb.save(tmp_path / "export")
    bb2 = load_backbone(out)
    assert bb2.family == bb.family and bb2.eos_token_ids == bb.eos_token_ids
    assert bb2.suppress_token_ids == bb.suppress_token_ids and bb2.max_pixels == bb.max_pixels
    sd1, sd2 = bb.model.state_dict(), bb2.model.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    b1 = bb.encode_prompts([SHORT, LONG], list(images))
    b2 = bb2.encode_prompts([SHORT, LONG], list(images))
    assert b1.keys() == b2.keys() and all(torch.equal(b1[k], b2[k]) for k in b1)
    comps = [random_completion(bb, 4, 5), random_completion(bb, 6, 6)]
    with torch.no_grad():
        assert torch.equal(bb.completion_hidden_states(b1, comps)[0], bb2.completion_hidden_states(b2, comps)[0])
    plain = AutoModelForImageTextToText.from_pretrained(out)
    assert all(torch.equal(sd1[k], v) for k, v in plain.state_dict().items())


def test_build_deterministic_and_reused(tiny_root, tmp_path):
    a = build_tiny("qwen2_5_vl", tiny_root / "qwen2_5_vl", seed=0)       # already built by the fixture
    mtime = (a / "model.safetensors").stat().st_mtime_ns
    assert build_tiny("qwen2_5_vl", a, seed=0) == a and (a / "model.safetensors").stat().st_mtime_ns == mtime
    from safetensors.torch import load_file

    same = build_tiny("qwen2_5_vl", tmp_path / "same", seed=0)
    w0, w1 = load_file(a / "model.safetensors"), load_file(same / "model.safetensors")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert (a / "tokenizer.json").read_text() == (same / "tokenizer.json").read_text()
    other = build_tiny("qwen2_5_vl", tmp_path / "same", seed=1)            # rebuilt in place
    w2 = load_file(other / "model.safetensors")
    assert not torch.equal(w0["lm_head.weight"], w2["lm_head.weight"])
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="user"):
        build_tiny("qwen3_vl", tmp_path / "user")


def test_loader_errors(tiny_root, tmp_path):
    src = tiny_root / "qwen2_5_vl"
    with pytest.raises(ValueError, match="holds a qwen2_5_vl model"):
        load_backbone(src, family="internvl3")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_backbone(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / f).write_bytes((src / f).read_bytes())
    with pytest.raises(FileNotFoundError, match=r"broken.*model weights.*preprocessor_config"):
        load_backbone(broken)
    with pytest.warns(UserWarning, match="flash_attention_2"):
        bb = load_backbone(src, attn_implementation="flash_attention_2")
    assert bb.model.config._attn_implementation == "sdpa"
    small = load_backbone(src, max_pixels=56 * 56)
    assert small.max_pixels == 56 * 56
    grid = small.encode_prompts(["q"], [Image.new("RGB", (300, 90))])["image_grid_thw"]
    assert int(grid.prod()) * 14 * 14 <= 56 * 56
    big = load_backbone(src)
    big.max_pixels = 100 * 100        # setting the attribute is enough (the trainer does this)
    grid = big.encode_prompts(["q"], [Image.new("RGB", (1000, 310))])["image_grid_thw"]
    assert 0.7 * 100 * 100 < int(grid.prod()) * 14 * 14 <= 100 * 100


@pytest.mark.slow
def test_fsdp2_sharded_backbone(tiny_root):
    """generate(synced_gpus=True) and completion_hidden_states on FSDP2-sharded weights (2 gloo ranks)."""
    import subprocess
    import sys
    from pathlib import Path

    paths = [str(build_tiny(f, tiny_root / f, seed=0)) for f in FAMILIES]
    worker = Path(__file__).with_name("fsdp_worker.py")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(worker), *paths], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count(" ok") == 2 * len(FAMILIES)
