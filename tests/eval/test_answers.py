"""Accuracy by data set / answer type, and the LLM answer judge against a fake OpenAI-compatible server."""
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from mrpo.eval.answers import AnswerJudge, accuracy_summary, evaluate_answers, parse_verdict


def _rec(i, ds, at, answer, solution, image=None):
    return {"id": f"r{i}", "dataset": ds, "answer_type": at, "problem": f"question {i}?", "solution": solution,
            "answer": answer, "image": image}


RECORDS = [
    _rec(0, "vqa_rad", "closed", "Yes.", "yes"),          # rule ok
    _rec(1, "vqa_rad", "closed", "no", "yes"),            # rule wrong
    _rec(2, "vqa_rad", "open", "left lung", "Left lung"),  # rule ok
    _rec(3, "vqa_rad", "open", None, "liver"),            # no answer: wrong
    _rec(4, "slake", "open", "two", "2"),                 # rule ok (numeric)
    _rec(5, "slake", "closed", "yes", "no"),              # rule wrong
]


def test_rule_accuracy_by_dataset_and_type():
    s = accuracy_summary(RECORDS)
    assert s["overall"] == {"n": 6, "rule_correct": 3, "rule_accuracy": 0.5}
    assert s["by_answer_type"]["closed"]["rule_accuracy"] == pytest.approx(1 / 3)
    assert s["by_answer_type"]["open"]["rule_accuracy"] == pytest.approx(2 / 3)
    rad = s["by_dataset"]["vqa_rad"]
    assert (rad["n"], rad["rule_correct"]) == (4, 2)
    assert rad["by_answer_type"]["closed"]["rule_accuracy"] == 0.5
    assert rad["by_answer_type"]["open"]["rule_accuracy"] == 0.5
    assert s["by_dataset"]["slake"]["rule_accuracy"] == 0.5
    assert "llm_accuracy" not in s["overall"]


def test_rule_correct_from_text_when_no_answer_field():
    s = accuracy_summary([{"id": "x", "dataset": "d", "answer_type": "open", "solution": "3",
                           "text": "<think>a.</think><answer>three</answer>"}])
    assert s["overall"]["rule_correct"] == 1


def test_parse_verdict():
    assert parse_verdict("1") is True and parse_verdict(" 0\n") is False and parse_verdict("'1'.") is True
    assert parse_verdict("O") is True and parse_verdict("X") is False
    assert parse_verdict("maybe") is None and parse_verdict("10") is None and parse_verdict(None) is None


class FakeOpenAI:
    """Answers /v1/chat/completions by the 'answer to be determined'; scripted failures."""

    def __init__(self):
        self.calls = {}
        self.headers = []
        self.payloads = []
        self.status = {}   # answer -> HTTP status to reply with
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.headers.append(dict(self.headers))
                outer.payloads.append(body)
                content = body["messages"][1]["content"]
                text = content if isinstance(content, str) else content[0]["text"]
                answer = re.search(r"answer to be determined: (.*)\n", text).group(1)
                n = outer.calls[answer] = outer.calls.get(answer, 0) + 1
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": "not found"})
                if answer == "two" and n == 1:
                    return self._send(500, {"error": "overloaded"})
                if answer in outer.status:
                    return self._send(outer.status[answer], {"error": "scripted"})
                reply = {"Yes.": "1", "no": "0", "left lung": " 1\n", "two": "1"}.get(answer, "maybe")
                self._send(200, {"choices": [{"message": {"role": "assistant", "content": reply}}]})

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_llm_judge_success_retry_and_unjudged(tmp_path, monkeypatch):
    monkeypatch.setenv("MRPO_TEST_KEY", "sk-test-123")
    img = tmp_path / "img.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(img)
    records = [dict(r) for r in RECORDS]
    records[0]["image"] = str(img)
    with FakeOpenAI() as srv:
        judge = AnswerJudge(base_url=srv.url, model="judge-x", api_key_env="MRPO_TEST_KEY", max_concurrency=3,
                            timeout_s=5, max_retries=2, backoff_s=0.0)
        s = evaluate_answers(records, judge, out_dir=tmp_path)
    o = s["overall"]
    assert (o["llm_judged"], o["llm_correct"], o["llm_unjudged"]) == (5, 3, 1)
    assert o["llm_accuracy"] == pytest.approx(0.6)
    rad, slake = s["by_dataset"]["vqa_rad"], s["by_dataset"]["slake"]
    assert (rad["llm_judged"], rad["llm_correct"], rad["llm_unjudged"]) == (4, 2, 0)
    assert (slake["llm_judged"], slake["llm_correct"], slake["llm_unjudged"]) == (1, 1, 1)
    assert slake["llm_accuracy"] == 1.0   # the unjudged record is not scored
    st = s["llm_judge"]
    assert (st["requests"], st["retries"], st["failures"], st["skipped_no_answer"]) == (8, 3, 1, 1)
    assert srv.calls == {"Yes.": 1, "no": 1, "left lung": 1, "two": 2, "yes": 3}
    assert all(h.get("Authorization") == "Bearer sk-test-123" for h in srv.headers)
    assert all(p["model"] == "judge-x" for p in srv.payloads)
    with_image = [p for p in srv.payloads if not isinstance(p["messages"][1]["content"], str)]
    assert len(with_image) == 1
    assert with_image[0]["messages"][1]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")
    text = (tmp_path / "answers.json").read_text()
    assert "sk-test-123" not in text
    judged = [json.loads(x) for x in (tmp_path / "answers_judged.jsonl").read_text().splitlines()]
    assert [j["llm_correct"] for j in judged] == [True, False, True, False, True, None]
    assert [j["rule_correct"] for j in judged] == [True, False, True, False, True, False]


