"""Settings dataclasses as command lines: one flag per field, mirrored by an environment variable, typed by its
annotation.

Size: one helper (fields to flags, variables, presets and nested groups) that every command shares; its parts only
make sense together.

A settings class is a frozen dataclass whose fields carry their help line (``setting(default, help=...)``) and
validate themselves in ``__post_init__``. :class:`CommandLine` turns it into an argparse parser and resolves values
with one precedence for every command::

    field default < preset (--preset / <PREFIX>PRESET) < environment variable <PREFIX><NAME> < flag --<name>

A field may hold a nested settings dataclass (:func:`group`): the fields it exposes become flags of the outer class
under names of their own (``sdm_learning_rate`` -> ``sdm.learning_rate``), so a CLI keeps flat flags while the code
passes one object. :func:`build` and :func:`flatten` convert between those flat names and the nested object.

The text of a flag or variable is parsed by the field's annotation: ``bool`` (1/true/yes/on, 0/false/no/off), ``int``,
``float``, ``str``, ``tuple[T, ...]`` (comma-separated), ``T | None`` (``none`` is None), or a ``parse`` function
given in the field's metadata. An empty environment variable counts as unset.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

__all__ = [
    "CommandLine",
    "Option",
    "SettingsError",
    "build",
    "flatten",
    "group",
    "options",
    "parse_device",
    "parse_text",
    "setting",
]

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
# Devices a setting may name: torch's CPU, every CUDA device, Apple's Metal; ``auto`` picks at run time.
DEVICE_HELP = "auto (the first GPU when there is one, else the CPU), cpu, cuda, cuda:N or mps"


class SettingsError(ValueError):
    """A flag, environment variable or preset value cannot be parsed; the message names where it came from."""


def setting(
    default: Any = MISSING,
    *,
    help: str,
    default_factory: Callable[[], Any] | Any = MISSING,
    choices: Sequence[str] | None = None,
    metavar: str | None = None,
    required: bool = False,
    parse: Callable[[str], Any] | None = None,
    flag: str | None = None,
    repeat: bool = False,
) -> Any:
    """A dataclass field that is also a flag: ``help`` is its --help line; ``choices`` and ``metavar`` go to argparse;
    ``required`` only changes the help (validation stays in the class); ``parse`` reads the text of a flag/variable;
    ``flag`` names the flag (and variable) when it differs from the field; ``repeat``: a tuple field whose flag may
    be given several times (its variable is comma-separated)."""
    metadata = {
        "help": help,
        "choices": tuple(choices) if choices else None,
        "metavar": metavar,
        "required": required,
        "parse": parse,
        "flag": flag,
        "repeat": repeat,
    }
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def group(cls: type, flags: Mapping[str, tuple[str, str]], **defaults: Any) -> Any:
    """A field holding a nested settings dataclass ``cls``; ``flags`` maps each exposed flat name to (its field in
    ``cls``, its help line). ``defaults`` override ``cls``'s own defaults for this use."""
    inner = {f.name for f in fields(cls)}
    unknown = sorted(path for path, _ in flags.values() if path not in inner)
    if unknown:
        raise TypeError(f"group({cls.__name__}) exposes fields it does not have: {unknown}")
    return field(default_factory=lambda: cls(**defaults), metadata={"group": {"cls": cls, "flags": dict(flags)}})


@dataclass(frozen=True)
class Option:
    """One flag: ``name`` is the flat name (``--name-with-dashes``, variable ``<PREFIX>NAME``), ``path`` the attributes
    that reach its value in the settings object."""

    name: str
    path: tuple[str, ...]
    kind: Any
    help: str
    default: Any
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    required: bool = False
    parse: Callable[[str], Any] | None = None
    repeat: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def variable(self, prefix: str) -> str:
        return prefix + self.name.upper()


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


