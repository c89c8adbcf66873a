// Session files: a sequence's token history and KV cache rows, so a chat can be saved and resumed
// without recomputing. Layout (little-endian):
//   "KVLMSESS" | u32 version | u64 model fingerprint | u32 n_layer, n_kv_head, head_dim,
//   dtype_k, dtype_v | u64 n_tokens | u64 meta_len | meta bytes | i32 tokens[n_tokens] |
//   per layer: K rows [n_tokens, k_row_bytes], V rows [n_tokens, v_row_bytes] | u64 XXH64 of all
//   preceding bytes.
// Every size is checked against the file size with overflow-checked arithmetic before use.
#include <array>
#include <xxhash.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "base/error.h"
#include "engine/session.h"

namespace kvlm {

namespace {

constexpr char kMagic[8] = {'K', 'V', 'L', 'M', 'S', 'E', 'S', 'S'};
constexpr uint32_t kVersion = 1;
constexpr size_t kHeaderBytes = 8 + 4 + 8 + 5 * 4 + 8 + 8;

// Identifies the weights without reading them all: architecture, hyper-parameters, file size and
// the whole tensor table (names, types, shapes, offsets).
uint64_t model_fingerprint(const Model& m) {
  XXH64_state_t* st = XXH64_createState();
  XXH64_reset(st, 0);
  auto add = [&](const void* p, size_t n) { XXH64_update(st, p, n); };
  const ModelConfig& c = m.config();
  add(c.arch->name, std::strlen(c.arch->name));
  const int32_t dims[] = {c.n_vocab, c.n_embd, c.n_layer, c.n_head, c.n_kv_head, c.n_ff};
  add(dims, sizeof(dims));
  const uint64_t size = m.gguf().file_size();
  add(&size, sizeof(size));
  for (const auto& t : m.gguf().tensors()) {
    add(t.name.data(), t.name.size());
    add(&t.type, sizeof(t.type));
    add(t.ne.data(), t.ne.size() * sizeof(int64_t));
    add(&t.offset, sizeof(t.offset));
  }
  const uint64_t h = XXH64_digest(st);
  XXH64_freeState(st);
  return h;
}

template <class T>
void put(std::string& out, T v) {
  out.append(reinterpret_cast<const char*>(&v), sizeof(T));
}

class Reader {
 public:
  Reader(const std::string& data, const std::string& path) : d_(data), path_(path) {}
  template <class T>
  T get(const char* what) {
    T v;
    need(sizeof(T), what);
    std::memcpy(&v, d_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  const char* bytes(uint64_t n, const char* what) {
    need(n, what);
    const char* p = d_.data() + pos_;
    pos_ += n;
    return p;
  }
  uint64_t pos() const { return pos_; }

 private:
  void need(uint64_t n, const char* what) {
    uint64_t end;
    if (!checked_add(pos_, n, &end) || end > d_.size())
      fail("{}: truncated session file: {} needs {} bytes at byte {}, file has {}", path_, what, n,
           pos_, d_.size());
  }
  const std::string& d_;
  const std::string& path_;
  uint64_t pos_ = 0;
};

// The cache shape words of the header. A rotated cache (--kv-rotate) sets bit 16 of the K type
// word: its rows mean something else, and files written before the flag existed read as plain.
std::array<uint32_t, 5> shape_words(const KvShape& s) {
  return {static_cast<uint32_t>(s.n_layer), static_cast<uint32_t>(s.n_kv_head),
          static_cast<uint32_t>(s.head_dim),
          static_cast<uint32_t>(s.dtype_k) | (s.rotate ? 1u << 16 : 0u),
          static_cast<uint32_t>(s.dtype_v)};
}

// The whole file. A directory, a FIFO or a device is refused before it is opened: reading a
// directory throws std::ios_base::failure out of the stream, and /dev/zero never ends.
std::string read_regular_file(const std::string& path) {
  std::error_code ec;
  const auto st = std::filesystem::status(path, ec);
  if (ec || !std::filesystem::exists(st)) fail("{}: cannot open session file", path);
  if (!std::filesystem::is_regular_file(st))
    fail("{}: {}, not a session file", path,
         std::filesystem::is_directory(st) ? "a directory" : "not a regular file");
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("{}: cannot open session file", path);
  try {
    return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  } catch (const std::ios_base::failure& e) {
    fail("{}: cannot read session file ({})", path, e.what());
  }
}

}  // namespace

void Session::save(const std::string& path, const std::string& meta) const {
  const KvShape& s = kv_.shape();
  if (s.kivi()) fail("{}: session files do not support the KIVI cache (--kv-residual)", path);
  const int64_t n = n_cached();
  std::string out;
  out.append(kMagic, sizeof(kMagic));
  put<uint32_t>(out, kVersion);
  put<uint64_t>(out, model_fingerprint(model_));
  for (uint32_t v : shape_words(s)) put<uint32_t>(out, v);
  put<uint64_t>(out, static_cast<uint64_t>(n));
  put<uint64_t>(out, meta.size());
  out += meta;
  out.append(reinterpret_cast<const char*>(tokens_.data()), tokens_.size() * sizeof(int32_t));
  // Per layer, the K rows then the V rows of positions [0, n), token-major: the bytes the cache
  // holds, whatever its block layout.
  const size_t k_bytes = kv_k_row_bytes(s) * n, v_bytes = kv_v_row_bytes(s) * n;
  for (int32_t il = 0; il < s.n_layer; ++il) {
    const size_t at = out.size();
    out.resize(at + k_bytes + v_bytes);
    auto* dst = reinterpret_cast<std::byte*>(out.data() + at);
    kv_.store().read_rows(il, kv_.seq_cache(kSeq).blocks, 0, n, dst, dst + k_bytes);
  }
  put<uint64_t>(out, XXH64(out.data(), out.size(), 0));
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) fail("{}: cannot write session file", path);
  f.write(out.data(), static_cast<std::streamsize>(out.size()));
  if (!f.flush()) fail("{}: write failed", path);
}

std::string Session::load(const std::string& path,
                          const std::function<void(const std::string&)>& check_meta) {
  if (kv_shape().kivi()) fail("{}: session files do not support the KIVI cache (--kv-residual)", path);
  const std::string data = read_regular_file(path);
  if (data.size() < kHeaderBytes + 8) fail("{}: not a kvlm session file (too short)", path);
  if (std::memcmp(data.data(), kMagic, sizeof(kMagic)) != 0)
    fail("{}: not a kvlm session file (bad magic)", path);
  uint64_t stored;
  std::memcpy(&stored, data.data() + data.size() - 8, 8);
  if (XXH64(data.data(), data.size() - 8, 0) != stored)
    fail("{}: checksum mismatch: the session file is corrupt", path);
  const std::string body = data.substr(0, data.size() - 8);
  Reader r(body, path);
  r.bytes(sizeof(kMagic), "magic");
  const uint32_t version = r.get<uint32_t>("version");
  if (version != kVersion) fail("{}: session file version {} (kvlm reads {})", path, version, kVersion);
  if (r.get<uint64_t>("fingerprint") != model_fingerprint(model_))
    fail("{}: the session was saved with another model", path);
  const KvShape& s = kv_.shape();
  for (uint32_t w : shape_words(s))
    if (r.get<uint32_t>("cache shape") != w)
      fail("{}: the session's cache shape or types differ from this one (use the same -ctk/-ctv "
           "and --kv-rotate)",
           path);
  const uint64_t n = r.get<uint64_t>("n_tokens");
  if (n > static_cast<uint64_t>(opts_.n_ctx))
    fail("{}: the session holds {} tokens, more than this context ({}); raise -c", path, n,
         opts_.n_ctx);
  const uint64_t meta_len = r.get<uint64_t>("meta length");
  std::string meta(r.bytes(meta_len, "meta"), meta_len);
  std::vector<int32_t> toks(n);
  const char* tok_bytes = r.bytes(n * sizeof(int32_t), "tokens");
  // An empty session (saved after /clear) has no tokens: memcpy's pointers must not be null even
  // for 0 bytes, and toks.data() is (UBSan stopped on the fuzz seed empty-after-clear.kvs).
  if (n > 0) std::memcpy(toks.data(), tok_bytes, n * sizeof(int32_t));
  for (int32_t t : toks)
    if (t < 0 || t >= model_.config().n_vocab) fail("{}: token id {} out of range", path, t);
  const uint64_t k_bytes = kv_k_row_bytes(s) * n, v_bytes = kv_v_row_bytes(s) * n;
  uint64_t rows_total;
  if (!checked_mul(k_bytes + v_bytes, static_cast<uint64_t>(s.n_layer), &rows_total) ||
      r.pos() + rows_total != body.size())
    fail("{}: session file size does not match its {} tokens", path, n);
  if (check_meta) check_meta(meta);
  // Validated: now replace the session's state.
  reset();
  KVLM_CHECK(kv_.reserve(kSeq, static_cast<int64_t>(n)));  // n <= n_ctx, checked above
  for (int32_t il = 0; il < s.n_layer; ++il) {
    const auto* k = reinterpret_cast<const std::byte*>(r.bytes(k_bytes, "K rows"));
    const auto* v = reinterpret_cast<const std::byte*>(r.bytes(v_bytes, "V rows"));
    kv_.store().write_rows(il, kv_.seq_cache(kSeq).blocks, 0, static_cast<int64_t>(n), k, v);
  }
  tokens_ = std::move(toks);
  kv_.commit(kSeq, tokens_, static_cast<int64_t>(n));
  return meta;
}

}  // namespace kvlm
