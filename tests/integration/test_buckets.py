"""Buckets end to end through the CLI, on the Swift all-in-one (scripts/setup-swift.sh).

`reconciler validate/plan/apply/status` run as subprocesses with a host config of the
test's own: every kind in memory except Bucket (the object store driver), one Swift store
`local` whose two test tenants have their own users (tenant A -> test:tester, account
AUTH_test; tenant B -> test2:tester2, AUTH_test2), and in the S3 test a second store on
Swift's s3api.

What the reconciler did is checked without its code: the `swift` CLI, plain swiftclient
and boto3 sessions (tests/objstore.py) and anonymous HTTP. The accounts are shared with
other tests, so every tenant and bucket name is unique (`rct...`), and the containers a
test made in AUTH_test and AUTH_test2 are removed afterwards, even when it fails. The
accounts themselves stay.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import swiftclient
from swiftclient.exceptions import ClientException

import objstore

REPO = Path(__file__).resolve().parents[2]
RECONCILER = REPO / ".venv" / "bin" / "reconciler"
SWIFT_CLI = "/usr/bin/swift"
PUBLIC_READ = ".r:*,.rlistings"
MEMORY_KINDS = ("Tenant", "Network", "Router", "SecurityGroup", "Image", "Instance", "Volume")


# --- the test's cloud ---------------------------------------------------------------------


@dataclass
class Cloud:
    """Two unique tenants, a state dir, a host config and one manifest folder."""

    root: Path
    a: str  # tenant A: test:tester, AUTH_test
    b: str  # tenant B: test2:tester2, AUTH_test2

    @property
    def host_config(self) -> Path:
        return self.root / "host.yaml"

    @property
    def folder(self) -> Path:
        return self.root / "manifests"

    def write_host(self, s3: bool = False) -> None:
        local: dict[str, Any] = {
            "driver": "swift", "authUrl": objstore.AUTH_URL, "user": objstore.ADMIN[0], "key": objstore.ADMIN[1],
            "tenants": {self.a: {"user": objstore.TEST[0], "key": objstore.TEST[1]},
                        self.b: {"user": objstore.TEST2[0], "key": objstore.TEST2[1]}},
        }
        stores: dict[str, Any] = {"local": local}
        if s3:
            local["default"] = True
            stores["s3"] = {"driver": "s3", "endpoint": objstore.PROXY, "region": "us-east-1",
                            "tagging": False, "readableAcl": False,
                            "tenants": {self.a: {"accessKey": objstore.TEST[0], "secretKey": objstore.TEST[1]}}}
        config = {
            "stateDir": str(self.root / "state"),
            "drivers": {**{k: "memory" for k in MEMORY_KINDS}, "Bucket": "objectstore"},
            "lockTimeoutSeconds": 30,
            "objectStores": stores,
        }
        self.host_config.write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
        self.host_config.chmod(0o600)

    def write(self, *docs: str) -> Path:
        """Replace the manifests with the YAML documents `docs` (each dedented); the
        folder's path (what the CLI is given)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for old in self.folder.glob("*.yaml"):
            old.unlink()
        text = "---\n".join(textwrap.dedent(d).strip("\n") + "\n" for d in docs)
        (self.folder / "cloud.yaml").write_text(text)
        return self.folder

    def tenants(self) -> list[str]:
        return [tenant_doc(self.a), tenant_doc(self.b)]

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "RECONCILER_FAULTS"}
        env.update({"RECONCILER_HOST_CONFIG": str(self.host_config), "NO_COLOR": "1",
                    "COLUMNS": "250", "TERM": "dumb"})
        return subprocess.run([str(RECONCILER), *args], capture_output=True, text=True,
                              timeout=timeout, env=env, stdin=subprocess.DEVNULL, cwd=self.root)

    def apply(self) -> subprocess.CompletedProcess[str]:
        return self.cli("apply", str(self.folder), "--yes")

    def plan(self) -> subprocess.CompletedProcess[str]:
        return self.cli("plan", "--detailed-exitcode", str(self.folder))

    def plan_is_zero(self) -> None:
        result = self.plan()
        assert result.returncode == 0 and "No changes" in result.stdout, _output(result)


def tenant_doc(name: str) -> str:
    return f"""
        apiVersion: reconciler/v1
        kind: Tenant
        metadata: {{name: {name}}}
        """


