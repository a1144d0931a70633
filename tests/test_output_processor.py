"""qwen3.output_processor: the stop-string holdback finds exactly the longest partial match, cheaply."""

from __future__ import annotations

import pytest

from qwen3.output_processor import _partial_match


def _naive(text: str, stop: str) -> int:
    return next((k for k in range(min(len(stop) - 1, len(text)), 0, -1) if text.endswith(stop[:k])), 0)


@pytest.mark.parametrize(
    ("text", "stop", "held"),
    [("hello wor", "world", 3), ("abcab", "abcabd", 5), ("aaaa", "aaab", 3), ("xyz", "abc", 0), ("", "ab", 0),
     ("ab", "ab", 0), ("xa", "ab", 1), ("end.", ".", 0)],
)  # fmt: skip
def test_partial_match(text, stop, held):
    assert _partial_match(text, stop) == _naive(text, stop) == held


def test_partial_match_equals_the_naive_scan():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    small = st.text(alphabet="ab\n", max_size=12)

    @hypothesis.settings(max_examples=1000, deadline=None)
    @hypothesis.given(small, small.filter(bool))
    def check(text, stop):
        assert _partial_match(text, stop) == _naive(text, stop)

    check()
