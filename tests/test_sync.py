"""Sync: path safety and manifests (properties), and pulling real run directories over SSH."""

from __future__ import annotations

import hashlib
import json
import posixpath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.errors import UserError
from runner.sync import Manifest, ManifestEntry, UnsafePath, parse_manifest, safe_relpath

# --------------------------------------------------------------------------- path safety

segment = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\"),
                  min_size=1, max_size=12).filter(lambda s: s not in (".", "..") and not s.startswith("~"))
safe_paths = st.lists(segment, min_size=1, max_size=5).map("/".join)


@given(st.text(max_size=40))
def test_safe_relpath_never_lets_a_path_leave_its_directory(path):
    try:
        clean = safe_relpath(path)
    except UnsafePath:
        return
    joined = posixpath.normpath(posixpath.join("/run", clean))
    assert joined.startswith("/run/")
    assert ".." not in clean.split("/")
    assert not clean.startswith("/")


@given(safe_paths)
def test_safe_relpath_keeps_plain_relative_paths(path):
    assert safe_relpath(path) == path


@given(st.lists(segment, max_size=3), st.lists(segment, max_size=3))
def test_safe_relpath_refuses_any_dotdot_component(before, after):
    with pytest.raises(UnsafePath):
        safe_relpath("/".join([*before, "..", *after]))


@given(safe_paths)
def test_safe_relpath_refuses_absolute_and_home_paths(path):
    for bad in ("/" + path, "~/" + path, "//" + path):
        with pytest.raises(UnsafePath):
            safe_relpath(bad)


@pytest.mark.parametrize("path", ["", ".", "./", "a\\..\\b", "a\x00b", "a\nb", "../x", "a/../../x"])
def test_safe_relpath_refuses_odd_paths(path):
    with pytest.raises(UnsafePath):
        safe_relpath(path)


# --------------------------------------------------------------------------- manifests

digests = st.binary(min_size=1, max_size=8).map(lambda b: hashlib.sha256(b).hexdigest())
entries = st.lists(st.tuples(safe_paths.filter(lambda p: p != "manifest.json"),
                             st.integers(0, 2**40), digests),
                   max_size=8, unique_by=lambda e: e[0])


@given(entries)
def test_manifest_round_trips(items):
    text = json.dumps({"step": 7, "files": [{"path": p, "size": n, "sha256": d} for p, n, d in items]})
    assert parse_manifest(text) == Manifest(tuple(ManifestEntry(p, n, d) for p, n, d in items))


@given(entries.filter(bool), st.sampled_from(["../evil", "/etc/passwd", "a/../../b", "~/x", "ok/../.."]))
def test_manifest_naming_a_path_outside_is_refused(items, bad):
    files = [{"path": p, "size": n, "sha256": d} for p, n, d in items]
    files[0]["path"] = bad
    with pytest.raises(UserError, match="refused"):
        parse_manifest(json.dumps({"files": files}), where="checkpoints/step-1/manifest.json")


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=4),
                           max_leaves=12)


@settings(max_examples=300)
@given(st.one_of(json_values, st.fixed_dictionaries({"files": st.lists(
    st.dictionaries(st.sampled_from(["path", "size", "sha256", "x"]), json_values, max_size=4), max_size=3)})))
def test_manifest_parser_accepts_or_explains_any_json(value):
    try:
        manifest = parse_manifest(json.dumps(value))
    except UserError as exc:
        assert exc.file == "manifest.json"
        return
    for entry in manifest.entries:
        assert safe_relpath(entry.path) == entry.path
        assert entry.size_bytes >= 0 and len(entry.sha256) == 64


@pytest.mark.parametrize("text", ["not json", b"\xff\xfe", "[]", '{"files": {}}',
                                  '{"files": [{"path": "a", "size": -1, "sha256": "' + "0" * 64 + '"}]}',
                                  '{"files": [{"path": "a", "size": 1, "sha256": "xyz"}]}',
                                  '{"files": [{"path": "a", "size": true, "sha256": "' + "0" * 64 + '"}]}'])
def test_malformed_manifests_are_refused_with_the_file_named(text):
    with pytest.raises(UserError) as caught:
        parse_manifest(text, where="checkpoints/step-1/manifest.json")
    assert caught.value.file == "checkpoints/step-1/manifest.json"