def bucket_doc(tenant: str, name: str, spec: str = "{}") -> str:
    """A Bucket; `spec`: the YAML of its spec (flow style, one line)."""
    return f"""
        apiVersion: reconciler/v1
        kind: Bucket
        metadata: {{name: {name}, tenant: {tenant}}}
        spec: {spec}
        """


def _output(result: subprocess.CompletedProcess[str]) -> str:
    return (f"{' '.join(map(str, result.args))}: exit {result.returncode}\n--- stdout\n{result.stdout}"
            f"\n--- stderr\n{result.stderr}")


def ok(result: subprocess.CompletedProcess[str], code: int = 0) -> subprocess.CompletedProcess[str]:
    assert result.returncode == code, _output(result)
    assert "Traceback" not in result.stdout + result.stderr, _output(result)
    return result


def failed(result: subprocess.CompletedProcess[str]) -> str:
    """A CLI result that failed cleanly (exit 1, no traceback): its stdout + stderr."""
    assert result.returncode == 1, _output(result)
    assert "Traceback" not in result.stdout + result.stderr, _output(result)
    return result.stdout + result.stderr


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[Cloud]:
    objstore.require_swift()
    if not RECONCILER.exists():
        pytest.fail(f"{RECONCILER} missing: install the project into .venv", pytrace=False)
    c = Cloud(root=tmp_path, a=f"rcta{secrets.token_hex(3)}", b=f"rctb{secrets.token_hex(3)}")
    c.write_host()
    try:
        yield c
    finally:  # both accounts, both prefixes: also what a bug put in the wrong account
        for user in (objstore.TEST, objstore.TEST2):
            conn = objstore.conn(user)
            for prefix in (c.a, c.b):
                objstore.remove_containers(conn, prefix)
        leftovers = []
        for user in (objstore.TEST, objstore.TEST2):
            conn = objstore.conn(user)
            for name in objstore.containers(conn):  # the listing may lag: HEAD says
                if name.startswith((c.a, c.b)) and status_of(lambda: conn.head_container(name)) != 404:
                    leftovers.append(f"{user[0]}: {name}")
        assert not leftovers, f"cleanup left containers behind: {leftovers}"


# --- plain checks ---------------------------------------------------------------------------


