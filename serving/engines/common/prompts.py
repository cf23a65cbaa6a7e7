"""What every engine does with a prompt: find its chat template, render a chat (or take a raw
completions prompt) to token ids, pick the stop strings, and check it fits."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

from ensemble.errors import PromptTooLong
from ensemble.types import ChatMessage, GenerationRequest


def load_chat_template(spec: str | None) -> str | None:
    """An expert's `chat_template` setting as a template: None (the tokenizer's own), `plain`
    (the bundled one) or a path to a Jinja file."""
    if spec is None:
        return None
    if spec == "plain":
        return resources.files("serving.models").joinpath("templates/plain.jinja").read_text()
    return Path(spec).read_text()


def chat_prompt_ids(
    tokenizer: Any, chat_template: str | None, request: GenerationRequest
) -> list[int]:
    """The request's messages through the chat template (None: the tokenizer's), as token ids.
    Tools, assistant tool calls and tool results are the template's to render."""
    messages = [chat_message(m) for m in request.messages]
    text = tokenizer.apply_chat_template(
        messages,
        chat_template=chat_template,
        tools=list(request.tools) or None,
        add_generation_prompt=True,
        tokenize=False,
    )
    # The template already wrote any BOS/special tokens it wants.
    ids: list[int] = tokenizer.encode(text, add_special_tokens=False)
    return ids


def chat_message(message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates read it: tool calls' arguments as objects (templates write
    them with `tojson`), a tool result with the id of its call."""
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": _arguments(c.arguments)},
            }
            for c in message.tool_calls
        ]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # the template writes it as it was sent


def template_renders_tools(template: str | None) -> bool:
    """Whether a chat template renders tool definitions (it reads the `tools` variable)."""
    return template is not None and re.search(r"\btools\b", template) is not None


def raw_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """A raw completions prompt as token ids, with the tokenizer's own special tokens (a BOS
    where it adds one), as `vllm serve`'s /v1/completions and transformers' `generate` feed it."""
    ids: list[int] = tokenizer.encode(prompt, add_special_tokens=True)
    return ids


def prompt_ids(tokenizer: Any, chat_template: str | None, request: GenerationRequest) -> list[int]:
    """The request's prompt as token ids: the raw prompt as it is, else the chat rendered."""
    if request.prompt is not None:
        return raw_prompt_ids(tokenizer, request.prompt)
    return chat_prompt_ids(tokenizer, chat_template, request)


def stop_strings(expert_stop: tuple[str, ...], request: GenerationRequest) -> tuple[str, ...]:
    """The stop strings to apply: the request's, and the expert's own only for chats (an
    expert's `stop` ends a turn of its chat format, which a raw prompt does not use)."""
    if request.prompt is not None:
        return request.params.stop
    return (*expert_stop, *request.params.stop)


def check_room(
    context_window: int, prompt_tokens: int, max_tokens: int | None, param: str = "messages"
) -> int:
    """Tokens left for the completion; a prompt (and `max_tokens`) that does not fit is refused."""
    room = context_window - prompt_tokens
    if room <= 0 or (max_tokens is not None and max_tokens > room):
        asked = max_tokens or 1
        raise PromptTooLong(
            f"This model's maximum context length is {context_window} tokens. "
            f"However, you requested {prompt_tokens + asked} tokens "
            f"({prompt_tokens} in the {param}, {asked} in the completion).",
            param=param,
        )
    return room
