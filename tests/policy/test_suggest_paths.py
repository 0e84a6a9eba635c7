"""Path generalisation for ``policy suggest``: what becomes a regex, and what never does.

Each case states the targets seen and the rules a reviewer should get; the
regexes are then held to what they must and must not match, the way the engine
matches them (full match).
"""

from __future__ import annotations

import random
import re
import string
import uuid
from collections import Counter

import pytest

from l7proxy.policy.suggest.paths import Bounds, escape, generalise, tokens, value_type


def regexes(targets, bounds: Bounds | None = None) -> list[str]:
    return [p.regex for p in generalise(Counter(targets), bounds or Bounds())]


def allows(rules: list[str], target: str) -> bool:
    return any(re.fullmatch(r, target) for r in rules)


def test_numeric_ids_become_one_digit_pattern_and_literal_neighbours_stay():
    seen = ["/v1/", "/v1/request-landing"] + [f"/v1/ships/{n}" for n in (7, 42, 1138, 2187)]
    rules = regexes(seen)
    assert rules == ["/v1/", "/v1/request-landing", "/v1/ships/[0-9]+"]
    assert allows(rules, "/v1/ships/99999")
    assert not allows(rules, "/v1/ships/99a")
    assert not allows(rules, "/v1/ships/")
    assert not allows(rules, "/v1/ships/1/crew")
    assert not allows(rules, "/v1/exhaust-port")


def test_too_few_distinct_ids_stay_literal():
    rules = regexes(["/v1/ships/1", "/v1/ships/2", "/v1/ships/2"])
    assert rules == ["/v1/ships/1", "/v1/ships/2"]
    assert not allows(rules, "/v1/ships/3")


def test_repeated_requests_for_one_id_are_not_several_samples():
    rules = regexes(["/orders/5"] * 500)
    assert rules == ["/orders/5"]


@pytest.mark.parametrize(
    "impostor",
    ["2fa", "123abc", "1e5", "0x1f", "12.5", "-3", "١٢٣"],  # the last: Arabic-Indic digits
)
def test_a_segment_that_looks_numeric_but_is_not_stays_literal(impostor):
    seen = [f"/v1/items/{n}" for n in (10, 20, 30)] + [f"/v1/items/{impostor}"]
    rules = regexes(seen)
    assert "/v1/items/[0-9]+" in rules
    assert escape(f"/v1/items/{impostor}") in rules
    assert len(rules) == 2
    # the impostor's neighbours are not let in by either rule
    assert not allows(rules, "/v1/items/3fa")
    assert not allows(rules, "/v1/items/124abc")


def test_v1_2fa_beside_numbers_is_not_taken_for_one():
    rules = regexes(["/v1/2fa", "/v1/1", "/v1/2", "/v1/3"])
    assert rules == ["/v1/2fa", "/v1/[0-9]+"]
    assert not allows(rules, "/v1/3fa")


def test_uuids_lower_case_are_fixed_length_hex_groups():
    ids = [str(uuid.UUID(int=random.Random(n).getrandbits(128))) for n in range(4)]
    rules = regexes([f"/api/users/{i}/profile" for i in ids])
    h = "[0-9a-f]"
    assert rules == [f"/api/users/{h}{{8}}-{h}{{4}}-{h}{{4}}-{h}{{4}}-{h}{{12}}/profile"]
    assert allows(rules, f"/api/users/{uuid.uuid4()}/profile")
    assert not allows(rules, f"/api/users/{str(uuid.uuid4()).upper()}/profile")
    assert not allows(rules, f"/api/users/{uuid.uuid4()}/settings")
    assert not allows(rules, "/api/users/not-a-uuid/profile")


def test_dates_become_a_date_pattern_and_not_numbers():
    assert value_type("2026-12-07") == "date"
    assert value_type("2026-13-07") is None  # no 13th month
    rules = regexes([f"/reports/2026-12-0{d}" for d in (1, 2, 3)])
    assert rules == ["/reports/[0-9]{4}-[0-9]{2}-[0-9]{2}"]
    assert not allows(rules, "/reports/2026-12")


