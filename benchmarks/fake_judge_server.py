"""A fake OpenAI-compatible step judge on 127.0.0.1 (stdlib ThreadingHTTPServer), with latency, injected
faults and an exact ledger, for the judge tests and benchmarks.

    server = FakeJudgeServer(latency_s=0.2, p_429=0.05, p_500=0.02, p_malformed=0.01, p_timeout=0.01,
                             retry_after="0.05", hang_s=2.0).start()     # in this process (a thread)
    ... judge.base_url = server.url ...
    server.ledger()   # counts by outcome, tokens billed, OK replies per question
    server.close()

    python -m benchmarks.fake_judge_server --latency-s 0.2 ...         # its own process; prints "port N"

POST .../chat/completions: after `latency_s`, one outcome drawn per request (seeded): "429" (with the
header Retry-After: `retry_after`), "500", "malformed" (HTTP 200, content that is not the verdict JSON,
billed usage), "timeout" (sleeps `hang_s`, longer than the client's timeout, then answers nothing), or
"ok": a valid verdict for the "Step i:" lines of the user turn (alignment 1 iff the step contains
"good", contribution 1 iff it contains "helps"), with usage {prompt_tokens: characters of the messages
// 4, completion_tokens: characters of the content // 4}; a share `p_no_usage` of OK replies carry no
usage. GET .../models lists the model (for the start-up preflight); GET /ledger returns the ledger and
GET /reset zeroes it (for a server in its own process).
The ledger's "ok_by_question" counts OK replies per "Question:" line, so a caller that tags each request's
question can check that no request was answered twice.
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

OUTCOMES = ("ok", "429", "500", "malformed", "timeout")


def verdict_for(user_text: str) -> dict:
    """The fake judge's verdict for a user turn (see the module docstring)."""
    steps = re.findall(r"^Step \d+: (.*)$", user_text, re.M)
    return {"steps": [{"index": i + 1, "alignment": int("good" in s), "contribution": int("helps" in s)}
                      for i, s in enumerate(steps)]}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024   # listen() backlog: 64+ clients connect at once (the default 5 drops SYNs)


class FakeJudgeServer:
    def __init__(self, latency_s: float = 0.0, p_429: float = 0.0, p_500: float = 0.0, p_malformed: float = 0.0,
                 p_timeout: float = 0.0, p_no_usage: float = 0.0, retry_after: str | None = "1", hang_s: float = 2.0,
                 seed: int = 0, model: str = "judge-model", port: int = 0):
        self.latency_s, self.retry_after, self.hang_s, self.model = latency_s, retry_after, hang_s, model
        self.p = {"429": p_429, "500": p_500, "malformed": p_malformed, "timeout": p_timeout}
        self.p_no_usage = p_no_usage
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.reset()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                if self.path.endswith("/ledger"):   # the ledger, for a server in its own process
                    self._send(200, json.dumps(server.ledger()).encode())
                elif self.path.endswith("/reset"):
                    server.reset()
                    self._send(200, b"{}")
                else:
                    self._send(200, json.dumps({"object": "list", "data": [{"id": server.model}]}).encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outcome, no_usage = server._draw()
                time.sleep(server.latency_s)
                user = body["messages"][-1]["content"]
                text = user if isinstance(user, str) else next(c["text"] for c in user if c.get("type") == "text")
                question = (re.search(r"^Question: (.*)$", text, re.M) or [None, ""])[1]
                if outcome == "timeout":
                    time.sleep(server.hang_s)   # the client has given up by now
                    self.close_connection = True
                    return
                if outcome in ("429", "500"):
                    headers = {"Retry-After": server.retry_after} if outcome == "429" and server.retry_after else {}
                    self._send(int(outcome), b'{"error": {"message": "injected"}}', headers)
                    return
                content = "{not json" if outcome == "malformed" else json.dumps(verdict_for(text))
                reply = {"id": "chatcmpl-fake", "object": "chat.completion", "model": server.model,
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                      "finish_reason": "stop"}]}
                usage = None
                if not no_usage:
                    usage = {"prompt_tokens": len(json.dumps(body["messages"])) // 4,
                             "completion_tokens": len(content) // 4}
                    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                    reply["usage"] = usage
                if self._send(200, json.dumps(reply).encode()):
                    with server.lock:
                        if usage is not None:
                            server.billed["prompt_tokens"] += usage["prompt_tokens"]
                            server.billed["completion_tokens"] += usage["completion_tokens"]
                        else:
                            server.billed["usage_unknown"] += 1
                        if outcome == "ok":
                            server.ok_by_question[question] += 1

            def _send(self, code: int, payload: bytes, headers: dict | None = None) -> bool:
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(payload)
                    self.wfile.flush()
                    return True
                except (BrokenPipeError, ConnectionResetError):
                    return False

        self.httpd = _Server(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def reset(self) -> None:
        """Zero the ledger."""
        with self.lock:
            self.outcomes = collections.Counter()
            self.billed = collections.Counter()
            self.ok_by_question = collections.Counter()

    def _draw(self) -> tuple[str, bool]:
        with self.lock:
            r = self.rng.random()
            outcome = "ok"
            for name, p in self.p.items():
                if r < p:
                    outcome = name
                    break
                r -= p
            self.outcomes[outcome] += 1
            return outcome, self.rng.random() < self.p_no_usage

    def ledger(self) -> dict:
        with self.lock:
            return {"posts": sum(self.outcomes.values()), "outcomes": dict(self.outcomes), "billed": dict(self.billed),
                    "ok_by_question": dict(self.ok_by_question)}

    def start(self) -> "FakeJudgeServer":
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("latency-s", 0.0), ("p-429", 0.0), ("p-500", 0.0), ("p-malformed", 0.0),
                          ("p-timeout", 0.0), ("p-no-usage", 0.0), ("hang-s", 2.0)):
        ap.add_argument(f"--{name}", type=float, default=default)
    ap.add_argument("--retry-after", default="1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    server = FakeJudgeServer(a.latency_s, a.p_429, a.p_500, a.p_malformed, a.p_timeout, a.p_no_usage, a.retry_after,
                             a.hang_s, a.seed, port=a.port)
    print(f"port {server.httpd.server_address[1]}", flush=True)
    server.httpd.serve_forever(poll_interval=0.05)


if __name__ == "__main__":
    main()
