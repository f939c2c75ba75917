"""The image-model adapter (fastrl/rollout/image.py) against the Hugging Face Janus model it wraps."""

import pytest
import torch

from fastrl.rollout.image import ImageModel, image_model, tiny_janus


@pytest.fixture(scope="module")
def janus():
    return tiny_janus(seed=0)


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_janus_defaults_come_from_the_config(janus):
    im = image_model(janus)
    assert (im.kind, im.codebook, im.image_tokens, im.offset, im.text_vocab) == ("janus", 32, 16, 64, 64)
    assert (im.boi_id, im.eoi_id, im.pad_id, im.bos_id) == (62, 63, 0, 1)
    assert image_model(im) is im
    assert "janus" in repr(im)


def test_janus_embedding_and_head_match_hf(janus):
    im = image_model(janus)
    prompt = torch.tensor([[1, 5, 6, 7, im.boi_id]])
    codes = torch.tensor([[3, 31, 0]])
    ids = torch.cat([prompt, codes + im.offset], 1)
    emb = im.embed(ids)
    text = janus.get_input_embeddings()(prompt)
    image = janus.prepare_embeddings_for_image_generation(codes)
    torch.testing.assert_close(emb, torch.cat([text, image], 1), rtol=1e-6, atol=1e-6)
    hidden = im.trunk(inputs_embeds=emb).last_hidden_state
    torch.testing.assert_close(im.image_logits(hidden), janus.model.generation_head(hidden), rtol=0, atol=0)
    torch.testing.assert_close(im.text_logits(hidden), janus.lm_head(hidden), rtol=0, atol=0)
    head = janus.model.generation_head
    assert im.head_weight is head.vision_head.weight and im.head_bias is head.vision_head.bias
    torch.testing.assert_close(im.image_hidden(hidden), head.activation_fn(head.proj_out(hidden)), rtol=0, atol=0)


def test_janus_trunk_output_is_what_generate_reads(janus):
    """HF's image generate feeds trunk(inputs_embeds).last_hidden_state[:, -1] to generation_head."""
    im = image_model(janus)
    ids = torch.tensor([[1, 9, 10, 11, im.boi_id]])
    greedy = janus.generate(ids, attention_mask=torch.ones_like(ids), generation_mode="image", guidance_scale=2.0,
                            do_sample=False)
    both = torch.cat([ids, torch.tensor([im.uncond_prompt(ids[0].tolist())])])
    hidden = im.trunk(inputs_embeds=im.embed(both)).last_hidden_state[:, -1]
    logits = im.image_logits(hidden)
    mixed = logits[1] + (logits[0] - logits[1]) * 2.0
    assert int(mixed.argmax()) == int(greedy[0, 0])


def test_uncond_prompt_keeps_bos_and_boi_only(janus):
    im = image_model(janus)
    assert im.uncond_prompt([1, 5, 6, im.boi_id]) == [1, 0, 0, im.boi_id]


def test_image_rows_marks_the_last_n_labels(janus):
    im = image_model(janus)
    rows = im.image_rows(torch.tensor([0, 16, 20 + 16], dtype=torch.int32))
    expected = [True] * 16 + [False] * 4 + [True] * 16
    assert rows.tolist() == expected
    with pytest.raises(ValueError, match="completion 1 has 4 tokens"):
        im.image_rows(torch.tensor([0, 16, 20]))


