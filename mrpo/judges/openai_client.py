"""A minimal client for an OpenAI-compatible /chat/completions endpoint (OpenAI, vLLM, SGLang, ...) with
the retry policy of the LLM judges (mrpo.judges.http.HTTPJudge, mrpo.eval.answers.AnswerJudge).

Retried: network errors and timeouts, HTTP 429 and 5xx, malformed completion bodies (a null message
content included), and replies the caller's parser rejects with ValueError. Retry n (n >= 1) first
waits backoff_s * 2**(n-1) * U(0.5, 1.5) s, or, on a 429 or 503 naming one, the reply's Retry-After
(mrpo.judges.ratelimit.retry_after_s; capped at max_wait_s, default timeout_s). The wait after a 429,
or after a 503 with Retry-After, is shared: it pauses the client's RateGate, so every thread of the
rank waits it out together; other waits are the one request's own. Every POST first passes the gate
(and its optional requests-per-minute cap). Each POST, and each 2xx reply's `usage`, is counted in
`usage` (mrpo.judges.base.Usage).
A 400 that names a sampling parameter this model does not take (OpenAI's `unsupported_value` /
`unsupported_parameter` with `param`, e.g. GPT-5-family models refuse any `temperature` but their
default 1, and the judge's default is 0) is not a failure: the parameter is dropped for the rest of the
run (one warning naming it and the model) and the request is sent again at once, not counted as a retry.
Not retried: other 4xx (the same request would fail again). 401/403/404 raise RuntimeError (a wrong key,
model or URL is a configuration error). The API key is read from the environment variable *named*
api_key_env at each request (no Authorization header when unset); it is never stored, logged or put in
an error message.
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
from typing import Callable, TypeVar

from mrpo.judges.base import Usage
from mrpo.judges.ratelimit import RateGate, retry_after_s

T = TypeVar("T")


class _Retryable(Exception):
    def __init__(self, message: str, cause: str, retry_after: float | None = None):
        super().__init__(message)
        self.cause = cause         # one of mrpo.judges.base.FAILURE_CAUSES
        self.retry_after = retry_after   # seconds the server asked to wait (429/503 Retry-After), None = unsaid


class _NotRetried(_Retryable):
    pass


class _UnsupportedParam(Exception):
    """HTTP 400 naming one request parameter the model does not accept (OpenAI's error `param`)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


# The optional sampling parameters a model may refuse; what is dropped is only ever one of these.
DROPPABLE_PARAMS = ("temperature", "top_p", "seed", "response_format")


def _unsupported_param(detail: str) -> str | None:
    """The `param` of an OpenAI-style 400 error body refusing a value or parameter, if droppable."""
    try:
        error = json.loads(detail).get("error") or {}
    except (ValueError, AttributeError):
        return None
    if not isinstance(error, dict):
        return None
    param, code = error.get("param"), str(error.get("code") or "")
    if param in DROPPABLE_PARAMS and code in ("unsupported_value", "unsupported_parameter"):
        return param
    return None


def _network_cause(err: BaseException) -> str:
    """timeout or connection, for an exception raised while talking to the endpoint."""
    reason = getattr(err, "reason", err)
    if isinstance(err, TimeoutError) or isinstance(reason, TimeoutError) or "timed out" in str(reason):
        return "timeout"
    return "connection"


class ChatCompletionClient:
    """Thread-safe (its only mutable state, `gate` and `usage`, locks itself). name prefixes the
    configuration errors it raises. gate: the rank's shared RateGate (default: a new one without a rate
    cap); usage: where requests and tokens are counted (default: a new Usage)."""

    def __init__(self, base_url: str, model: str, api_key_env: str | None, timeout_s: float, max_retries: int,
                 backoff_s: float, sleep: Callable[[float], None] = time.sleep, name: str = "judge",
                 gate: RateGate | None = None, usage: Usage | None = None, max_wait_s: float | None = None):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout_s = float(timeout_s)
        self.max_retries = max(0, int(max_retries))   # extra attempts after the first
        self.backoff_s = float(backoff_s)
        self.name = name
        self._sleep = sleep
        self.gate = gate if gate is not None else RateGate(sleep=sleep)
        self.usage = usage if usage is not None else Usage()
        self.max_wait_s = self.timeout_s if max_wait_s is None else float(max_wait_s)
        self.dropped: set[str] = set()   # parameters the model refused (400 unsupported_*): no longer sent
        self._dropped_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ChatCompletionClient(model={self.model!r}, url={self.url!r}, api_key_env={self.api_key_env!r})"

    def _post(self, body: bytes) -> str:
        """One POST; the reply's message content. Raises _Retryable, _NotRetried or RuntimeError."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        self.gate.wait()
        self.usage.add_request()
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            body = e.read()[:4096].decode("utf-8", "replace")
            detail = body[:200]
            if e.code == 400 and (param := _unsupported_param(body)) is not None:
                raise _UnsupportedParam(param, f"HTTP 400: {detail!r}") from None
            if e.code in (401, 403, 404):
                raise RuntimeError(f"{self.name}: POST {self.url} -> HTTP {e.code} ({detail!r}); check "
                                   f"judge.base_url, judge.model={self.model!r} and the key in "
                                   f"${self.api_key_env}") from None
            wait = retry_after_s(e.headers) if e.code in (429, 503) else None
            if e.code == 429:
                raise _Retryable(f"HTTP {e.code}: {detail!r}", "rate_limited", wait) from None
            if e.code >= 500:
                raise _Retryable(f"HTTP {e.code}: {detail!r}", "server_error", wait) from None
            raise _NotRetried(f"HTTP {e.code}: {detail!r}", "rejected") from None
        except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as e:
            raise _Retryable(f"{type(e).__name__}: {getattr(e, 'reason', e)}", _network_cause(e)) from None
        try:
            reply = json.loads(raw)
        except ValueError:
            reply = None
        self.usage.add_reply(reply.get("usage") if isinstance(reply, dict) else None)   # billed even if malformed
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            content = None
        if not isinstance(content, str):   # also a null content (e.g. a refusal)
            raise _Retryable(f"malformed chat completion: {raw[:200]!r}", "invalid_reply")
        return content

    def complete(self, messages: list[dict], parse: Callable[[str], T], *,
                 on_retry: Callable[[], None] | None = None, on_error: Callable[[str], None] | None = None,
                 on_give_up: Callable[[str, str], None] | None = None, **params) -> T | None:
        """parse(reply text) for POST {model, messages, **params} (params: temperature, response_format, ...).

        parse raises ValueError for an invalid reply (retried) and must not return None.
        on_retry(): called before each retry. on_error(message): called for each failed attempt, e.g.
        "attempt 1/3 failed: HTTP 503: ...", "attempt 2/3 invalid reply: ...", "rejected, not retried: HTTP 400: ...".
        on_give_up(cause, message): called once when None is returned, with the cause of the last
        failed attempt (mrpo.judges.base.FAILURE_CAUSES) and its message.
        Returns None when every attempt failed or the request was rejected; 401/403/404 raise RuntimeError.
        """
        attempts = self.max_retries + 1
        last: _Retryable | None = None
        for attempt in range(attempts):
            if attempt:
                if on_retry is not None:
                    on_retry()
                self._wait_before_retry(attempt, last)
            last = None
            try:
                return parse(self._post_without_refused(messages, params))
            except _NotRetried as e:
                if on_error is not None:
                    on_error(f"rejected, not retried: {e}")
                if on_give_up is not None:
                    on_give_up(e.cause, f"rejected, not retried: {e}")
                return None
            except _Retryable as e:
                error, cause, last = f"attempt {attempt + 1}/{attempts} failed: {e}", e.cause, e
            except ValueError as e:
                error, cause = f"attempt {attempt + 1}/{attempts} invalid reply: {e}", "invalid_reply"
            if on_error is not None:
                on_error(error)
        if on_give_up is not None:
            on_give_up(cause, error)
        return None

    def _post_without_refused(self, messages: list[dict], params: dict) -> str:
        """_post of {model, messages, **params} less the parameters the model refused; a refusal of one
        more (HTTP 400 unsupported_*, see the module docstring) drops it and sends again at once (at most
        once per parameter, so this ends)."""
        while True:
            sent = {k: v for k, v in params.items() if k not in self.dropped}
            body = json.dumps({"model": self.model, "messages": messages, **sent}).encode("utf-8")
            try:
                return self._post(body)
            except _UnsupportedParam as e:
                if e.param not in sent:   # refused although not sent: nothing to drop, a real rejection
                    raise _NotRetried(str(e), "rejected") from None
                with self._dropped_lock:
                    first = e.param not in self.dropped
                    self.dropped.add(e.param)
                if first:
                    logging.getLogger("mrpo").warning(
                        "%s: model %r refuses %s=%r (%s); sending its requests without %s from now on (the "
                        "model's default)", self.name, self.model, e.param, params[e.param], e, e.param)

    def _wait_before_retry(self, attempt: int, error: "_Retryable | None") -> None:
        """Retry `attempt` (>= 1) waits the server's Retry-After (capped at max_wait_s) when the last
        error named one, else the jittered exponential backoff; a 429's wait pauses the shared gate (the
        next POST's gate.wait() sleeps it, with every other thread of the rank), any other is this
        request's own."""
        wait = self.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
        if error is not None and error.retry_after is not None:
            wait = min(error.retry_after, self.max_wait_s)
        if error is not None and (error.cause == "rate_limited" or error.retry_after is not None):
            self.gate.pause(wait)   # a quota or an overloaded server: the same for every thread
        else:
            self._sleep(wait)
