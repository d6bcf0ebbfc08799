"""`bloom-runtime serve` through the real `openai` client and raw HTTP, on loopback.

Every answer is checked against the same prompt run alone through `Engine.generate_text`
(float32 greedy: identical text); every load is bounded in count and in time.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import random
import signal
import sys
import time

import httpx
import openai
import pytest
from serve_process import ServerProcess, healthy, wait_for

import bloom_runtime as br

PROMPTS = ["以下是中国关于计算机网络考试的单项选择题", "中国", "请选出其中的正确答案。\n", "网络", "1+1=",
           "以下是中国关于高等数学考试的单项选择题，请选出其中的正确答案。\n\n下列", "答案：", "A. "]
CLIENT_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def server():
    process = ServerProcess("--model", "tiny", "--max-batch-size", "8", "--max-waiting", "256")
    yield process
    assert process.stop() == 0


@pytest.fixture(scope="module")
def engine():
    return br.load("tiny")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=CLIENT_TIMEOUT_S, max_retries=0)


def solo(engine, prompt: str, max_tokens: int) -> str:
    return engine.generate_text([prompt], max_new_tokens=max_tokens)[0]


def greedy(client, **kwargs):
    return client.completions.create(model="tiny", temperature=0, **kwargs)


def stream_text(client, **kwargs) -> tuple[str, str | None]:
    text, finish = "", None
    for chunk in client.completions.create(model="tiny", temperature=0, stream=True, **kwargs):
        if chunk.choices:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


def test_completions_and_streams_equal_the_prompt_run_alone(client, engine):
    got = greedy(client, prompt=PROMPTS[0], max_tokens=12)
    assert got.choices[0].text == solo(engine, PROMPTS[0], 12)
    assert got.choices[0].finish_reason == "length"
    assert got.usage.prompt_tokens == len(engine.tokenizer.encode(PROMPTS[0]))
    assert got.usage.completion_tokens == 12
    assert stream_text(client, prompt=PROMPTS[0], max_tokens=12) == (got.choices[0].text, "length")
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_32_concurrent_clients_each_get_their_lone_answer(client, engine):
    rng = random.Random(0)
    jobs = [(rng.choice(PROMPTS), rng.randint(1, 24), rng.random() < 0.5) for _ in range(32)]

    def run(job):
        prompt, max_tokens, streamed = job
        if streamed:
            return stream_text(client, prompt=prompt, max_tokens=max_tokens)[0]
        return greedy(client, prompt=prompt, max_tokens=max_tokens).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(run, jobs, timeout=CLIENT_TIMEOUT_S))
    for (prompt, max_tokens, _), answer in zip(jobs, answers):
        assert answer == solo(engine, prompt, max_tokens), (prompt, max_tokens)


def test_prompt_forms_n_echo_stop_seed_and_logprobs(client, engine):
    ids = engine.tokenizer.encode(PROMPTS[1])
    by_ids = greedy(client, prompt=[ids, ids[:1]], max_tokens=6)
    assert [c.text for c in by_ids.choices] == [solo(engine, PROMPTS[1], 6),
                                                solo(engine, engine.tokenizer.decode(ids[:1]), 6)]
    echoed = greedy(client, prompt=PROMPTS[1], max_tokens=6, echo=True)
    assert echoed.choices[0].text == PROMPTS[1] + solo(engine, PROMPTS[1], 6)
    free = solo(engine, PROMPTS[0], 12)
    stop = free[4:6]
    stopped = greedy(client, prompt=PROMPTS[0], max_tokens=12, stop=[stop])
    assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == (free[:free.find(stop)], "stop")
    streamed = stream_text(client, prompt=PROMPTS[0], max_tokens=12, stop=[stop])
    assert streamed == (free[:free.find(stop)], "stop")
    def sampled(seed: int) -> list[str]:  # the model is sure of this prompt: a high temperature
        return [c.text for c in client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=10,
                                                          temperature=3.0, seed=seed, n=2).choices]

    first, others = sampled(3), [sampled(seed) for seed in range(4, 8)]
    assert sampled(3) == first and any(other != first for other in others)
    assert any(a != b for a, b in [first, *others])  # the n choices draw apart
    scored = greedy(client, prompt=PROMPTS[0], max_tokens=4, logprobs=3)
    lp = scored.choices[0].logprobs
    assert len(lp.tokens) == 4 and all(len(top) == 3 for top in lp.top_logprobs)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):  # greedy: the chosen is the most likely
        assert chosen == pytest.approx(max(top.values()), abs=1e-5) and chosen <= 0


BAD = [  # body (None: not JSON), status, the param named (or words of the message)
    (None, 400, None),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [[1, 2], 5], "max_tokens": 2}, 400, "prompt"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": "3"}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 5000}, 400, "max_tokens"),
    ({"prompt": [1, 10**7]}, 400, "prompt"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ({"prompt": "x", "best_of": 3}, 400, "best_of"),
    ({"prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
]


@pytest.mark.parametrize("body, status, param", BAD)
def test_a_bad_request_gets_openais_error_body_and_status(server, body, status, param):
    content = b"{not json" if body is None else json.dumps(body).encode()
    got = httpx.post(server.url + "/v1/completions", content=content, timeout=30,
                     headers={"content-type": "application/json"})
    assert got.status_code == status
    error = got.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def test_unknown_routes_and_chat_without_a_template(server, client):
    got = httpx.get(server.url + "/v2/nothing", timeout=10)
    assert got.status_code == 404 and got.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="chat template"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])


def test_a_client_that_disconnects_frees_its_row_and_others_are_unaffected(server, client, engine):
    cancelled = server.metric("bloom_runtime:request_failure_total", reason="cancelled")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        other = pool.submit(lambda: greedy(client, prompt=PROMPTS[2], max_tokens=40))
        with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                          json={"prompt": PROMPTS[0], "max_tokens": 1500, "stream": True, "ignore_eos": True,
                                "temperature": 0}) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))  # it started; now hang up
        assert other.result(CLIENT_TIMEOUT_S).choices[0].text == solo(engine, PROMPTS[2], 40)
    deadline = time.monotonic() + 30
    while server.metric("bloom_runtime:num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.metric("bloom_runtime:num_requests_running") == 0
    assert server.metric("bloom_runtime:request_failure_total", reason="cancelled") == cancelled + 1


def test_metrics_count_the_requests_made(server, client):
    before = {name: server.metric(f"bloom_runtime:{name}") for name in
              ("request_success_total", "prompt_tokens_total", "generation_tokens_total",
               "e2e_request_latency_seconds_count", "time_to_first_token_seconds_count")}
    answers = [client.completions.create(model="tiny", prompt=p, max_tokens=3 + i)
               for i, p in enumerate(PROMPTS)]
    grown = {name: server.metric(f"bloom_runtime:{name}") - before[name] for name in before}
    assert grown["request_success_total"] == len(PROMPTS)
    assert grown["e2e_request_latency_seconds_count"] == len(PROMPTS)
    assert grown["time_to_first_token_seconds_count"] == len(PROMPTS)
    assert grown["prompt_tokens_total"] == sum(a.usage.prompt_tokens for a in answers)
    assert grown["generation_tokens_total"] == sum(a.usage.completion_tokens for a in answers)


def test_a_soak_of_300_requests_loses_nothing_and_memory_stays_flat(server, client):
    def run(i):
        return greedy(client, prompt=PROMPTS[i % len(PROMPTS)], max_tokens=1 + i % 8)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(run, range(60), timeout=CLIENT_TIMEOUT_S))  # warm: the cache reaches its size
        start = server.rss_kib()
        answers = list(pool.map(run, range(300), timeout=5 * CLIENT_TIMEOUT_S))
    grown_mib = (server.rss_kib() - start) / 1024
    assert [a.usage.completion_tokens for a in answers] == [1 + i % 8 for i in range(300)]
    assert grown_mib < 50, f"the server grew by {grown_mib:.0f} MiB over 300 requests"


def test_a_full_queue_answers_429_with_retry_after(engine):
    busy = ServerProcess("--model", "tiny", "--max-batch-size", "1", "--max-waiting", "1")
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            long = {"prompt": PROMPTS[0], "max_tokens": 600, "ignore_eos": True}
            url = busy.url + "/v1/completions"
            post = functools.partial(httpx.post, url, json=long, timeout=CLIENT_TIMEOUT_S)
            running = pool.submit(post)
            wait_for(lambda: busy.metric("bloom_runtime:num_requests_running") == 1)
            waiting = pool.submit(post)
            wait_for(lambda: busy.metric("bloom_runtime:num_requests_waiting") == 1)
            refused = httpx.post(busy.url + "/v1/completions", json=long, timeout=30)
            assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
            assert refused.json()["error"]["code"] == "queue_full"
            assert running.result().status_code == waiting.result().status_code == 200
    finally:
        assert busy.stop() == 0


def test_sigterm_lets_a_running_stream_finish_and_exits_0(engine):
    process = ServerProcess("--model", "tiny")
    chunks = []
    with httpx.stream("POST", process.url + "/v1/completions", timeout=CLIENT_TIMEOUT_S,
                      json={"prompt": PROMPTS[0], "max_tokens": 300, "stream": True, "ignore_eos": True,
                            "stream_options": {"include_usage": True}}) as response:
        lines = response.iter_lines()
        chunks.append(next(line for line in lines if line.startswith("data:")))
        process.process.send_signal(15)
        chunks += [line for line in lines if line.startswith("data:")]
    assert chunks[-1] == "data: [DONE]"
    assert json.loads(chunks[-2][5:])["usage"]["completion_tokens"] == 300
    assert json.loads(chunks[-3][5:])["choices"][0]["finish_reason"] == "length"
    assert process.stop() == 0


def test_an_admission_takes_prompts_while_their_tokens_fit_the_budget(engine):
    """Guards the budget counting padded rows (rows x longest prompt) after the prefill stopped
    padding: prompts of 60 and 30 tokens (90) fit 100 together, where 2 x 60 would not. The next
    one (20 more) waits; a prompt over the budget alone is still taken, alone."""
    from bloom_runtime.serving.metrics import Metrics
    from bloom_runtime.serving.scheduler import Scheduler, Ticket

    scheduler = Scheduler(engine, Metrics("tiny"), max_batch_size=8, max_waiting=8, max_batch_tokens=100,
                          own_thread=False)
    for length in (60, 30, 20, 150, 5):
        scheduler.submit(Ticket(scheduler.specs([[7] * length], 1, None, None), lambda _messages: None))
    taken = [[len(spec.prompt) for spec in scheduler._take_admissions()] for _ in range(3)]
    assert taken == [[60, 30], [20], [150]]


def test_serve_runs_the_model_on_the_thread_that_loaded_it(engine):
    """Bug: the model stepped on a scheduler thread while the main thread had loaded it, which
    cost 1.5x a token on 2 cores (a second OpenMP pool: app.serve). In-process, so the forward
    can say where it runs; SIGTERM, handled by serve, ends it."""
    import threading

    from bloom_runtime.bench.servers import free_port
    from bloom_runtime.serving.app import create_app, serve

    steps, forward = set(), engine.model.forward_segments
    engine.model.forward_segments = lambda *a, **k: steps.add(threading.get_ident()) or forward(*a, **k)
    port, answers = free_port(), []
    url = f"http://127.0.0.1:{port}"

    def client() -> None:
        try:
            wait_for(lambda: healthy(url))
            answers.append(httpx.post(url + "/v1/completions", timeout=CLIENT_TIMEOUT_S,
                                      json={"prompt": PROMPTS[0], "max_tokens": 5}).json())
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    sent = threading.Thread(target=client)
    sent.start()
    before = signal.getsignal(signal.SIGTERM)
    try:
        serve(create_app(engine, "tiny", scheduler_thread=False), "127.0.0.1", port)
    finally:
        del engine.model.forward_segments
        sent.join(CLIENT_TIMEOUT_S)
    assert answers[0]["choices"][0]["text"] == solo(engine, PROMPTS[0], 5)
    assert steps == {threading.main_thread().ident}
    assert signal.getsignal(signal.SIGTERM) is before  # serve gives the handlers back


def test_under_torchrun_two_ranks_serve_what_one_does(tmp_path, client):
    """Rank 0 serves and broadcasts each step's plan; rank 1 runs it on its half of the heads."""
    from bloom_runtime.embedded import TINY_DIR
    from bloom_runtime.weights import cut_checkpoint

    cut = cut_checkpoint(TINY_DIR, tmp_path / "tiny-cut", tp=2)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "bloom_runtime"]
    tp2 = ServerProcess("--model", str(cut), "--served-model-name", "tiny", launcher=launcher)
    try:
        other = openai.OpenAI(base_url=tp2.url + "/v1", api_key="none", timeout=CLIENT_TIMEOUT_S,
                              max_retries=0)
        jobs = [(p, 4 + 3 * i) for i, p in enumerate(PROMPTS)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = [a.choices[0].text for a in pool.map(
                lambda job: greedy(other, prompt=job[0], max_tokens=job[1]), jobs, timeout=CLIENT_TIMEOUT_S)]
        assert answers == [greedy(client, prompt=p, max_tokens=m).choices[0].text for p, m in jobs]
        seeded = dict(prompt=PROMPTS[0], max_tokens=10, temperature=1.2, seed=5)
        assert other.completions.create(model="tiny", **seeded).choices[0].text == \
            client.completions.create(model="tiny", **seeded).choices[0].text
    finally:  # SIGTERM to rank 0, the serving process (torchrun itself ends non-zero on one)
        os.kill(_rank_0(tp2.process.pid), signal.SIGTERM)
        assert tp2.process.wait(60) == 0


def _rank_0(torchrun: int) -> int:
    """The pid of torchrun's worker with RANK=0."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/environ", "rb") as env:
                if parent == torchrun and b"\0RANK=0\0" in b"\0" + env.read():
                    return int(entry)
        except OSError:
            continue
    raise AssertionError("no rank 0 under torchrun")


def test_chat_completions_render_the_given_template(tmp_path, client):
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant:{% endif %}", encoding="utf-8")
    chat = ServerProcess("--model", "tiny", "--chat-template", str(template))
    try:
        talker = openai.OpenAI(base_url=chat.url + "/v1", api_key="none", timeout=CLIENT_TIMEOUT_S,
                               max_retries=0)
        messages = [{"role": "user", "content": PROMPTS[0]}]
        answer = talker.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
        rendered = f"user: {PROMPTS[0]}\nassistant:"
        expected = greedy(client, prompt=rendered, max_tokens=8).choices[0].text
        assert answer.choices[0].message.content == expected
        assert answer.choices[0].message.role == "assistant" and answer.object == "chat.completion"
        with pytest.raises(openai.BadRequestError, match="messages"):
            talker.chat.completions.create(model="tiny", messages=[], max_tokens=8)
    finally:
        assert chat.stop() == 0
