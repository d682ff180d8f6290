# Registers a thread of fast/route.py's kernels for an H100 (sm_90), compiled on a machine with no GPU: Triton's
# compiler and the cuobjdump it ships, with the launcher's specialization (pointers, M and D divisible by 16).
# The counts in docs/performance.md's third pass come from it, with Triton 3.6.0 (the GPU image's version; they
# matched the GPU's: 96 / 160 / 168 before the change). From the repository's root:
#   pip install triton==3.6.0   (in a virtual environment of its own, with torch)
#   CONSTD=768 BM=1 WARPS=1 python experiments/bench/block_routing_2026-11-27/session3/kernel_registers.py fast/route.py
# CONSTD: the width, where the kernels take D as a compile-time constant; BM, WARPS: tokens a program and warps.
import warnings; warnings.filterwarnings('ignore')
# Compile the routing kernels for sm_90 without a GPU and print ptxas's register counts.
import sys, subprocess, tempfile, os, importlib.util
sys.path.insert(0, '.')
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
path = sys.argv[1] if len(sys.argv) > 1 else 'fast/route.py'
spec = importlib.util.spec_from_file_location('rt', path); rt = importlib.util.module_from_spec(spec); spec.loader.exec_module(rt)
BM, W = int(os.environ.get('BM', 4)), int(os.environ.get('WARPS', 4))
BD = 1 << (int(os.environ.get('CONSTD', 768)) - 1).bit_length()  # the width to a power of 2
ptxas = os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin/ptxas')
tgt = GPUTarget('cuda', 90, 32)

def regs(fn, sig, consts):
    # as the launcher specializes: pointers and M, D divisible by 16
    attrs = {(i,): [['tt.divisibility', 16]] for i, n in enumerate(fn.arg_names)
             if n not in consts and (sig[n].startswith('*') or n in ('M', 'D'))}
    src = ASTSource(fn, sig, consts, attrs)
    k = triton.compile(src, target=tgt, options=dict(num_warps=W))
    with tempfile.NamedTemporaryFile('wb', suffix='.cubin', delete=False) as f:
        f.write(k.asm['cubin'])
    out = subprocess.run([os.path.join(os.path.dirname(ptxas), 'cuobjdump'), '-res-usage', f.name], capture_output=True, text=True)
    out = out.stdout + out.stderr
    line = [l for l in out.splitlines() if 'REG' in l]
    return line[-1].strip() if line else out[-300:]

def sig(fn, types, consts):
    names = fn.arg_names
    return {n: ('constexpr' if n in consts else types.get(n, 'i32')) for n in names}

ptr = lambda t: '*' + t
tp = dict(V='*bf16', Lg='*fp32', slots='*i32', OUT='*bf16', P='*fp32', W='*fp32', VN='*bf16', LN='*fp32', base='*fp32',
          gamma='*fp32', H='*fp32', MIX='*fp32', MMAX='*fp32', SSUM='*fp32', eps='fp32', GH='*fp32', G='*bf16', C='*fp32',
          CH='*fp32', DV='*bf16', DL='*fp32', DLR='*fp32')
DC = dict(D=int(os.environ['CONSTD'])) if os.environ.get('CONSTD') else {}
for name, fn, consts in [
    ('read full attnres', rt._read_kernel, dict(NEW=True, CONT=False, KEEP=False, HAS_BASE=False, HAS_GAMMA=False, BM=BM, BD=BD, **DC, **({'NP': 32} if 'NP' in rt._read_kernel.arg_names else {}))),
    ('read_grad full', rt._read_grad_kernel, dict(NEW=True, ADD_DP=False, STORE_DP=False, HAS_GAMMA=False, BM=BM, BD=BD, **DC)),
    ('read_grad block', rt._read_grad_kernel, dict(NEW=True, ADD_DP=True, STORE_DP=True, HAS_GAMMA=False, BM=BM, BD=BD, **DC)),
    ('source_grad', rt._source_grad_kernel, dict(BM=BM, BD=BD, **DC)),
]:
    t = dict(tp)
    if fn is rt._source_grad_kernel:
        t['DV'] = '*fp32'
    try:
        print(f'{name:20s}', regs(fn, sig(fn, t, consts), consts))
    except Exception as e:
        print(name, 'ERR', repr(e)[:400])
