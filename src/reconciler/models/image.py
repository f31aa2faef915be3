"""Image: a local qcow2 or raw file registered in the image directory."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator

from reconciler.models._base import Spec
from reconciler.models._fields import UpdatePolicy, spec_field


class ImageSpec(Spec):
    """A boot image (Glance's image) that instance root disks are overlays on."""

    kind = "Image"
    create_before_destroy = True

    source: str = spec_field(
        description="Absolute path of the image file on the host.",
        update=UpdatePolicy.REPLACE,
        min_length=1,
        max_length=4096,
    )
    format: Literal["qcow2", "raw"] = spec_field(
        "qcow2", description="Disk format of the source file.", update=UpdatePolicy.REPLACE
    )
    sha256: str | None = spec_field(
        None,
        description="Expected SHA-256 of the source (64 hex digits); verified when registering.",
        update=UpdatePolicy.REPLACE,
        pattern=r"^[0-9a-f]{64}$",
    )

    @field_validator("source")
    @classmethod
    def _absolute_clean_path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"source {value!r} must be an absolute path")
        if "\x00" in value or "/../" in value + "/":
            raise ValueError(f"source {value!r} must not contain '..' or NUL")
        return value
