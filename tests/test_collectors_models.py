"""The collectors' records: PluginKey's cached hash, PluginSample built without frozen's cost."""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
from datetime import UTC, datetime

import pytest

from pluginmon.collectors.models import PluginKey, PluginSample


def test_a_plugin_key_hashes_and_compares_by_its_three_labels() -> None:
    key = PluginKey("acme", "resizer", "staging")
    same = PluginKey(tenant="acme", plugin="resizer", environment="staging")
    assert key == same
    assert hash(key) == hash(same)
    assert hash(key) == hash(("acme", "resizer", "staging"))
    assert {key: 1}[same] == 1
    assert PluginKey("acme", "resizer") != key
    assert PluginKey("acme", "resizer").environment == "production"
    # Order and repr are the labels' only.
    assert sorted([PluginKey("b", "a"), PluginKey("a", "z"), PluginKey("a", "b")]) == [
        PluginKey("a", "b"),
        PluginKey("a", "z"),
        PluginKey("b", "a"),
    ]
    assert repr(key) == "PluginKey(tenant='acme', plugin='resizer', environment='staging')"


def test_a_copied_or_unpickled_plugin_key_is_the_same_key() -> None:
    key = PluginKey("acme", "resizer", "staging")
    for other in (copy.copy(key), copy.deepcopy(key), pickle.loads(pickle.dumps(key))):  # noqa: S301 (our own bytes)
        assert other == key
        assert hash(other) == hash(key)
        assert {key: "found"}[other] == "found"


class LabelledKey(PluginKey):
    """A subclass (none in pluginmon): copies keep the class, so they compare equal."""


def test_a_copied_subclass_key_keeps_its_class() -> None:
    key = LabelledKey("acme", "resizer")
    for other in (copy.copy(key), pickle.loads(pickle.dumps(key))):  # noqa: S301 (our own bytes)
        assert type(other) is LabelledKey
        assert other == key


def test_a_plugin_key_pickled_in_another_process_hashes_as_one_made_here() -> None:
    # str hashes are salted per process: a hash carried in the pickle would find nothing.
    code = (
        "import pickle, sys; from pluginmon.collectors.models import PluginKey; "
        "sys.stdout.buffer.write(pickle.dumps(PluginKey('acme', 'resizer', 'staging')))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    data = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, env=env
    ).stdout
    key = pickle.loads(data)  # noqa: S301 (our own child's bytes)
    assert hash(key) == hash(("acme", "resizer", "staging"))
    assert {PluginKey("acme", "resizer", "staging"): "found"}[key] == "found"


def test_a_key_cannot_be_changed_and_a_sample_is_not_hashed() -> None:
    key = PluginKey("acme", "resizer")
    with pytest.raises(AttributeError):
        key.plugin = "other"  # type: ignore[misc]

    def sample() -> PluginSample:
        return PluginSample(
            key=key,
            timestamp=datetime(2026, 12, 2, tzinfo=UTC),
            up=True,
            process_count=1,
            cpu_percent=2.5,
            rss_bytes=10,
            vms_bytes=20,
            threads=3,
        )

    one = sample()
    assert (one.key, one.cpu_percent, one.pids, one.uss_bytes) == (key, 2.5, (), None)
    assert one == sample()
    assert one is not sample()
    # Slots: no attribute can be added by mistake (mypy --strict refuses assignments).
    with pytest.raises(AttributeError):
        one.extra = 1  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        hash(one)
