"""Streamed text: incremental decoding and stop strings, over a byte-level toy vocabulary."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ensemble.text import find_stop, partial_stop_len
from serving.engines.transformers.text import SampleText

# Byte-level pieces, as GPT-2-style tokenizers have: "é" is two tokens that decode alone to U+FFFD.
VOCAB = [b"a", b"b", b" ", b"\n", b"User", b":", b"ab", b"\xc3", b"\xa9", b"\xe2\x82", b"\xac"]


def decode(ids: list[int]) -> str:
    return b"".join(VOCAB[i] for i in ids).decode("utf-8", errors="replace")


def stream(ids: list[int], stops: tuple[str, ...]) -> tuple[list[str], SampleText]:
    sample = SampleText(decode, [], stops)
    deltas = []
    for token in ids:
        deltas.append(sample.push(token))
        if sample.stopped:
            break
    deltas.append(sample.flush())
    return deltas, sample


def test_stop_string_split_across_tokens_is_never_emitted() -> None:
    # "a", "\n", "User", ":" -> the stop "\nUser:" spans three tokens.
    deltas, sample = stream([0, 3, 4, 5, 0], ("\nUser:",))
    assert sample.stopped
    assert "".join(deltas) == "a"
    assert deltas[:2] == ["a", ""]  # "\n" is held back: it may start the stop string


def test_held_back_prefix_is_released_when_the_stop_does_not_follow() -> None:
    deltas, sample = stream([0, 3, 1], ("\nUser:",))
    assert not sample.stopped
    assert deltas == ["a", "", "\nb", ""]


def test_multibyte_character_waits_for_all_its_bytes() -> None:
    deltas, _ = stream([0, 7, 8, 9, 10], ())
    assert deltas == ["a", "", "é", "", "€", ""]


def test_flush_hands_out_an_unfinished_character() -> None:
    deltas, _ = stream([0, 9], ())
    assert "".join(deltas) == "a\ufffd"


def test_partial_stop_len() -> None:
    assert partial_stop_len("hello\nUs", ["\nUser:"]) == 3
    assert partial_stop_len("hello", ["\nUser:"]) == 0
    assert partial_stop_len("ab", ["b", "abc"]) == 2


def test_find_stop_takes_the_earliest() -> None:
    assert find_stop("xx END yy STOP", ["STOP", "END"]) == 3
    assert find_stop("nothing", ["STOP"]) is None


@given(
    ids=st.lists(st.integers(0, len(VOCAB) - 1), max_size=40),
    stops=st.lists(st.sampled_from(["\nUser:", "b", "ab", "é", "a a", "€"]), max_size=3),
)
def test_streamed_text_equals_decoded_text_cut_at_the_first_stop(
    ids: list[int], stops: list[str]
) -> None:
    deltas, sample = stream(ids, tuple(stops))
    out = "".join(deltas)
    full = decode(ids)
    hit = find_stop(full, stops)
    if hit is None:
        assert out == full
        assert not sample.stopped
    else:
        # The stream stops at the first token that completes a stop string: the same cut.
        assert out == full[:hit]
        assert sample.stopped
    assert not any(s in out for s in stops)
