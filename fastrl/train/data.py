"""Training data: local JSONL / Parquet through ``datasets``, tokenised once, served in seeded order.

A prompt or completion cell is text (tokenised, with the tokenizer's chat template when it has one
and ``chat_template`` is on), a list of chat messages (``[{"role": ..., "content": ...}]``), or a
list of token ids (the tokenizer-free path of randomly initialised models). Every problem names
the file, the row and the column: a missing column, an empty completion, a prompt longer than
``max_prompt_length``, a token id outside the vocabulary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path
from typing import Any

import torch

__all__ = ["DataError", "PreferencePairs", "Prompts", "load_preference_pairs", "load_prompts",
           "load_table"]


class DataError(ValueError):
    """Bad training data; the message names the file, row and column."""


def load_table(path: str, columns: list[str], *, field: str = "train_data"):
    """The ``datasets.Dataset`` of a local .jsonl / .json / .parquet file (or a directory of them).

    Args:
        path: the file, or a directory whose .jsonl / .json / .parquet files are read together
            (JSON and Parquet not mixed).
        columns: the columns the table must have.
        field: the config field that named ``path``, for the error messages.

    Returns:
        The table (``datasets.Dataset``, in memory), with every column of the files.

    Raises:
        DataError: no data file, JSON and Parquet mixed, a file that cannot be parsed, a missing
            column (the message names it and lists the columns there are), or no rows.
    """
    import datasets

    p = Path(path)
    kinds = (".jsonl", ".json", ".parquet")
    files = sorted(str(f) for f in p.iterdir() if f.suffix in kinds) if p.is_dir() else [str(p)]
    if not files:
        raise DataError(f"{field} ({path}): no .jsonl / .json / .parquet file")
    suffixes = {Path(f).suffix for f in files}
    if len(suffixes - {".json", ".jsonl"}) and len(suffixes) > 1:
        raise DataError(f"{field} ({path}): mixes JSON and Parquet files")
    builder = "parquet" if ".parquet" in suffixes else "json"
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        table = datasets.load_dataset(builder, data_files=files, split="train", keep_in_memory=True)
    except Exception as e:  # a parse error of the file: say which file
        raise DataError(f"{field} ({path}): cannot be read as {builder}: {e}") from e
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
    for column in columns:
        if column not in table.column_names:
            raise DataError(f"{field} ({path}): column {column!r} is missing; the columns are {table.column_names} "
                            f"(set the matching *_column option)")
    if len(table) == 0:
        raise DataError(f"{field} ({path}): no rows")
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
        source: names the data in messages (e.g. ``train_data (path)``).
    """

    def __init__(self, tokenizer, vocab_size: int, *, use_template: bool, source: str):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.template = bool(use_template and tokenizer is not None and getattr(tokenizer, "chat_template", None))
        self.source = source

    def where(self, row: int, column: str) -> str:
        return f"{self.source} row {row}, column {column!r}"

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
    """

    prompts: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]
    truncated_completions: int = 0
    margins: list[float] | None = None

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
        rows: ``rows[i]``, prompt i's data row, every column (a reference answer, a target, ...).
    """

    prompts: list[list[int]]
    rows: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.prompts)

    def fingerprint(self) -> str:
        return fingerprint(self.prompts)


def load_preference_pairs(config, tokenizer, vocab_size: int) -> PreferencePairs:
    """The preference pairs of ``config.train_data``, tokenised.

    Completions are cut to ``max_completion_length`` (counted in
    :attr:`PreferencePairs.truncated_completions`); prompts longer than ``max_prompt_length`` are
    cut from the left or refused, by ``prompt_truncation``.

    Args:
        config: a trainer config: ``train_data``, ``prompt_column``, ``chosen_column``,
            ``rejected_column``, ``margin_column`` (where the config has one set), ``chat_template``,
            ``max_prompt_length``, ``prompt_truncation``, ``max_completion_length``.
        tokenizer: the tokenizer for text cells, or None (cells then hold token ids).
        vocab_size: the model's vocabulary size; a token id must be below it.

    Returns:
        The :class:`PreferencePairs`, in file order.

    Raises:
        DataError: an unreadable file, a missing column, an empty prompt or completion, a prompt
            too long, a token id outside the vocabulary, a margin that is not a finite number (the
            message names the file, row and column).
    """
    margin_column = getattr(config, "margin_column", None)
    columns = [config.prompt_column, config.chosen_column, config.rejected_column] + [c for c in [margin_column] if c]
    table = load_table(config.train_data, columns)
    enc = Encoder(tokenizer, vocab_size, use_template=config.chat_template, source=f"train_data ({config.train_data})")
    out = PreferencePairs([], [], [], margins=[] if margin_column else None)
    for i, row in enumerate(table.select_columns(columns)):
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


def load_prompts(config, tokenizer, vocab_size: int) -> Prompts:
    """The prompts of ``config.train_data``, tokenised, each with its row's other columns.

    The other columns are kept for the reward functions (e.g. a reference answer).

    Args:
        config: a trainer config: ``train_data``, ``prompt_column``, ``chat_template``,
            ``max_prompt_length``, ``prompt_truncation``.
        tokenizer: the tokenizer for text cells, or None (cells then hold token ids).
        vocab_size: the model's vocabulary size; a token id must be below it.

    Returns:
        The :class:`Prompts`, in file order.

    Raises:
        DataError: an unreadable file, a missing column, an empty or too long prompt, a token id
            outside the vocabulary (the message names the file, row and column).
    """
    table = load_table(config.train_data, [config.prompt_column])
    enc = Encoder(tokenizer, vocab_size, use_template=config.chat_template, source=f"train_data ({config.train_data})")
    out = Prompts([], [])
    for i, row in enumerate(table):
        ids = enc.prompt(row[config.prompt_column], i, config.prompt_column)
        out.prompts.append(fit_prompt(ids, config.max_prompt_length, config.prompt_truncation,
                                       enc.where(i, config.prompt_column)))
        out.rows.append(dict(row))
    return out
