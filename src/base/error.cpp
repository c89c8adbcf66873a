#include "base/error.h"

#include <cstdio>
#include <cstdlib>

namespace kvlm {

void invariant_failed(const char* expr, const char* file, int line) {
  std::fprintf(stderr, "kvlm: internal invariant violated: %s (%s:%d)\n", expr, file, line);
  std::abort();
}

}  // namespace kvlm
