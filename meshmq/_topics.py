"""Topics and subscription patterns, as NATS subjects.

A topic is one or more dot-separated tokens (``orders.eu.placed``). A pattern may
use ``*`` for exactly one token and ``>`` (last token only) for one or more
trailing tokens. Tokens are non-empty and hold no whitespace; a topic to publish
on has no wildcards. Validation is cached: the hot path pays one dict lookup.
"""

from __future__ import annotations

from functools import lru_cache

from ._errors import TopicError

def _tokens(text: str, *, max_length: int, max_tokens: int, kind: str) -> tuple[str, ...]:
    if not text:
        raise TopicError(text, f"a {kind} must not be empty")
    if len(text) > max_length:
        raise TopicError(text[:40] + "...", f"{len(text)} characters exceeds the limit of {max_length}")
    if not text.isprintable() or any(ch.isspace() for ch in text):
        raise TopicError(text, "whitespace, NUL and other control characters are not allowed")
    tokens = tuple(text.split("."))
    if len(tokens) > max_tokens:
        raise TopicError(text, f"{len(tokens)} tokens exceeds the limit of {max_tokens}")
    for i, tok in enumerate(tokens):
        if not tok:
            raise TopicError(text, f"token {i + 1} is empty (leading, trailing or doubled '.')")
    return tokens


def check_topic(topic: str, max_length: int = 256, max_tokens: int = 32) -> str:
    """Return ``topic`` if it is a valid concrete topic; raise :class:`TopicError` naming the fault."""
    if type(topic) is not str:  # before the cache, which would hash (and choke on) anything
        raise TopicError(repr(topic), f"a topic must be a str, not {type(topic).__name__}")
    return _check_topic(topic, max_length, max_tokens)


def check_pattern(pattern: str, max_length: int = 256, max_tokens: int = 32) -> tuple[str, ...]:
    """Return the tokens of a valid pattern; raise :class:`TopicError` naming the fault."""
    if type(pattern) is not str:
        raise TopicError(repr(pattern), f"a pattern must be a str, not {type(pattern).__name__}")
    return _check_pattern(pattern, max_length, max_tokens)


REPLY_PREFIX = "_reply"
"""First token of the topics replies travel on, straight to the requesting node; reserved."""


def reply_topic(node: str) -> str:
    return f"{REPLY_PREFIX}.{node}"


@lru_cache(maxsize=8192)
def _check_topic(topic: str, max_length: int, max_tokens: int) -> str:
    tokens = _tokens(topic, max_length=max_length, max_tokens=max_tokens, kind="topic")
    for tok in tokens:
        if "*" in tok or ">" in tok:
            raise TopicError(topic, "wildcards '*' and '>' are for subscription patterns, not for publishing")
    return topic


def check_user_topic(topic: str, max_length: int = 256, max_tokens: int = 32) -> str:
    """:func:`check_topic`, and the topic is not one meshmq reserves for itself."""
    check_topic(topic, max_length, max_tokens)
    if topic.split(".", 1)[0] == REPLY_PREFIX:
        raise TopicError(topic, f"topics starting with {REPLY_PREFIX!r} are reserved for replies")
    return topic


@lru_cache(maxsize=8192)
def _check_pattern(pattern: str, max_length: int, max_tokens: int) -> tuple[str, ...]:
    tokens = _tokens(pattern, max_length=max_length, max_tokens=max_tokens, kind="pattern")
    if tokens[0] == REPLY_PREFIX:
        raise TopicError(pattern, f"topics starting with {REPLY_PREFIX!r} are reserved for replies")
    last = len(tokens) - 1
    for i, tok in enumerate(tokens):
        if tok == ">":
            if i != last:
                raise TopicError(pattern, "'>' may only be the last token")
        elif tok != "*" and ("*" in tok or ">" in tok):
            raise TopicError(pattern, f"token {tok!r} mixes a wildcard with other characters; use it alone")
    return tokens


def matches(pattern_tokens: tuple[str, ...], topic: str) -> bool:
    """Whether a checked pattern matches a checked topic."""
    topic_tokens = topic.split(".")
    n = len(pattern_tokens)
    for i, ptok in enumerate(pattern_tokens):
        if ptok == ">":
            return len(topic_tokens) > i
        if i >= len(topic_tokens):
            return False
        if ptok != "*" and ptok != topic_tokens[i]:
            return False
    return len(topic_tokens) == n


def covers(allowed: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """Whether every topic ``pattern`` matches is also matched by ``allowed`` (both as tokens):
    how a certificate's rights are checked against a subscription."""
    for i, want in enumerate(allowed):
        if want == ">":
            return i < len(pattern)  # the rest of the pattern: one or more tokens, anything
        if i >= len(pattern):
            return False
        got = pattern[i]
        if got == ">":
            return False  # the pattern reaches further than a single token could
        if want != "*" and got != want:
            return False  # a literal: only the same literal ('*' in the pattern is wider)
    return len(pattern) == len(allowed)
