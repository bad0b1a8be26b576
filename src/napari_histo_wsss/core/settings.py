"""One source of settings: dataclass fields that carry their own help, range and choices.

A settings class (:class:`~.stage1.train.TrainConfig`, :class:`~.stage2.train.SegConfig`,
:class:`~.stage1.cams.PseudoMaskSettings`, :class:`~.stage2.batch.PredictSettings`,
:class:`~.review.ReviewSettings`) is a dataclass deriving from :class:`Settings` whose fields are declared with :func:`setting`, e.g.::

    lr: float = setting(3e-4, range=(0, None), open="lo", help="learning rate of the backbone")

From that one declaration

* :meth:`Settings.validate` checks types, ranges and choices, with one message style that names
  the setting, the rule and the value (``training setting: lr must be > 0, got -1.0``);
* :meth:`Settings.to_dict` / :meth:`Settings.from_dict` write and read ``config.json``;
* :meth:`Settings.saved` reads a run folder's ``config.json`` (one reader for both stages, a
  damaged file is one line naming it);
* :meth:`Settings.check_resume` refuses a resume with changed settings: only the fields declared
  ``resumable`` may change, and a setting an older checkpoint does not record is not a change;
* ``cli/_settings.py`` generates the command-line options (names, types, choices, help with the
  default) and ``widgets/_common.py`` the panel forms (widgets, limits, tooltips, defaults).

So the defaults, limits and help texts of the CLI and the GUI are the core's, and cannot drift
(tests/test_settings.py compares them field by field).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

from napari_histo_wsss.core.errors import HistoWSSSError

__all__ = ["setting", "SettingInfo", "FieldKind", "Settings", "read_run_config", "format_value", "parse_value",
           "known_backbone", "positive_sum"]


@dataclass(frozen=True)
class SettingInfo:
    """What a settings field declares besides its default (see :func:`setting`)."""

    help: str
    range: tuple[float | None, float | None] | None = None
    open: str = ""
    choices: tuple = ()
    strict: bool = True
    min_items: int = 0
    check: Callable[[Any], str | None] | None = None
    cli: bool = True
    gui: bool = True
    basic: bool = False
    resumable: bool = False
    group: str = ""
    label: str = ""
    none: str = ""
    toggle: Any = None
    browse: str = ""
    decimals: int | None = None
    step: float | None = None
    option: str = ""

    def gui_label(self, name: str) -> str:
        return self.label or name.replace("_", " ").capitalize()


def setting(default: Any, *, help: str, range: tuple[float | None, float | None] | None = None, open: str = "",
            choices: Sequence[Any] = (), strict: bool = True, min_items: int = 0,
            check: Callable[[Any], str | None] | None = None, cli: bool = True, gui: bool = True, basic: bool = False,
            resumable: bool = False, group: str = "", label: str = "", none: str = "", toggle: Any = None,
            browse: str = "", decimals: int | None = None, step: float | None = None, option: str = "") -> Any:
    """A dataclass field with its metadata.

    ``help``: one line for ``--help`` and the widget's tooltip. ``range=(lo, hi)``: inclusive
    bounds (None = unbounded; for tuples, of each entry); ``open``: ``"lo"``, ``"hi"`` or
    ``"both"`` ends excluded. ``choices``: the allowed values (``strict``) or, with
    ``strict=False``, the values offered (an editable list in the GUI; e.g. ``cuda:1`` is a
    device too). ``min_items``: least number of entries of a variable-length tuple. ``check``:
    ``value -> problem or None`` for a rule the others cannot say. ``cli`` / ``gui``: whether the
    command line / the panel offers it; ``basic``: in the panel's main form (else under
    "Advanced"); ``group``: section of ``--help`` and of the advanced form; ``resumable``: may
    change when a run is resumed. ``label``: the GUI label; ``none``: what ``None`` means, in a
    word ("auto", "all"); ``toggle``: the GUI offers a check box that sets this value (off = the
    default); ``browse``: a file-dialog filter offered beside a text field; ``decimals`` /
    ``step``: of a GUI number field. ``option``: the command-line option's name when it is not
    the field's (``which`` is ``--checkpoint``).
    """
    if open not in ("", "lo", "hi", "both"):
        raise ValueError(f"open must be '', 'lo', 'hi' or 'both', got {open!r}")
    info = SettingInfo(help=help, range=range, open=open, choices=tuple(choices), strict=strict, min_items=min_items,
                       check=check, cli=cli, gui=gui, basic=basic, resumable=resumable, group=group, label=label,
                       none=none, toggle=toggle, browse=browse, decimals=decimals, step=step, option=option)
    return dataclasses.field(default=default, metadata={"setting": info})


@dataclass(frozen=True)
class FieldKind:
    """A field's type, from its annotation: ``base`` (bool, int, float, str or tuple),
    ``optional`` (``X | None``), ``item`` (a tuple's entry type) and ``length`` (a fixed-length
    tuple's length, None for ``tuple[X, ...]``)."""

    base: type
    optional: bool = False
    item: type | None = None
    length: int | None = None


def _kind(tp: Any) -> FieldKind:
    optional = False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if len(args) != 1:
            raise TypeError(f"a setting must have one type (or that type | None), got {tp}")
        tp = args[0]
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return FieldKind(tuple, optional, args[0], None)
        if len(set(args)) != 1:
            raise TypeError(f"a tuple setting must have entries of one type, got {tp}")
        return FieldKind(tuple, optional, args[0], len(args))
    if tp not in (bool, int, float, str):
        raise TypeError(f"unsupported setting type {tp}")
    return FieldKind(tp, optional)


def _fmt(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _shown(value: Any) -> str:
    """A value as messages show it: text quoted, tuples as lists, numbers plain."""
    if isinstance(value, tuple):
        return repr(list(value))
    return repr(value) if isinstance(value, str) else str(value)


def _type_problem(value: Any, t: type) -> str | None:
    if t is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if t is int:
        return None if isinstance(value, numbers.Integral) and not isinstance(value, bool) else "must be a whole number"
    if t is float:
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            return "must be a number"
        return None if math.isfinite(value) else "must be a finite number"
    return None if isinstance(value, str) else "must be text"


def range_text(info: SettingInfo) -> str:
    """``[0, 1)``, ``>= 1`` or ``> 0``: the rule of a field's range, as messages state it."""
    lo, hi = info.range or (None, None)
    lo_open, hi_open = info.open in ("lo", "both"), info.open in ("hi", "both")
    if lo is not None and hi is not None:
        return f"lie in {'(' if lo_open else '['}{_fmt(lo)}, {_fmt(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"be {'>' if lo_open else '>='} {_fmt(lo)}"
    return f"be {'<' if hi_open else '<='} {_fmt(hi)}"


def _in_range(x: float, info: SettingInfo) -> bool:
    lo, hi = info.range or (None, None)
    lo_open, hi_open = info.open in ("lo", "both"), info.open in ("hi", "both")
    if lo is not None and (x < lo or (lo_open and x == lo)):
        return False
    return not (hi is not None and (x > hi or (hi_open and x == hi)))


def field_problem(value: Any, info: SettingInfo, kind: FieldKind) -> str | None:
    """What is wrong with ``value`` for a field (``"must be >= 1"``), or None when it is fine."""
    if value is None:
        return None if kind.optional else ("must be set" if kind.base is tuple else _type_problem(None, kind.base))
    if kind.base is tuple:
        if not isinstance(value, (tuple, list)):
            return "must be a list of values"
        items, each = list(value), "entries "
        if kind.length is not None and len(items) != kind.length:
            return f"must be {kind.length} values"
        if len(items) < info.min_items:
            return f"must hold at least {info.min_items} value{'s' if info.min_items > 1 else ''}"
        t = kind.item
    else:
        items, each, t = [value], "", kind.base
    for v in items:
        problem = _type_problem(v, t)
        if problem:
            return each + problem
    if info.range is not None and not all(_in_range(v, info) for v in items):
        return f"{each}must {range_text(info)}"
    if info.choices and info.strict and not all(v in info.choices for v in items):
        return f"{each}must be one of {', '.join(map(_fmt, info.choices))}"
    return info.check(value) if info.check is not None else None


class Settings:
    """Base of the settings dataclasses: validation, ``config.json`` and resume rules from the
    fields' :func:`setting` metadata. Subclasses are ``@dataclass`` classes that set ``what``
    (how messages name a setting), ``error`` (the error class) and, when their ``config.json``
    holds records beside the settings (paths of the run's inputs), ``records``."""

    what: ClassVar[str] = "setting"
    error: ClassVar[type[HistoWSSSError]] = HistoWSSSError
    records: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        # config.json and the CLI give lists; tuples keep instances comparable and hashable. Values
        # that do not convert stay as they are for validate() to name.
        for name, kind in self.kinds().items():
            value = getattr(self, name)
            if kind.base is tuple and isinstance(value, (list, tuple)):
                try:
                    object.__setattr__(self, name, tuple(kind.item(v) if not isinstance(v, bool) else v for v in value))
                except (TypeError, ValueError):
                    object.__setattr__(self, name, tuple(value))

    # -- the fields -------------------------------------------------------------------------------
    @classmethod
    def settings_fields(cls) -> list[dataclasses.Field]:
        """The dataclass fields declared with :func:`setting`, in declaration order."""
        return [f for f in dataclasses.fields(cls) if "setting" in f.metadata]

    @classmethod
    def kinds(cls) -> dict[str, FieldKind]:
        """Each setting's :class:`FieldKind`, from the annotations."""
        return _kinds_of(cls)

    @classmethod
    def resumable(cls) -> frozenset[str]:
        """The settings that may change when a run is resumed."""
        return frozenset(f.name for f in cls.settings_fields() if f.metadata["setting"].resumable)

    # -- checks -----------------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Every setting that cannot work, as ``"<what>: <name> <rule>, got <value>"``."""
        kinds, out = self.kinds(), []
        for f in self.settings_fields():
            value = getattr(self, f.name)
            problem = field_problem(value, f.metadata["setting"], kinds[f.name])
            if problem:
                out.append(f"{self.what}: {f.name} {problem}, got {_shown(value)}")
        return out

    def validate(self) -> None:
        """Raise ``error`` naming the first setting that cannot work (its rule and its value)."""
        problems = self.problems()
        if problems:
            raise self.error(problems[0])

    def check_resume(self, saved: dict[str, Any], where: str | Path) -> None:
        """Refuse to resume a run saved with ``saved`` settings (a checkpoint's or config.json's)
        under these: only :meth:`resumable` ones may differ (the others change the model, the
        data order or the optimisation, so the run would not be one run). A setting that ``saved``
        does not hold (a run of an older version) is not a difference."""
        mine, allowed = self.to_dict(), self.resumable()
        diff = [k for k in mine if k not in allowed and k in saved and saved[k] != mine[k]]
        if diff:
            parts = ", ".join(f"{k}: saved {_shown(saved[k])} vs now {_shown(mine[k])}" for k in diff[:4])
            more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
            raise self.error(f"{where}: cannot resume with different settings ({parts}{more}); only "
                             f"{', '.join(sorted(allowed))} may change. Start a new run folder instead")

    # -- config.json ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the settings (tuples become lists)."""
        out = {}
        for f in self.settings_fields():
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        """Inverse of :meth:`to_dict`. A missing setting (a run of an older version) takes its
        default; an unknown one (a newer version) is an error naming it."""
        if not isinstance(d, dict):
            raise cls.error(f"{cls.what}s must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in cls.settings_fields()}
        unknown = sorted(set(d) - names)
        if unknown:
            raise cls.error(f"unknown {cls.what}(s) {', '.join(unknown)} (saved by a newer version?)")
        return cls(**d)

    @classmethod
    def saved(cls, run_dir: str | Path) -> Any:
        """The settings a run folder was trained with: its ``config.json`` without the
        ``records`` written beside them, validated. A missing, damaged or foreign file, or a
        setting that cannot work, is one line naming the file."""
        path = Path(run_dir) / "config.json"
        d = read_run_config(path, cls.error)
        try:
            cfg = cls.from_dict({k: v for k, v in d.items() if k not in cls.records})
            cfg.validate()
        except HistoWSSSError as e:
            raise cls.error(f"{path}: {e}") from e
        return cfg


@functools.cache
def _kinds_of(cls: type) -> dict[str, FieldKind]:
    hints = typing.get_type_hints(cls)
    return {f.name: _kind(hints[f.name]) for f in dataclasses.fields(cls) if "setting" in f.metadata}


def read_run_config(path: str | Path, error: type[HistoWSSSError] = HistoWSSSError) -> dict[str, Any]:
    """A run's ``config.json`` as a dict; missing, unreadable or not a JSON object: ``error`` in
    one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no run config there (not a run folder?)")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise error(f"{path}: unreadable run config: {e}") from e
    if not isinstance(d, dict):
        raise error(f"{path}: unreadable run config: a JSON {type(d).__name__} instead of an object")
    return d


# -- text: the command line and the forms' text fields -----------------------------------------------
def format_value(value: Any) -> str:
    """A value as the command line and the forms write it: tuples comma-separated, numbers
    short (``0.0003``), None as an empty text."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return ",".join(format_value(v) for v in value)
    return _fmt(value)


_NOUNS = {int: "whole numbers", float: "numbers", str: "names", bool: "on/off values"}
_A_NOUN = {int: "a whole number", float: "a number", str: "a name", bool: "on or off"}


def _scalar(text: str, t: type, info: SettingInfo) -> Any:
    if t is bool:
        word = text.lower()
        if word in ("on", "true", "yes", "1"):
            return True
        if word in ("off", "false", "no", "0"):
            return False
        raise ValueError(text)
    if t is str:
        lower = bool(info.choices) and all(isinstance(c, str) and c == c.lower() for c in info.choices)
        return text.lower() if lower else text
    return t(text)


def parse_value(text: str, kind: FieldKind, info: SettingInfo) -> Any:
    """Inverse of :func:`format_value` for a field: ``"0.25,0.5"`` -> ``(0.25, 0.5)``; for an
    optional field an empty text, ``none`` or the field's word for None (``auto``, ``all``) is
    None. A text that is not of the field's type, or a name outside strict choices in a list, is
    a ValueError saying what was expected (ranges are :meth:`Settings.validate`'s)."""
    t = text.strip()
    if kind.optional and t.lower() in ("", "none", info.none.lower()):
        return None
    if kind.base is tuple:
        if t.lower() in ("", "none") and "none" not in info.choices:
            return ()
        parts = [p.strip() for p in t.split(",") if p.strip()]
        try:
            values = tuple(_scalar(p, kind.item, info) for p in parts)
        except ValueError:
            raise ValueError(f"expected comma-separated {_NOUNS[kind.item]}, got {text!r}") from None
        bad = [str(v) for v in values if info.choices and info.strict and v not in info.choices]
        if bad:
            raise ValueError(f"unknown value(s) {', '.join(bad)}; choose from {', '.join(map(_fmt, info.choices))}")
        return values
    try:
        return _scalar(t, kind.base, info)
    except ValueError:
        raise ValueError(f"expected {_A_NOUN[kind.base]}, got {text!r}") from None


# -- rules shared by the settings classes -----------------------------------------------------------
def known_backbone(name: str) -> str | None:
    """Problem of a backbone name, or None: any spelling of a registry name (``EfficientNet_Lite0``)
    is one, as :func:`~.models.backbones.backbone_spec` reads names."""
    from napari_histo_wsss.core.models.backbones import BACKBONES, backbone_spec

    try:
        backbone_spec(name)
    except HistoWSSSError:
        return f"must be one of {', '.join(BACKBONES)}"
    return None


def positive_sum(values: Sequence[float]) -> str | None:
    """Problem of weights that add up to nothing, or None."""
    return None if sum(values) > 0 else "must have a positive sum"
