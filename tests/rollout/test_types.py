"""fastrl.rollout.types: the one stop-token resolution (generate, the vLLM engine and the trainer's
config all go through it), the prompt checks both engines share, and the decoder a call keeps
(fastrl.rollout.decoders.kept_decoder)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fastrl.rollout import prompt_list, resolve_stop_tokens


def _model(eos):
    return SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=eos))


def test_explicit_stop_ids_sorted_once():
    assert resolve_stop_tokens(7) == [7]
    assert resolve_stop_tokens([9, 2, 9]) == [2, 9]
    assert resolve_stop_tokens((3,)) == [3]
    assert resolve_stop_tokens(torch.tensor([5, 1])) == [1, 5]
    assert resolve_stop_tokens([], model=_model(4)) == []  # [] means none, whatever the model says


def test_default_is_the_eos_of_tokenizer_and_model():
    tokenizer = SimpleNamespace(eos_token_id=3)
    assert resolve_stop_tokens(None, model=_model([8, 3]), tokenizer=tokenizer) == [3, 8]
    assert resolve_stop_tokens(None, model=_model(8)) == [8]
    assert resolve_stop_tokens(None, model=SimpleNamespace()) == []
    assert resolve_stop_tokens(None, tokenizer=SimpleNamespace(eos_token_id=None)) == []
    # with a vocabulary, EOS ids outside it are left out (they can never be sampled)
    assert resolve_stop_tokens(None, model=_model([2, 500]), vocab_size=64) == [2]
    assert resolve_stop_tokens(None, model=_model([2, 500])) == [2, 500]


@pytest.mark.parametrize("bad", [-1, [1, -2], [True], [1.5], "3", 2.0, torch.tensor([1.0]), torch.ones(2, 2).long()])
def test_bad_stop_ids_raise_naming_the_argument(bad):
    with pytest.raises(ValueError, match="stop_token_ids"):
        resolve_stop_tokens(bad)


def test_stop_ids_outside_the_vocabulary_raise():
    with pytest.raises(ValueError, match=r"stop_token_ids must be token ids in \[0, 64\), got 64"):
        resolve_stop_tokens([1, 64], vocab_size=64)
    assert resolve_stop_tokens([63], vocab_size=64) == [63]


def test_config_checks_stop_ids_through_it(tmp_path):
    from fastrl.train import ConfigError, GRPOConfig

    (tmp_path / "p.jsonl").write_text('{"prompt": [1, 2]}\n')
    fields = dict(model_config={"model_type": "qwen2"}, train_data=str(tmp_path / "p.jsonl"), reward_funcs=["m:f"])
    assert GRPOConfig(**fields, stop_token_ids=5).stop_token_ids == [5]
    assert GRPOConfig(**fields, stop_token_ids=[9, 2]).stop_token_ids == [9, 2]  # kept as given
    for bad in ([-1], [True], "5", 2.5):
        with pytest.raises(ConfigError, match="stop_token_ids"):
            GRPOConfig(**fields, stop_token_ids=bad)


def test_prompt_list_checks_and_unpads():
    out = prompt_list(torch.tensor([[0, 4, 5], [6, 7, 0]]), torch.tensor([[0, 1, 1], [1, 1, 0]]), vocab=8)
    assert [p.tolist() for p in out] == [[4, 5], [6, 7]]
    assert [p.tolist() for p in prompt_list([[1, 2], torch.tensor([3])], None, vocab=8)] == [[1, 2], [3]]
    with pytest.raises(ValueError, match=r"prompt_ids\[1\] holds token ids outside \[0, 8\)"):
        prompt_list([[1], [8]], None, vocab=8)
    with pytest.raises(ValueError, match="attention_mask row 0 has padding between tokens"):
        prompt_list(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 0, 1]]), vocab=8)
    with pytest.raises(ValueError, match="prompt_ids"):
        prompt_list([], None, vocab=8)


def test_kept_decoder_is_reused_while_it_matches():
    transformers = pytest.importorskip("transformers")
    from fastrl.rollout import decoders

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256)).eval()
    kept = decoders.kept_decoders()
    try:
        first = decoders.kept_decoder(model, 4, 100, cuda_graph=False)
        assert kept[model] is first and first.length == 128  # rounded up to the 128-slot bucket
        assert decoders.kept_decoder(model, 4, 120, cuda_graph=False) is first  # same rows, same bucket
        second = decoders.kept_decoder(model, 4, 200, cuda_graph=False)  # another bucket: a new one
        assert second is not first and first.keys == [] and kept[model] is second and second.length == 256
        third = decoders.kept_decoder(model, 2, 200, cuda_graph=False)  # other rows: a new one
        assert third is not second and second.keys == []
        with pytest.raises(TypeError):
            kept[model] = first  # a read-only view
    finally:
        decoders.release_kept(model)
    assert model not in kept and third.keys == []
