"""The op pattern: custom op + fake + autograd, resolved per call to Triton or the torch reference.

A test-only op (``fastrl_test::scale``) with a real Triton kernel exercises every piece the library
ops use: backend selection, the interpreter on CPU tensors, autograd and torch.compile.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from fastrl.kernels import launch
from fastrl.ops import backend, dispatch, requested_backend, resolve

CALLS = {"torch": 0, "triton": 0}


@triton.jit
def _scale_kernel(x_ptr, y_ptr, n, scale, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * scale, mask=mask)


@torch.library.custom_op("fastrl_test::scale", mutates_args=())
def scale(x: torch.Tensor, s: float) -> torch.Tensor:
    path = resolve(x.device)
    CALLS[path] += 1
    if path == "torch":
        return x * s
    x = x.contiguous()
    y = torch.empty_like(x)
    n = x.numel()
    launch(_scale_kernel, (triton.cdiv(n, 64),), x, y, n, s, BLOCK=64, num_warps=4)
    return y


@scale.register_fake
def _(x, s):
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    ctx.s = inputs[1]


scale.register_autograd(lambda ctx, grad: (scale(grad, ctx.s), None), setup_context=_setup)


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    CALLS.update(torch=0, triton=0)


def test_auto_runs_the_reference_on_cpu():
    x = torch.randn(100)
    assert requested_backend() == "auto" and resolve(x.device) == "torch"
    torch.testing.assert_close(scale(x, 3.0), x * 3.0)
    assert CALLS == {"torch": 1, "triton": 0}


def test_forced_triton_runs_the_kernel_in_the_interpreter_with_autograd():
    x = torch.randn(300, requires_grad=True)
    with backend("triton"):
        y = scale(x, 2.5)
        y.sum().backward()
    torch.testing.assert_close(y, x.detach() * 2.5)
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.5))
    assert CALLS == {"torch": 0, "triton": 2}  # forward and backward both on the kernel


def test_environment_variable_and_context_manager_precedence(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "Triton")
    assert requested_backend() == "triton"
    with backend("torch"):
        assert requested_backend() == "torch"
        with backend("auto"):
            assert requested_backend() == "auto"
        assert requested_backend() == "torch"
    assert requested_backend() == "triton"
    scale(torch.randn(10), 1.0)
    assert CALLS["triton"] == 1


def test_bad_backend_names_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="backend"):
        with backend("cuda"):
            pass
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="FASTRL_BACKEND"):
        requested_backend()


def test_compiled_graph_follows_the_backend_at_run_time():
    compiled = torch.compile(lambda x: scale(x, 2.0) + 1.0, fullgraph=True, backend="aot_eager")
    x = torch.randn(50)
    torch.testing.assert_close(compiled(x), x * 2 + 1)
    with backend("triton"):
        torch.testing.assert_close(compiled(x), x * 2 + 1)
    assert CALLS["torch"] >= 1 and CALLS["triton"] >= 1


def test_opcheck_of_the_pattern():
    torch.library.opcheck(scale, (torch.randn(8, requires_grad=True), 2.0))


@pytest.mark.parametrize("capability", [80, 90])
def test_the_kernel_compiles_for_the_gpu_ahead_of_time_without_spills(capability):
    from conftest import compile_for_gpu

    res = compile_for_gpu(_scale_kernel, {"x_ptr": "*bf16", "y_ptr": "*bf16", "n": "i32", "scale": "fp32",
                                          "BLOCK": "constexpr"}, {"BLOCK": 1024}, capability=capability)
    assert f".target sm_{capability}" in res["ptx"]
    assert res["STACK"] == 0 and res["LOCAL"] == 0 and 0 < res["REG"] < 255