def options(cls: type) -> list[Option]:
    """Every flag of settings class ``cls``, nested groups flattened, in field order."""
    hints = typing.get_type_hints(cls)
    found: list[Option] = []
    for f in fields(cls):
        meta = f.metadata
        if "group" in meta:
            inner_cls = meta["group"]["cls"]
            inner_hints = typing.get_type_hints(inner_cls)
            inner_fields = {g.name: g for g in fields(inner_cls)}
            default = _default_of(f)
            for name, (attr, text) in meta["group"]["flags"].items():
                inner_meta = inner_fields[attr].metadata
                found.append(
                    Option(
                        name,
                        (f.name, attr),
                        inner_hints[attr],
                        text,
                        getattr(default, attr),
                        inner_meta.get("choices"),
                        inner_meta.get("metavar"),
                        False,
                        inner_meta.get("parse"),
                    )
                )
            continue
        if "help" not in meta:
            raise TypeError(f"{cls.__name__}.{f.name} has no help line: declare it with setting(default, help=...)")
        found.append(
            Option(
                meta.get("flag") or f.name,
                (f.name,),
                hints[f.name],
                meta["help"],
                _default_of(f),
                meta.get("choices"),
                meta.get("metavar"),
                bool(meta.get("required")),
                meta.get("parse"),
                bool(meta.get("repeat")),
            )
        )
    return found


def _option(cls: type, name: str) -> Option:
    for option in options(cls):
        if option.name == name:
            return option
    raise SettingsError(f"{cls.__name__} has no setting {name!r}; known: {', '.join(o.name for o in options(cls))}")


def _strip_optional(kind: Any) -> tuple[Any, bool]:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(kind)) == 2:
            return args[0], True
    return kind, False


def _parse_as(kind: Any, text: str, source: str) -> Any:
    kind, optional = _strip_optional(kind)
    value = text.strip()
    if optional and value.lower() == "none":
        return None
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0] if typing.get_args(kind) else str
        return tuple(_parse_as(item, part.strip(), source) for part in value.split(",") if part.strip())
    if kind is bool:
        if value.lower() in TRUE_WORDS:
            return True
        if value.lower() in FALSE_WORDS:
            return False
        raise SettingsError(f"{source} must be one of {'/'.join(TRUE_WORDS + FALSE_WORDS)}, got {text!r}")
    if kind is int:
        try:
            return int(value)
        except ValueError:
            raise SettingsError(f"{source} must be an integer, got {text!r}") from None
    if kind is float:
        try:
            return float(value)
        except ValueError:
            raise SettingsError(f"{source} must be a number, got {text!r}") from None
    return value


def _parse(option: Option, text: str, source: str) -> Any:
    if option.parse is None:
        return _parse_as(option.kind, text, source)
    try:
        return option.parse(text)
    except ValueError as exc:
        raise SettingsError(f"{source}: {exc}") from None


def parse_text(cls: type, name: str, text: str) -> Any:
    """The value of setting ``name`` of ``cls`` given as text (as a flag or variable would give it)."""
    option = _option(cls, name)
    return _parse(option, text, option.flag)


def build(cls: type, values: Mapping[str, Any]) -> Any:
    """An instance of ``cls`` from flat setting names (as presets and flags name them); unset ones keep defaults."""
    by_name = {o.name: o for o in options(cls)}
    unknown = sorted(set(values) - set(by_name))
    if unknown:
        raise SettingsError(f"{cls.__name__} has no setting(s) {unknown}; known: {', '.join(by_name)}")
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        path = by_name[name].path
        if len(path) == 1:
            top[path[0]] = value
        else:
            nested.setdefault(path[0], {})[path[1]] = value
    for outer, inner in nested.items():
        f = next(g for g in fields(cls) if g.name == outer)
        base = top.get(outer, _default_of(f))
        try:
            top[outer] = dataclasses.replace(base, **inner)
        except ValueError as exc:
            names = ", ".join(o.flag for o in by_name.values() if o.path[0] == outer)
            raise ValueError(f"{exc} (settings {names})") from None
    return cls(**top)


