"""Chat completions, where a chat template is given: the messages become one prompt through the
template (Jinja, as in transformers' `chat_template`), and the rest is a completion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import InputError
from .protocol import APIError

CHAT_ONLY = {"messages", "max_completion_tokens"}


class ChatTemplate:
    def __init__(self, source: str) -> None:
        try:
            environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            self.template = environment.from_string(source)
        except jinja2.TemplateError as err:
            raise InputError(f"chat template: {err}") from None

    @classmethod
    def read(cls, path: Path) -> ChatTemplate:
        try:
            return cls(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise InputError(f"--chat-template {path}: {err.strerror}") from None

    def completion_body(self, body: Any) -> dict[str, Any]:
        """The completions request a chat request stands for (its messages rendered as the prompt)."""
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise APIError(400, "messages must be a non-empty list of {role, content} objects with text "
                                "content", "messages")
        if body.get("logprobs"):
            raise APIError(400, "logprobs is not supported for chat completions", "logprobs")
        try:
            prompt = self.template.render(messages=messages, add_generation_prompt=True)
        except jinja2.TemplateError as err:
            raise APIError(400, f"the chat template failed on these messages: {err}", "messages") from None
        rest = {k: v for k, v in body.items() if k not in CHAT_ONLY and k != "logprobs"}
        if "max_completion_tokens" in body:
            rest["max_tokens"] = body["max_completion_tokens"]
        return {**rest, "prompt": prompt}
