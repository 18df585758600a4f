"""Textual pipelines: ``fold-batchnorm,calibrate{method=percentile,percentile=99.99},insert-qdq``.

Parsing turns text into pass instances with typed options; printing turns passes back into the
same text, so a pipeline round-trips (xDSL's textual pipelines work the same way).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal, get_args, get_origin

from qcompiler.errors import QCError
from qcompiler.pass_manager import Pass, PassManager, option_fields
from qcompiler.registry import get_pass


@dataclasses.dataclass(frozen=True)
class PassSpec:
    """One pipeline element before instantiation: a pass name and its option strings."""

    name: str
    options: tuple[tuple[str, str], ...] = ()


def _top_level_items(body: str) -> list[str]:
    """``body`` split at the commas outside angle brackets: a format such as ``float<4,3>`` in an
    option's value stays whole."""
    items, depth, start = [], 0, 0
    for k, ch in enumerate(body):
        if ch == "<":
            depth += 1
        elif ch == ">" and depth:
            depth -= 1
        elif ch == "," and not depth:
            items.append(body[start:k])
            start = k + 1
    items.append(body[start:])
    return items


def split_pipeline(text: str) -> list[PassSpec]:
    """Split pipeline text into pass specs, checking only the syntax."""
    specs: list[PassSpec] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " \t\n,":
            i += 1
        if i >= n:
            break
        start = i
        while i < n and text[i] not in ",{} \t\n":
            i += 1
        name = text[start:i].strip()
        if not name:
            raise QCError(f"pipeline syntax: expected a pass name at position {start} in '{text}'", option="--pipeline")
        options: list[tuple[str, str]] = []
        while i < n and text[i] in " \t\n":
            i += 1
        if i < n and text[i] == "{":
            close = text.find("}", i)
            if close < 0:
                raise QCError(f"pipeline syntax: '{{' after '{name}' is never closed", option="--pipeline")
            body = text[i + 1 : close]
            if "{" in body:
                raise QCError(f"pipeline syntax: nested '{{' in options of '{name}'", option="--pipeline")
            for item in filter(None, (s.strip() for s in _top_level_items(body))):
                key, eq, value = item.partition("=")
                if not eq or not key.strip():
                    raise QCError(f"pipeline syntax: option '{item}' of '{name}' is not key=value", option="--pipeline")
                options.append((key.strip(), value.strip()))
            i = close + 1
        elif i < n and text[i] == "}":
            raise QCError(f"pipeline syntax: unmatched '}}' after '{name}'", option="--pipeline")
        specs.append(PassSpec(name, tuple(options)))
        while i < n and text[i] in " \t\n":
            i += 1
        if i < n and text[i] != ",":
            raise QCError(f"pipeline syntax: expected ',' after '{name}' at position {i}", option="--pipeline")
    if not specs:
        raise QCError("pipeline is empty", option="--pipeline")
    return specs


def _coerce(raw: str, annotation: Any, pass_name: str, option: str) -> Any:
    """Convert an option string to the option's declared type, or explain what is accepted."""
    origin = get_origin(annotation)
    if origin is Literal:
        choices = get_args(annotation)
        for choice in choices:
            if str(choice) == raw:
                return choice
        accepted = ", ".join(str(c) for c in choices)
        raise QCError(f"'{raw}' is not one of: {accepted}", pass_name=pass_name, option=option)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if raw.lower() in ("none", "") and len(args) < len(get_args(annotation)):
            return None
        errors = []
        for arg in args:
            try:
                return _coerce(raw, arg, pass_name, option)
            except QCError as exc:
                errors.append(exc.message)
        raise QCError("; ".join(errors), pass_name=pass_name, option=option)
    if annotation is bool:
        lowered = raw.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise QCError(f"'{raw}' is not a boolean (accepted: true, false)", pass_name=pass_name, option=option)
    if annotation is int:
        try:
            return int(raw)
        except ValueError:
            raise QCError(f"'{raw}' is not an integer", pass_name=pass_name, option=option) from None
    if annotation is float:
        try:
            value = float(raw)
        except ValueError:
            raise QCError(f"'{raw}' is not a number", pass_name=pass_name, option=option) from None
        if not math.isfinite(value):
            raise QCError(f"'{raw}' is not a finite number", pass_name=pass_name, option=option)
        return value
    if annotation is str:
        return raw
    raise TypeError(f"pass '{pass_name}' option '{option}' has an unsupported type {annotation!r}")


