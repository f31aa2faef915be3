"""Three-way merge and field diff over specs, driven by the models' field declarations.

- `merge` computes the target: what the host should have. A field the manifest sets
  takes the manifest's value; a field it does not set takes the model default, except
  fields declared `hostDefault` (allocated or chosen by the host, like a VNI), whose
  live value stands; and maps declared `mergeKeys` keep the keys the user never set
  (someone else's metadata), dropping only keys the user removed since the last apply.
  Lists of models merge element by element, and only where the element is still the
  same one (a model's `list_identity` field, e.g. a NIC's network): a NIC moved to
  another network does not keep the old network's address.
- `diff` compares the target with the live spec, field by field (recursing into nested
  models and into lists of models element by element), and tags each difference with
  its update policy and its cause: "drift" when the manifest still says what was last
  applied (the host moved), "manifest" when the user changed it.
"""

from __future__ import annotations

import functools
import typing
from dataclasses import dataclass
from typing import Any, Mapping

from pydantic import BaseModel

from reconciler.models import UpdatePolicy
from reconciler.models._fields import X_HOST_DEFAULT, X_MERGE_KEYS, X_SENSITIVE, X_SHRINK, X_UPDATE
from reconciler.state import FieldDiff
_MISSING = object()


@dataclass(frozen=True, slots=True)
class FieldMeta:
    policy: UpdatePolicy
    sensitive: bool
    shrink: str | None
    host_default: bool
    merge_keys: bool
    nested: type[BaseModel] | None
    is_list: bool
    default: Any  # JSON-able default, what a field the manifest does not write means


@functools.cache
def field_table(model: type[BaseModel]) -> dict[str, FieldMeta]:
    """Each field of a model with its declared change policy."""
    table = {}
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        nested, is_list = _nested(info.annotation)
        table[name] = FieldMeta(
            policy=UpdatePolicy(extra.get(X_UPDATE, UpdatePolicy.IN_PLACE.value)),
            sensitive=bool(extra.get(X_SENSITIVE, False)),
            shrink=extra.get(X_SHRINK),  # type: ignore[arg-type]
            host_default=bool(extra.get(X_HOST_DEFAULT, False)),
            merge_keys=bool(extra.get(X_MERGE_KEYS, False)),
            nested=nested,
            is_list=is_list,
            default=_json_default(info),
        )
    return table


def _json_default(info: Any) -> Any:
    if info.is_required():
        return None
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return value


