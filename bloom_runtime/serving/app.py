"""The HTTP side of `bloom-runtime serve`: OpenAI's routes on FastAPI, served by uvicorn.

Requests are checked (protocol.py), queued in the scheduler, and answered whole or streamed
as server-sent events while their sequences run. A client that disconnects cancels its
sequences. SIGTERM and Ctrl-C stop new connections, let running requests finish, then stop
the scheduler (and, under torchrun, the other ranks).
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from ..batching import Sequence
from ..engine import Engine
from ..errors import InputError
from . import protocol
from .chat import ChatTemplate
from .metrics import Metrics
from .protocol import APIError, Completion
from .scheduler import QueueFull, Scheduler, Ticket

RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streamed request checks that its client is there
GRACEFUL_SHUTDOWN_S = 60  # running requests get this long to finish after SIGTERM


def create_app(engine: Engine, model_name: str, max_batch_size: int = 8, max_waiting: int = 64,
               max_batch_tokens: int = 2048, chat_template: Path | None = None, static: bool = False
               ) -> FastAPI:
    """The app: a scheduler on `engine` (started and stopped with the app's lifespan) and its routes."""
    if engine.tokenizer is None:
        raise InputError("serve needs a model with a tokenizer.json (prompts and answers are text)")
    metrics = Metrics(model_name)
    scheduler = Scheduler(engine, metrics, max_batch_size, max_waiting, max_batch_tokens, static)
    template = ChatTemplate.read(chat_template) if chat_template is not None else None
    app = FastAPI(title="bloom-runtime", lifespan=_lifespan(scheduler))
    app.state.scheduler = scheduler

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(APIError(exc.status_code, str(exc.detail), kind=kind))

    @app.get("/health")
    async def health() -> Response:
        ok = scheduler.failed is None and not scheduler.stopping
        return Response(status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "bloom-runtime",
                "max_model_len": engine.max_seq_len}
        return {"object": "list", "data": [card]}

    async def respond(request: Request, chat: bool) -> Response:
        try:
            body = await _json(request)
            if chat:
                if template is None:
                    raise APIError(400, "this model has no chat template (BLOOM has none): start the "
                                        "server with --chat-template FILE to use chat completions",
                                   "messages")
                body = template.completion_body(body)
            completion = protocol.parse_completion(body, model_name, engine.tokenizer,
                                                   engine.config.vocab_size, engine.max_seq_len,
                                                   engine.config.eos_token_id)
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


def _lifespan(scheduler: Scheduler):
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.stop)

    return lifespan


