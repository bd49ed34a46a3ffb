"""The JSON Schema (draft 2020-12) of topology files, made from :mod:`nicsim.lab.fields`.

Editors with a TOML language server (Taplo, Even Better TOML) use it for completion and checks: point
them at ``docs/lab.schema.json`` (``nicsim lab schema`` prints the same document). It says what the
parser checks key by key; what needs the whole file (a guest's switch must exist, an address must be
in its subnet) only ``nicsim lab check FILE`` says.
"""

from __future__ import annotations

from typing import Any

from .fields import CHECK_KEYS, TABLES, Key

SCHEMA_ID = "https://nicsim.invalid/lab.schema.json"


def schema() -> dict[str, Any]:
    doc: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "nicsim lab topology",
        **_table("lab"),
        "$defs": {name: _table(name) for name in TABLES if name != "lab"},
    }
    # A check's keys depend on its kind: the generic table, narrowed per kind.
    doc["$defs"]["check"]["allOf"] = [
        {
            "if": {"properties": {"kind": {"const": kind}}},
            "then": {
                "required": list(needed),
                "propertyNames": {"enum": ["kind", "name", *needed, *optional]},
            },
        }
        for kind, (needed, optional) in CHECK_KEYS.items()
    ]
    # A guest has one NIC (switch, ip, mac) or several (nics), never both.
    doc["$defs"]["guest"]["oneOf"] = [
        {"required": ["switch"], "not": {"required": ["nics"]}},
        {"required": ["nics"], "not": {"anyOf": [{"required": [k]} for k in ("switch", "ip", "mac")]}},
    ]
    return doc


def _table(name: str) -> dict[str, Any]:
    keys = TABLES[name]
    out: dict[str, Any] = {"type": "object", "properties": {}}
    for k, spec in keys.items():
        if k == "*":
            out["additionalProperties"] = {"type": ["string", "number", "boolean"], "description": spec.doc}
            continue
        out["properties"][k] = _key(spec)
    if "*" not in keys:
        out["additionalProperties"] = False
    required = [k for k, s in keys.items() if s.required]
    if required:
        out["required"] = required
    return out


def _key(spec: Key) -> dict[str, Any]:
    d: dict[str, Any] = {"description": spec.doc}
    if spec.kind in ("string", "integer", "number", "boolean"):
        d["type"] = spec.kind
        if spec.choices:
            d["enum"] = list(spec.choices)
        if spec.minimum is not None:
            d["minimum"] = spec.minimum
    elif spec.kind == "table":
        d["$ref"] = f"#/$defs/{spec.table}"
    elif spec.kind == "named":
        d.update(
            type="object",
            propertyNames={"pattern": "^[a-z0-9][a-z0-9-]{0,23}$"},
            additionalProperties={"$ref": f"#/$defs/{spec.table}"},
        )
    elif spec.kind == "array":
        d.update(type="array", items={"$ref": f"#/$defs/{spec.table}"})
    elif spec.kind == "strings":
        d.update(type="array", items={"type": "string"})
    return d
