"""docs/manifests.md is generated from the models: it is up to date and misses no field."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Iterator

import pytest
from pydantic import BaseModel

from reconciler.docgen import main, render
from reconciler.models import KINDS, Metadata, document_model

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "manifests.md"
MANIFESTS = ROOT / "manifests"
REGENERATE = "run `make docs` (python -m reconciler.docgen docs/manifests.md) and commit the result"


def _models_in(annotation: Any) -> Iterator[tuple[type[BaseModel], bool]]:
    """Models inside an annotation (through Optional, Annotated, list), with "in a list"."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation, False
        return
    is_list = typing.get_origin(annotation) is list
    for arg in typing.get_args(annotation):
        for model, inner_list in _models_in(arg):
            yield model, is_list or inner_list


def field_paths(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """Every field path of a model, nested ones as `subnets[].dhcp.start`."""
    for name, info in model.model_fields.items():
        path = prefix + name
        yield path
        for nested, in_list in _models_in(info.annotation):
            yield from field_paths(nested, path + ("[]." if in_list else "."))


def test_manifests_reference_is_up_to_date() -> None:
    assert DOC.is_file(), f"{DOC} is missing: {REGENERATE}"
    assert DOC.read_text(encoding="utf-8") == render(MANIFESTS), f"{DOC} is out of date: {REGENERATE}"


def test_render_is_deterministic() -> None:
    assert render(MANIFESTS) == render(MANIFESTS)


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_spec_field_is_documented(kind: str) -> None:
    text = DOC.read_text(encoding="utf-8")
    section = text.split(f"\n## {kind}\n", 1)[1].split("\n## ", 1)[0]
    paths = list(field_paths(KINDS[kind]))
    assert paths
    missing = [p for p in paths if f"| `{p}` |" not in section]
    assert not missing, f"fields of {kind} missing from its section of {DOC.name}: {missing}"


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_document_field_is_documented(kind: str) -> None:
    text = DOC.read_text(encoding="utf-8")
    envelope = [p for p in field_paths(document_model(kind)) if not p.startswith("spec.")]
    assert {"apiVersion", "kind", "metadata", "spec"} <= set(envelope)
    assert {f"metadata.{n}" for n in Metadata.model_fields} <= set(envelope)
    missing = [p for p in envelope if f"| `{p}` |" not in text]
    assert not missing, f"envelope fields missing from {DOC.name}: {missing}"


def test_every_kind_has_an_example() -> None:
    text = DOC.read_text(encoding="utf-8")
    for kind in KINDS:
        section = text.split(f"\n## {kind}\n", 1)[1].split("\n## ", 1)[0]
        assert f"```yaml\napiVersion: reconciler/v1\nkind: {kind}\n" in section, kind


def test_check_flag(tmp_path: Path) -> None:
    out = tmp_path / "manifests.md"
    assert main([str(out), "--manifests", str(MANIFESTS), "--check"]) == 1  # missing
    assert main([str(out), "--manifests", str(MANIFESTS)]) == 0
    assert main([str(out), "--manifests", str(MANIFESTS), "--check"]) == 0
    out.write_text(out.read_text() + "edited by hand\n")
    assert main([str(out), "--manifests", str(MANIFESTS), "--check"]) == 1
