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


def attention_kernel_resources(arch, dtype='bfloat16', rpe_on='qkv', mask=True, dropout=True, factored=True,
                               blocks=None, heads=8, head_dim=32, batch=2, height=25, width=38):
    """{kernel name: {'registers', 'spill_bytes', 'shared'}} of the three kernels of detr_irpe.triton_attention
    (forward, backward on queries, backward on keys) compiled for sm_<arch> with the specialisation that an encoder
    layer's forward and backward under --attention_impl triton take: `heads` x `head_dim`, iRPE on rpe_on (the
    product method's factored buckets where asked and its side fits in CHUNK, else its (L, L) ids), a (batch,
    height x width) map in `dtype`, padded keys (mask) and attention dropout as asked, the current block sizes or
    blocks = (BLOCK_M, BLOCK_N, CHUNK, NUM_WARPS)."""
    from unittest import mock

    import torch

    from detr_irpe import triton_attention as ta
    from detr_irpe.attention import RPEMultiheadAttention
    from detr_irpe.irpe import rpe_config_from_string
    dtype = getattr(torch, dtype)
    layer = RPEMultiheadAttention(heads * head_dim, heads, dropout=0.1 if dropout else 0.0, attention_impl='triton',
                                  rpe_config=rpe_config_from_string(f'rpe-2.0-product-ctx-1-{rpe_on}')).to(dtype)
    src = torch.randn(height * width, batch, heads * head_dim, dtype=dtype)
    pos = torch.randn_like(src)
    padding = torch.zeros(batch, height * width, dtype=torch.bool)
    padding[-1, -width:] = True
    settings = dict(zip(('BLOCK_M', 'BLOCK_N', 'CHUNK', 'NUM_WARPS'), blocks or ()), FACTOR_PRODUCT=factored,
                    problem=lambda *args: None)  # CPU tensors stand in for CUDA ones: nothing runs
    with mock.patch.multiple(ta, **settings), compiled_for(arch) as records:
        src.requires_grad_()  # as in DETR's encoder: query = key = src + pos, value = src
        out, _ = layer(src + pos, src + pos, src, key_padding_mask=padding if mask else None, height=height,
                       width=width)
        out.sum().backward()
    assert [name for name, _ in records] == ['_forward_kernel', '_backward_queries_kernel', '_backward_keys_kernel'], \
        records
    return dict(records)


def op_kernel_resources(arch, dtype='float32', batch=16, heads=8, tokens=50, buckets=81):
    """[(launch, kernel name, {'registers', 'spill_bytes', 'shared'})] of the rpe_ops kernels that rpe_index_qk and
    the query and key sides of rpe_reduce_qk launch for (batch, heads, tokens, buckets) in `dtype`, compiled for
    sm_<arch> with the specialisation such a launch takes (the integer arguments' widths, divisibility: 50 tokens, like
    real maps' 950 = 25 x 38, are no multiple of 16, which compiles otherwise)."""
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
