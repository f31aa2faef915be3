"""Planning buckets: the store is a host default that forces replacement, and removing a
bucket says what a delete destroys (or that the store will refuse it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from reconciler.loader import load
from reconciler.planner import Action, plan
from reconciler.state import Observation
from test_planner_volumes import _applied, _by_id, _doc

BUCKET = "Bucket/acme/logs"
DEFAULTS = {"Bucket": {"store": "local"}}


@pytest.fixture
def load_docs(write_manifests: Callable[..., Path]) -> Callable[[list[dict]], Any]:
    def go(docs: list[dict]) -> Any:
        files = {f"{i}.yaml": yaml.safe_dump(d, sort_keys=False) for i, d in enumerate(docs)}
        desired, problems = load([write_manifests(files)])
        assert problems == [], [str(p) for p in problems]
        return desired
    return go


def _docs(bucket: dict | None) -> list[dict]:
    docs = [_doc("Tenant", "acme", {})]
    if bucket is not None:
        docs.append(_doc("Bucket", "logs", bucket))
    return docs


def test_the_store_is_filled_in_and_moving_a_retained_bucket_is_refused(load_docs) -> None:
    first = plan(load_docs(_docs({"acl": "private"})), Observation(), defaults=DEFAULTS)
    assert _by_id(first)[BUCKET].target.spec["store"] == "local"
    again = plan(load_docs(_docs({"acl": "private"})), Observation(owned=_applied(first)), defaults=DEFAULTS)
    assert not again.actionable
    moved = plan(load_docs(_docs({"store": "aws"})), Observation(owned=_applied(first)), defaults=DEFAULTS)
    assert _by_id(moved)[BUCKET].action is Action.REPLACE
    (problem,) = moved.errors
    assert problem.path == "spec.store" and "destroy its data" in problem.message


@pytest.mark.parametrize("purge, data, warning", [
    (True, "3 objects, 12.0 KiB", "holds data (3 objects, 12.0 KiB): deleting destroys it for good"),
    (False, "3 objects, 12.0 KiB", "holds 3 objects, 12.0 KiB and purgeOnDelete is false: the store deletes "
                                   "only empty buckets, so this delete will fail"),
    (True, "empty", None),
    (False, "empty", None),
])
def test_removing_a_bucket_says_what_the_delete_destroys(load_docs, purge: bool, data: str,
                                                         warning: str | None) -> None:
    spec = {"deletionPolicy": "Delete", "purgeOnDelete": purge}
    first = plan(load_docs(_docs(spec)), Observation(), defaults=DEFAULTS)
    gone = plan(load_docs(_docs(None)), Observation(owned=_applied(first, {BUCKET: {"data": data}})),
                defaults=DEFAULTS)
    change = _by_id(gone)[BUCKET]
    assert change.action is Action.DELETE
    assert ("purgeOnDelete: its objects are deleted first" in change.notes) is purge
    if warning is None:
        assert not change.warnings
    else:
        assert warning in change.warnings[0]


def test_a_retained_bucket_is_orphaned_with_its_objects(load_docs) -> None:
    first = plan(load_docs(_docs({"acl": "public-read"})), Observation(), defaults=DEFAULTS)
    gone = plan(load_docs(_docs(None)), Observation(owned=_applied(first, {BUCKET: {"data": "1 object, 5 B"}})),
                defaults=DEFAULTS)
    change = _by_id(gone)[BUCKET]
    assert change.action is Action.ORPHAN and not change.warnings
