"""Config files into typed config: strict YAML (no duplicate keys, no aliases, UTF-8, bounded size),
dotted `--set` overrides, and validation errors as one line naming the file, key and value.
The keys themselves live in ganpipe.config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ganpipe import strict_yaml
from ganpipe.config import CommandConfig, Config
from ganpipe.errors import UserError, shorten, show

MAX_CONFIG_BYTES = 1 << 20  # a config is a few kB; a bigger file is not one (and YAML parsing is slow)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], value parsed as a YAML scalar or flow list)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {show(item)}: expected dotted.key=value")
    try:
        value = strict_yaml.load(raw) if raw.strip() else None
    except strict_yaml.YAMLProblem as exc:
        where = f" (column {exc.column})" if exc.column else ""
        raise UserError(f"--set {shorten(key.strip())}: cannot parse value {show(raw)}{where}: "
                        f"{shorten(exc.problem)}") from None
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        _set_key(raw, path, value, f"--set {'.'.join(path)}")
    return raw


def _set_key(raw: dict[str, Any], path: list[str], value: Any, origin: str) -> None:
    node = raw
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"{origin}: {shorten('.'.join(path[: i + 1]))} is not a section")
        node = child
    node[path[-1]] = value


def _dotted(loc: tuple[int | str, ...]) -> str:
    """('train', 'betas', 0) -> 'train.betas[0]'."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")


def _format_validation_error(origin: str, exc: ValidationError) -> str:
    """One line naming the origin and the key; the offending value is shown bounded (errors.show):
    pydantic's own text would print it whole, however large."""
    first = exc.errors(include_input=True, include_url=False, include_context=False)[0]
    key = shorten(_dotted(first["loc"]))
    if first["type"] == "extra_forbidden":
        return f"{origin}: unknown key '{key}'"
    if first["type"] == "missing":
        return f"{origin}: missing required key '{key}'"
    message = shorten(first["msg"].removeprefix("Value error, "))  # pydantic's prefix for our own validators
    if not first["loc"]:  # a check across sections: its message names the keys
        return f"{origin}: {message}"
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {show(value)})"
    return f"{origin}: key '{key}': {message}{shown}"


def validate_config(raw: dict[str, Any], origin: str) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise UserError(_format_validation_error(origin, exc)) from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML config file's sections, unvalidated. Anything but a readable UTF-8 YAML file of
    sections (missing, a folder, too big, not text, bad or ambiguous YAML: see ganpipe.strict_yaml)
    raises UserError naming the file, and the line when there is one."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"config file {path}: is a folder, not a YAML file")
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise UserError(f"config file {path}: {size} bytes; a config is at most {MAX_CONFIG_BYTES} bytes")
    return _sections(path.read_bytes(), str(path))


def _sections(data: bytes, origin: str) -> dict[str, Any]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise UserError(f"{origin}: not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}, at offset "
                        f"{exc.start})") from None
    try:
        raw = strict_yaml.load(text)
    except strict_yaml.YAMLProblem as exc:
        where = f":{exc.line}:{exc.column}" if exc.line else ""
        raise UserError(f"{origin}{where}: {shorten(exc.problem)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{origin}: expected a mapping of config sections at the top level")
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply `--set` overrides, validate. Bad input raises UserError."""
    raw = apply_overrides(read_config_file(path), overrides or [])
    return validate_config(raw, str(path))


def load_command_config(path: str | Path | None, overrides: list[str],
                        flags: dict[str, tuple[str, Any]] | None = None) -> CommandConfig:
    """A command's settings: the config file (optional), then its `--set` overrides, then its flags
    (`flags`: dotted key -> (the flag, its value), for flags that were given). Only CommandConfig's
    sections are validated, strictly; a pipeline config's other sections are ignored. A bad value
    raises UserError naming the flag, or else the file, and the key."""
    raw = read_config_file(path) if path is not None else {}
    raw = apply_overrides(raw, overrides)
    for key, (flag, value) in (flags or {}).items():
        _set_key(raw, key.split("."), value, flag)
    known = {field.alias or name for name, field in Config.model_fields.items()}
    origin = str(path) if path is not None else "--set"
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(f"{origin}: unknown key '{shorten(unknown[0])}'")
    try:
        return CommandConfig.model_validate({k: v for k, v in raw.items() if k in CommandConfig.model_fields})
    except ValidationError as exc:
        key = ".".join(str(p) for p in exc.errors()[0]["loc"])
        flag = next((name for dotted, (name, _) in (flags or {}).items() if f"{key}.".startswith(f"{dotted}.")), None)
        raise UserError(_format_validation_error(flag or origin, exc)) from None


def config_from_yaml_text(text: str, origin: str) -> Config:
    """Re-read a config saved with a run (already validated once; still strict)."""
    return validate_config(_sections(text.encode(), origin), origin)
