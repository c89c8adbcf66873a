// GGUF reader tests: files crafted in memory by a small writer below (every value type, nested
// arrays, alignment, tensor data), a table of corrupt files that must each be rejected with a
// one-line kvlm::Error, every truncation and random byte flips of a valid file (never a crash;
// run these under ASan), the same errors through open() on disk, and the real default model.
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>

#include "base/error.h"
#include "gguf/gguf.h"
#include "test_util.h"

namespace kvlm {
namespace {

// ---- a GGUF writer for tests ------------------------------------------------------------------

// Little-endian byte sink.
struct Bytes {
  std::vector<uint8_t> b;

  template <class T>
  Bytes& put(T v) {
    uint8_t tmp[sizeof(T)];
    std::memcpy(tmp, &v, sizeof(T));
    b.insert(b.end(), tmp, tmp + sizeof(T));
    return *this;
  }
  Bytes& type(GgufType t) { return put(static_cast<uint32_t>(t)); }
  Bytes& str(std::string_view s) {
    put<uint64_t>(s.size());
    b.insert(b.end(), s.begin(), s.end());
    return *this;
  }
};

struct TensorSpec {
  std::string name;
  std::vector<uint64_t> ne;        // written as given; n_dims = ne.size()
  uint32_t type = 0;               // GGML type id (0 = f32)
  std::optional<uint64_t> offset;  // default: after the previous tensor, aligned
};

struct GgufBuilder {
  std::string magic = "GGUF";
  uint32_t version = 3;
  std::optional<uint64_t> tensor_count;  // override the header's counts
  std::optional<uint64_t> kv_count;
  uint64_t alignment = 32;  // used for padding and default offsets; set general.alignment too
  Bytes kvs;
  uint64_t n_kv = 0;
  std::vector<TensorSpec> tensors;
  std::optional<uint64_t> data_size;  // override the data section's size

  // Starts a key-value pair; the caller writes the value into the returned sink.
  Bytes& kv(std::string_view key, GgufType t) {
    ++n_kv;
    return kvs.str(key).type(t);
  }
  void kv_str(std::string_view key, std::string_view v) { kv(key, GgufType::STRING).str(v); }
  void kv_u32(std::string_view key, uint32_t v) { kv(key, GgufType::UINT32).put(v); }
  void tensor(std::string name, std::vector<uint64_t> ne, uint32_t type = 0,
              std::optional<uint64_t> offset = std::nullopt) {
    tensors.push_back({std::move(name), std::move(ne), type, offset});
  }

  // Exact bytes of a tensor, or 0 when the spec is one the reader must reject anyway.
  static uint64_t tensor_bytes(const TensorSpec& t) {
    const DTypeInfo* dt = dtype_info(t.type);
    if (!dt || t.ne.empty()) return 0;
    uint64_t n = 1;
    for (uint64_t x : t.ne)
      if (!checked_mul(n, x, &n)) return 0;
    uint64_t bytes = 0;
    if (!checked_mul(n / dt->block_size, dt->type_size, &bytes)) return 0;
    return bytes;
  }

  std::vector<uint8_t> build() const {
    Bytes out;
    out.b.insert(out.b.end(), magic.begin(), magic.end());
    out.put(version);
    out.put<uint64_t>(tensor_count.value_or(tensors.size()));
    out.put<uint64_t>(kv_count.value_or(n_kv));
    out.b.insert(out.b.end(), kvs.b.begin(), kvs.b.end());
    uint64_t cursor = 0;
    uint64_t data_end = 0;
    for (const TensorSpec& t : tensors) {
      uint64_t offset = t.offset.value_or((cursor + alignment - 1) / alignment * alignment);
      cursor = offset + tensor_bytes(t);
      data_end = std::max(data_end, cursor);
      out.str(t.name).put(static_cast<uint32_t>(t.ne.size()));
      for (uint64_t x : t.ne) out.put(x);
      out.put(t.type).put(offset);
    }
    if (!tensors.empty()) {
      while (out.b.size() % alignment) out.b.push_back(0);
      uint64_t n = data_size.value_or(data_end);
      for (uint64_t k = 0; k < n; ++k) out.b.push_back(pattern(k));
    }
    return out.b;
  }