def _error(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON ({err})") from None


async def _answer(request: Request, scheduler: Scheduler, engine: Engine, completion: Completion,
                  chat: bool) -> Response:
    """Queue the request and answer it: whole, or as a stream of events."""
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()
    specs = scheduler.specs(completion.prompts, completion.n, completion.config, completion.seed)
    ticket = Ticket(specs, lambda: loop.call_soon_threadsafe(changed.set))
    try:
        scheduler.submit(ticket)
    except QueueFull as err:
        raise APIError(429, f"the server is busy: {err}; retry later", kind="rate_limit_exceeded",
                       code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    view = Answer(completion, ticket, engine, chat)
    if completion.stream:
        return StreamingResponse(view.events(changed, scheduler), media_type="text/event-stream")
    try:
        while not ticket.done:
            try:
                await asyncio.wait_for(changed.wait(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    scheduler.cancel(ticket)
                    return Response(status_code=499)
            changed.clear()
    except asyncio.CancelledError:
        scheduler.cancel(ticket)
        raise
    if ticket.error is not None:
        raise APIError(500, f"generation failed: {ticket.error}", kind="internal_error")
    return JSONResponse(view.whole())


class Answer:
    """A request's response bodies, built from its sequences as they run."""

    def __init__(self, completion: Completion, ticket: Ticket, engine: Engine, chat: bool) -> None:
        self.completion, self.ticket, self.chat = completion, ticket, chat
        self.tokenizer = engine.tokenizer
        hold = max((len(s) for s in completion.config.stop), default=1) - 1
        self.hold = hold  # characters held back while running: they may begin a stop string

    def whole(self) -> dict[str, Any]:
        choices = [self._choice(i, seq, self._prefix(seq) + seq.text, 0, len(seq.tokens), seq.finish_reason)
                   for i, seq in enumerate(self.ticket.sequences)]
        return self._envelope(choices, self._usage())

    async def events(self, changed: asyncio.Event, scheduler: Scheduler) -> AsyncIterator[bytes]:
        """SSE chunks as text arrives, a usage chunk if asked, then [DONE]; cancels on disconnect."""
        sent_text: dict[int, int] = {}
        sent_tokens: dict[int, int] = {}
        try:
            while True:
                await changed.wait()
                changed.clear()
                if self.ticket.error is not None:
                    yield _event(APIError(500, self.ticket.error, kind="internal_error").body())
                    break
                for i, seq in enumerate(self.ticket.sequences):
                    chunk = self._delta(i, seq, sent_text, sent_tokens)
                    if chunk is not None:
                        yield _event(self._envelope([chunk], None))
                if self.ticket.done:
                    break
            if self.completion.include_usage:
                yield _event(self._envelope([], self._usage()))
            yield b"data: [DONE]\n\n"
        finally:
            scheduler.cancel(self.ticket)  # no-op once done; a client that left frees its rows

    def _delta(self, i: int, seq: Sequence, sent_text: dict[int, int], sent_tokens: dict[int, int]
               ) -> dict[str, Any] | None:
        if i not in sent_text:
            sent_text[i], sent_tokens[i] = 0, 0
            prefix = self._prefix(seq)
        else:
            prefix = ""
        text = seq.text if seq.done else _settled(seq.text, self.hold)
        tokens = len(seq.tokens)
        finish = seq.finish_reason if seq.done else None
        if text[sent_text[i]:] == "" and not prefix and finish is None and tokens == sent_tokens[i]:
            return None
        if seq.done and seq.finish_reason not in ("stop", "length"):
            return None
        chunk = self._choice(i, seq, prefix + text[sent_text[i]:], sent_tokens[i], tokens, finish,
                             offset=sent_text[i])
        sent_text[i], sent_tokens[i] = max(sent_text[i], len(text)), tokens
        return chunk

    def _prefix(self, seq: Sequence) -> str:
        return self.tokenizer.decode(seq.prompt) if self.completion.echo else ""

    def _choice(self, i: int, seq: Sequence, text: str, start: int, end: int, finish: str | None,
                offset: int = 0) -> dict[str, Any]:
        logprobs = None
        if seq.config.logprobs is not None:
            logprobs = protocol.logprobs_body(seq, self.tokenizer, start, end, offset)
        if self.chat:
            key = "message" if not self.completion.stream else "delta"
            return {"index": i, key: {"role": "assistant", "content": text}, "logprobs": logprobs,
                    "finish_reason": finish}
        return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def _usage(self) -> dict[str, int]:
        prompts = sum(len(p) for p in self.completion.prompts)
        return protocol.usage(prompts, sum(len(seq.tokens) for seq in self.ticket.sequences))

    def _envelope(self, choices: list[dict], usage: dict | None) -> dict[str, Any]:
        body = protocol.envelope(self.completion, choices, usage)
        if self.chat:
            body["object"] = "chat.completion.chunk" if self.completion.stream else "chat.completion"
        return body


def _settled(text: str, hold: int) -> str:
    """The part of a running sequence's text that can be shown: not a partly decoded character
    (a byte-level token may end inside one), not the last `hold` characters (a stop string may
    be starting there)."""
    text = text.rstrip("\ufffd")
    return text[: len(text) - hold] if hold else text


def _event(body: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()


def serve(app: FastAPI, host: str, port: int) -> None:
    """Serve until SIGTERM or Ctrl-C; running requests finish first (up to GRACEFUL_SHUTDOWN_S)."""
    config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    server = uvicorn.Server(config)
    # uvicorn catches SIGTERM/SIGINT while it runs, shuts down, then re-raises them to the handlers
    # it found: make those a no-op, so that a stop asked for is a clean exit 0, not a kill.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    if not server.started:
        raise InputError(f"could not serve on {host}:{port} (is the port in use?)")
