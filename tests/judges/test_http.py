"""HTTPJudge against a fake OpenAI-compatible server on 127.0.0.1 (ephemeral port, thread)."""
import json
import logging
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from mrpo.judges import build_judge
from mrpo.judges.base import JudgeRequest, StepVerdict
from mrpo.judges.http import HTTPJudge

SECRET = "sk-test-SECRET-0123456789"


class FakeServer:
    """Replies with a script of actions, then valid verdicts. Each action: "ok", "bad_json", "wrong_count",
    "garbage_body", "sleep", or an int HTTP status. A valid verdict marks step i valid iff it contains 'good'."""

    def __init__(self):
        self.script, self.calls, self.bodies, self.headers = [], 0, [], []
        self.in_flight = self.max_in_flight = 0
        self.delay = 0.0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.calls += 1
                    server.bodies.append(body)
                    server.headers.append(dict(self.headers))
                    action = server.script.pop(0) if server.script else "ok"
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    time.sleep(server.delay)
                    if action == "sleep":
                        time.sleep(1.0)
                    user = body["messages"][1]["content"]
                    text = user if isinstance(user, str) else user[-1]["text"]
                    steps = re.findall(r"^Step \d+: (.*)$", text, re.M)
                    labels = [{"index": i + 1, "alignment": int("good" in s), "contribution": 0}
                              for i, s in enumerate(steps)]
                    content = json.dumps({"steps": labels})
                    if action == "bad_json":
                        content = "{not json"
                    elif action == "wrong_count":
                        content = json.dumps({"steps": labels[:-1]})
                    if isinstance(action, int):
                        self._send(action, b'{"error": "nope"}')
                    elif action == "garbage_body":
                        self._send(200, b"<html>")
                    else:
                        self._send(200, json.dumps({"choices": [{"message": {"role": "assistant",
                                                                            "content": content}}]}).encode())
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _send(self, code, payload):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("MRPO_TEST_JUDGE_KEY", SECRET)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def _cfg(server, tmp_path=None, **kw):
    base = dict(kind="http", model="judge-model", base_url=server.url, api_key_env="MRPO_TEST_JUDGE_KEY",
                max_concurrency=4, timeout_s=5.0, max_retries=2, backoff_s=0.0, temperature=0.0,
                cache_dir=str(tmp_path / "cache") if tmp_path else None)
    base.update(kw)
    return SimpleNamespace(**base)


def _req(sid="s0", steps=("A good step.", "A bad step."), image=None):
    return JudgeRequest(sample_id=sid, problem="Where?", image=image, gold_answer="left",
                        gold_reasoning="Left.", steps=list(steps))


def test_success_payload_and_cache_hit(server, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    img = tmp_path / "img.jpg"
    img.write_bytes(b"jpeg-bytes")
    judge = build_judge(_cfg(server, tmp_path))
    assert isinstance(judge, HTTPJudge)
    reqs = [_req("s0", image=str(img)), _req("s1", ["good.", "good!", "bad."]), _req("s2", [])]
    out = judge.judge(reqs)
    assert out == [StepVerdict([1, 0], [0, 0]), StepVerdict([1, 1, 0], [0, 0, 0]), StepVerdict([], [])]
    assert server.calls == 2                                            # K = 0 needs no call
    body = next(b for b in server.bodies if not isinstance(b["messages"][1]["content"], str))
    assert body["model"] == "judge-model" and body["temperature"] == 0.0
    assert body["response_format"] == {"type": "json_object"}
    assert body["messages"][1]["content"][0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert all(h["Authorization"] == f"Bearer {SECRET}" for h in server.headers)
    assert judge.stats.as_dict() == dict(requests=3, cache_hits=0, retries=0, failures=0)

    again = HTTPJudge(_cfg(server, tmp_path))                           # a rerun / resume
    assert again.judge(reqs) == out
    assert server.calls == 2 and again.stats.cache_hits == 2

    # the key is nowhere but the Authorization header
    cache_text = "".join(p.read_text() for p in (tmp_path / "cache").rglob("*.json"))
    assert SECRET not in cache_text and "judge-model" not in cache_text
    assert SECRET not in repr(judge) and SECRET not in str(vars(judge))
    assert SECRET not in caplog.text


def test_bad_json_then_good_is_retried(server):
    server.script = ["bad_json", "garbage_body"]
    judge = HTTPJudge(_cfg(server), sleep=lambda s: None)
    assert judge.judge([_req()]) == [StepVerdict([1, 0], [0, 0])]
    assert server.calls == 3 and judge.stats.retries == 2 and judge.stats.failures == 0


def test_wrong_step_count_until_exhausted(server, caplog):
    server.script = ["wrong_count"] * 3
    judge = HTTPJudge(_cfg(server, max_retries=2), sleep=lambda s: None)
    assert judge.judge([_req()]) == [None]
    assert server.calls == 3 and judge.stats.retries == 2 and judge.stats.failures == 1
    assert "expected 2 steps, got 1" in caplog.text and "unjudged" in caplog.text


def test_500_until_retries_exhausted_with_backoff(server):
    server.script = [500, 503, 500, 502]
    sleeps = []
    judge = HTTPJudge(_cfg(server, max_retries=3, backoff_s=1.0), sleep=sleeps.append)
    out = judge.judge([_req()])
    assert out == [None] and server.calls == 4
    assert judge.stats.retries == 3 and judge.stats.failures == 1
    assert len(sleeps) == 3 and all(0.5 * 2 ** i <= s <= 1.5 * 2 ** i for i, s in enumerate(sleeps))


def test_429_retried_400_not(server):
    server.script = [429]
    judge = HTTPJudge(_cfg(server), sleep=lambda s: None)
    assert judge.judge([_req()])[0] is not None and server.calls == 2
    server.script = [400]
    assert judge.judge([_req("s9")]) == [None] and server.calls == 3 and judge.stats.failures == 1


def test_auth_error_raises_without_leaking_key(server):
    server.script = [401]
    judge = HTTPJudge(_cfg(server), sleep=lambda s: None)
    with pytest.raises(RuntimeError, match="MRPO_TEST_JUDGE_KEY") as e:
        judge.judge([_req()])
    assert SECRET not in str(e.value)


def test_timeout_is_retried(server):
    server.script = ["sleep"]
    judge = HTTPJudge(_cfg(server, timeout_s=0.2, max_retries=1), sleep=lambda s: None)
    t0 = time.time()
    assert judge.judge([_req()]) == [StepVerdict([1, 0], [0, 0])]
    assert judge.stats.retries == 1 and time.time() - t0 < 1.0
    server.script = ["sleep", "sleep"]
    assert judge.judge([_req("s1")]) == [None] and judge.stats.failures == 1


def test_bounded_concurrency(server):
    server.delay = 0.05
    judge = HTTPJudge(_cfg(server, max_concurrency=2))
    out = judge.judge([_req(f"s{i}", [f"good {i}."]) for i in range(6)])
    assert out == [StepVerdict([1], [0])] * 6
    assert server.max_in_flight == 2


def test_missing_key_sends_no_authorization(server, monkeypatch, caplog):
    monkeypatch.delenv("MRPO_TEST_JUDGE_KEY")
    judge = HTTPJudge(_cfg(server))
    assert "MRPO_TEST_JUDGE_KEY is not set" in caplog.text
    assert judge.judge([_req()])[0] is not None
    assert "Authorization" not in server.headers[-1]
