"""The configuration as the server runs it, every setting with its value (`preforkd config`,
gunicorn's --print-config): the file, the command line, WEB_CONCURRENCY and the defaults
merged, as YAML that loads back to the same settings.

Paths are printed resolved (absolute), file modes as octal strings ('0660': read as octal
when loaded back), a bind with nothing but an address (the rest at the defaults) as the bare
address.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import yaml

from prefork.config import BindConfig, Config


def effective(config: Config) -> dict[str, Any]:
    """Every setting of `config` (internal fields left out), as plain YAML values."""
    return _section(config)


def as_yaml(config: Config) -> str:
    origin = config.source or "no file"
    head = f"# preforkd: the settings as the server runs them ({origin}, the command line, " \
           "the defaults)\n"
    return head + yaml.safe_dump(effective(config), sort_keys=False, default_flow_style=False,
                                 allow_unicode=True)


def _section(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        if f.metadata.get("internal"):
            continue
        out[f.name] = _value(getattr(obj, f.name), f)
    return out


def _value(value: Any, f: dataclasses.Field[Any]) -> Any:
    if value is None:
        return None
    if f.metadata.get("octal"):
        return f"0{value:o}"
    if f.metadata.get("mapping"):
        return dict(value)
    if isinstance(value, BindConfig):
        rest = _section(value)
        address = rest.pop("address")
        if value == BindConfig(address):  # every other field at its default
            return address
        return {"address": address, **rest}
    if dataclasses.is_dataclass(value):
        return _section(value)
    if isinstance(value, tuple):
        return [_value(item, f) for item in value]
    return value
