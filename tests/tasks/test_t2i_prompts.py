"""Prompt specs, the grammar, and the in-domain / out-of-domain sets."""

from __future__ import annotations

from itertools import combinations

import pytest

from fastrl.tasks.t2i import (IN_DOMAIN_CATEGORIES, OOD_CATEGORIES, ObjectSpec, PromptSpec, Relation, Vocab,
                              make_prompt_sets, parse_prompt)
from fastrl.tasks.t2i.prompts import canonical_fact


@pytest.fixture(scope="module")
def sets():
    return make_prompt_sets(seed=0)


def test_text_and_parse_are_inverse(sets):
    for p in sets.train + sets.test + sets.ood:
        assert parse_prompt(p.text) == p
        assert Vocab().encode(p.text)  # every word is in the vocabulary


def test_text_of_specs():
    spec = PromptSpec((ObjectSpec("circle", "red", 2), ObjectSpec("square", "blue"), ObjectSpec("triangle")),
                      (Relation(1, "above", 2),))
    assert spec.text == "two red circles and a blue square above a triangle"
    assert PromptSpec((ObjectSpec("circle", None, 1),)).text == "one circle"


@pytest.mark.parametrize("text", ["", "red circle", "a red circles", "two red circle", "a red circle and",
                                  "a red circle left a blue square", "a red circle beside a blue square",
                                  "a purple circle"])
def test_bad_grammar_raises(text):
    with pytest.raises(ValueError):
        parse_prompt(text)


def test_relations_must_join_neighbours():
    with pytest.raises(ValueError, match="consecutive"):
        PromptSpec((ObjectSpec("circle"), ObjectSpec("square"), ObjectSpec("triangle")), (Relation(0, "above", 2),))


def test_deterministic_for_a_seed(sets):
    again = make_prompt_sets(seed=0)
    for name in ("train", "test", "ood"):
        assert [(p.text, p.category) for p in sets.split(name)] == [(p.text, p.category) for p in again.split(name)]
    assert sets.held_out == again.held_out
    other = make_prompt_sets(seed=1)
    assert [p.text for p in other.train] != [p.text for p in sets.train]


def test_categories_and_sizes(sets):
    counts = sets.counts()
    assert set(counts["train"]) == set(counts["test"]) == set(IN_DOMAIN_CATEGORIES)
    assert set(counts["ood"]) == set(OOD_CATEGORIES)
    assert 250 <= len(sets.in_domain) <= 400 and 60 <= len(sets.ood) <= 120
    assert all(p.split == "train" for p in sets.train) and all(p.split == "ood" for p in sets.ood)
    small = make_prompt_sets(seed=0, in_domain_per_category=10, test_fraction=0.5, ood_per_category=2)
    assert small.counts()["train"] == {c: 5 for c in IN_DOMAIN_CATEGORIES}
    assert small.counts()["ood"] == {c: 2 for c in OOD_CATEGORIES}


def test_prompts_are_distinct_within_and_across_splits(sets):
    texts = [p.text for p in sets.train + sets.test + sets.ood]
    assert len(texts) == len(set(texts))


def test_ood_shares_no_prompt_with_in_domain(sets):
    assert not {p.text for p in sets.ood} & {p.text for p in sets.in_domain}


def test_in_domain_uses_no_held_out_combination(sets):
    held = sets.held_out
    assert held.pairs and held.facts and held.counts
    for p in sets.in_domain:
        assert held.admits(p), (p.text, held.violations(p))


def test_every_ood_prompt_is_new(sets):
    """Each OOD prompt uses a held-out combination, or a template training never has (a lone object)."""
    assert all(len(p.objects) >= 2 for p in sets.in_domain)
    for p in sets.ood:
        assert sets.held_out.violations(p) or len(p.objects) == 1, p.text


def test_held_out_combinations_are_absent_in_domain(sets):
    keys_in_domain = [[o.key for o in p.objects] for p in sets.in_domain]
    pairs_in_domain = {frozenset(pair) for keys in keys_in_domain for pair in combinations(keys, 2)}
    facts_in_domain = {canonical_fact(p.objects[r.subject].key, r.relation, p.objects[r.object].key)
                       for p in sets.in_domain for r in p.relations}
    counts_in_domain = {(o.count, o.colour, o.shape) for p in sets.in_domain for o in p.objects if o.count}
    for p in sets.ood:
        if p.category == "color_attr":
            assert frozenset(o.key for o in p.objects) not in pairs_in_domain
        if p.category == "position" and p.objects[0].colour:
            r = p.relations[0]
            assert canonical_fact(p.objects[0].key, r.relation, p.objects[1].key) not in facts_in_domain
        if p.category == "counting":
            assert (p.objects[0].count, p.objects[0].colour, p.objects[0].shape) not in counts_in_domain
    assert {n for n, _, _ in counts_in_domain} == {2, 3}
    assert any(o.count == 4 for p in sets.ood for o in p.objects)


def test_ood_words_are_seen_in_training_except_ood_only_counts(sets):
    train_words = {w for p in sets.train for w in p.text.split()}
    ood_words = {w for p in sets.ood for w in p.text.split()}
    assert ood_words - train_words == {"four"}


def test_bad_arguments():
    with pytest.raises(ValueError, match="test_fraction"):
        make_prompt_sets(test_fraction=1.5)
    with pytest.raises(ValueError, match="overlap"):
        make_prompt_sets(train_counts=(2, 3), ood_only_counts=(3,))
