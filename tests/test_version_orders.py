"""Each ecosystem's own version order (registry/version_orders.py) against the ordering
examples of that ecosystem's documentation and test suites, and one offline match per
ecosystem through the SBOM path: an advisory with an ECOSYSTEM range, SBOM components just
inside and just outside its bounds."""

from __future__ import annotations

import itertools
import json
import zipfile
from pathlib import Path
from typing import Any

import pytest

from pluginmon.registry import osv
from pluginmon.registry.sboms import match_findings
from pluginmon.registry.scan_reports import parse_sbom
from pluginmon.registry.version_orders import compare, order_key


def _assert_ascending(ecosystem: str, versions: list[str]) -> None:
    """Every pair of the list compares as its positions do (a sorted list, as the reference
    test suites state them)."""
    wrong = [
        (a, b, compare(ecosystem, a, b))
        for i, a in enumerate(versions)
        for j, b in enumerate(versions)
        if compare(ecosystem, a, b) != (i > j) - (i < j)
    ]
    assert wrong == []


def _assert_pairs(ecosystem: str, pairs: list[tuple[str, str, str]]) -> None:
    expected = {"<": -1, "=": 0, ">": 1}
    got = [(a, op, b) for a, op, b in pairs if compare(ecosystem, a, b) != expected[op]]
    assert got == []


# --- Debian: Debian Policy 5.6.12 and dpkg's verrevcmp ---------------------------------------


def test_debian_tilde_sorts_before_everything_even_the_end() -> None:
    # Policy 5.6.12: "~~ < ~~a < ~ < (the empty part) < a"; 1.0~rc1 is before 1.0.
    _assert_ascending(
        "Debian", ["1.0~~", "1.0~~a", "1.0~", "1.0~rc1", "1.0~rc2", "1.0", "1.0a", "1.0+dfsg"]
    )


@pytest.mark.parametrize(
    ("a", "op", "b"),
    [
        ("1:0.5", ">", "2.0"),  # the epoch first
        ("0:1.0", "=", "1.0"),  # a missing epoch is 0
        ("1.0", "=", "1.0-0"),  # a missing revision compares like "0"
        ("1.0-1", "<", "1.0-2"),
        ("1.0-9", "<", "1.0-10"),  # digit runs as numbers
        ("1.0a", "<", "1.0+"),  # letters before non-letters
        ("1.0+dfsg", "<", "1.0.1"),  # '+' (43) before '.' (46) among non-letters
        ("1.0", "<", "1.0.0"),  # unlike SemVer, the longer one is later
        ("2.30-1", "<", "2.30-1ubuntu1"),
        ("3.0.11-1~deb12u1", "<", "3.0.11-1~deb12u2"),
        ("3.0.11-1~deb12u2", "<", "3.0.11-1"),  # a backport is before the release it backports
        ("1.2-3-4", ">", "1.2-3-3"),  # the revision is after the last hyphen
        ("1.18446744073709551616", ">", "1.18446744073709551615"),  # no int overflow
    ],
)
def test_debian_dpkg_order(a: str, op: str, b: str) -> None:
    _assert_pairs("Debian", [(a, op, b)])
    _assert_pairs("Ubuntu", [(a, op, b)])  # Ubuntu uses dpkg too


def test_debian_rejects_a_non_numeric_epoch() -> None:
    assert order_key("Debian", "x:1.0") is None
    with pytest.raises(ValueError, match=r"'x:1\.0' is not a Debian version"):
        compare("Debian", "x:1.0", "1.0")


# --- Alpine: apk-tools test/version.data ---------------------------------------------------


def test_alpine_suffixes_release_revision_and_patch_level() -> None:
    # apk's rule: pre-release suffixes (_alpha _beta _pre _rc) before the release; a revision
    # -rN after it; post-release suffixes (_cvs _svn _git _hg _p) after any revision of the
    # release, since -r stops at a later token type than a suffix.
    _assert_ascending(
        "Alpine",
        [
            "1.0_alpha",
            "1.0_alpha1",
            "1.0_beta",
            "1.0_pre1",
            "1.0_rc1",
            "1.0",
            "1.0-r1",
            "1.0-r2",
            "1.0_cvs",
            "1.0_p1",
            "1.0_p1-r1",
            "1.0a",
            "1.0.1",
        ],
    )


