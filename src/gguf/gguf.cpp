// GGUF reader. Layout (all little-endian; strings are a u64 byte length then the bytes, no NUL):
//
//   header        magic "GGUF", u32 version, u64 tensor_count, u64 metadata_kv_count
//   metadata      metadata_kv_count x { string key, u32 value type, value }
//                 an ARRAY value is { u32 element type, u64 count, count x element }
//   tensor infos  tensor_count x { string name, u32 n_dims, u64 ne[n_dims], u32 type, u64 offset }
//   padding       to the next multiple of general.alignment (default 32)
//   data          tensor bytes; each tensor's offset is relative to the start of this section
//
// Everything here is untrusted input. The parser keeps one invariant: pos <= size. Every length or
// count is compared with the bytes left before anything is allocated for it, and every sum or
// product of file-controlled numbers goes through checked_add / checked_mul.
#include "gguf/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>

#include "base/error.h"

namespace kvlm {

static_assert(std::endian::native == std::endian::little,
              "the GGUF reader maps little-endian files directly");

namespace {

constexpr uint64_t kDefaultAlignment = 32;
constexpr int kMaxArrayDepth = 8;  // arrays of arrays: bounds recursion on hostile files
constexpr uint32_t kMaxDims = 4;

// Smallest encodings, used to reject counts that cannot fit in the bytes left before allocating.
constexpr uint64_t kMinKvBytes = 8 + 4 + 1;  // empty key, type, u8 value
constexpr uint64_t kMinTensorInfoBytes =
    8 + 4 + 8 + 4 + 8;  // empty name, n_dims, ne[0], type, offset

// Bytes per element of each value type (index = GgufType); for STRING and ARRAY the smallest
// possible element (an empty string: its length; an empty array: type + count).
constexpr uint64_t kMinValueBytes[] = {1, 1, 2, 2, 4, 4, 4, 1, 8, 4 + 8, 8, 8, 8};
constexpr uint32_t kNumValueTypes = 13;

bool is_unsigned(GgufType t) {
  return t == GgufType::UINT8 || t == GgufType::UINT16 || t == GgufType::UINT32 ||
         t == GgufType::UINT64;
}
bool is_signed_or_bool(GgufType t) {
  return t == GgufType::INT8 || t == GgufType::INT16 || t == GgufType::INT32 ||
         t == GgufType::INT64 || t == GgufType::BOOL;
}
bool is_float(GgufType t) {
  return t == GgufType::FLOAT32 || t == GgufType::FLOAT64;
}
bool is_numeric(GgufType t) {
  return is_unsigned(t) || is_signed_or_bool(t) || is_float(t);
}

// File-controlled text in a one-line message: control and non-ASCII bytes escaped, long text cut.
std::string printable(std::string_view s) {
  constexpr size_t kMax = 80;
  std::string out;
  for (size_t k = 0; k < s.size() && k < kMax; ++k) {
    auto c = static_cast<unsigned char>(s[k]);
    if (c >= 0x20 && c < 0x7f && c != '\\' && c != '\'')
      out += static_cast<char>(c);
    else
      out += fmt::format("\\x{:02x}", c);
  }
  if (s.size() > kMax) out += fmt::format("... ({} bytes)", s.size());
  return out;
}

std::string type_desc(const GgufValue& v) {
  if (v.type != GgufType::ARRAY) return gguf_type_name(v.type);
  return fmt::format("array of {}", gguf_type_name(v.elem_type));
}

// ---- byte cursor ----------------------------------------------------------------------------

class Parser {
 public:
  Parser(const uint8_t* base, uint64_t size, const std::string& label)
      : base_(base), size_(size), label_(label) {}

  uint64_t pos() const { return pos_; }
  uint64_t left() const { return size_ - pos_; }
  // What is being read, for messages: "header", "metadata key 'x'", "tensor info 3 'y'".
  void set_scope(std::string scope) { scope_ = std::move(scope); }

