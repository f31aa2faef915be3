"""The Swift all-in-one of scripts/setup-swift.sh, for tests: whether it answers, and
plain clients (python-swiftclient, boto3) that check what a driver did without our code.

Users (Swift's SAIO convention, made by the script): `admin:admin` (reseller admin, key
`admin`), `test:tester` (key `testing`, account AUTH_test), `test2:tester2` (`testing2`,
AUTH_test2). Tests name every container and account they make `rct...` and remove them.
"""

from __future__ import annotations

import functools
import secrets
import urllib.error
import urllib.request
from typing import Any, Iterator

import boto3
import swiftclient
from botocore import UNSIGNED
from botocore.client import Config

from hostcheck import require

PROXY = "http://127.0.0.1:8080"
AUTH_URL = f"{PROXY}/auth/v1.0"
ADMIN = ("admin:admin", "admin")
TEST = ("test:tester", "testing")
TEST2 = ("test2:tester2", "testing2")


@functools.cache
def swift_unready() -> tuple[str, ...]:
    try:
        with urllib.request.urlopen(f"{PROXY}/healthcheck", timeout=5) as answer:
            if answer.status == 200:
                swiftclient.get_auth(AUTH_URL, *ADMIN, timeout=10)
                return ()
    except Exception as exc:  # noqa: BLE001 - any failure means: not usable
        return (f"the Swift all-in-one does not answer at {PROXY} ({type(exc).__name__}): "
                "run scripts/setup-swift.sh",)
    return (f"the Swift all-in-one does not answer at {PROXY}: run scripts/setup-swift.sh",)


def require_swift() -> None:
    require(swift_unready())


def conn(user: tuple[str, str] = ADMIN, account: str | None = None) -> swiftclient.Connection:
    """A plain swiftclient connection; as the reseller admin it can reach any `account`."""
    options = {}
    if account is not None:
        url, _ = swiftclient.get_auth(AUTH_URL, *ADMIN, timeout=10)
        options["object_storage_url"] = url.rsplit("/", 1)[0] + "/" + account
    return swiftclient.Connection(AUTH_URL, user[0], user[1], os_options=options, retries=0, timeout=20)


def s3(user: tuple[str, str] = TEST) -> Any:
    return boto3.client("s3", endpoint_url=PROXY, region_name="us-east-1",
                        aws_access_key_id=user[0], aws_secret_access_key=user[1],
                        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))


def s3_anonymous() -> Any:
    return boto3.client("s3", endpoint_url=PROXY, region_name="us-east-1",
                        config=Config(signature_version=UNSIGNED, s3={"addressing_style": "path"}))


def anonymous_get(path: str) -> int:
    """HTTP status of an unauthenticated GET of `path` (e.g. /v1/AUTH_test/c/o)."""
    try:
        with urllib.request.urlopen(f"{PROXY}{path}", timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code


def unique(prefix: str = "rct") -> str:
    return prefix + secrets.token_hex(3)


def empty_container(c: swiftclient.Connection, name: str) -> None:
    """Delete a container with everything in it (old versions too); quiet when gone."""
    listing: list[dict[str, Any]] = []
    marker, version = "", None
    while True:  # full_listing would drop `?versions`
        try:
            _, page = c.get_container(name, marker=marker, version_marker=version, query_string="versions")
        except swiftclient.ClientException:
            return
        if not page:
            break
        listing.extend(page)
        marker, version = page[-1]["name"], page[-1].get("version_id")
    for obj in listing:
        vid = obj.get("version_id")
        query = f"version-id={vid}" if vid and vid != "null" else None
        try:
            c.delete_object(name, obj["name"], query_string=query)
        except swiftclient.ClientException:
            pass
    try:
        c.post_container(name, {"X-Versions-Enabled": "false"})
    except swiftclient.ClientException:
        pass
    try:
        c.delete_container(name)
    except swiftclient.ClientException:
        pass


def remove_containers(c: swiftclient.Connection, prefix: str) -> None:
    """Delete every container of `c`'s account whose name starts with `prefix`."""
    try:
        _, containers = c.get_account(full_listing=True, prefix=prefix)
    except swiftclient.ClientException:
        return
    for entry in containers:
        empty_container(c, entry["name"])


def remove_account(account: str) -> None:
    """Delete every container of a test account (reseller admin). The account itself
    stays, empty: a deleted account is a tombstone whose name can never be used again
    (nothing runs Swift's account reaper here)."""
    remove_containers(conn(ADMIN, account), "")


def containers(c: swiftclient.Connection) -> Iterator[str]:
    _, listing = c.get_account(full_listing=True)
    return (e["name"] for e in listing)
