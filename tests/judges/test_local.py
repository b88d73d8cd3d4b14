"""LocalJudge with a tiny random causal LM saved to a temporary folder (offline)."""
import json
import os
from types import SimpleNamespace

import pytest
import torch

from mrpo.judges.base import JudgeRequest, StepVerdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    d = tmp_path_factory.mktemp("judge_lm")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(['{"steps": [{"index": 1, "alignment": 1, "contribution": 0}]}', "Step 1: The lesion."] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(d)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(hf), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                      eos_token_id=hf.eos_token_id, pad_token_id=hf.pad_token_id, bos_token_id=None)
    Qwen2ForCausalLM(cfg).save_pretrained(d)
    return str(d)


def _cfg(path, **kw):
    base = dict(kind="local", local_model_path=path, max_new_tokens=6, max_retries=2, temperature=0.0,
                max_concurrency=4, cache_dir=None)
    base.update(kw)
    return SimpleNamespace(**base)


def _reqs():
    return [JudgeRequest(sample_id=f"s{i}", problem="Where?", image=None, gold_answer="left", gold_reasoning="",
                         steps=[f"Step text {j}." for j in range(i + 1)]) for i in range(3)]


def test_random_model_garbage_is_unjudged_and_counted(tiny_lm, caplog):
    from mrpo.judges import build_judge
    from mrpo.judges.local import LocalJudge

    judge = build_judge(_cfg(tiny_lm))
    assert isinstance(judge, LocalJudge) and not judge.with_image
    reqs = _reqs() + [JudgeRequest("e", "Where?", None, "left", "", [])]
    out = judge.judge(reqs)
    assert out[:3] == [None, None, None] and out[3] == StepVerdict([], [])
    assert judge.stats.failures == 3 and judge.stats.retries == 3 * 2 and judge.stats.requests == 4
    assert "invalid reply" in caplog.text


def test_valid_json_from_generate_gives_verdicts(tiny_lm, tmp_path, monkeypatch):
    from mrpo.judges.local import LocalJudge

    judge = LocalJudge(_cfg(tiny_lm, cache_dir=str(tmp_path)))
    seen = []

    def fake_generate(input_ids=None, attention_mask=None, **kw):
        seen.append(kw)
        replies = []
        for row, mask in zip(input_ids, attention_mask):
            prompt = judge.tokenizer.decode(row[mask.bool()])
            k = prompt.count("Step text")
            steps = [{"index": i + 1, "alignment": i % 2, "contribution": 0} for i in range(k)]
            replies.append(judge.tokenizer(json.dumps({"steps": steps}), add_special_tokens=False)["input_ids"])
        width = max(map(len, replies))
        pad = judge.tokenizer.pad_token_id
        new = torch.tensor([r + [pad] * (width - len(r)) for r in replies])
        return torch.cat([input_ids, new], dim=1)

    monkeypatch.setattr(judge.model, "generate", fake_generate)
    out = judge.judge(_reqs())
    assert out == [StepVerdict([0], [0]), StepVerdict([0, 1], [0, 0]), StepVerdict([0, 1, 0], [0, 0, 0])]
    assert judge.stats.failures == 0 and judge.stats.retries == 0
    assert seen[0]["do_sample"] is False and seen[0]["max_new_tokens"] == 6
    # second pass: served from the cache, the model is not called again
    assert judge.judge(_reqs()) == out and len(seen) == 1 and judge.stats.cache_hits == 3


def test_tiny_vlm_folder_loads_and_judges_text_only(tmp_path, caplog):
    """A project tiny Qwen2.5-VL folder: image-text-to-text model class; without a usable processor
    (no torchvision here) the judge falls back to text-only prompts and still counts failures."""
    from mrpo.judges.local import LocalJudge
    from mrpo.models.tiny import build_tiny

    path = build_tiny("qwen2_5_vl", tmp_path / "vlm")
    judge = LocalJudge(_cfg(str(path), max_retries=1))
    assert type(judge.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    out = judge.judge(_reqs()[:2])
    assert out == [None, None] and judge.stats.failures == 2 and judge.stats.retries == 2
    if not judge.with_image:
        assert "text only" in caplog.text