  // "<label>: <what> (<scope>, <field>) at byte <at>"
  [[noreturn]] void fail_at(uint64_t at, std::string_view what, std::string_view field) const {
    fail("{}: {} ({}{}{}) at byte {}", label_, what, scope_, field.empty() ? "" : ", ", field, at);
  }

  void need(uint64_t n, std::string_view field) const {
    if (n > left())
      fail_at(pos_,
              fmt::format("truncated file ({} bytes): {} bytes needed, {} left", size_, n, left()),
              field);
  }

  template <class T>
  T read(std::string_view field) {
    need(sizeof(T), field);
    T v;
    std::memcpy(&v, base_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  uint32_t u32(std::string_view field) { return read<uint32_t>(field); }
  uint64_t u64(std::string_view field) { return read<uint64_t>(field); }

  // A view into the buffer; valid as long as the buffer.
  std::string_view string(std::string_view field) {
    uint64_t start = pos_;
    uint64_t len = u64(field);
    if (len > left())
      fail_at(start,
              fmt::format("string length {} runs past the end of the file ({} bytes, {} left)", len,
                          size_, left()),
              field);
    std::string_view s(reinterpret_cast<const char*>(base_ + pos_), len);
    pos_ += len;
    return s;
  }

  // Raw pointer to n bytes at pos (already checked with need()), then skips them.
  const uint8_t* take(uint64_t n) {
    const uint8_t* p = base_ + pos_;
    pos_ += n;
    return p;
  }

 private:
  const uint8_t* base_;
  uint64_t size_;
  uint64_t pos_ = 0;
  const std::string& label_;
  std::string scope_ = "header";
};

// ---- metadata values ------------------------------------------------------------------------

GgufType read_value_type(Parser& p, std::string_view field) {
  uint64_t at = p.pos();
  uint32_t t = p.u32(field);
  if (t >= kNumValueTypes)
    p.fail_at(at, fmt::format("unknown metadata value type {} (known: 0 to 12)", t), field);
  return static_cast<GgufType>(t);
}

bool read_bool(Parser& p, std::string_view field) {
  uint64_t at = p.pos();
  uint8_t b = p.read<uint8_t>(field);
  if (b > 1) p.fail_at(at, fmt::format("bool value is {}, expected 0 or 1", b), field);
  return b != 0;
}

// One scalar (not STRING / ARRAY) into v.i / v.u / v.f.
void read_scalar(Parser& p, GgufType t, GgufValue& v) {
  switch (t) {
    case GgufType::UINT8:
      v.u = p.read<uint8_t>("value");
      break;
    case GgufType::INT8:
      v.i = p.read<int8_t>("value");
      break;
    case GgufType::UINT16:
      v.u = p.read<uint16_t>("value");
      break;
    case GgufType::INT16:
      v.i = p.read<int16_t>("value");
      break;
    case GgufType::UINT32:
      v.u = p.read<uint32_t>("value");
      break;
    case GgufType::INT32:
      v.i = p.read<int32_t>("value");
      break;
    case GgufType::FLOAT32:
      v.f = p.read<float>("value");
      break;
    case GgufType::BOOL:
      v.i = read_bool(p, "value");
      break;
    case GgufType::UINT64:
      v.u = p.read<uint64_t>("value");
      break;
    case GgufType::INT64:
      v.i = p.read<int64_t>("value");
      break;
    case GgufType::FLOAT64:
      v.f = p.read<double>("value");
      break;
    case GgufType::STRING:
    case GgufType::ARRAY:
      KVLM_CHECK(false && "not a scalar");
  }
}

// count elements of a numeric type, widened to double. int64/uint64 beyond 2^53 lose precision
// (see GgufValue::arr_num); model files hold no such arrays.
template <class T>
void widen(const uint8_t* src, uint64_t count, double* dst) {
  for (uint64_t k = 0; k < count; ++k) {
    T x;
    std::memcpy(&x, src + k * sizeof(T), sizeof(T));
    dst[k] = static_cast<double>(x);
  }
}

void read_number_array(Parser& p, GgufType t, uint64_t count, std::vector<double>& out) {
  uint64_t esize = kMinValueBytes[static_cast<uint32_t>(t)];
  p.need(count * esize, "array elements");  // count * esize <= left(), checked by the caller
  uint64_t start = p.pos();
  const uint8_t* src = p.take(count * esize);
  out.resize(count);
  double* dst = out.data();
  switch (t) {
    case GgufType::UINT8:
      widen<uint8_t>(src, count, dst);
      break;
    case GgufType::INT8:
      widen<int8_t>(src, count, dst);
      break;
    case GgufType::UINT16:
      widen<uint16_t>(src, count, dst);
      break;
    case GgufType::INT16:
      widen<int16_t>(src, count, dst);
      break;
    case GgufType::UINT32:
      widen<uint32_t>(src, count, dst);
      break;
    case GgufType::INT32:
      widen<int32_t>(src, count, dst);
      break;
    case GgufType::FLOAT32:
      widen<float>(src, count, dst);
      break;
    case GgufType::UINT64:
      widen<uint64_t>(src, count, dst);
      break;
    case GgufType::INT64:
      widen<int64_t>(src, count, dst);
      break;
    case GgufType::FLOAT64:
      widen<double>(src, count, dst);
      break;
    case GgufType::BOOL:
      for (uint64_t k = 0; k < count; ++k) {
        if (src[k] > 1)
          p.fail_at(start + k, fmt::format("bool value is {}, expected 0 or 1", src[k]),
                    fmt::format("array element {}", k));
        dst[k] = src[k];
      }
      break;
    case GgufType::STRING:
    case GgufType::ARRAY:
      KVLM_CHECK(false && "not a number");
  }
}

// An ARRAY value (after its ARRAY type id). depth = 1 for an array directly under a key.
void read_array(Parser& p, int depth, GgufValue& v) {
  uint64_t at = p.pos();
  if (depth > kMaxArrayDepth)
    p.fail_at(at, fmt::format("arrays nested more than {} deep", kMaxArrayDepth),
              "array element type");
  v.type = GgufType::ARRAY;
  v.elem_type = read_value_type(p, "array element type");
  uint64_t count_at = p.pos();
  uint64_t count = p.u64("array count");
  uint64_t min_bytes = kMinValueBytes[static_cast<uint32_t>(v.elem_type)];
  if (count > p.left() / min_bytes)
    p.fail_at(count_at,
              fmt::format("array of {} {} elements cannot fit in the {} bytes left", count,
                          gguf_type_name(v.elem_type), p.left()),
              "array count");
  if (v.elem_type == GgufType::STRING) {
    v.arr_str.reserve(count);  // bounded: count * 8 <= bytes left
    for (uint64_t k = 0; k < count; ++k) v.arr_str.emplace_back(p.string("array string"));
  } else if (v.elem_type == GgufType::ARRAY) {
    // sizeof(GgufValue) is ~15x the smallest encoded array, so grow rather than trust count.
    v.arr.reserve(std::min<uint64_t>(count, 1024));
    for (uint64_t k = 0; k < count; ++k) {
      // Elements carry no type id of their own: each is { element type, count, elements }.
      v.arr.emplace_back();
      read_array(p, depth + 1, v.arr.back());
    }
  } else {
    read_number_array(p, v.elem_type, count, v.arr_num);
  }
}

}  // namespace

// ---- GgufValue ------------------------------------------------------------------------------

const char* gguf_type_name(GgufType t) {
  switch (t) {
    case GgufType::UINT8:
      return "uint8";
    case GgufType::INT8:
      return "int8";
    case GgufType::UINT16:
      return "uint16";
    case GgufType::INT16:
      return "int16";
    case GgufType::UINT32:
      return "uint32";
    case GgufType::INT32:
      return "int32";
    case GgufType::FLOAT32:
      return "float32";
    case GgufType::BOOL:
      return "bool";
    case GgufType::STRING:
      return "string";
    case GgufType::ARRAY:
      return "array";
    case GgufType::UINT64:
      return "uint64";
    case GgufType::INT64:
      return "int64";
    case GgufType::FLOAT64:
      return "float64";
  }
  return "unknown";
}

bool GgufValue::is_int() const {
  return is_unsigned(type) || is_signed_or_bool(type);
}
bool GgufValue::is_number() const {
  return is_numeric(type);
}

int64_t GgufValue::as_int() const {
  if (is_unsigned(type)) return static_cast<int64_t>(u);  // uint64 above INT64_MAX wraps
  if (is_signed_or_bool(type)) return i;
  if (is_float(type)) {
    // Saturate: converting an out-of-range double to an integer is undefined behaviour.
    if (std::isnan(f)) return 0;
    if (f >= 0x1p63) return std::numeric_limits<int64_t>::max();
    if (f < -0x1p63) return std::numeric_limits<int64_t>::min();
    return static_cast<int64_t>(f);
  }
  return 0;
}

double GgufValue::as_double() const {
  if (is_unsigned(type)) return static_cast<double>(u);
  if (is_signed_or_bool(type)) return static_cast<double>(i);
  if (is_float(type)) return f;
  return 0;
}

size_t GgufValue::array_size() const {
  if (type != GgufType::ARRAY) return 0;
  if (elem_type == GgufType::STRING) return arr_str.size();
  if (elem_type == GgufType::ARRAY) return arr.size();
  return arr_num.size();
}

// ---- opening ---------------------------------------------------------------------------------

std::unique_ptr<GgufFile> GgufFile::open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail("{}: cannot open: {}", path, std::strerror(errno));
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    fail("{}: cannot stat: {}", path, std::strerror(err));
  }
  if (S_ISDIR(st.st_mode)) {
    ::close(fd);
    fail("{}: cannot open: is a directory, expected a GGUF file", path);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail("{}: cannot open: not a regular file", path);
  }
  if (st.st_size == 0) {
    ::close(fd);
    fail("{}: empty file (0 bytes), expected a GGUF header at byte 0", path);
  }
  size_t size = static_cast<size_t>(st.st_size);
  // MAP_PRIVATE + PROT_READ: the weights are read in place; nothing is ever written back.
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  int err = errno;
  ::close(fd);  // the mapping keeps the file alive
  if (map == MAP_FAILED) fail("{}: cannot mmap {} bytes: {}", path, size, std::strerror(err));

