"""The reasoning fields' rule, on one JSON object: the two names a reasoning text goes by.

Replicas name it ``reasoning_content`` (vLLM <= 0.11, SGLang), ``reasoning`` (vLLM >= 0.16) or
both (transition releases); a lone null value is no reasoning and is left as it is. Per pool,
``emit`` says what clients get: ``both`` mirrors the present key to the other (alias right after
it), ``reasoning`` / ``reasoning_content`` keep only that name (renamed in place; of two, the other
is dropped), ``passthrough`` touches nothing.

:func:`rewrite_json` applies the rule to a chunk's ``choices[].delta`` (for :mod:`teraproxy.sse`)
or an answer's ``choices[].message`` (:func:`rewrite_message_body`, a non-streamed answer);
:class:`Shape` and :func:`learn` let a stream's later chunks be spliced instead of parsed (their
bytes are the same either way). :func:`add_request_reasoning` and :func:`needs_request_rewrite`
serve requests: an assistant message's ``reasoning_content`` is copied to ``reasoning``.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

__all__ = ["EMITS", "add_request_reasoning", "needs_request_rewrite", "rewrite_message_body"]

EMITS: Final = ("both", "reasoning", "reasoning_content", "passthrough")
BOTH: Final = 0  # modes are indexes into EMITS
_REASONING: Final = 1
_REASONING_CONTENT: Final = 2
PASSTHROUGH: Final = 3

NEEDLE: Final = b'"reasoning'  # both keys start with it


def mode_of(emit: str) -> int:
    try:
        return EMITS.index(emit)
    except ValueError:
        raise ValueError(f"emit must be one of {EMITS}, got {emit!r}") from None


# --------------------------------------------------------------------------
# field rewrite


def _alias(d: dict[str, Any], mode: int) -> bool:
    """Apply the rewrite rule to a delta/message dict in place; True if changed. A lone null
    value is no reasoning at all (vLLM sends ``"reasoning": null`` even without a parser): left as is."""
    if "reasoning" in d:
        if "reasoning_content" in d:  # both keys
            if mode == BOTH:
                return False
            del d["reasoning_content" if mode == _REASONING else "reasoning"]
            return True
        if mode == _REASONING:
            return False
        have, other = "reasoning", "reasoning_content"
    elif "reasoning_content" in d:
        if mode == _REASONING_CONTENT:
            return False
        have, other = "reasoning_content", "reasoning"
    else:
        return False
    if d[have] is None:
        return False
    if len(d) == 1 or next(reversed(d)) == have:  # the key is last: no reordering
        d[other] = d[have] if mode == BOTH else d.pop(have)
        return True
    items = list(d.items())  # rebuild, keeping the key order
    d.clear()
    for k, v in items:
        if k == have:
            if mode == BOTH:
                d[k] = v
            d[other] = v
        else:
            d[k] = v
    return True


def rewrite_json(payload: bytes, field: str, mode: int) -> bytes | None:
    """payload with the rule applied to each choices[i][field]; None if unchanged.

    Raises ValueError when payload is not JSON or cannot be re-serialised.
    """
    obj = orjson.loads(payload)
    try:
        choices = obj["choices"]
    except (KeyError, TypeError, IndexError):
        return None
    changed = False
    if type(choices) is list:
        for choice in choices:
            try:
                sub = choice[field]
            except (KeyError, TypeError, IndexError):
                continue
            if type(sub) is dict and _alias(sub, mode):
                changed = True
    if not changed:
        return None
    try:
        return orjson.dumps(obj)
    except TypeError as exc:  # orjson.JSONEncodeError, e.g. nesting too deep
        raise ValueError(str(exc)) from None


# --------------------------------------------------------------------------
# the splice of a stream's chunks


def canonical_string(value: bytes) -> bool:
    """value is one complete JSON string in orjson's own bytes (the quote first: not null, not a
    number; a quote inside or a foreign escape fails the round trip). orjson escapes only a quote,
    a backslash and a control character: a value without them is its own form when it is UTF-8, so
    only a value with one pays for the round trip (a compiled walk of a token's bytes is ~100
    instructions, the round trip ~2,700)."""
    n = len(value)
    if n < 2 or value[0] != 34 or value[n - 1] != 34:
        return False
    ascii_only = True
    for i in range(1, n - 1):
        c = value[i]
        if c < 32 or c == 34 or c == 92:
            return _round_trips(value)
        if c > 127:
            ascii_only = False
    if ascii_only:
        return True
    try:
        value.decode()
    except UnicodeDecodeError:
        return False
    return True


def _round_trips(value: bytes) -> bool:
    try:
        return orjson.dumps(orjson.loads(value)) == value
    except ValueError:
        return False


class Shape:
    """A stream's reasoning chunk as learnt by learn: ``lead`` (the prefix and ``"K":``) + a string
    value + ``suffix``; its rewrite is ``head`` + value [+ ``middle`` + value, for emit both] +
    suffix. ``line``: such a frame's line up to its value (``data: `` + lead)."""

    __slots__ = ("at", "head", "lead", "line", "line_head", "middle", "suffix", "tail")

    def __init__(self, prefix: bytes, have: bytes, suffix: bytes, mode: int) -> None:
        other = b'"reasoning":' if have == b'"reasoning_content":' else b'"reasoning_content":'
        self.lead, self.suffix = prefix + have, suffix  # a chunk of the shape starts with lead, ends with suffix
        self.head, self.middle = (self.lead, b"," + other) if mode == BOTH else (prefix + other, b"")
        self.at = len(self.lead)  # the value's first byte (its opening quote)
        self.line, self.line_head, self.tail = b"data: " + self.lead, b"data: " + self.head, suffix + b"\n\n"

    def splice(self, value: bytes) -> bytes:
        if self.middle:
            return b"".join((self.head, value, self.middle, value, self.suffix))
        return self.head + value + self.suffix