def _nested(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is list and args:
        inner, _ = _nested(args[0])
        return inner, True
    for arg in args:  # Optional[Model]
        inner, is_list = _nested(arg)
        if inner is not None:
            return inner, is_list
    return None, False


def merge(
    model: type[BaseModel],
    full: Mapping[str, Any],
    user_set: Mapping[str, Any],
    applied: Mapping[str, Any] | None,
    live: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The target spec from the manifest (full and user-set), the mark and the host."""
    if live is None:
        return dict(full)
    applied = applied or {}
    out: dict[str, Any] = {}
    for name, meta in field_table(model).items():
        value = full.get(name)
        live_value = live.get(name, _MISSING)
        if name in user_set:
            if meta.merge_keys and isinstance(value, dict) and isinstance(live_value, dict):
                previously = applied.get(name) if isinstance(applied.get(name), dict) else {}
                kept = {k: v for k, v in live_value.items() if k not in previously and k not in value}
                out[name] = {**kept, **value}
            elif meta.nested is not None and meta.is_list and isinstance(value, list) and isinstance(live_value, list):
                sub_set = user_set[name] if isinstance(user_set[name], list) else []
                sub_applied = applied.get(name) if isinstance(applied.get(name), list) else []
                ident = getattr(meta.nested, "list_identity", None)
                out[name] = [
                    merge(meta.nested, item, _index(sub_set, i) or {}, _as_map(_index(sub_applied, i)), live_value[i])
                    if i < len(live_value)
                    and isinstance(item, dict)
                    and isinstance(live_value[i], dict)
                    and (ident is None or item.get(ident) == live_value[i].get(ident))
                    else item
                    for i, item in enumerate(value)
                ]
            elif (
                meta.nested is not None
                and not meta.is_list
                and isinstance(value, dict)
                and isinstance(live_value, dict)
            ):
                sub_applied = applied.get(name) if isinstance(applied.get(name), dict) else None
                out[name] = merge(meta.nested, value, user_set[name], sub_applied, live_value)
            else:
                out[name] = value
        elif meta.host_default and live_value is not _MISSING:
            out[name] = live_value
        elif meta.merge_keys and isinstance(live_value, dict):
            previously = applied.get(name) if isinstance(applied.get(name), dict) else {}
            out[name] = {k: v for k, v in live_value.items() if k not in previously}
        else:
            out[name] = value
    return out


def diff(
    model: type[BaseModel],
    target: Mapping[str, Any],
    live: Mapping[str, Any],
    user_set: Mapping[str, Any] | None,
    applied: Mapping[str, Any] | None,
    prefix: tuple[str | int, ...] = (),
    inherited: UpdatePolicy = UpdatePolicy.IN_PLACE,
    known: bool | None = None,
) -> list[FieldDiff]:
    """Every field where the live spec differs from the target.

    `known`: whether the last applied spec is known (from the mark); without it every
    difference counts as the user's.
    """
    if known is None:
        known = applied is not None
    out: list[FieldDiff] = []
    for name, meta in field_table(model).items():
        new = target.get(name)
        old = live.get(name)
        if new == old:
            continue
        path = prefix + (name,)
        policy = meta.policy if meta.policy.rank >= inherited.rank else inherited
        sub_set = _get(user_set, name)
        sub_applied = _get(applied, name)
        if meta.nested is not None and not meta.is_list and isinstance(new, dict) and isinstance(old, dict):
            out.extend(diff(meta.nested, new, old, _as_map(sub_set), _as_map(sub_applied), path, policy, known))
            continue
        if meta.nested is not None and meta.is_list and isinstance(new, list) and isinstance(old, list):
            for i in range(max(len(new), len(old))):
                a = old[i] if i < len(old) else None
                b = new[i] if i < len(new) else None
                if a == b:
                    continue
                if isinstance(a, dict) and isinstance(b, dict):
                    out.extend(
                        diff(meta.nested, b, a, _as_map(_index(sub_set, i)), _as_map(_index(sub_applied, i)),
                             path + (i,), policy, known)
                    )
                else:
                    cause = _cause(_index(sub_set, i), _index(sub_applied, i), known)
                    out.append(FieldDiff(path + (i,), a, b, policy, cause, meta.sensitive))
            continue
        if meta.shrink and isinstance(new, int | float) and isinstance(old, int | float) and new < old:
            if meta.shrink == "replace":
                policy = UpdatePolicy.REPLACE
        cause = _cause(sub_set, sub_applied, known, meta.default)
        out.append(FieldDiff(path, old, new, policy, cause, meta.sensitive))
    return out


def _cause(now: Any, before: Any, known: bool, default: Any = None) -> str:
    """"drift" when the manifest means what it meant when last applied (so the host moved).

    A field not written means its default, so writing the default explicitly, or no
    longer writing it, is no change of intent.
    """
    now = default if now is _ABSENT else now
    before = default if before is _ABSENT else before
    return "drift" if known and now == before else "manifest"


_ABSENT = object()  # a field the manifest (or the mark) does not write


def _get(mapping: Any, name: str) -> Any:
    if isinstance(mapping, Mapping):
        return mapping.get(name, _ABSENT)
    return _ABSENT


def _index(seq: Any, i: int) -> Any:
    if isinstance(seq, list) and i < len(seq):
        return seq[i]
    return None


def _as_map(value: Any) -> Mapping[str, Any] | None:
    return value if isinstance(value, Mapping) else None
