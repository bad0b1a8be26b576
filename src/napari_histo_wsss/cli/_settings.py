"""Command-line options generated from a settings class (:mod:`..core.settings`).

Every field of a :class:`~..core.settings.Settings` class declared with ``cli=True`` becomes an
option named after it (``batch_size`` -> ``--batch-size``), in an argument group per section,
with the field's help and its default, parsed with :func:`~..core.settings.parse_value`
(numbers, comma-separated lists, ``none``/``auto`` for optional values) and, for fixed choices,
argparse's ``choices``. Booleans are ``--name/--no-name`` pairs (``--pda``, ``--no-amp``).

Unset options leave no attribute in the namespace (``argparse.SUPPRESS``), so
:func:`settings_from_args` knows what the user typed: a new run takes the class's defaults for
the rest, a resumed run its saved settings (``--resume`` then changes only what is given).

The options are added when the subcommand's parser first parses or prints help
(:func:`add_settings_lazily`): the settings classes live in the training modules, which import
torch, and ``histo-wsss info`` or ``--help`` should not wait for it.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Iterable

from napari_histo_wsss.core.settings import FieldKind, SettingInfo, format_value, parse_value


def option_name(name: str) -> str:
    """``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def _parser(kind: FieldKind, info: SettingInfo) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return parse_value(text, kind, info)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def _metavar(name: str, kind: FieldKind) -> str:
    if kind.base is tuple:
        return {int: "N,N,...", float: "X,X,...", str: "NAME,..."}[kind.item]
    return {int: "N", float: "X"}.get(kind.base, name.upper())


def default_text(default: Any, info: SettingInfo) -> str:
    """How ``--help`` shows a default: ``8``, ``0.25,0.5``, ``on``, or the word for None."""
    return format_value(default) or info.none or "none"


def add_settings(parser: argparse.ArgumentParser, config_class: Any, skip: Iterable[str] = ()) -> None:
    """Add an option for every command-line setting of ``config_class`` except ``skip``."""
    skip = set(skip)
    kinds = config_class.kinds()
    groups: dict[str, Any] = {}
    for f in config_class.settings_fields():
        info: SettingInfo = f.metadata["setting"]
        if not info.cli or f.name in skip:
            continue
        if info.group not in groups:
            groups[info.group] = parser.add_argument_group(info.group or "settings")
        group, kind = groups[info.group], kinds[f.name]
        help_ = info.help if "(default:" in info.help else f"{info.help} (default: {default_text(f.default, info)})"
        help_ = help_.replace("%", "%%")
        if kind.base is bool and not kind.optional:
            group.add_argument(option_name(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_)
            continue
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, type=_parser(kind, info), help=help_)
        if info.choices and info.strict and kind.base is not tuple:
            kw["choices"] = info.choices
        else:
            kw["metavar"] = _metavar(f.name, kind)
        group.add_argument(option_name(f.name), **kw)


def add_settings_lazily(parser: argparse.ArgumentParser, load: Callable[[], Any], skip: Iterable[str] = (),
                        then: Callable[[argparse.ArgumentParser, Any], None] | None = None) -> None:
    """:func:`add_settings` for the class ``load()`` returns, done when ``parser`` first parses
    arguments or formats its help; ``then(parser, config_class)`` runs right after (e.g. to
    name the resumable options in the description)."""
    done = False

    def ensure() -> None:
        nonlocal done
        if not done:
            done = True
            config_class = load()
            add_settings(parser, config_class, skip)
            if then is not None:
                then(parser, config_class)

    def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            ensure()
            return method(*args, **kwargs)

        return call

    for name in ("parse_known_args", "format_help", "format_usage"):
        setattr(parser, name, wrap(getattr(parser, name)))


def option_list(config_class: Any, names: Iterable[str]) -> str:
    """``--epochs, --device, --amp/--no-amp`` for setting names (in declaration order)."""
    kinds, wanted = config_class.kinds(), set(names)
    out = []
    for f in config_class.settings_fields():
        if f.name in wanted:
            opt = option_name(f.name)
            out.append(f"{opt}/--no-{opt[2:]}" if kinds[f.name].base is bool else opt)
    return ", ".join(out)


def settings_from_args(config_class: Any, args: argparse.Namespace, base: Any = None) -> Any:
    """The settings the command line asks for: ``base`` (e.g. a resumed run's saved settings;
    default: the class's defaults) with the options the user gave."""
    given = {f.name: getattr(args, f.name) for f in config_class.settings_fields() if hasattr(args, f.name)}
    return dataclasses.replace(base, **given) if base is not None else config_class(**given)
