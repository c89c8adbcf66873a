#include "base/aligned.h"

#include <cstdint>

#include <sys/mman.h>

namespace kvlm {

void* AlignedBuffer::map_huge(size_t n) {
  // Map one huge page more than asked, keep the 2 MiB-aligned n bytes inside, unmap the rest.
  if (n > SIZE_MAX - kHugePage) throw std::bad_alloc();
  const size_t span = n + kHugePage;
  void* raw = ::mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) throw std::bad_alloc();
  const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (start + kHugePage - 1) / kHugePage * kHugePage;
  if (aligned > start) ::munmap(raw, aligned - start);
  const uintptr_t end = start + span, used_end = aligned + n;
  if (end > used_end) ::munmap(reinterpret_cast<void*>(used_end), end - used_end);
  void* p = reinterpret_cast<void*>(aligned);
#ifdef MADV_HUGEPAGE
  ::madvise(p, n, MADV_HUGEPAGE);  // a hint: an error leaves 4 KiB pages, nothing else
#endif
  return p;
}

void AlignedBuffer::unmap(void* p, size_t n) { ::munmap(p, n); }

}  // namespace kvlm