def learn(payload: bytes, new: bytes, mode: int) -> Shape | None:
    """The shape of a stream's reasoning chunks, from one that the parse just rewrote to ``new``:
    payload is the prefix, ``"K":`` and a string value, and the suffix, where the stream's other
    chunks have the same prefix (id, created, model, index) and suffix and only the value changes.
    None unless that is proven from this chunk.

    Proof, without a parse: payload holds the needle once, at ``"K":"``, and the splice of its
    value into the rewritten members gives exactly ``new``, orjson's serialisation of the rewritten
    object, which orjson composes member by member. So payload, the same less the added member
    (or with K's name back), is orjson's serialisation of its object, and its bytes at the needle
    are the one reasoning member of a delta: another chunk with the same prefix and suffix and a
    string value in orjson's bytes (checked per chunk) is that object with only the value changed,
    and its splice equals orjson.dumps of its rewritten object.
    """
    i = payload.find(NEEDLE)
    if payload.rfind(NEEDLE) != i:
        return None
    for key in (b'"reasoning_content":"', b'"reasoning":"'):
        if payload.startswith(key, i):
            break
    else:
        return None
    at = i + len(key) - 1  # the value's opening quote
    end = payload.find(34, at + 1)
    if end < 0 or payload.find(92, at, end) >= 0:  # an escape: not learnt from this chunk
        return None
    shape = Shape(payload[:i], key[:-1], payload[end + 1 :], mode)
    return shape if shape.splice(payload[at : end + 1]) == new else None




# --------------------------------------------------------------------------
# non-streamed responses and requests


def rewrite_message_body(body: bytes, emit: str) -> bytes:
    """Apply the rule to choices[].message of a non-streamed response body.

    Returns the same object ``body`` when nothing changes (passthrough, no
    reasoning key, not valid JSON, ...).
    """
    mode = mode_of(emit)
    if mode == PASSTHROUGH or _only_null_reasoning(body, body.rfind(NEEDLE)):
        return body
    try:
        new = rewrite_json(body, "message", mode)
    except ValueError:
        return body
    return body if new is None else new


_NULLS: Final = (b'"reasoning":null', b'"reasoning_content":null', b'"reasoning": null', b'"reasoning_content": null')


def _only_null_reasoning(body: bytes, pos: int) -> bool:
    """Every reasoning key in body has a null value (vLLM's answer without reasoning), or there is
    none: nothing to rewrite, known without a parse. pos: the last needle (or -1); the search goes
    back from needle to needle and stops at the first that is not a null pattern (one scan at most;
    a needle inside a string only makes this False)."""
    while pos >= 0:
        if not body.startswith(_NULLS, pos):
            return False
        pos = body.rfind(NEEDLE, 0, pos)
    return True


def add_request_reasoning(payload: dict[str, Any]) -> bool:
    """Copy assistant messages' "reasoning_content" string to "reasoning".

    Only where "reasoning" is absent; mutates payload in place and returns True
    if anything changed.  Tolerates malformed "messages".
    """
    messages = payload.get("messages") if isinstance(payload, dict) else None
    if not isinstance(messages, list):
        return False
    changed = False
    for msg in messages:
        if isinstance(msg, dict) and msg.get("role") == "assistant" and "reasoning" not in msg:
            text = msg.get("reasoning_content")
            if isinstance(text, str):
                msg["reasoning"] = text
                changed = True
    return changed


def needs_request_rewrite(body: bytes) -> bool:
    """Cheap pre-check: False when the request body cannot need add_request_reasoning."""
    return body.find(b'"reasoning_content"') >= 0