  std::unique_ptr<GgufFile> f(new GgufFile());  // owns the mapping from here, even if parse throws
  f->path_ = path;
  f->map_ = map;
  f->base_ = static_cast<const uint8_t*>(map);
  f->size_ = size;
  f->parse();
  return f;
}

std::unique_ptr<GgufFile> GgufFile::from_memory(const uint8_t* bytes, size_t size,
                                                const std::string& label) {
  // Precondition: bytes points at size readable bytes (may be null only when size is 0).
  static const uint8_t kEmpty = 0;
  std::unique_ptr<GgufFile> f(new GgufFile());
  f->path_ = label;
  f->base_ = bytes ? bytes : &kEmpty;
  f->size_ = bytes ? size : 0;
  f->parse();
  return f;
}

GgufFile::~GgufFile() {
  if (map_) ::munmap(map_, size_);
}

void GgufFile::release_pages(const void* p, size_t n) const {
  const auto lo = reinterpret_cast<uintptr_t>(p);
  const auto base = reinterpret_cast<uintptr_t>(map_);
  if (map_ == nullptr || lo < base || n > size_ || lo - base > size_ - n) return;
  const auto page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t first = (lo + page - 1) / page * page, last = (lo + n) / page * page;
  // Advice only: a failure leaves the pages resident, which is what not calling it would do.
  if (first < last) ::madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);
}

