"""Shared test helpers, the ``gpu`` marker (skipped without CUDA) and the ``slow`` tier (below)."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
TESTS = Path(__file__).resolve().parent

# The slow tier: `make test-fast` runs `-m "not slow"` (a quick loop: 2 min 33 s on the 2-core CPU machine
# at load 5-6, other test runs sharing the cores), `make test` (and CI) runs everything. The marks are given here, in one list, rather than in
# the test files. Whole files, by their path under tests/:
SLOW_FILES = (
    "test_gpu_compile.py",        # ahead-of-time Triton compiles for sm_80 / sm_90, nvcc builds
    "test_bench_trainer.py",      # the trainer-vs-TRL benchmark at CPU scale
    "tasks/test_pipeline.py",     # the demo pipeline end to end
    "train/test_distributed.py",  # two-process gloo runs
    "train/test_distributed_rollout.py",
)
# Single tests, as patterns over "path under tests/::test name[parameters]" (the ids `pytest --durations`
# prints; `*` is the only wildcard, brackets are literal), chosen from `--durations` runs on the 2-core
# machine: each took seconds, or its family's cases did together. Where only some cases of a family are
# listed, the ones left in the fast tier still cover each loss type / setting once.
SLOW_TESTS = (
    # compiles: Triton ahead of time for a GPU (PTX / cubin checks) and torch.compile (dynamo's first use)
    "*::test_*compile*_for_the_gpu_*",
    "ops/test_fused_linear_logprobs.py::test_vocabulary_slices_*",
    "*::test_*torch_compile*",
    # Triton-interpreter families: the larger shapes or the second layout of each case
    "losses/test_fused_linear_dpo.py::test_loss_and_gradients_match_fp64[several-*]",
    "losses/test_fused_linear_grpo.py::test_loss_and_gradients_match_fp64[several-*]",
    "losses/test_fused_linear_dpo.py::test_chunks_of_pairs_take_three_gemms_on_scored_rows[pair too big-*-padded]",
    "losses/test_grpo_loss.py::test_triton_matches_the_reference[*-sequence_token]",
    "ops/test_fused_linear_logprobs.py::test_values_and_gradients_match_fp64[61-47-*]",
    "ops/test_sequence_logps.py::test_triton_padded_matches_the_reference[*-mask_dtype2]",
    # the CUDA sampler's source built for the host with g++ (SIMT emulation), and the runs of that build
    "test_sampling.py::test_emulated_*",
    # the GPU scripts' command lines run as subprocesses
    "test_gpu_scripts.py::test_command_line_exit_status",
    "test_gpu_scripts.py::test_bench_deadline_skips_and_still_writes_json",
    "test_gpu_scripts.py::test_log_prob_and_rollout_checks_pass_on_cpu",
    # Hugging Face models decoding (the llama and qwen2 cases of test_greedy_equals_hf_generate stay fast)
    "rollout/test_decoders.py::test_static_shape_step_equals_hf_and_survives_reuse[*]",
    "rollout/test_generate.py::test_bf16_sampler_logprobs_within_hf_bf16_error",
    "rollout/test_generate.py::test_greedy_equals_hf_generate[gpt2-*]",
    "rollout/test_generate.py::test_greedy_equals_hf_generate[qwen3-*]",
    "rollout/test_generate.py::test_greedy_equals_hf_generate[mistral-*]",
    "rollout/test_generate.py::test_seeded_draws_are_reproducible[hf]",
    "rollout/test_decoders.py::test_nan_in_padding_or_stale_slots_is_harmless[*]",
    # trainer runs: two gloo processes, resume, accumulation, reference, padding and precision equivalences
    "train/test_grpo.py::test_two_gloo_processes",
    "train/test_checkpoint.py::test_resume_is_bit_exact",
    "train/test_dpo.py::test_gradient_accumulation_matches_one_large_batch",
    "train/test_dpo.py::test_live_and_precomputed_references_agree",
    "train/test_dpo.py::test_padding_gradient_checkpointing_and_llama_train_the_same",
    "train/test_dpo.py::test_bf16_autocast_and_reference_free_losses",
    # image-generation trainer: two gloo processes (FSDP2 over the Janus trunk), the CFG gradient check
    "train/test_image_train.py::test_two_gloo_processes_*",
    "train/test_image_train.py::test_plan_and_image_logps_match_hf_fp64_and_their_gradients[True]",
    "train/test_image_train.py::test_example_config_trains_through_the_command_line",
)


def is_slow(nodeid: str) -> bool:
    """Whether the test ``nodeid`` ("path under tests/::name[params]") belongs to the slow tier."""
    path = nodeid.split("::", 1)[0]
    return path in SLOW_FILES or any(fnmatch.fnmatchcase(nodeid, p.replace("[", "[[]")) for p in SLOW_TESTS)


@pytest.hookimpl(tryfirst=True)  # before `-m` selects on the marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        path = item.path.resolve()
        if path.is_relative_to(TESTS) and is_slow("::".join([path.relative_to(TESTS).as_posix(),
                                                             *item.nodeid.split("::")[1:]])):
            item.add_marker(pytest.mark.slow)
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (make gpu-test)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def expect_error(call, error, match, *args, **kwargs):
    """``call(*args, **kwargs)`` must raise ``error`` (a type or tuple of types) with a message that
    ``match`` (a regex) finds, as the bad-input tests check that the message names the argument or
    field. Returns pytest's ExceptionInfo for further checks."""
    with pytest.raises(error, match=match) as info:
        call(*args, **kwargs)
    return info


