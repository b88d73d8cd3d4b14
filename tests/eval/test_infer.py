"""mrpo.infer: prediction records, batching, resumability (truncated last line), CLI on a tiny model."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
from PIL import Image

from mrpo.infer import completed_ids, prediction_record, run_inference

EOS = 1


def test_completed_ids_cuts_truncated_last_line(tmp_path):
    p = tmp_path / "pred.jsonl"
    good = '{"id": "a", "x": 1}\n{"id": "b"}\n'
    p.write_text(good + '{"id": "c", "te')
    assert completed_ids(p) == {"a", "b"}
    assert p.read_text() == good
    p.write_text('{"id": "a"}\n{"id": "b"}')          # complete record, newline lost
    assert completed_ids(p) == {"a", "b"}
    assert p.read_text() == '{"id": "a"}\n{"id": "b"}\n'
    p.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"pred.jsonl:2: corrupt"):
        completed_ids(p)
    assert completed_ids(tmp_path / "missing.jsonl") == set()


def test_prediction_record_fields():
    rec = {"id": "r1", "dataset": "vqa_rad", "answer_type": "closed", "problem": "Is it?", "solution": "yes",
           "gold_reasoning": "g", "image": "/x.png", "facts": {"organ": "lung"}}
    text = "<think>The image is a CT scan. There is a mass.</think>\n<answer>Yes</answer>"
    out = prediction_record(rec, text, "think", num_tokens=7)
    assert out["reasoning"] == "The image is a CT scan. There is a mass."
    assert out["steps"] == ["The image is a CT scan.", "There is a mass."]
    assert out["answer"] == "Yes" and out["correct"] is True and out["num_tokens"] == 7
    assert out["facts"] == {"organ": "lung"} and out["solution"] == "yes" and out["text"] == text
    q3 = prediction_record(rec, "<thinking>It is a CT. It is big.</thinking><answer>no</answer>", "thinking")
    assert q3["steps"] == ["It is a CT.", "It is big."] and q3["correct"] is False
    none = prediction_record({**rec, "facts": None}, "no tags at all")
    assert none["answer"] is None and none["steps"] == [] and none["correct"] is False and "facts" not in none


class CharTokenizer:
    eos_token_id = EOS
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=False):
        assert not skip_special_tokens
        return "".join(chr(i) for i in ids)


class FakeBackbone:
    """Completion = a scripted text per problem, as char ids + EOS, padded like generate's output."""
    reasoning_tag = "think"
    eos_token_ids = [EOS]
    pad_token_id = 0

    def __init__(self):
        self.tokenizer = CharTokenizer()
        self.calls = []

    def encode_prompts(self, problems, images, max_prompt_length=None, prompt_template=None):
        assert len(problems) == len(images)
        assert all(isinstance(ims, list) and all(isinstance(im, Image.Image) for im in ims) for ims in images)
        return {"problems": list(problems)}

    def generate(self, batch, max_new_tokens, temperature=1.0, top_p=1.0, do_sample=True, **generate_kwargs):
        self.calls.append((list(batch["problems"]), do_sample))
        return [[ord(c) for c in f"<think>Step about {p}. Done.</think><answer>{p}</answer>"] + [EOS]
                for p in batch["problems"]]


def _records(tmp_path, n):
    img = tmp_path / "img.png"
    Image.new("RGB", (16, 16)).save(img)
    return [{"id": f"r{i}", "problem": f"p{i}", "solution": f"p{i}" if i % 2 == 0 else "other",
             "image": str(img), "dataset": "d", "answer_type": "open", "gold_reasoning": ""} for i in range(n)]


