"""SecurityGroup: two chains in our inet table, ``sg-G-in`` and ``sg-G-out``, which the
port chains of every network jump to for the ports naming the group.

A rule's remote group is resolved to its members' addresses (the planner's derived
`remotes`), an anonymous set rewritten when membership changes. A group without egress
rules allows all egress (Neutron's default egress rule); ingress is default deny (the
port chain's final drop). Deleting a group first removes the jumps to its chains.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from reconciler.drivers.netlink import _names, _nft
from reconciler.drivers.netlink._sidecar import GROUPS
from reconciler.errors import Conflict, NotFound, PermanentError
from reconciler.state import Mark, Observation, Observed, Target, Unowned

if TYPE_CHECKING:
    from reconciler.drivers.netlink._driver import Facts, NetlinkDriver


class Groups:
    def __init__(self, driver: "NetlinkDriver"):
        self.d = driver

    def owned(self, prefix: str, spec: Mapping[str, Any], derived: Mapping[str, Any]) -> _nft.Owned:
        return _nft.group_inet(prefix, list(spec.get("rules") or []), dict(derived.get("remotes") or {}))

    def observe(self, facts: "Facts", result: Observation) -> None:
        for prefix, data in facts.groups.items():
            try:
                result.owned.append(self.observed(facts, prefix, data))
            except (KeyError, TypeError, ValueError) as exc:
                result.unowned.append(Unowned("SecurityGroup", prefix, f"unreadable sidecar: {exc}"))
        reported = set()
        for chain in facts.inet.chains:
            prefix = chain.rsplit("-", 1)[0]
            if (prefix not in facts.groups and prefix not in reported
                    and _foreign_rules(facts.inet, chain)):
                reported.add(prefix)
                result.unowned.append(Unowned("SecurityGroup", prefix, f"chain {chain} in table inet "
                                              f"{self.d.table} holds rules that are not ours"))

    def observed(self, facts: "Facts", prefix: str, data: Mapping[str, Any]) -> Observed:
        mark = Mark.from_dict(data["mark"])
        spec = dict(data["spec"])
        derived = dict(data.get("derived") or {})
        drift = _nft.drift(facts.inet, self.owned(prefix, spec, derived), data.get("rules") or {}, _nft.INET)
        host = {"chain": prefix, "table": f"inet {self.d.table}", "driver": "netlink"}
        # the remotes as recorded; a damaged chain is reported as drift (the plan says so and
        # apply rewrites the chains), not as a change of other resources
        return Observed(mark.key, prefix, spec, mark, host,
                        derived=derived, drift=tuple(drift))

    def ensure(self, target: Target) -> Observed:
        prefix = _names.group_prefix(target.key)
        owned = self.owned(prefix, target.spec, target.derived)
        with self.d.lock:
            old = self.d.sidecars.read(GROUPS, prefix) or {}
            before = self.d.nft.list_table(_nft.INET, self.d.table)
            self.d.check_table(_nft.INET, before)
            for chain in owned.chains:
                if not old and _foreign_rules(before, chain):
                    raise Conflict(f"{target.key.display}: chain {chain} in table inet {self.d.table} holds "
                                   "rules that are not ours; not touching it")
            sidecar = {"mark": target.mark.to_dict(), "spec": dict(target.spec),
                       "derived": dict(target.derived), "rules": old.get("rules") or {}}
            self.d.sidecars.write(GROUPS, prefix, sidecar)
            self.d.nft.apply(_nft.ensure_commands(_nft.INET, self.d.table, before, owned, sidecar["rules"]))
        facts = self.d.facts(sidecars=False)  # the fingerprints to record, and the result
        with self.d.lock:
            sidecar["rules"] = facts.inet.fingerprints(owned.owner)
            self.d.sidecars.write(GROUPS, prefix, sidecar)
        return self.observed(facts, prefix, sidecar)

    def observe_one(self, prefix: str) -> Observed:
        facts = self.d.facts(sidecars=False)
        data = self.d.sidecars.read(GROUPS, prefix)
        if not data:
            raise NotFound(f"security group sidecar for {prefix} is gone")
        return self.observed(facts, prefix, data)

    def delete(self, observed: Observed) -> None:
        prefix = observed.identity
        if prefix != _names.group_prefix(observed.key):
            raise PermanentError(f"{observed.key.display}: unexpected chain prefix {prefix!r}")
        sg_in, sg_out = _names.group_chains(observed.key)
        with self.d.lock:
            listing = self.d.nft.list_table(_nft.INET, self.d.table)
            self.d.nft.apply(_nft.remove_commands(_nft.INET, self.d.table, listing, prefix[3:],
                                                  [sg_in, sg_out]))
            self.d.drop_tables_if_unused(leaving=(GROUPS, prefix))
            self.d.sidecars.remove(GROUPS, prefix)  # last: until then, the next run finds it


def _foreign_rules(listing: _nft.Listing, chain: str) -> bool:
    """Whether `chain` is a group's chain (`sg-G-in`, `sg-G-out`) holding a rule without
    our comment (an empty one may be ours: a network makes it for a group to come)."""
    if not _names.OUR_GROUP_CHAIN.fullmatch(chain):
        return False
    return any(_names.comment_owner(r.comment) is None for r in listing.chains.get(chain, ()))
