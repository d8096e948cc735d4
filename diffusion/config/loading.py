"""Config files, overrides of single values, and configs saved as JSON.

A config file is a Python file with ``get_config() -> ml_collections.ConfigDict`` (U-ViT's convention). Override
values are converted to the type already in the config; a key the config does not have is an error that names it.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import shlex
import traceback
from collections.abc import Iterable
from pathlib import Path

import ml_collections

from diffusion.config.schema import base_config
from diffusion.errors import ConfigError
from diffusion.registry import OBJECTIVES, constructor_keywords, diffusion_keywords


def load_config(path: str | Path, overrides: Iterable[tuple[str, str]] = ()) -> ml_collections.ConfigDict:
    """Run a config file's ``get_config()``, then apply ``overrides`` (dotted key, value text) in order: the one
    "load, then override" of every entry point. The file's mistakes (syntax errors, exceptions) become one
    ConfigError naming the file and line, not a traceback into the loader."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"{path} defines no get_config()")
        config = module.get_config()
    except SyntaxError as err:
        text = f": {err.text.strip()}" if err.text and err.text.strip() else ""
        raise ConfigError(f"{err.filename or path}:{err.lineno}: syntax error in the config file: {err.msg}{text}"
                          ) from None
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 -- any mistake in the user's file is reported the same way
        lines = [f.lineno for f in traceback.extract_tb(err.__traceback__) if Path(f.filename) == path]
        where = f"{path}:{lines[-1]}" if lines else str(path)
        raise ConfigError(f"{where}: the config file raised {type(err).__name__}: {err}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, expected an "
                          f"ml_collections.ConfigDict (start from diffusion.config.base_config())")
    for key, value in overrides:
        apply_override(config, key, value)
    return config


BOOLEAN_WORDS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


def parse_value(text: str, current):
    """``text`` as a value of the type of ``current`` (the value it replaces, or a type's example: ``True``, ``0``,
    ``0.0``, ``""``): the one parser of config overrides and command-line flags. Booleans are the words of
    ``BOOLEAN_WORDS`` in any case; ``None`` (a key without a typed default) reads Python literals, else a string."""
    if isinstance(current, bool):
        if text.lower() not in BOOLEAN_WORDS:
            raise ConfigError(f"expected a boolean, got {text!r}")
        return BOOLEAN_WORDS[text.lower()]
    if isinstance(current, (int, float)):
        try:
            return type(current)(ast.literal_eval(text)) if isinstance(current, float) else int(text)
        except (ValueError, SyntaxError, TypeError) as err:
            raise ConfigError(f"expected a {type(current).__name__}, got {text!r}") from err
    if isinstance(current, str):
        return text
    try:  # None, tuples, lists: Python literals; anything else stays a string
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return tuple(value) if isinstance(current, tuple) and isinstance(value, list) else value


# Settings each diffusion kind's builder reads from the ``diffusion`` section besides ``kind``: its keyword arguments.
DIFFUSION_KEYWORDS = {kind: diffusion_keywords(kind) for kind in OBJECTIVES}


def _settable_keywords(config: ml_collections.ConfigDict, section: str) -> tuple[str, ...]:
    """Keys of ``model`` (the backbone's constructor keywords) or ``diffusion`` (the kind's builder settings) that
    may be set although the config file leaves them out."""
    if section not in config:
        return ()
    if section == "diffusion":
        return DIFFUSION_KEYWORDS.get(config.diffusion.get("kind", ""), ())
    return tuple(sorted(constructor_keywords(config.model.get("name", ""))))


def apply_override(config: ml_collections.ConfigDict, dotted_key: str, text: str) -> None:
    node, parts = config, dotted_key.split(".")
    if (len(parts) == 2 and parts[0] in ("model", "diffusion") and parts[1] not in config.get(parts[0], {})
            and parts[1] in _settable_keywords(config, parts[0])):
        config[parts[0]][parts[1]] = parse_value(text, None)
        return
    for depth, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            where = ".".join(parts[:depth]) or "config"
            known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            if depth == 1 and parts[0] in ("model", "diffusion"):  # plus the keywords its builder accepts
                known = sorted(set(known) | set(_settable_keywords(config, parts[0])))
            close = difflib.get_close_matches(part, known, n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"unknown config key '{dotted_key}': {where} has no '{part}'.{hint} "
                              f"Known keys there: {', '.join(sorted(known))}")
        if depth < len(parts) - 1:
            node = node[part]
    current = node[parts[-1]]
    if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"'{dotted_key}' is a section, not a value; set one of its keys")
    try:
        node[parts[-1]] = parse_value(text, current)
    except ConfigError as err:
        raise ConfigError(f"bad value for '{dotted_key}': {err}") from None


def config_to_json(config: ml_collections.ConfigDict) -> str:
    return config.to_json(indent=2, sort_keys=True)


def config_from_json(text: str) -> ml_collections.ConfigDict:
    """A saved config, with keys added to ``base_config()`` since it was written filled in from the defaults."""
    def tuples(obj):  # JSON has no tuples; the configs use them for betas
        if isinstance(obj, dict):
            return {k: tuples(v) for k, v in obj.items()}
        return tuple(obj) if isinstance(obj, list) else obj

    def merge(defaults: dict, saved: dict) -> dict:
        out = dict(defaults)
        for key, value in saved.items():
            both_dicts = isinstance(value, dict) and isinstance(defaults.get(key), dict)
            # diffusion sections hold kind-specific keys: a default for one kind must not leak into another
            out[key] = merge(defaults[key], value) if both_dicts and key != "diffusion" else value
        return out

    return ml_collections.ConfigDict(merge(base_config().to_dict(), tuples(json.loads(text))))


def flatten_config(config: ml_collections.ConfigDict | dict, prefix: str = "") -> dict:
    """{"train.steps": 1000, ...}: every value under its dotted key (tuples and lists compare as lists)."""
    items = config.items() if isinstance(config, dict) else config.to_dict().items()
    flat = {}
    for key, value in items:
        if isinstance(value, (dict, ml_collections.ConfigDict)):
            flat.update(flatten_config(value if isinstance(value, dict) else value.to_dict(), f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def override_flag(key: str, value) -> str:
    """``--config.<key>=<value>`` as typed in a shell (quoted where needed); parses back to ``value``."""
    return shlex.quote(f"--config.{key}={value}")


def describe_config(config: ml_collections.ConfigDict) -> str:
    """The config's keys and values as ``--config.<key>=<value>`` lines (for ``--help``), plus the keys that are
    settable although the file leaves them at their defaults (backbone keywords, diffusion settings)."""
    lines = [f"  {override_flag(key, value)}" for key, value in flatten_config(config).items()]
    for section in ("model", "diffusion"):
        unset = sorted(set(_settable_keywords(config, section)) - set(config[section]))
        if unset:
            default = "the preset's or the constructor's" if section == "model" else "the builder's"
            lines.append(f"  also settable (now at {default} default): "
                         + ", ".join(f"{section}.{name}" for name in unset))
    return "\n".join(lines)
