"""Loss settings written once: a frozen dataclass per loss family whose fields declare their own checks.

A family's settings (:class:`fastrl.losses.GRPOSettings`, :class:`fastrl.losses.DPOSettings`) subclass
:class:`Settings` and declare every option with :func:`option`: its default, a one-line help, and what a
valid value is (a choice among names, a real range, an int bound, a bool, a tuple of those). From that one
declaration come

- the validation on construction (``TypeError`` / ``ValueError`` naming the field, the wording of
  :mod:`fastrl._checks`), then the family's cross-field rules in :meth:`Settings.check`;
- the settings accepted as keyword arguments (:meth:`Settings.from_options`): ``grpo_loss(..., beta=0.04)``
  and ``grpo_loss(..., settings=GRPOSettings(beta=0.04))`` are the same call;
- the encoding that carries them to and from a custom op (:meth:`Settings.encode` / :meth:`Settings.decode`:
  one ``int[]`` and one ``float[]``, which ``torch.library`` schemas accept);
- the trainer config's fields (:func:`config_fields`): same names, defaults and help, so a config embeds the
  settings instead of repeating them.

>>> import dataclasses
>>> from fastrl.losses.settings import Settings, option
>>> @dataclasses.dataclass(frozen=True)
... class Toy(Settings):
...     kind: str = option("a", "which toy", choices=("a", "b"))
...     scale: float = option(1.0, "a positive scale", low=0.0, low_open=True)
...     cap: float | None = option(None, "an optional cap", low=0.0)
>>> Toy(kind="b", scale=2).scale
2.0
>>> Toy.decode(*Toy(cap=3.0).encode())
Toy(kind='a', scale=1.0, cap=3.0)
>>> Toy(kind="c")
Traceback (most recent call last):
...
ValueError: kind must be one of a, b; got 'c'
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from fastrl import _checks

__all__ = ["Settings", "config_fields", "option"]

_KINDS = ("choice", "real", "int", "bool", "choices", "reals")


def option(default: Any, help: str, *, choices: Sequence[str] | None = None, low: float | None = None,
           high: float | None = None, low_open: bool = False, high_open: bool = False, integer: bool = False,
           many: bool = False, length: int | None = None, config: bool = True) -> Any:
    """One field of a :class:`Settings` class.

    The kind of value is read from the arguments: ``choices`` a name among them (``many``: a non-empty
    tuple of names); ``integer`` an int of at least ``low``; a bool default a bool; otherwise a finite real
    within ``[low, high]`` (``many``: a tuple of reals, ``length`` of them when given, a single number
    repeated to that length). A ``None`` default makes the field optional (``None`` allowed).

    Args:
        default: the field's default (``None``: optional).
        help: one line saying what the field is (the trainer configs' ``--help``).
        choices: the names the value must be among.
        low: the lowest value allowed (integers and reals).
        high: the highest value allowed (reals).
        low_open: ``low`` itself is not allowed.
        high_open: ``high`` itself is not allowed.
        integer: the value is an int.
        many: the value is a tuple (of names with ``choices``, else of reals).
        length: the tuple's length with ``many``; a single number is repeated to it.
        config: ``False`` keeps the field out of the trainer configs (:func:`config_fields`).

    Returns:
        A ``dataclasses.field`` whose metadata carries these rules and the help.
    """
    if choices is not None:
        kind = "choices" if many else "choice"
    elif integer:
        kind = "int"
    elif isinstance(default, bool):
        kind = "bool"
    else:
        kind = "reals" if many else "real"
    if many and isinstance(default, list):
        default = tuple(default)
    meta = {"help": help, "kind": kind, "choices": tuple(choices) if choices is not None else None,
            "bounds": {"low": low, "high": high, "low_open": low_open, "high_open": high_open},
            "length": length, "optional": default is None, "config": config}
    return dataclasses.field(default=default, metadata={"fastrl": meta})


def _meta(f: dataclasses.Field) -> dict:
    return f.metadata["fastrl"]


def _check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _check_value(name: str, value: Any, meta: dict) -> Any:
    kind, bounds = meta["kind"], meta["bounds"]
    if value is None:
        if meta["optional"]:
            return None
        raise TypeError(f"{name} must not be None")
    if kind == "choice":
        return _check_choice(name, value, meta["choices"])
    if kind == "bool":
        return _checks.check_bool(name, value)
    if kind == "int":
        return _checks.check_int(name, value, low=None if bounds["low"] is None else int(bounds["low"]))
    if kind == "real":
        return _checks.check_real(name, value, **bounds)
    # tuples
    single = isinstance(value, str) if kind == "choices" else isinstance(value, numbers.Real)
    if single:
        value = (value,) * (meta["length"] or 1)
    if not isinstance(value, (tuple, list)) or isinstance(value, str):
        what = "a name or a list of names" if kind == "choices" else "a number or a list of numbers"
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{name} must not be empty")
    if meta["length"] is not None and len(value) != meta["length"]:
        raise ValueError(f"{name} must be a number or {meta['length']} numbers, got {list(value)!r}")
    if kind == "choices":
        return tuple(_check_choice(name, v, meta["choices"]) for v in value)
    return tuple(_checks.check_real(name, v, **bounds) for v in value)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Base of a loss family's settings: frozen, validated on construction (see the module docstring)."""

    family: ClassVar[str] = "loss"
    #: keywords of peers (Liger-Kernel, TRL, verl) that are not fields here -> what fastrl calls or does
    #: instead; :meth:`from_options` names it when such a keyword is passed
    peer_names: ClassVar[Mapping[str, str]] = {}

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if "fastrl" not in f.metadata:
                continue
            object.__setattr__(self, f.name, _check_value(f.name, getattr(self, f.name), _meta(f)))
        self.check()
        ints, floats = self.encode()
        # made once: the ops read it on every call (an attribute, not a field: equality, repr and replace
        # see only the fields)
        object.__setattr__(self, "encoded", (tuple(ints), tuple(floats)))

    def check(self) -> None:
        """The family's rules across fields (raise naming the first field); called after the field checks."""

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied (checked again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_options(cls, settings: Settings | None = None, options: Mapping[str, Any] | None = None, *,
                     where: str = "") -> Settings:
        """``settings`` or keyword ``options`` (never both) as settings of this class; an unknown keyword
        raises ``TypeError`` naming it and fastrl's equivalent (a peer's name, :attr:`peer_names`) or the
        closest field."""
        options = dict(options or {})
        if settings is not None:
            if not isinstance(settings, cls):
                raise TypeError(f"settings must be a {cls.__name__}, got {type(settings).__name__}")
            if options:
                raise TypeError(f"pass settings or keyword options ({', '.join(sorted(options))}), not both")
            return settings
        # what dataclasses.fields(cls) returns, read off the class: torch.compile (a loss called inside a
        # compiled function) traces dataclasses.fields() of an instance only
        names = [name for name, f in cls.__dataclass_fields__.items() if f._field_type is dataclasses._FIELD]
        for key in options:
            if key not in names:
                near = difflib.get_close_matches(key, names, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                if key in cls.peer_names:
                    hint = f" (a Liger-Kernel / TRL / verl name; fastrl's equivalent: {cls.peer_names[key]})"
                prefix = f"{where}() " if where else ""
                raise TypeError(f"{prefix}got an unexpected keyword argument {key!r}{hint}")
        return cls(**options)

    def options(self) -> dict[str, Any]:
        """The fields as keyword arguments (``type(s)(**s.options()) == s``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    # ---- the custom-op encoding: every field, in declaration order, into ints and floats

    def encode(self) -> tuple[list[int], list[float]]:
        """``(ints, floats)``: a choice as its index, a bool or an int as itself, a real as itself, an optional
        field as a 0/1 flag (int) before its value, a tuple as its length (int) then its items. The same
        values, as tuples, are the attribute ``encoded``, made once on construction for the ops' calls."""
        ints: list[int] = []
        floats: list[float] = []
        for f in dataclasses.fields(self):
            meta, value = _meta(f), getattr(self, f.name)
            if meta["optional"]:
                ints.append(int(value is not None))
                if value is None:
                    continue
            kind = meta["kind"]
            if kind == "choice":
                ints.append(meta["choices"].index(value))
            elif kind in ("bool", "int"):
                ints.append(int(value))
            elif kind == "real":
                floats.append(float(value))
            elif kind == "choices":
                ints.append(len(value))
                ints.extend(meta["choices"].index(v) for v in value)
            else:
                ints.append(len(value))
                floats.extend(float(v) for v in value)
        return ints, floats

    @classmethod
    def decode(cls, ints: Sequence[int], floats: Sequence[float]) -> Settings:
        """The settings :meth:`encode` wrote."""
        ints, floats = list(ints), list(floats)
        i = j = 0
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            meta = _meta(f)
            if meta["optional"]:
                present = ints[i]
                i += 1
                if not present:
                    values[f.name] = None
                    continue
            kind = meta["kind"]
            if kind == "choice":
                values[f.name] = meta["choices"][ints[i]]
                i += 1
            elif kind == "bool":
                values[f.name] = bool(ints[i])
                i += 1
            elif kind == "int":
                values[f.name] = int(ints[i])
                i += 1
            elif kind == "real":
                values[f.name] = floats[j]
                j += 1
            elif kind == "choices":
                n = ints[i]
                values[f.name] = tuple(meta["choices"][k] for k in ints[i + 1:i + 1 + n])
                i += 1 + n
            else:
                n = ints[i]
                values[f.name] = tuple(floats[j:j + n])
                i += 1
                j += n
        if i != len(ints) or j != len(floats):
            raise ValueError(f"{cls.__name__}.decode: {len(ints) - i} ints and {len(floats) - j} floats left over")
        return cls(**values)


def _config_type(meta: dict) -> Any:
    """The type a trainer config (``HfArgumentParser``) reads the field as: tuples become lists."""
    base = {"choice": str, "real": float, "int": int, "bool": bool, "choices": list[str], "reals": list[float]}
    kind_type = base[meta["kind"]]  # a choice stays a str: the settings' own check names the field
    return (kind_type | None) if meta["optional"] else kind_type


def config_fields(cls: type[Settings], *, exclude: Sequence[str] = (),
                  help: Mapping[str, str] | None = None) -> list[tuple[str, Any, dataclasses.Field]]:
    """The fields of ``cls`` as ``dataclasses.make_dataclass`` entries for a trainer config.

    Same names, defaults and help, tuples as lists; fields declared ``config=False`` and those in
    ``exclude`` are left out. ``cls`` is a :class:`Settings` subclass.

    Args:
        exclude: names of fields to leave out.
        help: ``{name: text}`` overriding some fields' help.

    Returns:
        ``[(name, type, dataclasses.Field), ...]``, in the order of the fields.
    """
    out = []
    help = dict(help or {})
    for f in dataclasses.fields(cls):
        meta = _meta(f)
        if not meta["config"] or f.name in exclude:
            continue
        kwargs: dict[str, Any] = {"metadata": {"help": help.get(f.name, meta["help"])}}  # HfArgumentParser passes metadata to argparse
        if isinstance(f.default, tuple):
            kwargs["default_factory"] = (lambda d: lambda: list(d))(f.default)
        else:
            kwargs["default"] = f.default
        out.append((f.name, _config_type(meta), dataclasses.field(**kwargs)))
    return out
