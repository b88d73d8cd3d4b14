"""Step judge behind an OpenAI-compatible /chat/completions endpoint (OpenAI, vLLM, SGLang, ...).

cfg (JudgeConfig): model, base_url, prompt_template (None = the paper's prompt, see mrpo.judges.prompt), api_key_env (the *name* of the environment variable holding the
key: read at each request, never stored, logged, put in errors or cache keys), max_concurrency
(threads), timeout_s, max_retries (extra attempts after the first), backoff_s (first retry waits
backoff_s * U(0.5, 1.5), doubling each retry; a 429/503's Retry-After instead, capped at timeout_s),
temperature, cache_dir (None = no cache), max_requests_per_minute (0 = no cap; this process's share,
see mrpo.judges.ratelimit.rank_share). Requests sent and tokens billed are counted in stats.usage.
Retry policy (mrpo.judges.openai_client.ChatCompletionClient): network errors and timeouts, HTTP 429
and 5xx, replies that are not a valid verdict are retried; other 4xx are not; 401/403/404 raise (wrong
key, model or URL is a configuration error). A request that still fails returns None (unjudged) and
counts in stats.failures and, by cause, in stats.causes; each retry counts in stats.retries.
Failed attempts are logged at DEBUG; each judge() call with failures logs one WARNING summarising them
(counts by cause, retries, the last error), not one line per sample and attempt.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from mrpo.judges.base import JudgeRequest, JudgeStats, StepVerdict, Unjudged, format_causes
from mrpo.judges.cache import JudgeCache, judge_cached
from mrpo.judges.openai_client import ChatCompletionClient
from mrpo.judges.prompt import JudgePrompt, parse_verdict
from mrpo.judges.ratelimit import RateGate, rank_share

log = logging.getLogger(__name__)


class HTTPJudge:
    def __init__(self, cfg, sleep=time.sleep):
        self.cfg = cfg
        self.model = cfg.model
        self.stats = JudgeStats()
        self.client = ChatCompletionClient(cfg.base_url, cfg.model, cfg.api_key_env, cfg.timeout_s, cfg.max_retries,
                                           cfg.backoff_s, sleep=sleep, name="HTTPJudge", usage=self.stats.usage,
                                           gate=RateGate(rank_share(getattr(cfg, "max_requests_per_minute", 0)),
                                                         sleep=sleep))
        self.url = self.client.url
        self.cache = JudgeCache(cfg.cache_dir) if cfg.cache_dir else None
        self.prompt = JudgePrompt.load(getattr(cfg, "prompt_template", None))
        self._lock = threading.Lock()
        self._told_waves = False
        if not os.environ.get(cfg.api_key_env):
            log.warning("HTTPJudge: environment variable %s is not set; sending requests without an API key",
                        cfg.api_key_env)

    def __repr__(self) -> str:
        return f"HTTPJudge(model={self.model!r}, url={self.url!r}, api_key_env={self.cfg.api_key_env!r})"

    def judge(self, requests: Sequence[JudgeRequest]) -> list[StepVerdict | None]:
        """One verdict per request, in order; None = unjudged after retries."""
        def run(todo: list[JudgeRequest]) -> list[StepVerdict | None]:
            workers = max(1, min(int(self.cfg.max_concurrency), len(todo)))
            if len(todo) > workers and not self._told_waves:   # once: the step waits ceil(n / c) latencies
                self._told_waves = True
                log.info("HTTPJudge: %d requests with judge.max_concurrency=%d go out in %d waves, each a full "
                         "judge latency; judge.max_concurrency=%d sends them at once (mind the rate limit)",
                         len(todo), workers, -(-len(todo) // workers), len(todo))
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="judge") as pool:
                return list(pool.map(self._judge_one, todo))

        before_failures, before_retries = self.stats.failures, self.stats.retries
        before_causes = dict(self.stats.causes)
        out = judge_cached(list(requests), self.cache, self.model, self.stats, run, self.prompt.version)
        failed = self.stats.failures - before_failures
        if failed:
            causes = {c: n - before_causes.get(c, 0) for c, n in self.stats.causes.items()}
            log.warning("HTTPJudge: %d of %d requests unjudged (%s), %d retries; last error: %s", failed,
                        len(out), format_causes(causes), self.stats.retries - before_retries, self.stats.last_error)
        return out

    def _judge_one(self, req: JudgeRequest) -> StepVerdict | Unjudged:
        attempts = 1

        def on_retry() -> None:
            nonlocal attempts
            attempts += 1
            with self._lock:
                self.stats.retries += 1

        gave_up: list[Unjudged] = []
        verdict = self.client.complete(
            self.prompt.messages(req, with_image=True), lambda text: parse_verdict(text, len(req.steps)),
            on_retry=on_retry, on_error=lambda msg: log.debug("HTTPJudge: sample %s %s", req.sample_id, msg),
            on_give_up=lambda cause, msg: gave_up.append(
                Unjudged(cause, f"sample {req.sample_id} unjudged after {attempts} attempts: {msg}")),
            temperature=self.cfg.temperature, response_format={"type": "json_object"})
        if verdict is None:
            return gave_up[0] if gave_up else Unjudged("other", f"sample {req.sample_id} unjudged")
        return verdict
