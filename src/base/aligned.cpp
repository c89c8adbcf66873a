#include "base/aligned.h"

#include <cstdint>

#include <sys/mman.h>

namespace kvlm {

void AlignedBuffer::advise_huge_pages(void* p, size_t n) {
#ifdef MADV_HUGEPAGE
  const size_t whole = n / kHugePage * kHugePage;
  if (whole > 0 && reinterpret_cast<uintptr_t>(p) % kHugePage == 0)
    ::madvise(p, whole, MADV_HUGEPAGE);  // a hint: an error leaves 4 KiB pages, nothing else
#else
  (void)p;
  (void)n;
#endif
}

}  // namespace kvlm
