"""The decode-session pieces every engine shares (serving/engines/common), without a model."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncGenerator, Sequence

import pytest

from serving.engines.common.candidates import (
    END,
    Completion,
    TokenKind,
    complete_character,
    next_tokens,
    partial_top,
    ranked,
)
from serving.engines.common.drafts import Draft, View, next_lookahead
from serving.engines.common.entropy import ENTROPY_TOP, estimated_entropy
from serving.engines.common.retokenize import TAIL_TOKENS, AnswerTokens

# A toy vocabulary: 0 ends the sequence, 9 is another special token, 5 and 6 both read "b",
# 7 is the first byte of "é" (8 its second).
TEXTS = {1: "a", 2: "c", 3: "d", 5: "b", 6: "b", 7: "\ufffd", 8: "\ufffd"}


class Pieces:
    def kind(self, token: int) -> TokenKind:
        return "end" if token == 0 else "special" if token == 9 else "text"

    def text(self, token: int) -> str:
        return TEXTS[token]


def decode(ids: Sequence[int]) -> str:
    text = "".join(TEXTS.get(t, "") for t in ids)
    return text.replace("\ufffd\ufffd", "é")


def test_candidates_merge_by_text_drop_specials_and_end_as_one_empty_piece() -> None:
    view = {5: math.log(0.3), 6: math.log(0.1), 9: math.log(0.2), 0: math.log(0.25), 1: -3.0}
    out = next_tokens(ranked(view), 3, Pieces())
    assert [(c.text, c.end, c.token_ids) for c in out.candidates] == [
        ("b", False, (5,)),  # 0.3 + 0.1, with the first token's path
        ("", True, (0,)),
        ("a", False, (1,)),
    ]
    assert sum(math.exp(c.logprob) for c in out.candidates) == pytest.approx(1.0)
    assert out.entropy == pytest.approx(estimated_entropy(view.values()))


def test_a_partial_character_is_completed_only_as_the_top_entry() -> None:
    top = ranked({7: math.log(0.5), 1: math.log(0.3)})
    assert partial_top(top, Pieces()) == (7, math.log(0.5))
    completed = complete_character([(7, math.log(0.5)), (8, math.log(0.5))], decode)
    assert completed == Completion("é", (7, 8), math.log(0.5) + math.log(0.5))
    out = next_tokens(top, 5, Pieces(), completed)
    assert [c.text for c in out.candidates] == ["a", "é"]  # most likely first, after completing
    lower = ranked({1: math.log(0.5), 7: math.log(0.3)})
    assert partial_top(lower, Pieces()) is None
    assert [c.text for c in next_tokens(lower, 5, Pieces()).candidates] == ["a"]


def test_nothing_usable_ends_the_answer() -> None:
    assert next_tokens(ranked({9: -0.1, 8: -2.0}), 5, Pieces()).candidates == (END,)


def test_ties_rank_the_lower_token_id_first() -> None:
    assert ranked({3: -1.0, 2: -1.0, 1: -0.5}) == [(1, -0.5), (2, -1.0), (3, -1.0)]


def test_the_entropy_estimate_reads_the_top_entries_only_and_never_exceeds_the_exact() -> None:
    probs = [0.5 * 0.5**i for i in range(40)]
    probs[-1] += 1.0 - sum(probs)
    exact = -sum(p * math.log(p) for p in probs)
    logprobs = [math.log(p) for p in probs]
    estimate = estimated_entropy(logprobs)
    assert estimate == estimated_entropy(logprobs[:ENTROPY_TOP])
    assert estimated_entropy(logprobs[:10]) <= estimate <= exact
    assert estimate == pytest.approx(exact, abs=1e-4)  # peaked: the top 20 hold nearly all
    uniform = [math.log(1 / 1000)] * 1000
    assert estimated_entropy(uniform) == pytest.approx(math.log(1000))  # flat: exact too
    assert estimated_entropy([-9999.0, 0.0]) == 0.0  # vLLM's stand-in for -inf counts as 0


CHAR_IDS = {"a": 1, "b": 2, "c": 3, "ab": 12}


class Chars:
    """A tokenizer of one token per character, with offsets; "ab" is one token (a merge)."""

    def __call__(self, text: str) -> tuple[list[int], list[int | None]]:
        ids: list[int] = []
        starts: list[int | None] = []
        i = 0
        while i < len(text):
            piece = "ab" if text.startswith("ab", i) else text[i]
            ids.append(CHAR_IDS[piece])
            starts.append(i)
            i += len(piece)
        return ids, starts


def test_text_is_retokenized_from_a_few_tokens_back_and_merges_across_the_join() -> None:
    answer = AnswerTokens([100, 101])
    answer.extend("c" * 20 + "a", Chars())
    tail = answer.tail()
    assert tail.keep == 2 + 21 - TAIL_TOKENS and tail.text == "c" * (TAIL_TOKENS - 1) + "a"
    answer.extend("b", Chars())  # "a" + "b" is one token to this tokenizer
    assert answer.ids == [100, 101, *[3] * 20, 12]
    assert answer.text == "c" * 20 + "ab" and not answer.pending


def test_own_tokens_are_kept_and_retokenizing_never_starts_inside_a_piece() -> None:
    answer = AnswerTokens([100])
    answer.add_ids([3] * 6, "c" * 6)
    answer.add_ids([7, 8], "é")  # one piece of two tokens
    answer.add_ids([3] * 7, "c" * 7)
    assert answer.starts[6:8] == [6, None]
    tail = answer.tail()  # eight back is the "é"'s second token: start at its first
    assert tail.keep == 1 + 6 and tail.text == "é" + "c" * 7
    answer.add_text("x")
    assert answer.pending
    answer.add_ids([2], "b")  # behind text still to tokenize: text like any other
    assert answer.tail().text == "é" + "c" * 7 + "xb"


def test_tail_with_more_text_looks_without_appending() -> None:
    answer = AnswerTokens([100])
    answer.extend("cc", Chars())
    tail = answer.tail("ab")
    assert answer.retokenized(tail, Chars()(tail.text)[0]) == [100, 3, 3, 12]
    assert answer.ids == [100, 3, 3] and answer.text == "cc"


def views(n: int) -> list[View]:
    return [{10 + i: -0.1} for i in range(n)]


def test_a_whole_draft_serves_views_along_its_path_and_the_lookahead_adapts() -> None:
    async def go() -> None:
        draft = Draft.done([1, 2], [10, 11, 12], views(3))
        assert await draft.view_for([1, 2]) == {10: -0.1}
        assert await draft.view_for([1, 2, 10, 11]) == {12: -0.1}
        assert await draft.view_for([1, 2, 11]) is None  # off the path
        assert await draft.view_for([1, 2, 10, 11, 12]) is None  # past its end
        assert draft.used == 3
        assert next_lookahead(draft, [1, 2, 10, 11, 12], 4, 8) == 8  # followed to its end
        assert next_lookahead(draft, [1, 2, 10, 11, 12], 8, 8) == 8
        left = Draft.done([1, 2], [10, 11, 12], views(3))
        await left.view_for([1, 2])
        assert next_lookahead(left, [1, 2, 99], 8, 8) == 1  # left after one view: one next

    asyncio.run(go())


def test_a_streamed_draft_is_read_as_it_arrives_and_cancelled_closes_its_stream() -> None:
    closed: list[bool] = []
    release = asyncio.Event()

    async def steps() -> AsyncGenerator[tuple[Sequence[int], Sequence[View]], None]:
        try:
            yield [10], views(1)
            await release.wait()
            yield [11], [{11: -0.2}]
            await asyncio.Event().wait()  # a stream that goes on until cancelled
        finally:
            closed.append(True)

    async def go() -> None:
        draft = Draft.streaming([1], steps())
        assert await draft.view_for([1]) == {10: -0.1}
        waiting = asyncio.create_task(draft.view_for([1, 10]))
        await asyncio.sleep(0)
        assert not waiting.done()
        release.set()
        assert await waiting == {11: -0.2}
        assert await draft.path_from([1], 2) == [(10, -0.1), (11, -0.2)]
        await draft.cancel()
        assert closed == [True] and draft.finished and draft.error is None

    asyncio.run(go())
