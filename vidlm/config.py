"""Typed job configuration: one YAML file plus ``key=value`` overrides, validated at load.

Every job (``vidlm features``, ``recaption``, ``serve``, ``train``...) has one pydantic model,
a subclass of :class:`JobConfig`. Defaults live only on the model fields; shipped YAML files state
the recipe's own choices. Loading is one way::

    YAML file  ->  dict  ->  overrides applied (dotted keys)  ->  model_validate  ->  frozen config

Errors name the field: ``ConfigError: sampling.num_frames: Input should be greater than 0 (got 0)``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = [
    "ConfigError",
    "JobConfig",
    "Section",
    "apply_overrides",
    "config_differences",
    "flat_fields",
    "load_config",
    "validate_config",
    "with_section_defaults",
]


class ConfigError(ValueError):
    """A configuration that cannot be loaded: unknown field, bad value or contradictory settings.

    The message names every offending field by its dotted path.
    """


class Section(BaseModel):
    """Base for config sections: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class JobConfig(Section):
    """Base for a job's top-level config."""


C = TypeVar("C", bound=JobConfig)


def _parse_value(text: str) -> Any:
    """Parse the right-hand side of ``key=value`` as YAML (``16`` -> int, ``[1, 2]`` -> list)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with dotted ``key=value`` overrides applied.

    Args:
        data: the nested mapping read from YAML.
        overrides: strings such as ``"sampling.num_frames=8"``; values are parsed as YAML.

    Raises:
        ConfigError: an override without ``=``, or one that descends into a non-mapping.
    """
    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. sampling.num_frames=8")
        node = out
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: depth + 1])} is not a section")
            node = child
        node[parts[-1]] = _parse_value(raw)
    return out


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
        lines.append(f"{loc}: {e['msg']}{got}")
    return "; ".join(lines)


def with_section_defaults(cls: type[BaseModel], data: dict[str, Any], default: BaseModel | None = None) -> dict:
    """``data`` for a section of type ``cls`` with the values its default instance sets filled in, recursively.

    A job may give a shared section its own defaults (``generation: GenerationConfig = GenerationConfig(
    max_tokens=1024)``); a YAML or override that sets only some of its fields (``generation.temperature=0``)
    keeps the job's other defaults instead of falling back to the class's. Plain ``dict`` fields are values, not
    sections: a mapping given for one replaces the default.

    Args:
        cls: the section's model.
        data: the mapping given for it.
        default: the section's default instance (``None``: the field defaults of ``cls``).
    """
    merged = dict(data)
    if default is not None:
        for name in default.model_fields_set:
            merged.setdefault(name, getattr(default, name))
    for name, field in cls.model_fields.items():
        section = field.annotation
        if isinstance(merged.get(name), dict) and isinstance(section, type) and issubclass(section, BaseModel):
            inner = getattr(default, name) if default is not None else field.default
            merged[name] = with_section_defaults(section, merged[name], inner if isinstance(inner, BaseModel) else None)
    return merged


def validate_config(cls: type[C], data: dict[str, Any]) -> C:
    """Validate a mapping into ``cls`` (its sections' own defaults kept: :func:`with_section_defaults`); raises
    :class:`ConfigError` naming each bad field."""
    try:
        return cls.model_validate(with_section_defaults(cls, data))
    except ValidationError as err:
        raise ConfigError(f"{cls.__name__}: {_format_validation_error(err)}") from None


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Load a job config from a YAML file (optional) and dotted overrides.

    Args:
        cls: the job's config model.
        path: YAML file; ``None`` starts from the model's defaults.
        overrides: ``key=value`` strings applied after the file.

    Raises:
        ConfigError: missing file, YAML that is not a mapping, or a field that fails validation.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text())
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level, got {type(loaded).__name__}")
        data = loaded
    return validate_config(cls, apply_overrides(data, overrides or []))


def flat_fields(config: BaseModel, skip: frozenset[str] = frozenset(), skip_sections: tuple[str, ...] = ()) -> dict:
    """``{"section.field": value}`` of a config as JSON values, for recording and comparing configurations.

    Args:
        skip: field names left out with everything under them (``placement`` drops ``decode.placement.*``).
        skip_sections: top-level sections left out.
    """

    def walk(value: Any, prefix: str) -> dict[str, Any]:
        if isinstance(value, dict):
            flat: dict[str, Any] = {}
            for key, item in value.items():
                if key not in skip:
                    flat.update(walk(item, f"{prefix}{key}."))
            return flat
        return {prefix.rstrip("."): value}

    return {
        key: value
        for key, value in walk(config.model_dump(mode="json"), "").items()
        if key.split(".", 1)[0] not in skip_sections
    }


def config_differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``"key: old -> new"`` for every key whose value differs between two :func:`flat_fields` records."""
    return [
        f"{key}: {before.get(key, '<unset>')!r} -> {now.get(key, '<unset>')!r}"
        for key in sorted(set(before) | set(now))
        if before.get(key) != now.get(key)
    ]
