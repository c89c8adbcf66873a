// GGUF reader (versions 2 and 3): mmap, metadata of every value type (nested arrays included),
// tensor infos and data offsets. Every count, length, dimension product and offset read from the
// file is checked against the file size with overflow-checked arithmetic; a bad file raises
// kvlm::Error with one line naming the file, the field and the byte offset.
//
// Parse only: this module knows sizes of tensor types (from tensor/dtype.h), not what a tensor
// means.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "tensor/dtype.h"

namespace kvlm {

enum class GgufType : uint32_t {
  UINT8 = 0,
  INT8 = 1,
  UINT16 = 2,
  INT16 = 3,
  UINT32 = 4,
  INT32 = 5,
  FLOAT32 = 6,
  BOOL = 7,
  STRING = 8,
  ARRAY = 9,
  UINT64 = 10,
  INT64 = 11,
  FLOAT64 = 12,
};
const char* gguf_type_name(GgufType t);

// One metadata value. Scalars are widened into i/u/f; arrays hold their elements (which may be
// arrays themselves).
struct GgufValue {
  GgufType type = GgufType::UINT8;
  GgufType elem_type = GgufType::UINT8;  // for ARRAY
  int64_t i = 0;                         // INT8..INT64, BOOL
  uint64_t u = 0;                        // UINT8..UINT64
  double f = 0;                          // FLOAT32, FLOAT64
  std::string s;                         // STRING
  std::vector<GgufValue> arr;            // ARRAY (non-string, non-numeric elements)
  std::vector<std::string> arr_str;      // ARRAY of STRING (kept flat: vocabularies are large)
  std::vector<double> arr_num;           // ARRAY of numbers/bools (kept flat); int64/uint64
                                         // elements beyond 2^53 lose precision here

  bool is_int() const;     // any integer type or bool
  bool is_number() const;  // integer or float
  int64_t as_int() const;  // integer (u/i) value; floats truncated
  double as_double() const;
  size_t array_size() const;  // elements of an ARRAY, 0 otherwise
};

struct GgufTensorInfo {
  std::string name;
  DType type = DType::F32;
  std::vector<int64_t> ne;  // GGML order: ne[0] is the contiguous (innermost) dimension
  uint64_t offset = 0;      // bytes, relative to the start of the data section
  uint64_t n_bytes = 0;     // exact size from type and shape
  uint64_t n_elements = 0;
  const uint8_t* data = nullptr;  // into the mapping
};

class GgufFile {
 public:
  // Maps and validates the whole file. Throws kvlm::Error (one line: "<path>: <what> at byte N").
  static std::unique_ptr<GgufFile> open(const std::string& path);
  // Same validation over an in-memory image (tests, fuzzing); `bytes` must outlive the object.
  static std::unique_ptr<GgufFile> from_memory(const uint8_t* bytes, size_t size,
                                               const std::string& label);
  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t file_size() const { return size_; }
  uint64_t data_offset() const { return data_offset_; }  // absolute start of the data section

  // Metadata in file order.
  const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return kv_; }
  const GgufValue* find(std::string_view key) const;
  // Typed getters: nullopt when absent; kvlm::Error when present with the wrong type.
  std::optional<int64_t> get_int(std::string_view key) const;
  std::optional<double> get_float(std::string_view key) const;
  std::optional<bool> get_bool(std::string_view key) const;
  std::optional<std::string> get_string(std::string_view key) const;
  // nullptr when absent; kvlm::Error when present but not an array of strings.
  const std::vector<std::string>* get_string_array(std::string_view key) const;
  // nullptr when absent; kvlm::Error when present but not a numeric array.
  const std::vector<double>* get_number_array(std::string_view key) const;

  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const GgufTensorInfo* tensor(std::string_view name) const;

  // Hands the whole pages inside [p, p + n) of the mapping back to the kernel (madvise
  // MADV_DONTNEED): they leave this process's resident memory and are read from the file again
  // if touched, with the same bytes (a read-only private mapping is never written). For data the
  // caller has copied elsewhere (the model's packed weights). No-op for in-memory images and for
  // ranges outside the mapping.
  void release_pages(const void* p, size_t n) const;

 private:
  GgufFile() = default;
  void parse();

  std::string path_;
  const uint8_t* base_ = nullptr;
  uint64_t size_ = 0;
  void* map_ = nullptr;  // non-null when we own an mmap
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  std::vector<std::pair<std::string, GgufValue>> kv_;
  std::unordered_map<std::string, size_t> kv_index_;
  std::vector<GgufTensorInfo> tensors_;
  std::unordered_map<std::string, size_t> tensor_index_;
};

}  // namespace kvlm
