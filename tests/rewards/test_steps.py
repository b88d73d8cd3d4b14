"""Step segmentation and the token <-> step map, on byte-level BPE tokenizers trained here."""
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mrpo.models.tiny import FAMILIES
from mrpo.rewards.steps import (Step, _token_chunks, extract_reasoning, reasoning_tags, segment_steps,
                                special_token_ids, special_token_strings, split_steps, token_offsets,
                                token_step_index)

CORPUS = [
    "The lesion is in the left lung.\nThe heart is normal. The lesion is in the left lung.\n",
    "1. Look at the image. 2. The lesion is large! Is it benign? No.\n",
    "Größe 5 mm. 肺结节 😀 ok. Ça va? 肺结节 😀\n",
] * 40


def _byte_bpe(use_regex=False):
    """Byte-level BPE (as Qwen's) with merges across whitespace, so tokens straddle sentence ends."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<|endoftext|>", "<think>", "</think>",
                                                                  "<answer>", "</answer>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def bpe():
    return _byte_bpe()


def _expected_spans(tok, ids, text):
    """Independent reference for byte-level BPE: each char belongs to the token holding its last byte."""
    byte_decoder = {v: k for k, v in _bytes_to_unicode().items()}
    special = set(tok.all_special_tokens) | {"<think>", "</think>", "<answer>", "</answer>"}
    token_bytes = []
    for t in tok.convert_ids_to_tokens(ids):
        token_bytes.append(t.encode() if t in special else bytes(byte_decoder[c] for c in t))
    ends, pos = [], 0  # byte end of each token
    for b in token_bytes:
        pos += len(b)
        ends.append(pos)
    char_last_byte, pos = [], 0
    for ch in text:
        pos += len(ch.encode())
        char_last_byte.append(pos)  # exclusive end byte of each char
    spans, c = [], 0
    for e in ends:
        start = c
        while c < len(text) and char_last_byte[c] <= e:
            c += 1
        spans.append((start, c))
    return spans


def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# ----------------------------------------------------------------------------- segmentation


def test_extract_reasoning_variants():
    assert extract_reasoning("<think> a. b. </think><answer>x</answer>") == (" a. b. ", 7)
    assert extract_reasoning("<think>a. <answer>x</answer>") == ("a. ", 7)             # cut at <answer>
    assert extract_reasoning("<think>a. b") == ("a. b", 7)                             # no closing tag
    assert extract_reasoning("a. b</think><answer>x</answer>") == ("a. b", 0)          # opening tag in prompt
    assert extract_reasoning("no tags <answer>x</answer>") is None
    assert extract_reasoning("<thinking>a.</thinking>") is None                        # other tag
    assert extract_reasoning("<thinking>a.</thinking>", tag="thinking") == ("a.", 10)


def test_split_sentences_and_spans():
    text = "  The lesion is 3.5 cm wide. It is round!  Is it benign?\nNo, e.g. a cyst is likely.  "
    steps = split_steps(text, offset=100)
    assert [s.text for s in steps] == ["The lesion is 3.5 cm wide.", "It is round!", "Is it benign?",
                                       "No, e.g. a cyst is likely."]
    for s in steps:
        assert text[s.start - 100:s.end - 100] == s.text


def test_numbering_fragments_merge_and_list_breaks():
    text = "1. Look at the image. 2. The mass is large.\n3) It compresses the airway\n- Then no effusion"
    assert [s.text for s in split_steps(text)] == [
        "1. Look at the image.", "2. The mass is large.", "3) It compresses the airway", "- Then no effusion"]
    assert [s.text for s in split_steps("Step 1. Check. iv. Done. 5.")] == ["Step 1. Check.", "iv. Done.", "5."]
    assert split_steps("   \n ") == []
    assert split_steps('He said "stop." Then left.')[0].text == 'He said "stop."'


def test_segment_steps_completion_coordinates():
    c = "<think>First step. Second step.</think>\n<answer>yes</answer>"
    steps = segment_steps(c)
    assert steps == [Step("First step.", 7, 18), Step("Second step.", 19, 31)]
    assert segment_steps("<answer>yes</answer>") == []
    assert segment_steps("<think>   </think><answer>yes</answer>") == []


# ----------------------------------------------------------------------------- token offsets


def test_token_offsets_match_byte_reference(bpe):
    # 🫁 is not in the training corpus: its last bytes stay single-byte tokens (empty spans)
    text = ("<think>The lesion is in the left lung.\nThe heart is normal. Größe 5 mm. 肺结节 😀 🫁 ok."
            "</think><answer>no</answer>")
    ids = bpe(text, add_special_tokens=False)["input_ids"]
    decoded, offsets = token_offsets(bpe, torch.tensor(ids))
    assert decoded == text
    assert offsets == _expected_spans(bpe, ids, text)
    assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(offsets, offsets[1:]))  # contiguous
    # the tokenizer really splits a multi-byte character across tokens (so empty spans occur) ...
    assert any(s == e for s, e in offsets)
    # ... and really merges across a sentence end
    assert any(".\n" in text[s:e] and e - s > 2 for s, e in offsets)


def test_token_offsets_windowed_equals_full_prefix(bpe):
    text = "Größe 5 mm. 肺结节 😀 ok. Ça va? 肺结节 😀 The lesion is in the left lung." * 3
    ids = bpe(text, add_special_tokens=False)["input_ids"]
    assert _token_chunks(bpe, ids, 8) == _token_chunks(bpe, ids, None)
    assert "".join(_token_chunks(bpe, ids, 2)) == text


def test_token_offsets_truncated_inside_character(bpe):
    ids = bpe("ok 😀", add_special_tokens=False)["input_ids"]
    full = bpe.decode(ids)
    for cut in range(1, len(ids) + 1):
        decoded, offsets = token_offsets(bpe, ids[:cut])
        assert "".join(decoded[s:e] for s, e in offsets) == decoded
    assert full == "ok 😀"


def test_token_offsets_metaspace_tokenizer():
    """A SentencePiece-style decoder strips the leading space of a window: the diff scheme must not."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"],
                                                        show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    text = "The lesion is in the left lung. The heart is normal. Is it benign? No."
    ids = hf(text, add_special_tokens=False)["input_ids"]
    decoded, offsets = token_offsets(hf, ids)
    assert decoded == text
    pieces = [decoded[s:e] for s, e in offsets]
    assert "".join(pieces) == text
    expected = [t.replace("\u2581", " ") for t in hf.convert_ids_to_tokens(ids)]
    expected[0] = expected[0].lstrip(" ")  # the decoder drops the leading space of the text only
    assert pieces == expected


