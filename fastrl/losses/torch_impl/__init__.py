"""Plain torch implementations of fastrl's fused losses (the ``torch`` backend and what the Triton
kernels are tested against): :mod:`.grpo` for the GRPO family, :mod:`.dpo` for the pairwise DPO family."""

from fastrl.losses.torch_impl import dpo, grpo

__all__ = ["dpo", "grpo"]
