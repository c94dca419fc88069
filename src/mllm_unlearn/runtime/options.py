"""``KEY=VALUE`` strings (``--opt alpha=1 --opt pull=false``) into a config dataclass.

Every value is converted to its field's type, and a value that does not convert is refused with the
key and the expected type named: ``pull=ture`` is an error, never a silent ``False``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


#: the command line's ``--dtype`` names -> torch's dtype names (``models.loading.torch_dtype``)
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parse_bool(key: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"option {key}={raw!r}: expected a boolean (true/false/1/0/yes/no)")


def _convert(key: str, raw: str, kind: type) -> Any:
    if kind is bool:
        return parse_bool(key, raw)
    try:
        return kind(raw.strip())
    except ValueError:
        raise ValueError(f"option {key}={raw!r}: expected {kind.__name__}") from None


def parse_options(config_class: type, options: Sequence[str]) -> Any:
    """Build ``config_class`` from ``KEY=VALUE`` strings (``-`` in a key reads as ``_``); unknown keys
    and unconvertible values are refused naming the key; the class's ``__post_init__`` checks the rest."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    values: dict[str, Any] = {}
    for opt in options:
        key, sep, raw = opt.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise ValueError(f"bad option {opt!r} for {config_class.__name__}; options: {', '.join(fields)}")
        default = fields[key].default
        kind = type(default) if default is not None and default is not dataclasses.MISSING else str
        values[key] = _convert(key, raw, kind)
    return config_class(**values)


def shared_fields(config_class: type, source: Any) -> dict[str, Any]:
    """The values ``source`` (an argparse namespace, a dataclass or any object) holds under the names
    of ``config_class``'s fields: ``config_class(**shared_fields(config_class, args))`` builds a
    config from the arguments of the same names, the rest keeping their defaults."""
    return {f.name: getattr(source, f.name) for f in dataclasses.fields(config_class) if hasattr(source, f.name)}