def refusal_test(cases):
    """A test, parametrized by index, that each bad call of ``cases()`` is refused: ``cases`` returns
    ``[(call, error type, message regex), ...]`` with argument-free calls (lambdas over tensors it
    builds), and is called again in every case so that each gets fresh tensors. Bind it in the test
    module: ``test_bad_arguments_are_refused = refusal_test(_bad_calls)``."""
    @pytest.mark.parametrize("index", range(len(cases())))
    def test(index):
        expect_error(*cases()[index])

    test.__doc__ = f"Every call of {cases.__name__}() raises its error with a matching message."
    return test


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test of ``counts`` against ``probs`` (zero-probability bins
    must be empty: a draw there is an outright failure, reported as p = 0)."""
    counts = counts.double()
    probs = probs.double()
    if (counts[probs == 0] > 0).any():
        return 0.0
    support = probs > 0
    if int(support.sum()) < 2:
        return 1.0
    expected = probs[support] * counts.sum()
    stat = ((counts[support] - expected) ** 2 / expected).sum()
    dof = torch.tensor(float(support.sum() - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(dof / 2, stat / 2))


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(1234)


def compile_for_gpu(kernel, signature: dict, constexprs: dict, *, capability: int = 90, num_warps: int = 4,
                    aligned: tuple[str, ...] = (), num_stages: int | None = None) -> dict:
    """Compile a ``@triton.jit`` kernel ahead of time for an NVIDIA GPU that this machine lacks and
    read its resources from the cubin with the ``cuobjdump`` shipped inside Triton.

    ``aligned`` names the arguments to compile as divisible by 16, as Triton's launcher specialises
    them at run time (pointers from torch allocations; integers such as strides when they are
    multiples of 16, e.g. a vocabulary of 151936) - without it the loads cannot be vectorised.

    Returns ``{"ptx": str, "REG": int, "STACK": int, "LOCAL": int, "SHARED": int, "DYNAMIC_SHARED": int}``:
    ``SHARED`` is the cubin's static shared memory (cuobjdump; 1 KiB reserved by the system on sm_90),
    ``DYNAMIC_SHARED`` the shared memory Triton asks for at launch (``compiled.metadata.shared``), which
    Triton's launcher compares with the device's per-block opt-in limit.
    """
    import os
    import re
    import subprocess
    import tempfile

    import triton
    import triton.backends.nvidia as nvidia
    from triton.backends.compiler import GPUTarget

    names = list(signature)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps, "num_stages": num_stages}
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
    cuobjdump = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", usage))
    return {"ptx": compiled.asm["ptx"], **{k: int(v) for k, v in found.items()},
            "DYNAMIC_SHARED": int(compiled.metadata.shared)}


@pytest.fixture
def launches(monkeypatch):
    """Every Triton launch made through ``fastrl.kernels.launch`` during the test, as
    ``(kernel name, grid)`` in order (the list is live: clear it between phases)."""
    import fastrl.kernels

    calls = []
    real = fastrl.kernels.launch

    def counting(kernel, grid, *args, **kwargs):
        calls.append((getattr(kernel, "__name__", None) or kernel.fn.__name__, grid))
        return real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(fastrl.kernels, "launch", counting)
    return calls


@pytest.fixture
def interpreter_loads(monkeypatch):
    """The addresses every ``tl.load`` reads in kernels run by Triton's interpreter during the test
    (one numpy uint64 array per load, masked-off lanes left out; the list is live: clear it between
    phases). What a test needs to prove that a kernel never reads some memory."""
    import numpy as np
    from triton.runtime.interpreter import InterpreterBuilder

    loads = []
    real = InterpreterBuilder.create_masked_load

    def recording(self, ptrs, mask, *args, **kwargs):
        addresses = np.asarray(ptrs.data)
        lanes = np.broadcast_to(np.asarray(mask.data, dtype=bool), addresses.shape)
        loads.append(addresses[lanes].astype(np.uint64).ravel())
        return real(self, ptrs, mask, *args, **kwargs)

    monkeypatch.setattr(InterpreterBuilder, "create_masked_load", recording)
    return loads


def gemm_counter(monkeypatch) -> list:
    """From now until ``monkeypatch.undo()``, records ``(m, k, n)`` of every matrix product through the
    torch entry points the fused-linear code calls (torch.mm / addmm, Tensor @ / addmm_): the lm-head
    GEMMs, for tests that count the GEMM work of a forward and backward."""
    record = []

    def wrap(fn, operands):
        def inner(*args, **kwargs):
            a, b = operands(*args)
            record.append((a.shape[-2], a.shape[-1], b.shape[-1]))
            return fn(*args, **kwargs)
        return inner

    monkeypatch.setattr(torch, "mm", wrap(torch.mm, lambda a, b, *rest: (a, b)))
    monkeypatch.setattr(torch, "addmm", wrap(torch.addmm, lambda acc, a, b, *rest: (a, b)))
    monkeypatch.setattr(torch.Tensor, "__matmul__", wrap(torch.Tensor.__matmul__, lambda a, b: (a, b)))
    monkeypatch.setattr(torch.Tensor, "addmm_", wrap(torch.Tensor.addmm_, lambda acc, a, b, *rest: (a, b)))
    return record


def load_benchmark_script(name: str):
    """``benchmarks/<name>.py`` imported as a module of its own (``<name>_under_test``), for the tests
    that keep the benchmark scripts runnable."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
