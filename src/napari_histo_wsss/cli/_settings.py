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
from pathlib import Path
from typing import Any, Callable, Iterable

from napari_histo_wsss.core.settings import FieldKind, SettingInfo, field_problem, format_value, parse_value


def option_name(name: str, info: SettingInfo | None = None) -> str:
    """``batch_size`` -> ``--batch-size``; a field that declares its ``option`` (``which``:
    ``checkpoint``) -> that option (``--checkpoint``)."""
    return "--" + ((info.option if info is not None and info.option else name).replace("_", "-"))


def _parser(kind: FieldKind, info: SettingInfo) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = parse_value(text, kind, info)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if _optional_choice(kind, info) and value is not None and value not in info.choices:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(map(format_value, info.choices))} or none, "
                                             f"got {text!r}")
        return value

    return parse


def number(base: type, range: tuple[float | None, float | None], open: str = "") -> Callable[[str], Any]:
    """The argparse ``type`` of a plain numeric option (one that is not a settings field), checked
    by the settings' own rule (:func:`~..core.settings.field_problem`: a finite number in
    ``range``, ``open`` ends excluded, as :func:`~..core.settings.setting` declares them), so a
    bad value is argparse's one line before any work, worded as for a declared setting."""
    kind, info = FieldKind(base), SettingInfo(help="", range=range, open=open)

    def parse(text: str) -> Any:
        try:
            value = parse_value(text, kind, info)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        problem = field_problem(value, info, kind)
        if problem:
            raise argparse.ArgumentTypeError(f"{problem}, got {text!r}")
        return value

    return parse


def _optional_choice(kind: FieldKind, info: SettingInfo) -> bool:
    """A single value of fixed choices that may also be None (argparse's ``choices`` cannot hold
    the None that ``none`` parses to, so the parser checks the choices itself)."""
    return bool(info.choices) and info.strict and kind.base is not tuple and kind.optional


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
            group.add_argument(option_name(f.name, info), dest=f.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_)
            continue
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, type=_parser(kind, info), help=help_)
        if info.choices and info.strict and kind.base is not tuple and not kind.optional:
            kw["choices"] = info.choices
        elif _optional_choice(kind, info):
            kw["metavar"] = "{" + ",".join(map(format_value, info.choices)) + "}"
        else:
            kw["metavar"] = _metavar(info.option or f.name, kind)
        group.add_argument(option_name(f.name, info), **kw)


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
            opt = option_name(f.name, f.metadata["setting"])
            out.append(f"{opt}/--no-{opt[2:]}" if kinds[f.name].base is bool else opt)
    return ", ".join(out)


def add_run_settings(parser: argparse.ArgumentParser, load: Callable[[], Any]) -> None:
    """:func:`add_settings_lazily` for a training command: its description's ``{resumable}``
    becomes the options that ``--resume`` may change."""
    add_settings_lazily(parser, load, then=_name_resumable)


def _name_resumable(parser: argparse.ArgumentParser, config_class: Any) -> None:
    parser.description = parser.description.replace("{resumable}", option_list(config_class, config_class.resumable()))


def run_settings(config_class: Any, args: argparse.Namespace, run_dir: str | Path, resume: bool) -> Any:
    """The settings of a training command: on a ``resume`` of a run whose ``run_dir`` holds a
    config.json, its saved settings (:meth:`~..core.settings.Settings.saved`) with the options
    given; else the class's defaults with them."""
    base = config_class.saved(run_dir) if resume and (Path(run_dir) / "config.json").is_file() else None
    return settings_from_args(config_class, args, base)


def settings_from_args(config_class: Any, args: argparse.Namespace, base: Any = None) -> Any:
    """The settings the command line asks for: ``base`` (e.g. a resumed run's saved settings;
    default: the class's defaults) with the options the user gave (only those :func:`add_settings`
    made: a command's own option of the same name, e.g. one whose default comes from a run, is
    not taken)."""
    given = {f.name: getattr(args, f.name) for f in config_class.settings_fields()
             if f.metadata["setting"].cli and hasattr(args, f.name)}
    return dataclasses.replace(base, **given) if base is not None else config_class(**given)
