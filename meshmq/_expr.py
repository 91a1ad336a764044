"""A small, safe expression language for content-based routing rules. Pure; no ``eval``.

    data.totalAmount > 1000 and data.currency == "USD"
    type in ["OrderPlaced", "OrderAmended"] or not (headers.region == "eu")

Grammar (precedence from low to high)::

    expr  := and ("or" and)*
    and   := not ("and" not)*
    not   := "not" not | cmp
    cmp   := value (("==" | "!=" | "<" | "<=" | ">" | ">=" | "in") value)?
    value := number | string | true | false | null | path | "(" expr ")" | "[" [value ("," value)*] "]"
    path  := name ("." name)*      -- rooted at: data, headers, topic, type, source, key

Evaluation never raises: a path that does not exist is null, and a comparison of values
that do not compare (a string with a number) is false. Expressions are bounded in
length and nesting, so a policy cannot make an agent work without end.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

MAX_LENGTH = 1000
MAX_DEPTH = 32
ROOTS = ("data", "headers", "topic", "type", "source", "key")
_TOKEN = re.compile(r"""\s*(?:(?P<num>-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)|(?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
                      |(?P<op>==|!=|<=|>=|<|>|\(|\)|\[|\]|,)|(?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*))""",
                    re.VERBOSE)
_KEYWORDS = {"and", "or", "not", "in", "true", "false", "null"}


class ExpressionError(ValueError):
    """An expression that does not parse; ``position`` is the character where it goes wrong."""

    def __init__(self, problem: str, position: int) -> None:
        super().__init__(f"{problem} (at character {position + 1})")
        self.problem = problem
        self.position = position


@dataclasses.dataclass(frozen=True, slots=True)
class Expression:
    """A parsed expression; :meth:`matches` tells whether a message satisfies it."""

    text: str
    tree: Any

    def matches(self, message: dict[str, Any]) -> bool:
        """``message``: the fields a rule may look at (data, headers, topic, type, source, key)."""
        return _truthy(_eval(self.tree, message))


def parse(text: str) -> Expression:
    if not isinstance(text, str):
        raise ExpressionError("an expression is a string", 0)
    if len(text) > MAX_LENGTH:
        raise ExpressionError(f"longer than {MAX_LENGTH} characters", MAX_LENGTH)
    tokens = _tokenize(text)
    parser = _Parser(tokens, len(text))
    tree = parser.expr(0)
    if parser.i != len(tokens):
        raise ExpressionError(f"unexpected {tokens[parser.i][1]!r}", tokens[parser.i][2])
    return Expression(text, tree)


def _tokenize(text: str) -> list[tuple[str, Any, int]]:
    tokens: list[tuple[str, Any, int]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise ExpressionError(f"cannot read {text[pos:].strip()[:10]!r}", pos)
        start = m.start(m.lastgroup) if m.lastgroup else pos
        kind, value = m.lastgroup, m.group(m.lastgroup or 0)
        if kind == "num":
            tokens.append(("value", float(value) if any(c in value for c in ".eE") else int(value), start))
        elif kind == "str":
            body = value[1:-1]
            tokens.append(("value", re.sub(r"\\(.)", r"\1", body), start))
        elif kind == "name":
            if value in ("true", "false", "null"):
                tokens.append(("value", {"true": True, "false": False, "null": None}[value], start))
            elif value in _KEYWORDS:
                tokens.append(("kw", value, start))
            else:
                root = value.split(".")[0]
                if root not in ROOTS:
                    raise ExpressionError(f"unknown name {root!r}; a path starts with one of {', '.join(ROOTS)}",
                                          start)
                tokens.append(("path", tuple(value.split(".")), start))
        else:
            tokens.append(("op", value, start))
        pos = m.end()
    return tokens


class _Parser:
    def __init__(self, tokens: list[tuple[str, Any, int]], end: int) -> None:
        self.tokens = tokens
        self.i = 0
        self.end = end

    def _peek(self) -> tuple[str, Any, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def _at(self, kind: str, value: Any) -> bool:
        t = self._peek()
        return t is not None and t[0] == kind and t[1] == value

    def _expect(self, kind: str, value: Any) -> None:
        if not self._at(kind, value):
            t = self._peek()
            raise ExpressionError(f"expected {value!r}" + (f", found {t[1]!r}" if t else " at the end"),
                                  t[2] if t else self.end)
        self.i += 1

    def _depth(self, depth: int) -> int:
        if depth > MAX_DEPTH:
            t = self._peek()
            raise ExpressionError(f"nested more than {MAX_DEPTH} deep", t[2] if t else self.end)
        return depth + 1

    def expr(self, depth: int) -> Any:
        depth = self._depth(depth)
        node = self.conj(depth)
        while self._at("kw", "or"):
            self.i += 1
            node = ("or", node, self.conj(depth))
        return node

    def conj(self, depth: int) -> Any:
        node = self.neg(depth)
        while self._at("kw", "and"):
            self.i += 1
            node = ("and", node, self.neg(depth))
        return node

    def neg(self, depth: int) -> Any:
        if self._at("kw", "not"):
            self.i += 1
            return ("not", self.neg(self._depth(depth)))
        return self.cmp(depth)

    def cmp(self, depth: int) -> Any:
        left = self.value(depth)
        t = self._peek()
        if t is not None and ((t[0] == "op" and t[1] in ("==", "!=", "<", "<=", ">", ">=")) or t == ("kw", "in", t[2])):
            self.i += 1
            return ("cmp", t[1], left, self.value(depth))
        return left

    def value(self, depth: int) -> Any:
        t = self._peek()
        if t is None:
            raise ExpressionError("unexpected end", self.end)
        kind, value, pos = t
        if kind == "value":
            self.i += 1
            return ("lit", value)
        if kind == "path":
            self.i += 1
            return ("path", value)
        if t[:2] == ("op", "("):
            self.i += 1
            node = self.expr(depth)
            self._expect("op", ")")
            return node
        if t[:2] == ("op", "["):
            self.i += 1
            depth = self._depth(depth)
            items = []
            if not self._at("op", "]"):
                items.append(self.value(depth))
                while self._at("op", ","):
                    self.i += 1
                    items.append(self.value(depth))
            self._expect("op", "]")
            return ("list", tuple(items))
        raise ExpressionError(f"unexpected {value!r}", pos)


def _eval(node: Any, message: dict[str, Any]) -> Any:
    kind = node[0]
    if kind == "lit":
        return node[1]
    if kind == "path":
        value: Any = message
        for part in node[1]:
            if not isinstance(value, dict) or part not in value:
                return None
            value = value[part]
        return value
    if kind == "list":
        return [_eval(item, message) for item in node[1]]
    if kind == "not":
        return not _truthy(_eval(node[1], message))
    if kind == "and":
        return _truthy(_eval(node[1], message)) and _truthy(_eval(node[2], message))
    if kind == "or":
        return _truthy(_eval(node[1], message)) or _truthy(_eval(node[2], message))
    op, left, right = node[1], _eval(node[2], message), _eval(node[3], message)
    try:
        if op == "==":
            return bool(left == right)
        if op == "!=":
            return bool(left != right)
        if op == "in":
            return isinstance(right, (list, str, dict)) and left in right
        if isinstance(left, bool) or isinstance(right, bool) or left is None or right is None:
            return False  # order is for numbers and strings only
        if op == "<":
            return bool(left < right)
        if op == "<=":
            return bool(left <= right)
        if op == ">":
            return bool(left > right)
        return bool(left >= right)
    except TypeError:  # "3" < 4: no order between them
        return False


def _truthy(value: Any) -> bool:
    return value is True or (value not in (None, False, 0, "", [], {}) and not isinstance(value, bool))
