"""Keep freed CPU tensors' memory in the process for reuse, instead of handing large blocks back to the kernel.

glibc's malloc serves every block over its mmap threshold (at most 32 MiB) with a fresh mapping and unmaps
it on free. On CPU a DETR-R50 step allocates dozens of such blocks (backbone activations, (B, H, L, L)
attention tensors), so every step faults them in again and the kernel zeroes them page by page (1 thread
of an AMD EPYC Zen 4 VM: 22 s of a 95 s inference benchmark run in the kernel; 3.0-3.9 s of system time in
4 DETR-R50 training steps, 1.3-1.6 s with this). reuse_freed_memory() makes rpe_ops' block cache torch's CPU allocator
(rpe_ops.cache_all_cpu_tensors): a freed tensor of 2 MiB or more keeps its block, which serves the next
request of about its size. (glibc's own knobs, no mmap and no trim, were tried first:
with glibc 2.36 a 64 MiB block freed and asked for again each step was never reused, because aligned
allocation asks for a little more than the block freed, and the heap grew by 64 MiB per step.)

The price: up to RPE_OPS_CPU_CACHE_MB (default 4096) of freed blocks stay with the process. The tools call
this at start-up (detr_irpe.config.run_tool, the benchmarks); DETR_IRPE_MALLOC=system leaves torch's
default allocator. Without the compiled rpe_ops nothing changes.

    from detr_irpe.allocator import reuse_freed_memory
    reuse_freed_memory()     # 'rpe_ops block cache: CPU tensors of 2 MiB or more reused (keeps up to 4096 MiB)'
"""
import os

ENV = 'DETR_IRPE_MALLOC'
CHOICES = ('reuse', 'system')

_state = {'applied': None}


def reuse_freed_memory():
    """Install the block cache once per process, as the module docstring says; returns a one-line
    description of what holds (also kept for describe()). Safe to call more than once."""
    if _state['applied'] is not None:
        return _state['applied']
    choice = os.environ.get(ENV, 'reuse')
    if choice not in CHOICES:
        raise ValueError(f'{ENV}={choice!r} is not one of {list(CHOICES)}: use reuse (the default: keep freed '
                         "memory for reuse) or system (torch's default CPU allocator).")
    import rpe_ops
    if choice == 'system':
        _state['applied'] = f"torch's default CPU allocator ({ENV}=system)"
    elif rpe_ops.build_info()['cpu']:
        rpe_ops.cache_all_cpu_tensors()
        limit = rpe_ops.cache_info()['limit_bytes'] >> 20
        _state['applied'] = f'rpe_ops block cache: CPU tensors of 2 MiB or more reused (keeps up to {limit} MiB)'
    else:
        _state['applied'] = "torch's default CPU allocator (rpe_ops is not compiled)"
    return _state['applied']


def describe():
    """What reuse_freed_memory() did in this process, or that it was not called."""
    return _state['applied'] or "torch's default CPU allocator (reuse_freed_memory not called)"
