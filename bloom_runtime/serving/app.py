"""The HTTP side of `bloom-runtime serve`: OpenAI's routes on FastAPI, served by uvicorn.

A request is read (at most `max_body_bytes`, JSON only), checked and tokenized on a worker
thread (protocol.py), so the event loop never waits on one request's parsing; then queued
in the scheduler. Its sequences' messages come back through the request's own queue; each
choice follows its text with a `Detokenizer` (stop strings end it, and the scheduler is told
to evict it), and the answer is sent whole or streamed as server-sent events. A client that
disconnects, streamed or not, cancels its sequences. Every refusal and failure is OpenAI's
error body. SIGTERM and Ctrl-C stop new connections, let running requests finish, then stop
the scheduler (and, under torchrun, the other ranks).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from ..batching import ERROR, STOP, Output, TokenLogprobs
from ..detokenize import Detokenizer
from ..engine import Engine
from ..errors import InputError
from . import protocol
from .chat import ChatTemplate
from .metrics import Metrics
from .protocol import MAX_BODY_BYTES, APIError, Completion, Served
from .scheduler import Failed, Message, PromptScores, QueueFull, Scheduler, Ticket, Unavailable

RETRY_AFTER_S = 1
GRACEFUL_SHUTDOWN_S = 60  # running requests get this long to finish after SIGTERM
PARSERS = 2  # threads that decode and tokenize request bodies
JSON_TYPES = ("application/json",)
log = logging.getLogger("bloom_runtime.serve")


def create_app(engine: Engine, model_name: str, max_batch_size: int = 8, max_waiting: int = 64,
               max_batch_tokens: int = 2048, chat_template: Path | None = None, static: bool = False,
               max_body_bytes: int = MAX_BODY_BYTES, scheduler_thread: bool = True) -> FastAPI:
    """The app: a scheduler on `engine` (stopped with the app's lifespan) and its routes. The
    scheduler's loop runs on a thread of its own started by the lifespan, or, with
    `scheduler_thread` False, where `serve` runs it: on the thread that loaded the engine."""
    if engine.tokenizer is None:
        raise InputError("serve needs a model with a tokenizer.json (prompts and answers are text)")
    metrics = Metrics(model_name)
    scheduler = Scheduler(engine, metrics, max_batch_size, max_waiting, max_batch_tokens, static,
                          own_thread=scheduler_thread)
    template = ChatTemplate.read(chat_template) if chat_template is not None else None
    served = Served(model_name, engine.tokenizer, engine.config.vocab_size, engine.max_seq_len,
                    engine.config.eos_token_id)
    parsers = ThreadPoolExecutor(PARSERS, thread_name_prefix="bloom-runtime-parse")
    app = FastAPI(title="bloom-runtime", lifespan=_lifespan(scheduler, parsers))
    app.state.scheduler = scheduler

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(APIError(exc.status_code, str(exc.detail), kind=kind, headers=exc.headers))

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        metrics.failure("error")
        return _error(APIError(500, f"internal error: {type(exc).__name__}", kind="internal_error"))

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if scheduler.healthy else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "bloom-runtime",
                "max_model_len": engine.max_seq_len}
        return {"object": "list", "data": [card]}

    def parse(raw: bytes, chat: bool) -> Completion:
        body = protocol.decode_json(raw)
        if chat:
            if template is None:
                raise APIError(400, "this model has no chat template (BLOOM has none): start the "
                                    "server with --chat-template FILE to use chat completions", "messages")
            body = template.completion_body(body)
        return protocol.parse_completion(body, served)

    async def respond(request: Request, chat: bool) -> Response:
        try:
            raw = await _body(request, max_body_bytes)
            completion = await asyncio.get_running_loop().run_in_executor(parsers, parse, raw, chat)
            return await _answer(request, scheduler, engine, completion, chat)
        except APIError as err:
            if err.status < 500:  # the scheduler counts its own failures
                metrics.failure("queue_full" if err.status == 429 else "bad_request")
            return _error(err)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await respond(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await respond(request, chat=True)

    return app


def _lifespan(scheduler: Scheduler, parsers: ThreadPoolExecutor):
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.stop)
            parsers.shutdown(cancel_futures=True)

    return lifespan


def _error(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _body(request: Request, limit: int) -> bytes:
    """The body of a JSON request, refused (415) when it says it is something else and (413) as
    soon as it is known to pass `limit` bytes, before more of it is read."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in JSON_TYPES:
        raise APIError(415, "the body must be sent as application/json, not "
                            f"{protocol.shown(media or 'untyped')}")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the body has {declared} bytes; this server takes at most {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the body passes {limit} bytes, the most this server takes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _answer(request: Request, scheduler: Scheduler, engine: Engine, completion: Completion,
                  chat: bool) -> Response:
    """Queue the request and answer it: whole, or as a stream of events."""
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[list[Message]] = asyncio.Queue()

    def post(messages: list[Message]) -> None:  # on the scheduler's thread
        try:
            loop.call_soon_threadsafe(inbox.put_nowait, messages)
        except RuntimeError:  # the event loop has closed: nobody is waiting for these
            pass

    specs = scheduler.specs(completion.prompts, completion.n, completion.config, completion.seed,
                            completion.prompt_logprobs)
    ticket = Ticket(specs, post)
    try:
        scheduler.submit(ticket)
    except QueueFull as err:
        raise APIError(429, f"the server is busy: {err}; retry later", kind="rate_limit_exceeded",
                       code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except Unavailable as err:
        raise APIError(503, f"the server cannot take requests: {err}", kind="service_unavailable",
                       code="unavailable") from None
    answer = Answer(completion, ticket, scheduler, engine, chat)
    if completion.stream:
        return StreamingResponse(answer.events(inbox), media_type="text/event-stream")
    collecting = asyncio.ensure_future(answer.collect(inbox))
    leaving = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({collecting, leaving}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        leaving.cancel()
        if not collecting.done():  # the client left (or this handler was cancelled): stop its work
            collecting.cancel()
            scheduler.cancel(ticket)
    if not collecting.done() or collecting.cancelled():
        return Response(status_code=499)
    collecting.result()
    return JSONResponse(answer.whole())


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone away (its body was read: what comes now is the end)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Choice:
    """One sequence of a request as its messages arrive: tokens, log-probabilities, text, and what
    of them has been streamed."""

    def __init__(self, index: int, prompt: list[int], prefix: str, text: Detokenizer) -> None:
        self.index, self.prompt, self.prefix, self.text = index, prompt, prefix, text
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprobs] = []
        self.prompt_scores: list[TokenLogprobs | None] | None = None
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.sent_text = self.sent_tokens = 0
        self.started = self.closed = False  # its first (echoing) and last chunks have been sent

    def take(self, message: Output | PromptScores) -> bool:
        """Apply one message; True when a stop string ended the sequence here (the scheduler must
        be told: it only knows tokens)."""
        if isinstance(message, PromptScores):
            self.prompt_scores = message.entries
            return False
        if self.finish_reason is not None:  # ended by a stop string: later tokens are dropped
            return False
        if message.token is not None:
            self.tokens.append(message.token)
            if message.logprobs is not None:
                self.logprobs.append(message.logprobs)
            # a final stop token (EOS, stop_token_ids) is not text
            if message.finish_reason != STOP and self.text.add(message.token):
                self.finish_reason = STOP
                return message.finish_reason is None
        if message.finish_reason is not None:
            self.finish_reason, self.error = message.finish_reason, message.error
            self.text.flush()
        return False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Answer:
    """A request's response bodies, built from the messages its sequences send."""

    def __init__(self, completion: Completion, ticket: Ticket, scheduler: Scheduler, engine: Engine,
                 chat: bool) -> None:
        self.completion, self.ticket, self.scheduler, self.chat = completion, ticket, scheduler, chat
        self.tokenizer = engine.tokenizer
        stops = completion.config.stop if completion.config is not None else ()
        decode = self.tokenizer.decode
        self.choices = [Choice(i, spec.prompt, decode(spec.prompt) if completion.echo else "",
                               Detokenizer(decode, stops)) for i, spec in enumerate(ticket.specs)]
        self.by_key = {spec.key: choice for spec, choice in zip(ticket.specs, self.choices)}

    @property
    def done(self) -> bool:
        return all(choice.done for choice in self.choices)

    def apply(self, messages: list[Message]) -> None:
        """Take a turn's messages; a failure of the scheduler or of a sequence is an APIError."""
        for message in messages:
            if isinstance(message, Failed):
                raise APIError(500, f"generation failed: {message.reason}", kind="internal_error")
            choice = self.by_key[message.key]
            if choice.take(message):
                self.scheduler.finish(self.ticket, message.key)
            if choice.finish_reason == ERROR:
                self.scheduler.cancel(self.ticket)
                raise APIError(500, f"generation failed: {choice.error}", kind="internal_error")

    async def collect(self, inbox: asyncio.Queue) -> None:
        while not self.done:
            self.apply(await inbox.get())

    def whole(self) -> dict[str, Any]:
        choices = [self._choice(c, c.text.text, 0, len(c.tokens), True) for c in self.choices]
        return self._envelope(choices, self._usage())

    async def events(self, inbox: asyncio.Queue) -> AsyncIterator[bytes]:
        """SSE chunks as text arrives, a usage chunk if asked, then [DONE]; cancels on disconnect."""
        try:
            while not self.done:
                try:
                    self.apply(await inbox.get())
                except APIError as err:
                    yield _event(err.body())
                    break
                for choice in self.choices:
                    chunk = self._delta(choice)
                    if chunk is not None:
                        usage = self._usage() if self.completion.continuous_usage else None
                        yield _event(self._envelope([chunk], usage))
            if self.completion.include_usage:
                yield _event(self._envelope([], self._usage()))
            yield b"data: [DONE]\n\n"
        finally:
            self.scheduler.cancel(self.ticket)  # no-op once done; a client that left frees its rows

    def _delta(self, choice: Choice) -> dict[str, Any] | None:
        """The choice's news since its last chunk, or None when there is none (or its prompt's
        scores, which its first chunk carries, have not come yet)."""
        if choice.closed or (self.completion.prompt_logprobs is not None and choice.prompt_scores is None):
            return None
        text = choice.text.text if choice.done else choice.text.visible
        tokens, first = len(choice.tokens), not choice.started
        if not (first or choice.done or len(text) > choice.sent_text or tokens > choice.sent_tokens):
            return None
        chunk = self._choice(choice, text[choice.sent_text:], choice.sent_tokens, tokens, first)
        choice.started, choice.closed = True, choice.done
        choice.sent_text, choice.sent_tokens = len(text), tokens
        return chunk

    def _choice(self, choice: Choice, text: str, start: int, end: int, first: bool) -> dict[str, Any]:
        """A choice's body for its text `text` and tokens `start:end`; the first carries the prompt
        when it is echoed."""
        finish = choice.finish_reason if end == len(choice.tokens) else None
        text = choice.prefix + text if first else text
        logprobs = None
        if self.completion.logprobs is not None:
            tokens, entries = choice.tokens[start:end], choice.logprobs[start:end]
            offset = len(choice.prefix) + (0 if first else choice.sent_text)
            if first and choice.prompt_scores is not None:
                tokens, entries, offset = choice.prompt + tokens, choice.prompt_scores + entries, 0
            logprobs = protocol.logprobs_body(self.tokenizer, tokens, entries, offset)
        if self.chat:
            key = "message" if not self.completion.stream else "delta"
            return {"index": choice.index, key: {"role": "assistant", "content": text}, "logprobs": logprobs,
                    "finish_reason": finish}
        return {"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def _usage(self) -> dict[str, int]:
        prompts = sum(len(p) for p in self.completion.prompts) * self.completion.n
        return protocol.usage(prompts, sum(len(c.tokens) for c in self.choices))

    def _envelope(self, choices: list[dict], usage: dict | None) -> dict[str, Any]:
        body = protocol.envelope(self.completion, choices, usage)
        if self.chat:
            body["object"] = "chat.completion.chunk" if self.completion.stream else "chat.completion"
        return body


def _event(body: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()


def serve(app: FastAPI, host: str, port: int) -> None:
    """Serve until SIGTERM or Ctrl-C; running requests finish first (up to GRACEFUL_SHUTDOWN_S).

    The model work stays on this thread (the one that loaded the engine: make the app with
    `scheduler_thread=False`) and uvicorn gets a thread of its own. Torch run on a second thread
    after this one ran it is slower: each thread that enters OpenMP keeps a pool of workers, and
    with more workers than cores libgomp stops spinning between parallel regions. On a 2-core
    EPYC a bfloat16 bloom-560m token cost 65 ms that way against 43 ms on the loading thread."""
    scheduler = app.state.scheduler
    if scheduler.thread is not None:
        raise ValueError("serve runs the scheduler's loop itself: create_app(..., scheduler_thread=False)")
    config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    server = uvicorn.Server(config)

    def http() -> None:
        try:
            server.run()  # off the main thread uvicorn leaves the signals alone: they are ours below
        finally:
            scheduler.stop()  # returns once the loop below has finished what it runs

    previous = {sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGTERM, signal.SIGINT)}
    thread = threading.Thread(target=http, name="bloom-runtime-http")
    try:
        thread.start()
        scheduler.run()
        thread.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise InputError(f"could not serve on {host}:{port} (is the port in use?)")
