"""One check of an LLM judge endpoint before any work starts, so a missing key or an unreachable server
fails in seconds with its cause instead of after every request has spent its retries.

    check_endpoint(base_url, model, api_key_env, timeout_s=10)   # raises JudgeUnavailableError

It checks that the environment variable named api_key_env is set (not required for loopback servers such
as a local vLLM), then sends one GET {base_url}/models: no answer (DNS, refused, timeout) or HTTP
401/403 fail; any other answer counts as reachable (some servers have no /models route). The key is read
from the environment, sent only in the Authorization header, and never logged or put in an error.
"""
from __future__ import annotations

import http.client
import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request

log = logging.getLogger(__name__)

_LOOPBACK = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}


class JudgeUnavailableError(RuntimeError):
    """The judge endpoint cannot be used; the message gives the cause and the setting to fix."""


def check_endpoint(base_url: str, model: str, api_key_env: str | None, timeout_s: float = 10.0) -> str:
    """Raise JudgeUnavailableError when the key is missing (non-loopback URL), the endpoint does not
    answer within timeout_s seconds, or it rejects the key; return a one-line description otherwise
    (naming a model missing from a /models listing as a note, since aliases and gateways exist)."""
    url = base_url.rstrip("/") + "/models"
    host = (urllib.parse.urlparse(base_url).hostname or "").lower()
    key = os.environ.get(api_key_env) if api_key_env else None
    if not key and host not in _LOOPBACK:
        raise JudgeUnavailableError(
            f"the judge endpoint {base_url} needs an API key, but the environment variable "
            f"{api_key_env or '(judge.api_key_env is empty)'} is not set; export it, or point judge.api_key_env "
            f"(--api-key-env) at the variable that holds the key")
    headers = {"Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, headers=headers, method="GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            raw = resp.read(1 << 20)
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise JudgeUnavailableError(
                f"the judge endpoint {base_url} rejected the key in ${api_key_env} (HTTP {e.code}); check the "
                f"key and judge.base_url") from None
        return f"{base_url} answers (GET /models: HTTP {e.code})"
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError, OSError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            raise JudgeUnavailableError(f"the judge endpoint {base_url} did not answer within {timeout_s:g} s "
                                        f"(GET {url}); check judge.base_url and the network") from None
        raise JudgeUnavailableError(f"cannot reach the judge endpoint {base_url} ({type(e).__name__}: {reason}); "
                                    f"check judge.base_url, the network or that the server is running") from None
    try:
        served = [m.get("id") for m in json.loads(raw).get("data", []) if isinstance(m, dict)]
    except (ValueError, AttributeError):
        served = []
    if served and model not in served:
        note = f"; note: model {model!r} is not in its /models list ({', '.join(map(str, served[:5]))}...)"
        log.warning("judge preflight: %s serves no model %r (listed: %s)", base_url, model, served[:5])
    else:
        note = ""
    return f"{base_url} answers (GET /models: HTTP 200){note}"


__all__ = ["JudgeUnavailableError", "check_endpoint"]
