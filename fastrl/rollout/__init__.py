"""Rollouts for GRPO / online DPO: G sampled completions per prompt with their sampler log-probs.

>>> import torch, fastrl.rollout
>>> from transformers import Qwen2Config, Qwen2ForCausalLM
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> model = Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
...                                      num_attention_heads=2, num_key_value_heads=1)).eval()
>>> out = fastrl.rollout.generate(model, [torch.tensor([1, 2, 3]), torch.tensor([4, 5])], max_new_tokens=8,
...                               num_samples=4, temperature=0.8, generator=torch.Generator().manual_seed(0))
>>> out.completion_ids.shape[0], out.prompt_index.tolist()
(8, [0, 0, 0, 0, 1, 1, 1, 1])
"""

from fastrl.rollout.generate import generate, release
from fastrl.rollout.image import ImageModel, image_model
from fastrl.rollout.types import Rollout, prompt_list, resolve_stop_tokens

__all__ = ["ImageModel", "Rollout", "generate", "image_model", "prompt_list", "release", "resolve_stop_tokens"]
