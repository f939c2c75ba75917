"""Training data: local JSONL / JSON / Parquet files or in-memory tables, tokenised once, served in seeded order.

A prompt or completion cell is text (tokenised, with the tokenizer's chat template when it has one
and ``chat_template`` is on), a list of chat messages (``[{"role": ..., "content": ...}]``), or a
list of token ids (the tokenizer-free path of randomly initialised models). Every problem names
the file, the row and the column: a missing column, an empty completion, a prompt longer than
``max_prompt_length``, a token id outside the vocabulary.

**Rows are named as you would find them**: a row of a JSON-lines file by its line in the file
(``train_data (data.jsonl) line 7``, 1-based, blank lines counted), a row of a Parquet file, of a
JSON array, of a ``datasets.Dataset`` or of a list of dicts by its 1-based position
(``row 7 (1-based)``); in a directory of files the file's name comes first (``b.jsonl line 3``).
JSON and JSON lines are read by fastrl itself, line by line: an empty file, a line that is not
valid JSON (with the parser's reason and column) or not an object is a :class:`DataError` naming
the file and the line. A JSON-lines row keeps exactly the keys it has: a key absent from a row is
absent (the reward functions can tell a missing column from a ``null``); a Parquet file or a
``datasets.Dataset`` has every column in every row (a missing value is ``None`` there).

**In-memory tables**: :func:`load_table` and the loaders (``table=``) also take a
``datasets.Dataset`` or a list of dicts instead of a file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["DataError", "PreferencePairs", "Prompts", "Table", "load_preference_pairs", "load_prompts",
           "load_table"]


class DataError(ValueError):
    """Bad training data; the message names the file, row and column."""


@dataclasses.dataclass
class Table:
    """The rows of a data source, each with where it came from.

    Args:
        rows: one dict per row: a JSON-lines row with the keys it has, a Parquet / ``datasets`` row
            with every column.
        column_names: every column of the table (first seen first).
        source: names the data in messages (``train_data (path)``, ``train_data (a datasets.Dataset)``).
        lines: ``lines[i]`` names row i within the source (``line 7``, ``b.jsonl line 3``,
            ``row 7 (1-based)``).
    """

    rows: list[dict[str, Any]]
    column_names: list[str]
    source: str
    lines: list[str]

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def where(self, i: int) -> str:
        """Row i named in full: ``train_data (path) line 7``."""
        return f"{self.source} {self.lines[i]}"


def _json_rows(path: Path, name: str, where: str) -> tuple[list[dict], list[str]]:
    """The rows of one .jsonl / .json file (an array of objects, one object per line, or columns)."""
    prefix = f"{name} " if name else ""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: {name or 'the file'} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{where}: {name or 'the file'} cannot be read ({e.strerror or e})") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip():
        raise DataError(f"{where}: {name or 'the file'} is empty (no rows)")
    stripped = text.lstrip()
    if path.suffix == ".json" and stripped[0] in "[{":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as e:
            whole = None
            if stripped[0] == "[":  # an array: its own error, at the line of the file
                raise DataError(f"{where}: {prefix}line {e.lineno}: not valid JSON ({e.msg}: column {e.colno})") \
                    from None
        if isinstance(whole, list):
            for i, row in enumerate(whole):
                if not isinstance(row, dict):
                    raise DataError(f"{where}: {prefix}row {i + 1} (1-based): a row must be a JSON object, got "
                                    f"{type(row).__name__}")
            return whole, [f"{prefix}row {i + 1} (1-based)" for i in range(len(whole))]
        if isinstance(whole, dict):
            values = list(whole.values())
            if values and all(isinstance(v, list) for v in values) and len({len(v) for v in values}) == 1:
                n = len(values[0])  # columns: {"prompt": [...], "answer": [...]}
                return ([{k: whole[k][i] for k in whole} for i in range(n)],
                        [f"{prefix}row {i + 1} (1-based)" for i in range(n)])
            first = text[:len(text) - len(stripped)].count("\n") + 1  # the line the object starts on
            return [whole], [f"{prefix}line {first}" if "\n" not in stripped.rstrip() else f"{prefix}row 1 (1-based)"]
    rows, lines = [], []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may sit in a JSON string
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: {prefix}line {number}: not valid JSON ({e.msg}: column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: {prefix}line {number}: a row must be a JSON object, got "
                            f"{type(row).__name__}")
        rows.append(row)
        lines.append(f"{prefix}line {number}")
    return rows, lines


def _parquet_rows(path: Path, name: str, where: str) -> tuple[list[dict], list[str]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(str(path)).to_pylist()
    except Exception as e:  # pyarrow's reason, once, with the file
        raise DataError(f"{where}: {name or 'the file'} cannot be read as Parquet: {e}") from None
    prefix = f"{name} " if name else ""
    return rows, [f"{prefix}row {i + 1} (1-based)" for i in range(len(rows))]


def _columns(rows: Sequence[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(key, None)
    return list(seen)


def _in_memory(data: Any, field: str) -> Table:
    if hasattr(data, "column_names") and hasattr(data, "to_list"):  # datasets.Dataset
        rows = data.to_list()
        return Table(rows, list(data.column_names), f"{field} (a datasets.Dataset)",
                     [f"row {i + 1} (1-based)" for i in range(len(rows))])
    if isinstance(data, (str, bytes, dict)) or not hasattr(data, "__iter__"):
        raise DataError(f"{field}: must be a file or directory path, a datasets.Dataset or a list of dicts, got "
                        f"{type(data).__name__}")
    rows = list(data)  # a list of dicts (or a datasets.IterableDataset)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{field} (a list of {len(rows)} rows) row {i + 1} (1-based): a row must be a dict, got "
                            f"{type(row).__name__}")
    kind = "a datasets.IterableDataset" if hasattr(data, "column_names") else f"a list of {len(rows)} rows"
    return Table([dict(r) for r in rows], _columns(rows), f"{field} ({kind})",
                 [f"row {i + 1} (1-based)" for i in range(len(rows))])


def load_table(path: Any, columns: list[str], *, field: str = "train_data") -> Table:
    """The :class:`Table` of a local .jsonl / .json / .parquet file, a directory of them, or an in-memory table.

    JSON and JSON lines are read by fastrl (line by line: an error names the line); Parquet by
    pyarrow. Every row must have every column of ``columns``.

    Args:
        path: the file; a directory whose .jsonl / .json / .parquet files are read together, in
            name order (JSON and Parquet not mixed); or a ``datasets.Dataset`` or a list of dicts.
        columns: the columns every row must have.
        field: the config field that named ``path``, for the error messages.

    Returns:
        The :class:`Table`: the rows, their columns, and where each row came from.

    Raises:
        DataError: no data file, JSON and Parquet mixed, an empty file, a line that is not valid
            JSON or not an object, a Parquet file that cannot be read, a missing column (the
            message names it and lists the columns there are; a row without it is named), or no
            rows.
    """
    if path is None:
        raise DataError(f"{field}: no training data (set {field} to a .jsonl / .json / .parquet file or directory)")
    if isinstance(path, (str, os.PathLike)):
        p = Path(path)
        where = f"{field} ({path})"
        if not p.exists():
            raise DataError(f"{where}: no such file or directory")
        kinds = (".jsonl", ".json", ".parquet")
        files = sorted(f for f in p.iterdir() if f.suffix in kinds) if p.is_dir() else [p]
        if not files:
            raise DataError(f"{where}: no .jsonl / .json / .parquet file")
        suffixes = {f.suffix for f in files}
        if ".parquet" in suffixes and len(suffixes) > 1:
            raise DataError(f"{where}: mixes JSON and Parquet files")
        rows, lines = [], []
        for f in files:
            name = f.name if p.is_dir() else ""
            read = _parquet_rows if f.suffix == ".parquet" else _json_rows
            got, named = read(f, name, where)
            rows.extend(got)
            lines.extend(named)
        table = Table(rows, _columns(rows), where, lines)
    else:
        table = _in_memory(path, field)
    for column in columns:
        if column not in table.column_names:
            raise DataError(f"{table.source}: column {column!r} is missing; the columns are {table.column_names} "
                            f"(set the matching *_column option)")
    if len(table) == 0:
        raise DataError(f"{table.source}: no rows")
    for i, row in enumerate(table.rows):
        for column in columns:
            if column not in row:
                raise DataError(f"{table.where(i)}: no column {column!r} (this row has {list(row)})")
    return table


class Encoder:
    """Turns cells into token ids under one set of settings; ``where(row, column)`` names a cell.

    ``prompt(value, row, column)`` and ``completion(prompt_value, prompt_ids, value, row, column)``
    tokenise a cell (text, chat messages or token ids; see the module docstring) and raise
    :class:`DataError` naming it.

    Args:
        tokenizer: the tokenizer for text cells, or None (cells must then hold token ids).
        vocab_size: a token id must be below it.
        use_template: use the tokenizer's chat template (when it has one).
        source: names the data in messages (e.g. ``train_data (path)``), or the :class:`Table`
            whose source and row names (:attr:`Table.lines`) the messages use.
    """

    def __init__(self, tokenizer, vocab_size: int, *, use_template: bool, source: str | Table):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.template = bool(use_template and tokenizer is not None and getattr(tokenizer, "chat_template", None))
        self.lines = source.lines if isinstance(source, Table) else None
        self.source = source.source if isinstance(source, Table) else source

    def where(self, row: int, column: str) -> str:
        """Names a cell: ``train_data (path) line 7, column 'prompt'`` (row: the 0-based row index)."""
        place = self.lines[row] if self.lines is not None else f"row {row + 1} (1-based)"
        return f"{self.source} {place}, column {column!r}"

    def _ids(self, value: list, row: int, column: str) -> list[int]:
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            raise DataError(f"{self.where(row, column)}: a list cell must hold token ids (ints) or chat messages "
                            f"(dicts with role and content)")
        bad = [t for t in value if not 0 <= t < self.vocab_size]
        if bad:
            raise DataError(f"{self.where(row, column)}: token id {bad[0]} is outside the vocabulary "
                            f"[0, {self.vocab_size})")
        return list(value)

    def _need_tokenizer(self, row: int, column: str) -> None:
        if self.tokenizer is None:
            raise DataError(f"{self.where(row, column)}: text needs a tokenizer (set `tokenizer`), or give token ids")

    @staticmethod
    def _is_messages(value: Any) -> bool:
        return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)

    def _text(self, text: str, *, special: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def prompt(self, value: Any, row: int, column: str) -> list[int]:
        if isinstance(value, list) and not self._is_messages(value):
            return self._ids(value, row, column)
        self._need_tokenizer(row, column)
        if self._is_messages(value) or (isinstance(value, str) and self.template):
            if not self.template:
                raise DataError(f"{self.where(row, column)}: chat messages need a tokenizer with a chat template")
            messages = value if isinstance(value, list) else [{"role": "user", "content": value}]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self._text(text, special=False)  # the template writes its own special tokens
        if isinstance(value, str):
            return self._text(value, special=True)
        raise DataError(f"{self.where(row, column)}: expected text, chat messages or token ids, "
                        f"got {type(value).__name__}")

    def completion(self, prompt_value: Any, prompt_ids: list[int], value: Any, row: int, column: str) -> list[int]:
        if isinstance(value, list) and not self._is_messages(value):
            return self._ids(value, row, column)
        self._need_tokenizer(row, column)
        if self._is_messages(value):
            if not self.template:
                raise DataError(f"{self.where(row, column)}: chat messages need a tokenizer with a chat template")
        elif not isinstance(value, str):
            raise DataError(f"{self.where(row, column)}: expected text, chat messages or token ids, "
                            f"got {type(value).__name__}")
        if self.template:
            # The template decides how a turn ends (e.g. <|im_end|>): render prompt + answer and keep
            # what follows the prompt's rendering when it is a prefix of it.
            prompt_msgs = (prompt_value if self._is_messages(prompt_value)
                           else [{"role": "user", "content": prompt_value}])
            answer = value if isinstance(value, list) else [{"role": "assistant", "content": value}]
            if isinstance(prompt_value, str) or self._is_messages(prompt_value):
                full = self._text(self.tokenizer.apply_chat_template(prompt_msgs + answer, tokenize=False),
                                  special=False)
                if full[:len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
                    return full[len(prompt_ids):]
            if isinstance(value, list):
                value = "".join(str(m.get("content", "")) for m in value)
        ids = self._text(value, special=False)
        eos = self.tokenizer.eos_token_id
        return ids + ([eos] if eos is not None and ids else [])


def fit_prompt(ids: list[int], limit: int, truncation: str, where: str) -> list[int]:
    """A prompt within ``limit`` tokens: cut from the left, or refused, by ``truncation``.

    Args:
        ids: the prompt's token ids.
        limit: ``max_prompt_length``.
        truncation: ``"left"`` keeps the last ``limit`` tokens; anything else refuses a longer prompt.
        where: names the cell in messages (:meth:`Encoder.where`).

    Returns:
        ``ids``, or its last ``limit`` tokens.

    Raises:
        DataError: an empty prompt (a completion's first token needs one before it), or one too
            long without left truncation.
    """
    if not ids:
        raise DataError(f"{where}: the prompt is empty (a completion's first token needs at least one prompt token "
                        f"before it)")
    if len(ids) > limit:
        if truncation == "left":
            return ids[-limit:]
        raise DataError(f"{where}: the prompt has {len(ids)} tokens, more than max_prompt_length={limit} "
                        f"(raise max_prompt_length, or set prompt_truncation: left)")
    return ids


def fingerprint(*columns: list[list[int]]) -> str:
    """sha256 of every token id of ``columns``, in order, each list's length included.

    Args:
        *columns: lists of token-id lists (e.g. prompts, chosen, rejected).

    Returns:
        The hex digest (keys the reference log-prob cache).
    """
    h = hashlib.sha256()
    for column in columns:
        for ids in column:
            h.update(len(ids).to_bytes(4, "little"))
            h.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


@dataclasses.dataclass
class PreferencePairs:
    """Tokenised preference pairs, pair i being ``(prompts[i], chosen[i], rejected[i])``.

    Args:
        prompts: the prompts' token id lists.
        chosen: the preferred completions' token id lists.
        rejected: the other completions' token id lists.
        truncated_completions: how many completions were cut to ``max_completion_length``.
        margins: ``margins[i]`` the pair's margin where the config names a ``margin_column``
            (reward models), else None.
        lines: ``lines[i]`` names pair i's data row (``train_data (path) line 7``), for messages.
    """

    prompts: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]
    truncated_completions: int = 0
    margins: list[float] | None = None
    lines: list[str] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)

    def fingerprint(self) -> str:
        """sha256 of every token id, in order (keys the reference log-prob cache)."""
        return fingerprint(self.prompts, self.chosen, self.rejected)


@dataclasses.dataclass
class Prompts:
    """Tokenised prompts (GRPO / online DPO) with each row's other columns for the reward functions.

    Args:
        prompts: the prompts' token id lists.
        rows: ``rows[i]``, prompt i's data row, the columns it has (a reference answer, a target, ...).
        lines: ``lines[i]`` names row i (``train_data (path) line 7``), for messages.
        columns: every column of the table; a row without one of them lacks it (a JSON-lines row
            without the key), which a reward that asks for it is told about
            (:func:`fastrl.train.rewards.score`).
        prompt_column: the column holding the prompt (its value is a TRL-form reward's ``prompts``).
        allow_missing_columns: a reward asking for a column its row lacks gets None instead of an
            error (the config's ``allow_missing_columns``).
    """

    prompts: list[list[int]]
    rows: list[dict[str, Any]]
    lines: list[str] = dataclasses.field(default_factory=list)
    columns: list[str] = dataclasses.field(default_factory=list)
    prompt_column: str = "prompt"
    allow_missing_columns: bool = False

    def __len__(self) -> int:
        return len(self.prompts)

    def fingerprint(self) -> str:
        return fingerprint(self.prompts)

    def where(self, i: int) -> str:
        """Row i named in full (``train_data (path) line 7``)."""
        return self.lines[i] if i < len(self.lines) else f"row {i + 1} (1-based)"


def _source(config, table):
    return table if table is not None else config.train_data


def load_preference_pairs(config, tokenizer, vocab_size: int, table=None, *,
                          field: str = "train_data") -> PreferencePairs:
    """The preference pairs of ``config.train_data`` (or ``table``), tokenised.

    Completions are cut to ``max_completion_length`` (counted in
    :attr:`PreferencePairs.truncated_completions`); prompts longer than ``max_prompt_length`` are
    cut from the left or refused, by ``prompt_truncation``.

    Args:
        config: a trainer config: ``train_data``, ``prompt_column``, ``chosen_column``,
            ``rejected_column``, ``margin_column`` (where the config has one set), ``chat_template``,
            ``max_prompt_length``, ``prompt_truncation``, ``max_completion_length``.
        tokenizer: the tokenizer for text cells, or None (cells then hold token ids).
        vocab_size: the model's vocabulary size; a token id must be below it.
        table: a ``datasets.Dataset``, a list of dicts or a path to read instead of
            ``config.train_data``, or None.
        field: names the data in messages (``eval_data`` for held-out prompts).

    Returns:
        The :class:`PreferencePairs`, in file order.

    Raises:
        DataError: an unreadable file, a missing column, an empty prompt or completion, a prompt
            too long, a token id outside the vocabulary, a margin that is not a finite number (the
            message names the file, row and column).
    """
    margin_column = getattr(config, "margin_column", None)
    columns = [config.prompt_column, config.chosen_column, config.rejected_column] + [c for c in [margin_column] if c]
    data = load_table(_source(config, table), columns, field=field)
    enc = Encoder(tokenizer, vocab_size, use_template=config.chat_template, source=data)
    out = PreferencePairs([], [], [], margins=[] if margin_column else None,
                          lines=[data.where(i) for i in range(len(data))])
    for i, row in enumerate(data):
        if margin_column:
            margin = row[margin_column]
            if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
                raise DataError(f"{enc.where(i, margin_column)}: the margin must be a finite number, got {margin!r}")
            out.margins.append(float(margin))
        prompt_value = row[config.prompt_column]
        full_prompt = enc.prompt(prompt_value, i, config.prompt_column)
        prompt = fit_prompt(full_prompt, config.max_prompt_length, config.prompt_truncation,
                             enc.where(i, config.prompt_column))
        for column, bucket in ((config.chosen_column, out.chosen), (config.rejected_column, out.rejected)):
            ids = enc.completion(prompt_value, full_prompt, row[column], i, column)
            if not ids:
                raise DataError(f"{enc.where(i, column)}: the completion is empty")
            if len(ids) > config.max_completion_length:
                ids = ids[:config.max_completion_length]
                out.truncated_completions += 1
            bucket.append(ids)
        out.prompts.append(prompt)
    return out


def load_prompts(config, tokenizer, vocab_size: int, table=None, *, field: str = "train_data") -> Prompts:
    """The prompts of ``config.train_data`` (or ``table``), tokenised, each with its row's other columns.

    The other columns are kept for the reward functions (e.g. a reference answer).

    Args:
        config: a trainer config: ``train_data``, ``prompt_column``, ``chat_template``,
            ``max_prompt_length``, ``prompt_truncation`` (and ``allow_missing_columns`` where it has
            one).
        tokenizer: the tokenizer for text cells, or None (cells then hold token ids).
        vocab_size: the model's vocabulary size; a token id must be below it.
        table: a ``datasets.Dataset``, a list of dicts or a path to read instead of
            ``config.train_data``, or None.
        field: names the data in messages (``eval_data`` for held-out prompts).

    Returns:
        The :class:`Prompts`, in file order.

    Raises:
        DataError: an unreadable file, a missing column, an empty or too long prompt, a token id
            outside the vocabulary (the message names the file, row and column).
    """
    data = load_table(_source(config, table), [config.prompt_column], field=field)
    enc = Encoder(tokenizer, vocab_size, use_template=config.chat_template, source=data)
    out = Prompts([], [], lines=[data.where(i) for i in range(len(data))], columns=list(data.column_names),
                  prompt_column=config.prompt_column,
                  allow_missing_columns=bool(getattr(config, "allow_missing_columns", False)))
    for i, row in enumerate(data):
        ids = enc.prompt(row[config.prompt_column], i, config.prompt_column)
        out.prompts.append(fit_prompt(ids, config.max_prompt_length, config.prompt_truncation,
                                       enc.where(i, config.prompt_column)))
        out.rows.append(dict(row))
    return out
