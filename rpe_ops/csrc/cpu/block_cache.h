// A cache of CPU memory blocks of 2 MiB or more, the memory behind rpe_ops.block_cache.
//
// glibc hands blocks that large straight from mmap and back to the OS on free, so a tensor of the same
// size allocated again next layer or next step faults in every page afresh, each zeroed by the kernel
// first. Here a freed block is kept instead (whole 2 MiB sizes; most recently freed first, up to
// RPE_OPS_BLOCK_CACHE_MB, default 4096; 0 keeps nothing) and handed to the next request at most a
// quarter smaller than it. The CPU kernels take their large outputs from it; install() makes it torch's
// CPU allocator for every tensor of 2 MiB or more (smaller ones go to torch's default allocator).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>

namespace rpe_ops::block_cache {

// Like at::empty(sizes, options) on CPU (contiguous), its memory from the cache.
at::Tensor empty_tensor(at::IntArrayRef sizes, const at::TensorOptions& options);

struct Stats {
  size_t cached_bytes;  // kept for reuse now
  size_t cached_blocks;
  size_t limit_bytes;   // RPE_OPS_BLOCK_CACHE_MB
  size_t hits;          // allocations served from kept blocks
  size_t misses;        // allocations of new blocks
};

// The first use of the cache reads RPE_OPS_BLOCK_CACHE_MB; a bad value throws c10::ValueError.
Stats stats();

// Frees every kept block.
void empty();

// Makes the cache torch's CPU allocator (c10::SetCPUAllocator) for the rest of the process, unless its
// limit is 0; false if it does not (already installed, or limit 0). Tensors allocated before keep their
// own deleters.
bool install();
bool installed();

}  // namespace rpe_ops::block_cache