# ----------------------------------------------------------------------------- token -> step


def _brute_step_index(offsets, steps):
    out = []
    for s, e in offsets:
        if s == e:
            hits = [k for k, st in enumerate(steps) if st.start <= s < st.end]
            out.append(hits[0] if hits else -1)
            continue
        ov = [len(set(range(s, e)) & set(range(st.start, st.end))) for st in steps]
        best = max(ov, default=0)
        out.append(ov.index(best) if best > 0 else -1)
    return out


def test_token_step_index_repeated_sentences_and_straddling(bpe):
    completion = ("<think>The lesion is in the left lung.\nThe lesion is in the left lung.\n"
                  "The heart is normal. 肺结节 🫁 ok.</think><answer>no</answer>")
    ids = bpe(completion, add_special_tokens=False)["input_ids"]
    text, offsets = token_offsets(bpe, ids)
    steps = segment_steps(text)
    assert [s.text for s in steps][:2] == ["The lesion is in the left lung."] * 2
    idx = token_step_index(offsets, steps)
    assert idx == _brute_step_index(offsets, steps)
    assert set(idx) == {-1, 0, 1, 2, 3}                      # repeated sentences -> different steps
    assert idx[0] == -1 and idx[-1] == -1                    # <think> and </answer> are in no step
    # a straddling token goes to the step holding most of its chars
    for (s, e), k in zip(offsets, idx):
        if k >= 0:
            inside = min(e, steps[k].end) - max(s, steps[k].start)
            assert all(inside >= min(e, st.end) - max(s, st.start) for st in steps)


def test_token_step_index_hand_cases():
    steps = [Step("ab", 0, 2), Step("cd", 3, 5)]
    # tokens: "a" | "b c" (1 char each side: tie -> earlier) | "d" + 2 chars outside | "xyz" outside
    assert token_step_index([(0, 1), (1, 4), (4, 7), (7, 10)], steps) == [0, 0, 1, -1]
    # empty spans (a token ending inside a multi-byte char) take the step holding the char at their start
    assert token_step_index([(0, 0), (2, 2), (3, 3), (5, 5)], steps) == [0, -1, 1, -1]
    assert token_step_index([(0, 3)], []) == [-1]


# ----------------------------------------------------------------------------- special tokens


def test_special_tokens_never_join_a_step():
    text = "<think>First finding. Second finding<|im_end|>"
    # without the exclusion (the bug): the chat end token is part of the last step
    assert [s.text for s in segment_steps(text)] == ["First finding.", "Second finding<|im_end|>"]
    specials = ("<|im_end|>", "<|endoftext|>")
    steps = segment_steps(text, exclude=specials)
    assert [s.text for s in steps] == ["First finding.", "Second finding"]
    assert all(text[s.start:s.end] == s.text for s in steps)
    # pad after EOS, a special token inside a sentence, a numbering fragment before EOS
    text = "<think>1. One.\n2.<|im_end|><|endoftext|><|endoftext|>"
    assert [s.text for s in segment_steps(text, exclude=specials)] == ["1. One.", "2."]
    text = "<think>Left<|endoftext|> lung. Done.</think><answer>x</answer><|im_end|>"
    steps = segment_steps(text, exclude=specials)
    assert [s.text for s in steps] == ["Left", "lung.", "Done."]
    assert all(text[s.start:s.end] == s.text for s in steps)


