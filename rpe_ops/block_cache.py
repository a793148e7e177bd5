"""rpe_ops' CPU block cache (csrc/cpu/block_cache.h): freed CPU blocks of 2 MiB or more are kept in the
process and serve the next tensor of about their size, instead of going back to the OS and being faulted in
afresh, page by page, at every step.

    from rpe_ops import block_cache
    block_cache.install()   # 'rpe_ops block cache: CPU tensors of 2 MiB or more reused (keeps up to 4096 MiB)'

The ops' own large CPU outputs always come from it; install() makes it torch's CPU allocator for every
tensor of 2 MiB or more, for the rest of the process (smaller ones keep torch's default allocator).
RPE_OPS_BLOCK_CACHE_MB is the most it keeps (default 4096; 0 keeps nothing, and install() then leaves
torch's default allocator). Without the compiled extension nothing changes.
"""
import rpe_ops

STATS = ('cached_bytes', 'cached_blocks', 'limit_bytes', 'hits', 'misses')


def install():
    """Make the block cache torch's CPU allocator for tensors of 2 MiB or more, once per process (later calls
    change nothing). Returns describe()'s line."""
    if rpe_ops._C is not None:
        rpe_ops._C.block_cache_install()  # leaves torch's default where RPE_OPS_BLOCK_CACHE_MB=0
    return describe()


def describe():
    """One line: which CPU allocator holds in this process, and why."""
    if rpe_ops._C is None:
        return "torch's default CPU allocator (rpe_ops is not compiled)"
    limit_mib = stats()['limit_bytes'] >> 20
    if rpe_ops._C.block_cache_installed():
        return f'rpe_ops block cache: CPU tensors of 2 MiB or more reused (keeps up to {limit_mib} MiB)'
    if limit_mib == 0:
        return "torch's default CPU allocator (RPE_OPS_BLOCK_CACHE_MB=0)"
    return "torch's default CPU allocator (rpe_ops.block_cache.install() not called)"


def stats():
    """{'cached_bytes', 'cached_blocks', 'limit_bytes', 'hits', 'misses'} (hits: allocations served from kept
    blocks; misses: new blocks). All zero without the compiled extension."""
    if rpe_ops._C is None:
        return dict.fromkeys(STATS, 0)
    return rpe_ops._C.block_cache_stats()


def empty():
    """Return the blocks the cache keeps to the OS (as torch.cuda.empty_cache does for CUDA)."""
    if rpe_ops._C is not None:
        rpe_ops._C.block_cache_empty()
