// Errors, checked arithmetic and small helpers shared by every module.
//
// kvlm reports bad input (files, flags, requests) by throwing kvlm::Error from the boundary code
// that validates it (GGUF parsing, model loading, CLI parsing). Hot loops never throw: by the time
// a kernel runs, every size it relies on has been checked. Front ends (cli, server) catch Error and
// turn it into a one-line message and a non-zero exit or an HTTP error.
#pragma once

#include <fmt/format.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace kvlm {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

template <class... Args>
[[noreturn]] void fail(fmt::format_string<Args...> f, Args&&... args) {
  throw Error(fmt::format(f, std::forward<Args>(args)...));
}

// Overflow-checked arithmetic on sizes and offsets read from untrusted files. Each returns false
// (and leaves *out unspecified) when the exact result does not fit in uint64_t.
inline bool checked_add(uint64_t a, uint64_t b, uint64_t* out) {
  return !__builtin_add_overflow(a, b, out);
}
inline bool checked_mul(uint64_t a, uint64_t b, uint64_t* out) {
  return !__builtin_mul_overflow(a, b, out);
}

// Invariant checks that stay on in release builds (bookkeeping such as block conservation):
// a violation is a kvlm bug, so it aborts with file and line rather than throwing.
[[noreturn]] void invariant_failed(const char* expr, const char* file, int line);
#define KVLM_CHECK(expr) \
  ((expr) ? (void)0 : ::kvlm::invariant_failed(#expr, __FILE__, __LINE__))

}  // namespace kvlm