@pytest.mark.parametrize(
    "line",
    [  # verbatim lines of apk-tools' test/version.data
        "0.1.0_alpha_pre2 < 0.1.0_alpha",
        "1.1 > 1.1_alpha1",
        "3.1_p16 < 3.1_p17",
        "1.0_p10-r0 > 1.0_p9-r0",
        "2.2.39-r1 > 1.0.4-r3",
        "1.0.4-r3 < 1.0.4-r4",
        "2.3.0b-r1 < 2.3.0b-r2",
        "1.2.1 > 1.2",
        "0.12.3 > 0.12",
        "2.5.1-r8 < 2.5.1a-r1",
        "1.07 < 1.07.5",
        "1.02 < 1.03-r1",
        "1.0 < 1.0bc",  # invalid: the shorter one is lower
        "0.20070118 < 0.20070207_rc1",
        "1.0.0_pre20191002222144-r0 < 1.0.0_pre20210530193627-r0",
        "4.5_p1-r1 > 4.5_p1",
    ],
)
def test_alpine_apk_tools_version_data(line: str) -> None:
    a, op, b = line.split()
    _assert_pairs("Alpine", [(a, op, b)])
    _assert_pairs("Wolfi", [(a, op, b)])


# --- Maven: ComparableVersionTest and the POM reference's Version Order Specification ---------


def test_maven_qualifier_and_number_orders_of_comparable_version_test() -> None:
    # maven-artifact ComparableVersionTest VERSIONS_QUALIFIER (each < the next).
    _assert_ascending(
        "Maven",
        ["1-alpha2snapshot", "1-alpha2", "1-alpha-123", "1-beta-2", "1-beta123", "1-m2",
         "1-m11", "1-rc", "1-cr2", "1-rc123", "1-SNAPSHOT", "1", "1-sp", "1-sp2", "1-sp123",
         "1-abc", "1-def", "1-pom-1", "1-1-snapshot", "1-1", "1-2", "1-123"],
    )  # fmt: skip
    # ... and the numeric part of its VERSIONS_NUMBER (2.1-a < 2.1b: a hyphen is weaker).
    _assert_ascending(
        "Maven",
        ["2.0", "2-1", "2.0.2", "2.0.123", "2.1.0", "2.1-a", "2.1b", "2.1-c", "2.1-1",
         "2.1.0.1", "2.2", "2.123", "11.a2", "11.a11", "11.b2", "11.b11", "11.m2", "11.m11",
         "11", "11.a", "11b", "11c", "11m"],
    )  # fmt: skip


@pytest.mark.parametrize(
    "group",
    [  # ComparableVersionTest.testVersionsEqual and the POM reference ("1.ga" = "1-ga" = ...)
        ["1", "1.0", "1.0.0", "1.0-0", "1.0.0-0", "1-ga", "1.ga", "1-final", "1.0.0-RELEASE"],
        ["1a1", "1-a1", "1alpha-1", "1-alpha1", "1alpha1", "1.0-alpha-1"],
        ["1cr", "1rc", "1-CR", "1-rc"],
        ["1m3", "1milestone3", "1-m3", "1.0-MILESTONE-3"],
        ["1x", "1-x", "1.0x"],
    ],
)
def test_maven_equal_spellings(group: list[str]) -> None:
    _assert_pairs("Maven", [(group[0], "=", other) for other in group[1:]])


def test_maven_the_issue_examples() -> None:
    _assert_ascending(
        "Maven",
        ["1.0-alpha-1", "1.0-beta-1", "1.0-M1", "1.0-RC1", "1.0-SNAPSHOT", "1.0", "1.0-sp1",
         "1.0.1", "1.1"],
    )  # fmt: skip


# --- RubyGems: test/rubygems/test_gem_version.rb ------------------------------------------------


@pytest.mark.parametrize(
    ("a", "op", "b"),
    [
        ("1.0", "=", "1.0.0"),
        ("1.0", ">", "1.0.a"),  # a segment with letters is a prerelease
        ("1.8.2", ">", "0.0.0"),
        ("1.8.2", ">", "1.8.2.a"),
        ("1.8.2.b", ">", "1.8.2.a"),
        ("1.8.2.a10", ">", "1.8.2.a9"),
        ("", "=", "0"),
        ("0.beta.1", "=", "0.0.beta.1"),
        ("5.a", "<", "5.0.0.rc2"),
        ("5.x", ">", "5.0.0.rc2"),
        ("1.0.0-rc1", "<", "1.0.0"),  # "-" reads as ".pre."
        ("1.0.0-rc1", "=", "1.0.0.pre.rc1"),
        ("1.9.3", "<", "1.10.0"),
    ],
)
def test_rubygems_gem_version_order(a: str, op: str, b: str) -> None:
    _assert_pairs("RubyGems", [(a, op, b)])


