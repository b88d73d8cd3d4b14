"""Judge failures by cause, one summarised warning per call, the unjudged-fraction guard, preflight."""
import json
import logging
import socket
import time
from types import SimpleNamespace

import pytest

from mrpo.judges.base import FAILURE_CAUSES, JudgeRequest, JudgeStats
from mrpo.judges.http import HTTPJudge
from mrpo.judges.outage import JudgeOutageError, UnjudgedGuard
from mrpo.judges.preflight import JudgeUnavailableError, check_endpoint
from mrpo.judges.rule import RuleJudge
from mrpo.rewards import RewardModel, judge_metrics

from .test_http import SECRET, FakeServer, _cfg, _req, api_key, server  # noqa: F401 - fixtures


def _closed_port_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/v1"


def test_unreachable_judge_counts_connection_failures_with_one_warning(caplog):
    caplog.set_level(logging.DEBUG, logger="mrpo.judges.http")
    judge = HTTPJudge(SimpleNamespace(**{**vars(_cfg(SimpleNamespace(url=_closed_port_url()))), "max_retries": 2}),
                      sleep=lambda s: None)
    out = judge.judge([_req(f"s{i}") for i in range(5)])
    assert out == [None] * 5
    assert judge.stats.failures == 5 and judge.stats.retries == 10
    assert judge.stats.causes["connection"] == 5 and sum(judge.stats.causes.values()) == 5
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    msg = warnings[0].getMessage()
    assert "5 of 5 requests unjudged (connection 5), 10 retries" in msg and "Connection refused" in msg
    assert SECRET not in caplog.text


def test_failures_by_cause(server):
    server.script = [503, 503, 429, 429, 400, "wrong_count", "wrong_count"]
    judge = HTTPJudge(_cfg(server, max_retries=1, max_concurrency=1), sleep=lambda s: None)
    assert judge.judge([_req("a"), _req("b"), _req("c"), _req("d")]) == [None, None, None, None]
    assert {c: n for c, n in judge.stats.causes.items() if n} == {
        "server_error": 1, "rate_limited": 1, "rejected": 1, "invalid_reply": 1}


def test_timeouts_are_their_own_cause(server):
    server.script = ["sleep", "sleep"]
    judge = HTTPJudge(_cfg(server, timeout_s=0.2, max_retries=1), sleep=lambda s: None)
    assert judge.judge([_req()]) == [None] and judge.stats.causes["timeout"] == 1


def test_reward_model_reports_causes_with_fixed_keys():
    cfg = SimpleNamespace(answer_weight=1.0, process_weight=1.0, length_weight=1.0, format_weight=0.0,
                          k_min=1, k_max=4, bert_model_path=None)
    rm = RewardModel(cfg, RuleJudge(), "think", 0.6)
    text = "<think>Step 1: The image is a CT scan.\nStep 2: The answer is left.</think><answer>left</answer>"
    recs = [{"id": "a", "problem": "Where?", "solution": "left", "facts": {"modality": "ct", "answer": "left"}},
            {"id": "b", "problem": "Where?", "solution": "left"},          # no facts: the rule judge cannot judge
            {"id": "c", "problem": "Where?", "solution": "left"}]
    _, stats = rm.score([text, text, "no steps here"], recs)
    m = judge_metrics(stats)
    assert m["judge_sent"] == 2 and m["unjudged"] == 1 and m["unjudged/no_label"] == 1
    usage_keys = {"judge/requests", "judge/cache_hits", "judge/prompt_tokens", "judge/completion_tokens",
                  "judge/usage_unknown"}
    assert set(m) == {"judge_sent", "unjudged", *(f"unjudged/{c}" for c in FAILURE_CAUSES), *usage_keys}
    assert all(m[k] == 0 for k in usage_keys)   # the rule judge sends no HTTP request and has no cache
    assert sum(m[f"unjudged/{c}"] for c in FAILURE_CAUSES) == m["unjudged"]


def test_stats_as_dict_keeps_the_four_counters():
    s = JudgeStats()
    s.add_failure("timeout", "x")
    s.add_failure("made_up")
    assert s.as_dict() == {"requests": 0, "cache_hits": 0, "retries": 0, "failures": 2}
    assert s.causes["timeout"] == 1 and s.causes["other"] == 1 and s.last_error == "x"


# ----------------------------------------------------------------------------- guard

