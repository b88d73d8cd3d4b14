"""Retry-After, the shared back-off gate, the requests-per-minute cap and usage counting of the LLM judges,
against the fake OpenAI-compatible server on 127.0.0.1 (benchmarks/fake_judge_server.py)."""
import email.utils
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from benchmarks.fake_judge_server import FakeJudgeServer
from mrpo.judges.base import JudgeRequest, StepVerdict, Usage
from mrpo.judges.http import HTTPJudge
from mrpo.judges.openai_client import ChatCompletionClient
from mrpo.judges.ratelimit import RateGate, rank_share, retry_after_s


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def _cfg(url, **kw):
    base = dict(kind="http", model="judge-model", base_url=url, api_key_env="MRPO_TEST_NO_KEY", max_concurrency=4,
                timeout_s=5.0, max_retries=2, backoff_s=0.0, temperature=0.0, cache_dir=None)
    base.update(kw)
    return SimpleNamespace(**base)


def _req(i, steps=("A good step.", "It helps.")):
    return JudgeRequest(sample_id=f"s{i}", problem=f"Q{i}", image=None, gold_answer="left", gold_reasoning="Left.",
                        steps=list(steps))


# ----------------------------------------------------------------------------- Retry-After parsing

def test_retry_after_seconds_decimal_ms_and_http_date():
    assert retry_after_s({"Retry-After": "30"}) == 30.0
    assert retry_after_s({"Retry-After": " 0.25 "}) == 0.25
    assert retry_after_s({"retry-after-ms": "1500", "Retry-After": "9"}) == 1.5   # OpenAI's ms header first
    now = 1_800_000_000.0
    date = email.utils.formatdate(now + 42, usegmt=True)                          # "Fri, 15 Jan 2027 08:00:42 GMT"
    assert retry_after_s({"Retry-After": date}, now=now) == pytest.approx(42.0)
    assert retry_after_s({"Retry-After": email.utils.formatdate(now - 5, usegmt=True)}, now=now) == 0.0   # past
    assert retry_after_s({"Retry-After": "-3"}) == 0.0
    assert retry_after_s({"Retry-After": "soon"}) is None
    assert retry_after_s({}) is None and retry_after_s(None) is None


# ----------------------------------------------------------------------------- the gate, on a fake clock

class FakeClock:
    def __init__(self):
        self.t, self.sleeps = 100.0, []

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.sleeps.append(s)
        self.t += s


def test_gate_pause_holds_until_it_ends_with_a_bounded_spread():
    clock = FakeClock()
    gate = RateGate(clock=clock, sleep=clock.sleep)
    gate.wait()
    assert clock.sleeps == []                          # nothing paused, no cap: no wait
    gate.pause(2.0)
    gate.pause(0.5)                                    # a shorter pause never shortens a running one
    gate.wait()
    assert len(clock.sleeps) == 1 and 2.0 <= clock.sleeps[0] <= 2.0 + 0.2   # spread: up to 10% of the pause
    assert gate.paused_s == pytest.approx(2.0)


def test_gate_rate_cap_spaces_requests_in_order():
    clock = FakeClock()
    gate = RateGate(max_requests_per_minute=120, clock=clock, sleep=clock.sleep)   # one per 0.5 s
    times = []
    for _ in range(5):
        gate.wait()
        times.append(clock.t)
    assert [round(b - a, 9) for a, b in zip(times, times[1:])] == [0.5] * 4
    with pytest.raises(ValueError, match="max_requests_per_minute"):
        RateGate(-1)


def test_rank_share_splits_the_cap_over_processes(monkeypatch):
    assert rank_share(600) == 600
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert rank_share(600) == 150 and rank_share(0) == 0


# ----------------------------------------------------------------------------- against a scripted server