def flatten(settings: Any) -> dict[str, Any]:
    """The flat ``{name: value}`` of a settings object (tuples as lists): what config files and provenance record."""
    data: dict[str, Any] = {}
    for option in options(type(settings)):
        value = settings
        for attr in option.path:
            value = getattr(value, attr)
        data[option.name] = (
            list(value) if isinstance(value, tuple) else (dict(value) if isinstance(value, dict) else value)
        )
    return data


def parse_device(text: str) -> str:
    """A device setting, normalised: auto, cpu, cuda, cuda:N or mps (no runtime check: that needs torch)."""
    device = str(text).strip().lower()
    if device in ("auto", "cpu", "cuda", "mps") or (device.startswith("cuda:") and device[5:].isdigit()):
        return device
    raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {text!r}")


@dataclass(frozen=True)
class CommandLine:
    """The command line of one settings class: its parser and the resolution of flags, variables and presets.

    ``switches``: a bool flag is ``--name`` / ``--no-name`` (else it takes a value, ``--name true``). ``error``: the
    exception type that parse errors are raised as (the class's own validation raises what it raises)."""

    cls: type
    prog: str
    env_prefix: str = "SDM_"
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    description: str = ""
    epilog: str = ""
    switches: bool = False
    error: type[Exception] = SettingsError

    def parser(self) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(
            prog=self.prog,
            description=self.description,
            epilog=self.epilog or None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if self.presets:
            parser.add_argument(
                "--preset",
                choices=sorted(self.presets),
                default=None,
                help=f"start from a preset [env {self.env_prefix}PRESET]",
            )
        for option in options(self.cls):
            variable = option.variable(self.env_prefix)
            if option.required:
                where = f"env {variable}; required"
            elif isinstance(option.default, tuple) and not option.default:
                where = f"env {variable}"
            else:
                where = f"env {variable}; default {option.default!r}"
            text = f"{option.help} [{where}]"
            if self.switches and option.kind is bool:
                parser.add_argument(
                    option.flag, dest=option.name, action=argparse.BooleanOptionalAction, default=None, help=text
                )
            elif option.repeat:
                parser.add_argument(
                    option.flag, dest=option.name, action="append", default=None, metavar=option.metavar, help=text
                )
            else:
                parser.add_argument(
                    option.flag,
                    dest=option.name,
                    default=None,
                    choices=option.choices,
                    metavar=option.metavar,
                    help=text,
                )
        return parser

    def values(self, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The flat values that differ from the defaults: preset, then variables, then flags."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        preset = getattr(args, "preset", None) or env.get(f"{self.env_prefix}PRESET") or None
        if preset is not None and self.presets:
            if preset not in self.presets:
                raise self.error(
                    f"{self.env_prefix}PRESET must be one of {', '.join(sorted(self.presets))}, got {preset!r}"
                )
            values.update(self.presets[preset])
        for option in options(self.cls):
            variable = option.variable(self.env_prefix)
            try:
                if env.get(variable, "") != "":
                    values[option.name] = _parse(option, env[variable], variable)
                given = getattr(args, option.name, None)
                if isinstance(given, list):  # a repeated flag: each occurrence is one or more comma-separated items
                    values[option.name] = tuple(v for text in given for v in _parse(option, text, option.flag))
                elif given is not None:
                    values[option.name] = given if isinstance(given, bool) else _parse(option, given, option.flag)
            except SettingsError as exc:
                raise self.error(str(exc)) from None
        return values

    def resolve(self, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Any:
        """A validated instance of the settings class from parsed ``args`` and ``environ`` (default os.environ)."""
        return build(self.cls, self.values(args, environ))

    def parse(self, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Any:
        """Parse ``argv`` (argparse exits on an unknown flag) and resolve it."""
        return self.resolve(self.parser().parse_args(argv), environ)
