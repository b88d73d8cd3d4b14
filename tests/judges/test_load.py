"""The judge load test at small scale (benchmarks/bench_judge_load.py runs it at 10,000 requests): many
requests at once with injected 429s (Retry-After), 500s, malformed replies and timeouts; every request ends
judged or counted unjudged by cause, none lost or counted twice; a rerun with the cache sends only the
unjudged ones, the next one nothing."""
import pytest

from benchmarks.bench_judge_load import ServerProcess, rerun_with_cache, run_load


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def test_small_load_accounts_for_every_request(tmp_path):
    # harsher faults than the benchmark and one retry only, so that some requests do end unjudged
    faulty = ServerProcess(p_429=0.15, p_500=0.1, p_malformed=0.05, p_timeout=0.05, p_no_usage=0.1,
                           retry_after="0.02", hang_s=1.0, seed=1)
    clean = ServerProcess()
    try:
        r = run_load(faulty.url, faulty.ledger, n=300, concurrency=16, cache_dir=str(tmp_path / "cache"),
                     timeout_s=0.5, max_retries=1)
        assert r["ok"], r["checks"]
        assert r["judged"] + r["unjudged"] == 300 and r["unjudged"] > 0 and len(r["causes"]) >= 2
        assert set(r["causes"]) <= {"rate_limited", "server_error", "invalid_reply", "timeout"}
        assert r["usage_unknown"] > 0 and r["gate_paused_s"] > 0
        assert rerun_with_cache(clean.url, 300, 16, str(tmp_path / "cache")) == r["unjudged"]
        assert rerun_with_cache(clean.url, 300, 16, str(tmp_path / "cache")) == 0
    finally:
        faulty.close()
        clean.close()
