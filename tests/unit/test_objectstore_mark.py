"""The object store's ownership payload on Swift container metadata: chunks that fit
Swift's 256-byte values, read back whole, and damage that is not taken for a mark."""

from __future__ import annotations

from hypothesis import given, strategies as st

from reconciler.drivers.objectstore._common import (
    CHUNK, Found, data_of, decode_payload, encode_items, is_ours_key, make_payload,
)


@given(st.dictionaries(st.text(min_size=1, max_size=20), st.text(max_size=300), max_size=40))
def test_items_round_trip_and_fit_swift_values(applied: dict[str, str]) -> None:
    payload = make_payload("ab12cd34", {"kind": "Bucket", "tenant": "t", "name": "n", "specHash": "x",
                                        "applied": applied}, {"deletionPolicy": "Delete", "acl": "private"})
    items = encode_items(payload)
    assert items["rc-home"] == "ab12cd34"
    assert all(len(v) <= CHUNK <= 256 and is_ours_key(k) for k, v in items.items())
    assert decode_payload(items) == payload
    assert payload["spec"] == {"deletionPolicy": "Delete"}  # only what the store cannot show


def test_a_damaged_or_missing_mark_is_no_mark() -> None:
    items = encode_items(make_payload("h", {"kind": "Bucket"}, {}))
    assert decode_payload({}) is None
    assert decode_payload({"rc-home": "h"}) is None
    assert decode_payload({**items, "rc-mark-0": items["rc-mark-0"][:-5] + "AAAAA"}) is None
    assert decode_payload({"rc-mark-0": "not base64 !"}) is None


def test_data_says_what_a_delete_destroys() -> None:
    assert data_of(Found("t", "b", "a", None, objects=0, bytes=0)) == "empty"
    assert data_of(Found("t", "b", "a", None, objects=1, bytes=5)) == "1 object, 5 B"
    assert data_of(Found("t", "b", "a", None, objects=3, bytes=12 * 1024)) == "3 objects, 12.0 KiB"
    assert data_of(Found("t", "b", "a", None, objects=None, bytes=None)) == "unknown"
