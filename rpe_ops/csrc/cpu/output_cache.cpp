// See output_cache.h.
#include "output_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <sys/mman.h>

#include <cstdlib>
#include <cstring>
#include <list>
#include <mutex>
#include <string>

namespace rpe_ops {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;

size_t limit_from_env() {
  const char* env = std::getenv("RPE_OPS_CPU_CACHE_MB");
  if (env == nullptr || *env == '\0') return size_t(1024) << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(env, &end, 10);
  TORCH_CHECK(end != env && *end == '\0' && mb >= 0, "RPE_OPS_CPU_CACHE_MB must be a whole number of MiB >= 0 ",
              "(0 keeps no freed outputs), got '", env, "'");
  return static_cast<size_t>(mb) << 20;
}

struct Block {
  void* ptr;
  size_t bytes;
};

class OutputAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < kHugePage) return c10::GetCPUAllocator()->allocate(n);
    const size_t bytes = (n + kHugePage - 1) / kHugePage * kHugePage;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // The smallest kept block that fits and is at most twice the request.
      auto best = kept_.end();
      for (auto it = kept_.begin(); it != kept_.end(); ++it)
        if (it->bytes >= bytes && it->bytes / 2 <= bytes && (best == kept_.end() || it->bytes < best->bytes))
          best = it;
      if (best != kept_.end()) {
        Block* block = new Block(*best);
        kept_bytes_ -= best->bytes;
        kept_.erase(best);
        ++hits_;
        return {block->ptr, block, &release, c10::Device(c10::DeviceType::CPU)};
      }
      ++misses_;
    }
    void* ptr = nullptr;
    if (posix_memalign(&ptr, kHugePage, bytes) != 0 || ptr == nullptr) {
      empty();  // give kept blocks back and try once more
      TORCH_CHECK(posix_memalign(&ptr, kHugePage, bytes) == 0 && ptr != nullptr,
                  "rpe_ops: out of memory allocating ", bytes, " bytes for an output");
    }
#ifdef MADV_HUGEPAGE
    madvise(ptr, bytes, MADV_HUGEPAGE);  // advice only: without THP this is a no-op
#endif
    return {ptr, new Block{ptr, bytes}, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  OutputCacheStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {kept_bytes_, kept_.size(), limit_, hits_, misses_};
  }

  void empty() {
    std::list<Block> dropped;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      dropped.swap(kept_);
      kept_bytes_ = 0;
    }
    for (const Block& block : dropped) std::free(block.ptr);
  }

 private:
  static void release(void* context) { instance().keep(static_cast<Block*>(context)); }

  // Keep a freed block, most recent first; past the limit, free the oldest.
  void keep(Block* block) {
    std::list<Block> dropped;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (block->bytes <= limit_) {
        kept_.push_front(*block);
        kept_bytes_ += block->bytes;
      } else {
        dropped.push_back(*block);
      }
      while (kept_bytes_ > limit_) {
        kept_bytes_ -= kept_.back().bytes;
        dropped.splice(dropped.end(), kept_, std::prev(kept_.end()));
      }
    }
    delete block;
    for (const Block& b : dropped) std::free(b.ptr);
  }

 public:
  // Made at the first use (reading RPE_OPS_CPU_CACHE_MB then; a bad value throws, and the next use tries
  // again), never destroyed: tensors may be freed during interpreter shutdown.
  static OutputAllocator& instance() {
    static OutputAllocator* allocator = new OutputAllocator();
    return *allocator;
  }

 private:
  std::mutex mutex_;
  std::list<Block> kept_;
  size_t kept_bytes_ = 0;
  const size_t limit_ = limit_from_env();
  size_t hits_ = 0, misses_ = 0;
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  return at::detail::empty_generic(sizes, &OutputAllocator::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), c10::MemoryFormat::Contiguous);
}

OutputCacheStats output_cache_stats() { return OutputAllocator::instance().stats(); }

void empty_output_cache() { OutputAllocator::instance().empty(); }

}  // namespace rpe_ops
