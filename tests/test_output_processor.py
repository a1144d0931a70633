"""qwen3.output_processor: the stop-string holdback finds exactly the longest partial match, cheaply."""

from __future__ import annotations

import pytest

from qwen3.output_processor import StopPrefixes


def _naive(text: str, stops: list[str]) -> int:
    return max(
        (
            next((k for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])), 0)
            for s in stops
        ),
        default=0,
    )


@pytest.mark.parametrize(
    ("text", "stop", "held"),
    [("hello wor", "world", 3), ("abcab", "abcabd", 5), ("aaaa", "aaab", 3), ("xyz", "abc", 0), ("", "ab", 0),
     ("ab", "ab", 0), ("xa", "ab", 1), ("end.", ".", 0)],
)  # fmt: skip
def test_held_back_length(text, stop, held):
    assert StopPrefixes([stop]).held(text) == _naive(text, [stop]) == held


def test_incremental_feeding_equals_the_naive_scan():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    small = st.text(alphabet="ab\n", max_size=12)

    @hypothesis.settings(max_examples=500, deadline=None)
    @hypothesis.given(st.lists(small, max_size=8), st.lists(small.filter(bool), min_size=1, max_size=3))
    def check(chunks, stops):
        matcher, text = StopPrefixes(stops), ""
        for chunk in chunks:
            text += chunk
            assert matcher.held(text) == _naive(text, stops)

    check()


def test_only_new_text_is_read():
    """The holdback reads each character once (its cost is the new text times the stop strings, whatever
    they are): a text that keeps matching 64 stops of 512 characters is fed 4 characters at a time."""
    stops = ["a" + "b" * 511] * 32 + ["a" * 511 + "c"] * 32
    matcher, text = StopPrefixes(stops), ""
    for _ in range(200):
        text += "aaaa"
        read_before = matcher.fed
        assert matcher.held(text) == _naive(text, stops) and matcher.fed - read_before == 4
