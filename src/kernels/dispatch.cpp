// Chooses the kernel variant once per process and forwards the hot entry points of ops.h to it.
// A table of function pointers read through one static: after the first call, a dispatched call
// costs one indirect call, with no CPU-feature test or getenv in per-row loops.
#include "kernels/dispatch.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "kernels/avx2/avx2.h"
#include "kernels/ops.h"
#include "kernels/ref/ref.h"

namespace kvlm::kernels {

namespace {

struct KernelTable {
  const char* name;
  void (*dequantize_row)(DType, const void*, float*, int64_t);
  void (*dequantize_rows)(DType, const void*, size_t, int64_t, float*, int64_t);
  void (*round_to_f16)(const float*, float*, int64_t);
  void (*f32_to_f16)(const float*, uint16_t*, int64_t);
  float (*dot_row)(DType, const void*, const float*, int64_t);
  void (*matmul)(const TensorView&, const float*, float*, int64_t, ThreadPool&);
  void (*matmul_multi)(const MatmulPart*, int, const float*, int64_t, ThreadPool&);
  void (*attn_chunk)(const float*, const float*, int64_t, int64_t, const float*, int64_t, float,
                     float*, float*, float*, float*);
  void (*attn_chunk_f16)(const uint16_t* const*, const uint16_t* const*, int64_t, int64_t,
                         const float*, int64_t, float, float*, float*, float*, float*);
  void (*rms_norm)(const float*, const float*, float*, int64_t, float);
  void (*layer_norm)(const float*, const float*, const float*, float*, int64_t, float);
  void (*softmax)(float*, int64_t);
  void (*swiglu)(float*, const float*, int64_t);
  void (*gelu)(float*, int64_t);
  void (*add)(float*, const float*, int64_t);
  void (*rope_rotate)(float*, int64_t, int64_t, int64_t, const double*, RopeMode);
};

// Every entry of a table comes from that variant's namespace (same order as the fields).
constexpr KernelTable kScalar = {"scalar",
                                 ref::dequantize_row,
                                 ref::dequantize_rows,
                                 ref::round_to_f16,
                                 ref::f32_to_f16,
                                 ref::dot_row,
                                 ref::matmul,
                                 ref::matmul_multi,
                                 ref::attn_chunk,
                                 ref::attn_chunk_f16,
                                 ref::rms_norm,
                                 ref::layer_norm,
                                 ref::softmax,
                                 ref::swiglu,
                                 ref::gelu,
                                 ref::add,
                                 ref::rope_rotate};
constexpr KernelTable kAvx2 = {"avx2",
                               avx2::dequantize_row,
                               avx2::dequantize_rows,
                               avx2::round_to_f16,
                               avx2::f32_to_f16,
                               avx2::dot_row,
                               avx2::matmul,
                               avx2::matmul_multi,
                               avx2::attn_chunk,
                               avx2::attn_chunk_f16,
                               avx2::rms_norm,
                               avx2::layer_norm,
                               avx2::softmax,
                               avx2::swiglu,
                               avx2::gelu,
                               avx2::add,
                               avx2::rope_rotate};

// AVX2 with other quantized-matmul kernels; everything else is AVX2's.
constexpr KernelTable with_matmul(KernelTable t, const char* name, decltype(t.matmul) matmul,
                                  decltype(t.matmul_multi) matmul_multi) {
  t.name = name;
  t.matmul = matmul;
  t.matmul_multi = matmul_multi;
  return t;
}
// The VNNI group kernels; plus the AMX-INT8 tile kernels for a pair of groups and 16 tokens.
constexpr KernelTable kAvx2Vnni =
    with_matmul(kAvx2, "avx2-vnni", avx2::matmul_vnni, avx2::matmul_multi_vnni);
constexpr KernelTable kAvx2Amx =
    with_matmul(kAvx2, "avx2-amx", avx2::matmul_amx, avx2::matmul_multi_amx);

}  // namespace

// KVLM_KERNELS: unset, "" or "auto" picks the fastest variant the CPU runs; "scalar" forces the
// reference (to compare speeds or results); "avx2" the AVX2 variant without the VNNI kernels;
// "avx2-vnni" insists on those, "avx2-amx" on those plus the AMX tile kernels. A bad value only
// warns: the choice can happen on a pool thread, where an exception would terminate the process.
// All variants give the same bits for the quantized matmul; the avx2 ones are identical
// everywhere.
const char* choose_backend(const char* env, bool avx2_ok, bool vnni_ok, bool amx_ok) {
  vnni_ok = vnni_ok && avx2_ok;
  amx_ok = amx_ok && vnni_ok;
  const char* best = amx_ok    ? kAvx2Amx.name
                     : vnni_ok ? kAvx2Vnni.name
                     : avx2_ok ? kAvx2.name
                               : kScalar.name;
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return best;
  if (std::strcmp(env, "scalar") == 0) return kScalar.name;
  const struct {
    const char* name;
    bool ok;
    const char* lacks;
  } wants[] = {{kAvx2.name, avx2_ok, "AVX2, FMA or F16C"},
               {kAvx2Vnni.name, vnni_ok, "AVX2, FMA, F16C, AVX512BW, AVX512VL or AVX512VNNI"},
               {kAvx2Amx.name, amx_ok, "AVX512VNNI, AMX-TILE or AMX-INT8 (or the OS's grant)"}};
  for (const auto& want : wants) {
    if (std::strcmp(env, want.name) != 0) continue;
    if (want.ok) return want.name;
    std::fprintf(stderr,
                 "kvlm: KVLM_KERNELS=%s, but this CPU lacks %s; using the %s kernels. Unset "
                 "KVLM_KERNELS to choose automatically.\n",
                 env, want.lacks, best);
    return best;
  }
  std::fprintf(stderr,
               "kvlm: KVLM_KERNELS='%s' is not one of auto, scalar, avx2, avx2-vnni, avx2-amx; "
               "choosing automatically (%s).\n",
               env, best);
  return best;
}

namespace {

const KernelTable& pick_table() {
  const char* name = choose_backend(std::getenv("KVLM_KERNELS"), avx2::cpu_supported(),
                                    avx2::vnni_supported(), avx2::amx_supported());
  if (std::strcmp(name, kAvx2Amx.name) == 0) return kAvx2Amx;
  if (std::strcmp(name, kAvx2Vnni.name) == 0) return kAvx2Vnni;
  return std::strcmp(name, kAvx2.name) == 0 ? kAvx2 : kScalar;
}

// The first kernel call decides for the whole process (thread-safe static initialisation).
const KernelTable& table() {
  static const KernelTable& t = pick_table();
  return t;
}

}  // namespace

const char* kernels_backend() {
  return table().name;
}

void dequantize_row(DType t, const void* src, float* dst, int64_t n) {
  table().dequantize_row(t, src, dst, n);
}

void round_to_f16(const float* x, float* y, int64_t n) {
  table().round_to_f16(x, y, n);
}

void f32_to_f16(const float* x, uint16_t* y, int64_t n) {
  table().f32_to_f16(x, y, n);
}

void dequantize_rows(DType t, const void* src, size_t src_stride, int64_t n_rows, float* dst,
                     int64_t n) {
  table().dequantize_rows(t, src, src_stride, n_rows, dst, n);
}

float dot_row(DType t, const void* row, const float* x, int64_t n) {
  return table().dot_row(t, row, x, n);
}

void matmul(const TensorView& w, const float* x, float* y, int64_t n_tok, ThreadPool& pool) {
  table().matmul(w, x, y, n_tok, pool);
}

void matmul_multi(const MatmulPart* parts, int n_parts, const float* x, int64_t n_tok,
                  ThreadPool& pool) {
  table().matmul_multi(parts, n_parts, x, n_tok, pool);
}

void attn_chunk(const float* k, const float* v, int64_t n, int64_t hd, const float* q, int64_t n_q,
                float scale, float* m, float* l, float* o, float* work) {
  table().attn_chunk(k, v, n, hd, q, n_q, scale, m, l, o, work);
}

// Not dispatched: __builtin_prefetch is a hint every target accepts (locality 2: L2 and up).
void prefetch_rows_l2(const void* const* rows, int64_t n, int64_t n_bytes) {
  for (int64_t j = 0; j < n; ++j) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(rows[j]);
    for (uintptr_t line = a & ~uintptr_t{63}; line < a + n_bytes; line += 64)
      __builtin_prefetch(reinterpret_cast<const void*>(line), 0, 2);
  }
}

void attn_chunk_f16(const uint16_t* const* k_rows, const uint16_t* const* v_rows, int64_t n,
                    int64_t hd, const float* q, int64_t n_q, float scale, float* m, float* l,
                    float* o, float* work) {
  table().attn_chunk_f16(k_rows, v_rows, n, hd, q, n_q, scale, m, l, o, work);
}

void rms_norm(const float* x, const float* w, float* y, int64_t n, float eps) {
  table().rms_norm(x, w, y, n, eps);
}

void layer_norm(const float* x, const float* w, const float* b, float* y, int64_t n, float eps) {
  table().layer_norm(x, w, b, y, n, eps);
}

void softmax(float* x, int64_t n) {
  table().softmax(x, n);
}

void swiglu(float* gate, const float* up, int64_t n) {
  table().swiglu(gate, up, n);
}

void gelu(float* x, int64_t n) {
  table().gelu(x, n);
}

void add(float* y, const float* x, int64_t n) {
  table().add(y, x, n);
}

void rope_rotate(float* x, int64_t n_head, int64_t head_dim, int64_t n_dims, const double* cs,
                 RopeMode mode) {
  table().rope_rotate(x, n_head, head_dim, n_dims, cs, mode);
}

}  // namespace kvlm::kernels
