"""The Bucket contract, against the in-memory driver and the object store driver's two
real stores: Swift (python-swiftclient) and S3 (boto3, against Swift's s3api), both on
the Swift all-in-one that scripts/setup-swift.sh starts.

What the drivers did is checked with plain swiftclient and boto3 sessions of the test's
own (tests/objstore.py), never with the driver's code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

import pytest
import swiftclient
from botocore.exceptions import ClientError

import objstore
from contract.conftest import target
from reconciler.errors import Conflict, PermanentError, TransientError
from reconciler.models import Key
from reconciler.state import Observed


class MemoryBuckets:
    name = "memory"
    holds_objects = False
    quotas = True
    metadata = True

    def __init__(self, root: Path, tenant: str):
        from reconciler.drivers.memory import MemoryDriver

        self.root = root / "memory"
        self.tenant = tenant
        self.driver = MemoryDriver(self.root, kinds=("Bucket",))

    def bucket(self, base: str) -> str:
        return base

    def _file(self, name: str) -> Path:
        return self.root / "Bucket" / f"{self.driver.host_name(Key('Bucket', self.tenant, name))}.json"

    def unowned(self, name: str) -> str:
        path = self._file(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"spec": {"metadata": {"foo": "bar"}}}))
        return self.driver.host_name(Key("Bucket", self.tenant, name))

    def view(self, name: str) -> dict[str, Any] | None:
        if not self._file(name).exists():
            return None
        data = json.loads(self._file(name).read_text())
        spec = data["spec"]
        return {"acl": spec.get("acl", "private"), "versioning": bool(spec.get("versioning")),
                "metadata": dict(spec.get("metadata") or {}), "marked": "mark" in data,
                "quota": spec.get("quota") or {"bytes": None, "objects": None}}

    def cleanup(self) -> None:
        """Nothing: its files live in pytest's tmp_path."""


class SwiftBuckets:
    """Reseller mode: the tenant's account is AUTH_<tenant>, reached by the admin."""

    name = "swift"
    holds_objects = True
    quotas = True
    metadata = True

    def __init__(self, root: Path, tenant: str, home: str | None = None, key: str = "admin",
                 auth_url: str = objstore.AUTH_URL):
        from reconciler.drivers.objectstore import ObjectStoreDriver, Registry, SwiftStore

        self.tenant = tenant
        self.account = "AUTH_" + tenant
        self.home = home or hashlib.sha256(str(root).encode()).hexdigest()[:8]
        self.store = SwiftStore("local", auth_url=auth_url, user=objstore.ADMIN[0], key=key,
                                reseller_prefix="AUTH_", credentials={},
                                registry=Registry(root / "objectstore" / "local.json"), home=self.home,
                                timeout_s=10)
        self.driver = ObjectStoreDriver({"local": self.store}, "local", self.home)
        self.c = objstore.conn(objstore.ADMIN, self.account)

    def bucket(self, base: str) -> str:
        return base

    def unowned(self, name: str) -> str:
        self.c.put_container(name, headers={"X-Container-Meta-Foo": "bar"})
        return f"local:{self.tenant}/{name}"

    def view(self, name: str) -> dict[str, Any] | None:
        try:
            h = self.c.head_container(name)
        except swiftclient.ClientException as exc:
            assert exc.http_status == 404, exc
            return None
        meta = {k[len("x-container-meta-"):]: v for k, v in h.items() if k.startswith("x-container-meta-")}
        user = {k: v for k, v in meta.items() if not k.startswith("rc-") and not k.startswith("quota-")}
        read = h.get("x-container-read", "")
        return {"acl": "public-read" if read == ".r:*,.rlistings" else ("private" if not read else read),
                "versioning": h.get("x-versions-enabled", "").lower() == "true",
                "metadata": user, "marked": "rc-home" in meta,
                "quota": {"bytes": _int(meta.get("quota-bytes")), "objects": _int(meta.get("quota-count"))}}

    def put(self, name: str, obj: str, data: bytes) -> None:
        self.c.put_object(name, obj, data)

    def set_meta(self, name: str, key: str, value: str) -> None:
        self.c.post_container(name, {f"X-Container-Meta-{key}": value})

    def objects(self, name: str) -> list[str]:
        _, listing = self.c.get_container(name, full_listing=True)
        return [o["name"] for o in listing]

    def cleanup(self) -> None:
        objstore.remove_account(self.account)