def test_guard_stops_after_the_window_with_causes():
    guard = UnjudgedGuard(max_fraction=0.5, window=3, judge="HTTPJudge(model='m')")
    assert guard.update(1, 16, 16, {"connection": 16}) is None     # window not full yet
    assert guard.update(2, 0, 0) is None                            # nothing sent: not counted
    assert guard.update(3, 16, 4, {"timeout": 4}) is None
    with pytest.raises(JudgeOutageError) as err:
        guard.update(4, 16, 16, {"connection": 16})
    msg = str(err.value)
    assert "75% of the 48 completions" in msg and "steps 1-4" in msg and "connection 32, timeout 4" in msg
    assert "judge.max_unjudged_fraction=0.5" in msg and "HTTPJudge(model='m')" in msg
    assert err.value.causes == {"connection": 32, "timeout": 4}


def test_guard_tolerates_a_share_up_to_the_bound():
    guard = UnjudgedGuard(max_fraction=0.5, window=2)
    assert guard.update(1, 10, 5) is None
    for step in range(2, 20):
        assert guard.update(step, 10, 5 if step % 2 else 4) <= 0.5
    never = UnjudgedGuard(max_fraction=1.0, window=1)
    assert never.update_from_metrics(1, {"judge_sent": 8.0, "unjudged": 8.0, "unjudged/timeout": 8.0}) == 1.0


def test_guard_from_config_and_metrics():
    from mrpo.config import load_config

    cfg = load_config(None, ["judge.max_unjudged_fraction=0.25", "judge.unjudged_window=2"])
    guard = UnjudgedGuard.from_config(cfg.judge)
    guard.update_from_metrics(1, {"judge_sent": 8.0, "unjudged": 2.0, "unjudged/rate_limited": 2.0})
    with pytest.raises(JudgeOutageError, match="rate_limited 5"):
        guard.update_from_metrics(2, {"judge_sent": 8.0, "unjudged": 3.0, "unjudged/rate_limited": 3.0})


# ----------------------------------------------------------------------------- preflight

def test_preflight_missing_key_fails_without_network(monkeypatch):
    monkeypatch.delenv("MRPO_NO_SUCH_KEY", raising=False)
    t0 = time.time()
    with pytest.raises(JudgeUnavailableError, match="MRPO_NO_SUCH_KEY is not set"):
        check_endpoint("https://judge.invalid/v1", "m", "MRPO_NO_SUCH_KEY", timeout_s=30)
    assert time.time() - t0 < 1


def test_preflight_unreachable_and_rejected_key(server, monkeypatch):
    with pytest.raises(JudgeUnavailableError, match="cannot reach the judge endpoint"):
        check_endpoint(_closed_port_url(), "m", "MRPO_TEST_JUDGE_KEY", timeout_s=5)
    assert "answers" in check_endpoint(server.url, "judge-model", "MRPO_TEST_JUDGE_KEY")   # no GET route: 501
    monkeypatch.delenv("MRPO_TEST_JUDGE_KEY")
    assert "answers" in check_endpoint(server.url, "judge-model", "MRPO_TEST_JUDGE_KEY")   # loopback: no key needed


def test_preflight_401_names_the_variable_not_the_key(monkeypatch):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import threading

    class Deny(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Deny)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with pytest.raises(JudgeUnavailableError) as err:
            check_endpoint(f"http://127.0.0.1:{httpd.server_address[1]}/v1", "m", "MRPO_TEST_JUDGE_KEY")
        assert "rejected the key in $MRPO_TEST_JUDGE_KEY (HTTP 401)" in str(err.value)
        assert SECRET not in str(err.value)
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("sub", ["answers", "reasoning"])
def test_eval_cli_fails_fast_when_the_judge_is_unreachable(tmp_path, sub):
    from mrpo.eval.__main__ import main

    pred = tmp_path / "pred.jsonl"
    pred.write_text(json.dumps({"id": "a", "problem": "Where?", "solution": "left", "answer": "right",
                                "completion": "<think>Step 1: left.</think><answer>right</answer>"}) + "\n")
    judge = ["--llm-judge"] if sub == "answers" else ["--judge", "http"]
    t0 = time.time()
    with pytest.raises(SystemExit) as err:
        main([sub, "--pred", str(pred), *judge, "--judge-url", _closed_port_url(), "--max-retries", "3"])
    assert time.time() - t0 < 5
    assert "LLM judge unavailable: cannot reach the judge endpoint" in str(err.value.code)
    assert not (tmp_path / "answers.json").exists() and not (tmp_path / "reasoning.json").exists()
