"""JSON Schemas of the manifests, generated from the models (never hand-written)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reconciler import API_VERSION
from reconciler.models import KINDS, document_model

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def kind_schema(kind: str) -> dict[str, Any]:
    schema = document_model(kind).model_json_schema(mode="validation")
    schema["$schema"] = SCHEMA_DIALECT
    schema["$id"] = f"{kind.lower()}.json"
    schema.setdefault("description", KINDS[kind].__doc__ or "")
    return schema


def manifest_schema() -> dict[str, Any]:
    """One schema for files mixing kinds: picks the kind's schema by `kind`."""
    return {
        "$schema": SCHEMA_DIALECT,
        "$id": "manifest.json",
        "title": f"{API_VERSION} manifest (any kind)",
        "type": "object",
        "required": ["apiVersion", "kind", "metadata"],
        "properties": {"kind": {"enum": list(KINDS)}},
        "allOf": [
            {
                "if": {"properties": {"kind": {"const": kind}}},
                "then": {"$ref": f"{kind.lower()}.json"},
            }
            for kind in KINDS
        ],
    }


def render_all() -> dict[str, str]:
    """File name -> JSON text, for every schema in schemas/."""
    files = {f"{kind.lower()}.json": kind_schema(kind) for kind in KINDS}
    files["manifest.json"] = manifest_schema()
    return {name: json.dumps(schema, indent=2, sort_keys=True) + "\n" for name, schema in files.items()}


def write_schemas(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_all().items():
        path = out / name
        path.write_text(text)
        written.append(path)
    return written