def test_hex_digests_keep_their_length():
    digests = [f"{n:040x}" for n in (0xABC1, 0xDEF2, 0x1234A)]
    rules = regexes([f"/blobs/{d}" for d in digests])
    assert rules == ["/blobs/[0-9a-f]{40}"]
    assert allows(rules, "/blobs/" + "a1" * 20)
    assert not allows(rules, "/blobs/" + "a1" * 16)  # a 32-character digest was never seen


def test_short_hex_looking_words_are_not_hex():
    # "cafe", "deadbeef" (no digit) and "2fa" (too short) are words, not digests
    for word in ("cafe", "deadbeef", "2fa", "face1"):
        assert value_type(word) is None


def test_mixed_segments_generalise_each_position_on_its_own():
    seen = [
        f"/shops/{s}/orders/{o}" for s, o in [(1, 100), (2, 200), (3, 300), (1, 101), (2, 202)]
    ] + ["/shops/1/orders/latest"]
    rules = regexes(seen)
    assert rules == ["/shops/[0-9]+/orders/[0-9]+", "/shops/[0-9]+/orders/latest"]


def test_ids_under_different_parents_are_judged_apart():
    seen = [f"/a/{n}" for n in (1, 2, 3)] + ["/b/1", "/b/2"]
    rules = regexes(seen)
    assert rules == ["/a/[0-9]+", "/b/1", "/b/2"]


def test_regex_metacharacters_in_literal_segments_are_escaped():
    seen = ["/files/a.b", "/q/(x)", "/price/$5+tax", "/star/*", "/br/[1]", "/a|b", "/c^d{2}"]
    rules = regexes(seen, Bounds(min_samples=0, max_literals=0))
    for target in seen:
        assert allows(rules, target), target
    assert not allows(rules, "/files/aXb")  # the dot is a dot
    assert not allows(rules, "/q/x")
    assert not allows(rules, "/star/anything")
    assert not allows(rules, "/a")
    assert "/files/a\\.b" in rules


def test_query_parameter_names_stay_and_values_may_vary():
    seen = [f"/search?page={n}&sort=asc" for n in (1, 2, 3, 4)]
    rules = regexes(seen)
    assert rules == ["/search\\?page=[0-9]+&sort=asc"]
    assert not allows(rules, "/search?page=1&sort=desc")
    assert not allows(rules, "/search?page=1&sort=asc&admin=1")
    assert not allows(rules, "/search")


def test_tokens_keep_separators_and_query_names():
    assert tokens("/a/b?x=1&y") == (("/", "a"), ("/", "b"), ("?x=", "1"), ("&", "y"))
    assert tokens("/") == (("/", ""),)
    assert tokens("*") == (("", "*"),)


def test_thousands_of_root_paths_from_a_scanner_are_never_folded():
    rng = random.Random(7)
    words = {
        "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 10))) for _ in range(3000)
    }
    seen = [f"/{w}" for w in words] + [f"/{w}.php" for w in list(words)[:500]]
    rules = regexes(seen)
    assert len(rules) == len(seen)  # one literal rule each: the data shows no variable segment
    assert not allows(rules, "/admin-never-seen")
    assert all(".*" not in r and "[" not in r for r in rules)


def test_thousands_of_deep_unrelated_paths_do_not_collapse():
    rng = random.Random(11)

    def word() -> str:
        return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 8)))

    seen = {"/" + "/".join(word() for _ in range(rng.randint(1, 4))) for _ in range(2000)}
    rules = regexes(seen)
    # every first segment differs, so nothing below it has siblings to fold with
    assert len(rules) > 1900
    assert all(not r.startswith("/[") for r in rules)
    assert not allows(rules, "/etc/passwd")