class Scripted:
    """Replies from a script of (status, headers) then 200 verdicts with usage; records arrival times."""

    def __init__(self, script=(), usage=True):
        self.script, self.arrivals, self.lock, self.usage = list(script), [], threading.Lock(), usage
        srv = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with srv.lock:
                    srv.arrivals.append(time.monotonic())
                    status, headers = srv.script.pop(0) if srv.script else (200, {})
                if status == 200:
                    reply = {"choices": [{"message": {"content": '{"steps": [{"index": 1, "alignment": 1, '
                                                                 '"contribution": 0}]}'}}]}
                    if srv.usage:
                        reply["usage"] = {"prompt_tokens": 100, "completion_tokens": 7}
                    payload = json.dumps(reply).encode()
                else:
                    payload = b'{"error": "x"}'
                self.send_response(status)
                for k, v in {"Content-Length": str(len(payload)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted():
    made = []

    def make(*a, **kw):
        made.append(Scripted(*a, **kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


def _client(url, sleeps, **kw):
    args = dict(model="m", api_key_env=None, timeout_s=5.0, max_retries=2, backoff_s=1.0, sleep=sleeps.append)
    args.update(kw)
    return ChatCompletionClient(url, **args)


def test_retry_after_honoured_on_429_and_503_capped_by_the_timeout(scripted):
    srv = scripted([(429, {"Retry-After": "3"}), (503, {"Retry-After": "100"})])
    sleeps = []
    client = _client(srv.url, sleeps, timeout_s=4.0)
    assert client.complete([], str) is not None and len(srv.arrivals) == 3
    # both waits went through the shared gate (its spread adds up to 10%): 3 s as asked, 100 s capped at 4 s
    assert len(sleeps) == 2 and 3.0 <= sleeps[0] <= 3.3 and 4.0 <= sleeps[1] <= 4.4


def test_http_date_retry_after(scripted):
    srv = scripted([(429, {"Retry-After": email.utils.formatdate(time.time() + 3, usegmt=True)})])
    sleeps = []
    assert _client(srv.url, sleeps).complete([], str) is not None
    assert len(sleeps) == 1 and 1.0 <= sleeps[0] <= 3.3               # the date has 1 s resolution


def test_without_retry_after_429_backs_off_exponentially_and_500_alone(scripted):
    srv = scripted([(429, {}), (500, {}), (503, {})])
    sleeps = []
    client = _client(srv.url, sleeps, max_retries=3)
    assert client.complete([], str) is not None
    assert len(sleeps) == 3 and all(0.5 * 2 ** i <= s <= 1.5 * 2 ** i * 1.1 for i, s in enumerate(sleeps))
    assert client.gate.paused_s == pytest.approx(sleeps[0], rel=0.1)   # only the 429 paused the shared gate


def test_threads_back_off_together_on_a_429(scripted):
    """One request gets 429 Retry-After 0.4 s while four threads are busy: no request of any thread reaches
    the server during the pause (the others wait at the shared gate), then all are judged."""
    srv = scripted([(429, {"Retry-After": "0.4"})])
    judge = HTTPJudge(_cfg(srv.url, max_concurrency=4, backoff_s=0.0))
    out = judge.judge([_req(i, ["good"]) for i in range(12)])
    assert out == [StepVerdict([1], [0])] * 12 and len(srv.arrivals) == 13
    first = srv.arrivals[0]                                            # the 429 (first arrival, script order)
    during = [t for t in srv.arrivals[1:] if first + 0.05 < t < first + 0.4]
    assert during == []
    assert judge.stats.retries == 1 and judge.stats.failures == 0


def test_requests_per_minute_cap_spaces_requests(scripted):
    srv = scripted()
    judge = HTTPJudge(_cfg(srv.url, max_concurrency=4, max_requests_per_minute=600))   # 0.1 s apart
    judge.judge([_req(i, ["good"]) for i in range(6)])
    gaps = [b - a for a, b in zip(srv.arrivals, srv.arrivals[1:])]
    assert len(gaps) == 5 and min(gaps) >= 0.08


# ----------------------------------------------------------------------------- usage

def test_usage_counts_requests_tokens_and_replies_without_usage(scripted):
    srv = scripted([(429, {"Retry-After": "0"}), (500, {})])
    judge = HTTPJudge(_cfg(srv.url, max_concurrency=1))
    judge.judge([_req(i, ["good"]) for i in range(3)])
    # 5 POSTs (3 + 2 retries); 3 replies billed 100 + 7 tokens each; error replies bill nothing
    assert judge.stats.usage.as_dict() == {"requests": 5, "prompt_tokens": 300, "completion_tokens": 21,
                                           "usage_unknown": 0}
    bare = scripted(usage=False)
    judge = HTTPJudge(_cfg(bare.url))
    judge.judge([_req(i, ["good"]) for i in range(2)])
    assert judge.stats.usage.as_dict() == {"requests": 2, "prompt_tokens": 0, "completion_tokens": 0,
                                           "usage_unknown": 2}


def test_usage_add_reply_tolerates_partial_objects():
    u = Usage()
    for reply in ({"prompt_tokens": 5, "completion_tokens": 2}, {"prompt_tokens": 3}, None, {"total_tokens": 9},
                  "junk", {"prompt_tokens": "x"}):
        u.add_reply(reply)
    assert u.as_dict() == {"requests": 0, "prompt_tokens": 8, "completion_tokens": 2, "usage_unknown": 4}


def test_malformed_replies_are_billed_and_match_the_servers_ledger():
    server = FakeJudgeServer(p_malformed=0.3, p_no_usage=0.2, seed=3).start()
    try:
        judge = HTTPJudge(_cfg(server.url, max_retries=5))
        out = judge.judge([_req(i) for i in range(40)])
        ledger = server.ledger()
    finally:
        server.close()
    assert out == [StepVerdict([1, 0], [0, 1])] * 40
    u = judge.stats.usage.as_dict()
    assert u["requests"] == ledger["posts"] == 40 + judge.stats.retries
    assert ledger["outcomes"].get("malformed", 0) > 0
    assert (u["prompt_tokens"], u["completion_tokens"], u["usage_unknown"]) == (
        ledger["billed"]["prompt_tokens"], ledger["billed"]["completion_tokens"], ledger["billed"]["usage_unknown"])


def test_answer_judge_reports_usage_and_cost():
    from mrpo.eval.answers import AnswerJudge, evaluate_answers

    srv = Scripted()
    try:
        # the scripted server's content is a JSON verdict, not '1'/'0': the answer judge retries it, billed each time
        judge = AnswerJudge(SimpleNamespace(base_url=srv.url, model="m", api_key_env="MRPO_TEST_NO_KEY",
                                            max_concurrency=2, timeout_s=5, max_retries=1, backoff_s=0.0,
                                            price_input_per_mtok=2.0, price_output_per_mtok=10.0))
        recs = [{"id": str(i), "problem": "Where?", "solution": "left", "answer": "left", "dataset": "d",
                 "answer_type": "open"} for i in range(3)]
        summary = evaluate_answers(recs, judge)
    finally:
        srv.close()
    usage = summary["llm_judge"]["usage"]
    assert usage["requests"] == 6 and usage["prompt_tokens"] == 600 and usage["completion_tokens"] == 42
    assert usage["cost_usd"] == pytest.approx((600 * 2.0 + 42 * 10.0) / 1e6)


def test_eval_cli_prints_usage_and_cost(tmp_path, capsys):
    """`mrpo.eval reasoning --judge http` with prices: one usage line, and judge_usage in reasoning.json."""
    from mrpo.eval.__main__ import main

    server = FakeJudgeServer().start()
    pred = tmp_path / "predictions.jsonl"
    rows = [{"id": str(i), "problem": "Where?", "solution": "left", "answer": "right", "gold_reasoning": "Left.",
             "text": "<think>First a good step. Then it helps.</think><answer>right</answer>",
             "steps": ["First a good step.", "Then it helps."], "dataset": "d", "answer_type": "open"}
            for i in range(3)]
    pred.write_text("".join(json.dumps(r) + "\n" for r in rows))
    try:
        main(["reasoning", "--pred", str(pred), "--judge", "http", "--judge-url", server.url, "--judge-model",
              "judge-model", "--api-key-env", "MRPO_TEST_NO_KEY", "--price-input-per-mtok", "1",
              "--price-output-per-mtok", "4"])
        ledger = server.ledger()
    finally:
        server.close()
    usage = json.loads((tmp_path / "reasoning.json").read_text())["judge_usage"]
    assert usage["requests"] == ledger["posts"] == 3
    assert usage["prompt_tokens"] == ledger["billed"]["prompt_tokens"]
    assert usage["cost_usd"] == pytest.approx((usage["prompt_tokens"] + 4 * usage["completion_tokens"]) / 1e6)
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("judge usage:")]
    assert line == [f"judge usage: 3 HTTP requests, {usage['prompt_tokens']:,} prompt + "
                    f"{usage['completion_tokens']:,} completion tokens, ${usage['cost_usd']:.4f}"]


def test_requests_in_waves_are_reported_once(scripted, caplog):
    import logging

    srv = scripted()
    caplog.set_level(logging.INFO, logger="mrpo.judges.http")
    judge = HTTPJudge(_cfg(srv.url, max_concurrency=2))
    judge.judge([_req(i, ["good"]) for i in range(5)])
    judge.judge([_req(i, ["good"]) for i in range(5, 10)])
    waves = [r.getMessage() for r in caplog.records if "waves" in r.getMessage()]
    assert waves == ["HTTPJudge: 5 requests with judge.max_concurrency=2 go out in 3 waves, each a full judge "
                     "latency; judge.max_concurrency=5 sends them at once (mind the rate limit)"]