// ---- parsing ---------------------------------------------------------------------------------

void GgufFile::parse() {
  Parser p(base_, size_, path_);

  // Header.
  p.need(4, "magic");
  if (std::memcmp(base_, "GGUF", 4) != 0)
    p.fail_at(0,
              fmt::format("not a GGUF file: starts with '{}', expected 'GGUF'",
                          printable(std::string_view(reinterpret_cast<const char*>(base_), 4))),
              "magic");
  p.u32("magic");
  version_ = p.u32("version");
  if (version_ != 2 && version_ != 3) {
    uint32_t swapped = __builtin_bswap32(version_);
    p.fail_at(
        4,
        swapped == 2 || swapped == 3
            ? fmt::format("unsupported GGUF version {} (a big-endian GGUF file?); kvlm "
                          "reads little-endian versions 2 and 3",
                          version_)
            : fmt::format("unsupported GGUF version {}; kvlm reads versions 2 and 3", version_),
        "version");
  }
  uint64_t tensor_count_at = p.pos();
  uint64_t n_tensors = p.u64("tensor_count");
  uint64_t kv_count_at = p.pos();
  uint64_t n_kv = p.u64("metadata_kv_count");
  // Both counts are bounded by the bytes left before anything is sized from them; after these
  // checks n_kv * kMinKvBytes + n_tensors * kMinTensorInfoBytes cannot overflow.
  if (n_kv > p.left() / kMinKvBytes)
    p.fail_at(kv_count_at,
              fmt::format("{} metadata entries cannot fit in the {} bytes left (each needs at "
                          "least {})",
                          n_kv, p.left(), kMinKvBytes),
              "metadata_kv_count");
  if (n_tensors > p.left() / kMinTensorInfoBytes ||
      n_kv * kMinKvBytes + n_tensors * kMinTensorInfoBytes > p.left())
    p.fail_at(tensor_count_at,
              fmt::format("{} tensor infos and {} metadata entries cannot fit in the {} bytes "
                          "left (each tensor info needs at least {} bytes)",
                          n_tensors, n_kv, p.left(), kMinTensorInfoBytes),
              "tensor_count");

  // Metadata.
  // n_kv is bounded by the file size, but a kv entry in memory is ~13x its smallest encoding:
  // cap the up-front reservation and let a (genuinely) larger table grow.
  constexpr uint64_t kMaxReserve = 4096;
  kv_.reserve(std::min(n_kv, kMaxReserve));
  kv_index_.reserve(std::min(n_kv, kMaxReserve));
  for (uint64_t k = 0; k < n_kv; ++k) {
    p.set_scope(fmt::format("metadata entry {}", k));
    uint64_t key_at = p.pos();
    std::string key(p.string("key"));
    p.set_scope(fmt::format("metadata key '{}'", printable(key)));
    if (!kv_index_.emplace(key, kv_.size()).second)
      p.fail_at(key_at, "duplicate metadata key", "key");
    uint64_t type_at = p.pos();
    GgufValue v;
    v.type = read_value_type(p, "value type");
    uint64_t value_at = p.pos();
    if (v.type == GgufType::STRING)
      v.s = p.string("value");
    else if (v.type == GgufType::ARRAY)
      read_array(p, 1, v);
    else
      read_scalar(p, v.type, v);

    if (key == "general.alignment") {
      if (v.type != GgufType::UINT32)
        p.fail_at(type_at, fmt::format("general.alignment is {}, expected uint32", type_desc(v)),
                  "value type");
      if (v.u == 0 || !std::has_single_bit(v.u))
        p.fail_at(value_at, fmt::format("general.alignment is {}, expected a power of two", v.u),
                  "value");
      alignment_ = v.u;
    }
    kv_.emplace_back(std::move(key), std::move(v));
  }

  // Tensor infos.
  tensors_.reserve(std::min(n_tensors, kMaxReserve));
  std::vector<uint64_t> offset_fields;  // [n_tensors] byte position of each info's offset field
  offset_fields.reserve(std::min(n_tensors, kMaxReserve));
  tensor_index_.reserve(std::min(n_tensors, kMaxReserve));
  for (uint64_t t = 0; t < n_tensors; ++t) {
    p.set_scope(fmt::format("tensor info {}", t));
    uint64_t name_at = p.pos();
    GgufTensorInfo info;
    info.name = std::string(p.string("name"));
    p.set_scope(fmt::format("tensor info {} '{}'", t, printable(info.name)));
    if (!tensor_index_.emplace(info.name, tensors_.size()).second)
      p.fail_at(name_at, "duplicate tensor name", "name");

    uint64_t n_dims_at = p.pos();
    uint32_t n_dims = p.u32("n_dims");
    if (n_dims == 0 || n_dims > kMaxDims)
      p.fail_at(n_dims_at, fmt::format("n_dims is {}, expected 1 to {}", n_dims, kMaxDims),
                "n_dims");
    static constexpr const char* kNeField[kMaxDims] = {"ne[0]", "ne[1]", "ne[2]", "ne[3]"};
    uint64_t n_elements = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      uint64_t ne_at = p.pos();
      uint64_t ne = p.u64(kNeField[d]);
      if (ne == 0)
        p.fail_at(ne_at, fmt::format("dimension {} is 0; every dimension must be at least 1", d),
                  kNeField[d]);
      // The element count must fit in int64 (ne[] is int64 and so are the engine's indices).
      if (!checked_mul(n_elements, ne, &n_elements) ||
          n_elements > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        p.fail_at(
            ne_at,
            fmt::format("element count overflows int64 at dimension {} (ne[{}] = {})", d, d, ne),
            kNeField[d]);
      info.ne.push_back(static_cast<int64_t>(ne));
    }
    info.n_elements = n_elements;

    uint64_t type_at = p.pos();
    uint32_t type_id = p.u32("type");
    const DTypeInfo* dt = dtype_info(type_id);
    if (!dt) p.fail_at(type_at, fmt::format("unknown tensor type id {}", type_id), "type");
    info.type = dt->type;
    auto block = static_cast<uint64_t>(dt->block_size);
    if (static_cast<uint64_t>(info.ne[0]) % block != 0)
      p.fail_at(type_at,
                fmt::format("ne[0] = {} is not a multiple of the {} block size ({})", info.ne[0],
                            dt->name, block),
                "type");
    if (!checked_mul(n_elements / block, static_cast<uint64_t>(dt->type_size), &info.n_bytes))
      p.fail_at(type_at,
                fmt::format("size in bytes of {} {} elements overflows", n_elements, dt->name),
                "type");

    uint64_t offset_at = p.pos();
    offset_fields.push_back(offset_at);
    info.offset = p.u64("offset");
    if (info.offset % alignment_ != 0)
      p.fail_at(offset_at,
                fmt::format("data offset {} is not a multiple of the alignment ({})", info.offset,
                            alignment_),
                "offset");
    tensors_.push_back(std::move(info));
  }

  // Data section: starts at the first multiple of the alignment after the infos. A file with no
  // tensors may end before it, so only tensors' extents are checked against the size.
  uint64_t infos_end = p.pos();
  uint64_t pad = (alignment_ - infos_end % alignment_) % alignment_;
  data_offset_ = infos_end + pad;  // infos_end <= size, pad < 2^32: no overflow

  // Errors about a tensor's data point at its offset field.
  auto fail_tensor = [&](size_t t, std::string_view what) {
    p.set_scope(fmt::format("tensor info {}", t));
    p.fail_at(offset_fields[t], what, "offset");
  };
  for (size_t t = 0; t < tensors_.size(); ++t) {
    GgufTensorInfo& info = tensors_[t];
    uint64_t start = 0;
    uint64_t end = 0;
    if (!checked_add(data_offset_, info.offset, &start) || !checked_add(start, info.n_bytes, &end))
      fail_tensor(t, fmt::format("tensor '{}' data at byte {} + offset {} + {} bytes overflows",
                                 printable(info.name), data_offset_, info.offset, info.n_bytes));
    if (end > size_)
      fail_tensor(t, fmt::format("tensor '{}' data ends at byte {}, past the end of the file "
                                 "({} bytes)",
                                 printable(info.name), end, size_));
    info.data = base_ + start;
  }

  // No two tensors may share bytes: sort by offset, then each must end before the next starts.
  std::vector<size_t> by_offset(tensors_.size());  // [n_tensors] tensor indices
  for (size_t t = 0; t < by_offset.size(); ++t) by_offset[t] = t;
  std::sort(by_offset.begin(), by_offset.end(),
            [&](size_t a, size_t b) { return tensors_[a].offset < tensors_[b].offset; });
  for (size_t k = 1; k < by_offset.size(); ++k) {
    const GgufTensorInfo& a = tensors_[by_offset[k - 1]];
    const GgufTensorInfo& b = tensors_[by_offset[k]];
    uint64_t a_end = data_offset_ + a.offset + a.n_bytes;  // no overflow: checked above
    if (a_end > data_offset_ + b.offset)
      fail_tensor(by_offset[k],
                  fmt::format("tensor '{}' (from byte {}) overlaps tensor '{}' (bytes {} to {})",
                              printable(b.name), data_offset_ + b.offset, printable(a.name),
                              data_offset_ + a.offset, a_end));
  }
}

