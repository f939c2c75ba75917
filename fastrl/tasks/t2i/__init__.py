"""Compositional text-to-image-token task: the embedded DPO-vs-GRPO demo's prompts, data, scorer and plots.

A model reads a prompt ("a red circle left of a blue square", "three green triangles") and writes a
6 × 6 canvas, one image token per cell (empty, or one of 4 colours × 3 shapes: 13 image codes),
optionally after a short textual plan. :mod:`~fastrl.tasks.t2i.pixels` decodes the codes to a 48 × 48
image and a detector reads the objects back from the pixels; the scorer checks them against the
prompt. The pieces, in the order a pipeline uses them:

    from fastrl.tasks import t2i
    vocab = t2i.Vocab()                                   # 37 text tokens + 13 image codes (unified ids)
    sets = t2i.make_prompt_sets(seed=0)                   # sets.train / sets.test (in-domain), sets.ood
    sft = t2i.sft_examples(sets.train, vocab, perfect_rate=0.5, cot=False, seed=0)
    # each example: ex.tokens, ex.completion_start (SFT loss on tokens[completion_start:])
    reward = t2i.make_reward_fn(vocab)                    # reward(prompt_ids, completion_ids) -> [0, 1]
    result = t2i.evaluate(generate, sets.ood, vocab)      # generate: list of prompt ids -> completions
    table = t2i.results_table({"SFT": {"in_domain": ..., "ood": result}, ...})
    print(t2i.markdown_table(table))
    t2i.render_canvases("canvases.png", {"SFT": [(r.prompt.text, r.canvas) for r in result.records[:4]]})

Modules: :mod:`~fastrl.tasks.t2i.grid` (the canvas), :mod:`~fastrl.tasks.t2i.vocab` (tokens and the
sequence format), :mod:`~fastrl.tasks.t2i.prompts` (specs, grammar, categories, splits),
:mod:`~fastrl.tasks.t2i.scorer` (rules and rewards), :mod:`~fastrl.tasks.t2i.pixels` (the codebook
decoder, the detector and the pixel reward), :mod:`~fastrl.tasks.t2i.data` (synthetic SFT
data, plans, reward-model inputs, preference pairs), :mod:`~fastrl.tasks.t2i.evaluate` (metrics and
the table), :mod:`~fastrl.tasks.t2i.render` (PNGs; needs matplotlib when called).
"""

from fastrl.tasks.t2i.data import (CORRUPTIONS, Example, flawed_canvas, perfect_canvas, plan_for, plan_matches_canvas,
                                   preference_pair, reward_model_ids, sample_canvas, sft_examples)
from fastrl.tasks.t2i.evaluate import EvalRecord, SplitEval, evaluate, markdown_table, results_table
from fastrl.tasks.t2i.grid import COLOURS, SHAPES, Canvas, Placed
from fastrl.tasks.t2i.prompts import (IN_DOMAIN_CATEGORIES, OOD_CATEGORIES, HeldOut, ObjectSpec, PromptSets, PromptSpec,
                                      Relation, make_prompt_sets, parse_prompt)
from fastrl.tasks.t2i.render import draw_canvas, plot_reward_curves, plot_training_curves, render_canvases
from fastrl.tasks.t2i.scorer import Check, Score, canvas_reward, make_reward_fn, score_canvas, score_completion
from fastrl.tasks.t2i.vocab import RELATIONS, Completion, Vocab

__all__ = ["COLOURS", "CORRUPTIONS", "IN_DOMAIN_CATEGORIES", "OOD_CATEGORIES", "RELATIONS", "SHAPES", "Canvas", "Check",
           "Completion", "EvalRecord", "Example", "HeldOut", "ObjectSpec", "Placed", "PromptSets", "PromptSpec",
           "Relation", "Score", "SplitEval", "Vocab", "canvas_reward", "draw_canvas", "evaluate", "flawed_canvas",
           "make_prompt_sets", "make_reward_fn", "markdown_table", "parse_prompt", "perfect_canvas", "plan_for",
           "plan_matches_canvas", "plot_reward_curves", "plot_training_curves", "preference_pair", "render_canvases",
           "results_table", "reward_model_ids", "sample_canvas", "score_canvas", "score_completion", "sft_examples"]