def test_codes_and_decode(janus):
    im = image_model(janus)
    codes = torch.tensor([[i % 32 for i in range(16)], [31 - i for i in range(16)]])
    plan = [5, 6, im.boi_id]
    got = im.codes([plan + (codes[0] + im.offset).tolist(), (codes[1] + im.offset).tolist()])
    assert torch.equal(got, codes)
    pixels = im.decode(codes)
    assert pixels.dtype == torch.uint8 and tuple(pixels.shape) == (2, 8, 8, 3)
    expected = ((janus.decode_image_tokens(codes).detach().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    assert torch.equal(pixels, expected)
    with pytest.raises(ValueError, match="row 0: its last 16 tokens are not all image codes"):
        im.codes([[5] * 16])
    with pytest.raises(ValueError, match="row 0 has 3 tokens"):
        im.codes([[5, 6, 7]])
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 32\)"):
        im.decode(codes + 1)
    with pytest.raises(ValueError, match=r"codes must be a \[n, 16\]"):
        im.decode(codes[:, :4])


def test_custom_decode_callable(janus):
    calls = []

    def decode(codes):
        calls.append(codes.shape)
        return torch.zeros(codes.shape[0], 4, 4, 3)  # floats in [-1, 1] are converted

    im = image_model(janus, decode=decode)
    out = im.decode(torch.zeros(3, 16, dtype=torch.long))
    assert calls == [(3, 16)] and out.dtype == torch.uint8 and int(out[0, 0, 0, 0]) == 128
    bad = image_model(janus, decode=lambda codes: torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"decode must return \[n, H, W, 3\]"):
        bad.decode(torch.zeros(1, 16, dtype=torch.long))


def test_range_model(llama):
    im = image_model(llama, image_token_range=[20, 36], image_tokens=4, boi_id=18,
                     decode=lambda c: torch.zeros(c.shape[0], 2, 2, 3, dtype=torch.uint8))
    assert (im.kind, im.offset, im.codebook, im.boi_id) == ("range", 20, 16, 18)
    assert torch.equal(im.head_weight, llama.lm_head.weight[20:36]) and im.head_bias is None
    ids = torch.tensor([[1, 2, 25, 30]])
    torch.testing.assert_close(im.embed(ids), llama.get_input_embeddings()(ids), rtol=0, atol=0)
    torch.testing.assert_close(im.embed_codes(torch.tensor([5])), llama.get_input_embeddings()(torch.tensor([25])),
                               rtol=0, atol=0)
    hidden = im.trunk(input_ids=ids).last_hidden_state
    torch.testing.assert_close(im.image_logits(hidden), llama.lm_head(hidden)[..., 20:36], rtol=1e-6, atol=1e-6)
    assert torch.equal(im.codes([[3, 20, 21, 35, 22]]), torch.tensor([[0, 1, 15, 2]]))
    assert tuple(im.decode(torch.zeros(2, 4, dtype=torch.long)).shape) == (2, 2, 2, 3)


@pytest.mark.parametrize("kwargs, match", [
    ({}, "model: LlamaForCausalLM has no image head"),
    ({"image_token_range": [20, 50], "image_tokens": 4}, r"image_token_range \[20, 50\) must be a non-empty range"),
    ({"image_token_range": [20, 20], "image_tokens": 4}, "must be a non-empty range"),
    ({"image_token_range": [20], "image_tokens": 4}, r"image_token_range must be \[lo, hi\)"),
    ({"image_token_range": [20, 30]}, "image_tokens: give the number of codes"),
    ({"image_token_range": [20, 30], "image_tokens": 0}, "image_tokens must be a positive int"),
    ({"image_token_range": [20, 30], "image_tokens": 4, "boi_id": 40}, r"boi_id must be a token id in \[0, 40\)"),
])
def test_range_model_refusals(llama, kwargs, match):
    with pytest.raises(ValueError, match=match):
        image_model(llama, **kwargs)


def test_type_errors(llama, janus):
    with pytest.raises(TypeError, match="model must be a Hugging Face model"):
        image_model(object())
    with pytest.raises(TypeError, match="decode must be callable"):
        image_model(janus, decode=3)
    with pytest.raises(TypeError, match="boi_id must be an int"):
        image_model(janus, boi_id=1.5)
    with pytest.raises(ValueError, match="image_tokens must be a positive int"):
        image_model(janus, image_tokens=-1)
    range_model = image_model(llama, image_token_range=[20, 30], image_tokens=2)
    with pytest.raises(ValueError, match="decode: a range image model needs a decode callable"):
        range_model.decode(torch.zeros(1, 2, dtype=torch.long))
    assert isinstance(range_model, ImageModel)
