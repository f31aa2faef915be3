"""An OpenStack Swift store through python-swiftclient: a bucket is a container.

- A tenant's account: the account of its own user when the host config gives it
  credentials (its buckets are made with those, so it reaches nothing else), else
  `resellerPrefix + tenant`, reached by the reseller-admin user (tempauth's
  `.reseller_admin`; the account is made by the first container PUT,
  `account_autocreate`).
- Observe: one account listing per account, then one HEAD per container (in parallel)
  for its metadata: our mark is in it (`X-Container-Meta-Rc-Home`, `-Rc-Mark-N`).
- acl: `X-Container-Read: .r:*,.rlistings` is public-read; none is private. versioning:
  `X-Versions-Enabled` (Swift's object versioning). quota: the container_quotas
  middleware's `X-Container-Meta-Quota-Bytes` / `-Quota-Count`. metadata:
  `X-Container-Meta-*`. A container PUT carries all of it at once, mark included, so a
  container is never there without its mark.
"""

from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping, TypeVar

import requests
import swiftclient
from swiftclient.exceptions import ClientException

from reconciler.errors import Conflict, NotFound, PermanentError, TransientError
from reconciler.drivers.objectstore._common import (
    CHUNK_KEY, Found, Registry, decode_payload, encode_items, is_ours_key, make_payload,
)
from reconciler.state import Target

T = TypeVar("T")

META = "x-container-meta-"
PUBLIC_READ = ".r:*,.rlistings"
#: Swift's default constraints on container metadata (swift.conf [swift-constraints])
MAX_META_COUNT = 90
MAX_META_OVERALL = 4096
#: payload chunks beyond the current ones are removed on every write (a shorter mark)
SPARE_CHUNKS = 12


