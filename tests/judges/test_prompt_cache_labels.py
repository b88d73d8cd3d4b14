"""Judge prompt + strict reply parsing, the on-disk cache, the labels judge and the registry."""
import base64
import json
import threading
from types import SimpleNamespace

import pytest

from mrpo.judges import JUDGES, build_judge
from mrpo.judges.base import JudgeRequest, JudgeStats, StepVerdict
from mrpo.judges.cache import JudgeCache, judge_cached
from mrpo.judges.labels import LabelsJudge
from mrpo.judges.prompt import PROMPT_VERSION, JudgeResponseError, build_messages, parse_verdict


def _req(steps=("The opacity is left.", "So the answer is left."), image=None, sid="s0", **kw):
    base = dict(sample_id=sid, problem="Which side?", image=image, gold_answer="left",
                gold_reasoning="Left opacity.", steps=list(steps))
    base.update(kw)
    return JudgeRequest(**base)


def test_build_messages_text_and_image(tmp_path):
    img = tmp_path / "x.png"
    img.write_bytes(b"\x89PNG fake bytes")
    msgs = build_messages(_req(image=str(img)), with_image=True)
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert "JSON" in msgs[0]["content"]
    image_part, text_part = msgs[1]["content"]
    url = image_part["image_url"]["url"]
    assert url.startswith("data:image/png;base64,") and base64.b64decode(url.split(",", 1)[1]) == img.read_bytes()
    text = text_part["text"]
    assert "Which side?" in text and "Left opacity." in text and "Reference answer: left" in text
    assert "Step 1: The opacity is left.\nStep 2: So the answer is left." in text
    assert isinstance(build_messages(_req(image=str(img)), with_image=False)[1]["content"], str)
    assert "(not available)" in build_messages(_req(gold_reasoning=""), with_image=False)[1]["content"]
    with pytest.raises(FileNotFoundError, match="missing.png"):
        build_messages(_req(image=str(tmp_path / "missing.png")), with_image=True)


GOOD = {"steps": [{"index": 1, "alignment": 1, "contribution": 0}, {"index": 2, "alignment": 0, "contribution": 0}]}


def test_parse_verdict_accepts():
    v = parse_verdict(json.dumps(GOOD), 2)
    assert v == StepVerdict([1, 0], [0, 0]) and v.valid == [True, False]
    assert parse_verdict("```json\n" + json.dumps(GOOD) + "\n```", 2) == v
    assert parse_verdict("Sure! Here it is: " + json.dumps(GOOD) + " Done.", 2) == v
    shuffled = {"steps": GOOD["steps"][::-1]}
    assert parse_verdict(json.dumps(shuffled), 2) == v             # reordered by index
    no_index = {"steps": [{"alignment": True, "contribution": False}]}
    assert parse_verdict(json.dumps(no_index), 1) == StepVerdict([1], [0])
    assert parse_verdict('{"steps": []}', 0) == StepVerdict([], [])


@pytest.mark.parametrize("text,match", [
    ("not json", "not valid JSON"),
    ('{"steps": [', "not valid JSON"),
    ('[1, 2]', "'steps' list"),
    (json.dumps({"steps": GOOD["steps"][:1]}), "expected 2 steps, got 1"),
    (json.dumps({"steps": [GOOD["steps"][0], {"index": 2, "alignment": 2, "contribution": 0}]}), "0 or 1"),
    (json.dumps({"steps": [GOOD["steps"][0], {"index": 2, "alignment": "1", "contribution": 0}]}), "0 or 1"),
    (json.dumps({"steps": [GOOD["steps"][0], {"index": 2, "alignment": 0.5, "contribution": 0}]}), "0 or 1"),
    (json.dumps({"steps": [GOOD["steps"][0], {"index": 2, "contribution": 0}]}), "alignment"),
    (json.dumps({"steps": [GOOD["steps"][0], {"index": 3, "alignment": 0, "contribution": 0}]}), "indices"),
    (json.dumps({"steps": [GOOD["steps"][0], {"alignment": 0, "contribution": 0}]}), "indices"),
    (json.dumps({"steps": [1, 2]}), "object"),
])
def test_parse_verdict_rejects(text, match):
    with pytest.raises(JudgeResponseError, match=match):
        parse_verdict(text, 2)


