"""ChatCompletionClient against a scripted OpenAI-compatible server on 127.0.0.1 (ephemeral port, thread)."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mrpo.judges.openai_client import ChatCompletionClient

SECRET = "sk-test-CLIENT-SECRET-42"


def _completion(content):
    return 200, json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()


class ScriptedServer:
    """Replies with script entries (status, body bytes) in order, then with the completion "ok"."""

    def __init__(self, script):
        self.script, self.bodies, self.headers, self.paths = list(script), [], [], []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                outer.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                outer.headers.append(dict(self.headers))
                outer.paths.append(self.path)
                code, payload = outer.script.pop(0) if outer.script else _completion("ok")
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1/"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve(monkeypatch):
    monkeypatch.setenv("MRPO_TEST_CLIENT_KEY", SECRET)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    servers = []

    def start(*script):
        servers.append(ScriptedServer(script))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def _client(srv, sleeps=None, **kw):
    args = dict(model="m-1", api_key_env="MRPO_TEST_CLIENT_KEY", timeout_s=5.0, max_retries=3, backoff_s=1.0,
                sleep=(sleeps.append if sleeps is not None else (lambda s: None)), name="TestJudge")
    args.update(kw)
    return ChatCompletionClient(srv.url, **args)


def _events():
    events = []
    return events, dict(on_retry=lambda: events.append("retry"), on_error=lambda m: events.append(m))


def _parse_int(text):
    return int(text)   # ValueError = invalid reply


def test_payload_headers_and_parsed_value(serve):
    srv = serve(_completion("7"))
    events, cb = _events()
    msgs = [{"role": "user", "content": "hi"}]
    assert _client(srv).complete(msgs, _parse_int, temperature=0.0, response_format={"type": "json_object"},
                                 **cb) == 7
    assert events == [] and srv.paths == ["/v1/chat/completions"]
    assert srv.bodies == [{"model": "m-1", "messages": msgs, "temperature": 0.0,
                           "response_format": {"type": "json_object"}}]
    assert srv.headers[0]["Authorization"] == f"Bearer {SECRET}"


def test_invalid_replies_and_5xx_retried_with_backoff_then_none(serve):
    srv = serve((503, b'{"error": "busy"}'), _completion("seven"), (200, b"<html>"),
                (200, json.dumps({"choices": [{"message": {"content": None}}]}).encode()))
    sleeps = []
    events, cb = _events()
    assert _client(srv, sleeps).complete([], _parse_int, **cb) is None
    assert len(srv.bodies) == 4
    assert [e for e in events if e == "retry"] == ["retry"] * 3
    errors = [e for e in events if e != "retry"]
    assert errors[0].startswith("attempt 1/4 failed: HTTP 503")
    assert errors[1].startswith("attempt 2/4 invalid reply: invalid literal")
    assert errors[2].startswith("attempt 3/4 failed: malformed chat completion")
    assert errors[3].startswith("attempt 4/4 failed: malformed chat completion")   # null content
    assert len(sleeps) == 3 and all(0.5 * 2 ** i <= s <= 1.5 * 2 ** i for i, s in enumerate(sleeps))


def test_429_retried_then_success(serve):
    srv = serve((429, b"slow down"))
    events, cb = _events()
    assert _client(srv, max_retries=1).complete([], str.upper, **cb) == "OK"
    assert len(srv.bodies) == 2 and events[0].startswith("attempt 1/2 failed: HTTP 429") and events[1] == "retry"


def test_400_not_retried(serve):
    srv = serve((400, b'{"error": "bad request"}'))
    events, cb = _events()
    assert _client(srv).complete([], str.upper, **cb) is None
    assert len(srv.bodies) == 1 and len(events) == 1 and events[0].startswith("rejected, not retried: HTTP 400")


_GPT5_TEMPERATURE = (400, json.dumps({"error": {
    "message": "Unsupported value: 'temperature' does not support 0 with this model. Only the default (1) value "
               "is supported.", "type": "invalid_request_error", "param": "temperature",
    "code": "unsupported_value"}}).encode())   # what OpenAI's GPT-5 family answers to temperature=0


def test_a_refused_sampling_parameter_is_dropped_for_the_run(serve, caplog):
    """GPT-5-family models take no temperature but 1 (the judge's default is 0): the refusal is not a failure;
    the request goes again at once without it (no retry counted, no backoff), and so do all later ones,
    with one warning naming the parameter and the model."""
    srv = serve(_GPT5_TEMPERATURE)
    sleeps, (events, cb) = [], _events()
    client = _client(srv, sleeps)
    msgs = [{"role": "user", "content": "hi"}]
    with caplog.at_level("WARNING", logger="mrpo"):
        assert client.complete(msgs, str.upper, temperature=0.0, response_format={"type": "json_object"}, **cb) == "OK"
        assert client.complete(msgs, str.upper, temperature=0.0, response_format={"type": "json_object"}) == "OK"
    assert [b.get("temperature", "absent") for b in srv.bodies] == [0.0, "absent", "absent"]
    assert all(b["response_format"] == {"type": "json_object"} for b in srv.bodies)   # only the refused one goes
    assert events == [] and sleeps == [] and client.dropped == {"temperature"}
    assert [r.getMessage() for r in caplog.records if "refuses temperature" in r.getMessage()] == [
        caplog.records[0].getMessage()] and "'m-1'" in caplog.records[0].getMessage()


def test_a_refusal_of_a_parameter_not_sent_is_a_rejection(serve):
    """The same 400 for a parameter this request did not send cannot be fixed by dropping it: rejected, once."""
    srv = serve(_GPT5_TEMPERATURE)
    events, cb = _events()
    assert _client(srv).complete([], str.upper, **cb) is None
    assert len(srv.bodies) == 1 and events[0].startswith("rejected, not retried: HTTP 400")


@pytest.mark.parametrize("code", [401, 403, 404])
def test_config_errors_raise_naming_env_var_not_key(serve, code):
    srv = serve((code, b'{"error": "nope"}'))
    with pytest.raises(RuntimeError, match=rf"TestJudge: .* HTTP {code} .*\$MRPO_TEST_CLIENT_KEY") as e:
        _client(srv).complete([], str.upper)
    assert "judge.base_url" in str(e.value) and "judge.model='m-1'" in str(e.value)
    assert SECRET not in str(e.value) and len(srv.bodies) == 1


def test_key_read_per_request_and_never_stored(serve, monkeypatch):
    srv = serve()
    client = _client(srv)
    assert SECRET not in repr(client) and SECRET not in str(vars(client))
    monkeypatch.delenv("MRPO_TEST_CLIENT_KEY")
    assert client.complete([], str.upper) == "OK" and "Authorization" not in srv.headers[-1]
    monkeypatch.setenv("MRPO_TEST_CLIENT_KEY", "sk-rotated")
    assert client.complete([], str.upper) == "OK" and srv.headers[-1]["Authorization"] == "Bearer sk-rotated"
