#include "engine/attention_map.h"

#include <algorithm>

#include "base/error.h"
#include "engine/session.h"

namespace kvlm {

AttentionMap attention_map(const Model& model, std::span<const int32_t> tokens, int32_t layer,
                           int32_t head, int64_t n_query, ThreadPool& pool) {
  const ModelConfig& c = model.config();
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (n == 0) fail("attention map: no tokens");
  if (n_query < 1 || n_query > std::min(kMaxAttentionRows, n))
    fail("attention map: {} query rows; give 1 to {}", n_query, std::min(kMaxAttentionRows, n));
  // Checked here too (forward checks them), before the text's prefill is spent on them.
  if (layer < 0 || layer >= c.n_layer)
    fail("attention map: layer {} is out of range [0, {})", layer, c.n_layer);
  if (head < 0 || head >= c.n_head)
    fail("attention map: head {} is out of range [0, {})", head, c.n_head);
  KvOptions o;  // f16 K and V, kvlm's default cache types
  o.n_ctx = n;
  Session s(model, o, pool, std::max<int64_t>(n_query, 512));
  if (n > n_query) s.feed(tokens.first(static_cast<size_t>(n - n_query)));
  AttnProbe p{layer, head, {}};
  s.feed_probed(tokens.last(static_cast<size_t>(n_query)), p);
  AttentionMap m;
  m.layer = layer;
  m.head = head;
  m.kv_head = static_cast<int32_t>(head / c.n_gqa());
  m.window = c.window(layer);
  m.q0 = n - n_query;
  m.n_pos = n;
  m.weights = std::move(p.weights);
  return m;
}

}  // namespace kvlm