def describe_type(annotation: Any) -> str:
    """Human text for an option type: ``minmax|percentile``, ``float``, ``int or none``."""
    origin = get_origin(annotation)
    if origin is Literal:
        return "|".join(str(c) for c in get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) if a is not type(None) else "none" for a in get_args(annotation))
    return getattr(annotation, "__name__", str(annotation))


def option_types(pass_type: type[Pass]) -> dict[str, Any]:
    """Resolved annotations of a pass's Options fields (handles postponed annotations)."""
    hints = typing.get_type_hints(pass_type.Options) if option_fields(pass_type) else {}
    return {f.name: hints[f.name] for f in option_fields(pass_type)}


def option_key(field_name: str) -> str:
    """The pipeline name of an Options field: kebab-case, without the trailing underscore that
    lets a field be named after a Python keyword (``lambda_`` is ``lambda=``)."""
    return field_name.rstrip("_").replace("_", "-")


def instantiate(spec: PassSpec) -> Pass:
    """Build a pass from a spec, validating every option against the pass's typed Options."""
    pass_type = get_pass(spec.name)
    types_by_name = option_types(pass_type)
    # Pipelines use kebab-case option names; Options fields are snake_case.
    kwargs: dict[str, Any] = {}
    by_key = {option_key(name): name for name in types_by_name}
    for key, raw in spec.options:
        field_name = by_key.get(key, key.replace("-", "_"))
        if field_name not in types_by_name:
            accepted = ", ".join(by_key) or "none"
            raise QCError(f"unknown option (accepted options: {accepted})", pass_name=spec.name, option=key)
        if field_name in kwargs:
            raise QCError("option given twice", pass_name=spec.name, option=key)
        kwargs[field_name] = _coerce(raw, types_by_name[field_name], spec.name, key)
    try:
        return pass_type(**kwargs)
    except QCError:
        raise
    except (TypeError, ValueError) as exc:
        raise QCError(str(exc), pass_name=spec.name) from None


def parse_pipeline(pipeline: str | Sequence[str | Pass]) -> PassManager:
    """A `PassManager` from pipeline text, or from a list of pass names, pipeline texts and passes."""
    if isinstance(pipeline, str):
        return PassManager([instantiate(s) for s in split_pipeline(pipeline)])
    passes: list[Pass] = []
    for item in pipeline:
        if isinstance(item, Pass):
            passes.append(item)
        elif isinstance(item, str):
            passes.extend(instantiate(s) for s in split_pipeline(item))
        else:
            raise TypeError(f"pipeline items must be pass names or Pass instances, got {item!r}")
    return PassManager(passes)


def format_pass(pass_: Pass) -> str:
    """The pipeline text of one pass: its name plus the options that differ from the defaults."""
    if isinstance(pass_, PassManager):
        return format_pipeline(pass_.passes)
    parts = []
    for f in option_fields(type(pass_)):
        value = getattr(pass_.options, f.name)
        default = f.default if f.default is not dataclasses.MISSING else None
        if value != default:
            text = str(value).lower() if isinstance(value, bool) else str(value)
            parts.append(f"{option_key(f.name)}={text}")
    return f"{pass_.name}{{{','.join(parts)}}}" if parts else pass_.name


def format_pipeline(passes: Sequence[Pass]) -> str:
    """Pipeline text for a list of passes; `parse_pipeline` of it gives the same passes back."""
    return ",".join(format_pass(p) for p in passes)