// ---- lookups ---------------------------------------------------------------------------------

const GgufValue* GgufFile::find(std::string_view key) const {
  auto it = kv_index_.find(std::string(key));
  return it == kv_index_.end() ? nullptr : &kv_[it->second].second;
}

const GgufTensorInfo* GgufFile::tensor(std::string_view name) const {
  auto it = tensor_index_.find(std::string(name));
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

namespace {
[[noreturn]] void wrong_type(const std::string& path, std::string_view key, const GgufValue& v,
                             std::string_view expected) {
  fail("{}: metadata key '{}' is {}, expected {}", path, key, type_desc(v), expected);
}
}  // namespace

std::optional<int64_t> GgufFile::get_int(std::string_view key) const {
  const GgufValue* v = find(key);
  if (!v) return std::nullopt;
  if (!v->is_int()) wrong_type(path_, key, *v, "an integer");
  if (is_unsigned(v->type) && v->u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
    fail("{}: metadata key '{}' is {}, too large for int64", path_, key, v->u);
  return v->as_int();
}

std::optional<double> GgufFile::get_float(std::string_view key) const {
  const GgufValue* v = find(key);
  if (!v) return std::nullopt;
  if (!v->is_number()) wrong_type(path_, key, *v, "a number");
  return v->as_double();
}

std::optional<bool> GgufFile::get_bool(std::string_view key) const {
  const GgufValue* v = find(key);
  if (!v) return std::nullopt;
  if (v->type != GgufType::BOOL) wrong_type(path_, key, *v, "bool");
  return v->i != 0;
}

std::optional<std::string> GgufFile::get_string(std::string_view key) const {
  const GgufValue* v = find(key);
  if (!v) return std::nullopt;
  if (v->type != GgufType::STRING) wrong_type(path_, key, *v, "string");
  return v->s;
}

const std::vector<std::string>* GgufFile::get_string_array(std::string_view key) const {
  const GgufValue* v = find(key);
  if (!v) return nullptr;
  if (v->type != GgufType::ARRAY || v->elem_type != GgufType::STRING)
    wrong_type(path_, key, *v, "array of string");
  return &v->arr_str;
}

const std::vector<double>* GgufFile::get_number_array(std::string_view key) const {
  const GgufValue* v = find(key);
  if (!v) return nullptr;
  if (v->type != GgufType::ARRAY || !is_numeric(v->elem_type))
    wrong_type(path_, key, *v, "array of numbers");
  return &v->arr_num;
}

}  // namespace kvlm