def test_special_token_strings_keep_registered_tags(bpe):
    # this tokenizer registers the tags as special tokens: they stay usable, only EOS is excluded
    assert "<think>" in bpe.all_special_tokens or any(t.special and t.content == "<think>"
                                                      for t in bpe.added_tokens_decoder.values())
    special = special_token_strings(bpe, keep=reasoning_tags("think"))
    assert special == ("<|endoftext|>",)
    assert special_token_ids(bpe, special) == {bpe.eos_token_id}
    ids = bpe.encode("<think>The lesion is large! Is it benign", add_special_tokens=False) + [bpe.eos_token_id]
    text, offsets = token_offsets(bpe, ids)
    steps = segment_steps(text, "think", special)
    assert [s.text for s in steps] == ["The lesion is large!", "Is it benign"]
    idx = token_step_index(offsets, steps, special=[i in special_token_ids(bpe, special) for i in ids])
    assert idx[0] == -1 and idx[-1] == -1 and set(idx[1:-1]) == {0, 1}


@pytest.mark.filterwarnings("ignore:AnswerScorer")
@pytest.mark.parametrize("family", FAMILIES)
def test_truncated_reasoning_with_tiny_backbone_tokenizers(family, tmp_path):
    """rollout.score end to end with each tiny backbone's tokenizer (saved and reloaded as the trainer
    loads it): reasoning cut off without its closing tag, then EOS and pad. The judge sees no special
    token, and EOS / pad keep the plain advantage (step index -1)."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from mrpo.data.synthetic import synthetic_corpus
    from mrpo.models.tiny import build_tokenizer
    from mrpo.rewards import RewardModel
    from mrpo.rollout import score

    from .test_rewards import FakeJudge, _cfg, _rec

    build_tokenizer(family, synthetic_corpus(n=200)).save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    tag = "thinking" if family == "qwen3_vl" else "think"
    special = special_token_strings(tok, keep=reasoning_tags(tag))
    assert {tok.eos_token, tok.pad_token, "<|im_end|>", "<|endoftext|>"} <= set(special)
    assert not set(reasoning_tags(tag)) & set(special)

    ids = tok.encode(f"<{tag}>The lesion is a good finding. Second good finding", add_special_tokens=False)
    ids = ids + [tok.eos_token_id, tok.pad_token_id]
    judge = FakeJudge()
    rollout = SimpleNamespace(completion_ids=[ids], records=[_rec(0)])
    scored, _ = score(rollout, RewardModel(_cfg(), judge, reasoning_tag=tag), tok)
    assert tok.decode(ids[-2:], skip_special_tokens=False) == "<|im_end|><|endoftext|>"
    assert [s.text for s in scored[0].steps] == ["The lesion is a good finding.", "Second good finding"]
    assert judge.calls[0][0].steps == ["The lesion is a good finding.", "Second good finding"]
    idx = rollout.step_index[0].tolist()
    assert idx[-2:] == [-1, -1] and set(idx[:-2]) - {-1} == {0, 1} and idx[-3] == 1
    assert not rollout.step_valid[0][-2:].any()


def test_greedy_eval_texts_drop_the_final_eos(bpe, monkeypatch):
    """The trainer's evaluation texts end before EOS (as mrpo.infer's predictions do), so truncated
    reasoning's last step, segmented from the text alone, holds no special token."""
    import contextlib
    from types import SimpleNamespace

    from mrpo import decoding
    from mrpo.rollout import greedy_texts

    truncated = bpe.encode("<think>The lesion is large! Is it benign", add_special_tokens=False)
    finished = bpe.encode("<think>No.</think><answer>x</answer>", add_special_tokens=False)
    eos = bpe.eos_token_id
    backbone = SimpleNamespace(tokenizer=bpe, eos_token_ids=[eos])
    monkeypatch.setattr(decoding, "generate", lambda backbone, batch, rows, **kw: decoding.Generation(
        [truncated + [eos], finished + [eos]][:len(rows)], [], "hf:eager"))
    engine = SimpleNamespace(generation=contextlib.nullcontext)
    pool = SimpleNamespace(encode=lambda records: records)
    texts = greedy_texts(engine, backbone, pool, [{"id": 0}, {"id": 1}], 8, batch_size=2, stop=lambda: False)
    assert texts == ["<think>The lesion is large! Is it benign", "<think>No.</think><answer>x</answer>"]
    assert [s.text for s in segment_steps(texts[0])] == ["The lesion is large!", "Is it benign"]
