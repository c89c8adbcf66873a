// Model loading: metadata -> ModelConfig, tensors -> validated TensorViews into the mapping.
#include "model/model.h"

#include <fmt/format.h>

#include <cmath>

#include "base/error.h"
#include "kernels/ops.h"

namespace kvlm {

namespace {

int32_t require_int(const GgufFile& f, const std::string& key, int64_t lo, int64_t hi) {
  auto v = f.get_int(key);
  if (!v) fail("{}: missing metadata key '{}'", f.path(), key);
  if (*v < lo || *v > hi) fail("{}: metadata '{}' = {} is out of range [{}, {}]", f.path(), key, *v, lo, hi);
  return static_cast<int32_t>(*v);
}

// "f32, f16, q4_0, ...": the weight types kvlm has kernels for, for error messages.
std::string compute_type_names() {
  std::vector<const char*> names;
  for (const DTypeInfo& i : dtype_infos())
    if (i.compute) names.push_back(i.name);
  return fmt::format("{}", fmt::join(names, ", "));
}

std::string shape_str(const std::vector<int64_t>& ne) {
  return fmt::format("[{}]", fmt::join(ne, ", "));
}

// Sliding-window attention (Mistral, Gemma 3): <arch>.attention.sliding_window W applies to every
// layer, or, with <arch>.attention.sliding_window_pattern N, to every layer but each N-th: layer
// il is windowed iff il % N < N - 1 (llama.cpp's reading; Gemma 3: N = 6, layers 5, 11, 17 attend
// to everything). Refused, naming the key: W outside [1, context_length], a pattern without a
// window, N outside [1, block_count].
void read_layer_windows(const GgufFile& f, const std::string& a, ModelConfig& c) {
  c.layer_window.assign(static_cast<size_t>(c.n_layer), 0);
  if (!c.arch->swa_keys) return;
  const std::string wk = a + "attention.sliding_window", pk = a + "attention.sliding_window_pattern";
  if (!f.find(wk)) {
    if (f.find(pk)) fail("{}: '{}' is set but '{}' is missing", f.path(), pk, wk);
    return;
  }
  const int32_t w = require_int(f, wk, 1, c.n_ctx_train);
  // Without the key, the architecture's pattern (0: every layer); one longer than the model
  // windows every layer, as llama.cpp's does.
  const int32_t dflt = c.arch->swa_pattern <= c.n_layer ? c.arch->swa_pattern : 0;
  const int32_t n = f.find(pk) ? require_int(f, pk, 1, c.n_layer) : dflt;
  c.layer_window = kv_layer_windows(c.n_layer, w, n);
}

// Head size: <arch>.attention.key_length when present (Gemma 3 270M: 256 with n_embd 640 and 4
// heads), else n_embd / n_head. kvlm's cache holds K and V rows of one head size, so a different
// value_length is refused.
void read_head_dim(const GgufFile& f, const std::string& a, ModelConfig& c) {
  const std::string kk = a + "attention.key_length", vk = a + "attention.value_length";
  if (f.find(kk)) {
    c.head_dim = require_int(f, kk, 1, 1 << 16);
  } else {
    if (c.n_embd % c.n_head != 0)
      fail("{}: embedding_length {} is not a multiple of head_count {}", f.path(), c.n_embd,
           c.n_head);
    c.head_dim = c.n_embd / c.n_head;
  }
  if (f.find(vk) && require_int(f, vk, 1, 1 << 16) != c.head_dim)
    fail("{}: '{}' = {} differs from the head size {}; kvlm needs them equal", f.path(), vk,
         *f.get_int(vk), c.head_dim);
}

class TensorBinder {
 public:
  explicit TensorBinder(const GgufFile& f) : f_(f) {}