def test_cache_key_inputs_and_roundtrip(tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(b"image-1")
    cache = JudgeCache(tmp_path / "cache")
    k = cache.key("m", _req(image=str(img)))
    assert len(k) == 64 and cache.get(k) is None
    assert cache.key("m", _req(image=str(img))) == k
    assert cache.key("m", _req(image=str(img), sid="other")) == k          # sample id is not an input
    for other in (cache.key("m2", _req(image=str(img))),
                  cache.key("m", _req(image=str(img)), prompt_version=PROMPT_VERSION + "x"),
                  cache.key("m", _req(image=str(img), problem="Which lobe?")),
                  cache.key("m", _req(image=str(img), gold_answer="right")),
                  cache.key("m", _req(image=str(img), gold_reasoning="")),
                  cache.key("m", _req(steps=["The opacity is left."], image=str(img))),
                  cache.key("m", _req())):
        assert other != k
    img2 = tmp_path / "b.png"
    img2.write_bytes(b"image-2")
    assert cache.key("m", _req(image=str(img2))) != k                       # image bytes are an input
    img2.write_bytes(b"image-1")
    assert cache.key("m", _req(image=str(img2))) == k                       # ... not the path

    cache.put(k, StepVerdict([1, 0], [0, 1]))
    assert cache.get(k) == StepVerdict([1, 0], [0, 1])
    assert (tmp_path / "cache" / k[:2] / f"{k}.json").is_file()
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    (tmp_path / "cache" / k[:2] / f"{k}.json").write_text("{torn")
    assert cache.get(k) is None                                             # unreadable -> miss
    with pytest.raises(FileNotFoundError, match="sample 's0'"):
        cache.key("m", _req(image=str(tmp_path / "nope.png")))


def test_cache_concurrent_writers(tmp_path):
    cache = JudgeCache(tmp_path)
    threads = [threading.Thread(target=cache.put, args=("ab" * 32, StepVerdict([i % 2], [0]))) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.get("ab" * 32) in (StepVerdict([0], [0]), StepVerdict([1], [0]))


def test_judge_cached_loop(tmp_path):
    stats, calls = JudgeStats(), []

    def run(todo):
        calls.append([r.sample_id for r in todo])
        return [None if r.sample_id == "bad" else StepVerdict([1] * len(r.steps), [0] * len(r.steps)) for r in todo]

    cache = JudgeCache(tmp_path)
    reqs = [_req(sid="a"), _req(steps=[], sid="empty"), _req(steps=["x."], sid="bad")]
    out = judge_cached(reqs, cache, "m", stats, run)
    assert out[0] == StepVerdict([1, 1], [0, 0]) and out[1] == StepVerdict([], []) and out[2] is None
    assert calls == [["a", "bad"]] and stats.as_dict() == dict(requests=3, cache_hits=0, retries=0, failures=1)
    out = judge_cached(reqs, cache, "m", stats, run)
    assert calls[-1] == ["bad"] and stats.cache_hits == 1 and stats.failures == 2   # failures are not cached


def _write_labels(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return SimpleNamespace(kind="labels", labels_path=str(path))


def test_labels_judge(tmp_path):
    steps = ["The opacity is left.", "So the answer is left."]
    cfg = _write_labels(tmp_path / "l.jsonl", [
        {"id": "s0", "steps": steps, "alignment": [1, 0], "contribution": [0, 0]},
        {"id": "s1", "steps": ["Only."], "alignment": [0], "contribution": [1]}, ""])
    judge = build_judge(cfg)
    assert isinstance(judge, LabelsJudge)
    out = judge.judge([_req(steps), _req(["Only."], sid="s1"), _req(["Other."], sid="s1"), _req(steps, sid="s9"),
                       _req([], sid="s9")])
    assert out[0] == StepVerdict([1, 0], [0, 0]) and out[1] == StepVerdict([0], [1])
    assert out[2] is None and out[3] is None and out[4] == StepVerdict([], [])   # steps differ / unknown id
    assert judge.stats.failures == 2 and judge.stats.requests == 5


@pytest.mark.parametrize("row,match", [
    ("{bad json", r"l.jsonl:2: not valid JSON"),
    ({"id": "x", "steps": ["a"]}, r"l.jsonl:2: missing key\(s\) \['alignment', 'contribution'\]"),
    ({"id": "x", "steps": ["a"], "alignment": [1, 0], "contribution": [0]}, r"l.jsonl:2: 'alignment'"),
    ({"id": "x", "steps": ["a"], "alignment": [2], "contribution": [0]}, r"l.jsonl:2: 'alignment' labels"),
    ({"id": "x", "steps": "a", "alignment": [1], "contribution": [0]}, r"l.jsonl:2: 'steps'"),
    ({"id": "s0", "steps": ["a"], "alignment": [0], "contribution": [0]}, "conflicting"),
])
def test_labels_judge_errors_name_file_and_line(tmp_path, row, match):
    cfg = _write_labels(tmp_path / "l.jsonl", [{"id": "s0", "steps": ["a"], "alignment": [1], "contribution": [0]}, row])
    with pytest.raises(ValueError, match=match):
        LabelsJudge(cfg)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        LabelsJudge(SimpleNamespace(labels_path=str(tmp_path / "missing.jsonl")))


def test_build_judge_registry():
    assert build_judge(SimpleNamespace(kind="none")) is None
    assert set(JUDGES) == {"http", "local", "rule", "labels", "python", "none"}
    with pytest.raises(ValueError, match="'http', 'local', 'rule', 'labels', 'python', 'none'"):
        build_judge(SimpleNamespace(kind="gpt"))
    from mrpo.judges.rule import RuleJudge  # imported lazily by the registry
    assert isinstance(build_judge(SimpleNamespace(kind="rule")), RuleJudge)