class S3Buckets:
    """Swift's s3api as the S3 endpoint, with the tenant's own keys (test:tester). s3api
    has no bucket tagging and does not show canned ACLs in grants (the store is told so),
    so the ACL is checked on the Swift side of the same container."""

    name = "s3"
    holds_objects = True
    quotas = False
    metadata = False

    def __init__(self, root: Path, tenant: str, home: str | None = None, secret: str = objstore.TEST[1],
                 endpoint: str = objstore.PROXY):
        from reconciler.drivers.objectstore import ObjectStoreDriver, Registry, S3Store

        self.tenant = tenant
        self.home = home or hashlib.sha256(str(root).encode()).hexdigest()[:8]
        self.store = S3Store("s3", endpoint=endpoint, region="us-east-1", addressing="path",
                             credentials={tenant: (objstore.TEST[0], secret)},
                             registry=Registry(root / "objectstore" / "s3.json"), home=self.home, timeout_s=10,
                             tagging=False, readable_acl=False)
        self.driver = ObjectStoreDriver({"s3": self.store}, "s3", self.home)
        self.s3 = objstore.s3(objstore.TEST)
        self.made: list[str] = []

    def bucket(self, base: str) -> str:
        name = f"{self.tenant}-{base}"  # the account (AUTH_test) is shared: unique names
        self.made.append(name)
        return name

    def unowned(self, name: str) -> str:
        self.s3.create_bucket(Bucket=name)
        return f"s3:{self.tenant}/{name}"

    def view(self, name: str) -> dict[str, Any] | None:
        try:
            self.s3.head_bucket(Bucket=name)
        except ClientError:
            return None
        try:
            self.s3.head_object(Bucket=name, Key=".reconciler-mark")
            marked = True
        except ClientError:
            marked = False
        read = objstore.conn(objstore.TEST).head_container(name).get("x-container-read", "")
        status = self.s3.get_bucket_versioning(Bucket=name).get("Status")
        return {"acl": "public-read" if ".r:*" in read else "private", "versioning": status == "Enabled",
                "metadata": {}, "marked": marked, "quota": {"bytes": None, "objects": None}}

    def put(self, name: str, obj: str, data: bytes) -> None:
        self.s3.put_object(Bucket=name, Key=obj, Body=data)

    def objects(self, name: str) -> list[str]:
        return [o["Key"] for o in self.s3.list_objects_v2(Bucket=name).get("Contents", [])
                if o["Key"] != ".reconciler-mark"]

    def cleanup(self) -> None:
        c = objstore.conn(objstore.TEST)
        for name in self.made:
            objstore.empty_container(c, name)


def _int(value: str | None) -> int | None:
    return int(value) if value else None


def _make(kind: str, root: Path) -> Any:
    tenant = objstore.unique()
    if kind == "memory":
        return MemoryBuckets(root, tenant)
    objstore.require_swift()
    return SwiftBuckets(root, tenant) if kind == "swift" else S3Buckets(root, tenant)


