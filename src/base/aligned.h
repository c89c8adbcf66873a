#pragma once

#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>

namespace kvlm {

// 64-byte aligned, zero-initialised, owning byte buffer. Copying is explicit (no copy ctor):
// buffers here are caches and scratch arenas of megabytes.
class AlignedBuffer {
 public:
  static constexpr size_t kAlign = 64;
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
    size_t rounded = (n_bytes + kAlign - 1) / kAlign * kAlign;
    void* p = std::aligned_alloc(kAlign, rounded);
    if (!p) throw std::bad_alloc();
    std::memset(p, 0, rounded);
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
  struct Free {
    void operator()(std::byte* p) const { std::free(p); }
  };
  std::unique_ptr<std::byte, Free> ptr_;
  size_t size_ = 0;
};

}  // namespace kvlm
