"""An HTTP rule's patterns: plain words (``GET``, ``GET|HEAD``) are looked up, every
other pattern is a full-match regex, and both answer alike."""

from __future__ import annotations

import re

import pytest

from l7proxy.policy.errors import YamlPath
from l7proxy.policy.rules.http import Words, compile_rule
from parsers.requests import HttpRequest

AT = YamlPath().key("rules").key("http").index(0)
VALUES = ["GET", "get", "HEAD", "GETS", "GE", "", "M-SEARCH", "/v1/items", "/v1", "GET\n", " GET"]


@pytest.mark.parametrize("pattern", ["GET", "GET|HEAD", "M-SEARCH", "/v1/items", "a_b|c-d|/x"])
def test_plain_words_are_looked_up_with_the_answers_of_the_regex(pattern):
    rule = compile_rule({"method": pattern}, AT)

    assert rule.method == Words(pattern, str.__eq__)  # (equal by pattern alone)
    for value in VALUES:
        assert bool(rule.method.fullmatch(value)) == bool(re.fullmatch(pattern, value)), value
        assert (rule.method.fullmatch(value) is None) == (re.fullmatch(pattern, value) is None)


@pytest.mark.parametrize("pattern", ["GET|", "G.T", "GET|HEAD|", "(GET)", "[GP]ET", "GET*", ".*"])
def test_anything_else_stays_a_regex(pattern):
    rule = compile_rule({"method": pattern}, AT)

    assert isinstance(rule.method, re.Pattern) and rule.method.pattern == pattern


def test_a_rule_of_words_judges_explains_and_describes_as_before():
    rule = compile_rule({"method": "GET|HEAD", "path": "/v1/.*"}, AT)
    head = HttpRequest("HEAD", "/v1/items", "api", ())
    put = HttpRequest("PUT", "/v1/items", "api", ())

    assert rule.matches(head) and not rule.matches(put)
    assert rule.describe() == "GET|HEAD /v1/.*"
    assert rule.explain(put) == (
        "method 'PUT' does not match 'GET|HEAD'; path '/v1/items' matches '/v1/.*'"
    )
