"""The object store driver: Bucket, over the stores named in the host config.

Like the storage driver's volume backends (and Cinder's), one driver serves several
stores: each Bucket names one (`store`, the host's default when omitted), and changing
it replaces the bucket. Each store is a Swift cluster (python-swiftclient) or an S3
endpoint (boto3); see their modules for how a tenant maps to an account.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from reconciler.drivers.objectstore._common import STORED_FIELDS, Found, Store, data_of, make_payload
from reconciler.errors import ConfigError, NotFound, PermanentError
from reconciler.models import Key
from reconciler.state import FieldDiff, Mark, Observation, Observed, Target, Unowned


class ObjectStoreDriver:
    name = "objectstore"
    kinds = ("Bucket",)

    def __init__(self, stores: Mapping[str, Store], default: str, home: str):
        if default not in stores:
            raise ConfigError(f"object store {default!r} is not configured")
        self.stores = dict(stores)
        self.default = default
        self.home = home
        self.max_parallel = max(getattr(s, "max_parallel", 8) for s in self.stores.values())

    def host_name(self, key: Key) -> str:
        return f"{self.default}:{key.tenant}/{key.name}"

    def _store(self, name: str | None) -> Store:
        store = self.stores.get(name or self.default)
        if store is None:
            raise PermanentError(f"object store {name!r} is not in the host config "
                                 f"(objectStores: {', '.join(sorted(self.stores))})")
        return store

    # --- reading ---------------------------------------------------------------------

    def observe(self) -> Observation:
        result = Observation()
        for store_name, store in self.stores.items():
            for found in store.scan():
                if found.payload is None:
                    result.unowned.append(Unowned("Bucket", f"{store_name}:{found.tenant}/{found.name}",
                                                  found.detail))
                else:
                    result.owned.append(self._observed(store_name, store, found))
        return result

    def _observed(self, store_name: str, store: Store, found: Found) -> Observed:
        payload = found.payload or {}
        key = Key("Bucket", found.tenant, found.name)
        mark_data = payload.get("mark")
        if mark_data:
            mark = Mark.from_dict(mark_data)
        else:  # half made (a killed S3 create): ours, but its mark is still to be written
            mark = Mark(key, "", {})
        stored = payload.get("spec") or {}
        spec: dict[str, Any] = {
            "store": store_name,
            "acl": found.acl,
            "versioning": found.versioning,
            "quota": dict(found.quota),
            "metadata": dict(found.metadata),
            "deletionPolicy": stored.get("deletionPolicy", "Retain"),
            "purgeOnDelete": bool(stored.get("purgeOnDelete", False)),
        }
        host = {"store": store_name, "driver": store.driver, "account": found.account,
                "bucket": found.name, "data": data_of(found)}
        if found.objects is not None:
            host["objects"] = str(found.objects)
        if found.bytes is not None:
            host["bytes"] = str(found.bytes)
        return Observed(key, f"{store_name}:{found.account}/{found.name}", spec, mark, host,
                        drift=tuple(found.drift))

    # --- writing ---------------------------------------------------------------------

    def _payload(self, target: Target) -> dict[str, Any]:
        return make_payload(self.home, target.mark.to_dict(), target.spec)

    def create(self, target: Target) -> Observed:
        store = self._store(target.spec.get("store"))
        found = store.create(target, self._payload(target))
        return self._observed(store.name, store, found)

    def update(self, target: Target, observed: Observed, diffs: Sequence[FieldDiff]) -> Observed:
        store = self._store(observed.spec.get("store"))
        found = store.update(target, dict(observed.mark.applied), self._payload(target))
        return self._observed(store.name, store, found)

    def delete(self, observed: Observed) -> None:
        store = self._store(observed.spec.get("store"))
        try:
            store.delete(observed.key.tenant, observed.key.name, bool(observed.spec.get("purgeOnDelete")))
        except NotFound:
            pass

    def orphan(self, observed: Observed) -> Observed:
        store = self._store(observed.spec.get("store"))
        mark = Mark(observed.mark.key, observed.mark.spec_hash, observed.mark.applied, True,
                    observed.mark.depends_on)
        stored = {k: observed.spec[k] for k in STORED_FIELDS if k in observed.spec}
        found = store.set_payload(observed.key.tenant, observed.key.name,
                                  make_payload(self.home, mark.to_dict(), stored))
        return self._observed(store.name, store, found)

    def adopt(self, host_name: str, target: Target) -> Observed:
        """Mark the unmarked bucket `STORE:TENANT/NAME`; change nothing else."""
        store_name, _, rest = host_name.partition(":")
        tenant, _, name = rest.partition("/")
        if (tenant, name) != (target.key.tenant, target.key.name):
            raise PermanentError(f"{host_name} is not {target.key.display}'s bucket: a bucket is adopted "
                                 "under its own name and tenant")
        store = self._store(store_name)
        found = store.set_payload(tenant, name, self._payload(target))
        return self._observed(store.name, store, found)

    # --- plan time -------------------------------------------------------------------

    def defaults(self, kind: str) -> dict[str, Any]:
        return {"store": self.default} if kind == "Bucket" else {}

    def problems(self, kind: str, tenant: str, name: str, spec: Mapping[str, Any]
                 ) -> list[tuple[tuple[str | int, ...], str]]:
        if kind != "Bucket":
            return []
        wanted = spec.get("store") or self.default
        store = self.stores.get(wanted)
        if store is None:
            return [(("store",), f"no object store {wanted!r} in the host config "
                                 f"(objectStores: {', '.join(sorted(self.stores))})")]
        return store.problems(tenant, name, spec)

    def describe(self) -> dict[str, str]:
        return {name: f"{store.driver}{' (default)' if name == self.default else ''}"
                for name, store in self.stores.items()}
