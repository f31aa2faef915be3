"""Any S3-compatible endpoint through boto3: a bucket is a bucket.

- A tenant's buckets are made with that tenant's own credentials (the host config's
  `tenants`): S3 has no reseller admin, so a tenant without credentials cannot have
  buckets here, which `plan` says.
- Our mark is an object in the bucket, `.reconciler-mark` (its body is the payload),
  because bucket tags, the natural place, are not implemented by every endpoint (Swift's
  s3api answers 501). Counts of objects and bytes leave it out; a purge deletes it last.
  It is a second request after CreateBucket: the bucket is first recorded as `creating`
  in the state directory, so one found unmarked after a killed apply is known as ours and
  finished, not reported as someone else's.
- metadata: bucket tags, one per key, where the endpoint has tagging (`tagging: false`
  in the host config otherwise, and then `plan` refuses metadata on this store).
- acl: canned ACLs (private, public-read), read back from the bucket's grants; an
  endpoint whose grants do not show canned ACLs (s3api with `s3_acl = false`) is
  configured `readableAcl: false`, and the applied value is reported.
- versioning: Enabled, or Suspended (S3 cannot return a bucket to unversioned). quota:
  S3 has none, so a quota is a plan error here.
- Observe: ListBuckets per tenant, then per bucket its mark; ours also their tags, ACL,
  versioning and a count of objects (pages of 1,000 keys, up to 10 pages).
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping, TypeVar

from botocore.exceptions import BotoCoreError, ClientError, ConnectionError as BotoConnectionError
from botocore.exceptions import EndpointConnectionError, ReadTimeoutError, ConnectTimeoutError

from reconciler.errors import Conflict, NotFound, PermanentError, TransientError
from reconciler.drivers.objectstore._common import Found, Registry
from reconciler.state import Target

T = TypeVar("T")

ALL_USERS = "http://acs.amazonaws.com/groups/global/AllUsers"
MARK_OBJECT = ".reconciler-mark"
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
                 timeout_s: float = 10.0, max_parallel: int = 8, tagging: bool = True,
                 readable_acl: bool = True):
        self.name = name
        self.tagging = tagging
        self.readable_acl = readable_acl
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
                import boto3  # 140 ms: only when an s3 store is used
                from botocore.client import Config

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

    def _mark(self, tenant: str, name: str) -> dict[str, Any] | None:
        client = self._client(tenant)
        try:
            body = self._call(lambda: client.get_object(Bucket=name, Key=MARK_OBJECT)["Body"].read(),
                              f"read the mark of {name}", tenant)
        except NotFound:
            return None
        try:
            data = json.loads(body)
        except ValueError:
            return {}
        return data if isinstance(data, dict) and "mark" in data else {}

    def _read_or_none(self, tenant: str, name: str, creating: set[str]) -> Found | None:
        try:
            return self._read(tenant, name, creating)
        except NotFound:
            return None  # deleted since the listing

    def _read(self, tenant: str, name: str, creating: set[str] | None = None) -> Found:
        client = self._client(tenant)
        payload = self._mark(tenant, name)
        drift: tuple[str, ...] = ()
        if not payload:
            pending = creating if creating is not None else self.registry.creating()
            if f"{tenant}/{name}" not in pending:
                detail = "a bucket without our mark" if payload is None else "a bucket with a damaged mark"
                return Found(tenant, name, self.account_of(tenant), None, detail, objects=None, bytes=None)
            drift = ("created but not marked yet (an apply was cut short)",)
            payload = {"home": self.home, "mark": None, "spec": {}}
        elif payload.get("home") != self.home:
            return Found(tenant, name, self.account_of(tenant), None,
                         f"a bucket of another reconciler installation ({payload.get('home')})",
                         objects=None, bytes=None)
        applied = (payload.get("mark") or {}).get("applied") or {}
        if self.readable_acl:
            grants = self._call(lambda: client.get_bucket_acl(Bucket=name), f"read the ACL of {name}",
                                tenant).get("Grants", [])
            public = any(g.get("Grantee", {}).get("URI") == ALL_USERS and g.get("Permission") in ("READ", "FULL_CONTROL")
                         for g in grants)
            acl = "public-read" if public else "private"
        else:  # the endpoint cannot show it: what was applied
            acl = str(applied.get("acl", "private"))
        versioning = self._call(lambda: client.get_bucket_versioning(Bucket=name),
                                f"read versioning of {name}", tenant).get("Status") == "Enabled"
        tags = self._tags(tenant, name) if self.tagging else {}
        objects, size = self._count(tenant, name)
        return Found(tenant, name, self.account_of(tenant), payload, acl=acl, versioning=versioning,
                     metadata=tags, objects=objects, bytes=size, drift=drift)

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
                if obj.get("Key") == MARK_OBJECT:
                    continue
                objects += 1
                size += int(obj.get("Size", 0))
            if not page.get("IsTruncated"):
                return objects, size
            token = page.get("NextContinuationToken")
        return None, None  # more than COUNT_PAGES pages: not counted

    # --- writing ----------------------------------------------------------------------

    def _put_mark(self, tenant: str, name: str, payload: Mapping[str, Any], versioned: bool) -> None:
        client = self._client(tenant)
        body = json.dumps(payload, sort_keys=True).encode()
        self._call(lambda: client.put_object(Bucket=name, Key=MARK_OBJECT, Body=body,
                                             ContentType="application/json"), f"mark bucket {name}", tenant)
        if versioned:  # earlier marks stay as old versions: remove them
            for version in self._versions(tenant, name, prefix=MARK_OBJECT):
                if not version.get("IsLatest") and version["Key"] == MARK_OBJECT:
                    self._delete_version(tenant, name, version)

    def _apply(self, target: Target, previous: Mapping[str, Any] | None, payload: Mapping[str, Any],
               current: Found) -> None:
        tenant, name = target.key.tenant, target.key.name
        client = self._client(tenant)
        spec = target.spec
        versioning = bool(spec.get("versioning"))
        if versioning != current.versioning:
            status = "Enabled" if versioning else "Suspended"
            self._call(lambda: client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": status}),
                       f"set versioning of {name}", tenant)
        acl = spec.get("acl", "private")
        if current.acl != acl or previous is None or not self.readable_acl:
            self._call(lambda: client.put_bucket_acl(Bucket=name, ACL=acl), f"set the ACL of {name}", tenant)
        if self.tagging:
            metadata = dict(spec.get("metadata") or {})
            if metadata != dict(current.metadata):
                tagset = [{"Key": k, "Value": v} for k, v in sorted(metadata.items())]
                if tagset:
                    self._call(lambda: client.put_bucket_tagging(Bucket=name, Tagging={"TagSet": tagset}),
                               f"tag bucket {name}", tenant)
                else:
                    self._call(lambda: client.delete_bucket_tagging(Bucket=name), f"untag bucket {name}", tenant)
        self._put_mark(tenant, name, payload, versioning or current.versioning)

    def create(self, target: Target, payload: Mapping[str, Any]) -> Found:
        tenant, name = target.key.tenant, target.key.name
        client = self._client(tenant)
        try:
            self._call(lambda: client.head_bucket(Bucket=name), f"look for bucket {name}", tenant)
            current: Found | None = self._read(tenant, name)
        except NotFound:
            current = None
        if current is not None and current.payload is None:
            raise Conflict(f"object store {self.name}: {current.detail} named {name!r} is already in "
                           f"{current.account}: it is not ours, so it is left alone")
        self.registry.add(tenant, creating=f"{tenant}/{name}")  # before it can exist unmarked
        if current is None:
            kwargs: dict[str, Any] = {"Bucket": name}
            if self.region != "us-east-1":
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
            try:
                self._call(lambda: client.create_bucket(**kwargs), f"create bucket {name}", tenant)
            except PermanentError as exc:
                if "BucketAlreadyOwnedByYou" not in str(exc):
                    raise
            # a new bucket: private, unversioned, untagged (nothing to read back yet)
            current = Found(tenant, name, self.account_of(tenant), {}, objects=0, bytes=0)
        self._apply(target, None, payload, current)
        self.registry.created(f"{tenant}/{name}")
        return self._read(tenant, name)

    def update(self, target: Target, previous: Mapping[str, Any], payload: Mapping[str, Any]) -> Found:
        tenant, name = target.key.tenant, target.key.name
        self._apply(target, previous, payload, self._read(tenant, name))
        self.registry.created(f"{tenant}/{name}")
        return self._read(tenant, name)

    def set_payload(self, tenant: str, name: str, payload: Mapping[str, Any]) -> Found:
        self.registry.add(tenant)
        client = self._client(tenant)
        versioned = self._call(lambda: client.get_bucket_versioning(Bucket=name),
                               f"read versioning of {name}", tenant).get("Status") == "Enabled"
        self._put_mark(tenant, name, payload, versioned)
        return self._read(tenant, name)

    def _versions(self, tenant: str, name: str, prefix: str = "") -> list[dict[str, Any]]:
        client = self._client(tenant)
        paginator = client.get_paginator("list_object_versions")
        pages = self._call(lambda: list(paginator.paginate(Bucket=name, Prefix=prefix)),
                           f"list objects of {name}", tenant)
        return [entry for page in pages for entry in page.get("Versions", []) + page.get("DeleteMarkers", [])]

    def _delete_version(self, tenant: str, name: str, entry: Mapping[str, Any]) -> None:
        """One object version (or delete marker); DeleteObjects is not used: some endpoints
        (Swift's s3api) insist on a Content-MD5 that current boto3 no longer sends."""
        client = self._client(tenant)
        kwargs = {"Bucket": name, "Key": entry["Key"]}
        if entry.get("VersionId") and entry["VersionId"] != "null":
            kwargs["VersionId"] = entry["VersionId"]
        try:
            self._call(lambda: client.delete_object(**kwargs), f"delete object {entry['Key']} of {name}", tenant)
        except NotFound:
            pass

    def delete(self, tenant: str, name: str, purge: bool) -> None:
        client = self._client(tenant)
        try:
            entries = self._versions(tenant, name)
        except NotFound:
            return
        theirs = [e for e in entries if e["Key"] != MARK_OBJECT]
        if theirs and not purge:
            keys = len({e["Key"] for e in theirs})
            raise PermanentError(
                f"object store {self.name}: bucket {name} is not empty ({keys} objects): the store deletes "
                "only empty buckets; set purgeOnDelete: true to delete its objects with it, or empty it first")
        victims = theirs + [e for e in entries if e["Key"] == MARK_OBJECT]  # the mark goes last
        if theirs:
            with ThreadPoolExecutor(max_workers=min(self.max_parallel, len(theirs)),
                                    thread_name_prefix=f"s3-purge-{self.name}") as pool:
                list(pool.map(lambda e: self._delete_version(tenant, name, e), theirs))
        for entry in victims[len(theirs):]:
            self._delete_version(tenant, name, entry)
        try:
            self._call(lambda: client.delete_bucket(Bucket=name), f"delete bucket {name}", tenant)
        except NotFound:
            return
        except Conflict:
            raise PermanentError(
                f"object store {self.name}: bucket {name} is not empty (objects were added while it was being "
                "deleted): the next apply tries again") from None

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
        if metadata and not self.tagging:
            out.append((("metadata",), f"store {self.name} is an S3 endpoint without bucket tagging "
                                       "(tagging: false in the host config): metadata is unsupported there"))
        if len(metadata) > MAX_TAGS:
            out.append((("metadata",), f"{len(metadata)} keys: S3 keeps at most {MAX_TAGS} tags on a bucket"))
        for key, value in metadata.items():
            bad = sorted({c for c in value if not (c.isalnum() or c == " " or c in TAG_PUNCTUATION)})
            if bad:
                out.append((("metadata", key), f"S3 tag values allow letters, digits, spaces and + - = . _ : / @ "
                                               f"only, not {' '.join(repr(c) for c in bad)}"))
        return out
