// Memory for the outputs of the CPU kernels.
//
// An rpe_index output is (B, H, Lq, Lk): 58 MB in float32 for a DETR encoder
// layer at batch 2. glibc hands blocks that large straight from mmap and back
// to the OS on free, so each call would fault in ~14,000 fresh 4 KiB pages,
// which the kernel zeroes first: at one thread that costs more than the op's
// own loop. So outputs of 2 MiB or more come from here instead:
//   * blocks are 2 MiB aligned and marked MADV_HUGEPAGE, so a new block faults
//     in 2 MiB pages (512 times fewer faults where transparent huge pages are
//     on: 'always' or 'madvise' in /sys/kernel/mm/transparent_hugepage/enabled);
//   * freed blocks are kept (most recently freed first, up to a byte limit)
//     and handed out again to a request of at least half their size, as the
//     next encoder layer or training step asks for the same shape again.
// The limit is RPE_OPS_CPU_CACHE_MB (default 1024; 0 keeps nothing) read at
// the first use; rpe_ops.empty_cache() returns the kept blocks to the OS.
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

}  // namespace rpe_ops
