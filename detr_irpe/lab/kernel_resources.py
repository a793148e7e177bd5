"""What the GPU compiler makes of the Triton attention kernels, on a machine without a GPU: each kernel compiled
ahead of time for a CUDA architecture by Triton's own ptxas, then its registers per thread and the bytes it spills
to local memory as ptxas reports them (a spill is memory traffic, in the innermost loop at worst)."""
import os
import re
import subprocess
import tempfile

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
    ptxas = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'ptxas')
    resources = {}
    for kernel in (ta._forward_kernel, ta._backward_queries_kernel, ta._backward_keys_kernel):
        signature = {name: 'constexpr' if name in flags else _POINTER_TYPES.get(name, '*' + element)
                     if name.endswith('_ptr') else _SCALAR_TYPES.get(name, 'i64' if name.startswith('s_') else 'i32')
                     for name in kernel.arg_names}
        source = ASTSource(fn=kernel, signature=signature, constexprs={n: flags[n] for n in flags})
        compiled = triton.compile(source, target=GPUTarget('cuda', arch, 32), options={'num_warps': num_warps})
        with tempfile.TemporaryDirectory() as folder:
            ptx = os.path.join(folder, 'kernel.ptx')
            with open(ptx, 'w') as f:
                f.write(compiled.asm['ptx'])
            report = subprocess.run([ptxas, f'-arch=sm_{arch}a' if arch >= 90 else f'-arch=sm_{arch}', '-v', ptx,
                                     '-o', os.path.join(folder, 'kernel.cubin')],
                                    capture_output=True, text=True, check=True).stderr
        resources[kernel.fn.__name__] = {
            'registers': int(re.search(r'Used (\d+) registers', report).group(1)),
            'spill_bytes': int(re.search(r'(\d+) bytes spill stores', report).group(1))}
    return resources
