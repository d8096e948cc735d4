"""The command line of every entry point."""

from __future__ import annotations

from diffusion.config.loading import _parse_value, apply_override, load_config
from diffusion.errors import ConfigError


def parse_command_line(argv: list[str], flags: dict[str, str | None] | None = None, require_config: bool = True):
    """Parse ``--config=FILE``, ``--config.a.b=V`` and the extra ``--name=V`` flags listed in ``flags`` (name ->
    default). Returns (config or None, {flag: value}). Accepts ``--flag value`` as well as ``--flag=value``; a flag
    whose default is a bool is a switch: ``--name`` alone sets it, ``--name=false`` clears it."""
    flags = dict(flags or {})
    config_path, overrides, values = None, [], dict(flags)
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; flags look like --name=value")
        name, eq, value = arg[2:].partition("=")
        switch = isinstance(flags.get(name), bool)
        if not eq and not switch:
            if not args:
                raise ConfigError(f"flag --{name} needs a value")
            value = args.pop(0)
        if name == "config":
            config_path = value
        elif name.startswith("config."):
            overrides.append((name[len("config."):], value))
        elif switch:
            try:
                values[name] = _parse_value(value, True) if eq else True
            except ConfigError as err:
                raise ConfigError(f"bad value for --{name}: {err}") from None
        elif name in flags:
            values[name] = value
        else:
            known = ", ".join(["--config", "--config.<key>"] + [f"--{f}" for f in flags])
            raise ConfigError(f"unknown flag --{name}; known flags: {known}")
    values["config_path"] = config_path
    if config_path is None:
        if require_config or overrides:
            raise ConfigError("missing --config=configs/<name>.py")
        return None, values
    config = load_config(config_path)
    for key, value in overrides:
        apply_override(config, key, value)
    return config, values


def split_overrides(argv: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """Pull ``--config.key=value`` (or ``--config.key value``) out of argv; the rest goes to argparse."""
    overrides, rest, args = [], [], list(argv)
    while args:
        arg = args.pop(0)
        if arg.startswith("--config."):
            key, eq, value = arg[len("--config."):].partition("=")
            if not eq:
                if not args:
                    raise ConfigError(f"flag {arg} needs a value")
                value = args.pop(0)
            overrides.append((key, value))
        else:
            rest.append(arg)
    return overrides, rest
