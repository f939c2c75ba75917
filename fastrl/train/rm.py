"""Reward model (Bradley–Terry) on preference pairs: the whole recipe, top to bottom (TRL's ``RewardTrainer``).

    from fastrl.train import RMConfig, train_rm
    result = train_rm(RMConfig(model_config={...}, train_data="pairs.jsonl", max_steps=100))
    # result.checkpoint: an AutoModelForSequenceClassification directory, a `reward_model:` of GRPO / online DPO

Model: a sequence classifier with one output (``AutoModelForSequenceClassification``,
``num_labels=1``), randomly initialised from ``model_config`` or loaded from a local ``model``
directory (a causal LM's directory gives the body and a new score head; a reward model's directory
goes on from where it was). Data: preference pairs, as offline DPO reads them (columns prompt /
chosen / rejected, text or token ids; :func:`fastrl.train.data.load_preference_pairs`), with an
optional per-pair ``margin_column``.

Each step lays out the 2B sequences of every micro-batch — B prompt + chosen, then the B prompt +
rejected — packed or padded, whichever costs fewer FLOPs
(:func:`~fastrl.train.model.sequence_layout`), runs the decoder to the hidden state of each
sequence's last token and the score head on it: ``r = score(h_last)``. The loss is
:func:`fastrl.losses.bradley_terry_loss` of the chosen and rejected scores (margin and
``center_rewards_coefficient`` when set); each micro-batch loss is weighted by its share of the
step's pairs, so accumulation gives the mean over the step's pairs. Logged: ``loss`` and the loss's
``rewards/accuracies`` (the share of pairs with r_chosen > r_rejected), ``rewards/margins``,
``rewards/chosen``, ``rewards/rejected`` (means over the step's pairs, every process).

The saved model reads the score where this recipe does: a Hugging Face sequence classifier scores a
right-padded row at its last token that is not the pad id (the pad id comes from the tokenizer when
the model config has none), so a sequence that ends with the pad id is scored at an earlier token
there; the run warns when the data hold such sequences.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections import defaultdict

import torch

from fastrl.losses import BradleyTerryLoss
from fastrl.train import distributed
from fastrl.train.config import RMConfig
from fastrl.train.data import PreferencePairs, load_preference_pairs
from fastrl.train.model import Policy, packing_works, prepare_for_training, sequence_layout
from fastrl.train.packing import COUNTS, SequenceBatch, pack
from fastrl.train.run import (TrainResult, data_fingerprint, end_step, finish, guarded, open_telemetry,
                              plan_steps, resume, start_run)
from fastrl.train.telemetry import Telemetry

__all__ = ["TrainResult", "last_token_batch", "rm_step", "sequence_scores", "train_rm"]



def last_token_batch(prompts: list[list[int]], completions: list[list[int]], *, layout=pack) -> SequenceBatch:
    """Sequences ``prompts[i] + completions[i]`` as one model batch, scored at each sequence's last token.

    Args:
        prompts: N prompts, token ids.
        completions: N completions, token ids (each non-empty).
        layout: :func:`~fastrl.train.packing.pack` (the default) or :func:`~fastrl.train.packing.pad`.

    Returns:
        A :class:`~fastrl.train.packing.SequenceBatch` whose ``score_index`` ``[N]`` int64 points at each
        sequence's last token (where its score is read) instead of the positions that predict its
        completion tokens.
    """
    batch = layout(prompts, completions)
    # the completion of sequence i ends at scored entry cu_seqlens[i+1] - 1, which predicts its last token
    last = batch.score_index[batch.cu_seqlens[1:].long() - 1] + 1
    return dataclasses.replace(batch, score_index=last)


def sequence_scores(policy: Policy, batch: SequenceBatch) -> torch.Tensor:
    """The score of each sequence of a :func:`last_token_batch`: the classifier's head on its last token.

    Args:
        policy: a :class:`~fastrl.train.model.Policy` over a one-output sequence classifier.
        batch: a :func:`last_token_batch` of N sequences.

    Returns:
        ``[N]`` fp32 scores (differentiable).
    """
    scores = policy(batch, lambda hidden, weight, bias: torch.nn.functional.linear(hidden, weight, bias))
    return scores[:, 0].float()


def rm_step(policy: Policy, micro_batches: list[list[int]], *, make_batch, loss_fn: BradleyTerryLoss, margins,
            autocast, telemetry: Telemetry) -> dict[str, float]:
    """Forward and backward of one optimiser step's micro-batches; gradients accumulate in the parameters.

    Args:
        policy: the reward model being trained (a :class:`~fastrl.train.model.Policy`).
        micro_batches: example (pair) indices of this process, one list per micro-batch.
        make_batch: ``make_batch(indices)`` gives the B chosen then B rejected sequences of B pairs.
        loss_fn: the :class:`~fastrl.losses.BradleyTerryLoss`.
        margins: ``margins(indices)`` gives the pairs' margins ``[B]`` fp32, or None.
        autocast: a context-manager factory for the forward (the run's autocast).
        telemetry: times the data and train phases.

    Returns:
        This process's metrics: the pair-weighted means of the loss and its metrics, the token counts
        (``COUNTS``) and ``pairs``.
    """
    step_pairs = sum(len(indices) for indices in micro_batches)
    sums: dict[str, float] = defaultdict(float)
    for k, indices in enumerate(micro_batches):
        distributed.gradient_sync(policy, k == len(micro_batches) - 1)
        with telemetry.phase("data"):
            batch = make_batch(indices)
            margin = margins(indices)
        with telemetry.phase("train"):
            with autocast():
                scores = sequence_scores(policy, batch)
            loss, metrics = loss_fn(scores[:len(indices)], scores[len(indices):], margin)
            share = len(indices) / step_pairs
            (loss * share).backward()
        for name, value in {"loss": loss.detach(), **metrics}.items():
            sums[name] += float(value) * share
        for name in COUNTS:
            sums[name] += getattr(batch, name)
    sums["pairs"] = float(step_pairs)
    return dict(sums)


def _warn_pad_endings(pairs: PreferencePairs, pad_id: int | None) -> None:
    if pad_id is None:
        return
    n = sum(c[-1] == pad_id for c in pairs.chosen + pairs.rejected)
    if n:
        warnings.warn(f"{n} sequences end with the pad token id {pad_id}: this run scores them at that token, but "
                      f"the saved sequence classifier scores a padded row at its last token that is not the pad id",
                      stacklevel=3)


def train_rm(config: RMConfig, *, callbacks=None) -> TrainResult:
    """Train a reward model as ``config`` says; see the module docstring.

    Args:
        config: an :class:`~fastrl.train.config.RMConfig`.
        callbacks: objects added to ``run.callbacks`` (:mod:`fastrl.train.run`), or None.

    Returns:
        The :class:`~fastrl.train.run.TrainResult`: logged records, the last checkpoint (a sequence-classifier
        directory :class:`fastrl.train.RewardModel` loads), the model.
    """
    run = start_run(config)
    run.callbacks.extend(callbacks or ())
    policy, world, model = run.policy, run.world, run.model
    text = model.config.get_text_config()
    if text.pad_token_id is None and run.tokenizer is not None and run.tokenizer.pad_token_id is not None:
        text.pad_token_id = run.tokenizer.pad_token_id  # the saved classifier scores padded batches with it

    # ---- data and its layout
    pairs = load_preference_pairs(config, run.tokenizer, run.vocab_size)
    _warn_pad_endings(pairs, text.pad_token_id)
    layout = sequence_layout(model, config.packing and packing_works(policy, run.vocab_size, world.device))

    def make_batch(indices: list[int]) -> SequenceBatch:
        prompts = [pairs.prompts[i] for i in indices] * 2
        completions = [pairs.chosen[i] for i in indices] + [pairs.rejected[i] for i in indices]
        return last_token_batch(prompts, completions, layout=layout).to(world.device)

    def margins(indices: list[int]) -> torch.Tensor | None:
        if pairs.margins is None:
            return None
        return torch.tensor([pairs.margins[i] for i in indices], dtype=torch.float32, device=world.device)

    prepare_for_training(policy, config, world)
    policy.train()
    plan_steps(run, len(pairs), "pairs", fingerprint=data_fingerprint(pairs))
    resume(run)
    open_telemetry(run)
    telemetry = run.telemetry
    loss_fn = BradleyTerryLoss(center_rewards_coefficient=config.center_rewards_coefficient)

    with guarded(run):
        for step in range(run.start_step, run.total_steps):
            started = time.perf_counter()
            micro_batches = [run.order.next() for _ in range(config.gradient_accumulation_steps)]
            local = rm_step(policy, micro_batches, make_batch=make_batch, loss_fn=loss_fn, margins=margins,
                            autocast=run.autocast, telemetry=telemetry)
            metrics = distributed.reduce_metrics({k: v for k, v in local.items() if k != "pairs"}, world.device,
                                                 summed=COUNTS, weight=local["pairs"])  # means over pairs
            tokens = metrics["tokens"]
            end_step(run, step + 1, started=started, loss=metrics["loss"], tokens=tokens,
                     flops=tokens * 3 * run.forward_flops, layout=(tokens, metrics["slots"], metrics["padded_slots"]),
                     record=lambda: {k: v for k, v in metrics.items() if k not in COUNTS})
        return finish(run)
