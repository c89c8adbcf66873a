// Attention maps (kvlm serve's POST /kv/attention, the web page's heatmap): how the last tokens of
// a text spread one layer's query head's attention over every position before them. What a
// window layer cannot see is 0; attention sinks show as a bright first column.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "base/thread_pool.h"
#include "model/model.h"

namespace kvlm {

struct AttentionMap {
  int32_t layer = 0;
  int32_t head = 0;
  int32_t kv_head = 0;   // the K/V head the query head reads (grouped-query attention)
  int64_t window = 0;    // the layer's sliding window, 0: full attention
  int64_t q0 = 0;        // the first query row's position
  int64_t n_pos = 0;     // positions: the text's tokens
  std::vector<float> weights;  // [n_pos - q0, n_pos] row i: the token at q0 + i; rows sum to 1
};

// Most query rows a map has: the rows are what a reader looks at, and each costs n_pos floats.
inline constexpr int64_t kMaxAttentionRows = 128;

// Runs `tokens` through the model in a cache of its own (f16, sized to the text), the last n_query
// of them in one pass that fills the map of (layer, head). Throws kvlm::Error for an empty text,
// n_query out of [1, min(kMaxAttentionRows, tokens)], or a layer or head out of range.
AttentionMap attention_map(const Model& model, std::span<const int32_t> tokens, int32_t layer,
                           int32_t head, int64_t n_query, ThreadPool& pool);

}  // namespace kvlm
