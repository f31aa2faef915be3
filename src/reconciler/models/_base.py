"""The manifest envelope shared by every kind: identity, metadata, spec base class."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Iterable, Literal, NamedTuple

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from reconciler.models._fields import UpdatePolicy, spec_field

NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
_NAME_RE = re.compile(NAME_PATTERN)


def _check_name(value: str) -> str:
    if not _NAME_RE.fullmatch(value):  # not match(): `$` also matches before a final "\n"
        raise ValueError(
            f"{value!r} cannot be a host object name: use 1 to 63 lowercase letters, "
            "digits or '-', starting with a letter or digit"
        )
    return value


Name = Annotated[str, AfterValidator(_check_name), Field(json_schema_extra={"pattern": NAME_PATTERN})]


class Key(NamedTuple):
    """Identity of a resource: (kind, tenant, name). A Tenant's tenant is its own name."""

    kind: str
    tenant: str
    name: str

    def __str__(self) -> str:  # stable id used in plans, graphs and the journal
        return f"{self.kind}/{self.tenant}/{self.name}"

    @property
    def display(self) -> str:
        """How a user reads it: `Network acme/web`, `Tenant acme`."""
        if self.kind == "Tenant":
            return f"Tenant {self.name}"
        return f"{self.kind} {self.tenant}/{self.name}"

    @classmethod
    def parse(cls, text: str) -> "Key":
        kind, tenant, name = text.split("/", 2)
        return cls(kind, tenant, name)


class Reference(NamedTuple):
    """A reference from one resource to another, found at `path` of the spec."""

    kind: str
    tenant: str
    name: str
    path: tuple[str | int, ...]
    ordering: bool = True  # False: must exist, but implies no create order

    @property
    def key(self) -> Key:
        return Key(self.kind, self.tenant, self.name)


class Strict(BaseModel):
    """Base of every manifest model: unknown fields are errors, not ignored."""

    model_config = ConfigDict(extra="forbid", populate_by_name=False, frozen=True)


class Metadata(Strict):
    name: Name = Field(description="Name of the resource, unique per kind within its tenant.")
    tenant: Name | None = Field(
        None, description="Tenant the resource belongs to (every kind but Tenant)."
    )
    labels: dict[str, str] = Field(default_factory=dict, description="Free-form labels.")
    dependsOn: list[str] = Field(
        default_factory=list,
        description="Extra ordering: `Kind/name` of resources in the same tenant that must "
        "be realised before this one (like Terraform's depends_on).",
    )
    drift: Literal["heal", "report"] | None = Field(
        None,
        description="What `reconciler daemon` does when the host drifts from this resource "
        "(someone stopped the VM, deleted the bridge): `heal` puts it back (the default), "
        "`report` only reports it. On a Tenant: the default of the tenant's resources.",
    )


class Spec(Strict):
    """Base class of every kind's spec. Subclasses set the class variables."""

    kind: ClassVar[str]
    #: replacing creates the new object before destroying the old one
    create_before_destroy: ClassVar[bool] = False
    #: holds data: has `deletionPolicy` (Retain by default)
    stateful: ClassVar[bool] = False

    def references(self, tenant: str) -> Iterable[Reference]:
        """Resources this spec names; the default is none."""
        return ()


DeletionPolicy = Literal["Retain", "Delete"]


def deletion_policy_field() -> Any:
    return spec_field(
        "Retain",
        description="What removing the manifest does: Retain orphans the object and keeps "
        "its data (the default), Delete removes it.",
        update=UpdatePolicy.IN_PLACE,
    )


@dataclass(frozen=True, slots=True)
class Source:
    """Where a document came from, for error messages."""

    file: str
    line: int
