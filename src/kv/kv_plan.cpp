#include "kv/kv_plan.h"

#include <algorithm>
#include <cctype>
#include <limits>
#include <optional>
#include <string>
#include <utility>

#include "base/error.h"

namespace kvlm {

namespace {

void check_counts(const char* what, int64_t n) {
  if (n <= 0) fail("KV plan: {} must be positive, got {}", what, n);
}

// One sequence's groups and their bytes when full (kv_seq_groups: the allocator's arithmetic), or
// nothing when a sum passes 2^64 (rounding up to whole blocks may, near the top).
std::optional<std::vector<KvGroupPlan>> group_plans(const KvShape& s, int64_t n_ctx,
                                                    std::span<const int32_t> layer_window) {
  const KvSeqGroups sg = kv_seq_groups(s, n_ctx, false, layer_window, kKvPlanBatch);
  const int32_t bs = kv_seq_block_size(s);
  // A block of every layer; a group's block spans only its layers.
  const uint64_t per_layer =
      PagedKvStore::block_bytes(s, bs) / static_cast<uint64_t>(s.n_layer);
  std::vector<KvGroupPlan> out;
  for (const KvSeqGroup& g : sg.groups) {
    KvGroupPlan p{g.window, g.n_layers, g.max_blocks * bs, 0};
    uint64_t b = 0;
    if (!checked_mul(per_layer * static_cast<uint64_t>(g.n_layers),
                     static_cast<uint64_t>(g.max_blocks), &b))
      return std::nullopt;
    p.bytes_per_seq = b;
    out.push_back(p);
  }
  return out;
}

// One full sequence's bytes (groups + KIVI's slot), or nothing past 2^64.
std::optional<uint64_t> seq_bytes(const KvShape& s, int64_t n_ctx,
                                  std::span<const int32_t> layer_window) {
  const auto groups = group_plans(s, n_ctx, layer_window);
  if (!groups) return std::nullopt;
  uint64_t sum = PagedKvStore::residual_slot_bytes(s);
  for (const KvGroupPlan& g : *groups)
    if (!checked_add(sum, g.bytes_per_seq, &sum)) return std::nullopt;
  return sum;
}

// Whether n_seqs caches of n_tokens tokens fit in budget bytes. Sizes past the budget are
// rejected before anything multiplies them (a sequence's bytes are at least n_tokens x the bytes
// of a token in its full layers, or its bytes at the window), so this never overflows or throws.
bool fits(const KvShape& s, int64_t n_tokens, int64_t n_seqs, uint64_t budget,
          std::span<const int32_t> layer_window) {
  if (n_tokens <= 0) return true;
  if (layer_window.empty() &&
      static_cast<uint64_t>(n_tokens) > budget / kv_bytes_per_token(s))
    return false;
  const auto per_seq = seq_bytes(s, n_tokens, layer_window);
  if (!per_seq) return false;
  return *per_seq == 0 || static_cast<uint64_t>(n_seqs) <= budget / *per_seq;
}

}  // namespace

KvPlan plan_kv(const KvShape& shape, int64_t n_ctx, int64_t n_seqs,
               std::span<const int32_t> layer_window) {
  validate(shape);
  check_counts("the context (tokens per sequence)", n_ctx);
  check_counts("the number of sequences", n_seqs);
  KvPlan p;
  p.shape = shape;
  p.n_ctx = n_ctx;
  p.n_seqs = n_seqs;
  p.k_bytes_per_token_layer = kv_k_row_bytes(shape);
  p.v_bytes_per_token_layer = kv_v_row_bytes(shape);
  p.bytes_per_token_layer = kv_bytes_per_token_layer(shape);
  p.k_bytes_per_token = p.k_bytes_per_token_layer * static_cast<size_t>(shape.n_layer);
  p.v_bytes_per_token = p.v_bytes_per_token_layer * static_cast<size_t>(shape.n_layer);
  p.bytes_per_token = kv_bytes_per_token(shape);
  // The K/V split is ours; the sum must still be kv_shape's number.
  KVLM_CHECK(p.k_bytes_per_token + p.v_bytes_per_token == p.bytes_per_token);
  if (!layer_window.empty() && static_cast<int32_t>(layer_window.size()) != shape.n_layer)
    fail("KV plan: {} layer windows for {} layers", layer_window.size(), shape.n_layer);
  p.bytes_per_seq = kv_seq_bytes(shape, n_ctx, layer_window);
  p.groups = *group_plans(shape, n_ctx, layer_window);  // kv_seq_bytes checked the sums
  if (!checked_mul(p.bytes_per_seq, static_cast<uint64_t>(n_seqs), &p.bytes_total))
    fail("KV cache size for {} sequences of {} tokens overflows", n_seqs, n_ctx);
  return p;
}

size_t kv_alloc_bytes(const KvShape& shape, KvAlloc alloc, int64_t n_ctx, int64_t n_reserved) {
  KVLM_CHECK(n_reserved >= 0 && n_reserved <= n_ctx);
  const int64_t n_blocks = kv_seq_blocks(shape, alloc == KvAlloc::Dynamic, n_ctx, n_reserved);
  uint64_t out = 0;
  if (!checked_mul(uint64_t(PagedKvStore::block_bytes(shape, kv_seq_block_size(shape))),
                   static_cast<uint64_t>(n_blocks), &out) ||
      !checked_add(out, uint64_t(PagedKvStore::residual_slot_bytes(shape)), &out))
    fail("KV cache size of {} tokens overflows", n_ctx);
  return out;
}

size_t kv_seq_bytes(const KvShape& shape, int64_t n_ctx, std::span<const int32_t> layer_window) {
  if (layer_window.empty()) return kv_alloc_bytes(shape, KvAlloc::Static, n_ctx, n_ctx);
  const auto b = seq_bytes(shape, n_ctx, layer_window);
  if (!b) fail("KV cache size of {} tokens overflows", n_ctx);
  return *b;
}

size_t llama_cpp_iswa_bytes(const KvShape& shape, int64_t n_ctx,
                            std::span<const int32_t> layer_window) {
  constexpr int64_t kUbatch = 512, kPad = 256;
  uint64_t cells = 0;  // summed over layers
  for (int32_t il = 0; il < shape.n_layer; ++il) {
    const int32_t w = layer_window.empty() ? 0 : layer_window[static_cast<size_t>(il)];
    cells += w == 0 ? static_cast<uint64_t>(n_ctx)
                    : static_cast<uint64_t>((std::min(n_ctx, w + kUbatch) + kPad - 1) / kPad * kPad);
  }
  uint64_t out = 0;
  if (!checked_mul(cells, kv_bytes_per_token_layer(shape), &out))
    fail("KV cache size of {} tokens overflows", n_ctx);
  return out;
}

int64_t max_ctx_for_budget(const KvShape& shape, int64_t n_seqs, uint64_t budget_bytes,
                           std::span<const int32_t> layer_window) {
  validate(shape);
  check_counts("the number of sequences", n_seqs);
  // n_seqs x n x bpt <= budget  <=>  n <= floor(floor(budget / n_seqs) / bpt) (integers), bpt the
  // bytes of a token in the full-attention layers (window layers are bounded). Only an upper
  // bound: a sequence holds whole blocks (and KIVI an f16 residual slot, window layers their
  // window's blocks), so the largest n that fits is searched below it (the bytes grow with n).
  // Without a full layer the bytes stop growing: contexts up to 2^40 are considered.
  const int64_t n_full = layer_window.empty()
                             ? shape.n_layer
                             : std::count(layer_window.begin(), layer_window.end(), 0);
  const uint64_t bpt_full = kv_bytes_per_token_layer(shape) * static_cast<uint64_t>(n_full);
  constexpr uint64_t kMaxCtx = uint64_t{1} << 40;
  const uint64_t guess =
      bpt_full == 0 ? kMaxCtx
                    : budget_bytes / static_cast<uint64_t>(n_seqs) /
                          (layer_window.empty() ? kv_bytes_per_token(shape) : bpt_full);
  int64_t n = static_cast<int64_t>(
      std::min<uint64_t>(guess, layer_window.empty() ? uint64_t(std::numeric_limits<int64_t>::max())
                                                     : kMaxCtx));
  if (n > 0 && !fits(shape, n, n_seqs, budget_bytes, layer_window)) {
    int64_t lo = 0, hi = n;  // fits(lo), !fits(hi)
    while (hi - lo > 1) {
      const int64_t mid = lo + (hi - lo) / 2;
      (fits(shape, mid, n_seqs, budget_bytes, layer_window) ? lo : hi) = mid;
    }
    n = lo;
  }
  // The division is only a shortcut: the bytes are the definition, and the answer must be exact.
  KVLM_CHECK(n == 0 || fits(shape, n, n_seqs, budget_bytes, layer_window));
  KVLM_CHECK(n == std::numeric_limits<int64_t>::max() || static_cast<uint64_t>(n) == kMaxCtx ||
             !fits(shape, n + 1, n_seqs, budget_bytes, layer_window));
  return n;
}

int64_t max_seqs_for_budget(const KvShape& shape, int64_t n_ctx, uint64_t budget_bytes,
                            std::span<const int32_t> layer_window) {
  validate(shape);
  check_counts("the context (tokens per sequence)", n_ctx);
  if (!fits(shape, n_ctx, 1, budget_bytes, layer_window)) return 0;
  const uint64_t guess = budget_bytes / kv_seq_bytes(shape, n_ctx, layer_window);
  const int64_t n = static_cast<int64_t>(
      std::min<uint64_t>(guess, static_cast<uint64_t>(std::numeric_limits<int64_t>::max())));
  KVLM_CHECK(fits(shape, n_ctx, n, budget_bytes, layer_window));
  KVLM_CHECK(n == std::numeric_limits<int64_t>::max() ||
             !fits(shape, n_ctx, n + 1, budget_bytes, layer_window));
  return n;
}

std::vector<DType> kv_plan_types(const KvShape& shape) {
  // Candidates: every type id kvlm knows (GGML numbers them below 64). validate() is the one
  // judge of what a cache can store, so its verdict is taken as is.
  std::vector<std::pair<size_t, DType>> found;  // (bytes per token, type)
  std::string first_error;
  for (uint32_t id = 0; id < 64; ++id) {
    const DTypeInfo* info = dtype_info(id);
    if (!info) continue;
    KvShape s = shape;
    s.dtype_k = s.dtype_v = info->type;
    try {
      validate(s);
    } catch (const Error& e) {
      if (first_error.empty()) first_error = e.what();
      continue;
    }
    found.emplace_back(kv_bytes_per_token(s), info->type);
  }
  // Only a bad shape (no type at all) gets here empty; its error says why.
  if (found.empty()) throw Error(first_error);
  std::stable_sort(found.begin(), found.end(),
                   [](const auto& a, const auto& b) { return a.first > b.first; });
  std::vector<DType> out;
  for (const auto& f : found) out.push_back(f.second);
  return out;
}

uint64_t parse_bytes(std::string_view text) {
  constexpr const char* kUnits = "B; KiB, MiB, GiB, TiB (x1024); KB, MB, GB, TB (x1000)";
  std::string_view s = text;
  auto is_space = [](char c) { return std::isspace(static_cast<unsigned char>(c)) != 0; };
  auto is_digit = [](char c) { return c >= '0' && c <= '9'; };
  while (!s.empty() && is_space(s.front())) s.remove_prefix(1);
  while (!s.empty() && is_space(s.back())) s.remove_suffix(1);
  if (s.empty()) fail("invalid byte size '{}': empty (give a number and a unit, e.g. 2GiB)", text);
  if (s.front() == '-') fail("invalid byte size '{}': a size cannot be negative", text);
  if (s.front() == '+') fail("invalid byte size '{}': give the number without a sign", text);

  size_t i = 0;
  uint64_t whole = 0;
  bool any_digit = false, overflow = false;
  for (; i < s.size() && is_digit(s[i]); ++i) {
    overflow |= !checked_mul(whole, 10, &whole) || !checked_add(whole, s[i] - '0', &whole);
    any_digit = true;
  }
  uint64_t frac = 0, frac_scale = 1;  // the fraction is frac / frac_scale
  if (i < s.size() && s[i] == '.') {
    for (++i; i < s.size() && is_digit(s[i]); ++i) {
      // 18 decimals keep frac x unit (< 10^18 x 2^40) inside 128 bits and exact.
      if (frac_scale == 1'000'000'000'000'000'000ull)
        fail("invalid byte size '{}': more than 18 decimals", text);
      frac = frac * 10 + static_cast<uint64_t>(s[i] - '0');
      frac_scale *= 10;
      any_digit = true;
    }
  }
  if (!any_digit)
    fail("invalid byte size '{}': expected a number and an optional unit ({}), e.g. 2GiB", text,
         kUnits);
  while (i < s.size() && is_space(s[i])) ++i;

  std::string unit(s.substr(i));
  for (auto& c : unit) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  static constexpr std::pair<const char*, uint64_t> kTable[] = {
      {"", 1},
      {"b", 1},
      {"k", 1ull << 10},
      {"kib", 1ull << 10},
      {"kb", 1000ull},
      {"m", 1ull << 20},
      {"mib", 1ull << 20},
      {"mb", 1000ull * 1000},
      {"g", 1ull << 30},
      {"gib", 1ull << 30},
      {"gb", 1000ull * 1000 * 1000},
      {"t", 1ull << 40},
      {"tib", 1ull << 40},
      {"tb", 1000ull * 1000 * 1000 * 1000},
  };
  const uint64_t* mult = nullptr;
  for (const auto& [name, m] : kTable)
    if (unit == name) mult = &m;
  if (!mult) fail("invalid byte size '{}': unknown unit '{}' (units: {})", text, s.substr(i), kUnits);

  uint64_t bytes = 0;
  // Fractions of a byte are dropped: a budget is an upper bound.
  const auto frac_bytes = static_cast<uint64_t>(static_cast<unsigned __int128>(frac) * *mult / frac_scale);
  overflow |= !checked_mul(whole, *mult, &bytes) || !checked_add(bytes, frac_bytes, &bytes);
  if (overflow) fail("invalid byte size '{}': more than 2^64 - 1 bytes", text);
  return bytes;
}

}  // namespace kvlm
