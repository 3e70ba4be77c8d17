"""registry.semver against node-semver's README: its table of ranges and what each means
(desugared), its prerelease examples, and satisfies() on both sides of every bound."""

from __future__ import annotations

import pytest

from pluginmon.registry.errors import InvalidError
from pluginmon.registry.semver import common_version, parse_range, parse_version, satisfies

# node-semver README, "Advanced Range Syntax": every range in the hyphen, x-range, tilde and
# caret sections with the primitive comparators it is documented to mean (node-semver 7 form,
# upper bounds ending in -0). Checked line by line against npm/node-semver's README at commit
# 6e05b76 (2026-06): every `X := Y` entry of those sections is here; its `*` := `>=0.0.0`
# (any release) is kept as `*`, which parse_range treats the same way.
README_TABLE = [
    # Hyphen Ranges X.Y.Z - A.B.C
    ("1.2.3 - 2.3.4", ">=1.2.3 <=2.3.4"),
    ("1.2 - 2.3.4", ">=1.2.0 <=2.3.4"),
    ("1.2.3 - 2.3", ">=1.2.3 <2.4.0-0"),
    ("1.2.3 - 2", ">=1.2.3 <3.0.0-0"),
    # X-Ranges 1.2.x 1.X 1.2.* *
    ("*", "*"),
    ("1.x", ">=1.0.0 <2.0.0-0"),
    ("1.2.x", ">=1.2.0 <1.3.0-0"),
    ("", "*"),
    ("1", ">=1.0.0 <2.0.0-0"),
    ("1.2", ">=1.2.0 <1.3.0-0"),
    # Tilde Ranges ~1.2.3 ~1.2 ~1
    ("~1.2.3", ">=1.2.3 <1.3.0-0"),
    ("~1.2", ">=1.2.0 <1.3.0-0"),
    ("~1", ">=1.0.0 <2.0.0-0"),
    ("~0.2.3", ">=0.2.3 <0.3.0-0"),
    ("~0.2", ">=0.2.0 <0.3.0-0"),
    ("~0", ">=0.0.0 <1.0.0-0"),
    ("~1.2.3-beta.2", ">=1.2.3-beta.2 <1.3.0-0"),
    # Caret Ranges ^1.2.3 ^0.2.5 ^0.0.4
    ("^1.2.3", ">=1.2.3 <2.0.0-0"),
    ("^0.2.3", ">=0.2.3 <0.3.0-0"),
    ("^0.0.3", ">=0.0.3 <0.0.4-0"),
    ("^1.2.3-beta.2", ">=1.2.3-beta.2 <2.0.0-0"),
    ("^0.0.3-beta", ">=0.0.3-beta <0.0.4-0"),
    ("^1.2.x", ">=1.2.0 <2.0.0-0"),
    ("^0.0.x", ">=0.0.0 <0.1.0-0"),
    ("^0.0", ">=0.0.0 <0.1.0-0"),
    ("^1.x", ">=1.0.0 <2.0.0-0"),
    ("^0.x", ">=0.0.0 <1.0.0-0"),
]


@pytest.mark.parametrize(
    ("text", "meaning"), README_TABLE, ids=[t or '""' for t, _ in README_TABLE]
)
def test_readme_table_desugars_as_documented(text: str, meaning: str) -> None:
    assert parse_range(text).desugared == meaning


@pytest.mark.parametrize(
    ("text", "meaning"), README_TABLE, ids=[t or '""' for t, _ in README_TABLE]
)
def test_readme_table_ranges_satisfy_what_their_meaning_does(text: str, meaning: str) -> None:
    # Versions around every bound of the table, each judged by the range and by its meaning.
    probes = [
        "0.0.0", "0.0.3", "0.0.4", "0.1.0", "0.2.3", "0.2.9", "0.3.0", "0.9.9", "1.0.0",
        "1.2.0", "1.2.2", "1.2.3", "1.2.4", "1.3.0", "1.9.9", "2.0.0", "2.3.4", "2.3.5",
        "2.4.0", "2.9.9", "3.0.0", "1.2.3-beta.2", "1.2.3-beta.4", "1.2.3-alpha", "0.0.3-pr.2",
        "1.2.4-beta.2", "2.0.0-0", "3.0.0-rc.1",
    ]  # fmt: skip
    desugared = parse_range(meaning if meaning != "*" else "")
    for probe in probes:
        assert satisfies(probe, text) == desugared.satisfied_by(parse_version(probe)), probe