@pytest.fixture(params=["memory", "swift", "s3"])
def buckets(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    h = _make(request.param, tmp_path)
    try:
        yield h
    finally:
        h.cleanup()


@pytest.fixture(params=["swift", "s3"])
def real(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    h = _make(request.param, tmp_path)
    try:
        yield h
    finally:
        h.cleanup()


@pytest.fixture
def swift(tmp_path: Path) -> Iterator[Any]:
    """The swift store alone (what S3 has not: container quotas)."""
    h = _make("swift", tmp_path)
    try:
        yield h
    finally:
        h.cleanup()


def bucket_target(h: Any, name: str, **fields: Any) -> Any:
    if h.name != "memory":
        fields.setdefault("store", h.name if h.name == "s3" else "local")
    return target("Bucket", h.tenant, name, **fields)


def owned(h: Any) -> dict[Key, Observed]:
    return {o.key: o for o in h.driver.observe().owned}


# --- the contract -----------------------------------------------------------------------

def test_create_then_observe_round_trips(buckets: Any) -> None:
    name = buckets.bucket("site")
    fields: dict[str, Any] = {"acl": "public-read", "versioning": True}
    if buckets.metadata:
        fields["metadata"] = {"owner": "web-team"}
    if buckets.quotas:
        fields["quota"] = {"bytes": 1048576, "objects": 10}
    t = bucket_target(buckets, name, **fields)
    created = buckets.driver.create(t)
    assert dict(created.spec) == dict(t.spec)
    found = owned(buckets)[t.key]
    assert dict(found.spec) == dict(t.spec)
    assert found.mark.spec_hash == t.mark.spec_hash and not found.mark.orphaned
    view = buckets.view(name)
    assert view is not None and view["marked"]
    assert view["acl"] == "public-read" and view["versioning"] is True
    assert view["metadata"] == fields.get("metadata", {})
    if buckets.quotas:
        assert view["quota"] == {"bytes": 1048576, "objects": 10}


def test_update_in_place_leaves_metadata_of_others(buckets: Any) -> None:
    """acl and versioning change in place everywhere; metadata where the store has it
    (this S3 endpoint has no bucket tagging: test_s3_plan_time_problems refuses it)."""
    name = buckets.bucket("logs")
    meta = buckets.metadata
    first = bucket_target(buckets, name, acl="public-read", versioning=True,
                          metadata={"a": "1", "b": "2"} if meta else {})
    obs = buckets.driver.create(first)
    if meta and buckets.name != "memory":
        buckets.set_meta(name, "someone-else", "theirs")
        obs = owned(buckets)[first.key]
    second = bucket_target(buckets, name, acl="private", versioning=False,
                           metadata={"b": "3", "c": "4"} if meta else {})
    after = buckets.driver.update(second, obs, [])
    view = buckets.view(name)
    assert view["acl"] == "private" and view["versioning"] is False
    expected = {"b": "3", "c": "4"} if meta else {}
    if meta and buckets.name != "memory":
        expected["someone-else"] = "theirs"  # never ours: never removed
    assert view["metadata"] == expected
    assert after.mark.spec_hash == second.mark.spec_hash
    assert dict(owned(buckets)[first.key].spec) == dict(after.spec)


def test_quota_set_and_removed(swift: Any) -> None:
    """Swift's container quotas (S3 has none: test_s3_plan_time_problems refuses them)."""
    real = swift
    name = real.bucket("q")
    obs = real.driver.create(bucket_target(real, name, quota={"bytes": 10, "objects": 1}))
    assert real.view(name)["quota"] == {"bytes": 10, "objects": 1}
    with pytest.raises(swiftclient.ClientException) as refused:
        real.put(name, "big", b"12345678901")  # one object past the bytes quota
    assert refused.value.http_status == 413  # the store itself enforces it
    real.driver.update(bucket_target(real, name, quota={"objects": 5}), obs, [])
    assert real.view(name)["quota"] == {"bytes": None, "objects": 5}
    real.put(name, "big", b"12345678901")


def test_an_object_without_our_mark_is_reported_and_never_touched(buckets: Any) -> None:
    """In an account the store knows (a tenant with credentials, or one it has made
    buckets in): a container in the way in an account never used before is found by the
    create (a Conflict), not by observe."""
    buckets.driver.create(bucket_target(buckets, buckets.bucket("first")))
    name = buckets.bucket("taken")
    host_name = buckets.unowned(name)
    key = Key("Bucket", buckets.tenant, name)
    found = buckets.driver.observe()
    assert key not in {o.key for o in found.owned}
    assert host_name in {u.host_name for u in found.unowned}
    assert buckets.driver.host_name(key) == host_name
    with pytest.raises(Conflict):
        buckets.driver.create(bucket_target(buckets, name, acl="public-read"))
    view = buckets.view(name)
    assert not view["marked"] and view["acl"] == "private"
    assert view["metadata"] == ({"foo": "bar"} if buckets.metadata else {})


def test_another_installation_is_not_ours(real: Any, tmp_path: Path) -> None:
    name = real.bucket("theirs")
    real.driver.create(bucket_target(real, name))
    other = type(real)(tmp_path / "other", real.tenant, home="0ther000")
    other.store.registry.add(real.tenant)
    found = other.driver.observe()
    assert not [o for o in found.owned if o.key.name == name]
    assert [u for u in found.unowned if u.host_name.endswith(f"/{name}")]


def test_orphan_keeps_the_bucket_and_its_objects(buckets: Any) -> None:
    name = buckets.bucket("keep")
    meta = {"x": "y"} if buckets.metadata else {}
    obs = buckets.driver.create(bucket_target(buckets, name, metadata=meta))
    if buckets.holds_objects:
        buckets.put(name, "report.txt", b"quarterly")
    orphaned = buckets.driver.orphan(obs)
    assert orphaned.mark.orphaned
    assert owned(buckets)[obs.key].mark.orphaned
    assert buckets.view(name)["metadata"] == meta
    if buckets.holds_objects:
        assert buckets.objects(name) == ["report.txt"]


def test_delete_an_empty_bucket(buckets: Any) -> None:
    name = buckets.bucket("gone")
    obs = buckets.driver.create(bucket_target(buckets, name, deletionPolicy="Delete"))
    buckets.driver.delete(obs)
    assert buckets.view(name) is None
    assert obs.key not in owned(buckets)
    buckets.driver.delete(obs)  # again: already gone is fine


def test_delete_refuses_a_bucket_with_objects_unless_purged(real: Any) -> None:
    name = real.bucket("full")
    obs = real.driver.create(bucket_target(real, name, versioning=True, deletionPolicy="Delete"))
    real.put(name, "a", b"one")
    real.put(name, "a", b"two")  # an old version too
    real.put(name, "b", b"three")
    found = owned(real)[obs.key]
    assert found.host["data"].startswith("2 objects")
    with pytest.raises(PermanentError, match="purgeOnDelete"):
        real.driver.delete(found)
    assert sorted(real.objects(name)) == ["a", "b"]
    purge = Observed(found.key, found.identity, {**found.spec, "purgeOnDelete": True}, found.mark, found.host)
    real.driver.delete(purge)
    assert real.view(name) is None


def test_adopt_marks_and_changes_nothing_else(real: Any) -> None:
    """`reconciler import` (the memory driver does not adopt)."""
    buckets = real
    name = buckets.bucket("legacy")
    host_name = buckets.unowned(name)
    t = bucket_target(buckets, name, acl="public-read")
    adopted = buckets.driver.adopt(host_name, t)
    assert adopted.mark.spec_hash == t.mark.spec_hash
    view = buckets.view(name)
    assert view["marked"] and view["acl"] == "private"
    assert view["metadata"] == ({"foo": "bar"} if buckets.metadata else {})
    assert t.key in owned(buckets)


def test_a_create_cut_short_is_finished_not_reported_as_foreign(real: Any) -> None:
    """Swift creates a container with its mark in one PUT; S3 creates then tags, so a
    killed apply can leave the bucket untagged: recorded as `creating`, it is still ours."""
    name = real.bucket("half")
    t = bucket_target(real, name, acl="public-read")
    if real.name == "s3":
        real.store.registry.add(real.tenant, creating=f"{real.tenant}/{name}")
        real.s3.create_bucket(Bucket=name)  # what CreateBucket did before the kill
    else:
        real.driver.create(t)
    found = owned(real)
    assert t.key in found
    again = real.driver.create(t)
    assert dict(again.spec) == dict(t.spec) and not again.drift
    assert real.view(name)["acl"] == "public-read" and real.view(name)["marked"]


def test_the_store_down_is_transient(real: Any, tmp_path: Path) -> None:
    dead = "http://127.0.0.1:9"  # discard port: nothing listens
    if real.name == "swift":
        down = SwiftBuckets(tmp_path / "down", real.tenant, auth_url=f"{dead}/auth/v1.0")
    else:
        down = S3Buckets(tmp_path / "down", real.tenant, endpoint=dead)
    down.store.registry.add(real.tenant)
    with pytest.raises(TransientError, match="unreachable"):
        down.driver.observe()
    with pytest.raises(TransientError):
        down.driver.create(bucket_target(down, down.bucket("never")))


def test_wrong_credentials_are_a_permanent_auth_error(real: Any, tmp_path: Path) -> None:
    if real.name == "swift":
        bad = SwiftBuckets(tmp_path / "bad", real.tenant, key="wrong")
    else:
        bad = S3Buckets(tmp_path / "bad", real.tenant, secret="wrong")
    with pytest.raises(PermanentError, match="authentication"):
        bad.driver.create(bucket_target(bad, bad.bucket("never")))
    assert real.view(bad.made[-1] if real.name == "s3" else "never") is None


def test_s3_plan_time_problems(tmp_path: Path) -> None:
    h = S3Buckets.__new__(S3Buckets)
    from reconciler.drivers.objectstore import ObjectStoreDriver, Registry, S3Store

    store = S3Store("s3", endpoint=objstore.PROXY, region="us-east-1", addressing="path",
                    credentials={"acme": ("a", "b")}, registry=Registry(tmp_path / "r.json"), home="h")
    h.driver = ObjectStoreDriver({"s3": store}, "s3", "h")
    spec = target("Bucket", "acme", "logs", quota={"bytes": 5}).spec
    problems = h.driver.problems("Bucket", "acme", "logs", spec)
    assert [p for p, m in problems if p == ("quota", "bytes") and "no bucket quotas" in m]
    problems = h.driver.problems("Bucket", "globex", "logs", target("Bucket", "globex", "logs").spec)
    assert [m for p, m in problems if "no credentials for tenant globex" in m]
    problems = h.driver.problems("Bucket", "acme", "logs", target("Bucket", "acme", "logs", store="nope").spec)
    assert [m for p, m in problems if "no object store 'nope'" in m]
    store.tagging = False
    problems = h.driver.problems("Bucket", "acme", "logs", target("Bucket", "acme", "logs", metadata={"a": "b"}).spec)
    assert [m for p, m in problems if p == ("metadata",) and "without bucket tagging" in m]


def test_swift_tenant_credentials_isolate_tenants(tmp_path: Path) -> None:
    """A tenant with its own user gets its buckets in that user's account, made with its
    credentials; another tenant's user cannot list or read them."""
    objstore.require_swift()
    from reconciler.drivers.objectstore import ObjectStoreDriver, Registry, SwiftStore

    tenant = objstore.unique()
    name = objstore.unique("rctiso")
    store = SwiftStore("local", auth_url=objstore.AUTH_URL, user="nobody:none", key="none",
                       reseller_prefix="AUTH_", credentials={tenant: objstore.TEST},
                       registry=Registry(tmp_path / "r.json"), home="iso00000")
    driver = ObjectStoreDriver({"local": store}, "local", "iso00000")
    mine = objstore.conn(objstore.TEST)
    try:
        obs = driver.create(target("Bucket", tenant, name, store="local"))
        assert obs.host["account"] == f"user {objstore.TEST[0]}"
        assert name in set(objstore.containers(mine))
        mine.put_object(name, "secret.txt", b"only mine")
        other = objstore.conn(objstore.TEST2)
        assert name not in set(objstore.containers(other))
        url, _ = mine.get_auth()
        with pytest.raises(swiftclient.ClientException) as denied:
            swiftclient.get_object(url, other.get_auth()[1], name, "secret.txt")
        assert denied.value.http_status == 403
    finally:
        objstore.empty_container(mine, name)