def swift_stat(container: str, user: tuple[str, str] = objstore.TEST) -> dict[str, str]:
    """`swift stat CONTAINER` as that user: its `Key: value` lines."""
    result = subprocess.run([SWIFT_CLI, "-A", objstore.AUTH_URL, "-U", user[0], "-K", user[1],
                             "stat", container], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"swift stat {container}: {result.stdout}{result.stderr}"
    out = {}
    for line in result.stdout.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def status_of(fn: Any) -> int:
    """The HTTP status of a swiftclient call that is expected to fail (200: it did not)."""
    try:
        fn()
    except ClientException as exc:
        assert exc.http_status is not None, exc
        return exc.http_status
    return 200


def line_of(path: Path, text: str) -> int:
    """The (1-based) number of the line of `path` that is `text` once stripped."""
    lines = [n for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip() == text]
    assert len(lines) == 1, (text, path.read_text())
    return lines[0]


def versions(conn: swiftclient.Connection, container: str) -> list[dict[str, Any]]:
    _, listing = conn.get_container(container, query_string="versions")
    return listing


# --- the tests -----------------------------------------------------------------------------


def test_two_tenants_buckets_as_declared(cloud: Cloud) -> None:
    objstore.require_swift()
    a, b = cloud.a, cloud.b
    pub, priv, data = f"{a}-pub", f"{a}-priv", f"{b}-data"
    cloud.write(
        *cloud.tenants(),
        bucket_doc(a, pub, "{acl: public-read, versioning: true, quota: {bytes: 1000, objects: 10}, "
                           "metadata: {owner: web-team}}"),
        bucket_doc(a, priv, "{acl: private}"),
        bucket_doc(b, data, "{acl: private, quota: {bytes: 5000}}"),
    )
    assert "Valid: 5 resources." in ok(cloud.cli("validate", str(cloud.folder))).stdout
    first = ok(cloud.plan(), 2)
    assert "Plan: 5 to add, 0 to change, 0 to replace, 0 to destroy." in first.stdout, _output(first)
    applied = ok(cloud.apply())
    for name in (f"{a}/{pub}", f"{a}/{priv}", f"{b}/{data}"):
        assert f"+ Bucket {name}: created" in applied.stdout, _output(applied)
    cloud.plan_is_zero()
    status = ok(cloud.cli("status", str(cloud.folder))).stdout
    for tenant, name, user in ((a, pub, "test:tester"), (a, priv, "test:tester"), (b, data, "test2:tester2")):
        row = next((line for line in status.splitlines() if f" {name} " in line), "")
        assert re.match(rf"Bucket\s+{tenant}\s+{name}\s+ready\s", row), status
        assert f"account=user {user} bucket={name}" in row, status

    # as declared, read with the swift CLI (and swiftclient for what it does not print)
    stat = swift_stat(pub)
    assert stat["Account"] == "AUTH_test"
    assert stat["Read ACL"] == PUBLIC_READ
    assert stat["Meta Owner"] == "web-team"
    assert stat["Meta Quota-Bytes"] == "1000"
    assert stat["Meta Quota-Count"] == "10"
    assert stat["X-Versions-Enabled"] == "True"
    stat = swift_stat(priv)
    assert stat["Read ACL"] == ""
    assert "Meta Quota-Bytes" not in stat and "Meta Owner" not in stat
    assert stat.get("X-Versions-Enabled", "False") == "False"
    stat = swift_stat(data, objstore.TEST2)
    assert stat["Account"] == "AUTH_test2"
    assert stat["Read ACL"] == ""
    assert stat["Meta Quota-Bytes"] == "5000"
    assert "Meta Quota-Count" not in stat

    # public-read and private, anonymously
    tester = objstore.conn(objstore.TEST)
    tester.put_object(pub, "obj", b"version one", content_type="text/plain")
    tester.put_object(priv, "obj", b"secret", content_type="text/plain")
    assert objstore.anonymous_get(f"/v1/AUTH_test/{pub}/obj") == 200
    assert objstore.anonymous_get(f"/v1/AUTH_test/{pub}") == 200  # listing (.rlistings)
    assert objstore.anonymous_get(f"/v1/AUTH_test/{priv}/obj") == 401
    assert objstore.anonymous_get(f"/v1/AUTH_test/{priv}") == 401

    # versioning: an overwrite keeps the old version
    tester.put_object(pub, "obj", b"version two", content_type="text/plain")
    listed = [v for v in versions(tester, pub) if v["name"] == "obj"]
    assert len(listed) == 2, listed
    assert tester.get_object(pub, "obj")[1] == b"version two"

    # quota: one object bigger than the bytes quota is refused
    assert status_of(lambda: tester.put_object(pub, "big", b"x" * 1001)) == 413
    assert status_of(lambda: tester.head_object(pub, "big")) == 404

    # isolation: each tenant's user reaches only its own account
    url_test, _ = swiftclient.get_auth(objstore.AUTH_URL, *objstore.TEST, timeout=10)
    url_test2, token2 = swiftclient.get_auth(objstore.AUTH_URL, *objstore.TEST2, timeout=10)
    _, token = swiftclient.get_auth(objstore.AUTH_URL, *objstore.TEST, timeout=10)
    assert url_test.endswith("/AUTH_test") and url_test2.endswith("/AUTH_test2")
    assert status_of(lambda: swiftclient.get_account(url_test, token2)) == 403
    assert status_of(lambda: swiftclient.get_container(url_test, token2, priv)) == 403
    assert status_of(lambda: swiftclient.get_object(url_test, token2, priv, "obj")) == 403
    assert status_of(lambda: swiftclient.get_container(url_test2, token, data)) == 403
    tester2 = objstore.conn(objstore.TEST2)
    assert tester2.head_container(data)["x-container-meta-quota-bytes"] == "5000"
    assert status_of(lambda: tester.head_container(data)) == 404
    assert data not in set(objstore.containers(tester))
    assert not {pub, priv} & set(objstore.containers(tester2))


def test_retain_keeps_objects_and_delete_purges(cloud: Cloud) -> None:
    objstore.require_swift()
    a = cloud.a
    keep, scratch, full = f"{a}-keep", f"{a}-scratch", f"{a}-full"
    keep_doc = bucket_doc(a, keep)
    scratch_doc = bucket_doc(a, scratch, "{deletionPolicy: Delete, purgeOnDelete: true, versioning: true}")
    full_doc = bucket_doc(a, full, "{deletionPolicy: Delete}")
    cloud.write(*cloud.tenants(), keep_doc, scratch_doc, full_doc)
    ok(cloud.apply())

    tester = objstore.conn(objstore.TEST)
    tester.put_object(keep, "kept", b"keep me")
    for body in (b"first", b"second!", b"third!!!"):  # 3 versions of `a`: 5 + 7 + 8 B
        tester.put_object(scratch, "a", body)
    tester.put_object(scratch, "b", b"12345")  # 5 B: 2 objects, 25 B with the old versions
    tester.put_object(full, "stays", b"0123456789")
    assert len(versions(tester, scratch)) == 4

    # keep and scratch leave the manifests (the tenants and `full` stay)
    cloud.write(*cloud.tenants(), full_doc)
    plan = ok(cloud.plan(), 2).stdout
    assert f"# Bucket {a}/{keep} will be orphaned (retained on the host with its data)" in plan, plan
    assert "removed from the manifests; deletionPolicy Retain keeps it and its data" in plan, plan
    assert f"# Bucket {a}/{scratch} will be destroyed" in plan, plan
    # Swift counts the old versions' bytes in the container's (not its object count)
    assert "holds data (2 objects, 25 B): deleting destroys it for good (deletionPolicy: Delete)" in plan, plan
    assert "purgeOnDelete: its objects are deleted first" in plan, plan
    # `full` stays, holding an object: objects are data, not drift
    assert "Plan: 0 to add, 0 to change, 0 to replace, 1 to destroy, 1 to orphan (retained)." in plan, plan
    applied = ok(cloud.apply()).stdout
    assert f"! Bucket {a}/{keep}: orphaned" in applied, applied
    assert f"- Bucket {a}/{scratch}: destroyed" in applied, applied

    head = tester.head_container(keep)
    assert head["x-container-object-count"] == "1"
    assert tester.get_object(keep, "kept")[1] == b"keep me"
    assert status_of(lambda: tester.head_container(scratch)) == 404
    cloud.plan_is_zero()
    status = ok(cloud.cli("status", str(cloud.folder))).stdout
    assert re.search(rf"Bucket\s+{a}\s+{keep}\s+orphaned\s", status), status

    # Delete without purgeOnDelete on a bucket that holds an object: warned, and refused
    cloud.write(*cloud.tenants())
    plan = ok(cloud.plan(), 2).stdout
    assert f"# Bucket {a}/{full} will be destroyed" in plan, plan
    assert ("holds 1 object, 10 B and purgeOnDelete is false: the store deletes only empty buckets, "
            "so this delete will fail (set purgeOnDelete: true, or empty it first)") in plan, plan
    out = failed(cloud.apply())
    assert re.search(rf"- Bucket {a}/{full}: failed: .*container {full} is not empty .*"
                     r"set purgeOnDelete: true", out), out
    assert "Apply finished with errors: 0 applied, 1 failed" in out, out
    assert tester.head_container(full)["x-container-object-count"] == "1"
    assert tester.get_object(full, "stays")[1] == b"0123456789"
    assert tester.get_object(keep, "kept")[1] == b"keep me"
    # still to do (the delete), not forgotten
    again = ok(cloud.plan(), 2).stdout
    assert f"# Bucket {a}/{full} will be destroyed" in again, again


def test_drift_is_repaired(cloud: Cloud) -> None:
    objstore.require_swift()
    a = cloud.a
    pub = f"{a}-pub"
    cloud.write(*cloud.tenants(),
                bucket_doc(a, pub, "{acl: public-read, quota: {bytes: 1000, objects: 10}, "
                                   "metadata: {owner: web-team}}"))
    ok(cloud.apply())
    cloud.plan_is_zero()

    tester = objstore.conn(objstore.TEST)
    tester.post_container(pub, {"X-Remove-Container-Read": "x", "X-Container-Meta-Quota-Bytes": "2000",
                                "X-Remove-Container-Meta-Owner": "x", "X-Container-Meta-Someone": "theirs"})
    drifted = tester.head_container(pub)
    assert "x-container-read" not in drifted or not drifted["x-container-read"]
    assert "x-container-meta-owner" not in drifted
    assert objstore.anonymous_get(f"/v1/AUTH_test/{pub}") == 401

    plan = ok(cloud.plan(), 2).stdout
    assert f"# Bucket {a}/{pub} will be updated in place" in plan, plan
    assert "# drift on the host: acl, quota.bytes, metadata\n" in plan, plan
    assert '~ acl: "private" -> "public-read"   # drift: changed on the host' in plan, plan
    assert "~ quota.bytes: 2000 -> 1000   # drift: changed on the host" in plan, plan
    assert "quota.objects" not in plan, plan
    # the owner comes back; the key someone else added stays (on both sides: no removal)
    assert ('~ metadata: {"someone": "theirs"} -> {"owner": "web-team", "someone": "theirs"}   '
            "# drift: changed on the host") in plan, plan
    assert "Plan: 0 to add, 1 to change, 0 to replace, 0 to destroy." in plan, plan
    ok(cloud.apply())

    head = tester.head_container(pub)
    assert head.get("x-container-read") == PUBLIC_READ
    assert head.get("x-container-meta-quota-bytes") == "1000"
    assert head.get("x-container-meta-quota-count") == "10"
    assert head.get("x-container-meta-owner") == "web-team"
    assert head.get("x-container-meta-someone") == "theirs"  # never ours: left alone
    assert objstore.anonymous_get(f"/v1/AUTH_test/{pub}") in (200, 204)  # an empty listing: 204
    cloud.plan_is_zero()
    assert tester.head_container(pub).get("x-container-meta-someone") == "theirs"


def test_s3_store(cloud: Cloud) -> None:
    objstore.require_swift()
    a = cloud.a
    cloud.write_host(s3=True)
    site, moved = f"{a}-site", f"{a}-moved"
    site_doc = bucket_doc(a, site, "{store: s3, acl: public-read, versioning: true}")
    moved_doc = bucket_doc(a, moved, "{acl: private}")  # on the default store, local
    cloud.write(*cloud.tenants(), site_doc, moved_doc)
    ok(cloud.apply())
    cloud.plan_is_zero()

    s3 = objstore.s3(objstore.TEST)
    s3.head_bucket(Bucket=site)
    assert s3.get_bucket_versioning(Bucket=site).get("Status") == "Enabled"
    assert site in {b["Name"] for b in s3.list_buckets()["Buckets"]}
    tester = objstore.conn(objstore.TEST)
    read = tester.head_container(site).get("x-container-read", "")
    assert ".r:*" in read.split(","), read
    assert "x-container-read" not in tester.head_container(moved)

    # S3 has no bucket quotas: refused at plan time, at the field
    quota_doc = bucket_doc(a, f"{a}-quota", "{store: s3, quota: {bytes: 100}}")
    folder = cloud.write(*cloud.tenants(), site_doc, moved_doc, quota_doc)
    out = failed(cloud.plan())
    line = line_of(folder / "cloud.yaml", "spec: {store: s3, quota: {bytes: 100}}")
    assert (f"{folder / 'cloud.yaml'}:{line}: Bucket {a}/{a}-quota: spec.quota.bytes: store s3 is S3, "
            "which has no bucket quotas") in out, out
    assert "1 error(s); nothing was changed." in out, out
    assert status_of(lambda: tester.head_container(f"{a}-quota")) == 404

    # changing the store of a Retain bucket would replace it: refused
    moved_to_s3 = bucket_doc(a, moved, "{acl: private, store: s3}")
    folder = cloud.write(*cloud.tenants(), site_doc, moved_to_s3)
    out = failed(cloud.plan())
    line = line_of(folder / "cloud.yaml", "spec: {acl: private, store: s3}")
    assert (f"{folder / 'cloud.yaml'}:{line}: Bucket {a}/{moved}: spec.store: changing store would "
            "replace this bucket and destroy its data, which deletionPolicy Retain refuses") in out, out
    applied = failed(cloud.apply())  # apply plans first: the same refusal, nothing done
    assert "spec.store: changing store would replace this bucket" in applied, applied
    assert "nothing was changed" in applied, applied
    assert "x-container-read" not in tester.head_container(moved)  # untouched, still there
    assert tester.get_container(moved)[1] == []  # no S3 marker object (nothing made on s3)


def test_s3_bucket_status_is_ready(cloud: Cloud) -> None:
    """Two stores on one backend (Swift and its s3api) each see the other's bucket as
    unmarked: a bucket we own is never reported as a conflict for that."""
    objstore.require_swift()
    a = cloud.a
    cloud.write_host(s3=True)
    site = f"{a}-site"
    cloud.write(*cloud.tenants(), bucket_doc(a, site, "{store: s3}"))
    ok(cloud.apply())
    assert objstore.s3(objstore.TEST).head_bucket(Bucket=site)
    status = ok(cloud.cli("status", str(cloud.folder))).stdout
    assert re.search(rf"Bucket\s+{a}\s+{site}\s+ready\s+store=s3 driver=s3 ", status), status