SATISFIES = [
    # README "Usage"
    ("1.2.3", "1.x || >=2.5.0 || 5.0.0 - 7.2.3", True),
    # Ranges: prereleases are not "less than" a plain upper bound's tuple, nor "equal"
    ("1.2.3-beta", ">=1.2.3", False),
    ("2.3.0-beta", ">=1.2.3", False),
    ("1.2.3", "1.2.3+build2012", True),
    ("1.2.3+build2012", "1.2.3", True),
    # Prerelease Tags: >1.2.3-alpha.3 allows 1.2.3-alpha.7, not 3.4.5-alpha.9, yes 3.4.5
    ("1.2.3-alpha.7", ">1.2.3-alpha.3", True),
    ("3.4.5-alpha.9", ">1.2.3-alpha.3", False),
    ("3.4.5", ">1.2.3-alpha.3", True),
    ("1.2.3-alpha.3", ">1.2.3-alpha.3", False),
    # Tilde/caret prerelease notes
    ("1.2.3-beta.4", "~1.2.3-beta.2", True),
    ("1.2.4-beta.2", "~1.2.3-beta.2", False),
    ("1.2.3-beta.4", "^1.2.3-beta.2", True),
    ("1.2.4-beta.2", "^1.2.3-beta.2", False),
    ("0.0.3-pr.2", "^0.0.3-beta", True),
    ("0.0.4", "^0.0.3-beta", False),
    # * and x match releases only
    ("1.0.0-rc.1", "*", False),
    ("42.0.0", "*", True),
    # operators on partial versions (replaceXRange) and spaces after an operator
    ("2.0.0", ">1", True),
    ("1.9.9", ">1", False),
    ("1.3.0", ">1.2", True),
    ("1.2.9", ">1.2", False),
    ("1.9.9", "<=1", True),
    ("2.0.0", "<=1", False),
    ("0.9.9", "<1", True),
    ("1.0.0", "<1", False),
    ("1.2.3", ">= 1.2.3 < 2", True),
    ("2.0.0", ">= 1.2.3 < 2", False),
    ("1.2.4", "~>1.2.3", True),
    ("1.0.0", ">*", False),
    ("1.2.5", "v1.2.5", True),
]


@pytest.mark.parametrize(("version", "text", "expected"), SATISFIES)
def test_satisfies(version: str, text: str, expected: bool) -> None:
    assert satisfies(version, text) is expected


def test_version_precedence_is_semver_2() -> None:
    ordered = [
        "1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2",
        "1.0.0-beta.11", "1.0.0-rc.1", "1.0.0", "1.0.1", "1.1.0", "2.0.0",
    ]  # fmt: skip
    parsed = [parse_version(v) for v in ordered]
    assert sorted(reversed(parsed)) == parsed
    assert [str(v) for v in parsed] == ordered


@pytest.mark.parametrize(
    "bad", ["^1.2.3.4", ">=a.b", "1.2.3 -", "~", "latest", "1.2.3 - 2.0.0 - 3"]
)
def test_bad_ranges_name_the_field_and_the_part(bad: str) -> None:
    with pytest.raises(InvalidError) as caught:
        parse_range(bad)
    assert caught.value.field == "version_range"
    assert "version_range" in caught.value.message


def test_common_version_finds_a_witness_or_none() -> None:
    def common(*texts: str) -> str | None:
        found = common_version([parse_range(t) for t in texts])
        return None if found is None else str(found)

    assert common("^1.2.0", "~1.4.0") == "1.4.0"
    assert common("^1.0.0", "^2.0.0") is None
    assert common(">=1.5.0", "1.x || 3.x") == "1.5.0"
    assert common("<1.0.0", ">=1.0.0") is None
    # an interval with no release and no prerelease the ranges opted into
    assert common(">1.0.0", "<1.0.1-0") is None
    # each range applies the prerelease rule itself: "<1.0.0" never admits 1.0.0-beta
    assert common(">=1.0.0-beta", "<1.0.0") is None
    assert common(">=1.0.0-beta", ">=1.0.0-alpha <=1.0.0-rc.1") == "1.0.0-beta"
    # pairwise compatible, all three together not (unions break Helly's property)
    assert common("1.x || 2.x", "2.x || 3.x", "1.x || 3.x") is None
    assert common("*", "^0.0.3") == "0.0.3"
