"""What the GPU compiler makes of the Triton kernels, on a machine without a GPU: each kernel compiled ahead of time
for a CUDA architecture by Triton's own ptxas, then its registers per thread and the bytes it spills to local memory
as ptxas reports them (a spill is memory traffic, in the innermost loop at worst), and its shared memory."""
import contextlib
import os
import re
import subprocess
import tempfile

# The most shared memory a block may take (opt-in), by architecture: a kernel above it fails to launch there.
SHARED_MEMORY_LIMIT = {75: 65536, 80: 166912, 86: 101376, 89: 101376, 90: 232448}

_POINTER_TYPES = {'id_k_ptr': '*i32', 'id_q_ptr': '*i32', 'id_v_ptr': '*i32', 'rows_ptr': '*i32', 'cols_ptr': '*i32',
                  'mask_ptr': '*u8', 'lse_ptr': '*fp32', 'delta_ptr': '*fp32', 'w_ptr': '*fp32', 'dqr_ptr': '*fp32',
                  'dkr_ptr': '*fp32'}
_SCALAR_TYPES = {'dropout_p': 'fp32', 'seed': 'i32'}


def attention_kernel_resources(arch, dtype='bfloat16', rpe_on='qkv', mask=True, dropout=True, factored=True,
                               blocks=None, head_dim=32):
    """{kernel name: {'registers': per thread, 'spill_bytes': spill stores per thread}} of the three kernels
    of detr_irpe.triton_attention compiled for sm_<arch>, for iRPE on rpe_on, padded keys (mask), attention
    dropout and the product method's factored buckets (factored) as asked, and the current block sizes (or
    blocks = (BLOCK_M, BLOCK_N, CHUNK, NUM_WARPS))."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from detr_irpe import triton_attention as ta
    block_m, block_n, chunk, num_warps = blocks or (ta.BLOCK_M, ta.BLOCK_N, ta.CHUNK, ta.NUM_WARPS)
    element = {'float32': 'fp32', 'bfloat16': 'bf16', 'float16': 'fp16'}[dtype]
    flags = ta.kernel_flags('k' in rpe_on, 'q' in rpe_on, 'v' in rpe_on, mask, dropout, factored, getattr(torch, dtype),
                            head_dim)
    flags.update(BLOCK_M=block_m, BLOCK_N=block_n, CHUNK=chunk)
    resources = {}
    for kernel in (ta._forward_kernel, ta._backward_queries_kernel, ta._backward_keys_kernel):
        signature = {name: 'constexpr' if name in flags else _POINTER_TYPES.get(name, '*' + element)
                     if name.endswith('_ptr') else _SCALAR_TYPES.get(name, 'i64' if name.startswith('s_') else 'i32')
                     for name in kernel.arg_names}
        source = ASTSource(fn=kernel, signature=signature, constexprs={n: flags[n] for n in flags})
        compiled = triton.compile(source, target=GPUTarget('cuda', arch, 32), options={'num_warps': num_warps})
        resources[kernel.fn.__name__] = _ptxas_report(compiled, arch)
    return resources


def op_kernel_resources(arch, dtype='float32', batch=16, heads=8, tokens=48, buckets=81):
    """[(launch, kernel name, {'registers', 'spill_bytes', 'shared'})] of the rpe_ops kernels that rpe_index_qk and
    the query and key sides of rpe_reduce_qk launch for (batch, heads, tokens, buckets) in `dtype`, compiled for
    sm_<arch> with the specialisation such a launch takes (the integer arguments' widths, divisibility)."""
    import torch

    from rpe_ops import triton_kernels as kernels
    dtype = getattr(torch, dtype)
    ids = torch.randint(0, buckets, (tokens, tokens), dtype=torch.int32)
    x = torch.randn(batch, heads, tokens, buckets).to(dtype)
    weights = torch.randn(batch, heads, tokens, tokens).to(dtype)
    # each call as the model makes it, and a name for each launch it makes, in order
    calls = [(lambda: kernels.rpe_index_qk(x, ids, x, ids), ['rpe_index_qk']),
             (lambda: kernels.rpe_reduce_qk(weights, ids, buckets, ids, buckets),
              ['rpe_reduce query side', 'rpe_reduce key side'])]
    found = []
    for launch, names in calls:
        with compiled_for(arch) as records:
            launch()
        assert len(records) == len(names), records
        found += [(call, name, resources) for call, (name, resources) in zip(names, records)]
    return found


@contextlib.contextmanager
def compiled_for(arch):
    """Within it, a Triton kernel launch compiles the kernel for sm_<arch> as the JIT would specialise it for its
    arguments, runs nothing, and appends (kernel name, _ptxas_report) to the list it gives."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime import jit

    target = GPUTarget('cuda', arch, 32)
    backend, records, launch = make_backend(target), [], jit.JITFunction.run

    def compile_instead(self, *args, grid, warmup, **kwargs):
        kwargs.setdefault('debug', False)
        binder = jit.create_function_from_signature(self.signature, self.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, specialization, options)
        compiled = triton.compile(ASTSource(self, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        records.append((self.fn.__name__, _ptxas_report(compiled, arch)))

    jit.JITFunction.run = compile_instead
    try:
        yield records
    finally:
        jit.JITFunction.run = launch


def _ptxas_report(compiled, arch):
    """{'registers', 'spill_bytes', 'shared'} of a compiled kernel: ptxas -v on its PTX, and Triton's shared memory."""
    import triton
    ptxas = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'ptxas')
    with tempfile.TemporaryDirectory() as folder:
        ptx = os.path.join(folder, 'kernel.ptx')
        with open(ptx, 'w') as f:
            f.write(compiled.asm['ptx'])
        report = subprocess.run([ptxas, f'-arch=sm_{arch}a' if arch >= 90 else f'-arch=sm_{arch}', '-v', ptx,
                                 '-o', os.path.join(folder, 'kernel.cubin')],
                                capture_output=True, text=True, check=True).stderr
    return {'registers': int(re.search(r'Used (\d+) registers', report).group(1)),
            'spill_bytes': int(re.search(r'(\d+) bytes spill stores', report).group(1)),
            'shared': compiled.metadata.shared}
