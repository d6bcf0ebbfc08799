"""`bloom-runtime serve` tried as an attacker would: every request below once broke it (a 500, a
dead scheduler, a hung queue, a stalled event loop, an echo of megabytes). Each must get an
answer or OpenAI's error body with its status, and leave the server healthy and answering a
known request as before. Every load is bounded in count and time; loopback only.
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import threading
import time

import httpx
import pytest
import torch
from serve_process import ServerProcess, wait_for

import bloom_runtime as br
from bloom_runtime.serving.protocol import MAX_CHOICES

PROMPT = "以下是中国关于计算机网络考试的单项选择题"
BODY_LIMIT = 8 * 2**20
ROWS = 4
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def server():
    process = ServerProcess("--model", "tiny", "--max-batch-size", str(ROWS),
                            "--max-body-bytes", str(BODY_LIMIT))
    yield process
    assert process.stop() == 0


@pytest.fixture(scope="module")
def engine():
    return br.load("tiny")


def post(server: ServerProcess, body: bytes | dict, content_type: str | None = "application/json",
         path: str = "/v1/completions") -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": content_type} if content_type else {}
    return httpx.post(server.url + path, content=content, headers=headers, timeout=TIMEOUT_S)


def assert_alive(server: ServerProcess, engine: br.Engine) -> None:
    """Healthy, and a known request answers as the prompt run alone."""
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    got = post(server, {"prompt": PROMPT, "max_tokens": 6, "temperature": 0})
    assert got.status_code == 200, got.text
    assert got.json()["choices"][0]["text"] == engine.generate_text([PROMPT], max_new_tokens=6)[0]


def assert_error(got: httpx.Response, status: int) -> dict:
    assert got.status_code == status, got.text[:300]
    error = got.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert len(got.content) < 1024, f"an error body of {len(got.content)} bytes"
    return error


def test_a_temperature_near_zero_is_greedy_and_kills_nothing(server, engine):
    """Bug: temperature 1e-300 overflowed the sampler (500), and the dead scheduler then answered
    every request 429 for good."""
    greedy = engine.generate_text([PROMPT], max_new_tokens=6)[0]
    for temperature in (1e-300, 5e-324, 1e-6):
        got = post(server, {"prompt": PROMPT, "max_tokens": 6, "temperature": temperature})
        assert got.status_code == 200 and got.json()["choices"][0]["text"] == greedy, got.text
    got = post(server, {"prompt": PROMPT, "max_tokens": 6, "temperature": 1e-5, "seed": 1, "top_p": 1e-300})
    assert got.status_code == 200 and got.json()["choices"][0]["text"] == greedy, got.text
    assert_alive(server, engine)


HOSTILE = {  # name: (raw body, status, the param named)
    "deep nesting": (b"[" * 100_000 + b"]" * 100_000, 400, None),
    "deep nesting in a field": (b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400, None),
    "NaN": (b'{"prompt": "x", "temperature": NaN}', 400, None),
    "Infinity": (b'{"prompt": "x", "top_p": Infinity}', 400, None),
    "1e400": (b'{"prompt": "x", "temperature": 1e400}', 400, "temperature"),
    "an integer of 5000 digits": (b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", 400, None),
    "a float-sized integer of 4000 digits": (b'{"prompt": "x", "temperature": ' + b"9" * 4000 + b"}", 400,
                                             "temperature"),
    "a huge top_k": (b'{"prompt": "x", "max_tokens": 2, "top_k": ' + b"9" * 4000 + b"}", 200, None),
    "a lone surrogate in the prompt": (b'{"prompt": "ab\\ud800c"}', 400, "prompt"),
    "a lone surrogate in a stop string": (b'{"prompt": "x", "stop": ["\\udfff"]}', 400, "stop"),
    "a lone surrogate in the model": (b'{"prompt": "x", "model": "\\ud800"}', 404, "model"),
    "a lone surrogate in a field name": (b'{"prompt": "x", "\\ud800": 1}', 400, "'\\ud800'"),
    "a 100,000-character model": (json.dumps({"prompt": "x", "model": "m" * 100_000}).encode(), 404, "model"),
    "a 100,000-character field": (json.dumps({"prompt": "x", "f" * 100_000: 1}).encode(), 400, "f" * 48),
    "100,000 stop strings": (json.dumps({"prompt": "x", "stop": ["s"] * 100_000}).encode(), 400, "stop"),
    "a false best_of": (b'{"prompt": "x", "best_of": false}', 400, "best_of"),
    "a bool for n": (b'{"prompt": "x", "n": true}', 400, "n"),
    "a negative max_tokens": (b'{"prompt": "x", "max_tokens": -1}', 400, "max_tokens"),
    "max_tokens 0 without echo": (b'{"prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    "too many choices": (json.dumps({"prompt": ["x"] * 8, "n": MAX_CHOICES // 4}).encode(), 400, "n"),
    "too many prompts": (json.dumps({"prompt": [[5]] * (MAX_CHOICES + 1)}).encode(), 400, "prompt"),
    "a text prompt longer than any context": (json.dumps({"prompt": "中" * 50_000}, ensure_ascii=False)
                                              .encode(), 400, "prompt"),
    "an unknown stream option": (b'{"prompt": "x", "stream": true, "stream_options": {"x": 1}}', 400,
                                 "stream_options"),
    "a list as the body": (b"[1, 2]", 400, None),
    "not UTF-8": (b'{"prompt": "\xff\xfe"}', 400, None),
    "empty": (b"", 400, None),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_body_gets_its_status_and_a_short_error_body(server, engine, name):
    body, status, param = HOSTILE[name]
    got = post(server, body)
    if status == 200:
        assert got.status_code == 200, got.text[:300]
    else:
        assert assert_error(got, status)["param"] == param
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None,
                                          "multipart/form-data; boundary=x"])
def test_a_body_not_sent_as_json_is_415(server, content_type):
    """Bug: a text/plain body (what a web page may send cross-origin without asking) was served."""
    error = assert_error(post(server, {"prompt": PROMPT, "max_tokens": 2}, content_type), 415)
    assert "application/json" in error["message"]


def test_a_body_over_the_limit_is_413_before_it_is_read(server, engine):
    big = json.dumps({"prompt": "x" * BODY_LIMIT}).encode()
    assert_error(post(server, big), 413)

    def chunked():  # no Content-Length: the limit is found while reading
        for _ in range(BODY_LIMIT // 4096 + 2):
            yield b" " * 4096

    got = httpx.post(server.url + "/v1/completions", content=chunked(), timeout=TIMEOUT_S,
                     headers={"content-type": "application/json"})
    assert_error(got, 413)
    assert_alive(server, engine)


def test_a_wrong_method_is_405_with_allow(server):
    got = httpx.get(server.url + "/v1/completions", timeout=10)
    assert_error(got, 405)
    assert got.headers["allow"] == "POST"


def test_n_beyond_the_batch_runs_in_parts_and_blocks_no_one(server, engine):
    """Bug: a request of more sequences than rows was never admitted, and everything queued behind
    it waited until its client gave up."""
    alone = engine.generate_text([PROMPT], max_new_tokens=5)[0]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        greedy = {"max_tokens": 5, "temperature": 0}
        wide = pool.submit(post, server, {"prompt": PROMPT, "n": 3 * ROWS, **greedy})
        time.sleep(0.2)
        behind = pool.submit(post, server, {"prompt": [PROMPT] * (ROWS + 1), **greedy})
        wide, behind = wide.result(TIMEOUT_S), behind.result(TIMEOUT_S)
    assert [c["text"] for c in wide.json()["choices"]] == [alone] * 3 * ROWS
    assert [c["index"] for c in wide.json()["choices"]] == list(range(3 * ROWS))
    assert [c["text"] for c in behind.json()["choices"]] == [alone] * (ROWS + 1)
    assert wide.json()["usage"]["prompt_tokens"] == 3 * ROWS * len(engine.tokenizer.encode(PROMPT))


def test_a_client_that_leaves_a_non_streamed_request_cancels_it(server, engine):
    """Bug: only streams were cancelled; a plain request ran to its last token for nobody."""
    cancelled = server.metric("bloom_runtime:request_failure_total", reason="cancelled")
    generated = server.metric("bloom_runtime:generation_tokens_total")
    body = json.dumps({"prompt": PROMPT, "max_tokens": 1500, "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT_S) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(body), body))
        wait_for(lambda: server.metric("bloom_runtime:num_requests_running") == 1)
    wait_for(lambda: server.metric("bloom_runtime:num_requests_running") == 0, timeout=10)
    assert server.metric("bloom_runtime:request_failure_total", reason="cancelled") == cancelled + 1
    made = server.metric("bloom_runtime:generation_tokens_total") - generated
    assert made < 1000, f"{made} tokens generated for a client that had left"
    assert_alive(server, engine)


def test_slow_and_stalled_clients_hold_up_no_one(server, engine):
    """What held before and must hold: a client that sends half its headers and waits, one that
    sends half its body and waits, and one that asks for a long stream and never reads it; each
    holds a connection, and a known request beside them is answered as usual."""
    body = json.dumps({"prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True, "stream": True}).encode()
    half_body = json.dumps({"prompt": PROMPT}).encode()
    openings = [b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-",
                b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(half_body) + 10, half_body),
                b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)]
    sockets = [socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT_S) for _ in openings]
    try:
        for sock, opening in zip(sockets, openings):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the stream's reader never reads
            sock.sendall(opening)
        start = time.monotonic()
        assert_alive(server, engine)
        assert time.monotonic() - start < 10
    finally:
        for sock in sockets:
            sock.close()
    wait_for(lambda: server.metric("bloom_runtime:num_requests_running") == 0, timeout=30)


def test_parsing_a_large_body_does_not_stall_the_event_loop(server, engine):
    """Bug: a large prompt was tokenized on the event loop: /health stopped answering for as long
    as that took (35-40 s for 20 MB). Text prompts of the size that still may fit the context are
    tokenized on a worker thread while /health is asked every 50 ms."""
    longest = engine.tokenizer.most_bytes_per_token * engine.max_seq_len // 3  # characters of 3 bytes
    body = json.dumps({"prompt": ["中" * longest] * (BODY_LIMIT // (3 * longest) - 1)}, ensure_ascii=False)
    assert len(body.encode()) < BODY_LIMIT
    waits: list[float] = []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        parsing = pool.submit(post, server, body.encode())
        while not parsing.done():
            start = time.monotonic()
            assert httpx.get(server.url + "/health", timeout=10).status_code == 200
            waits.append(time.monotonic() - start)
            time.sleep(0.05)
        assert_error(parsing.result(), 400)  # too many tokens for the context, once tokenized
    assert max(waits) < 0.5, f"/health waited {max(waits):.2f} s while a body was parsed"


def test_a_stream_with_stop_strings_sends_its_held_back_tail(server, engine):
    """Bug: characters held back while running (they might start a stop string) were never sent
    once the sequence finished without one."""
    whole = engine.generate_text([PROMPT], max_new_tokens=12)[0]
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stream": True, "stop": ["没有这个", "！"],
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    text, finish, usages = "", None, []
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=TIMEOUT_S) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                usages.append(chunk["usage"]["completion_tokens"])
                for choice in chunk["choices"]:
                    text, finish = text + choice["text"], choice["finish_reason"] or finish
    assert (text, finish) == (whole, "length")
    assert usages == sorted(usages) and usages[-1] == 12


def test_text_runs_on_past_an_eos(server, engine):
    """Bug: decoding cut at the first EOS, so with ignore_eos the text stopped while completion
    tokens counted on. The embedded model seldom says EOS; an echoed prompt with one inside goes
    through the same decoding."""
    ids = engine.tokenizer.encode("中国") + [engine.config.eos_token_id] + engine.tokenizer.encode("网络")
    got = post(server, {"prompt": ids, "max_tokens": 4, "temperature": 0, "echo": True})
    new = engine.generate(torch.tensor([ids]), max_new_tokens=4)[0].tolist()
    assert got.json()["choices"][0]["text"] == "中国网络" + engine.tokenizer.decode(new)


def test_a_dead_scheduler_says_503_and_health_tells_the_truth():
    """Bug: after the scheduler died, every request got 429 'busy, retry later' for good. The
    model here raises inside the scheduler's loop (an in-process server, so it can)."""
    import uvicorn

    from bloom_runtime.bench.servers import free_port
    from bloom_runtime.serving.app import create_app

    engine, unused_port = br.load("tiny"), free_port()

    def broken(*_args, **_kwargs):
        raise RuntimeError("the device fell over")

    engine.model.forward_segments = broken
    engine.model.forward = broken
    server = uvicorn.Server(uvicorn.Config(create_app(engine, "tiny"), host="127.0.0.1", port=unused_port,
                                           log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{unused_port}"
    try:
        wait_for(lambda: server.started)
        body = {"prompt": PROMPT, "max_tokens": 3}
        first = httpx.post(url + "/v1/completions", json=body, timeout=TIMEOUT_S)
        assert "the device fell over" in assert_error(first, 500)["message"]
        assert httpx.get(url + "/health", timeout=10).status_code == 503
        again = httpx.post(url + "/v1/completions", json=body, timeout=TIMEOUT_S)
        assert "the device fell over" in assert_error(again, 503)["message"]
        assert "retry-after" not in again.headers
    finally:
        server.should_exit = True
        thread.join(TIMEOUT_S)