  // A weight with GGML shape ne (ne[0] contiguous). Throws if missing (unless optional), of the
  // wrong shape, or of a type kvlm has no kernels for.
  TensorView get(const std::string& name, std::vector<int64_t> ne, bool optional = false) {
    const GgufTensorInfo* t = f_.tensor(name);
    if (!t) {
      if (optional) return {};
      fail("{}: missing tensor '{}'", f_.path(), name);
    }
    if (t->ne != ne)
      fail("{}: tensor '{}' has shape {}, expected {}", f_.path(), name, shape_str(t->ne), shape_str(ne));
    const DTypeInfo& info = dtype_info(t->type);
    if (!info.compute)
      fail("{}: tensor '{}' has type {}, which kvlm cannot compute with yet (it can: {})", f_.path(),
           name, info.name, compute_type_names());
    TensorView v;
    v.dtype = t->type;
    v.data = t->data;
    v.n_cols = ne[0];
    v.n_rows = ne.size() > 1 ? ne[1] : 1;
    v.row_stride = row_bytes(t->type, v.n_cols);
    return v;
  }
  // Norm weights and biases are used as plain float arrays.
  TensorView get_f32(const std::string& name, int64_t n, bool optional = false) {
    TensorView v = get(name, {n}, optional);
    if (!v.empty() && v.dtype != DType::F32)
      fail("{}: tensor '{}' has type {}, expected f32", f_.path(), name, dtype_name(v.dtype));
    return v;
  }

