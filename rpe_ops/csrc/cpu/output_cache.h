// Memory for the outputs of the CPU kernels, and optionally for every CPU tensor.
//
// An rpe_index output is (B, H, Lq, Lk): 58 MB in float32 for a DETR encoder
// layer at batch 2. glibc hands blocks that large straight from mmap and back
// to the OS on free, so each call would fault in ~14,000 fresh 4 KiB pages,
// which the kernel zeroes first: at one thread that costs more than the op's
// own loop. So blocks of 2 MiB or more come from here instead: sized in whole
// 2 MiB, kept when freed (most recently freed first, up to a byte limit) and
// handed out again to a request at most a quarter smaller, as the next encoder
// layer or training step asks for the same shape again.
// The limit is RPE_OPS_CPU_CACHE_MB (default 4096; 0 keeps nothing) read at
// the first use; rpe_ops.empty_cache() returns the kept blocks to the OS.
//
// install_as_cpu_allocator() makes the same cache torch's CPU allocator, for
// every tensor of 2 MiB or more (smaller ones go to torch's default): the
// whole model's activations and gradients then stop being faulted in afresh
// every step (detr_irpe/allocator.py). A DETR-R50 training step at batch 2
// keeps about 1.5 GB of blocks between steps.
//
// Marking the blocks MADV_HUGEPAGE (2 MiB pages: 512 times fewer faults) was
// tried and dropped: with the kernel compacting memory for each new huge page
// (defrag 'madvise'), a first DETR-R50 training step took 12.3-13.5 s against
// 9.1-9.3 s without the advice, and 5.4 s of system time against 1.3-1.6 s, while
// the op and the later steps ran no faster (Firecracker VM, AMD EPYC Zen 4).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>

namespace rpe_ops {

// Like at::empty(sizes, options) on CPU (contiguous), from the cache above.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

struct OutputCacheStats {
  size_t cached_bytes;   // kept for reuse now
  size_t cached_blocks;
  size_t limit_bytes;
  size_t hits;           // allocations served from kept blocks
  size_t misses;         // allocations of new blocks
};

OutputCacheStats output_cache_stats();

// Frees every kept block.
void empty_output_cache();

// Makes the cache torch's CPU allocator (c10::SetCPUAllocator) for the rest of the process; false if it
// already was. Tensors allocated before keep their own deleters.
bool install_as_cpu_allocator();
bool installed_as_cpu_allocator();

}  // namespace rpe_ops