def test_llm_judge_unreachable_endpoint_gives_unjudged():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]   # closed again: nothing listens there
    judge = AnswerJudge(base_url=f"http://127.0.0.1:{port}/v1", model="m", api_key_env="MRPO_UNSET_KEY_XYZ",
                        max_retries=1, backoff_s=0.0, timeout_s=2)
    verdicts = judge.judge(RECORDS[:3])
    assert verdicts == [None, None, None]
    assert judge.stats["failures"] == 3 and judge.stats["retries"] == 3 and judge.stats["requests"] == 6
    s = accuracy_summary(RECORDS[:3], verdicts)
    assert s["overall"]["llm_accuracy"] is None and s["overall"]["llm_unjudged"] == 3


def test_llm_judge_400_not_retried_401_raises_without_key(tmp_path, monkeypatch):
    monkeypatch.setenv("MRPO_TEST_KEY", "sk-test-456")
    recs = [_rec(0, "d", "open", "bad request", "x", image=str(tmp_path / "missing.png")),
            _rec(1, "d", "open", "unauthorized", "x")]
    with FakeOpenAI() as srv:
        srv.status = {"bad request": 400, "unauthorized": 401}
        judge = AnswerJudge(base_url=srv.url, model="judge-x", api_key_env="MRPO_TEST_KEY", max_concurrency=1,
                            timeout_s=5, max_retries=2, backoff_s=0.0)
        assert judge.judge(recs[:1]) == [None]
        assert srv.calls == {"bad request": 1}
        assert isinstance(srv.payloads[0]["messages"][1]["content"], str)   # missing image left out
        assert (judge.stats["requests"], judge.stats["retries"], judge.stats["errors"],
                judge.stats["failures"]) == (1, 0, 1, 1)
        assert judge.last_errors[0].startswith("r0: rejected, not retried: HTTP 400")
        with pytest.raises(RuntimeError, match=r"HTTP 401.*\$MRPO_TEST_KEY") as e:
            judge.judge(recs[1:])
        assert "sk-test-456" not in str(e.value) and srv.calls["unauthorized"] == 1


def test_cli_answers(tmp_path, capsys):
    from mrpo.eval.__main__ import main

    pred = tmp_path / "predictions.jsonl"
    pred.write_text("".join(json.dumps(r) + "\n" for r in RECORDS) + '{"id": "trunc')   # truncated last line
    assert main(["answers", "--pred", str(pred)]) == 0
    s = json.loads((tmp_path / "answers.json").read_text())
    assert s["overall"]["rule_accuracy"] == 0.5 and s["predictions"] == str(pred)
    assert "vqa_rad" in capsys.readouterr().out


def test_llm_judge_sees_integers_spelled_out():
    """The paper's answer evaluation spells integers out (num2words) before asking the judge."""
    recs = [_rec(0, "slake", "open", "2", "2"), _rec(1, "slake", "open", "left lung", "Left lung")]
    with FakeOpenAI() as srv:
        judge = AnswerJudge(base_url=srv.url, model="m", api_key_env="MRPO_UNSET_KEY", max_concurrency=1,
                            timeout_s=5, max_retries=1, backoff_s=0.0)
        assert judge.judge(recs) == [True, True]   # the fake server knows "two", never "2"
    texts = [p["messages"][1]["content"] for p in srv.payloads]
    assert any("ground truth): two\n- answer to be determined: two\n" in t for t in texts)
    assert any("ground truth): Left lung\n" in t for t in texts)
