# What the compiler makes of a Triton kernel that writes into a buffer, when the kernel is launched the way
# the compiled graph could launch it (torch.library.triton_op + wrap_triton): the forward graph after
# functionalization, printed. Runs without a GPU (fake CUDA tensors; torch 2.13 on the CPU there).
#   python experiments/bench/block_routing_2026-11-27/session4/triton_op_trace.py
import torch
import triton
import triton.language as tl
from functorch.compile import aot_function
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.library import triton_op, wrap_triton


@triton.jit
def add_into(X, Y, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < N
    tl.store(X + i, tl.load(X + i, mask=m) + tl.load(Y + i, mask=m), mask=m)


@triton_op("demo::acc", mutates_args={"buf"})
def acc(buf: torch.Tensor, y: torch.Tensor) -> None:
    wrap_triton(add_into)[(triton.cdiv(y.numel(), 128),)](buf, y, y.numel(), BLOCK=128)


def f(buf, a, b):
    acc(buf, a)
    s1 = buf.sum()  # the buffer read between two writes, as a later read or a backward reads the sources
    acc(buf, b)
    return s1, buf * 2


def show(gm, example_inputs):
    print(gm.code)
    return gm


with FakeTensorMode():
    buf, a, b = (torch.empty(1000, device='cuda') for _ in range(3))
    try:
        aot_function(f, fw_compiler=show)(buf, a, b)
    except RuntimeError as e:  # running the traced graph needs a GPU; the trace is what is shown
        print('(not run:', str(e)[:80] + ')')
