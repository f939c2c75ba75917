"""The public API's docstrings follow one style (the one of :func:`fastrl.ops.selective_logprobs`).

A one-line summary, ending with a period, then an optional paragraph of semantics, then sections:
``Args:`` with one ``name: ...`` entry per parameter (a tensor's entry states its shape in brackets,
``[B, L]`` / ``[T]`` / ``[..., V]``, and its dtypes), ``Returns:`` (or ``Yields:``) unless the function
returns None, ``Raises:`` where it raises for bad input. A class documents its constructor's parameters
in its own ``Args:``; an ``nn.Module``'s ``forward`` is documented too. Read with :mod:`inspect`, for the
names in each module's ``__all__``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re

import pytest
import torch

# The modules whose public names (``__all__``) are checked.
MODULES = [
    "fastrl.ops.selective_logprobs",
    "fastrl.ops.fused_linear_logprobs",
    "fastrl.ops.sequence_logps",
    "fastrl.ops.group_advantages",
    "fastrl.ops.packing",
    "fastrl.ops.dispatch",
    "fastrl.sampling",
    "fastrl.train.data",
    "fastrl.train.model",
    "fastrl.train.packing",
    "fastrl.train.optim",
    "fastrl.train.telemetry",
    "fastrl.train.attention",
    "fastrl.train.rewards",
    "fastrl.losses.grpo",
    "fastrl.losses.dpo",
    "fastrl.losses.fused_linear_grpo",
    "fastrl.losses.fused_linear_dpo",
    "fastrl.losses.preference",
    "fastrl.losses.settings",
    "fastrl.losses.torch_impl.grpo",
    "fastrl.losses.torch_impl.dpo",
    "fastrl.rollout.generate",
    "fastrl.rollout.types",
    "fastrl.rollout.decoders",
    "fastrl.rollout.vllm_engine",
    "fastrl.rollout.image",
    "fastrl.train.online",
    "fastrl.train.grpo",
    "fastrl.train.dpo",
    "fastrl.train.online_dpo",
    "fastrl.train.sft",
    "fastrl.train.rm",
    "fastrl.train.image_rewards",
    "fastrl.train.best_of_n",
    "fastrl.train.run",
    "fastrl.train.checkpoint",
    "fastrl.train.distributed",
    "fastrl.train.reference",
    "fastrl.train.config",
]

# nn.Modules that are state holders, not layers: no forward (their docstring says how they are used).
NO_FORWARD = {"fastrl.losses.preference.RunningMean"}

SECTIONS = ("Args", "Returns", "Yields", "Raises", "Example", "Examples", "Note", "Notes", "Warning")
_HEADER = re.compile(r"^(%s):\s*$" % "|".join(SECTIONS))
_ENTRY = re.compile(r"^(\*{0,2}[A-Za-z_][A-Za-z0-9_]*)(\s*\([^)]*\))?:(\s|$)")
_SHAPE = re.compile(r"\[[^\[\]]*\]")
_DTYPE = re.compile(r"\b(fp(?:8|16|32|64)|bf16|bfloat16|float(?:16|32|64)?|half|double|u?int(?:8|16|32|64)?|long|"
                    r"integer|floating|bool|boolean|complex|dtype)\b")
_IMPLICIT = ("self", "cls")
_FOREIGN = ("builtins", "torch", "typing", "abc")  # constructors documented elsewhere (nn.Module's, ...)


def sections(doc: str) -> dict[str, list[str]]:
    """The lines of each section of a cleaned docstring (``inspect.cleandoc``), by header name; the
    text before the first header is under ``""``. A section runs to the next unindented line."""
    out: dict[str, list[str]] = {"": []}
    current = ""
    for line in doc.splitlines():
        match = _HEADER.match(line)
        if match:
            current = match.group(1)
            out.setdefault(current, [])
            continue
        if current and line.strip() and not line[0].isspace():
            current = ""  # prose after a section, back at the left margin
        out[current].append(line)
    return out


def arg_entries(lines: list[str]) -> tuple[dict[str, str], list[str]]:
    """``{name: text}`` of an ``Args:`` section's entries (continuation lines included), and the
    problems found (an entry that is not ``name: ...``, a name given twice)."""
    body = [line for line in lines if line.strip()]
    if not body:
        return {}, ["the Args section is empty"]
    indent = min(len(line) - len(line.lstrip()) for line in body)
    entries: dict[str, str] = {}
    problems: list[str] = []
    name = None
    for line in body:
        here = len(line) - len(line.lstrip())
        text = line.strip()
        if here == indent:
            match = _ENTRY.match(text)
            if not match:
                problems.append(f"Args entry {text[:40]!r} is not 'name: ...'")
                name = None
                continue
            name = match.group(1)
            if name in entries:
                problems.append(f"Args names {name} twice")
            entries[name] = text[match.end(1):]
        elif name is not None:
            entries[name] += " " + text
    return entries, problems


def _annotation(param: inspect.Parameter) -> str:
    a = param.annotation
    if a is inspect.Parameter.empty:
        return ""
    return a if isinstance(a, str) else getattr(a, "__name__", None) or str(a)


def _returns_none(signature: inspect.Signature) -> bool:
    a = signature.return_annotation
    return a is None or a is type(None) or (isinstance(a, str) and a.strip() == "None")


def _summary_problems(doc: str | None, what: str) -> list[str]:
    if not doc or not doc.strip():
        return [f"{what} has no docstring"]
    lines = inspect.cleandoc(doc).splitlines()
    first = lines[0].strip()
    if not first:
        return [f"{what}: the docstring does not start with a summary line"]
    if len(lines) > 1 and lines[1].strip():
        return [f"{what}: the summary is not one line (a blank line must follow it)"]
    if not first.endswith("."):
        return [f"{what}: the summary line does not end with a period"]
    return []


def parameter_problems(doc: str, params: list[inspect.Parameter], what: str,
                       documented: frozenset[str] = frozenset()) -> list[str]:
    """Every parameter (but self / cls) has an ``Args:`` entry, every entry names a parameter, and a
    tensor parameter's entry gives a shape in brackets and a dtype. The names in ``documented`` are
    documented elsewhere (a config field's ``help``) and need no entry."""
    params = [p for p in params if p.name not in _IMPLICIT and p.name not in documented]
    doc = inspect.cleandoc(doc)
    parts = sections(doc)
    headers = [m.group(1) for m in map(_HEADER.match, doc.splitlines()) if m]
    problems = [f"{what}: the {h}: header appears twice" for h in sorted(set(headers)) if headers.count(h) > 1]
    if not params:
        return problems if "Args" not in parts else problems + [
            f"{what}: Args documents {k}, which is not a parameter"
            for k in arg_entries(parts["Args"])[0] if k not in documented]
    if "Args" not in parts:
        return problems + [f"{what}: no Args: section (parameters {', '.join(p.name for p in params)})"]
    entries, bad = arg_entries(parts["Args"])
    problems += [f"{what}: {b}" for b in bad]
    by_name = {}
    for p in params:
        star = "*" if p.kind is p.VAR_POSITIONAL else "**" if p.kind is p.VAR_KEYWORD else ""
        key = next((k for k in (star + p.name, p.name) if k in entries), None)
        if key is None:
            problems.append(f"{what}: Args does not document {star + p.name}")
            continue
        by_name[key] = p
        if "Tensor" in _annotation(p):
            text = entries[key]
            if not _SHAPE.search(text):
                problems.append(f"{what}: Args entry {p.name} (a tensor) gives no shape in brackets")
            if not _DTYPE.search(text):
                problems.append(f"{what}: Args entry {p.name} (a tensor) gives no dtype")
    problems += [f"{what}: Args documents {k}, which is not a parameter" for k in entries
                 if k not in by_name and k not in documented]
    return problems


def function_problems(fn, what: str) -> list[str]:
    """The style problems of a function's (or other callable's) docstring."""
    doc = inspect.getdoc(fn)
    problems = _summary_problems(doc, what)
    if problems:
        return problems
    signature = inspect.signature(fn)
    problems = parameter_problems(doc, list(signature.parameters.values()), what)
    parts = sections(inspect.cleandoc(doc))
    if not _returns_none(signature) and "Returns" not in parts and "Yields" not in parts:
        problems.append(f"{what}: no Returns: section (and not annotated -> None)")
    return problems


def _python_init(cls) -> inspect.Signature | None:
    """The signature of the constructor when Python code defines it (a dataclass's included), else
    None (an exception's, inherited from a builtin)."""
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            if not inspect.isfunction(init) or klass.__module__.split(".")[0] in _FOREIGN:
                return None
            params = list(inspect.signature(init).parameters.values())[1:]
            return inspect.Signature(params)
    return None


def _helped_fields(cls) -> frozenset[str]:
    """A dataclass's fields that carry ``metadata["help"]`` (the trainer configs': their ``--help``
    text is their documentation)."""
    if not dataclasses.is_dataclass(cls):
        return frozenset()
    return frozenset(f.name for f in dataclasses.fields(cls) if str(f.metadata.get("help", "")).strip())


def class_problems(cls, what: str) -> list[str]:
    """A class: summary, ``Args:`` for the constructor's parameters, and for an ``nn.Module`` a
    documented ``forward`` (its own docstring, checked as a function's, or the class docstring naming
    ``forward`` and each of its parameters as ````name````)."""
    doc = cls.__dict__.get("__doc__")
    problems = _summary_problems(doc, what)
    if problems:
        return problems
    init = _python_init(cls)
    if init is not None:
        problems += parameter_problems(doc, list(init.parameters.values()), what, _helped_fields(cls))
    if issubclass(cls, torch.nn.Module) and what not in NO_FORWARD:
        forward = next((k.__dict__["forward"] for k in cls.__mro__ if "forward" in k.__dict__), None)
        if forward is None or forward is torch.nn.Module.forward:
            problems.append(f"{what}: an nn.Module without a forward")
        elif forward.__doc__:
            problems += function_problems(forward, f"{what}.forward")
        else:
            names = list(inspect.signature(forward).parameters)[1:]
            if "forward" not in doc or any(f"``{n}``" not in doc for n in names):
                problems.append(f"{what}.forward is documented neither in its own docstring nor in the class's")
    return problems


def problems_of(obj, what: str) -> list[str]:
    """The style problems of one public name (nothing to check for a constant or a module)."""
    if inspect.isclass(obj):
        return class_problems(obj, what)
    if inspect.ismodule(obj) or not callable(obj):
        return []
    return function_problems(obj, what)


@pytest.mark.parametrize("module", MODULES)
def test_module_declares_its_api(module):
    mod = importlib.import_module(module)
    assert isinstance(getattr(mod, "__all__", None), list), f"{module} has no __all__"
    missing = [name for name in mod.__all__ if not hasattr(mod, name)]
    assert not missing, f"{module}.__all__ names what it does not define: {missing}"


@pytest.mark.parametrize("module", MODULES)
def test_public_docstring_style(module):
    mod = importlib.import_module(module)
    problems = [p for name in getattr(mod, "__all__", []) if hasattr(mod, name)
                for p in problems_of(getattr(mod, name), f"{module}.{name}")]
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------ the checks find planted bad docstrings

def _good(logits: torch.Tensor, labels: torch.Tensor, *rest, temperature: float = 1.0, **options) -> torch.Tensor:
    """Log-prob of each label.

    Some semantics, over
    two lines.

    Args:
        logits: ``[..., V]`` fp32, bf16 or fp16.
        labels: ``[...]`` int64 or int32, in ``[0, V)``;
            a continuation line.
        *rest: anything.
        temperature: > 0.
        **options: passed on.

    Returns:
        ``[...]`` fp32.

    Raises:
        ValueError: naming the argument.

    Example:
        >>> 1 + 1
        2
    """


def test_a_good_docstring_passes():
    assert problems_of(_good, "good") == []


def test_a_function_returning_none_needs_no_returns_section():
    def f(x: int) -> None:
        """Do it.

        Args:
            x: how often.
        """

    def g() -> int:
        """Nothing to take."""

    assert problems_of(f, "f") == []
    assert problems_of(g, "g") == ["g: no Returns: section (and not annotated -> None)"]


def _only(problems: list[str], fragment: str) -> bool:
    return len(problems) == 1 and fragment in problems[0]


def test_missing_or_bad_summary_is_found():
    def none(x: int) -> int:
        pass

    def two_lines(x: int) -> int:
        """The summary
        runs on.

        Args:
            x: a number.

        Returns:
            it.
        """

    def no_period(x: int) -> int:
        """The summary

        Args:
            x: a number.

        Returns:
            it.
        """

    assert _only(problems_of(none, "none"), "no docstring")
    assert _only(problems_of(two_lines, "two_lines"), "not one line")
    assert _only(problems_of(no_period, "no_period"), "period")


def test_missing_sections_and_entries_are_found():
    def no_args(x: int, y: int) -> int:
        """Sum.

        Returns:
            x + y.
        """

    def one_missing(x: int, y: int, *more: int, **kw) -> int:
        """Sum.

        Args:
            x: a number.
            more: numbers.

        Returns:
            x + y.
        """

    def stale(x: int) -> int:
        """Sum.

        Args:
            x: a number.
            y: gone.

        Returns:
            x.
        """

    def no_returns(x: int) -> int:
        """Sum.

        Args:
            x: a number.
        """

    def not_an_entry(x: int) -> int:
        """Sum.

        Args:
            x, the number.

        Returns:
            x.
        """

    assert _only(problems_of(no_args, "no_args"), "no Args: section")
    assert problems_of(one_missing, "one_missing") == ["one_missing: Args does not document y",
                                                       "one_missing: Args does not document **kw"]
    assert _only(problems_of(stale, "stale"), "documents y, which is not a parameter")
    assert _only(problems_of(no_returns, "no_returns"), "no Returns: section")
    assert any("is not 'name: ...'" in p for p in problems_of(not_an_entry, "not_an_entry"))


def test_a_tensor_without_shape_or_dtype_is_found():
    def no_shape(x: torch.Tensor) -> torch.Tensor:
        """Copy.

        Args:
            x: fp32 values.

        Returns:
            ``[N]`` fp32.
        """

    def no_dtype(x: torch.Tensor | None = None) -> torch.Tensor:
        """Copy.

        Args:
            x: ``[N]`` values.

        Returns:
            ``[N]`` fp32.
        """

    def dtype_after_section(x: torch.Tensor) -> torch.Tensor:
        """Copy.

        Args:
            x: ``[N]`` values.

        Returns:
            ``[N]`` fp32.
        """

    assert _only(problems_of(no_shape, "no_shape"), "no shape")
    assert _only(problems_of(no_dtype, "no_dtype"), "no dtype")
    assert _only(problems_of(dtype_after_section, "dtype_after_section"), "no dtype")  # Returns' fp32 is not x's


def test_classes_document_their_constructor_and_forward():
    class Good(torch.nn.Module):
        """A layer.

        Args:
            width: its width.
        """

        def __init__(self, width: int):
            super().__init__()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            """Apply it.

            Args:
                x: ``[N, width]`` fp32.

            Returns:
                ``[N, width]`` fp32.
            """

    class NoArgs(Good):
        """A layer."""

        def __init__(self, width: int):
            super().__init__(width)

    class Undocumented(torch.nn.Module):
        """A layer."""

        def forward(self, x):
            return x

    class InClass(torch.nn.Module):
        """A layer: its ``forward`` takes ``x``."""

        def forward(self, x):
            return x

    class Error(ValueError):
        """Bad input."""

    assert problems_of(Good, "Good") == []
    assert _only(problems_of(NoArgs, "NoArgs"), "no Args: section")  # forward inherited, documented
    assert _only(problems_of(Undocumented, "Undocumented"), "forward is documented neither")
    assert problems_of(InClass, "InClass") == []
    assert problems_of(Error, "Error") == []  # a builtin's constructor
    assert _only(problems_of(type("Bare", (), {}), "Bare"), "no docstring")  # not the inherited object.__doc__


def test_a_dataclass_documents_its_fields():
    import dataclasses

    @dataclasses.dataclass
    class Batch:
        """A batch.

        Args:
            ids: ``[N]`` int64.
        """

        ids: torch.Tensor
        mask: torch.Tensor | None = None

    assert _only(problems_of(Batch, "Batch"), "does not document mask")


def test_a_dataclass_field_with_help_metadata_is_documented():
    @dataclasses.dataclass
    class Config:
        """A config."""

        steps: int = dataclasses.field(default=1, metadata={"help": "optimiser steps"})
        seed: int = dataclasses.field(default=0, metadata={"help": " "})  # blank help documents nothing

    @dataclasses.dataclass
    class Stale:
        """A config.

        Args:
            gone: not a field.
        """

        steps: int = dataclasses.field(default=1, metadata={"help": "optimiser steps"})

    assert problems_of(Config, "Config") == ["Config: no Args: section (parameters seed)"]
    assert _only(problems_of(Stale, "Stale"), "documents gone, which is not a parameter")


def test_a_repeated_section_is_found():
    def twice(x: int) -> int:
        """Sum.

        Args:
            x: a number.

        Returns:
            x.

        Args:
            x: again.
        """

    assert any("Args: header appears twice" in p for p in problems_of(twice, "twice"))


def test_sections_parse_prose_back_at_the_margin():
    parts = sections("Summary.\n\nArgs:\n    x: a.\n\nReturns:\n    y.\nMore prose.\n\nExamples:\n    >>> 1\n    1")
    assert parts["Args"] == ["    x: a.", ""]
    assert parts["Returns"] == ["    y."]
    assert parts[""] == ["Summary.", "", "More prose.", ""]
    assert parts["Examples"] == ["    >>> 1", "    1"]