def test_thousands_of_file_names_under_one_directory_fold_by_shape():
    rng = random.Random(3)
    names = {
        "".join(rng.choices(string.ascii_lowercase + string.digits, k=rng.randint(6, 12)))
        for _ in range(2000)
    }
    seen = [f"/static/{n}.png" for n in names] + ["/static/app.js", "/index.html"]
    rules = regexes(seen)
    assert "/static/[0-9a-z]{6,12}\\.png" in rules
    assert "/static/app\\.js" in rules and "/index\\.html" in rules
    assert len(rules) == 3
    assert not allows(rules, "/static/abcdef.php")
    assert not allows(rules, "/static/a/b.png")
    assert not allows(rules, "/static/" + "a" * 13 + ".png")


def test_bounds_switch_generalisation_off():
    seen = [f"/v1/ships/{n}" for n in range(50)]
    assert len(regexes(seen, Bounds(min_samples=0))) == 50
    assert regexes(seen, Bounds(min_samples=51)) == sorted(f"/v1/ships/{n}" for n in range(50))
    assert regexes(seen, Bounds(min_samples=50)) == ["/v1/ships/[0-9]+"]
    with pytest.raises(ValueError):
        Bounds(min_samples=1)


def test_every_generated_pattern_matches_every_target_it_came_from():
    rng = random.Random(5)
    seen = Counter()
    for _ in range(3000):
        kind = rng.randrange(4)
        if kind == 0:
            seen[f"/v2/users/{rng.randint(1, 10**6)}/posts/{rng.randint(1, 99)}"] += 1
        elif kind == 1:
            seen[f"/v2/orgs/{uuid.UUID(int=rng.getrandbits(128))}"] += 1
        elif kind == 2:
            seen[f"/v2/search?q={rng.choice(['a', 'b', 'c'])}&page={rng.randint(1, 9)}"] += 1
        else:
            seen[f"/v2/{rng.choice(['health', 'metrics', 'ready'])}"] += 1
    patterns = generalise(seen)
    assert sum(p.requests for p in patterns) == sum(seen.values())
    for p in patterns:
        compiled = re.compile(p.regex)
        assert all(compiled.fullmatch(t) for t in p.targets)
    assert len(patterns) <= 10
    assert all(".*" not in p.regex for p in patterns)


def test_a_path_of_thousands_of_segments_is_handled_without_recursion():
    deep = "/a" * 5000
    assert regexes([deep]) == [deep]


def test_many_resource_names_under_one_prefix_are_words_and_stay_literal():
    # An API with many named parts, or a scanner guessing under a known prefix: letters
    # only, of varying length, nothing fixed beside them. Folding them would allow any word.
    rng = random.Random(13)
    words = {"".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 12))) for _ in range(400)}
    rules = regexes([f"/api/{w}" for w in words])
    assert sorted(rules) == sorted(f"/api/{w}" for w in words)
    assert not allows(rules, "/api/admin")


def test_generated_values_fold_words_with_a_fixed_part_fold_too():
    rng = random.Random(17)
    handles = {f"user{n}" for n in range(990, 1040)}  # digits: generated
    codes = {"".join(rng.choices(string.ascii_lowercase, k=8)) for _ in range(50)}  # one length
    reports = {"".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 9))) for _ in range(50)}
    seen = (
        [f"/u/{h}" for h in handles]
        + [f"/invite/{c}" for c in codes]
        + [f"/reports/{r}.csv" for r in reports]
    )
    rules = regexes(seen)
    assert rules == ["/invite/[a-z]{8}", "/reports/[a-z]{4,9}\\.csv", "/u/[0-9a-z]{7,8}"]
    assert not allows(rules, "/reports/passwd")
    assert not allows(rules, "/invite/abcdefgh/accept")


def test_words_may_vary_in_a_query_value_but_not_in_the_path():
    rng = random.Random(19)
    words = sorted(
        {"".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9))) for _ in range(40)}
    )
    rules = regexes([f"/search?q={w}" for w in words])
    assert rules == ["/search\\?q=[a-z]{3,9}"]
    assert not allows(rules, "/search?q=x%27%20OR%201=1")
    assert not allows(rules, "/search/admin?q=abc")
