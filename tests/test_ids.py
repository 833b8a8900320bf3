"""The id pattern (docs/security.md): ids are spliced into Redis names, so exactly `^[A-Za-z0-9._@|+-]{1,128}$`
passes."""

from __future__ import annotations

import re
import string

import pytest

from quart_sse.ids import ID_PATTERN, is_valid_id

ALLOWED = string.ascii_letters + string.digits + "._@|+-"


@pytest.mark.parametrize("ch", list(ALLOWED))
def test_every_allowed_char_alone_is_an_id(ch: str) -> None:
    assert is_valid_id(ch)


def test_all_allowed_chars_together() -> None:
    assert is_valid_id(ALLOWED)


def test_length_bounds() -> None:
    assert is_valid_id("a" * 128)
    assert not is_valid_id("a" * 129)
    assert not is_valid_id("")


@pytest.mark.parametrize("bad", [
    "a:b",  # would splice another channel name: {app}:channel:{user}
    "a*", "a?", "a[b]", "a]", "a b", " a", "a ", "a\n", "a\r", "a\x00", "a\t", "a/b", "a\\b", "a{b}", "a,b",
    "a#b", "a%b", "a'b", 'a"b', "é", "a\u00a0", "\u0661",  # non-ASCII letters and digits are not ids
])
def test_refused_chars(bad: str) -> None:
    assert not is_valid_id(bad)


def test_trailing_newline_is_not_let_through_by_dollar() -> None:
    """`re.match(r'...$')` accepts 'abc\\n'; the check must not."""
    assert not is_valid_id("abc\n")


@pytest.mark.parametrize("value", [None, 1, 1.5, b"abc", ["abc"], {"a": 1}, True])
def test_non_str_refused(value: object) -> None:
    assert not is_valid_id(value)


def test_published_pattern_agrees_with_the_check() -> None:
    """ID_PATTERN is quoted in error messages and docs; it must say what the check does."""
    pattern = re.compile(ID_PATTERN)
    for value in [ALLOWED, "a" * 128, "a" * 129, "", "a:b", "a b", "é"]:
        assert (pattern.fullmatch(value) is not None) == is_valid_id(value), value
