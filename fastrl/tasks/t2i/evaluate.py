"""Evaluation: score a generator on a prompt split, and lay results out like the paper's table.

``generate`` is any callable from a batch of prompts (lists of token ids, each ``<bos> words <sep>``)
to one completion per prompt (token ids, or 1-D tensors); the pipeline passes the model's greedy or
sampled generation. Metrics per category: mean reward and pass rate; a split's ``overall`` is the mean
over its categories (each category weighs the same, as GenEval's overall score does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fastrl.tasks.t2i.grid import Canvas
from fastrl.tasks.t2i.prompts import IN_DOMAIN_CATEGORIES, OOD_CATEGORIES, PromptSpec
from fastrl.tasks.t2i.scorer import Score, score_completion
from fastrl.tasks.t2i.vocab import Vocab

Generate = Callable[[list[list[int]]], Sequence[Iterable[int]]]

TABLE_GROUPS = (("in_domain", "In-domain (T2I-CompBench-style)", IN_DOMAIN_CATEGORIES),
                ("ood", "Out-of-domain (GenEval-style)", OOD_CATEGORIES))
"""The table's column groups: (key in the results, title, categories in order); each ends with ``overall``."""


@dataclass(frozen=True)
class EvalRecord:
    prompt: PromptSpec
    completion_ids: tuple[int, ...]
    canvas: Canvas  # as read from the completion (leniently, if malformed), or by the detector from its pixels
    score: Score


@dataclass(frozen=True)
class SplitEval:
    """Every prompt's completion and score; :meth:`summary` gives the numbers."""

    records: tuple[EvalRecord, ...]

    def summary(self) -> dict[str, Any]:
        """``{"categories": {cat: {"reward", "pass", "n"}}, "overall": {"reward", "pass", "n"}}`` (JSON-ready)."""
        by_cat: dict[str, list[Score]] = {}
        for r in self.records:
            by_cat.setdefault(r.prompt.category, []).append(r.score)
        cats = {c: {"reward": sum(s.reward for s in scores) / len(scores),
                    "pass": sum(s.passed for s in scores) / len(scores), "n": len(scores)}
                for c, scores in by_cat.items()}
        overall = {m: sum(v[m] for v in cats.values()) / len(cats) if cats else 0.0 for m in ("reward", "pass")}
        return {"categories": cats, "overall": {**overall, "n": len(self.records)}}


def evaluate(generate: Generate, prompts: Sequence[PromptSpec], vocab: Vocab, *, batch_size: int = 64,
             read: Callable[[list[tuple[int, ...]]], Sequence[Canvas]] | None = None, boi: bool = False,
             **score_options) -> SplitEval:
    """Generate a completion for each prompt (``batch_size`` prompts per call) and score it.

    ``read``: completions -> the canvases to score (e.g. :func:`~fastrl.tasks.t2i.pixels.detect_completions`:
    drawn to pixels and read back by the detector); default: the canvas the tokens say. ``boi``: the
    prompts end with ``<boi>`` (the image model's format without a plan). ``score_options`` go to
    :func:`~fastrl.tasks.t2i.scorer.score_completion` (``clutter_penalty``, ``malformed_scale``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    records = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        completions = generate([vocab.encode_prompt(p.text, boi=boi) for p in batch])
        if len(completions) != len(batch):
            raise ValueError(f"generate returned {len(completions)} completions for {len(batch)} prompts")
        completions = [tuple(ids.tolist() if hasattr(ids, "tolist") else (int(t) for t in ids)) for ids in completions]
        canvases = [vocab.decode_completion(ids).canvas for ids in completions] if read is None else read(completions)
        for spec, ids, canvas in zip(batch, completions, canvases):
            records.append(EvalRecord(spec, ids, canvas, score_completion(spec, ids, vocab, canvas=canvas,
                                                                          **score_options)))
    return SplitEval(tuple(records))


def results_table(results: Mapping[str, Mapping[str, SplitEval | Mapping[str, Any]]], *,
                  metric: str = "pass") -> dict[str, Any]:
    """The paper's layout as JSON-ready data: rows = methods (in the order given), columns = the
    in-domain categories and overall, then the out-of-domain categories and overall.

    ``results[method][group]``, group ``in_domain`` or ``ood``, is a :class:`SplitEval` or its
    :meth:`~SplitEval.summary`; ``metric`` is ``pass`` (pass rate) or ``reward`` (mean reward). A
    category no method was evaluated on is left out; a missing value is ``None``.
    """
    if metric not in ("pass", "reward"):
        raise ValueError(f"metric must be 'pass' or 'reward', got {metric!r}")
    summaries = {m: {g: (s.summary() if isinstance(s, SplitEval) else s) for g, s in groups.items()}
                 for m, groups in results.items()}
    groups = []
    for key, title, categories in TABLE_GROUPS:
        present = [c for c in categories if any(c in s.get(key, {}).get("categories", {}) for s in summaries.values())]
        if present:
            groups.append({"key": key, "title": title, "columns": [*present, "overall"]})
    rows = []
    for method, s in summaries.items():
        row: dict[str, Any] = {"method": method}
        for g in groups:
            split = s.get(g["key"])
            row[g["key"]] = {c: (None if split is None else
                                 split["overall"][metric] if c == "overall" else
                                 split["categories"].get(c, {}).get(metric)) for c in g["columns"]}
        rows.append(row)
    return {"metric": metric, "groups": groups, "rows": rows}


def markdown_table(table: Mapping[str, Any], *, digits: int = 2) -> str:
    """A :func:`results_table` as Markdown; the best value of each column is in bold."""
    groups = table["groups"]
    header = ["Method"] + [f"{'ID' if g['key'] == 'in_domain' else 'OOD'} {c}" if c == "overall" else c
                           for g in groups for c in g["columns"]]
    best = {(g["key"], c): max((r[g["key"]][c] for r in table["rows"] if r[g["key"]][c] is not None), default=None)
            for g in groups for c in g["columns"]}

    def cell(key: str, column: str, value: float | None) -> str:
        if value is None:
            return "–"
        text = f"{value:.{digits}f}"
        return f"**{text}**" if len(table["rows"]) > 1 and value == best[(key, column)] else text

    caption = "; ".join(f"{g['title']}: {', '.join(g['columns'][:-1])}" for g in groups)
    lines = [f"_{'pass rate' if table['metric'] == 'pass' else 'mean reward'} — {caption}_", "",
             "| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for r in table["rows"]:
        lines.append("| " + " | ".join([r["method"]] + [cell(g["key"], c, r[g["key"]][c])
                                                        for g in groups for c in g["columns"]]) + " |")
    return "\n".join(lines) + "\n"
