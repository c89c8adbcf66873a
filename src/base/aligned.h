#pragma once

#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>

namespace kvlm {

// n rounded up to a multiple of m (m > 0).
constexpr size_t round_up(size_t n, size_t m) { return (n + m - 1) / m * m; }

// 64-byte aligned, zero-initialised, owning byte buffer. Copying is explicit (no copy ctor):
// buffers here are caches and scratch arenas of megabytes.
class AlignedBuffer {
 public:
  static constexpr size_t kAlign = 64;
  // Buffers of at least kHugePage bytes (weights, KV arenas, big scratch) are mapped straight
  // from the kernel (anonymous memory: zero until written, and not resident until touched), start
  // on a 2 MiB boundary and ask for transparent huge pages (madvise MADV_HUGEPAGE; Debian's
  // default THP mode is "madvise", which gives none otherwise). Decode streams ~92 MiB of weights
  // per token and attention reads scattered KV blocks: with 4 KiB pages both miss the TLB
  // constantly (measured: docs/bench-log/2026-12-02-zen4-avx512.md). Nothing writes them here, so
  // resident memory follows use: a server's KV pool sized for 2,048 blocks costs memory only for
  // the blocks its sequences have written (a block's first write faults its page in, zeroed by the
  // kernel, one 2 MiB page at a time where THP gives them), and start-up does not clear the whole
  // budget.
  // Smaller buffers come from aligned_alloc and are cleared here.
  static constexpr size_t kHugePage = size_t{2} << 20;
  AlignedBuffer() = default;
  explicit AlignedBuffer(size_t n_bytes) { resize(n_bytes); }
  AlignedBuffer(AlignedBuffer&&) noexcept = default;
  AlignedBuffer& operator=(AlignedBuffer&&) noexcept = default;
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;

  // Drops the old contents; the new buffer is zeroed.
  void resize(size_t n_bytes) {
    ptr_.reset();
    size_ = 0;
    if (n_bytes == 0) return;
    const size_t rounded = round_up(n_bytes, kAlign);
    if (rounded >= kHugePage) {
      const size_t mapped = round_up(rounded, kHugePage);
      ptr_ = Ptr(static_cast<std::byte*>(map_huge(mapped)), Free{mapped});
    } else {
      void* p = std::aligned_alloc(kAlign, rounded);
      if (!p) throw std::bad_alloc();
      std::memset(p, 0, rounded);
      ptr_ = Ptr(static_cast<std::byte*>(p), Free{0});
    }
    size_ = n_bytes;
  }
  std::byte* data() { return ptr_.get(); }
  const std::byte* data() const { return ptr_.get(); }
  template <class T>
  T* as() {
    return reinterpret_cast<T*>(ptr_.get());
  }
  template <class T>
  const T* as() const {
    return reinterpret_cast<const T*>(ptr_.get());
  }
  size_t size() const { return size_; }

 private:
  // n bytes (a multiple of kHugePage) of fresh anonymous memory at a kHugePage boundary, advised
  // MADV_HUGEPAGE (a hint: a kernel without THP gives 4 KiB pages, nothing else changes); throws
  // std::bad_alloc when the kernel refuses. unmap() gives it back. Defined in aligned.cpp (keeps
  // <sys/mman.h> out).
  static void* map_huge(size_t n);
  static void unmap(void* p, size_t n);
  struct Free {
    size_t mapped;  // bytes mapped by map_huge; 0: from aligned_alloc
    void operator()(std::byte* p) const {
      if (mapped > 0)
        unmap(p, mapped);
      else
        std::free(p);
    }
  };
  using Ptr = std::unique_ptr<std::byte, Free>;
  Ptr ptr_{nullptr, Free{0}};
  size_t size_ = 0;
};

}  // namespace kvlm
