"""The one command-line mechanism of every entry point: flags generated from dataclass fields, YAML nested by group.

Every entry point (``train.py``, ``python -m eval.linear``, ``python -m eval.export``, ``python -m shards``,
``python -m benchmarks``, ``demo.py``) builds its parser here, so all of them read the same way:

- one ``--field-name`` flag per dataclass field, its help text from the field (``option(default, help)``) or from
  the class docstring's ``Args:`` section; allowed values shown as ``{a,b,c}``; exactly one ``(default: ...)``;
  booleans as ``--flag/--no-flag``;
- ``--config FILE.yaml`` nested by group (``data: {batch_size: 256}``, ``linear: {lr: 0.1}``) sets defaults, flags
  override it, ``--print-config`` prints the resolved YAML and exits;
- every mistake (unknown flag, wrong type, non-finite number, invalid value) is a :class:`ConfigError` whose
  message is one line naming the field; :func:`guard` prints it as ``error: ...`` and returns exit code 2.

Validation convention: a config dataclass checks itself in ``__post_init__`` and raises ConfigError.

Only the standard library and PyYAML (imported when a file is read or written). Each entry point's ``main()``
parses first and imports torch, DALI and W&B after, so ``--help`` and a mistake answer in a fraction of a second
(tests/test_cli.py checks that torch is not imported by then).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal


class UserError(ValueError):
    """A mistake in what the user gave (a missing file, an unreadable checkpoint), found after parsing; the message
    is one line. Entry points import their heavy modules after parsing, so :func:`guard` catches this base class
    rather than each module's own error type (``CheckpointError``, ``LabelledSetError``)."""


class ConfigError(UserError):
    """A user-facing configuration mistake; its message is one line that names the field."""


def option(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field whose help text ``--help`` shows (give the recommended value and why)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **metadata})
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _docstring_args(cls: type) -> dict[str, str]:
    """``{name: text}`` from the ``Args:`` section of a Google-style class docstring."""
    found: dict[str, str] = {}
    lines = (cls.__doc__ or "").splitlines()
    inside, name, indent = False, "", 0
    for line in lines:
        stripped = line.strip()
        if stripped == "Args:":
            inside, indent = True, -1
            continue
        if not inside:
            continue
        if not stripped:
            if name:
                break
            continue
        here = len(line) - len(line.lstrip())
        if indent < 0:
            indent = here
        match = re.match(r"(\w+)(?: \(.*?\))?: (.*)", stripped)
        if here == indent and match:
            name = match.group(1)
            found[name] = match.group(2)
        elif here > indent and name:
            found[name] += " " + stripped
        else:
            break
    return found


