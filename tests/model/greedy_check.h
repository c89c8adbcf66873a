// Greedy decoding through the cache against a reference engine's greedy tokens (the goldens'
// "generated"), shared by the golden tests of tests/model.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "engine/session.h"
#include "sampling/sampler.h"

namespace kvlm::test {

// Feeds the argmax of each row to s while it equals want[k], starting from the row last_row:
// [n_vocab] logits after the prompt. Returns how many of want's tokens were reproduced (a
// mismatch is legitimate only where the reference's own top-2 gap at that step is small).
inline size_t greedy_steps_matching(Session& s, std::span<const float> last_row, int32_t n_vocab,
                                    const std::vector<int32_t>& want) {
  std::vector<float> last(last_row.begin(), last_row.end());
  size_t k = 0;
  for (; k < want.size(); ++k) {
    int32_t t = argmax(last.data(), n_vocab);
    if (t != want[k]) break;
    const auto next = s.feed(std::span<const int32_t>(&t, 1));
    last.assign(next.begin(), next.end());
  }
  return k;
}

}  // namespace kvlm::test
