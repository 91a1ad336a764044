"""Topics and patterns: validation (with errors that name the fault) and matching."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshmq import TopicError, UsageError
from meshmq._topics import check_pattern, check_topic, covers, matches

# --- validation ----------------------------------------------------------------------

VALID_TOPICS = [
    "a",
    "orders.eu.placed",
    "Orders-1.eu_west.placed",
    "café.über",  # tokens are any non-whitespace text
    "x" * 256,
    ".".join(["t"] * 32),
]


@pytest.mark.parametrize("topic", VALID_TOPICS)
def test_valid_topics_are_returned_unchanged(topic: str) -> None:
    assert check_topic(topic) == topic


INVALID_TOPICS = [
    ("", "must not be empty"),
    ("a..b", "token 2 is empty"),
    (".a", "token 1 is empty"),
    ("a.", "token 2 is empty"),
    ("a b", "whitespace"),
    ("a\tb", "whitespace"),
    ("a\nb", "whitespace"),
    ("a\x00b", "NUL"),
    ("orders.*", "wildcards"),
    ("orders.>", "wildcards"),
    ("ord*ers", "wildcards"),
    ("x" * 257, "257 characters exceeds the limit of 256"),
    (".".join(["t"] * 33), "33 tokens exceeds the limit of 32"),
    (42, "must be a str, not int"),
    (None, "must be a str, not NoneType"),
    (b"orders", "must be a str, not bytes"),
]


@pytest.mark.parametrize(("topic", "problem"), INVALID_TOPICS)
def test_invalid_topics_name_the_problem(topic: object, problem: str) -> None:
    with pytest.raises(TopicError) as info:
        check_topic(topic)  # type: ignore[arg-type]
    assert problem in str(info.value)
    assert problem in info.value.problem
    assert isinstance(info.value, UsageError) and isinstance(info.value, ValueError)


def test_long_topic_is_shortened_in_the_error() -> None:
    with pytest.raises(TopicError) as info:
        check_topic("y" * 5000)
    assert len(str(info.value)) < 200
    assert info.value.topic.endswith("...")


def test_limits_are_parameters() -> None:
    assert check_topic("a.b", max_tokens=2) == "a.b"
    with pytest.raises(TopicError, match="3 tokens exceeds the limit of 2"):
        check_topic("a.b.c", max_tokens=2)
    with pytest.raises(TopicError, match="exceeds the limit of 4"):
        check_topic("abcde", max_length=4)
    assert check_pattern("a.>", max_length=3) == ("a", ">")


@pytest.mark.parametrize("fn", [check_topic, check_pattern])
def test_unhashable_topic_is_a_topic_error(fn: object) -> None:
    with pytest.raises(TopicError, match="must be a str, not list"):
        fn(["orders"])  # type: ignore[operator]


@pytest.mark.parametrize("topic", ["a\u00a0b", "a\u2028b", "a\x85b", "a\x1cb"])
def test_unicode_whitespace_is_refused(topic: str) -> None:
    with pytest.raises(TopicError, match="whitespace"):
        check_topic(topic)


VALID_PATTERNS = [
    ("a", ("a",)),
    ("*", ("*",)),
    (">", (">",)),
    ("orders.*", ("orders", "*")),
    ("orders.>", ("orders", ">")),
    ("*.*.>", ("*", "*", ">")),
    ("orders.*.placed", ("orders", "*", "placed")),
]


@pytest.mark.parametrize(("pattern", "tokens"), VALID_PATTERNS)
def test_valid_patterns_give_their_tokens(pattern: str, tokens: tuple[str, ...]) -> None:
    assert check_pattern(pattern) == tokens


INVALID_PATTERNS = [
    ("", "must not be empty"),
    ("a..>", "token 2 is empty"),
    ("orders.>.placed", "'>' may only be the last token"),
    ("> .a", "whitespace"),
    (">.>", "'>' may only be the last token"),
    ("ord*", "mixes a wildcard"),
    ("orders.eu>", "mixes a wildcard"),
    ("**", "mixes a wildcard"),
    (">>", "mixes a wildcard"),
    ("x" * 257, "exceeds the limit of 256"),
    (".".join(["*"] * 33), "33 tokens"),
    (7, "must be a str"),
]


@pytest.mark.parametrize(("pattern", "problem"), INVALID_PATTERNS)
def test_invalid_patterns_name_the_problem(pattern: object, problem: str) -> None:
    with pytest.raises(TopicError) as info:
        check_pattern(pattern)  # type: ignore[arg-type]
    assert problem in str(info.value)


# --- matching ------------------------------------------------------------------------

MATCHES = [
    # pattern, topic, expected
    ("orders.placed", "orders.placed", True),
    ("orders.placed", "orders.cancelled", False),
    ("orders.placed", "orders", False),
    ("orders", "orders.placed", False),
    ("orders.*", "orders.placed", True),
    ("orders.*", "orders", False),
    ("orders.*", "orders.eu.placed", False),
    ("*.placed", "orders.placed", True),
    ("*.placed", "placed", False),
    ("*", "orders", True),
    ("*", "orders.placed", False),
    ("*.*", "a.b", True),
    ("orders.>", "orders.placed", True),
    ("orders.>", "orders.eu.placed", True),
    ("orders.>", "orders", False),  # '>' needs at least one token
    (">", "a", True),
    (">", "a.b.c", True),
    ("*.>", "a", False),
    ("*.>", "a.b", True),
    ("orders.*.placed", "orders.eu.placed", True),
    ("orders.*.placed", "orders.eu.cancelled", False),
    ("a.b.c", "a.b", False),
    ("a.b", "a.b.c", False),
]


@pytest.mark.parametrize(("pattern", "topic", "expected"), MATCHES)
def test_matching_table(pattern: str, topic: str, expected: bool) -> None:
    assert matches(check_pattern(pattern), check_topic(topic)) is expected


def _reference_regex(pattern: str) -> re.Pattern[str]:
    parts = []
    for tok in pattern.split("."):
        if tok == "*":
            parts.append(r"[^.]+")
        elif tok == ">":
            parts.append(r"[^.]+(?:\.[^.]+)*")
        else:
            parts.append(re.escape(tok))
    return re.compile(r"\.".join(parts))


# Small alphabets so that matches are common; "c" never appears in patterns, to exercise '*'.
_topic_tokens = st.lists(st.sampled_from(["a", "b", "c", "ab"]), min_size=1, max_size=5)
_pattern_tokens = st.tuples(
    st.lists(st.sampled_from(["a", "b", "ab", "*"]), min_size=0, max_size=5),
    st.booleans(),
).filter(lambda p: p[0] or p[1]).map(lambda p: p[0] + [">"] if p[1] else p[0])


@given(_pattern_tokens, _topic_tokens)
def test_matches_agrees_with_a_regex_reference(pattern_tokens: list[str], topic_tokens: list[str]) -> None:
    pattern, topic = ".".join(pattern_tokens), ".".join(topic_tokens)
    expected = _reference_regex(pattern).fullmatch(topic) is not None
    assert matches(check_pattern(pattern), check_topic(topic)) is expected


@pytest.mark.parametrize(("allowed", "pattern", "covered"), [
    ("orders.>", "orders.placed", True), ("orders.>", "orders.*", True), ("orders.>", "orders.>", True),
    ("orders.>", "orders", False), ("orders.*", "orders.placed", True), ("orders.*", "orders.*", True),
    ("orders.*", "orders.>", False), ("orders.*", "orders.a.b", False), (">", "x", True), (">", ">", True),
    ("orders.placed", "orders.*", False), ("a.*.c", "a.b.c", True), ("a.*.c", "a.*.d", False), ("*", ">", False),
])
def test_a_right_covers_a_pattern_only_if_it_matches_every_topic_the_pattern_does(
        allowed: str, pattern: str, covered: bool) -> None:
    assert covers(tuple(allowed.split(".")), tuple(pattern.split("."))) is covered
