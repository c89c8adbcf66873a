// Perplexity over a text and KL divergence against a saved reference run, as llama.cpp's
// `llama-perplexity` (and its --kl-divergence-base / --kl-divergence).
//
// What is scored (llama.cpp's scheme, kept so numbers compare): the text's tokens are split into
// non-overlapping chunks of n_ctx tokens; each chunk is evaluated from an empty cache, its first
// token replaced by BOS when the vocabulary adds one. Only the second half is scored: logits at
// positions n_ctx/2 .. n_ctx-2 predict tokens n_ctx/2+1 .. n_ctx-1, so every scored token sees at
// least n_ctx/2 tokens of context and the numbers do not depend on an unconditioned first half.
// That is n_ctx - 1 - n_ctx/2 scored tokens per chunk (255 for n_ctx = 512).
// PPL = exp(mean NLL), NLL summed in double; its error is llama.cpp's: the standard error of the
// mean NLL times PPL (delta method).
//
// KL base file (--kl-base-out writes it, --kl-base reads it). llama.cpp stores the full logits row
// (uint16-quantized) per position: 96 KiB a position for SmolLM2's 49152-token vocabulary, ~20 GB
// over the Jargon File (405,655 tokens: 792 chunks of 512, 201,960 scored positions; 55 MB here). kvlm stores, per scored position, the reference distribution's top-K token
// ids and log-probabilities, plus the exact probability mass of all other tokens ("rest", summed
// over the full row, not 1 - sum(top-K), so it does not suffer cancellation), and the
// log-probability of the actual next token: 8 * K + 16 bytes (272 for K = 32).
// The reported KL is therefore KL(P || Q) of the two distributions coarsened to K + 1 buckets
// (P's top-K tokens, and everything else): sum_i p_i ln(p_i / q_i) + p_rest ln(p_rest / q_rest).
// By the data-processing inequality it is a lower bound of the full KL; the tokens it ignores
// hold p_rest of the mass (typically a few percent), so the bound is tight where both
// distributions are peaked, which is where a cache type's errors matter. llama.cpp's numbers are
// computed over the full vocabulary; compare kvlm's with kvlm's.
//
// In-process reference (kl_ref): instead of a base file, every chunk is also evaluated with a
// second, reference cache (for example f16) in the same process, and KL(P_ref || Q) is computed
// exactly over the full vocabulary from both f32 logit rows, in double: the same quantity
// llama.cpp's numbers are. It costs a second evaluation of every chunk and one [n_ctx/2, n_vocab]
// f32 block of reference logits (~200 MB at --ctx 2048 for SmolLM2), and nothing on disk.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/thread_pool.h"
#include "engine/session.h"
#include "model/model.h"

