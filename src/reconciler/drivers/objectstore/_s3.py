"""Any S3-compatible endpoint through boto3: a bucket is a bucket.

- A tenant's buckets are made with that tenant's own credentials (the host config's
  `tenants`): S3 has no reseller admin, so a tenant without credentials cannot have
  buckets here, which `plan` says.
- Our mark is in the bucket's tags (`rc-home`, `rc-mark-N`), next to the user's
  metadata (one tag per key). Tags are a second request after CreateBucket: the bucket
  is first recorded as `creating` in the state directory, so one found untagged after a
  killed apply is known as ours and finished, not reported as someone else's.
- acl: canned ACLs (private, public-read). versioning: Enabled, or Suspended (S3 cannot
  return a bucket to unversioned). quota: S3 has none, so a quota is a plan error here.
- Observe: ListBuckets per tenant, then per bucket its tags; ours also their ACL,
  versioning and a count of objects (pages of 1,000 keys, up to 10 pages).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping, TypeVar

import boto3
from botocore.client import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectionError as BotoConnectionError
from botocore.exceptions import EndpointConnectionError, ReadTimeoutError, ConnectTimeoutError

from reconciler.errors import Conflict, NotFound, PermanentError, TransientError
from reconciler.drivers.objectstore._common import (
    Found, Registry, decode_payload, encode_payload, is_ours_key,
)
from reconciler.state import Target

T = TypeVar("T")

ALL_USERS = "http://acs.amazonaws.com/groups/global/AllUsers"
MAX_TAGS = 50
#: characters S3 allows in tag keys and values (besides letters, digits and spaces)
TAG_PUNCTUATION = set("+-=._:/@")
COUNT_PAGES = 10
AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
              "ExpiredToken", "AuthorizationHeaderMalformed"}
BUSY_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "503", "500"}


class S3Store:
    driver = "s3"

    def __init__(self, name: str, *, endpoint: str, region: str, addressing: str,
                 credentials: Mapping[str, tuple[str, str]], registry: Registry, home: str,
                 timeout_s: float = 10.0, max_parallel: int = 8):
        self.name = name
        self.endpoint = endpoint
        self.region = region
        self.addressing = addressing
        self._credentials = dict(credentials)
        self.registry = registry
        self.home = home
        self.timeout_s = timeout_s
        self.max_parallel = max_parallel
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never the keys
        return f"S3Store({self.name!r}, {self.endpoint!r})"

    def tenants(self) -> list[str]:
        return sorted(self._credentials)

    def account_of(self, tenant: str) -> str:
        creds = self._credentials.get(tenant)
        return f"access key {creds[0]}" if creds else "(no credentials)"

    def _client(self, tenant: str) -> Any:
        creds = self._credentials.get(tenant)
        if creds is None:
            raise PermanentError(f"object store {self.name} (s3) has no credentials for tenant {tenant}: "
                                 f"add objectStores.{self.name}.tenants.{tenant} to the host config")
        with self._lock:  # boto3 clients are thread-safe; making them is not
            client = self._clients.get(tenant)
            if client is None:
                session = boto3.session.Session()
                client = session.client(
                    "s3", endpoint_url=self.endpoint, region_name=self.region,
                    aws_access_key_id=creds[0], aws_secret_access_key=creds[1],
                    config=Config(signature_version="s3v4", s3={"addressing_style": self.addressing},
                                  connect_timeout=self.timeout_s, read_timeout=self.timeout_s,
                                  retries={"max_attempts": 2, "mode": "standard"},
                                  max_pool_connections=max(10, self.max_parallel)),
                )
                self._clients[tenant] = client
        return client

    # --- errors -----------------------------------------------------------------------

    def _call(self, fn: Callable[[], T], what: str, tenant: str | None = None) -> T:
        where = f"object store {self.name}: {what}"
        try:
            return fn()
        except ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            message = str(err.get("Message", "") or "")[:200]
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code in AUTH_CODES or status in (401, 403):
                who = f"tenant {tenant}'s access key" if tenant else "the access key"
                raise PermanentError(f"{where}: authentication failed or access denied for {who} "
                                     f"({code}): check objectStores.{self.name}.tenants") from None
            if code in ("NoSuchBucket", "404", "NotFound", "NoSuchKey"):
                raise NotFound(f"{where}: not found") from None
            if code == "BucketAlreadyExists":
                raise Conflict(f"{where}: the name is taken by another account of this endpoint "
                               "(S3 bucket names are shared by every account)") from None
            if code == "BucketNotEmpty":
                raise Conflict(f"{where}: the bucket is not empty") from None
            if code in ("TooManyBuckets", "QuotaExceeded"):
                raise PermanentError(f"{where}: quota exceeded ({code}): {message}") from None
            if code in BUSY_CODES or status >= 500 or status == 429:
                raise TransientError(f"{where}: the store is busy or failing ({code or status})") from None
            raise PermanentError(f"{where}: refused ({code or status}): {message}") from None
        except (EndpointConnectionError, BotoConnectionError, ReadTimeoutError, ConnectTimeoutError) as exc:
            raise TransientError(f"object store {self.name} ({self.endpoint}) is unreachable: {what}: "
                                 f"{type(exc).__name__}") from None
        except BotoCoreError as exc:
            raise PermanentError(f"{where}: {type(exc).__name__}: {exc}") from None

    # --- reading ----------------------------------------------------------------------

    def scan(self) -> list[Found]:
        listed: list[tuple[str, str]] = []
        for tenant in self.tenants():
            client = self._client(tenant)
            answer = self._call(lambda: client.list_buckets(), "list buckets", tenant)
            listed.extend((tenant, b["Name"]) for b in answer.get("Buckets", []))
        if not listed:
            return []
        creating = self.registry.creating()
        with ThreadPoolExecutor(max_workers=min(self.max_parallel, len(listed)),
                                thread_name_prefix=f"s3-{self.name}") as pool:
            found = list(pool.map(lambda tb: self._read_or_none(*tb, creating), listed))
        return [f for f in found if f is not None]

    def _tags(self, tenant: str, name: str) -> dict[str, str]:
        client = self._client(tenant)
        try:
            answer = self._call(lambda: client.get_bucket_tagging(Bucket=name), f"read tags of {name}", tenant)
        except NotFound:  # NoSuchTagSet comes as a 404 from some stores
            return {}
        except PermanentError as exc:
            if "NoSuchTagSet" in str(exc):
                return {}
            raise
        return {t["Key"]: t["Value"] for t in answer.get("TagSet", [])}

    def _read_or_none(self, tenant: str, name: str, creating: set[str]) -> Found | None:
        try:
            return self._read(tenant, name, creating)
        except NotFound:
            return None  # deleted since the listing

    def _read(self, tenant: str, name: str, creating: set[str] | None = None) -> Found:
        client = self._client(tenant)
        tags = self._tags(tenant, name)
        ours = {k: v for k, v in tags.items() if is_ours_key(k)}
        payload = decode_payload(ours)
        detail = ""
        drift: tuple[str, ...] = ()
        if payload is None:
            pending = (creating if creating is not None else self.registry.creating())
            if f"{tenant}/{name}" in pending:
                detail = "half made"
            else:
                detail = "a bucket without our mark" if not ours else "a bucket with a damaged mark"
            if detail != "half made":
                return Found(tenant, name, self.account_of(tenant), None, detail, objects=None, bytes=None)
        elif payload.get("home") != self.home:
            return Found(tenant, name, self.account_of(tenant), None,
                         f"a bucket of another reconciler installation ({payload.get('home')})",
                         objects=None, bytes=None)
        acl_answer = self._call(lambda: client.get_bucket_acl(Bucket=name), f"read the ACL of {name}", tenant)
        public = any(g.get("Grantee", {}).get("URI") == ALL_USERS and g.get("Permission") in ("READ", "FULL_CONTROL")
                     for g in acl_answer.get("Grants", []))
        versioning = self._call(lambda: client.get_bucket_versioning(Bucket=name),
                                f"read versioning of {name}", tenant).get("Status") == "Enabled"
        objects, size = self._count(tenant, name)
        user = {k: v for k, v in tags.items() if not is_ours_key(k)}
        if payload is None:  # half made: ours, its mark still to be written
            drift = ("created but not marked yet (an apply was cut short)",)
            payload = {"home": self.home, "mark": None, "spec": {}}
        return Found(tenant, name, self.account_of(tenant), payload, acl="public-read" if public else "private",
                     versioning=versioning, metadata=user, objects=objects, bytes=size, drift=drift)

    def _count(self, tenant: str, name: str) -> tuple[int | None, int | None]:
        client = self._client(tenant)
        objects = size = 0
        token: str | None = None
        for _ in range(COUNT_PAGES):
            kwargs: dict[str, Any] = {"Bucket": name, "MaxKeys": 1000}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call(lambda: client.list_objects_v2(**kwargs), f"list objects of {name}", tenant)
            for obj in page.get("Contents", []):
                objects += 1
                size += int(obj.get("Size", 0))
            if not page.get("IsTruncated"):
                return objects, size
            token = page.get("NextContinuationToken")
        return None, None  # more than COUNT_PAGES pages: not counted

    # --- writing ----------------------------------------------------------------------

    def _put_tags(self, tenant: str, name: str, tags: Mapping[str, str]) -> None:
        client = self._client(tenant)
        tagset = [{"Key": k, "Value": v} for k, v in sorted(tags.items())]
        self._call(lambda: client.put_bucket_tagging(Bucket=name, Tagging={"TagSet": tagset}),
                   f"tag bucket {name}", tenant)

    def _apply(self, target: Target, previous: Mapping[str, Any] | None, items: Mapping[str, str],
               current: Found) -> None:
        tenant, name = target.key.tenant, target.key.name
        client = self._client(tenant)
        spec = target.spec
        metadata = dict(spec.get("metadata") or {})
        keep = {k: v for k, v in current.metadata.items()
                if k not in metadata and k not in ((previous or {}).get("metadata") or {})}
        self._put_tags(tenant, name, {**keep, **metadata, **items})
        acl = spec.get("acl", "private")
        if current.acl != acl or previous is None:
            self._call(lambda: client.put_bucket_acl(Bucket=name, ACL=acl), f"set the ACL of {name}", tenant)
        if bool(spec.get("versioning")) != current.versioning:
            status = "Enabled" if spec.get("versioning") else "Suspended"
            self._call(lambda: client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": status}),
                       f"set versioning of {name}", tenant)

    def create(self, target: Target, items: Mapping[str, str]) -> Found:
        tenant, name = target.key.tenant, target.key.name
        client = self._client(tenant)
        self.registry.add(tenant, creating=f"{tenant}/{name}")
        kwargs: dict[str, Any] = {"Bucket": name}
        if self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self._call(lambda: client.create_bucket(**kwargs), f"create bucket {name}", tenant)
        except PermanentError as exc:
            if "BucketAlreadyOwnedByYou" not in str(exc):
                raise
        current = self._read(tenant, name)
        if current.payload is None:
            raise Conflict(f"object store {self.name}: {current.detail} named {name!r} is already in "
                           f"{current.account}: it is not ours, so it is left alone")
        self._apply(target, None, items, current)
        self.registry.created(f"{tenant}/{name}")
        return self._read(tenant, name)

    def update(self, target: Target, previous: Mapping[str, Any], items: Mapping[str, str]) -> Found:
        tenant, name = target.key.tenant, target.key.name
        self._apply(target, previous, items, self._read(tenant, name))
        self.registry.created(f"{tenant}/{name}")
        return self._read(tenant, name)

    def set_payload(self, tenant: str, name: str, items: Mapping[str, str]) -> Found:
        tags = {k: v for k, v in self._tags(tenant, name).items() if not is_ours_key(k)}
        self._put_tags(tenant, name, {**tags, **items})
        return self._read(tenant, name)

    def delete(self, tenant: str, name: str, purge: bool) -> None:
        client = self._client(tenant)
        if purge:
            self._purge(tenant, name)
        try:
            self._call(lambda: client.delete_bucket(Bucket=name), f"delete bucket {name}", tenant)
        except NotFound:
            return
        except Conflict:
            raise PermanentError(
                f"object store {self.name}: bucket {name} is not empty: the store deletes only empty "
                "buckets; set purgeOnDelete: true to delete its objects with it, or empty it first") from None

    def _purge(self, tenant: str, name: str) -> None:
        """Delete every object version and delete marker, 1,000 per request."""
        client = self._client(tenant)
        paginator = client.get_paginator("list_object_versions")
        pages = self._call(lambda: list(paginator.paginate(Bucket=name)), f"list objects of {name}", tenant)
        victims: list[dict[str, str]] = []
        for page in pages:
            for entry in page.get("Versions", []) + page.get("DeleteMarkers", []):
                victim = {"Key": entry["Key"]}
                if entry.get("VersionId") and entry["VersionId"] != "null":
                    victim["VersionId"] = entry["VersionId"]
                victims.append(victim)
        for i in range(0, len(victims), 1000):
            batch = victims[i : i + 1000]
            self._call(lambda: client.delete_objects(Bucket=name, Delete={"Objects": batch, "Quiet": True}),
                       f"delete objects of {name}", tenant)

    # --- plan time --------------------------------------------------------------------

    def problems(self, tenant: str, name: str, spec: Mapping[str, Any]) -> list[tuple[tuple[str | int, ...], str]]:
        out: list[tuple[tuple[str | int, ...], str]] = []
        if tenant not in self._credentials:
            out.append((("store",), f"store {self.name} (s3) has no credentials for tenant {tenant}: add "
                                    f"objectStores.{self.name}.tenants.{tenant} to the host config "
                                    "(S3 has no reseller admin)"))
        quota = spec.get("quota") or {}
        for field in ("bytes", "objects"):
            if quota.get(field) is not None:
                out.append((("quota", field), f"store {self.name} is S3, which has no bucket quotas: "
                                              "unsupported there (remove it, or use a swift store)"))
        if len(name) < 3:
            out.append((("store",), f"S3 bucket names have 3 to 63 characters; {name!r} has {len(name)}"))
        metadata = spec.get("metadata") or {}
        items = encode_payload(self.home, {"applied": dict(spec), "kind": "Bucket", "tenant": tenant,
                                           "name": name, "specHash": "0" * 64}, spec)
        if len(metadata) + len(items) > MAX_TAGS:
            out.append((("metadata",), f"{len(metadata)} keys: S3 keeps at most {MAX_TAGS} tags on a bucket, "
                                       f"{len(items)} of them reconciler's"))
        for key, value in metadata.items():
            bad = sorted({c for c in value if not (c.isalnum() or c == " " or c in TAG_PUNCTUATION)})
            if bad:
                out.append((("metadata", key), f"S3 tag values allow letters, digits, spaces and + - = . _ : / @ "
                                               f"only, not {' '.join(repr(c) for c in bad)}"))
        return out
