"""The command line of every entry point: one flag syntax, one value parser, one ``--help``, one exit on user errors.

An entry point declares a :class:`Command` -- its docstring, a table of :class:`Flag` s, whether it reads
``--config=FILE`` and takes ``--config.<key>=<value>`` overrides, its positional arguments -- and hands its body to
:func:`run_main`. Flags are ``--name=value`` or ``--name value``; a boolean flag alone means true; values are read by
the config's parser (:func:`diffusion.config.loading.parse_value`: booleans are true/false/1/0/yes/no); hyphens in a
flag's name read as underscores (``--save-stats`` is ``--save_stats``). A :class:`~diffusion.errors.UserError`
anywhere becomes ``error: <message>`` on stderr and exit status 2.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from diffusion.config.loading import BOOLEAN_WORDS, describe_config, load_config, parse_value
from diffusion.errors import ConfigError, UserError

EXIT_USER_ERROR = 2
TYPE_EXAMPLES = {bool: True, int: 0, float: 0.0, str: ""}  # what parse_value reads each type from
METAVARS = {int: "INT", float: "FLOAT", str: "TEXT"}


@dataclass(frozen=True)
class Flag:
    """One ``--name`` of a command. ``many``: "" one value, "+" one or more, "*" zero or more (``--name a b``),
    "append" one value per occurrence, collected in a list."""

    name: str
    default: Any = None
    type: type = str  # str | int | float | bool
    help: str = ""
    choices: tuple = ()
    many: str = ""
    required: bool = False
    metavar: str = ""
    group: str = ""  # a heading in --help

    def parse(self, text: str):
        try:
            value = parse_value(text, TYPE_EXAMPLES[self.type])
        except ConfigError as err:
            raise ConfigError(f"bad value for --{self.name}: {err}") from None
        if self.choices and value not in self.choices:
            raise ConfigError(f"bad value for --{self.name}: expected one of {', '.join(map(str, self.choices))}, "
                              f"got {text!r}")
        return value

    def usage(self) -> str:
        if self.type is bool:
            return f"--{self.name}" if self.default is False else f"--{self.name}=BOOL"
        value = "|".join(map(str, self.choices)) if self.choices else self.metavar or METAVARS[self.type]
        if self.many == "+":
            return f"--{self.name} {value} [{value} ...]"
        if self.many == "*":
            return f"--{self.name} [{value} ...]"
        return f"--{self.name}={value}"


@dataclass(frozen=True)
class Command:
    """What an entry point accepts. ``config``: "required" | "optional" | "none" (no ``--config=FILE``);
    ``overrides``: whether ``--config.<key>=<value>`` flags are taken; ``positional``: the name of the positional
    arguments in --help ("" when the command takes none), ``positional_help`` what they are."""

    doc: str
    flags: tuple[Flag, ...] = ()
    config: str = "required"
    overrides: bool = True
    positional: str = ""
    positional_help: str = ""

    def flag(self, name: str) -> Flag | None:
        return next((f for f in self.flags if f.name == name), None)


@dataclass
class Arguments:
    """A parsed command line: every flag's value (``args.name``), the config file, the overrides in order, and the
    positional arguments."""

    values: dict[str, Any]
    config_path: str | None = None
    overrides: list[tuple[str, str]] = field(default_factory=list)
    positional: list[str] = field(default_factory=list)

    def __getattr__(self, name: str):
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def load_config(self):
        """The config file with the overrides applied, or None without ``--config``."""
        if self.config_path is None:
            return None
        return load_config(self.config_path, self.overrides)


# ----------------------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------------------


def _known(command: Command) -> str:
    names = (["--config=FILE"] if command.config != "none" else []) + (["--config.key=value"] if command.overrides
                                                                        else [])
    return ", ".join(names + [f"--{f.name}" for f in command.flags])


def _take_values(flag: Flag, eq: bool, value: str, args: list[str]) -> list[str]:
    """The texts of one occurrence of ``flag``; consumes them from ``args``."""
    if eq:
        return [value]
    if flag.type is bool:  # a switch; "--name false" still reads as a value
        return [args.pop(0)] if args and args[0].lower() in BOOLEAN_WORDS else ["true"]
    if flag.many in ("+", "*"):
        texts = []
        while args and not args[0].startswith("--"):
            texts.append(args.pop(0))
        if not texts and flag.many == "+":
            raise ConfigError(f"flag --{flag.name} needs at least one value")
        return texts
    if not args:
        raise ConfigError(f"flag --{flag.name} needs a value")
    return [args.pop(0)]


def _config_flag(command: Command, parsed: Arguments, name: str, eq: bool, value: str, args: list[str]) -> None:
    if not eq:
        if not args:
            raise ConfigError(f"flag --{name} needs a value")
        value = args.pop(0)
    if name == "config":
        if command.config == "none":
            raise ConfigError(f"this command takes no --config=FILE; known flags: {_known(command)}")
        parsed.config_path = value
    elif command.overrides:
        parsed.overrides.append((name[len("config."):], value))
    else:
        raise ConfigError(f"this command takes no --config.<key> overrides; known flags: {_known(command)}")


def parse_arguments(argv: Sequence[str], command: Command, check_required: bool = True) -> Arguments:
    """``argv`` read against ``command``; a ConfigError names the first flag that is wrong."""
    parsed = Arguments({f.name: list(f.default) if f.many and f.default is not None else f.default
                        for f in command.flags})
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            if not command.positional:
                raise ConfigError(f"unexpected argument {arg!r}; flags look like --name=value")
            parsed.positional.append(arg)
            continue
        name, eq, value = arg[2:].partition("=")
        if name == "config" or name.startswith("config."):
            _config_flag(command, parsed, name, bool(eq), value, args)
            continue
        flag = command.flag(name.replace("-", "_"))
        if flag is None:
            raise ConfigError(f"unknown flag --{name}; known flags: {_known(command)}")
        values = [flag.parse(text) for text in _take_values(flag, bool(eq), value, args)]
        if flag.many == "append":
            parsed.values[flag.name] = [*(parsed.values[flag.name] or []), *values]
        else:
            parsed.values[flag.name] = values if flag.many else values[0]
    if check_required:
        if command.config == "required" and parsed.config_path is None:
            raise ConfigError("missing --config=configs/<name>.py")
        missing = [f for f in command.flags if f.required and parsed.values[f.name] in (None, [])]
        if missing:
            raise ConfigError(f"missing {missing[0].usage()} ({missing[0].help})")
    return parsed


def parse_command_line(argv: list[str], flags: dict[str, Any] | None = None, require_config: bool = True):
    """Parse ``--config=FILE``, ``--config.a.b=V`` and the extra ``--name=V`` flags listed in ``flags`` (name ->
    default; a bool default makes a switch). Returns (config or None, {flag: value, "config_path": FILE})."""
    command = Command("", tuple(Flag(name, default, bool if isinstance(default, bool) else str)
                                for name, default in (flags or {}).items()),
                      config="required" if require_config else "optional")
    parsed = parse_arguments(argv, command)
    if parsed.config_path is None and parsed.overrides:
        raise ConfigError("missing --config=configs/<name>.py")
    return parsed.load_config(), {**parsed.values, "config_path": parsed.config_path}


# ----------------------------------------------------------------------------------------------------------
# --help and the one exit for user errors
# ----------------------------------------------------------------------------------------------------------


def _row(usage: str, text: str) -> list[str]:
    width = 32
    body = textwrap.wrap(text, 118 - width) or [""]
    if len(usage) > width - 3:
        return [f"  {usage}", *(f"{'':{width}}{line}" for line in body)]
    return [f"  {usage:{width - 2}}{body[0]}", *(f"{'':{width}}{line}" for line in body[1:])]


def _describe(flag: Flag) -> str:
    text = flag.help
    if flag.required:
        text += " (required)"
    elif flag.default not in (None, False, "", []) and "default" not in text:
        shown = ", ".join(map(str, flag.default)) if isinstance(flag.default, (list, tuple)) else flag.default
        text += f" (default: {str(shown).lower() if isinstance(shown, bool) else shown})"
    if flag.many == "append":
        text += " (repeatable)"
    return text.strip()


def help_text(command: Command, parsed: Arguments | None = None) -> str:
    """The entry point's docstring, its flags, and with a config file that config's keys and values."""
    lines = [command.doc.strip(), ""]
    if command.positional:
        lines += ["Arguments:", *_row(command.positional, command.positional_help), ""]
    lines += ["Flags:"]
    if command.config != "none":
        lines += _row("--config=FILE", "the config file (a Python file with get_config())"
                      + (" (required)" if command.config == "required" else ""))
    if command.overrides:
        lines += _row("--config.<section>.<key>=VALUE", "override one config value"
                      + ("; --help --config=FILE lists them" if command.config != "none" else ""))
    group = ""
    for flag in command.flags:
        if flag.group != group:
            group = flag.group
            lines += ["", f"{group}:"] if group else [""]
        lines += _row(flag.usage(), _describe(flag))
    lines += [""] + _row("--help", "this text (with a config file: its keys and values)")
    parsed = parsed or Arguments({})
    path = parsed.config_path or next((p for p in parsed.positional if p.endswith(".py")), None)
    if path is not None:
        config = load_config(path, parsed.overrides)
        lines += ["", f"Keys of {path} with the overrides given (set any with --config.<key>=<value>):",
                  describe_config(config)]
    elif command.config != "none":
        lines += ["", "Add --config=FILE to list that config's keys and values."]
    return "\n".join(lines)


def run_main(command: Command, argv: Sequence[str], body: Callable[[Arguments], int | None]) -> int:
    """Parse ``argv`` and run ``body(arguments)``; ``-h``/``--help`` prints :func:`help_text` instead. A UserError
    raised anywhere is printed as ``error: <message>`` on stderr and gives exit status 2."""
    argv = [str(a) for a in argv]
    try:
        if "-h" in argv or "--help" in argv:
            rest = [a for a in argv if a not in ("-h", "--help")]
            print(help_text(command, parse_arguments(rest, command, check_required=False)))
            return 0
        return body(parse_arguments(argv, command)) or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