namespace kvlm {

class Tokenizer;

inline constexpr int32_t kKlTopK = 32;
inline constexpr char kKlMagic[8] = {'K', 'V', 'L', 'M', 'K', 'L', 'B', '\0'};
inline constexpr uint32_t kKlVersion = 1;

// The base file: this header, then n_scored records in scoring order (chunk by chunk, position by
// position), each
//   f64 target_logprob   ln p(actual next token)
//   f64 rest             probability mass outside the top-K
//   i32 ids[top_k]       top-K token ids, by descending probability (lowest id first on ties)
//   f32 logprobs[top_k]  their ln p
// Little-endian (every target kvlm builds for). All fields are checked when read: a file from
// another model, text, --ctx or --chunks, a truncated one or one with out-of-range values raises
// kvlm::Error naming the file and the field.
struct KlBaseHeader {
  char magic[8];           // kKlMagic
  uint32_t version;        // kKlVersion
  uint32_t top_k;          // ids per position: min(kKlTopK, n_vocab)
  uint32_t n_vocab;
  uint16_t dtype_k;        // cache types of the run that made it (informational)
  uint16_t dtype_v;
  int64_t n_ctx;           // tokens per chunk
  int64_t n_chunks;
  int64_t n_scored;        // == n_chunks * (n_ctx - 1 - n_ctx / 2)
  uint64_t model_hash;     // model_fingerprint() of the model that made it
  uint64_t tokens_hash;    // FNV-1a of the evaluated token ids (n_chunks * n_ctx, BOS included)
};
static_assert(sizeof(KlBaseHeader) == 64);
// Bytes of one record for a given top_k.
inline uint64_t kl_record_bytes(uint64_t top_k) { return 16 + 8 * top_k; }

struct PerplexityOptions {
  int64_t n_ctx = 512;     // tokens per chunk (>= 4)
  int64_t n_chunks = -1;   // chunks to evaluate; < 0: all that fit (or the base file's count)
  int64_t n_batch = 512;   // tokens per forward pass
  DType dtype_k = DType::F16;
  DType dtype_v = DType::F16;
  std::string kl_base;      // compare against this base file ("" = no comparison)
  std::string kl_base_out;  // write a base file ("" = none)
  // Compare with an in-process run with this cache instead (its n_ctx is set per chunk as for
  // kv); exclusive with kl_base and kl_base_out.
  std::optional<KvOptions> kl_ref;
  // Cache layout beyond the types above (allocation, sliding window with sinks, KIVI). Its n_ctx
  // is used only with a window (sinks + window, smaller than a chunk: the window then evicts
  // within each chunk); otherwise the cache holds exactly one chunk.
  KvOptions kv;
};

struct KlStats {
  int64_t n = 0;               // positions compared
  double kld_mean = 0, kld_err = 0;
  double kld_median = 0, kld_p99 = 0, kld_max = 0;
  double same_top = 0;         // fraction of positions whose argmax equals the base's
  double base_ppl = 0;         // PPL recomputed from the base file
  double ln_ppl_ratio = 0;     // mean (NLL - NLL_base) = ln(PPL / PPL_base)
  double ln_ppl_ratio_err = 0;
  DType base_dtype_k = DType::F16, base_dtype_v = DType::F16;
  bool full_vocab = false;     // true: exact KL against kl_ref; false: the base file's K + 1 buckets
};

struct PerplexityResult {
  int64_t n_text_tokens = 0;  // whole text, BOS included
  int64_t n_ctx = 0;
  int64_t n_chunks = 0;       // evaluated
  int64_t n_chunks_max = 0;   // that the text holds
  int64_t n_scored = 0;       // tokens scored (n_chunks * (n_ctx - 1 - n_ctx / 2))
  double nll_mean = 0;
  double ppl = 0, ppl_err = 0;
  double seconds = 0;         // evaluation wall time
  std::optional<KlStats> kl;  // when opts.kl_base or opts.kl_ref is set
};

// Reported after each chunk; running values over the chunks so far.
struct PerplexityProgress {
  int64_t chunk = 0;  // 0-based, just finished
  int64_t n_chunks = 0;
  double ppl = 0;
  double kld_mean = -1;  // < 0 when not comparing
  double chunk_seconds = 0;
};

// The text's tokens as llama.cpp's perplexity takes them: special-token texts are plain text, and
// BOS comes first when the vocabulary asks for it (tokenizer.ggml.add_bos_token).
std::vector<int32_t> perplexity_tokens(const Tokenizer& tok, std::string_view text);

// Scored tokens per chunk of n_ctx tokens.
inline int64_t perplexity_scored_per_chunk(int64_t n_ctx) { return n_ctx - 1 - n_ctx / 2; }

// Identifies a model for base files: tensor names, types, shapes and offsets, the first bytes of
// every tensor's data, the vocabulary size and the file size. Cheap (reads ~256 bytes a tensor).
uint64_t model_fingerprint(const Model& model);

// Evaluates the chunks of `tokens` (from perplexity_tokens) as described above. `bos` is the id put
// first in each chunk, -1 for none (use the tokenizer's bos_id() when add_bos_default()).
// Throws kvlm::Error when the text is shorter than one chunk, n_ctx is out of range, or the base
// file cannot be read, is corrupt or was made from another model/text/--ctx/--chunks. Base-file
// header problems are reported before any evaluation.
PerplexityResult perplexity(const Model& model, std::span<const int32_t> tokens, int32_t bos,
                            const PerplexityOptions& opts, ThreadPool& pool,
                            const std::function<void(const PerplexityProgress&)>& on_chunk = {});

}  // namespace kvlm
