"""Step judge behind an OpenAI-compatible /chat/completions endpoint (OpenAI, vLLM, SGLang, ...).

cfg (JudgeConfig): model, base_url, api_key_env (the *name* of the environment variable holding the
key: read at each request, never stored, logged, put in errors or cache keys), max_concurrency
(threads), timeout_s, max_retries (extra attempts after the first), backoff_s (first retry waits
backoff_s * U(0.5, 1.5), doubling each retry), temperature, cache_dir (None = no cache).
Retried: network errors and timeouts, HTTP 429 and 5xx, replies that are not a valid verdict.
Not retried: other 4xx; 401/403/404 raise (wrong key, model or URL is a configuration error).
A request that still fails returns None (unjudged) and counts in stats.failures.
"""
from __future__ import annotations

import http.client
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from mrpo.judges.base import JudgeRequest, JudgeStats, StepVerdict
from mrpo.judges.cache import JudgeCache, judge_cached
from mrpo.judges.prompt import JudgeResponseError, build_messages, parse_verdict

log = logging.getLogger(__name__)


class _Retryable(Exception):
    pass


class _NotRetried(Exception):
    pass


class HTTPJudge:
    def __init__(self, cfg, sleep=time.sleep):
        self.cfg = cfg
        self.model = cfg.model
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.cache = JudgeCache(cfg.cache_dir) if cfg.cache_dir else None
        self.stats = JudgeStats()
        self._sleep = sleep
        self._lock = threading.Lock()
        if not os.environ.get(cfg.api_key_env):
            log.warning("HTTPJudge: environment variable %s is not set; sending requests without an API key",
                        cfg.api_key_env)

    def __repr__(self) -> str:
        return f"HTTPJudge(model={self.model!r}, url={self.url!r}, api_key_env={self.cfg.api_key_env!r})"

    def judge(self, requests: Sequence[JudgeRequest]) -> list[StepVerdict | None]:
        """One verdict per request, in order; None = unjudged after retries."""
        def run(todo: list[JudgeRequest]) -> list[StepVerdict | None]:
            workers = max(1, min(int(self.cfg.max_concurrency), len(todo)))
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="judge") as pool:
                return list(pool.map(self._judge_one, todo))

        return judge_cached(list(requests), self.cache, self.model, self.stats, run)

    def _post(self, body: bytes) -> str:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.cfg.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:200].decode("utf-8", "replace")
            if e.code in (401, 403, 404):
                raise RuntimeError(f"HTTPJudge: POST {self.url} -> HTTP {e.code} ({detail!r}); check "
                                   f"judge.base_url, judge.model={self.model!r} and the key in "
                                   f"${self.cfg.api_key_env}") from None
            if e.code == 429 or e.code >= 500:
                raise _Retryable(f"HTTP {e.code}: {detail!r}") from None
            raise _NotRetried(f"HTTP {e.code}: {detail!r}") from None
        except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as e:
            raise _Retryable(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from None
        try:
            return json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Retryable(f"malformed chat completion: {raw[:200]!r}") from None

    def _judge_one(self, req: JudgeRequest) -> StepVerdict | None:
        body = json.dumps({
            "model": self.model,
            "messages": build_messages(req, with_image=req.image is not None),
            "temperature": self.cfg.temperature,
            "response_format": {"type": "json_object"},
        }).encode("utf-8")
        attempts = int(self.cfg.max_retries) + 1
        for attempt in range(attempts):
            if attempt:
                with self._lock:
                    self.stats.retries += 1
                self._sleep(self.cfg.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))
            try:
                return parse_verdict(self._post(body), len(req.steps))
            except _Retryable as e:
                log.warning("HTTPJudge: sample %s attempt %d/%d failed: %s", req.sample_id, attempt + 1,
                            attempts, e)
            except JudgeResponseError as e:
                log.warning("HTTPJudge: sample %s attempt %d/%d invalid reply: %s", req.sample_id,
                            attempt + 1, attempts, e)
            except _NotRetried as e:  # a 4xx other than 429: the same request would fail again
                log.warning("HTTPJudge: sample %s rejected, not retried: %s", req.sample_id, e)
                break
        log.warning("HTTPJudge: sample %s unjudged after %d attempts", req.sample_id, attempt + 1)
        return None
