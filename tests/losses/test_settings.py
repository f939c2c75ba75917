"""fastrl.losses.settings: declared once, checked on construction, encoded for the custom ops, embedded in configs."""

from __future__ import annotations

import dataclasses

import pytest

from fastrl.losses.settings import Settings, config_fields, option


@dataclasses.dataclass(frozen=True)
class Toy(Settings):
    kind: str = option("a", "which toy", choices=("a", "b", "c"))
    kinds: tuple[str, ...] = option(("a",), "several toys", choices=("a", "b", "c"), many=True)
    pair: tuple[float, float] = option((2.0, 3.0), "a (pos, neg) pair", many=True, length=2)
    scale: float = option(1.0, "positive", low=0.0, low_open=True)
    cap: float | None = option(None, "optional cap", low=0.0)
    mode: str | None = option(None, "optional mode", choices=("x", "y"))
    count: int | None = option(None, "optional count", integer=True, low=1)
    flag: bool = option(False, "a switch")
    hidden: float = option(0.5, "kept out of configs", config=False)

    def check(self) -> None:
        if self.cap is not None and self.cap < self.scale:
            raise ValueError(f"cap ({self.cap}) must be at least scale ({self.scale})")


def test_values_are_normalised_on_construction():
    t = Toy(kinds=["b", "c"], pair=1.5, scale=2, count=3)
    assert t.kinds == ("b", "c") and t.pair == (1.5, 1.5) and t.scale == 2.0 and isinstance(t.scale, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.scale = 3.0


@pytest.mark.parametrize("changes", [{}, {"kind": "c", "kinds": ("c", "a", "b"), "pair": (0.0, -1.0), "cap": 4.0,
                                      "mode": "y", "count": 7, "flag": True, "hidden": -2.0}, {"mode": "x"}])
def test_encode_decode_round_trip(changes):
    t = Toy(**changes)
    ints, floats = t.encode()
    assert all(isinstance(i, int) for i in ints) and all(isinstance(f, float) for f in floats)
    assert Toy.decode(ints, floats) == t


def test_decode_rejects_a_foreign_encoding():
    ints, floats = Toy().encode()
    with pytest.raises(ValueError, match="left over"):
        Toy.decode(ints + [0], floats)


@pytest.mark.parametrize("changes, error, match", [
    ({"kind": "z"}, ValueError, r"kind must be one of a, b, c; got 'z'"),
    ({"kind": 1}, TypeError, "kind must be a str"),
    ({"kinds": ()}, ValueError, "kinds must not be empty"),
    ({"kinds": ("a", "q")}, ValueError, "kinds must be one of"),
    ({"pair": (1.0, 2.0, 3.0)}, ValueError, "pair must be a number or 2 numbers"),
    ({"pair": "ab"}, TypeError, "pair must be a number or a list"),
    ({"scale": 0.0}, ValueError, r"scale must be finite and in \(0.0, inf\]"),
    ({"scale": float("nan")}, ValueError, "scale must be finite"),
    ({"scale": True}, TypeError, "scale must be a number"),
    ({"scale": None}, TypeError, "scale must not be None"),
    ({"count": 0}, ValueError, "count must be >= 1"),
    ({"count": 1.5}, TypeError, "count must be an int"),
    ({"flag": 1}, TypeError, "flag must be a bool"),
    ({"cap": 0.5, "scale": 1.0}, ValueError, r"cap \(0.5\) must be at least scale"),
])
def test_bad_values_name_the_field(changes, error, match):
    with pytest.raises(error, match=match):
        Toy(**changes)


def test_from_options():
    t = Toy(scale=3.0)
    assert Toy.from_options(t) is t
    assert Toy.from_options(None, {"scale": 3.0}) == t
    assert Toy.from_options() == Toy()
    with pytest.raises(TypeError, match="not both"):
        Toy.from_options(t, {"scale": 3.0})
    with pytest.raises(TypeError, match=r"toy_loss\(\) got an unexpected keyword argument 'scal' \(did you mean 'scale'\?\)"):
        Toy.from_options(None, {"scal": 3.0}, where="toy_loss")
    with pytest.raises(TypeError, match="settings must be a Toy"):
        Toy.from_options(object())


def test_replace_checks_again():
    assert Toy().replace(scale=5.0).scale == 5.0
    with pytest.raises(ValueError, match="scale"):
        Toy().replace(scale=-1.0)


def test_config_fields_parse_to_the_same_settings():
    from transformers import HfArgumentParser

    fields = config_fields(Toy, exclude=("count",), help={"scale": "the scale, as the config says it"})
    names = [name for name, _, _ in fields]
    assert "hidden" not in names and "count" not in names and names[0] == "kind"
    Config = dataclasses.make_dataclass("Config", fields)
    parser = HfArgumentParser(Config)
    assert "the scale, as the config says it" in parser.format_help()
    (config,) = parser.parse_args_into_dataclasses(["--kinds", "a", "b", "--pair", "1", "2", "--mode", "x",
                                                    "--cap", "4", "--flag", "true"])
    assert isinstance(config.kinds, list)  # a list field with a fresh default per instance
    assert Toy(**dataclasses.asdict(config)) == Toy(kinds=("a", "b"), pair=(1.0, 2.0), mode="x", cap=4.0, flag=True)
    (default,) = parser.parse_args_into_dataclasses([])
    assert Toy(**dataclasses.asdict(default)) == Toy()
    assert Config().kinds is not Config().kinds
