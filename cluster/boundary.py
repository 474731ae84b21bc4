"""Reading what users write: a YAML file, and a pydantic error turned into lines that name the field.

Every file Tidal reads (cluster spec, policy file, job spec, scenarios, simulator config) goes through these
two, so that a bad one reads the same everywhere: the file, the field, the bad value and what is valid. Pure:
it imports neither ray nor torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError


def format_loc(loc: tuple[Any, ...]) -> str:
    """A pydantic error location as a user writes it: ``node_groups[0].gpus``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def validation_problems(e: ValidationError) -> list[str]:
    """One ``field: message (got value)`` per problem of ``e``."""
    problems = []
    for err in e.errors(include_url=False):
        loc = format_loc(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field; check its spelling"
        elif err["type"] == "missing":
            msg = "required field is missing"
        value = err.get("input")
        shown = "" if err["type"] in ("missing", "value_error") or isinstance(value, dict) else f" (got {value!r})"
        # A check across fields has no single location: its message starts with the fields it names.
        problems.append(f"{loc}: {msg}{shown}" if loc else f"{msg}{shown}")
    return problems


def format_validation_error(e: ValidationError, what: str) -> str:
    """``invalid <what>:`` and one indented line per problem."""
    return "\n".join([f"invalid {what}:", *(f"  {p}" for p in validation_problems(e))])


def read_yaml(path: str | Path, what: str, error: type[Exception] = ValueError) -> Any:
    """The parsed YAML of ``path`` (``None`` for an empty file); raises ``error`` naming ``what`` and the file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise error(f"cannot read {what} {p}: {e.strerror or e}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise error(f"{what} {p} is not valid YAML: {e}") from None
