// See block_cache.h.
#include "block_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstdlib>
#include <cstring>
#include <list>
#include <mutex>
#include <string>
#include <unordered_map>

namespace rpe_ops::block_cache {
namespace {

constexpr size_t kMinBytes = size_t(2) << 20;  // smaller blocks: torch's default allocator
constexpr size_t kAlignment = 64;                // as torch's (c10::gAlignment)

size_t limit_from_env() {
  const char* env = std::getenv("RPE_OPS_BLOCK_CACHE_MB");
  if (env == nullptr || *env == '\0') return size_t(4096) << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(env, &end, 10);
  TORCH_CHECK_VALUE(end != env && *end == '\0' && mb >= 0, "RPE_OPS_BLOCK_CACHE_MB must be a whole number of ",
                    "MiB >= 0 (the most the block cache keeps; 0 keeps nothing), got '", env, "'");
  return static_cast<size_t>(mb) << 20;
}

struct Block {
  void* ptr;
  size_t bytes;
};

class BlockCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    // torch's own allocator, not GetCPUAllocator(): that is this one once install() ran
    if (n < kMinBytes) return c10::GetDefaultCPUAllocator()->allocate(n);
    const size_t bytes = (n + kMinBytes - 1) / kMinBytes * kMinBytes;  // whole 2 MiB: sizes that differ a little match
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // The smallest kept block that fits and wastes at most a quarter of the request (so that memory
      // kept for one size cannot inflate the peak much where sizes vary from step to step).
      auto best = kept_.end();
      for (auto it = kept_.begin(); it != kept_.end(); ++it)
        if (it->bytes >= bytes && it->bytes - bytes <= bytes / 4 && (best == kept_.end() || it->bytes < best->bytes))
          best = it;
      if (best != kept_.end()) {
        void* ptr = best->ptr;
        in_use_.emplace(ptr, best->bytes);
        kept_bytes_ -= best->bytes;
        kept_.erase(best);
        ++hits_;
        return {ptr, ptr, &release, c10::Device(c10::DeviceType::CPU)};
      }
      ++misses_;
    }
    void* ptr = nullptr;
    if (posix_memalign(&ptr, kAlignment, bytes) != 0 || ptr == nullptr) {
      empty();  // give kept blocks back and try once more
      TORCH_CHECK(posix_memalign(&ptr, kAlignment, bytes) == 0 && ptr != nullptr,
                  "rpe_ops: out of memory allocating ", bytes, " bytes on CPU");
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      in_use_.emplace(ptr, bytes);
    }
    // The context is the pointer itself, as torch's raw_allocate / raw_deallocate (oneDNN's buffers) need.
    return {ptr, ptr, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  Stats stats() {
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
  static void release(void* ptr) { instance().keep(ptr); }

  // Keep a freed block, most recent first; past the limit, free the oldest. A pointer this cache did not
  // hand out came from torch's default allocator (small, or allocated before install()):
  // its own deleter frees it.
  void keep(void* ptr) {
    std::list<Block> dropped;
    bool ours = false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const auto found = in_use_.find(ptr);
      if (found != in_use_.end()) {
        ours = true;
        const Block block{ptr, found->second};
        in_use_.erase(found);
        if (block.bytes <= limit_) {
          kept_.push_front(block);
          kept_bytes_ += block.bytes;
        } else {
          dropped.push_back(block);
        }
        while (kept_bytes_ > limit_) {
          kept_bytes_ -= kept_.back().bytes;
          dropped.splice(dropped.end(), kept_, std::prev(kept_.end()));
        }
      }
    }
    if (!ours) c10::GetDefaultCPUAllocator()->raw_deleter()(ptr);  // outside the lock, by its own deleter
    for (const Block& b : dropped) std::free(b.ptr);
  }

 public:
  // Made at the first use (reading RPE_OPS_BLOCK_CACHE_MB then; a bad value throws, and the next use tries
  // again), never destroyed: tensors may be freed during interpreter shutdown.
  static BlockCache& instance() {
    static BlockCache* cache = new BlockCache();
    return *cache;
  }

 private:
  std::mutex mutex_;
  std::list<Block> kept_;
  std::unordered_map<void*, size_t> in_use_;  // blocks handed out, by address: their sizes
  size_t kept_bytes_ = 0;
  const size_t limit_ = limit_from_env();
  size_t hits_ = 0, misses_ = 0;
};

}  // namespace

at::Tensor empty_tensor(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  return at::detail::empty_generic(sizes, &BlockCache::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), c10::MemoryFormat::Contiguous);
}

Stats stats() { return BlockCache::instance().stats(); }

void empty() { BlockCache::instance().empty(); }

bool install() {
  BlockCache& cache = BlockCache::instance();
  if (c10::GetCPUAllocator() == &cache || cache.stats().limit_bytes == 0) return false;
  c10::SetCPUAllocator(&cache, /*priority=*/1);  // above torch's default (0)
  return true;
}

bool installed() { return c10::GetCPUAllocator() == &BlockCache::instance(); }

}  // namespace rpe_ops::block_cache