def field_help(cls: type, f: dataclasses.Field) -> str:
    """The help text of a field: its ``option(..., help)`` metadata, else its line in the class docstring."""
    return f.metadata.get("help") or _docstring_args(cls).get(f.name, "").replace("``", "")


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def is_group(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


# ----------------------------------------------------------------------------- values


def coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert ``value`` (from YAML or a flag's string) to ``tp`` or raise a one-line ConfigError naming ``name``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list; got {value!r}")
        return origin(coerce(v, item_tp, name) for v in value)
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{name}: union types are not supported in config")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be a boolean (true/false); got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{name} must be an integer; got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{name} must be a number; got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{name} must be a finite number; got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name} must be a string; got {value!r}")
    raise ConfigError(f"{name}: unsupported field type {tp}")


def _label(prefix: str, name: str) -> str:
    return "--" + name.replace("_", "-") if prefix == "--" else prefix + name


def build(cls: type, values: Mapping[str, Any] | None, source: str = "config", prefix: str = "",
          construct: bool = True) -> Any:
    """A dataclass from a mapping; fields whose type is a dataclass (groups) take a nested mapping.

    Args:
        cls: the dataclass; its ``__post_init__`` may raise ConfigError.
        values: field values (missing ones keep their defaults), strings coerced to the field's type.
        source: where the values come from, named in unknown-key errors (a file name, "command line").
        prefix: how fields are named in errors: ``"data."`` gives ``data.batch_size``, ``"--"`` gives ``--batch-size``.
        construct: False checks keys and types only and returns the coerced mapping (no ``__post_init__``: a file's
            values may be valid only together with flags that override some of them).

    Raises:
        ConfigError: unknown key, wrong type, non-finite number or invalid value (one line).
    """
    values = {} if values is None else values
    if not isinstance(values, Mapping):
        where = f"'{prefix.rstrip('.')}'" if prefix.endswith(".") else "the top level"
        raise ConfigError(f"{source}: {where} must be a mapping of fields")
    hints = field_types(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            renamed = getattr(cls, "RENAMED", {}).get(key)  # {old: new} field names, for old YAML files
            if renamed:
                raise ConfigError(f"{source}: '{_label(prefix, str(key))}' was renamed '{_label(prefix, renamed)}'")
            if not prefix and all(is_group(hints[k]) for k in known):
                raise ConfigError(f"{source}: unknown group '{key}' (expected one of {', '.join(sorted(known))})")
            raise ConfigError(f"{source}: unknown key '{_label(prefix, str(key))}'")
    kwargs = {}
    for key, value in values.items():
        if is_group(hints[key]):
            kwargs[key] = build(hints[key], value, source, prefix=f"{prefix}{key}.", construct=construct)
        else:
            kwargs[key] = coerce(value, hints[key], _label(prefix, key))
    return cls(**kwargs) if construct else kwargs


def to_dict(obj: Any) -> dict[str, Any]:
    """The nested plain-dict form of a dataclass (what YAML, checkpoints and W&B store)."""
    return dataclasses.asdict(obj)


def load_yaml(path: str | Path) -> Any:
    """The parsed content of a YAML file; a missing or malformed file is a one-line ConfigError."""
    import yaml

    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config ({str(exc).splitlines()[0]})") from None
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path}: invalid YAML ({first})") from None


def dump_yaml(obj: Any) -> str:
    """A dataclass (or a plain mapping) as YAML text that :func:`build` reads back."""
    import yaml

    return yaml.safe_dump(obj if isinstance(obj, Mapping) else to_dict(obj), sort_keys=False)


# ----------------------------------------------------------------------------- the command line


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's help with booleans written ``--flag/--no-flag`` and a wider option column."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=36, width=120)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if isinstance(action, argparse.BooleanOptionalAction):
            return "/".join(action.option_strings)
        return super()._format_action_invocation(action)


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose mistakes raise ConfigError (one line, exit code 2 via :func:`guard`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


def _metavar(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "{" + ",".join(map(str, typing.get_args(tp))) + "}"
    if origin in (list, tuple):
        return f"{_metavar(typing.get_args(tp)[0])},..."
    return {int: "N", float: "X"}.get(tp, "TEXT")


def _show_default(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "none"
    return repr(value) if value == "" else str(value)


def add_flags(parser: argparse.ArgumentParser | Any, cls: type, skip: tuple[str, ...] = ()) -> list[str]:
    """Add one ``--field-name`` flag per field of ``cls`` (except ``skip``); their defaults stay unset (None).

    Returns:
        The field names that got a flag (read them back with :func:`flag_values`).
    """
    hints = field_types(cls)
    names = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, flag = hints[f.name], "--" + f.name.replace("_", "-")
        text = f"{field_help(cls, f)} (default: {_show_default(field_default(f))})".replace("%", "%%")
        if tp is bool:
            parser.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction, help=text)
        else:
            metavar = f.metadata.get("metavar") or _metavar(tp)
            parser.add_argument(flag, dest=f.name, default=None, metavar=metavar, help=text)
        names.append(f.name)
    return names


def flag_values(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """The flags that were given on the command line, by field name."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def parse(cls: type, argv: list[str] | None = None, *, group: str | None = None, description: str = "",
          prog: str | None = None) -> Any:
    """Resolve defaults <- ``--config`` YAML <- flags into a validated ``cls``.

    Args:
        cls: either a dataclass of groups (every field a dataclass, like ``config.Config``; the YAML holds one
            mapping per group and every group's field is a flag, so field names must be unique across groups) or,
            with ``group``, one flat dataclass that the YAML nests under ``group:`` (``linear: {lr: 0.1}``).
        argv: the arguments (default: ``sys.argv[1:]``).
        group: the YAML key of a flat ``cls``.
        description: the first paragraph of ``--help``.
        prog: the program name in usage lines (default: argparse's).

    Raises:
        ConfigError: unknown flag or key, wrong type, invalid value (one line, names the field).
        SystemExit: after ``--help`` (printed) or ``--print-config`` (the resolved YAML printed), code 0.
    """
    hints = field_types(cls)
    groups = {group: cls} if group else {f.name: hints[f.name] for f in dataclasses.fields(cls)}
    if not all(is_group(sub) for sub in groups.values()):
        raise TypeError(f"{cls.__name__}: pass group= for a flat dataclass, or give every field a dataclass type")
    parser = ArgumentParser(prog=prog, description=description,
                            usage="%(prog)s [--config FILE.yaml] [--print-config] [--FLAG VALUE ...]")
    parser.add_argument("--config", default=None, metavar="FILE.yaml",
                        help=f"YAML file with defaults, nested by group ({', '.join(f'{g}:' for g in groups)}); "
                             "flags override it.")
    parser.add_argument("--print-config", action="store_true", help="Print the resolved config as YAML and exit.")
    flags = {}
    for name, sub in groups.items():
        doc = (sub.__doc__ or "").strip().split("\n\n")[0]
        flags[name] = add_flags(parser.add_argument_group(name, doc), sub)
    args = parser.parse_args(argv)

    source = str(args.config) if args.config else "config"
    values = load_yaml(args.config) if args.config else {}
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: top level must be a mapping of groups ({', '.join(groups)})")
    for name in values:
        if name not in groups:
            raise ConfigError(f"{source}: unknown group '{name}' (expected one of {', '.join(groups)})")
    if args.config:  # unknown keys and wrong types named with the file, before flags mix in
        for name, sub in groups.items():
            build(sub, values.get(name), source, prefix=f"{name}.", construct=False)
    merged = {}
    for name in groups:
        merged[name] = {**(values.get(name) or {}), **flag_values(args, flags[name])}
    if group:
        result = build(cls, merged[group], "command line", prefix=f"{group}.")
    else:
        result = build(cls, merged, "command line")
    if args.print_config:
        print(dump_yaml({group: to_dict(result)} if group else result), end="")
        raise SystemExit(0)
    return result


def guard(fn: Callable[[], int | None], user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run an entry point's body: UserError (ConfigError included) and ``user_errors`` become ``error: <one line>``
    and exit code 2.

    Returns:
        The body's exit code (None counts as 0), or 2 after a user mistake.
    """
    try:
        code = fn()
    except (UserError, *user_errors) as exc:
        print(f"error: {str(exc).strip()}", file=sys.stderr)
        return 2
    return 0 if code is None else int(code)
