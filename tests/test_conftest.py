"""The shared helpers of tests/conftest.py: the bad-input checks and the slow tier's list."""

from __future__ import annotations

import fnmatch
import re

import pytest

import conftest
from conftest import SLOW_FILES, SLOW_TESTS, TESTS, expect_error, is_slow, refusal_test


def _refuse(value):
    if value < 0:
        raise ValueError(f"value must be >= 0, got {value}")
    return value


def test_expect_error_passes_on_the_named_error_and_returns_it():
    info = expect_error(_refuse, ValueError, r"value must be >= 0", -1)
    assert info.type is ValueError and "got -1" in str(info.value)
    assert expect_error(lambda *, v: _refuse(v), (TypeError, ValueError), "value", v=-2).type is ValueError


def test_expect_error_fails_when_nothing_is_raised_or_the_message_differs():
    with pytest.raises(pytest.fail.Exception, match="DID NOT RAISE"):
        expect_error(_refuse, ValueError, "value", 1)
    with pytest.raises(AssertionError, match="Regex pattern did not match"):
        expect_error(_refuse, ValueError, "the other argument", -1)
    with pytest.raises(ValueError):  # another error type is not caught
        expect_error(_refuse, TypeError, "value", -1)


def test_refusal_test_runs_every_case_on_fresh_inputs():
    built = []

    def cases():
        built.append(object())
        return [(lambda: _refuse(-1), ValueError, "value"), (lambda: int("x"), ValueError, "invalid literal")]

    test = refusal_test(cases)
    (mark,) = [m for m in test.pytestmark if m.name == "parametrize"]
    assert mark.args == ("index", range(2)) and len(built) == 1
    test(0)
    test(1)
    assert len(built) == 3  # the list is built again for each case
    broken = refusal_test(lambda: [(lambda: _refuse(1), ValueError, "value")])
    with pytest.raises(pytest.fail.Exception):
        broken(0)


def test_is_slow_reads_the_files_and_the_patterns(monkeypatch):
    monkeypatch.setattr(conftest, "SLOW_FILES", ("a/test_x.py",))
    monkeypatch.setattr(conftest, "SLOW_TESTS", ("b/test_y.py::test_big*", "c/test_z.py::test_p[ab-*]"))
    assert is_slow("a/test_x.py::test_anything[1]")
    assert is_slow("c/test_z.py::test_p[ab-cpu]")
    assert not is_slow("c/test_z.py::test_pa") and not is_slow("c/test_z.py::test_p[b-cpu]")  # brackets: literal
    assert is_slow("b/test_y.py::test_big_model[cpu]")
    assert not is_slow("b/test_y.py::test_small")
    assert not is_slow("test_x.py::test_anything")  # paths are under tests/, not file names anywhere


def _test_names(path) -> set[str]:
    source = (TESTS / path).read_text()
    return set(re.findall(r"^(?:async )?def (test_\w+)", source, flags=re.M)) | set(
        re.findall(r"^(test_\w+) = ", source, flags=re.M))


def test_the_slow_list_names_tests_that_exist():
    """A renamed or deleted test must not leave a stale entry behind (it would quietly move a slow test
    into `make test-fast`, or mark nothing)."""
    for path in SLOW_FILES:
        assert (TESTS / path).is_file(), path
    files = [p.relative_to(TESTS).as_posix() for p in TESTS.rglob("test_*.py")]
    for pattern in SLOW_TESTS:
        path, _, name = pattern.partition("::")
        function = name.split("[", 1)[0]
        matched = [f for f in fnmatch.filter(files, path) if fnmatch.filter(_test_names(f), function)]
        assert name and matched, pattern


def test_the_slow_tier_is_marked(request):
    """The hook marks items: this file is fast, and the marker is registered (--strict-markers)."""
    assert request.node.get_closest_marker("slow") is None
    assert any(line.startswith("slow:") for line in request.config.getini("markers"))
