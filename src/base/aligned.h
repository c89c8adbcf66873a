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
  // Buffers of at least kHugePage bytes (weights, KV arenas, big scratch) start on a 2 MiB
  // boundary and ask for transparent huge pages (madvise MADV_HUGEPAGE; Debian's default THP
  // mode is "madvise", which gives none otherwise). Decode streams ~92 MiB of weights per token
  // and attention reads scattered KV blocks: with 4 KiB pages both miss the TLB constantly
  // (measured: docs/BENCHMARKS.md). Only whole 2 MiB pages inside the buffer are advised and
  // only the buffer's own bytes are touched, so resident memory stays the bytes asked for
  // (rounded to pages), never a huge page more.
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
    const bool huge = rounded >= kHugePage;
    void* p = huge ? std::aligned_alloc(kHugePage, round_up(rounded, kHugePage))
                   : std::aligned_alloc(kAlign, rounded);
    if (!p) throw std::bad_alloc();
    if (huge) advise_huge_pages(p, rounded);
    std::memset(p, 0, rounded);  // first touch: the kernel backs the advised part with 2 MiB pages
    ptr_.reset(static_cast<std::byte*>(p));
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
  // madvise(MADV_HUGEPAGE) over [p, p + n rounded down to kHugePage); a hint: failure (a kernel
  // without THP) changes nothing but speed. Defined in aligned.cpp (keeps <sys/mman.h> out).
  static void advise_huge_pages(void* p, size_t n);
  struct Free {
    void operator()(std::byte* p) const { std::free(p); }
  };
  std::unique_ptr<std::byte, Free> ptr_;
  size_t size_ = 0;
};

}  // namespace kvlm