# --- NuGet: "Package versioning" (learn.microsoft.com/nuget) and NuGet.Versioning -------------


def test_nuget_four_parts_and_semver2_prerelease() -> None:
    _assert_ascending(
        "NuGet",
        ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2",
         "1.0.0-beta.11", "1.0.0-rc.1", "1.0.0", "1.0.0.1", "1.0.1-aaa", "1.0.1-alpha10",
         "1.0.1-alpha2", "1.0.1-rc.2", "1.0.1-rc.10", "1.0.1", "1.1"],
    )  # fmt: skip
    _assert_pairs(
        "NuGet",
        [
            ("1.0", "=", "1.0.0.0"),  # missing parts are 0
            ("1.0.0-Beta", "=", "1.0.0-beta"),  # labels case-insensitively
            ("1.0.0+build.5", "=", "1.0.0"),  # metadata ignored
        ],
    )
    assert order_key("NuGet", "not-a-version") is None


# --- Packagist: Composer's VersionParser::normalize and PHP's version_compare -------------------


def test_packagist_stabilities_and_normalisation() -> None:
    # PHP manual (version_compare): dev < alpha = a < beta = b < RC = rc < # < pl = p.
    _assert_ascending(
        "Packagist",
        ["1.0.0-dev", "1.0.0-alpha1", "1.0.0-alpha2", "1.0.0-beta1", "1.0.0-RC1", "1.0.0",
         "1.0.0-patch1", "1.0.1", "1.10.0"],
    )  # fmt: skip
    _assert_pairs(
        "Packagist",
        [
            ("v2.0.0", "=", "2.0.0"),  # Composer drops a leading v
            ("1.0", "=", "1.0.0.0"),  # ... and pads to four numbers
            ("1.0.0-b2", "=", "1.0.0-beta2"),
            ("1.0.0-a1", "=", "1.0.0-ALPHA1"),
            ("1.0.0-rc1", "=", "1.0.0-RC1"),
            ("1.0.0-pl1", "=", "1.0.0-patch1"),
            ("1.0.0-beta.5+foo", "=", "1.0.0-beta5"),  # VersionParserTest
            ("1.0.0-stable", "=", "1.0.0"),
            ("1.0.0RC1dev", "<", "1.0.0RC1"),  # normalised 1.0.0.0-RC1-dev
            ("1.0rc1", "<", "1.0"),
        ],
    )


# --- hostile text ------------------------------------------------------------------------------

HOSTILE = ["", " ", "-", ".", ":", "~", "_", "+", "00", "1:", ":1", "-r", "1-r", "1__p", "v",
           "1²", "²", "\u0661.\u0660", "1" * 40, "1." * 30, "x" * 100, "1.0-", "1..0", "1--1", "1.0_rc",
           "1.0-r", "1.0~", "1:1:1", "1.0+", "#", "1.#", "dev-main"]  # fmt: skip


@pytest.mark.parametrize("ecosystem", ["Debian", "Alpine", "Maven", "RubyGems", "NuGet",
                                       "Packagist"])  # fmt: skip
def test_hostile_versions_give_a_key_or_none_never_an_error(ecosystem: str) -> None:
    # An SBOM's version is untrusted text: one odd version must not stop a scan.
    keys = [k for k in (order_key(ecosystem, v) for v in HOSTILE) if k is not None]
    assert keys  # most of them are versions of every ecosystem's grammar, loosely
    ordered = sorted(keys)
    assert all(a <= b for a, b in itertools.pairwise(ordered))


# --- the others keep the generic order ----------------------------------------------------------


def test_other_ecosystems_keep_the_generic_order() -> None:
    assert order_key("CRAN", "1.0-1") is None
    assert osv.version_key("1.0-1", ecosystem="CRAN").kind == "generic"
    assert osv.version_key("1.0~rc1", ecosystem="Debian:12").kind == "Debian"
    assert osv.version_key("2.15.0", ecosystem="Maven").kind == "Maven"
    # A SEMVER range stays SemVer whatever the ecosystem.
    assert osv.version_key("2.15.0", ecosystem="Maven", range_type="SEMVER").kind == "semver"


# --- end to end: an SBOM matched offline, one advisory per ecosystem --------------------------

