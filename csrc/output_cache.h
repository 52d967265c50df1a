// Large CPU output buffers that stay mapped between calls: output_empty() and its bindings.
//
// Why: glibc serves a buffer of megabytes from fresh pages and returns them to the kernel when it is
// freed (the heap top is trimmed past 2x the largest recent block, or the block was mmapped), so a
// training loop that allocates and frees the same outputs every step takes a page fault, and a page of
// zeroing, for every 4 KiB it writes: ~4000 faults per forward+backward of the bench's attention case
// (16 MB of out, dq, dk, dv), ~15% of its time on 2 threads. The attention's outputs come from here instead:
// a freed block goes back to a free list of its size class and the next call of that size takes it,
// already mapped. Blocks below kMinBytes, which glibc keeps in its heap anyway, and everything when the
// cache is off, come from torch's CPU allocator.
//
// Bounded: at most FASTCOMP_CPU_CACHE_MB (default 512) MiB of idle blocks are kept; a block freed past
// that goes back to the system. release_output_cache() frees every idle block. One cache per extension
// library that binds it (FASTCOMP_BIND_OUTPUT_CACHE): today the attention's. The DDN's outputs measured
// 2-3% slower through it, as glibc already keeps its blocks and a reused block is cold in the cache.
#pragma once

#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

namespace fastcomp {

class OutputCache final : public c10::Allocator {
 public:
  static constexpr size_t kMinBytes = size_t(256) << 10;
  static constexpr size_t kHeader = 64;  // the block's size class, in front of the data (keeps 64-byte alignment)

  // Leaked on purpose: tensors may outlive every static destructor.
  static OutputCache& get() {
    static OutputCache* cache = new OutputCache();
    return *cache;
  }

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBytes || limit_ == 0) return c10::GetCPUAllocator()->allocate(n);
    const size_t cls = size_class(n);
    void* base = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = idle_.find(cls);
      if (it != idle_.end() && !it->second.empty()) {
        base = it->second.back();
        it->second.pop_back();
        idle_bytes_ -= cls;
        ++reused_;
      } else {
        ++fresh_;
      }
    }
    if (base == nullptr) {
      base = std::aligned_alloc(64, cls + kHeader);
      if (base == nullptr) {
        release();  // the idle blocks may be what stands in the way
        base = std::aligned_alloc(64, cls + kHeader);
      }
      TORCH_CHECK(base != nullptr, "fastcomp: out of memory allocating ", cls, " bytes for a kernel output");
      std::memcpy(base, &cls, sizeof cls);
    }
    void* data = static_cast<char*>(base) + kHeader;
    report(data, static_cast<int64_t>(cls));
    return {data, base, &OutputCache::give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

  // Frees every idle block; returns the bytes freed.
  size_t release() {
    std::map<size_t, std::vector<void*>> idle;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      idle.swap(idle_);
      idle_bytes_ = 0;
    }
    size_t freed = 0;
    for (auto& [cls, blocks] : idle)
      for (void* b : blocks) {
        std::free(b);
        freed += cls;
      }
    return freed;
  }

  pybind11::dict info() {
    std::lock_guard<std::mutex> lock(mutex_);
    pybind11::dict d;
    d["limit_bytes"] = limit_;
    d["idle_bytes"] = idle_bytes_;
    d["fresh_blocks"] = fresh_;
    d["reused_blocks"] = reused_;
    d["in_use_bytes"] = in_use_;
    return d;
  }

 private:
  // FASTCOMP_CPU_CACHE_MB: a non-negative integer; anything else keeps the default (fastcomp/ops/_outputs.py
  // warns about it on import).
  OutputCache() {
    const char* mb = std::getenv("FASTCOMP_CPU_CACHE_MB");
    size_t limit_mb = 512;
    if (mb != nullptr && *mb != '\0' && std::strspn(mb, "0123456789") == std::strlen(mb) && std::strlen(mb) < 12)
      limit_mb = static_cast<size_t>(std::strtoull(mb, nullptr, 10));
    limit_ = limit_mb << 20;
  }

  // n rounded up to a multiple of 1/16 of its power of two (at most 6.25% more), so that outputs of
  // nearly the same size share blocks.
  static size_t size_class(size_t n) {
    size_t top = 1;
    while (top < n) top <<= 1;
    const size_t step = std::max<size_t>(top / 16, 4096);
    return (n + step - 1) / step * step;
  }

  static void give_back(void* base) { get().put(base); }

  // What torch's CPU allocator tells the profiler (torch.profiler's memory view, the benchmarks' peak
  // memory): a block handed out counts as allocated until it comes back, cached or not.
  void report(void* data, int64_t delta) {
    size_t in_use, idle;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      in_use_ = static_cast<size_t>(static_cast<int64_t>(in_use_) + delta);
      in_use = in_use_;
      idle = idle_bytes_;
    }
    if (c10::memoryProfilingEnabled())
      c10::reportMemoryUsageToProfiler(data, delta, in_use, in_use + idle, c10::Device(c10::DeviceType::CPU));
  }

  void put(void* base) {
    size_t cls;
    std::memcpy(&cls, base, sizeof cls);
    report(static_cast<char*>(base) + kHeader, -static_cast<int64_t>(cls));
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (idle_bytes_ + cls <= limit_) {
        idle_[cls].push_back(base);
        idle_bytes_ += cls;
        return;
      }
    }
    std::free(base);
  }

  std::mutex mutex_;
  std::map<size_t, std::vector<void*>> idle_;  // size class -> idle blocks
  size_t limit_ = 0, idle_bytes_ = 0, fresh_ = 0, reused_ = 0;
  size_t in_use_ = 0;  // bytes of the blocks handed out and not back yet
};

// torch.empty(sizes, dtype=dtype) on the CPU, from the cache (contiguous, uninitialized).
inline at::Tensor output_empty(std::vector<int64_t> sizes, at::ScalarType dtype) {
  return at::detail::empty_generic(sizes, &OutputCache::get(), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   c10::MemoryFormat::Contiguous);
}

}  // namespace fastcomp

// Inside PYBIND11_MODULE of an extension whose Python launchers allocate outputs: FASTCOMP_BIND_OUTPUT_CACHE(m);
#define FASTCOMP_BIND_OUTPUT_CACHE(m)                                                                     \
  (m).def("output_empty", &::fastcomp::output_empty,                                                      \
          "torch.empty(sizes, dtype=dtype) on the CPU from the extension's cache of mapped blocks");     \
  (m).def("output_cache_info", [] { return ::fastcomp::OutputCache::get().info(); },                     \
          "limit_bytes, idle_bytes, in_use_bytes, fresh_blocks, reused_blocks of the output cache");     \
  (m).def("release_output_cache", [] { return ::fastcomp::OutputCache::get().release(); },               \
          "frees the idle blocks of the extension's output cache; returns the bytes freed")