class SwiftStore:
    driver = "swift"

    def __init__(self, name: str, *, auth_url: str, user: str, key: str, reseller_prefix: str,
                 credentials: Mapping[str, tuple[str, str]], registry: Registry, home: str,
                 timeout_s: float = 10.0, max_parallel: int = 8):
        self.name = name
        self.auth_url = auth_url
        self.user = user
        self._key = key
        self.reseller_prefix = reseller_prefix
        self._credentials = dict(credentials)
        self.registry = registry
        self.home = home
        self.timeout_s = timeout_s
        self.max_parallel = max_parallel
        self._local = threading.local()
        #: one pool for the store's life: its threads keep their connections (and so their
        #: tokens) from one observe or purge to the next, instead of authenticating again
        self._workers: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._base: str | None = None
        self._base_lock = threading.Lock()
        #: the last scan failed (the store is down): plan asks it nothing more
        self._down = False

    def __repr__(self) -> str:  # never the keys
        return f"SwiftStore({self.name!r}, {self.auth_url!r}, user={self.user!r})"

    # --- connections ---------------------------------------------------------------------

    def account_of(self, tenant: str) -> str:
        creds = self._credentials.get(tenant)
        if creds is not None:
            return f"user {creds[0]}"
        return self.reseller_prefix + tenant

    def _account_url(self, tenant: str) -> str:
        """The storage URL of a tenant without credentials: the reseller admin's own URL
        with the account replaced (learnt once, from the admin's auth)."""
        with self._base_lock:
            if self._base is None:
                url, _ = self._call(lambda: swiftclient.get_auth(
                    self.auth_url, self.user, self._key, timeout=self.timeout_s), "authenticate")
                self._base = url.rstrip("/").rsplit("/", 1)[0]
        return f"{self._base}/{self.reseller_prefix}{tenant}"

    def _conn(self, tenant: str) -> swiftclient.Connection:
        """One connection per thread and tenant (a Connection is not thread-safe)."""
        conns: dict[str, swiftclient.Connection] = self._local.__dict__.setdefault("conns", {})
        conn = conns.get(tenant)
        if conn is None:
            creds = self._credentials.get(tenant)
            common: dict[str, Any] = {"retries": 1, "starting_backoff": 0.2, "max_backoff": 1,
                                      "timeout": self.timeout_s, "auth_version": "1"}
            if creds is not None:
                conn = swiftclient.Connection(self.auth_url, creds[0], creds[1], **common)
            else:
                conn = swiftclient.Connection(self.auth_url, self.user, self._key,
                                              os_options={"object_storage_url": self._account_url(tenant)},
                                              **common)
            conns[tenant] = conn
        return conn

    def tenants(self) -> list[str]:
        return sorted(set(self._credentials) | set(self.registry.tenants()))

    def _pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._workers is None:
                self._workers = ThreadPoolExecutor(max_workers=self.max_parallel,
                                                   thread_name_prefix=f"swift-{self.name}")
            return self._workers

    # --- errors -----------------------------------------------------------------------

    def _call(self, fn: Callable[[], T], what: str, tenant: str | None = None) -> T:
        """Run one swiftclient call; its errors become ours."""
        try:
            return fn()
        except ClientException as exc:
            raise self._translate(exc, what, tenant) from None
        except (requests.exceptions.RequestException, socket.error) as exc:
            raise TransientError(
                f"object store {self.name} ({self.auth_url}) is unreachable: {what}: "
                f"{type(exc).__name__}") from None

    def _translate(self, exc: ClientException, what: str, tenant: str | None) -> Exception:
        status = exc.http_status
        body = (exc.http_response_content or b"")
        text = (body.decode(errors="replace") if isinstance(body, bytes) else str(body)).strip()[:200]
        where = f"object store {self.name}: {what}"
        if status is None:
            return TransientError(f"{where}: {exc.msg}")
        if status == 401:
            who = (f"tenant {tenant}'s user {self._credentials[tenant][0]}" if tenant in self._credentials
                   else f"user {self.user}")
            return PermanentError(f"{where}: authentication failed for {who}: check its key in "
                                  f"the host config (objectStores.{self.name})")
        if status == 403:
            who = (f"tenant {tenant}'s user {self._credentials[tenant][0]}" if tenant in self._credentials
                   else f"user {self.user}")
            return PermanentError(f"{where}: forbidden (403) for {who}{': ' + text if text else ''}: give it "
                                  f"access to that account, or other credentials in the host config "
                                  f"(objectStores.{self.name})")
        if status == 404:
            return NotFound(f"{where}: not found")
        if status == 409:
            return Conflict(f"{where}: conflict (409){': ' + text if text else ''}")
        if status == 413:
            return PermanentError(f"{where}: quota exceeded (413){': ' + text if text else ''}")
        if status in (408, 429, 498) or status >= 500:
            return TransientError(f"{where}: the store is busy or failing ({status}"
                                  f"{': ' + text if text else ''})")
        return PermanentError(f"{where}: refused ({status}){': ' + text if text else ''}")

    # --- reading ----------------------------------------------------------------------

    def scan(self) -> list[Found]:
        self._down = True  # until this scan went through
        found = self._scan()
        self._down = False
        return found

    def _scan(self) -> list[Found]:
        listed: list[tuple[str, str]] = []
        for tenant in self.tenants():
            try:
                _, containers = self._call(
                    lambda: self._conn(tenant).get_account(full_listing=True), "list the account", tenant)
            except NotFound:
                continue  # the account was never made (or is gone): no buckets
            listed.extend((tenant, c["name"]) for c in containers)
        if not listed:
            return []
        found = list(self._pool().map(lambda tc: self._head(*tc), listed))
        return [f for f in found if f is not None]

    def _head(self, tenant: str, name: str) -> Found | None:
        try:
            headers = self._call(lambda: self._conn(tenant).head_container(name), f"read container {name}", tenant)
        except NotFound:
            return None  # deleted since the listing
        return self._found(tenant, name, headers)

    def _found(self, tenant: str, name: str, headers: Mapping[str, str]) -> Found:
        meta = {k[len(META):]: v for k, v in headers.items() if k.startswith(META)}
        ours = {k: v for k, v in meta.items() if is_ours_key(k)}
        payload = decode_payload(ours)
        detail = ""
        if payload is None:
            detail = "a container without our mark" if not ours else "a container with a damaged mark"
        elif payload.get("home") != self.home:
            detail = f"a container of another reconciler installation ({payload.get('home')})"
            payload = None
        read = headers.get("x-container-read", "")
        acl = "public-read" if _acl_set(read) == _acl_set(PUBLIC_READ) else ("private" if not read else read)
        quota = {"bytes": _int(meta.get("quota-bytes")), "objects": _int(meta.get("quota-count"))}
        user = {k: v for k, v in meta.items()
                if not is_ours_key(k) and k not in ("quota-bytes", "quota-count")
                and not k.startswith("temp-url-key")}
        return Found(
            tenant=tenant, name=name, account=self.account_of(tenant), payload=payload, detail=detail,
            acl=acl, versioning=headers.get("x-versions-enabled", "").lower() == "true",
            quota=quota, metadata=user,
            objects=_int(headers.get("x-container-object-count")) or 0,
            bytes=_int(headers.get("x-container-bytes-used")) or 0,
        )

    def _read(self, tenant: str, name: str) -> Found:
        found = self._head(tenant, name)
        if found is None:
            raise NotFound(f"object store {self.name}: container {name} of tenant {tenant} vanished")
        return found

    # --- writing ----------------------------------------------------------------------

    def _headers(self, spec: Mapping[str, Any], previous: Mapping[str, Any] | None,
                 items: Mapping[str, str]) -> dict[str, str]:
        """Every header the spec sets; with `previous` (the last applied spec) also the
        removals of what it no longer sets."""
        h: dict[str, str] = {}
        for k, v in items.items():
            h[f"X-Container-Meta-{k}"] = v
        chunks = sum(1 for k in items if k.startswith(CHUNK_KEY))
        if previous is not None:
            for i in range(chunks, chunks + SPARE_CHUNKS):
                h[f"X-Remove-Container-Meta-{CHUNK_KEY}{i}"] = "x"
        if spec.get("acl") == "public-read":
            h["X-Container-Read"] = PUBLIC_READ
        elif previous is not None:
            h["X-Remove-Container-Read"] = "x"
        h["X-Versions-Enabled"] = "true" if spec.get("versioning") else "false"
        quota = spec.get("quota") or {}
        for field, header in (("bytes", "Quota-Bytes"), ("objects", "Quota-Count")):
            if quota.get(field) is not None:
                h[f"X-Container-Meta-{header}"] = str(quota[field])
            elif previous is not None:
                h[f"X-Remove-Container-Meta-{header}"] = "x"
        metadata = spec.get("metadata") or {}
        for k, v in metadata.items():
            h[f"X-Container-Meta-{k}"] = v
        if previous is not None:
            for k in (previous.get("metadata") or {}):
                if k not in metadata:
                    h[f"X-Remove-Container-Meta-{k}"] = "x"
        return h

    def create(self, target: Target, payload: Mapping[str, Any]) -> Found:
        tenant, name = target.key.tenant, target.key.name
        items = encode_items(payload)
        conn = self._conn(tenant)
        try:
            existing = self._read(tenant, name)
        except NotFound:
            existing = None
        if existing is not None and existing.payload is None:
            raise Conflict(f"object store {self.name}: {existing.detail} named {name!r} is already in "
                           f"{existing.account}: it is not ours, so it is left alone")
        self.registry.add(tenant)  # before the account can hold anything of ours
        headers = self._headers(target.spec, None if existing is None else existing.payload["mark"].get("applied", {}),
                                items)
        if existing is None:
            self._call(lambda: conn.put_container(name, headers=headers), f"create container {name}", tenant)
        else:  # ours already (a create that was cut short): bring it to the spec
            self._call(lambda: conn.post_container(name, headers), f"update container {name}", tenant)
        return self._read(tenant, name)

    def update(self, target: Target, previous: Mapping[str, Any], payload: Mapping[str, Any]) -> Found:
        tenant, name = target.key.tenant, target.key.name
        headers = self._headers(target.spec, previous, encode_items(payload))
        self._call(lambda: self._conn(tenant).post_container(name, headers), f"update container {name}", tenant)
        return self._read(tenant, name)

    def set_payload(self, tenant: str, name: str, payload: Mapping[str, Any]) -> Found:
        self.registry.add(tenant)
        items = encode_items(payload)
        headers = {f"X-Container-Meta-{k}": v for k, v in items.items()}
        chunks = sum(1 for k in items if k.startswith(CHUNK_KEY))
        for i in range(chunks, chunks + SPARE_CHUNKS):
            headers[f"X-Remove-Container-Meta-{CHUNK_KEY}{i}"] = "x"
        self._call(lambda: self._conn(tenant).post_container(name, headers), f"mark container {name}", tenant)
        return self._read(tenant, name)

    def delete(self, tenant: str, name: str, purge: bool) -> None:
        conn = self._conn(tenant)
        if purge:
            self._purge(tenant, name)
        try:
            self._call(lambda: conn.delete_container(name), f"delete container {name}", tenant)
        except NotFound:
            return
        except Conflict:
            found = self._read(tenant, name)
            raise PermanentError(
                f"object store {self.name}: container {name} is not empty ({found.objects} objects): "
                "the store deletes only empty containers; set purgeOnDelete: true to delete its "
                "objects with it, or empty it first") from None

    def _purge(self, tenant: str, name: str) -> None:
        """Delete every object and every old version (in parallel)."""
        conn = self._conn(tenant)
        listing: list[dict[str, Any]] = []
        marker, version = "", ""
        while True:  # swiftclient's full_listing drops `?versions`: page by hand
            try:
                _, page = self._call(lambda: conn.get_container(name, marker=marker, version_marker=version or None,
                                                                query_string="versions"),
                                     f"list container {name}", tenant)
            except NotFound:
                return
            if not page:
                break
            listing.extend(page)
            marker, version = page[-1]["name"], page[-1].get("version_id") or ""
        victims = [(o["name"], o.get("version_id")) for o in listing]
        if not victims:
            return

        def one(victim: tuple[str, str | None]) -> None:
            obj, version = victim
            query = f"version-id={version}" if version and version != "null" else None
            try:
                self._call(lambda: self._conn(tenant).delete_object(name, obj, query_string=query),
                           f"delete object {obj} of {name}", tenant)
            except NotFound:
                pass

        list(self._pool().map(one, victims))

    # --- plan time --------------------------------------------------------------------

    def problems(self, tenant: str, name: str, spec: Mapping[str, Any]) -> list[tuple[tuple[str | int, ...], str]]:
        out: list[tuple[tuple[str | int, ...], str]] = []
        metadata = spec.get("metadata") or {}
        items = encode_items(make_payload(self.home, {"applied": dict(spec), "kind": "Bucket", "tenant": tenant,
                                                      "name": name, "specHash": "0" * 64}, spec))
        count = len(metadata) + len(items) + 2
        size = sum(len(k.encode()) + len(v.encode()) for k, v in list(metadata.items()) + list(items.items())) + 64
        if count > MAX_META_COUNT:
            out.append((("metadata",), f"{len(metadata)} keys: Swift keeps at most {MAX_META_COUNT} metadata "
                                       f"items on a container, {count - len(metadata)} of them reconciler's"))
        if size > MAX_META_OVERALL:
            out.append((("metadata",), f"about {size} bytes of container metadata with reconciler's mark: "
                                       f"Swift allows {MAX_META_OVERALL}; use fewer or shorter values"))
        if not self._down and tenant not in self.tenants():
            out.extend(self._in_the_way(tenant, name))
        return out

    def _in_the_way(self, tenant: str, name: str) -> list[tuple[tuple[str | int, ...], str]]:
        """A container with the bucket's name in an account that observe does not list
        (one this store never made a bucket in): someone else's when it has no mark of
        ours. One HEAD per bucket of such a tenant; when the store cannot tell, the create
        will."""
        try:
            found = self._head(tenant, name)
        except (TransientError, PermanentError):
            return []
        if found is None or found.payload is not None:
            return []
        return [((), f"conflict: {found.detail} named {name!r} is already in {found.account}; it is left "
                     "untouched. Remove or rename it in the store, or rename the bucket in the manifest")]


def _acl_set(value: str) -> frozenset[str]:
    return frozenset(p.strip() for p in value.split(",") if p.strip())


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None