# (ecosystem, package, purl prefix, introduced, fixed, versions inside, versions outside); each
# has a version that the generic order (registry/osv.py's fallback) places on the wrong side.
CASES: list[tuple[str, str, str, str, str, list[str], list[str]]] = [
    ("Debian:12", "openssl", "pkg:deb/debian/openssl", "0", "1:3.0.11-1~deb12u2",
     ["1:3.0.11-1~deb12u1", "3.1.0-1"],  # no epoch is epoch 0, before 1:
     ["1:3.0.11-1~deb12u2", "1:3.0.11-1", "1:3.0.11-1~deb12u2+b1"]),
    ("Alpine:v3.18", "busybox", "pkg:apk/alpine/busybox", "1.36.0", "1.36.1-r2",
     ["1.36.1_rc1-r9", "1.36.1-r1", "1.36.0"],
     ["1.36.1-r2", "1.36.1_p1", "1.36.0_rc1"]),  # _p1 is after every -rN of 1.36.1
    ("Maven", "org.apache.logging.log4j:log4j-core", "pkg:maven/org.apache.logging.log4j/log4j-core",
     "2.0-beta9", "2.15.0", ["2.0-rc1", "2.0", "2.15.0-rc2"],
     ["2.15.0", "2.15", "2.0-alpha1", "2.15.0-sp1", "2.15.0.redhat-00001"]),  # unknown: after
    ("RubyGems", "rails", "pkg:gem/rails", "7.0.0", "7.0.8.1",
     ["7.0.8", "7.0.8.1.rc1", "7.0.8.1-1", "7.0.0"],  # "-1" is a prerelease (".pre.1")
     ["7.0.8.1", "7.1.0.beta1", "7.0.0.rc1"]),
    ("NuGet", "Newtonsoft.Json", "pkg:nuget/Newtonsoft.Json", "0", "13.0.1",
     ["13.0.1-beta1", "13.0.0.1", "12.0.3"],
     ["13.0.1.0", "13.0.1+build", "13.0.2-RC1"]),  # build metadata is ignored
    ("Packagist", "symfony/http-kernel", "pkg:composer/symfony/http-kernel", "6.0.0", "6.4.1",
     ["v6.4.1-RC1", "6.4.0", "6.4", "v6.0.0"],  # Composer drops the v
     ["v6.4.1", "6.4.1-patch1", "6.0.0-beta1"]),
]  # fmt: skip


def _write_zipped_database(root: Path, doc: dict[str, Any]) -> Path:
    """As osv.dev publishes it: ``<ecosystem>/all.zip``."""
    folder = root / doc["affected"][0]["package"]["ecosystem"].split(":", 1)[0]
    folder.mkdir(parents=True)
    with zipfile.ZipFile(folder / "all.zip", "w") as archive:
        archive.writestr(f"{doc['id']}.json", json.dumps(doc))
    return root


@pytest.mark.parametrize("case", CASES, ids=[c[0].split(":", 1)[0] for c in CASES])
def test_sbom_matched_offline_in_the_ecosystems_order(
    case: tuple[str, str, str, str, str, list[str], list[str]], tmp_path: Path
) -> None:
    ecosystem, name, purl, introduced, fixed, inside, outside = case
    events = [{"introduced": introduced}, {"fixed": fixed}]
    doc = {
        "schema_version": "1.6.0",
        "id": "OSV-TEST-ORDER-1",
        "modified": "2026-11-30T00:00:00Z",
        "affected": [
            {
                "package": {"ecosystem": ecosystem, "name": name},
                "ranges": [{"type": "ECOSYSTEM", "events": events}],
            }
        ],
    }
    index = osv.load_database(_write_zipped_database(tmp_path / "osv", doc))
    sbom = {
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "version": 1,
        "components": [
            {"type": "library", "bom-ref": f"c{n}", "name": name, "version": v,
             "purl": f"{purl}@{v}"}
            for n, v in enumerate(inside + outside)
        ],
    }  # fmt: skip
    components = parse_sbom(sbom).components
    assert [c.version for c in components] == inside + outside
    findings = match_findings(index, components)
    assert sorted(f.package_version for f in findings) == sorted(inside)
    assert {(f.vulnerability_id, f.fixed_version) for f in findings} == {
        ("OSV-TEST-ORDER-1", fixed)
    }
    # The case tells the orders apart: the generic order misplaces one of its versions.
    vrange = osv.VersionRange(
        "ECOSYSTEM", tuple(osv.Event(k, v) for e in events for k, v in e.items())
    )
    generic = {v for v in inside + outside if osv.in_range(v, vrange, ecosystem="no-such-order")}
    assert generic != set(inside)
