// The pre-tokenizer names llama.cpp knows but ships no vocab test file for (GPT-4o, Llama 4,
// Tekken, DeepSeek V3, Kimi K2, Bloom, Chameleon, ...), against llama.cpp itself.
//
// tests/data/pretok_goldens.json (tools/gen_pretok_goldens.py) names, for each pre-tokenizer, a
// base vocabulary from the refdata directory. The script re-tagged that vocab-only GGUF's
// tokenizer.ggml.pre to the name (and rewrote the keys its "set" lists, such as
// tokenizer.ggml.model for sarvam-moe) and tokenized a corpus with llama.cpp; this test makes the
// same re-tagged image in memory (retag() below, the script's byte edit) and compares kvlm's ids by
// FNV-1a hash: per text with add_special and parse_special off, and over the whole corpus with
// them on and for llama_detokenize's text.

#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "base/error.h"
#include "gguf/gguf.h"
#include "test_util.h"
#include "tokenizer/tokenizer.h"

namespace kvlm {
namespace {

using nlohmann::json;

const json& goldens() {
  static const json g = [] {
    std::ifstream in(test::data_path("pretok_goldens.json"));
    EXPECT_TRUE(in.good()) << "missing " << test::data_path("pretok_goldens.json")
                           << "; run tools/gen_pretok_goldens.py";
    return in.good() ? json::parse(in) : json::object();
  }();
  return g;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The GGUF image with string metadata `key` set to `value`, as the script's retag(): the pair
// is the key (u64 length, bytes), its type (u32 8, string) and the value (u64 length, bytes),
// rewritten in place, or inserted after the 24-byte header (raising the metadata count at byte
// 16) when the file lacks the key. The refdata vocab files hold no tensors, so nothing after
// the metadata moves with it.
std::string retag(const std::string& gguf, std::string_view key, std::string_view value) {
  auto u64 = [](uint64_t v) { return std::string(reinterpret_cast<const char*>(&v), 8); };
  const uint32_t type = 8;
  const std::string head =
      u64(key.size()) + std::string(key) + std::string(reinterpret_cast<const char*>(&type), 4);
  const std::string pair_value = u64(value.size()) + std::string(value);
  size_t at = gguf.find(head);
  if (at == std::string::npos) {
    if (gguf.size() < 24) return {};
    uint64_t n_kv = 0;
    std::memcpy(&n_kv, gguf.data() + 16, 8);
    return gguf.substr(0, 16) + u64(n_kv + 1) + head + pair_value + gguf.substr(24);
  }
  at += head.size();
  uint64_t old_len = 0;
  std::memcpy(&old_len, gguf.data() + at, 8);
  return gguf.substr(0, at) + pair_value + gguf.substr(at + 8 + old_len);
}

// The base vocabulary with tokenizer.ggml.pre set to `name` and the `set` pairs applied.
std::unique_ptr<Tokenizer> retagged(std::string_view base, std::string_view name, const json& set) {
  static std::map<std::string, std::string, std::less<>> files;
  auto it = files.find(base);
  if (it == files.end()) {
    const std::string path = fmt::format("{}/ggml-vocab-{}.gguf", test::refdata_dir(), base);
    it = files.emplace(std::string(base), read_file(path)).first;
  }
  if (it->second.empty()) return nullptr;
  std::string image = it->second;
  for (const auto& [key, value] : set.items()) image = retag(image, key, value.get<std::string>());
  image = retag(image, "tokenizer.ggml.pre", name);
  const auto file = GgufFile::from_memory(reinterpret_cast<const uint8_t*>(image.data()),
                                          image.size(), fmt::format("{} as {}", base, name));
  return Tokenizer::from_gguf(*file);
}

// FNV-1a 64 over bytes, as the script's fnv_bytes.
struct Fnv {
  uint64_t h = 0xCBF29CE484222325ull;
  void add(std::string_view bytes) {
    for (unsigned char b : bytes) {
      h ^= b;
      h *= 0x100000001B3ull;
    }
  }
  void add_ids(const std::vector<int32_t>& ids) {
    for (int32_t id : ids) add(std::string_view(reinterpret_cast<const char*>(&id), 4));
  }
  std::string hex() const { return fmt::format("{:016x}", h); }
};

std::string ids_hash(const std::vector<int32_t>& ids) {
  Fnv f;
  f.add_ids(ids);
  return f.hex();
}

TEST(PretokNames, CorpusMatchesLlamaCpp) {
  const json& g = goldens();
  ASSERT_TRUE(g.contains("names"));
  std::vector<std::pair<std::string, std::string>> corpus;  // name, text
  for (const json& c : g["corpus"]) corpus.emplace_back(c["name"], c["text"]);
  for (const auto& [name, want] : g["names"].items()) {
    SCOPED_TRACE(name);
    const std::string base = want["base"];
    const auto tok = retagged(base, name, want.value("set", json::object()));
    ASSERT_NE(tok, nullptr) << "cannot read " << base << " in " << test::refdata_dir()
                            << "; run scripts/fetch-refdata.sh";
    const json& off = want["off"];
    ASSERT_EQ(off.size(), corpus.size());
    size_t n_ok = 0, n_failed = 0;
    Fnv on, detok;
    for (size_t i = 0; i < corpus.size(); ++i) {
      const std::string& text = corpus[i].second;
      const auto ids = tok->encode(text, false, false);
      const bool ok = ids_hash(ids) == off[i][0].get<std::string>() && ids.size() == off[i][1];
      n_ok += ok;
      if (!ok && n_failed++ < 3)
        ADD_FAILURE() << name << " (on " << base << "), corpus entry " << corpus[i].first
                      << ": kvlm gives " << ids.size() << " ids ["
                      << fmt::format("{}", fmt::join(ids, " ")) << "], llama.cpp " << off[i][1]
                      << " (see tools/gen_pretok_goldens.py --show " << name << " "
                      << corpus[i].first << ")";
      on.add_ids(tok->encode(text, true, true));
      detok.add(tok->decode(ids, true));
      detok.add(std::string_view("\0", 1));
    }
    EXPECT_EQ(on.hex(), want["on"].get<std::string>()) << "with add_special and parse_special";
    EXPECT_EQ(detok.hex(), want["detok"].get<std::string>()) << "decoded texts differ";
    std::printf("%-26s on %-10s encode %3zu / %3zu\n", name.c_str(), base.c_str(), n_ok,
                corpus.size());
  }
}

// The names llama.cpp knows that kvlm does not implement stay refused, naming the key and value.
TEST(PretokNames, UnimplementedNamesAreRefused) {
  const std::string base =
      read_file(fmt::format("{}/ggml-vocab-llama-bpe.gguf", test::refdata_dir()));
  ASSERT_FALSE(base.empty()) << "run scripts/fetch-refdata.sh";
  for (std::string_view name : {"whitespace", "no-such"}) {
    const std::string image = retag(base, "tokenizer.ggml.pre", name);
    const auto file = GgufFile::from_memory(reinterpret_cast<const uint8_t*>(image.data()),
                                            image.size(), "retagged");
    try {
      Tokenizer::from_gguf(*file);
      ADD_FAILURE() << name << " was accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(fmt::format("tokenizer.ggml.pre is '{}'", name)),
                std::string::npos)
          << e.what();
    }
  }
}

}  // namespace
}  // namespace kvlm