  // Byte k of the data section.
  static uint8_t pattern(uint64_t k) { return static_cast<uint8_t>(k * 31 + 7); }
};

// Value of an array nested `depth` deep (depth 1 = a plain array of u8): [[[...[]...]]].
void nested_array(Bytes& out, int depth) {
  for (int d = 1; d < depth; ++d) out.type(GgufType::ARRAY).put<uint64_t>(1);
  out.type(GgufType::UINT8).put<uint64_t>(0);
}

// A file with every value type, nested arrays, a non-default alignment and four tensors.
GgufBuilder rich_file() {
  GgufBuilder g;
  g.kv_str("general.architecture", "llama");
  g.kv("v.u8", GgufType::UINT8).put<uint8_t>(200);
  g.kv("v.i8", GgufType::INT8).put<int8_t>(-100);
  g.kv("v.u16", GgufType::UINT16).put<uint16_t>(60000);
  g.kv("v.i16", GgufType::INT16).put<int16_t>(-30000);
  g.kv_u32("v.u32", 4000000000u);
  g.kv("v.i32", GgufType::INT32).put<int32_t>(-2000000000);
  g.kv("v.f32", GgufType::FLOAT32).put<float>(1.5f);
  g.kv("v.bool", GgufType::BOOL).put<uint8_t>(1);
  g.kv("v.u64", GgufType::UINT64).put<uint64_t>((1ull << 63) + 5);
  g.kv("v.u64small", GgufType::UINT64).put<uint64_t>(123456789012345ull);
  g.kv("v.i64", GgufType::INT64).put<int64_t>(-1234567890123456789ll);
  g.kv("v.f64", GgufType::FLOAT64).put<double>(-2.25);
  g.kv_str("v.str", "line one\nline two");
  g.kv_str("v.empty", "");
  g.kv("a.u8", GgufType::ARRAY)
      .type(GgufType::UINT8)
      .put<uint64_t>(3)
      .put<uint8_t>(1)
      .put<uint8_t>(2)
      .put<uint8_t>(255);
  g.kv("a.i16", GgufType::ARRAY)
      .type(GgufType::INT16)
      .put<uint64_t>(2)
      .put<int16_t>(-5)
      .put<int16_t>(7);
  g.kv("a.i32", GgufType::ARRAY)
      .type(GgufType::INT32)
      .put<uint64_t>(2)
      .put<int32_t>(-1)
      .put<int32_t>(3);
  g.kv("a.f32", GgufType::ARRAY)
      .type(GgufType::FLOAT32)
      .put<uint64_t>(2)
      .put<float>(0.5f)
      .put<float>(-8.0f);
  g.kv("a.bool", GgufType::ARRAY)
      .type(GgufType::BOOL)
      .put<uint64_t>(2)
      .put<uint8_t>(0)
      .put<uint8_t>(1);
  g.kv("a.i64", GgufType::ARRAY).type(GgufType::INT64).put<uint64_t>(1).put<int64_t>(-(1ll << 40));
  g.kv("a.f64", GgufType::ARRAY).type(GgufType::FLOAT64).put<uint64_t>(1).put<double>(3.25);
  g.kv("a.str", GgufType::ARRAY)
      .type(GgufType::STRING)
      .put<uint64_t>(3)
      .str("a")
      .str("")
      .str("ccc");
  g.kv("a.empty", GgufType::ARRAY).type(GgufType::UINT32).put<uint64_t>(0);
  // [[1, 2], ["x"], [[7]]]
  Bytes& n = g.kv("a.nested", GgufType::ARRAY).type(GgufType::ARRAY).put<uint64_t>(3);
  n.type(GgufType::UINT16).put<uint64_t>(2).put<uint16_t>(1).put<uint16_t>(2);
  n.type(GgufType::STRING).put<uint64_t>(1).str("x");
  n.type(GgufType::ARRAY).put<uint64_t>(1).type(GgufType::INT8).put<uint64_t>(1).put<int8_t>(7);
  nested_array(g.kv("a.deep", GgufType::ARRAY), 8);  // the deepest nesting accepted
  g.kv_u32("general.alignment", 64);
  g.alignment = 64;
  g.tensor("t.f32", {4, 3}, 0);        // 48 bytes
  g.tensor("t.q8_0", {64, 2}, 8);      // 2 rows x 2 blocks x 34 bytes
  g.tensor("t.q4_1", {32}, 3);         // 20 bytes
  g.tensor("t.f16", {2, 2, 2, 2}, 1);  // 32 bytes
  return g;
}

// A minimal valid file that corrupt cases start from.
GgufBuilder small_file() {
  GgufBuilder g;
  g.kv_str("general.architecture", "llama");
  g.tensor("a", {8}, 0);
  g.tensor("b", {32, 2}, 2);
  return g;
}

std::unique_ptr<GgufFile> parse(const std::vector<uint8_t>& bytes,
                                const std::string& label = "test.gguf") {
  return GgufFile::from_memory(bytes.data(), bytes.size(), label);
}

// The message of the kvlm::Error that parsing raises ("" when it parses).
std::string parse_error(const std::vector<uint8_t>& bytes, const std::string& label) {
  try {
    parse(bytes, label);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// ---- valid files ------------------------------------------------------------------------------

TEST(Gguf, ParsesEveryValueType) {
  std::vector<uint8_t> bytes = rich_file().build();
  auto f = parse(bytes);
  EXPECT_EQ(f->version(), 3u);
  EXPECT_EQ(f->alignment(), 64u);
  EXPECT_EQ(f->file_size(), bytes.size());
  EXPECT_EQ(f->metadata().size(), 27u);
  EXPECT_EQ(f->metadata()[0].first, "general.architecture");  // file order kept
  EXPECT_EQ(f->metadata()[26].first, "general.alignment");

  EXPECT_EQ(f->get_string("general.architecture"), "llama");
  EXPECT_EQ(f->get_int("v.u8"), 200);
  EXPECT_EQ(f->get_int("v.i8"), -100);
  EXPECT_EQ(f->get_int("v.u16"), 60000);
  EXPECT_EQ(f->get_int("v.i16"), -30000);
  EXPECT_EQ(f->get_int("v.u32"), 4000000000ll);
  EXPECT_EQ(f->get_int("v.i32"), -2000000000);
  EXPECT_EQ(f->get_float("v.f32"), 1.5);
  EXPECT_EQ(f->get_bool("v.bool"), true);
  EXPECT_EQ(f->find("v.u64")->u, (1ull << 63) + 5);
  EXPECT_EQ(f->get_int("v.u64small"), 123456789012345ll);
  EXPECT_EQ(f->get_int("v.i64"), -1234567890123456789ll);
  EXPECT_EQ(f->get_float("v.f64"), -2.25);
  EXPECT_EQ(f->get_float("v.i32"), -2e9);  // integers read as floats
  EXPECT_EQ(f->get_string("v.str"), "line one\nline two");
  EXPECT_EQ(f->get_string("v.empty"), "");
  EXPECT_EQ(f->get_int("general.alignment"), 64);

  EXPECT_EQ(*f->get_number_array("a.u8"), (std::vector<double>{1, 2, 255}));
  EXPECT_EQ(*f->get_number_array("a.i16"), (std::vector<double>{-5, 7}));
  EXPECT_EQ(*f->get_number_array("a.i32"), (std::vector<double>{-1, 3}));
  EXPECT_EQ(*f->get_number_array("a.f32"), (std::vector<double>{0.5, -8}));
  EXPECT_EQ(*f->get_number_array("a.bool"), (std::vector<double>{0, 1}));
  EXPECT_EQ(*f->get_number_array("a.i64"), (std::vector<double>{-1099511627776.0}));
  EXPECT_EQ(*f->get_number_array("a.f64"), (std::vector<double>{3.25}));
  EXPECT_EQ(*f->get_string_array("a.str"), (std::vector<std::string>{"a", "", "ccc"}));
  EXPECT_TRUE(f->get_number_array("a.empty")->empty());
  EXPECT_EQ(f->find("a.str")->array_size(), 3u);
  EXPECT_EQ(f->find("v.u8")->array_size(), 0u);

  const GgufValue* nested = f->find("a.nested");
  ASSERT_NE(nested, nullptr);
  EXPECT_EQ(nested->type, GgufType::ARRAY);
  EXPECT_EQ(nested->elem_type, GgufType::ARRAY);
  ASSERT_EQ(nested->array_size(), 3u);
  EXPECT_EQ(nested->arr[0].elem_type, GgufType::UINT16);
  EXPECT_EQ(nested->arr[0].arr_num, (std::vector<double>{1, 2}));
  EXPECT_EQ(nested->arr[1].arr_str, (std::vector<std::string>{"x"}));
  ASSERT_EQ(nested->arr[2].arr.size(), 1u);
  EXPECT_EQ(nested->arr[2].arr[0].arr_num, (std::vector<double>{7}));
  const GgufValue* deep = f->find("a.deep");
  for (int d = 1; d < 8; ++d) {
    ASSERT_EQ(deep->arr.size(), 1u) << d;
    deep = &deep->arr[0];
  }
  EXPECT_EQ(deep->elem_type, GgufType::UINT8);
  EXPECT_EQ(deep->array_size(), 0u);

  EXPECT_FALSE(f->get_int("absent").has_value());
  EXPECT_FALSE(f->get_string("absent").has_value());
  EXPECT_EQ(f->get_string_array("absent"), nullptr);
  EXPECT_EQ(f->find("absent"), nullptr);
}

TEST(Gguf, TensorInfosAndData) {
  std::vector<uint8_t> bytes = rich_file().build();
  auto f = parse(bytes);
  EXPECT_EQ(f->data_offset() % 64, 0u);
  ASSERT_EQ(f->tensors().size(), 4u);
  struct Want {
    const char* name;
    DType type;
    std::vector<int64_t> ne;
    uint64_t n_bytes;
  };
  const Want want[] = {{"t.f32", DType::F32, {4, 3}, 48},
                       {"t.q8_0", DType::Q8_0, {64, 2}, 136},
                       {"t.q4_1", DType::Q4_1, {32}, 20},
                       {"t.f16", DType::F16, {2, 2, 2, 2}, 32}};
  for (size_t k = 0; k < 4; ++k) {
    const GgufTensorInfo& t = f->tensors()[k];
    EXPECT_EQ(t.name, want[k].name);
    EXPECT_EQ(f->tensor(want[k].name), &t);
    EXPECT_EQ(t.type, want[k].type);
    EXPECT_EQ(t.ne, want[k].ne);
    EXPECT_EQ(t.n_bytes, want[k].n_bytes);
    uint64_t n = 1;
    for (int64_t x : t.ne) n *= static_cast<uint64_t>(x);
    EXPECT_EQ(t.n_elements, n);
    EXPECT_EQ(t.offset % 64, 0u);
    EXPECT_EQ(t.data, bytes.data() + f->data_offset() + t.offset);
    for (uint64_t b = 0; b < t.n_bytes; ++b)
      ASSERT_EQ(t.data[b], GgufBuilder::pattern(t.offset + b)) << t.name << " byte " << b;
  }
  EXPECT_EQ(f->tensor("missing"), nullptr);
  // The last tensor ends exactly at the end of the file.
  const GgufTensorInfo& last = f->tensors().back();
  EXPECT_EQ(last.data + last.n_bytes, bytes.data() + bytes.size());
}

TEST(Gguf, Version2AndNoTensors) {
  GgufBuilder g = small_file();
  g.version = 2;
  EXPECT_EQ(parse(g.build())->version(), 2u);

  GgufBuilder empty;  // header only
  auto f = parse(empty.build());
  EXPECT_TRUE(f->metadata().empty());
  EXPECT_TRUE(f->tensors().empty());
  EXPECT_EQ(f->alignment(), 32u);
}

TEST(Gguf, GettersRejectWrongTypes) {
  std::vector<uint8_t> bytes = rich_file().build();
  auto f = parse(bytes);
  auto message = [](auto&& fn) {
    try {
      fn();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  std::string m = message([&] { f->get_int("v.str"); });
  EXPECT_NE(m.find("'v.str'"), std::string::npos) << m;
  EXPECT_NE(m.find("string"), std::string::npos) << m;
  EXPECT_NE(m.find("integer"), std::string::npos) << m;
  m = message([&] { f->get_string("v.u32"); });
  EXPECT_NE(m.find("'v.u32' is uint32, expected string"), std::string::npos) << m;
  m = message([&] { f->get_bool("v.u8"); });
  EXPECT_NE(m.find("expected bool"), std::string::npos) << m;
  m = message([&] { f->get_float("a.f32"); });
  EXPECT_NE(m.find("array of float32"), std::string::npos) << m;
  m = message([&] { f->get_string_array("a.u8"); });
  EXPECT_NE(m.find("'a.u8' is array of uint8, expected array of string"), std::string::npos) << m;
  m = message([&] { f->get_number_array("a.str"); });
  EXPECT_NE(m.find("array of string"), std::string::npos) << m;
  m = message([&] { f->get_number_array("a.nested"); });
  EXPECT_NE(m.find("array of array"), std::string::npos) << m;
  m = message([&] { f->get_int("v.u64"); });
  EXPECT_NE(m.find("too large for int64"), std::string::npos) << m;
  m = message([&] { f->get_int("v.f32"); });
  EXPECT_NE(m.find("float32"), std::string::npos) << m;
}

TEST(Gguf, ValueConversions) {
  GgufValue v;
  v.type = GgufType::FLOAT64;
  v.f = 1e300;
  EXPECT_EQ(v.as_int(), std::numeric_limits<int64_t>::max());
  v.f = -1e300;
  EXPECT_EQ(v.as_int(), std::numeric_limits<int64_t>::min());
  v.f = std::nan("");
  EXPECT_EQ(v.as_int(), 0);
  v.f = -3.7;
  EXPECT_EQ(v.as_int(), -3);
  EXPECT_TRUE(v.is_number());
  EXPECT_FALSE(v.is_int());
  v.type = GgufType::BOOL;
  EXPECT_TRUE(v.is_int());
  v.type = GgufType::STRING;
  EXPECT_FALSE(v.is_number());
  EXPECT_STREQ(gguf_type_name(GgufType::FLOAT32), "float32");
  EXPECT_STREQ(gguf_type_name(GgufType::ARRAY), "array");
  EXPECT_STREQ(gguf_type_name(static_cast<GgufType>(77)), "unknown");
}

// ---- corrupt files ----------------------------------------------------------------------------

struct CorruptCase {
  const char* name;
  std::function<std::vector<uint8_t>()> make;
  std::vector<const char*> expect;  // substrings of the message
};

std::vector<uint8_t> cut(std::vector<uint8_t> b, size_t n) {
  b.resize(n);
  return b;
}

// A file whose only content after the header is `value` under key "k".
std::vector<uint8_t> one_kv(GgufType t, const std::function<void(Bytes&)>& value) {
  GgufBuilder g;
  value(g.kv("k", t));
  return g.build();
}

GgufBuilder with_tensor(std::vector<uint64_t> ne, uint32_t type = 0,
                        std::optional<uint64_t> offset = std::nullopt) {
  GgufBuilder g;
  g.tensor("w", std::move(ne), type, offset);
  return g;
}

const std::vector<CorruptCase>& corrupt_cases() {
  static const std::vector<CorruptCase> cases = {
      {"bad_magic",
       [] {
         GgufBuilder g = small_file();
         g.magic = "GGML";
         return g.build();
       },
       {"not a GGUF file", "magic", "at byte 0"}},
      {"version_1",
       [] {
         GgufBuilder g = small_file();
         g.version = 1;
         return g.build();
       },
       {"unsupported GGUF version 1", "at byte 4"}},
      {"version_4",
       [] {
         GgufBuilder g = small_file();
         g.version = 4;
         return g.build();
       },
       {"unsupported GGUF version 4"}},
      {"big_endian",
       [] {
         GgufBuilder g = small_file();
         g.version = 0x03000000;
         return g.build();
       },
       {"big-endian"}},
      {"truncated_magic", [] { return cut(small_file().build(), 2); }, {"truncated", "magic"}},
      {"truncated_header",
       [] { return cut(small_file().build(), 12); },
       {"truncated", "tensor_count", "at byte 8"}},
      {"truncated_metadata",
       [] {
         // Cut inside the value's length (bytes 56..63); a file with tensors would instead fail
         // the header's "counts cannot fit" check.
         GgufBuilder g;
         g.kv_str("general.architecture", "llama");
         return cut(g.build(), 60);
       },
       {"truncated", "metadata key 'general.architecture'"}},
      {"truncated_tensor_data",
       [] {
         std::vector<uint8_t> b = small_file().build();
         return cut(b, b.size() - 1);
       },
       {"tensor 'b' data ends at byte", "past the end of the file"}},
      {"string_past_end",
       [] { return one_kv(GgufType::STRING, [](Bytes& b) { b.put<uint64_t>(1000).put('x'); }); },
       {"string length 1000 runs past the end", "metadata key 'k'"}},
      {"huge_string_length",
       [] { return one_kv(GgufType::STRING, [](Bytes& b) { b.put<uint64_t>(1ull << 63); }); },
       {"string length 9223372036854775808"}},
      {"huge_key_length",
       [] {
         GgufBuilder g;
         g.kv_count = 1;
         g.kvs.put<uint64_t>(~0ull).put<uint64_t>(0);
         return g.build();
       },
       {"string length 18446744073709551615", "key"}},
      {"absurd_tensor_count",
       [] {
         GgufBuilder g = small_file();
         g.tensor_count = 1ull << 62;
         return g.build();
       },
       {"4611686018427387904 tensor infos", "tensor_count", "at byte 8"}},
      {"absurd_kv_count",
       [] {
         GgufBuilder g = small_file();
         g.kv_count = 1ull << 62;
         return g.build();
       },
       {"4611686018427387904 metadata entries", "metadata_kv_count", "at byte 16"}},
      {"absurd_array_count",
       [] {
         return one_kv(GgufType::ARRAY,
                       [](Bytes& b) { b.type(GgufType::UINT32).put<uint64_t>(1ull << 62); });
       },
       {"array of 4611686018427387904 uint32 elements cannot fit", "array count"}},
      {"absurd_string_array_count",
       [] {
         return one_kv(GgufType::ARRAY,
                       [](Bytes& b) { b.type(GgufType::STRING).put<uint64_t>(1000).str("a"); });
       },
       {"array of 1000 string elements cannot fit"}},
      {"dimension_product_overflows_u64",
       [] {
         return with_tensor({1ull << 32, 1ull << 32, 2}).build();
       },
       {"element count overflows", "ne[1]", "tensor info 0 'w'"}},
      {"element_count_past_int64",
       [] {
         return with_tensor({1ull << 32, 1ull << 31}).build();
       },
       {"element count overflows int64", "ne[1]"}},
      {"dimension_past_int64",
       [] { return with_tensor({1ull << 63}).build(); },
       {"element count overflows int64", "ne[0]"}},
      {"dimension_zero",
       [] {
         return with_tensor({4, 0}).build();
       },
       {"dimension 1 is 0", "ne[1]"}},
      {"n_dims_0", [] { return with_tensor({}).build(); }, {"n_dims is 0"}},
      {"n_dims_5",
       [] {
         return with_tensor({1, 1, 1, 1, 1}).build();
       },
       {"n_dims is 5"}},
      {"unknown_tensor_type",
       [] { return with_tensor({8}, 99).build(); },
       {"unknown tensor type id 99", "tensor info 0 'w'"}},
      {"not_a_whole_block",
       [] { return with_tensor({16}, 2).build(); },
       {"ne[0] = 16 is not a multiple of the q4_0 block size (32)"}},
      {"offset_past_end",
       [] {
         GgufBuilder g = with_tensor({8}, 0, 1 << 20);
         g.data_size = 64;
         return g.build();
       },
       {"tensor 'w' data ends at byte", "past the end of the file"}},
      {"offset_overflows",
       [] {
         GgufBuilder g = with_tensor({8}, 0, ~0ull - 31);
         g.data_size = 64;
         return g.build();
       },
       {"tensor 'w'", "overflows"}},
      {"misaligned_offset",
       [] {
         GgufBuilder g = with_tensor({8}, 0, 16);
         g.data_size = 64;
         return g.build();
       },
       {"data offset 16 is not a multiple of the alignment (32)", "offset"}},
      {"overlapping_tensors",
       [] {
         GgufBuilder g;
         g.tensor("first", {16}, 0, 0);  // bytes 0..64
         g.tensor("second", {16}, 0, 32);
         return g.build();
       },
       {"'first'", "'second'", "overlap"}},
      {"duplicate_tensor_names",
       [] {
         GgufBuilder g;
         g.tensor("same", {8});
         g.tensor("same", {8});
         return g.build();
       },
       {"duplicate tensor name", "tensor info 1 'same'"}},
      {"duplicate_keys",
       [] {
         GgufBuilder g;
         g.kv_u32("dup.key", 1);
         g.kv_u32("dup.key", 2);
         return g.build();
       },
       {"duplicate metadata key", "'dup.key'", "at byte 47"}},
      {"alignment_0",
       [] {
         GgufBuilder g = small_file();
         g.kv_u32("general.alignment", 0);
         return g.build();
       },
       {"general.alignment is 0, expected a power of two"}},
      {"alignment_3",
       [] {
         GgufBuilder g = small_file();
         g.kv_u32("general.alignment", 3);
         return g.build();
       },
       {"general.alignment is 3, expected a power of two"}},
      {"alignment_wrong_type",
       [] {
         GgufBuilder g = small_file();
         g.kv("general.alignment", GgufType::UINT64).put<uint64_t>(32);
         return g.build();
       },
       {"general.alignment is uint64, expected uint32"}},
      {"unknown_value_type",
       [] { return one_kv(static_cast<GgufType>(13), [](Bytes& b) { b.put<uint32_t>(0); }); },
       {"unknown metadata value type 13", "value type", "at byte 33"}},
      {"unknown_array_element_type",
       [] {
         return one_kv(GgufType::ARRAY,
                       [](Bytes& b) { b.put<uint32_t>(0xffffffff).put<uint64_t>(0); });
       },
       {"unknown metadata value type 4294967295", "array element type"}},
      {"arrays_nested_too_deep",
       [] { return one_kv(GgufType::ARRAY, [](Bytes& b) { nested_array(b, 9); }); },
       {"nested more than 8 deep"}},
      {"arrays_nested_very_deep",
       [] { return one_kv(GgufType::ARRAY, [](Bytes& b) { nested_array(b, 100000); }); },
       {"nested more than 8 deep"}},
      {"bool_not_0_or_1",
       [] { return one_kv(GgufType::BOOL, [](Bytes& b) { b.put<uint8_t>(2); }); },
       {"bool value is 2"}},
      {"bool_array_not_0_or_1",
       [] {
         return one_kv(GgufType::ARRAY, [](Bytes& b) {
           b.type(GgufType::BOOL).put<uint64_t>(3).put<uint8_t>(1).put<uint8_t>(0).put<uint8_t>(9);
         });
       },
       {"bool value is 9", "array element 2"}},
      {"key_with_newline",  // file text in a message is escaped, keeping it one line
       [] {
         GgufBuilder g;
         g.kv_u32("bad\nkey", 1);
         g.kv_u32("bad\nkey", 1);
         return g.build();
       },
       {"'bad\\x0akey'"}},
  };
  return cases;
}

void expect_one_line(const std::string& msg, const std::string& label) {
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  EXPECT_EQ(msg.rfind(label + ": ", 0), 0u) << msg;
  EXPECT_NE(msg.find("byte"), std::string::npos) << msg;
}

TEST(Gguf, CorruptFilesAreRejected) {
  for (const CorruptCase& c : corrupt_cases()) {
    SCOPED_TRACE(c.name);
    std::string label = std::string(c.name) + ".gguf";
    std::string msg = parse_error(c.make(), label);
    ASSERT_FALSE(msg.empty()) << "parsed without error";
    expect_one_line(msg, label);
    for (const char* want : c.expect) EXPECT_NE(msg.find(want), std::string::npos) << msg;
  }
}

TEST(Gguf, EveryTruncationIsAnError) {
  const std::vector<uint8_t> full = rich_file().build();
  ASSERT_NO_THROW(parse(full));
  for (size_t n = 0; n < full.size(); ++n) {
    // An exact-size copy, so ASan reports any read past the end.
    std::vector<uint8_t> prefix(full.begin(), full.begin() + static_cast<ptrdiff_t>(n));
    std::string msg = parse_error(prefix, "cut.gguf");
    ASSERT_FALSE(msg.empty()) << "a prefix of " << n << " bytes parsed";
    expect_one_line(msg, "cut.gguf");
  }
}

TEST(Gguf, RandomByteFlipsNeverCrash) {
  const std::vector<uint8_t> full = rich_file().build();
  std::mt19937_64 rng(1234);
  int n_ok = 0;
  for (int iter = 0; iter < 20000; ++iter) {
    std::vector<uint8_t> b = full;
    int n_flips = 1 + static_cast<int>(rng() % 4);
    for (int k = 0; k < n_flips; ++k) {
      // Mostly the metadata and infos (where the structure is), sometimes anywhere.
      size_t at = rng() % (iter % 4 ? std::min<size_t>(b.size(), 700) : b.size());
      b[at] = static_cast<uint8_t>(rng());
    }
    try {
      parse(b, "flip.gguf");
      ++n_ok;
    } catch (const Error& e) {
      expect_one_line(e.what(), "flip.gguf");
    }
  }
  EXPECT_GT(n_ok, 0);  // flips inside string bytes or data still parse
}

// ---- files on disk ----------------------------------------------------------------------------

class GgufDisk : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ =
        std::filesystem::temp_directory_path() / ("kvlm_test_gguf_" + std::to_string(::getpid()));
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::string write(const std::string& name, const std::vector<uint8_t>& bytes) {
    std::string path = (dir_ / name).string();
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()),
              static_cast<std::streamsize>(bytes.size()));
    return path;
  }
  static std::string open_error(const std::string& path) {
    try {
      GgufFile::open(path);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  }

  std::filesystem::path dir_;
};

TEST_F(GgufDisk, OpensValidFile) {
  std::vector<uint8_t> bytes = rich_file().build();
  std::string path = write("rich.gguf", bytes);
  auto f = GgufFile::open(path);
  EXPECT_EQ(f->path(), path);
  EXPECT_EQ(f->file_size(), bytes.size());
  EXPECT_EQ(f->get_string("v.str"), "line one\nline two");
  const GgufTensorInfo* t = f->tensor("t.q8_0");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(std::memcmp(t->data, bytes.data() + f->data_offset() + t->offset, t->n_bytes), 0);
}

// release_pages drops the whole pages of a range from resident memory, and the bytes read back
// the same (from the file); ranges outside the mapping and in-memory images are left alone.
TEST_F(GgufDisk, ReleasedPagesLeaveMemoryAndReadBackTheSame) {
  GgufBuilder g;
  g.tensor("big", {64 * 1024}, 0);  // 256 KiB of f32
  const std::vector<uint8_t> bytes = g.build();
  auto f = GgufFile::open(write("big.gguf", bytes));
  const GgufTensorInfo* t = f->tensor("big");
  ASSERT_NE(t, nullptr);
  const uint8_t* src = bytes.data() + f->data_offset() + t->offset;
  ASSERT_EQ(std::memcmp(t->data, src, t->n_bytes), 0);  // every page touched
  const long before = test::smaps_kb(t->data, "Rss");
  ASSERT_GE(before, 256);
  f->release_pages(t->data - 4096, 16);          // outside the mapping: nothing
  f->release_pages(t->data, f->file_size() * 2);  // runs past the end: nothing
  EXPECT_GE(test::smaps_kb(t->data, "Rss"), before);
  f->release_pages(t->data, t->n_bytes);
  const long after = test::smaps_kb(t->data, "Rss");
  EXPECT_LE(after, before - 248) << "before " << before << " kB, after " << after << " kB";
  EXPECT_EQ(std::memcmp(t->data, src, t->n_bytes), 0);  // read again from the file
  auto m = GgufFile::from_memory(bytes.data(), bytes.size(), "mem");
  m->release_pages(m->tensor("big")->data, t->n_bytes);  // no mapping: a no-op
  EXPECT_EQ(std::memcmp(m->tensor("big")->data, src, t->n_bytes), 0);
}

TEST_F(GgufDisk, SameErrorsAsFromMemory) {
  for (const CorruptCase& c : corrupt_cases()) {
    SCOPED_TRACE(c.name);
    std::vector<uint8_t> bytes = c.make();
    std::string path = write(std::string(c.name) + ".gguf", bytes);
    std::string msg = open_error(path);
    ASSERT_FALSE(msg.empty());
    if (bytes.empty())
      EXPECT_NE(msg.find("empty file"), std::string::npos) << msg;
    else
      EXPECT_EQ(msg, parse_error(bytes, path));
  }
}

TEST_F(GgufDisk, MissingEmptyAndDirectory) {
  std::string missing = (dir_ / "missing.gguf").string();
  std::string msg = open_error(missing);
  EXPECT_EQ(msg, missing + ": cannot open: No such file or directory");

  msg = open_error(dir_.string());
  EXPECT_EQ(msg.rfind(dir_.string() + ": ", 0), 0u) << msg;
  EXPECT_NE(msg.find("directory"), std::string::npos) << msg;

  std::string empty = write("empty.gguf", {});
  msg = open_error(empty);
  EXPECT_NE(msg.find("empty file"), std::string::npos) << msg;
  expect_one_line(msg, empty);
}

// ---- the real model ---------------------------------------------------------------------------

TEST(GgufModel, DefaultModel) {
  std::string path = test::model_path();
  auto t0 = std::chrono::steady_clock::now();
  auto f = GgufFile::open(path);
  double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  std::printf("parsed %s in %.1f ms\n", path.c_str(), ms);
#ifdef NDEBUG
  EXPECT_LT(ms, 1000.0);  // a 49152-token vocabulary and 48900 merges: well under a second
#endif

  EXPECT_EQ(f->version(), 3u);
  EXPECT_EQ(f->tensors().size(), 272u);
  EXPECT_EQ(f->get_string("general.architecture"), "llama");
  EXPECT_EQ(f->get_int("llama.block_count"), 30);
  const std::vector<std::string>* tokens = f->get_string_array("tokenizer.ggml.tokens");
  ASSERT_NE(tokens, nullptr);
  EXPECT_EQ(tokens->size(), 49152u);
  const std::vector<std::string>* merges = f->get_string_array("tokenizer.ggml.merges");
  ASSERT_NE(merges, nullptr);
  EXPECT_EQ(merges->size(), 48900u);

  const GgufTensorInfo* emb = f->tensor("token_embd.weight");
  ASSERT_NE(emb, nullptr);
  EXPECT_EQ(emb->type, DType::Q8_0);
  EXPECT_EQ(emb->ne, (std::vector<int64_t>{576, 49152}));
  EXPECT_EQ(emb->n_bytes, 576ull / 32 * 34 * 49152);

  // Every tensor lies inside the mapping, after the data section starts.
  const uint8_t* data_start = emb->data - emb->offset;
  const uint8_t* file_end = data_start - f->data_offset() + f->file_size();
  for (const GgufTensorInfo& t : f->tensors()) {
    EXPECT_EQ(t.offset % f->alignment(), 0u) << t.name;
    EXPECT_GE(t.data, data_start) << t.name;
    EXPECT_LE(t.data + t.n_bytes, file_end) << t.name;
  }
}

}  // namespace
}  // namespace kvlm