def test_run_inference_resumes_after_crash(tmp_path):
    recs = _records(tmp_path, 5)
    out = tmp_path / "eval" / "predictions.jsonl"
    bb = FakeBackbone()
    assert run_inference(bb, recs[:3], out, batch_size=2, max_new_tokens=32, progress=False, decode="hf") == 3
    assert [c[0] for c in bb.calls] == [["p0", "p1"], ["p2"]] and bb.calls[0][1] is False   # greedy
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows[0]["text"] == "<think>Step about p0. Done.</think><answer>p0</answer>"   # EOS stripped
    assert rows[0]["steps"] == ["Step about p0.", "Done."] and rows[0]["num_tokens"] == len(rows[0]["text"]) + 1
    assert [r["correct"] for r in rows] == [True, False, True]

    with open(out, "a") as f:                      # killed mid-write
        f.write('{"id": "r3", "dataset": "d", "te')
    recs[4]["image"] = str(tmp_path / "missing.png")
    bb2 = FakeBackbone()
    assert run_inference(bb2, recs, out, batch_size=2, progress=False, temperature=0.7, decode="hf") == 1
    assert bb2.calls == [(["p3"], True)]
    ids = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert ids == ["r0", "r1", "r2", "r3"]

    recs[4]["image"] = recs[0]["image"]            # fixed: the skipped record is retried
    bb3 = FakeBackbone()
    assert run_inference(bb3, recs + recs[:1], out, progress=False, decode="hf") == 1
    assert [c[0] for c in bb3.calls] == [["p4"]]
    assert len(set(json.loads(x)["id"] for x in out.read_text().splitlines())) == 5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("mrpo.models.load")
    pytest.importorskip("mrpo.models.tiny")
    import torch

    from mrpo.data.synthetic import generate_synthetic
    from mrpo.models.tiny import build_tiny

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny")
    model = build_tiny("qwen2_5_vl", root / "model")
    _, test = generate_synthetic(root / "data", n_train=0, n_test=5)
    return model, test


def test_tiny_model_inference_cli_resumable(tiny, tmp_path, capsys):
    from mrpo.data.records import load_records
    from mrpo.infer import main
    from mrpo.models.load import load_backbone

    model, data = tiny
    out = tmp_path / "pred.jsonl"
    args = ["--model", str(model), "--data", str(data), "--out", str(out), "--batch-size", "2",
            "--max-new-tokens", "6", "--no-progress", "--device", "cpu"]
    assert main(args + ["--limit", "3"]) == 0
    first = out.read_text().splitlines()
    assert len(first) == 3 and "wrote 3 new predictions" in capsys.readouterr().out
    out.write_text("\n".join(first[:2]) + "\n" + first[2][: len(first[2]) // 2])   # truncated third line
    assert main(args) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"synthetic-test-{i:05d}" for i in range(5)]
    assert rows[2]["text"] == json.loads(first[2])["text"]       # greedy: the redone record is identical
    for r in rows:
        assert {"id", "dataset", "answer_type", "problem", "solution", "gold_reasoning", "image", "text",
                "reasoning", "answer", "steps", "correct", "facts", "num_tokens"} <= r.keys()
        assert 1 <= r["num_tokens"] <= 6

    # the library entry point (as the trainer calls it) agrees with the CLI
    bb = load_backbone(model)
    recs, _ = load_records(data)
    out2 = tmp_path / "pred2.jsonl"
    assert run_inference(bb, recs[:2], out2, batch_size=1, max_new_tokens=6, progress=False) == 2
    assert [json.loads(x)["text"] for x in out2.read_text().splitlines()] == [r["text"] for r in rows[:2]]


def test_infer_decode_loop_equals_generate(tiny, tmp_path):
    """--decode loop (the default, our decode loop) and --decode hf (transformers' generate) write the
    same greedy predictions."""
    from mrpo.infer import main

    model, data = tiny
    texts = {}
    for decode in ("loop", "hf"):
        out = tmp_path / f"{decode}.jsonl"
        assert main(["--model", str(model), "--data", str(data), "--out", str(out), "--batch-size", "3",
                     "--max-new-tokens", "12", "--no-progress", "--device", "cpu", "--decode", decode]) == 0
        texts[decode] = [json.loads(x)["text"] for x in out.read_text().splitlines()]
    assert len(texts["loop"]) == 5 and texts["loop"] == texts["hf"]
