from __future__ import annotations

from collections.abc import Sequence

from ensemble.types import ChatMessage


def query_text(
    messages: Sequence[ChatMessage], *, include_system: bool = False, history_turns: int = 0
) -> str:
    """The text a router embeds for a conversation.

    By default the last user message alone (what the calibration queries look like). Optionally
    the system prompt in front, and up to `history_turns` earlier user/assistant messages, so a
    follow-up like "and in French?" routes with its context.
    """
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
    if last_user is None:
        return messages[-1].content if messages else ""
    parts: list[str] = []
    if include_system:
        parts += [m.content for m in messages if m.role in ("system", "developer")]
    if history_turns:
        earlier = [m for m in messages[:last_user] if m.role in ("user", "assistant")]
        parts += [m.content for m in earlier[-history_turns:]]
    parts.append(messages[last_user].content)
    return "\n".join(p for p in parts if p)