 private:
  const GgufFile& f_;
};

// Rows [r0, r0 + n) of matrix t: a view into the same mapping (fused tensors are split at load,
// so the forward pass sees separate Q, K, V and gate, up matrices and packs each on its own).
TensorView row_range(const TensorView& t, int64_t r0, int64_t n) {
  TensorView v = t;
  v.data = t.row(r0);
  v.n_rows = n;
  return v;
}

// Elements [i0, i0 + n) of an f32 vector (a fused bias).
TensorView f32_range(const TensorView& t, int64_t i0, int64_t n) {
  if (t.empty()) return t;
  TensorView v = t;
  v.data = t.f32() + i0;
  v.n_cols = n;
  v.row_stride = static_cast<size_t>(n) * sizeof(float);
  return v;
}

// A float metadata key that must be finite and at least lo when present, else dflt.
double read_float_at_least(const GgufFile& f, const std::string& key, double dflt, double lo) {
  const double v = f.get_float(key).value_or(dflt);
  if (!std::isfinite(v) || v < lo)
    fail("{}: '{}' = {} is not a number >= {}", f.path(), key, v, lo);
  return v;
}

// RoPE scaling as llama.cpp reads it for these architectures: .rope.scaling.type (default
// linear) with .rope.scaling.factor F (or the old .rope.scale_linear): linear: every frequency
// times 1 / F; yarn: the interpolated pairs only, the ramp's ends from .yarn_beta_fast / _slow
// (32, 1) over .rope.scaling.original_context_length, and rotated values times 1 + 0.1 ln F;
// longrope: LongRoPE's factor tensors (read_rope_factors); none: nothing. Any type multiplies
// rotated values by .rope.scaling.attn_factor (1). YaRN keys whose meaning llama.cpp's own use
// changes per architecture (ext_factor, attn_factor, log_multiplier) are refused.
void read_rope_scaling(const GgufFile& f, const std::string& a, ModelConfig& c) {
  const std::string tk = a + "rope.scaling.type";
  c.rope_scaling = f.find(tk) ? f.get_string(tk).value_or("?") : "linear";
  const std::string& type = c.rope_scaling;
  if (type != "none" && type != "linear" && type != "yarn" && type != "longrope")
    fail("{}: '{}' = '{}' is not supported (kvlm runs none, linear, yarn and longrope)", f.path(),
         tk, type);
  double factor = read_float_at_least(f, a + "rope.scaling.factor", 0.0, 0.0);
  if (factor == 0.0) factor = read_float_at_least(f, a + "rope.scale_linear", 0.0, 0.0);
  const bool scaled = (type == "linear" || type == "yarn") && factor > 0.0;
  c.rope_freq_scale = scaled ? static_cast<float>(1.0 / factor) : 1.0f;
  if (type == "linear" && !scaled) c.rope_scaling = "none";
  c.rope_n_ctx_orig = f.find(a + "rope.scaling.original_context_length")
                          ? require_int(f, a + "rope.scaling.original_context_length", 1, 1 << 24)
                          : c.n_ctx_train;
  c.rope_attn_factor =
      static_cast<float>(read_float_at_least(f, a + "rope.scaling.attn_factor", 1.0, 0.0));
  if (c.rope_attn_factor == 0.0f) c.rope_attn_factor = 1.0f;  // llama.cpp's "unset"
  if (type != "yarn") return;
  for (const char* k : {"yarn_ext_factor", "yarn_attn_factor", "yarn_log_multiplier"})
    if (f.find(a + "rope.scaling." + k))
      fail("{}: '{}rope.scaling.{}' is set; kvlm runs YaRN with llama.cpp's defaults for these "
           "architectures only", f.path(), a, k);
  c.rope_ext_factor = 1.0f;
  c.rope_beta_fast =
      static_cast<float>(read_float_at_least(f, a + "rope.scaling.yarn_beta_fast", 32.0, 1e-6));
  c.rope_beta_slow =
      static_cast<float>(read_float_at_least(f, a + "rope.scaling.yarn_beta_slow", 1.0, 1e-6));
  if (factor > 1.0) c.rope_attn_factor *= static_cast<float>(1.0 + 0.1 * std::log(factor));
}

// One [n_rot / 2] tensor of positive frequency factors.
std::vector<float> read_factor_tensor(const GgufFile& f, const char* name, int32_t n_rot) {
  const TensorView t = TensorBinder(f).get_f32(name, n_rot / 2);
  std::vector<float> v(t.f32(), t.f32() + n_rot / 2);
  for (float x : v)
    if (!(x > 0.0f) || !std::isfinite(x))
      fail("{}: tensor '{}' holds {}, not a positive frequency factor", f.path(), name, x);
  return v;
}

// Frequency factors as llama.cpp picks them: Llama 3's rope_freqs.weight, else LongRoPE's
// rope_factors_long.weight when the context the model will run exceeds the original one (n_ctx,
// at most n_ctx_train; 0: the training context, as llama.cpp's n_ctx 0), else
// rope_factors_short.weight.
void read_rope_factors(const GgufFile& f, int64_t n_ctx, ModelConfig& c) {
  c.rope_freq_factors.clear();
  if (f.tensor("rope_freqs.weight")) {
    c.rope_freq_factors = read_factor_tensor(f, "rope_freqs.weight", c.n_rot);
    return;
  }
  const bool has_long = f.tensor("rope_factors_long.weight") != nullptr;
  if (has_long != (f.tensor("rope_factors_short.weight") != nullptr))
    fail("{}: LongRoPE needs both 'rope_factors_long.weight' and 'rope_factors_short.weight'",
         f.path());
  if (!has_long) return;
  if (n_ctx <= 0 || n_ctx > c.n_ctx_train) n_ctx = c.n_ctx_train;
  c.rope_freq_factors = read_factor_tensor(
      f, n_ctx > c.rope_n_ctx_orig ? "rope_factors_long.weight" : "rope_factors_short.weight",
      c.n_rot);
  if (c.rope_scaling == "none") c.rope_scaling = "longrope";  // Phi-3 files carry no type
}

// RoPE as llama.cpp reads it: <arch>.rope.freq_base (10000), .rope.dimension_count (head_dim),
// the scaling keys (read_rope_scaling) and frequency factors (read_rope_factors).
void read_rope(const GgufFile& f, const std::string& a, int64_t n_ctx, ModelConfig& c) {
  c.rope_freq_base = static_cast<float>(f.get_float(a + "rope.freq_base").value_or(10000.0));
  c.n_rot = f.find(a + "rope.dimension_count")
                ? require_int(f, a + "rope.dimension_count", 2, c.head_dim)
                : c.head_dim;
  if (c.n_rot % 2 != 0) fail("{}: rope.dimension_count {} is odd", f.path(), c.n_rot);
  // An architecture with its own windowed-layer base lets <arch>.rope.freq_base_swa override
  // it, as llama.cpp does for gemma3; the others rotate every layer alike.
  c.rope_freq_base_swa =
      c.arch->swa_rope_base > 0
          ? static_cast<float>(f.get_float(a + "rope.freq_base_swa").value_or(c.arch->swa_rope_base))
          : c.rope_freq_base;
  read_rope_scaling(f, a, c);
  read_rope_factors(f, n_ctx, c);
}

// Q, K and V of layer il: attn_q/k/v, or the row ranges of a fused attn_qkv [q | k | v]; their
// biases where the file has them (required by ArchInfo::biases for a fused matrix and by
// ::qkv_bias for separate ones; optional otherwise, as in llama.cpp).
void bind_qkv(const GgufFile& f, TensorBinder& b, const ModelConfig& c, int32_t il,
              LayerWeights& l) {
  auto n = [&](const char* s) { return fmt::format("blk.{}.{}", il, s); };
  const int64_t E = c.n_embd, Q = c.q_dim(), KV = c.kv_dim();
  if (f.tensor(n("attn_qkv.weight"))) {
    const TensorView w = b.get(n("attn_qkv.weight"), {E, Q + 2 * KV});
    l.wq = row_range(w, 0, Q);
    l.wk = row_range(w, Q, KV);
    l.wv = row_range(w, Q + KV, KV);
    const TensorView bias = b.get_f32(n("attn_qkv.bias"), Q + 2 * KV, !c.arch->biases);
    l.bq = f32_range(bias, 0, Q);
    l.bk = f32_range(bias, Q, KV);
    l.bv = f32_range(bias, Q + KV, KV);
    return;
  }
  l.wq = b.get(n("attn_q.weight"), {E, Q});
  l.wk = b.get(n("attn_k.weight"), {E, KV});
  l.wv = b.get(n("attn_v.weight"), {E, KV});
  const bool opt = !c.arch->qkv_bias;
  l.bq = b.get_f32(n("attn_q.bias"), Q, opt);
  l.bk = b.get_f32(n("attn_k.bias"), KV, opt);
  l.bv = b.get_f32(n("attn_v.bias"), KV, opt);
}

// The rest of layer il's tensors, by the architecture's flags.
void bind_layer(const GgufFile& f, TensorBinder& b, const ModelConfig& c, int32_t il,
                LayerWeights& l) {
  auto n = [&](const char* s) { return fmt::format("blk.{}.{}", il, s); };
  const ArchInfo& arch = *c.arch;
  const int64_t E = c.n_embd, Q = c.q_dim(), F = c.n_ff;
  l.attn_norm = b.get_f32(n("attn_norm.weight"), E);
  l.ffn_norm = b.get_f32(n("ffn_norm.weight"), E);
  bind_qkv(f, b, c, il, l);
  if (arch.qk_norm) {
    l.q_norm = b.get_f32(n("attn_q_norm.weight"), c.head_dim);
    l.k_norm = b.get_f32(n("attn_k_norm.weight"), c.head_dim);
  }
  l.wo = b.get(n("attn_output.weight"), {Q, E});
  if (arch.fused_gate_up) {
    // llama.cpp's swiglu of the fused product: silu(first n_ff) * (second n_ff).
    const TensorView gate_up = b.get(n("ffn_up.weight"), {E, 2 * F});
    l.ffn_gate = row_range(gate_up, 0, F);
    l.ffn_up = row_range(gate_up, F, F);
  } else {
    if (arch.ffn != FfnKind::Gelu) l.ffn_gate = b.get(n("ffn_gate.weight"), {E, F});
    l.ffn_up = b.get(n("ffn_up.weight"), {E, F});
  }
  l.ffn_down = b.get(n("ffn_down.weight"), {F, E});
  if (arch.post_norms) {
    l.attn_post_norm = b.get_f32(n("post_attention_norm.weight"), E);
    l.ffn_post_norm = b.get_f32(n("post_ffw_norm.weight"), E);
  }
  if (arch.biases) {
    l.attn_norm_b = b.get_f32(n("attn_norm.bias"), E);
    l.ffn_norm_b = b.get_f32(n("ffn_norm.bias"), E);
    l.bo = b.get_f32(n("attn_output.bias"), E);
    l.ffn_up_b = b.get_f32(n("ffn_up.bias"), F);
    l.ffn_down_b = b.get_f32(n("ffn_down.bias"), E);
  }
}

}  // namespace

std::unique_ptr<Model> Model::load(const std::string& path, int64_t n_ctx) {
  std::unique_ptr<Model> m(new Model());
  m->file_ = GgufFile::open(path);
  const GgufFile& f = *m->file_;
  ModelConfig& c = m->config_;

  auto arch_name = f.get_string("general.architecture");
  if (!arch_name) fail("{}: missing metadata key 'general.architecture'", path);
  c.arch = find_arch(*arch_name);
  if (!c.arch)
    fail("{}: unsupported architecture '{}' (supported: {})", path, *arch_name, supported_archs());
  const std::string a = *arch_name + ".";
  const ArchInfo& arch = *c.arch;

  c.name = f.get_string("general.name").value_or(*arch_name);
  constexpr int64_t kMaxDim = 1 << 20;
  c.n_embd = require_int(f, a + "embedding_length", 1, kMaxDim);
  c.n_layer = require_int(f, a + "block_count", 1, 4096);
  c.n_ff = require_int(f, a + "feed_forward_length", 1, kMaxDim);
  c.n_head = require_int(f, a + "attention.head_count", 1, 4096);
  c.n_kv_head = f.find(a + "attention.head_count_kv")
                    ? require_int(f, a + "attention.head_count_kv", 1, c.n_head)
                    : c.n_head;
  c.n_ctx_train = require_int(f, a + "context_length", 1, 1 << 24);
  if (c.n_head % c.n_kv_head != 0)
    fail("{}: head_count {} is not a multiple of head_count_kv {}", path, c.n_head, c.n_kv_head);
  read_head_dim(f, a, c);
  c.attn_scale = attention_scale(arch, c.n_layer, c.n_embd, c.n_head, c.head_dim);
  if (c.n_head / c.n_kv_head > 16)
    fail("{}: {} query heads per KV head; kvlm supports at most 16", path, c.n_head / c.n_kv_head);
  auto eps = f.get_float(a + arch.eps_key);
  if (!eps) fail("{}: missing metadata key '{}{}'", path, a, arch.eps_key);
  c.norm_eps = static_cast<float>(*eps);
  if (arch.pos == PosKind::Rope) read_rope(f, a, n_ctx, c);
  // llama.cpp reads this for Gemma 3 (tanh-capped logits); kvlm has no capping, so a file that
  // asks for it is refused rather than run wrong.
  if (f.get_float(a + "final_logit_softcapping").value_or(0.0) != 0.0)
    fail("{}: '{}final_logit_softcapping' is set; kvlm does not cap logits yet", path, a);
  read_layer_windows(f, a, c);

  const GgufTensorInfo* te = f.tensor("token_embd.weight");
  if (!te) fail("{}: missing tensor 'token_embd.weight'", path);
  if (te->ne.size() != 2) fail("{}: tensor 'token_embd.weight' must be 2-D", path);
  if (te->ne[1] <= 0 || te->ne[1] > (1 << 24))
    fail("{}: vocabulary size {} out of range", path, te->ne[1]);
  c.n_vocab = static_cast<int32_t>(te->ne[1]);

  TensorBinder b(f);
  Weights& w = m->weights_;
  const int64_t E = c.n_embd, V = c.n_vocab;
  w.tok_embd = b.get("token_embd.weight", {E, V});
  if (arch.pos == PosKind::Learned) w.pos_embd = b.get("position_embd.weight", {E, c.n_ctx_train});
  w.output_norm = b.get_f32("output_norm.weight", E);
  if (arch.biases) w.output_norm_b = b.get_f32("output_norm.bias", E);
  w.output = b.get("output.weight", {E, V}, /*optional=*/true);
  c.tied_output = w.output.empty();
  if (c.tied_output) w.output = w.tok_embd;
  w.output_b = b.get_f32("output.bias", V, /*optional=*/true);

  w.layers.resize(c.n_layer);
  for (int32_t il = 0; il < c.n_layer; ++il) bind_layer(f, b, c, il, w.layers[il]);
  m->pack_matrices();
  return m;
}

void Model::pack_matrices() {
  // Not tok_embd: the embedding lookup reads rows of the mapping (a tied output head is a copy of
  // its view, packed here as the output).
  std::vector<TensorView*> views;
  auto add = [&](TensorView& v) {
    if (!v.empty() && kernels::packed_bytes(v) > 0) views.push_back(&v);
  };
  add(weights_.output);
  for (LayerWeights& l : weights_.layers)
    for (TensorView* v : {&l.wq, &l.wk, &l.wv, &l.wo, &l.ffn_gate, &l.ffn_up, &l.ffn_down})
      add(*v);
  // One arena for all of them, each matrix at a 64-byte boundary: an AlignedBuffer this large
  // sits on transparent huge pages, so decode's stream through the weights misses the TLB once
  // per 2 MiB instead of once per 4 KiB.
  std::vector<size_t> offsets;  // [views.size()]
  size_t total = 0;
  packed_bytes_ = 0;
  for (TensorView* v : views) {
    offsets.push_back(total);
    const size_t n = kernels::packed_bytes(*v);
    packed_bytes_ += n;
    total += round_up(n, AlignedBuffer::kAlign);
  }
  packed_.resize(total);
  for (size_t i = 0; i < views.size(); ++i) {
    TensorView& v = *views[i];
    uint8_t* dst = packed_.as<uint8_t>() + offsets[i];
    kernels::pack_weights_into(v, dst);
    v.packed = dst;
    // Only the embedding lookup reads mapped rows after this, so the pages of every packed
    // matrix leave resident memory (they come back from the file if anything reads them): one
    // copy of the weights stays resident, not two. That includes a tied output head, whose
    // mapped rows are the embedding table: packing read all of them, and afterwards the lookup
    // brings back one 4 KiB page per distinct token it embeds (~30 MiB less for SmolLM2).
    file_->release_pages(v.data, static_cast<size_t>(v.n_rows) * v.row_stride);
  }
}

uint64_t Model::packed_bytes() const { return packed_bytes_; }

KvShape Model::kv_shape(DType dtype_k, DType dtype_v) const {
  KvShape s;
  s.n_layer = config_.n_layer;
  s.n_kv_head = config_.n_kv_head;
  s.head_dim = config_.head_dim;
  s.dtype_k = dtype_k;
  s.dtype_v = dtype_v;
  return s;
}

KvRope kv_rope_of(const ModelConfig& c) {
  KvRope r;
  if (c.arch->pos != PosKind::Rope) return r;
  r.n_rot = c.n_rot;
  r.freq_base = c.rope_freq_base;
  r.mode = c.arch->rope_mode;
  r.freq_scale = c.rope_freq_scale;
  r.freq_factors = c.rope_freq_factors;
  r.ext_factor = c.rope_ext_factor;
  r.n_ctx_orig = c.rope_n_ctx_orig;
  r.beta_fast = c.rope_beta_fast;
  r.beta_slow = c.rope_beta_slow;
  for (int32_t il = 0; il < c.n_layer; ++il)
    if (c.rope_base(il) != c.rope_freq_base) {  // Gemma 3's windowed layers: their own base
      for (int32_t j = 0; j < c.n_layer; ++j) r.layer_freq_base.push_back(c.rope_base(j));
      break;
    }
  return r;
}

KvRope Model::kv_rope() const { return kv_rope_of(config_); }

uint64_t Model::weight_bytes() const {
  auto bytes = [](const TensorView& t) -> uint64_t {
    return t.empty() ? 0 : static_cast<uint64_t>(t.row_stride) * static_cast<uint64_t>(t.n_rows);
  };
  uint64_t total = bytes(weights_.output);  // the embedding lookup reads one row only
  for (const auto& l : weights_.layers) {
    total += bytes(l.wq) + bytes(l.wk) + bytes(l.wv) + bytes(l.wo);
    total += bytes(l.ffn_gate) + bytes(l.ffn_up) + bytes(l.ffn_down);
  }
  return total;
}

}  // namespace kvlm
