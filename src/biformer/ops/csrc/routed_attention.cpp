// Routed attention (the token-to-token step of Bi-Level Routing Attention) as fused CPU kernels.
//
// For each image n, query region r and head h, the queries of r attend to the tokens of the regions
// topk_index[n, r, :]:  out = softmax(scale * q k^T) v  (+ add_to).  Nothing is gathered in memory: the kernels
// read the routed keys and values where they lie, and write the output where the caller wants it.
//
// Views. Every tensor argument but topk_index and lse is a 7-D view
//     (N, grid_h, grid_w, region_h, region_w, heads, d)
// with any strides and a contiguous last axis, so the same kernel reads the BRA projection's NHWC output (channel
// slices of it), the head-major layout (heads, N, R, L, d) or the region layout (N, R, L, C) without a copy.
// Region r = gy * grid_w + gx, token l = ly * region_w + lx (row-major, as the reference numbers them).
// topk_index: int64 (N, R, topk), contiguous, values in [0, R). lse: float32 (N, heads, R, L), contiguous.
//
// Numerics: inputs float32 or bfloat16, every product and sum in float32, outputs rounded once to the input dtype.
// The backward recomputes the scores from q, k and the saved log-sum-exp (no score tensor is stored) and sums
// each key's gradient over the query regions in a fixed order (no atomics): it is deterministic.
//
// Vectorisation: ATen's at::vec::Vectorized<float> (AVX-512, AVX2 or plain C++, chosen when the Python side
// compiles this file for the CPU it runs on).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#if defined(BIFORMER_AVX512_BF16)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <tuple>
#include <memory>
#include <atomic>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t VL = Vec::size();
// register blocks: query rows per block, vectors of key columns per block (QK-type products)
constexpr int MQ = 4;
constexpr int NV = VL >= 16 ? 4 : 2;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

template <typename T>
inline void load_row(const T* src, int64_t n, float* dst) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Geometry of one call and the strided views.

struct View {
  char* base = nullptr;
  int64_t stride[7] = {0, 0, 0, 0, 0, 0, 0};  // in elements
};

View make_view(const at::Tensor& t) {
  View v;
  v.base = static_cast<char*>(t.data_ptr());
  for (int i = 0; i < 7; ++i) v.stride[i] = t.stride(i);
  return v;
}

struct Geometry {
  int64_t batch, grid_w, heads, dq, dv, topk;
  int64_t q_rh, q_rw, kv_rh, kv_rw;       // region shapes of the queries and of the keys / values
  int64_t regions, q_tokens, kv_tokens;  // R, L_q, L_kv (tokens per region)
  int64_t keys;                          // topk * L_kv: the keys of one query region
  int64_t kpad, dq_pad, dv_pad;          // keys, dq, dv rounded up to whole vectors
  bool direct;                           // L_kv is a whole number of vectors: QK products run on the tiles
};

Geometry make_geometry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& topk_index) {
  Geometry g;
  g.batch = q.size(0);
  g.grid_w = q.size(2);
  g.heads = q.size(5);
  g.dq = q.size(6);
  g.dv = v.size(6);
  g.topk = topk_index.size(2);
  g.q_rh = q.size(3);
  g.q_rw = q.size(4);
  g.kv_rh = k.size(3);
  g.kv_rw = k.size(4);
  g.regions = q.size(1) * q.size(2);
  g.q_tokens = g.q_rh * g.q_rw;
  g.kv_tokens = g.kv_rh * g.kv_rw;
  g.keys = g.topk * g.kv_tokens;
  g.kpad = round_up(g.keys, VL);
  g.dq_pad = round_up(g.dq, VL);
  g.dv_pad = round_up(g.dv, VL);
  g.direct = g.kv_tokens % VL == 0;
  return g;
}

// Offsets (in elements, without the image and head terms) of every token of a view whose regions are
// region_h x region_w tokens, region-major: R * region_h * region_w entries.
std::vector<int64_t> token_offsets(const View& v, const Geometry& g, int64_t region_h, int64_t region_w) {
  const int64_t tokens = region_h * region_w;
  std::vector<int64_t> off(g.regions * tokens);
  for (int64_t r = 0; r < g.regions; ++r) {
    const int64_t gy = r / g.grid_w, gx = r % g.grid_w;
    for (int64_t l = 0; l < tokens; ++l) {
      const int64_t ly = l / region_w, lx = l % region_w;
      off[r * tokens + l] = gy * v.stride[1] + gx * v.stride[2] + ly * v.stride[3] + lx * v.stride[4];
    }
  }
  return off;
}

// The token at offsets[r_l] of image n, head h.
template <typename T>
inline T* at_token(const View& v, const std::vector<int64_t>& off, int64_t n, int64_t r_l, int64_t h) {
  return reinterpret_cast<T*>(v.base) + n * v.stride[0] + off[r_l] + h * v.stride[5];
}

// ---------------------------------------------------------------------------------------------------------------
// Scratch memory. The tiles of an image (about (qk_dim + C) floats per token) would be fresh pages at every call
// if allocated per call (a page fault per 4 KiB, which cost more than the arithmetic at BiFormer's sizes); each
// thread keeps its buffers between calls instead, up to KEEP_BYTES each (larger ones, for large images, are
// allocated per call).

constexpr size_t KEEP_BYTES = size_t(32) << 20;
constexpr int SLOTS = 6;

class Scratch {
 public:
  Scratch(int slot, size_t bytes) {
    thread_local std::array<std::vector<char>, SLOTS> kept;
    if (bytes <= KEEP_BYTES) {
      if (kept[slot].size() < bytes) kept[slot].resize(bytes);
      data_ = kept[slot].data();
    } else {
      own_.reset(new char[bytes]);
      data_ = own_.get();
    }
  }
  template <typename U>
  U* as() const { return reinterpret_cast<U*>(data_); }

 private:
  char* data_ = nullptr;
  std::unique_ptr<char[]> own_;
};

// ---------------------------------------------------------------------------------------------------------------
// Depth-wise convolution on NHWC maps (stride 1, padding k // 2), inference: the models' position encoding with its
// residual (x + conv(x)) and the local-context convs, in float32 arithmetic, one pass over the map.

template <typename T>
inline Vec load_vec(const T* p, int64_t count) {
  if constexpr (std::is_same_v<T, float>) {
    return count == VL ? Vec::loadu(p) : Vec::loadu(p, count);
  } else {
    if (count == VL) {
      Vec out;
      at::vec::load_to_float<c10::BFloat16>(p, out);
      return out;
    }
    float tmp[VL] = {};
    for (int64_t i = 0; i < count; ++i) tmp[i] = to_float(p[i]);
    return Vec::loadu(tmp);
  }
}

template <typename T>
inline void store_vec(T* p, const Vec& v, int64_t count) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p, count);
  } else {
    float tmp[VL];
    v.store(tmp);
    for (int64_t i = 0; i < count; ++i) p[i] = static_cast<T>(tmp[i]);
  }
}

// The weight (C, 1, k, k) as (k * k, c_pad) float32 rows, zero past C; the bias (c_pad) likewise.
struct DepthwiseWeights {
  std::vector<float> w, b;
  int64_t k, c_pad;
};

DepthwiseWeights make_depthwise_weights(const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  DepthwiseWeights dw;
  const int64_t C = weight.size(0);
  dw.k = weight.size(3);
  dw.c_pad = round_up(C, VL);
  dw.w.assign(dw.k * dw.k * dw.c_pad, 0.f);
  dw.b.assign(dw.c_pad, 0.f);
  const auto wc = weight.contiguous().to(at::kFloat);
  const float* src = wc.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c)
    for (int64_t t = 0; t < dw.k * dw.k; ++t) dw.w[t * dw.c_pad + c] = src[c * dw.k * dw.k + t];
  if (bias.has_value()) {
    const auto bc = bias->contiguous().to(at::kFloat);
    std::copy(bc.data_ptr<float>(), bc.data_ptr<float>() + C, dw.b.begin());
  }
  return dw;
}

// acc (channels [c0, c0 + VL) of the map) += the conv at (y, x): `at(row, col)` points to channel c0 of a pixel.
template <int K, typename T, typename At>
inline Vec depthwise_point(const DepthwiseWeights& dw, int64_t c0, int64_t count, int64_t y, int64_t x, int64_t H,
                           int64_t W, const At& at, Vec acc) {
  const int64_t k = K ? K : dw.k, p = k / 2;
  for (int64_t dy = 0; dy < k; ++dy) {
    const int64_t yy = y + dy - p;
    if (yy < 0 || yy >= H) continue;
    for (int64_t dx = 0; dx < k; ++dx) {
      const int64_t xx = x + dx - p;
      if (xx < 0 || xx >= W) continue;
      acc = at::vec::fmadd(Vec::loadu(dw.w.data() + (dy * k + dx) * dw.c_pad + c0), load_vec(at(yy, xx), count), acc);
    }
  }
  return acc;
}

// One image, one block of VL channels, all rows: input rows are copied once each into a ring of K zero-padded
// float32 rows (p columns left, p + XB right; rows outside the map are zeros), so that every output pixel runs
// the same products without bounds checks, XB pixels at a time, each ring row loaded once for the K x XB
// products it feeds.
template <int K, int XB, typename T>
void depthwise_channels(const DepthwiseWeights& dw, const T* image, int64_t sh, int64_t sw, int64_t H, int64_t W,
                        int64_t c0, int64_t count, float* ring, bool add_input, const T* add, T* out, int64_t C) {
  const int64_t k = K ? K : dw.k, pad = k / 2, width = W + 2 * pad + XB;
  const auto load_row = [&](int64_t yy) {  // input row yy into its ring slot
    float* row = ring + ((yy + pad) % k) * width * VL;
    if (yy < 0 || yy >= H) {
      std::fill(row, row + width * VL, 0.f);
      return;
    }
    std::fill(row, row + pad * VL, 0.f);
    for (int64_t xi = 0; xi < W; ++xi) load_vec(image + yy * sh + xi * sw + c0, count).store(row + (xi + pad) * VL);
    std::fill(row + (W + pad) * VL, row + width * VL, 0.f);
  };
  for (int64_t yy = -pad; yy < pad; ++yy) load_row(yy);
  const Vec bias = Vec::loadu(dw.b.data() + c0);
  for (int64_t y = 0; y < H; ++y) {
    load_row(y + pad);
    const float* rows[K ? K : 15];
    for (int64_t dy = 0; dy < k; ++dy) rows[dy] = ring + ((y + dy) % k) * width * VL;
    for (int64_t x0 = 0; x0 < W; x0 += XB) {
      Vec acc[XB];
      for (int j = 0; j < XB; ++j) acc[j] = bias;
      if (add_input)
        for (int j = 0; j < XB; ++j) acc[j] = acc[j] + Vec::loadu(rows[pad] + (x0 + j + pad) * VL);
      for (int64_t dy = 0; dy < k; ++dy) {
        const float* row = rows[dy] + x0 * VL;
        if constexpr (K > 0) {  // the row's K + XB - 1 inputs loaded once for its K x XB products
          Vec in[K + XB - 1];
          for (int j = 0; j < K + XB - 1; ++j) in[j] = Vec::loadu(row + j * VL);
          for (int dx = 0; dx < K; ++dx) {
            const Vec w = Vec::loadu(dw.w.data() + (dy * K + dx) * dw.c_pad + c0);
            for (int j = 0; j < XB; ++j) acc[j] = at::vec::fmadd(w, in[dx + j], acc[j]);
          }
        } else {
          for (int64_t dx = 0; dx < k; ++dx) {
            const Vec w = Vec::loadu(dw.w.data() + (dy * k + dx) * dw.c_pad + c0);
            for (int j = 0; j < XB; ++j) acc[j] = at::vec::fmadd(w, Vec::loadu(row + (dx + j) * VL), acc[j]);
          }
        }
      }
      for (int j = 0; j < XB && x0 + j < W; ++j) {
        const int64_t o = (y * W + x0 + j) * C + c0;
        if (add) acc[j] = acc[j] + load_vec(add + o, count);
        store_vec(out + o, acc[j], count);
      }
    }
  }
}

template <int K, typename T>
void depthwise_kernel(const at::Tensor& x, const DepthwiseWeights& dw, bool add_input,
                      const c10::optional<at::Tensor>& add, const at::Tensor& out) {
  constexpr int XB = 8;
  const int64_t N = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  const int64_t sn = x.stride(0), sh = x.stride(1), sw = x.stride(2), k = K ? K : dw.k;
  TORCH_CHECK(k <= 15, "weight: kernels up to 15 x 15, got ", k);
  const int64_t blocks = (C + VL - 1) / VL;
  const T* X = x.data_ptr<T>();
  const T* A = add.has_value() ? add->data_ptr<T>() : nullptr;
  T* O = out.data_ptr<T>();
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> ring(k * (W + k + XB) * VL);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, c0 = (task % blocks) * VL;
      depthwise_channels<K, XB, T>(dw, X + n * sn, sh, sw, H, W, c0, std::min<int64_t>(VL, C - c0), ring.data(),
                                   add_input, A ? A + n * H * W * C : nullptr, O + n * H * W * C, C);
    }
  });
}

at::Tensor depthwise_conv(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                          bool add_input, const c10::optional<at::Tensor>& add) {
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1, "x: expected an (N, H, W, C) map with contiguous channels");
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == x.size(3) && weight.size(1) == 1 &&
              weight.size(2) == weight.size(3) && weight.size(3) % 2 == 1,
              "weight: expected (C, 1, k, k) with k odd for the map's C = ", x.size(3));
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == x.size(3)), "bias: expected (C,)");
  auto out = at::empty({x.size(0), x.size(1), x.size(2), x.size(3)}, x.options());
  if (add.has_value())
    TORCH_CHECK(add->is_contiguous() && add->sizes() == out.sizes() && add->scalar_type() == x.scalar_type(),
                "add: expected a contiguous map of the output's shape and dtype");
  const DepthwiseWeights dw = make_depthwise_weights(weight, bias);
  const auto run = [&](auto type_tag) {
    using T = decltype(type_tag);
    switch (dw.k) {
      case 3: depthwise_kernel<3, T>(x, dw, add_input, add, out); break;
      case 5: depthwise_kernel<5, T>(x, dw, add_input, add, out); break;
      default: depthwise_kernel<0, T>(x, dw, add_input, add, out); break;
    }
  };
  if (x.scalar_type() == at::kFloat) {
    run(float());
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "x: expected float32 or bfloat16, got ", x.scalar_type());
    run(c10::BFloat16());
  }
  return out;
}

// Gradients of the depth-wise conv's weight and bias: grad_w[c][dy][dx] = sum over images and pixels of
// grad[n, y, x, c] * x[n, y + dy - p, x + dx - p, c] (zero outside the map), grad_b[c] = sum of grad[..., c]. Per
// block of VL channels: the K x K sums stay in registers while every pixel of every image passes once (input
// rows through the same zero-padded ring as the forward); float32 sums.
template <int K, typename T>
void depthwise_weight_grad_channels(const T* X, int64_t sn, int64_t sh, int64_t sw, const T* G, int64_t gn,
                                    int64_t gh, int64_t gw, int64_t N, int64_t H, int64_t W, int64_t c0,
                                    int64_t count, float* ring, float* grad_w, float* grad_b, int64_t c_pad) {
  constexpr int64_t pad = K / 2;
  const int64_t width = W + 2 * pad + 8;
  Vec acc[K * K], bias_acc(0.f);
  for (int t = 0; t < K * K; ++t) acc[t] = Vec(0.f);
  for (int64_t n = 0; n < N; ++n) {
    const T* image = X + n * sn;
    const auto load_row = [&](int64_t yy) {
      float* row = ring + ((yy + pad) % K) * width * VL;
      if (yy < 0 || yy >= H) {
        std::fill(row, row + width * VL, 0.f);
        return;
      }
      std::fill(row, row + pad * VL, 0.f);
      for (int64_t xi = 0; xi < W; ++xi) load_vec(image + yy * sh + xi * sw + c0, count).store(row + (xi + pad) * VL);
      std::fill(row + (W + pad) * VL, row + width * VL, 0.f);
    };
    for (int64_t yy = -pad; yy < pad; ++yy) load_row(yy);
    for (int64_t y = 0; y < H; ++y) {
      load_row(y + pad);
      const float* rows[K];
      for (int64_t dy = 0; dy < K; ++dy) rows[dy] = ring + ((y + dy) % K) * width * VL;
      const T* grow = G + n * gn + y * gh + c0;
      for (int64_t x = 0; x < W; ++x) {
        const Vec g = load_vec(grow + x * gw, count);
        bias_acc = bias_acc + g;
        for (int dy = 0; dy < K; ++dy)
          for (int dx = 0; dx < K; ++dx)
            acc[dy * K + dx] = at::vec::fmadd(g, Vec::loadu(rows[dy] + (x + dx) * VL), acc[dy * K + dx]);
      }
    }
  }
  for (int t = 0; t < K * K; ++t) acc[t].store(grad_w + t * c_pad + c0);
  bias_acc.store(grad_b + c0);
}

std::tuple<at::Tensor, at::Tensor> depthwise_conv_weight_grad(const at::Tensor& x, const at::Tensor& grad,
                                                              int64_t kernel) {
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1, "x: expected an (N, H, W, C) map with contiguous channels");
  TORCH_CHECK(grad.dim() == 4 && grad.stride(3) == 1 && grad.sizes() == x.sizes() &&
              grad.scalar_type() == x.scalar_type(), "grad: expected x's shape and dtype, channels contiguous");
  TORCH_CHECK(kernel == 3 || kernel == 5 || kernel == 7, "kernel: expected 3, 5 or 7, got ", kernel);
  const int64_t N = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3), c_pad = round_up(C, VL);
  std::vector<float> grad_w(kernel * kernel * c_pad), grad_b(c_pad);
  const int64_t blocks = c_pad / VL;
  const auto run = [&](auto type_tag, auto k_tag) {
    using T = decltype(type_tag);
    constexpr int K = decltype(k_tag)::value;
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> ring(K * (W + K + 8) * VL);
      for (int64_t b = begin; b < end; ++b)
        depthwise_weight_grad_channels<K, T>(x.data_ptr<T>(), x.stride(0), x.stride(1), x.stride(2),
                                             grad.data_ptr<T>(), grad.stride(0), grad.stride(1), grad.stride(2), N, H,
                                             W, b * VL, std::min<int64_t>(VL, C - b * VL), ring.data(),
                                             grad_w.data(), grad_b.data(), c_pad);
    });
  };
  const auto by_kernel = [&](auto type_tag) {
    if (kernel == 3) run(type_tag, std::integral_constant<int, 3>{});
    else if (kernel == 5) run(type_tag, std::integral_constant<int, 5>{});
    else run(type_tag, std::integral_constant<int, 7>{});
  };
  if (x.scalar_type() == at::kFloat) {
    by_kernel(float());
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "x: expected float32 or bfloat16, got ", x.scalar_type());
    by_kernel(c10::BFloat16());
  }
  auto weight = at::empty({C, 1, kernel, kernel}, x.options().dtype(at::kFloat));
  auto bias = at::empty({C}, x.options().dtype(at::kFloat));
  float* w = weight.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t t = 0; t < kernel * kernel; ++t) w[c * kernel * kernel + t] = grad_w[t * c_pad + c];
    bias.data_ptr<float>()[c] = grad_b[c];
  }
  return {weight, bias};
}

// ---------------------------------------------------------------------------------------------------------------
// Micro-kernels (float32, register-blocked).

// c[i][0:cols] = sum_d a[i][d] * b[d][0:cols] for ROWS rows; b row stride ldb, cols a multiple of VL.
template <int ROWS, int NVV>
inline void a_bt_block(const float* a, int64_t lda, int64_t depth, const float* b, int64_t ldb, float* c,
                       int64_t ldc) {
  Vec acc[ROWS][NVV];
  for (int i = 0; i < ROWS; ++i)
    for (int u = 0; u < NVV; ++u) acc[i][u] = Vec(0.f);
  for (int64_t d = 0; d < depth; ++d) {
    Vec bv[NVV];
    for (int u = 0; u < NVV; ++u) bv[u] = Vec::loadu(b + d * ldb + u * VL);
    for (int i = 0; i < ROWS; ++i) {
      const Vec ai(a[i * lda + d]);
      for (int u = 0; u < NVV; ++u) acc[i][u] = at::vec::fmadd(ai, bv[u], acc[i][u]);
    }
  }
  for (int i = 0; i < ROWS; ++i)
    for (int u = 0; u < NVV; ++u) acc[i][u].store(c + i * ldc + u * VL);
}

template <int ROWS>
inline void a_bt(const float* a, int64_t lda, int64_t depth, const float* b, int64_t ldb, int64_t cols, float* c,
                 int64_t ldc) {
  int64_t j = 0;
  for (; j + NV * VL <= cols; j += NV * VL) a_bt_block<ROWS, NV>(a, lda, depth, b + j, ldb, c + j, ldc);
  for (; j < cols; j += VL) a_bt_block<ROWS, 1>(a, lda, depth, b + j, ldb, c + j, ldc);
}

// c[i][0:width] = sum over tiles t and their rows l of p[i][t * rows + l] * tile_t[l][0:width] (row stride ld),
// width a multiple of VL; c row stride ldc.
template <int ROWS, int DV>
inline void p_tiles_block(const float* p, int64_t ldp, const float* const* tiles, int64_t ntiles, int64_t rows,
                          int64_t ld, int64_t col, float* c, int64_t ldc) {
  Vec acc[ROWS][DV];
  for (int i = 0; i < ROWS; ++i)
    for (int u = 0; u < DV; ++u) acc[i][u] = Vec(0.f);
  for (int64_t t = 0; t < ntiles; ++t) {
    const float* tile = tiles[t] + col;
    const float* pt = p + t * rows;
    for (int64_t l = 0; l < rows; ++l) {
      Vec x[DV];
      for (int u = 0; u < DV; ++u) x[u] = Vec::loadu(tile + l * ld + u * VL);
      for (int i = 0; i < ROWS; ++i) {
        const Vec pi(pt[i * ldp + l]);
        for (int u = 0; u < DV; ++u) acc[i][u] = at::vec::fmadd(pi, x[u], acc[i][u]);
      }
    }
  }
  for (int i = 0; i < ROWS; ++i)
    for (int u = 0; u < DV; ++u) acc[i][u].store(c + i * ldc + col + u * VL);
}

template <int ROWS>
inline void p_tiles(const float* p, int64_t ldp, const float* const* tiles, int64_t ntiles, int64_t rows, int64_t ld,
                    int64_t width, float* c, int64_t ldc) {
  int64_t col = 0;
  for (; col + 2 * VL <= width; col += 2 * VL) p_tiles_block<ROWS, 2>(p, ldp, tiles, ntiles, rows, ld, col, c, ldc);
  for (; col < width; col += VL) p_tiles_block<ROWS, 1>(p, ldp, tiles, ntiles, rows, ld, col, c, ldc);
}

// tile_t[l][0:width] += sum_i p[i][t * rows + l] * x[i][0:width] for every tile t and row l (the transposed
// product, accumulating into per-key rows); x row stride ldx.
template <int ROWS, int DV>
inline void pt_x_block(const float* p, int64_t ldp, const float* x, int64_t ldx, float* const* tiles, int64_t ntiles,
                       int64_t rows, int64_t ld, int64_t col) {
  Vec xv[ROWS][DV];
  for (int i = 0; i < ROWS; ++i)
    for (int u = 0; u < DV; ++u) xv[i][u] = Vec::loadu(x + i * ldx + col + u * VL);
  for (int64_t t = 0; t < ntiles; ++t) {
    float* tile = tiles[t] + col;
    const float* pt = p + t * rows;
    for (int64_t l = 0; l < rows; ++l) {
      Vec acc[DV];
      for (int u = 0; u < DV; ++u) acc[u] = Vec::loadu(tile + l * ld + u * VL);
      for (int i = 0; i < ROWS; ++i) {
        const Vec pi(pt[i * ldp + l]);
        for (int u = 0; u < DV; ++u) acc[u] = at::vec::fmadd(pi, xv[i][u], acc[u]);
      }
      for (int u = 0; u < DV; ++u) acc[u].store(tile + l * ld + u * VL);
    }
  }
}

template <int ROWS>
inline void pt_x(const float* p, int64_t ldp, const float* x, int64_t ldx, float* const* tiles, int64_t ntiles,
                 int64_t rows, int64_t ld, int64_t width) {
  int64_t col = 0;
  for (; col + 2 * VL <= width; col += 2 * VL) pt_x_block<ROWS, 2>(p, ldp, x, ldx, tiles, ntiles, rows, ld, col);
  for (; col < width; col += VL) pt_x_block<ROWS, 1>(p, ldp, x, ldx, tiles, ntiles, rows, ld, col);
}

template <typename F>
inline void with_rows(int64_t rows, F&& f) {
  switch (rows) {
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{}); break;
  }
}

inline float reduce_sum(Vec s) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, s);
}

// In-place softmax of ROWS score rows (row stride ld, n columns, a multiple of VL; columns at or after `valid`
// are padding): the rows' reductions interleaved so that their dependency chains overlap. Returns each row's
// maximum and sum of exponentials (the log-sum-exp is m + log(sum)).
template <int ROWS, bool FAST_EXP = false>
inline void softmax_rows(float* s, int64_t ld, int64_t n, int64_t valid, float* m, float* sum) {
  for (int i = 0; i < ROWS; ++i)
    for (int64_t j = valid; j < n; ++j) s[i * ld + j] = NEG_INF;
  Vec mv[ROWS];
  for (int i = 0; i < ROWS; ++i) mv[i] = Vec(NEG_INF);
  for (int64_t j = 0; j < n; j += VL)
    for (int i = 0; i < ROWS; ++i) mv[i] = at::vec::maximum(mv[i], Vec::loadu(s + i * ld + j));
  Vec sv[ROWS];
  for (int i = 0; i < ROWS; ++i) {
    m[i] = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, mv[i]);
    mv[i] = Vec(m[i]);
    sv[i] = Vec(0.f);
  }
  for (int64_t j = 0; j < n; j += VL)
    for (int i = 0; i < ROWS; ++i) {
      const Vec x = Vec::loadu(s + i * ld + j) - mv[i];
      const Vec e = FAST_EXP ? x.fexp_u20() : x.exp_u20();
      e.store(s + i * ld + j);
      sv[i] = sv[i] + e;
    }
  for (int i = 0; i < ROWS; ++i) sum[i] = reduce_sum(sv[i]);
}

// dst[0:n] = src[0:n] * scale (+ add[0:n]), rounded once to T (add: T or float).
template <typename T, typename A>
inline void store_row(T* dst, const float* src, int64_t n, float scale, const A* add) {
  if constexpr (std::is_same_v<T, float> && std::is_same_v<A, float>) {
    const Vec sv(scale);
    int64_t c = 0;
    for (; c + VL <= n; c += VL) {
      Vec x = Vec::loadu(src + c) * sv;
      if (add) x = x + Vec::loadu(add + c);
      x.store(dst + c);
    }
    for (; c < n; ++c) dst[c] = src[c] * scale + (add ? add[c] : 0.f);
  } else {
    if (add) {
      for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<T>(src[c] * scale + to_float(add[c]));
    } else {
      for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<T>(src[c] * scale);
    }
  }
}

// dst[0:n] = src[0:n] * scale in float32.
template <typename T>
inline void load_scaled(const T* src, int64_t n, float scale, float* dst) {
  if constexpr (std::is_same_v<T, float>) {
    const Vec sv(scale);
    int64_t c = 0;
    for (; c + VL <= n; c += VL) (Vec::loadu(src + c) * sv).store(dst + c);
    for (; c < n; ++c) dst[c] = src[c] * scale;
  } else {
    for (int64_t c = 0; c < n; ++c) dst[c] = to_float(src[c]) * scale;
  }
}

template <typename T>
inline void prefetch_row(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(c + b);
}

// ---------------------------------------------------------------------------------------------------------------
// Tiles: one image's (and head's) keys and values copied once into float32 blocks per region.
//   K^T tile (d, L): the keys of a region transposed (QK products run along the keys);
//   row tile (L, d_pad): a region's tokens as rows, zero-padded to whole vectors.

template <typename T>
void transposed_tile(const View& v, const std::vector<int64_t>& off, int64_t n, int64_t r, int64_t h, int64_t d,
                     const Geometry& g, float* tmp, float* tile) {
  const int64_t L = g.kv_tokens;
  for (int64_t l = 0; l < L; ++l) load_row(at_token<const T>(v, off, n, r * L + l, h), d, tmp + l * d);
  at::vec::transpose_mxn<float>(tmp, d, tile, L, static_cast<int>(L), static_cast<int>(d));
}

template <typename T>
void row_tile(const View& v, const std::vector<int64_t>& off, int64_t n, int64_t r, int64_t h, int64_t d,
              int64_t d_pad, const Geometry& g, float* tile) {
  const int64_t L = g.kv_tokens;
  for (int64_t l = 0; l < L; ++l) {
    float* row = tile + l * d_pad;
    load_row(at_token<const T>(v, off, n, r * L + l, h), d, row);
    for (int64_t c = d; c < d_pad; ++c) row[c] = 0.f;
  }
}

// The K^T (or V^T) tiles of a query region's routed regions side by side: buf (d, kpad), for region sizes that are
// not whole vectors (the products then run on buf instead of on each tile).
template <int64_t LEN>
inline void assemble_runs(const float* const* tiles, int64_t ntiles, int64_t d, int64_t len_rt, int64_t kpad,
                          float* buf) {
  const int64_t len = LEN ? LEN : len_rt;
  for (int64_t t = 0; t < ntiles; ++t) {
    const float* src = tiles[t];
    float* dst = buf + t * len;
    for (int64_t c = 0; c < d; ++c) std::memcpy(dst + c * kpad, src + c * len, len * sizeof(float));
  }
}

void assemble(const float* const* tiles, int64_t ntiles, int64_t d, int64_t len, int64_t kpad, float* buf) {
  switch (len) {
    case 1: assemble_runs<1>(tiles, ntiles, d, len, kpad, buf); break;
    case 2: assemble_runs<2>(tiles, ntiles, d, len, kpad, buf); break;
    case 4: assemble_runs<4>(tiles, ntiles, d, len, kpad, buf); break;
    case 8: assemble_runs<8>(tiles, ntiles, d, len, kpad, buf); break;
    default: assemble_runs<0>(tiles, ntiles, d, len, kpad, buf); break;
  }
  for (int64_t c = 0; c < d; ++c)
    for (int64_t j = ntiles * len; j < kpad; ++j) buf[c * kpad + j] = 0.f;
}

// s (ROWS, kpad) = a (ROWS, depth) @ [tiles]^T: the products against every routed key, padding columns included.
// a: ROWS rows of `depth` values (row stride lda); t_tiles: the routed regions' transposed tiles (depth, L).
template <int ROWS>
inline void scores(const Geometry& g, const float* a, int64_t lda, int64_t depth, const float* const* t_tiles,
                   const float* buf, float* s) {
  if (g.direct) {
    for (int64_t t = 0; t < g.topk; ++t)
      a_bt<ROWS>(a, lda, depth, t_tiles[t], g.kv_tokens, g.kv_tokens, s + t * g.kv_tokens, g.kpad);
  } else {
    a_bt<ROWS>(a, lda, depth, buf, g.kpad, g.kpad, s, g.kpad);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Forward.

template <typename T>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& topk_index,
                    double scale_d, const c10::optional<at::Tensor>& add_to, const at::Tensor& out,
                    const c10::optional<at::Tensor>& lse) {
  const Geometry g = make_geometry(q, k, v, topk_index);
  const float scale = static_cast<float>(scale_d);
  const View qv = make_view(q), kv = make_view(k), vv = make_view(v), ov = make_view(out);
  const View av = add_to.has_value() ? make_view(*add_to) : View();
  const auto q_off = token_offsets(qv, g, g.q_rh, g.q_rw), o_off = token_offsets(ov, g, g.q_rh, g.q_rw);
  const auto k_off = token_offsets(kv, g, g.kv_rh, g.kv_rw), v_off = token_offsets(vv, g, g.kv_rh, g.kv_rw);
  const auto a_off = add_to.has_value() ? token_offsets(av, g, g.q_rh, g.q_rw) : std::vector<int64_t>();
  const int64_t* index = topk_index.data_ptr<int64_t>();
  float* lse_ptr = lse.has_value() ? lse->data_ptr<float>() : nullptr;
  const int64_t R = g.regions, Lq = g.q_tokens, Lk = g.kv_tokens;
  const int64_t kt_size = g.dq * Lk, v_size = Lk * g.dv_pad;
  // one image at a time: its tiles (about (qk_dim + C) floats per token) stay in cache while it is attended to
  const Scratch tiles(0, g.heads * R * (kt_size + v_size) * sizeof(float));
  float* kt_all = tiles.as<float>();
  float* v_all = kt_all + g.heads * R * kt_size;
  for (int64_t n = 0; n < g.batch; ++n) {
    at::parallel_for(0, g.heads * R, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> tmp(Lk * g.dq);
      for (int64_t hr = begin; hr < end; ++hr) {
        const int64_t h = hr / R, r = hr % R;
        transposed_tile<T>(kv, k_off, n, r, h, g.dq, g, tmp.data(), kt_all + hr * kt_size);
        row_tile<T>(vv, v_off, n, r, h, g.dv, g.dv_pad, g, v_all + hr * v_size);
      }
    });
    at::parallel_for(0, R * g.heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(g.direct ? 0 : g.dq * g.kpad), s(MQ * g.kpad), a(MQ * g.dq), o(MQ * g.dv_pad);
      std::vector<const float*> kt_tiles(g.topk), v_tiles(g.topk);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t r = task / g.heads, h = task % g.heads;
        for (int64_t t = 0; t < g.topk; ++t) {
          const int64_t routed = index[(n * R + r) * g.topk + t];
          kt_tiles[t] = kt_all + (h * R + routed) * kt_size;
          v_tiles[t] = v_all + (h * R + routed) * v_size;
        }
        if (!g.direct) assemble(kt_tiles.data(), g.topk, g.dq, Lk, g.kpad, buf.data());
        for (int64_t i0 = 0; i0 < Lq; i0 += MQ) {
          const int64_t rows = std::min<int64_t>(MQ, Lq - i0);
          for (int64_t i = 0; i < rows; ++i)
            load_scaled(at_token<const T>(qv, q_off, n, r * Lq + i0 + i, h), g.dq, scale, a.data() + i * g.dq);
          for (int64_t i = i0 + MQ; i < std::min<int64_t>(i0 + 2 * MQ, Lq); ++i)  // the next block's queries
            prefetch_row(at_token<const T>(qv, q_off, n, r * Lq + i, h), g.dq);
          float m[MQ], total[MQ];
          with_rows(rows, [&](auto rows_c) {
            constexpr int ROWS = decltype(rows_c)::value;
            scores<ROWS>(g, a.data(), g.dq, g.dq, kt_tiles.data(), buf.data(), s.data());
            softmax_rows<ROWS>(s.data(), g.kpad, g.kpad, g.keys, m, total);
            p_tiles<ROWS>(s.data(), g.kpad, v_tiles.data(), g.topk, Lk, g.dv_pad, g.dv_pad, o.data(), g.dv_pad);
          });
          for (int64_t i = 0; i < rows; ++i) {
            if (lse_ptr) lse_ptr[((n * g.heads + h) * R + r) * Lq + i0 + i] = m[i] + std::log(total[i]);
            const int64_t token = r * Lq + i0 + i;
            store_row(at_token<T>(ov, o_off, n, token, h), o.data() + i * g.dv_pad, g.dv, 1.f / total[i],
                      add_to.has_value() ? at_token<const T>(av, a_off, n, token, h) : nullptr);
          }
        }
      }
    });
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Backward: per (image, head), every query region in order; dK and dV summed in float32 per key token.

template <typename T>
void backward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& topk_index,
                     const at::Tensor& lse, const at::Tensor& grad_out, double scale_d, const at::Tensor& grad_q,
                     const at::Tensor& grad_k, const at::Tensor& grad_v) {
  const Geometry g = make_geometry(q, k, v, topk_index);
  const float scale = static_cast<float>(scale_d);
  const View qv = make_view(q), kv = make_view(k), vv = make_view(v), gov = make_view(grad_out);
  const View gqv = make_view(grad_q), gkv = make_view(grad_k), gvv = make_view(grad_v);
  const auto q_off = token_offsets(qv, g, g.q_rh, g.q_rw), go_off = token_offsets(gov, g, g.q_rh, g.q_rw);
  const auto gq_off = token_offsets(gqv, g, g.q_rh, g.q_rw);
  const auto k_off = token_offsets(kv, g, g.kv_rh, g.kv_rw), v_off = token_offsets(vv, g, g.kv_rh, g.kv_rw);
  const auto gk_off = token_offsets(gkv, g, g.kv_rh, g.kv_rw), gv_off = token_offsets(gvv, g, g.kv_rh, g.kv_rw);
  const int64_t* index = topk_index.data_ptr<int64_t>();
  const float* lse_ptr = lse.data_ptr<float>();
  const int64_t R = g.regions, Lq = g.q_tokens, Lk = g.kv_tokens;
  const int64_t kt_size = g.dq * Lk, kr_size = Lk * g.dq_pad, vt_size = g.dv * Lk, dv_size = Lk * g.dv_pad;
  at::parallel_for(0, g.batch * g.heads, 1, [&](int64_t begin, int64_t end) {
    const Scratch kt_s(1, R * kt_size * 4), kr_s(2, R * kr_size * 4), vt_s(3, R * vt_size * 4);
    const Scratch dk_s(4, R * kr_size * 4), dv_s(5, R * dv_size * 4);
    float* kt_all = kt_s.as<float>();
    float* kr_all = kr_s.as<float>();
    float* vt_all = vt_s.as<float>();
    float* dk_all = dk_s.as<float>();
    float* dv_all = dv_s.as<float>();
    std::vector<float> tmp(Lk * std::max(g.dq, g.dv));
    std::vector<float> kbuf(g.direct ? 0 : g.dq * g.kpad), vbuf(g.direct ? 0 : g.dv * g.kpad);
    // a: the scaled queries, go: the output gradient, as rows padded with zeros to whole vectors
    std::vector<float> p(MQ * g.kpad), dp(MQ * g.kpad), a(MQ * g.dq_pad, 0.f), go(MQ * g.dv_pad, 0.f);
    std::vector<float> dq(MQ * g.dq_pad);
    std::vector<const float*> kt_tiles(g.topk), kr_tiles(g.topk), vt_tiles(g.topk);
    std::vector<float*> dk_tiles(g.topk), dv_tiles(g.topk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / g.heads, h = task % g.heads;
      for (int64_t r = 0; r < R; ++r) {
        transposed_tile<T>(kv, k_off, n, r, h, g.dq, g, tmp.data(), kt_all + r * kt_size);
        row_tile<T>(kv, k_off, n, r, h, g.dq, g.dq_pad, g, kr_all + r * kr_size);
        transposed_tile<T>(vv, v_off, n, r, h, g.dv, g, tmp.data(), vt_all + r * vt_size);
      }
      std::fill(dk_all, dk_all + R * kr_size, 0.f);
      std::fill(dv_all, dv_all + R * dv_size, 0.f);
      for (int64_t r = 0; r < R; ++r) {
        for (int64_t t = 0; t < g.topk; ++t) {
          const int64_t routed = index[(n * R + r) * g.topk + t];
          kt_tiles[t] = kt_all + routed * kt_size;
          kr_tiles[t] = kr_all + routed * kr_size;
          vt_tiles[t] = vt_all + routed * vt_size;
          dk_tiles[t] = dk_all + routed * kr_size;
          dv_tiles[t] = dv_all + routed * dv_size;
        }
        if (!g.direct) {
          assemble(kt_tiles.data(), g.topk, g.dq, Lk, g.kpad, kbuf.data());
          assemble(vt_tiles.data(), g.topk, g.dv, Lk, g.kpad, vbuf.data());
        }
        for (int64_t i0 = 0; i0 < Lq; i0 += MQ) {
          const int64_t rows = std::min<int64_t>(MQ, Lq - i0);
          for (int64_t i = 0; i < rows; ++i) {
            const T* qp = at_token<const T>(qv, q_off, n, r * Lq + i0 + i, h);
            for (int64_t c = 0; c < g.dq; ++c) a[i * g.dq_pad + c] = to_float(qp[c]) * scale;
            load_row(at_token<const T>(gov, go_off, n, r * Lq + i0 + i, h), g.dv, go.data() + i * g.dv_pad);
          }
          with_rows(rows, [&](auto rows_c) {
            constexpr int ROWS = decltype(rows_c)::value;
            scores<ROWS>(g, a.data(), g.dq_pad, g.dq, kt_tiles.data(), kbuf.data(), p.data());  // S
            scores<ROWS>(g, go.data(), g.dv_pad, g.dv, vt_tiles.data(), vbuf.data(), dp.data());  // dP = dO V^T
            for (int i = 0; i < ROWS; ++i) {
              float* pi = p.data() + i * g.kpad;
              float* dpi = dp.data() + i * g.kpad;
              const Vec m(lse_ptr[((n * g.heads + h) * R + r) * Lq + i0 + i]);
              for (int64_t j = 0; j < g.kpad; j += VL) (Vec::loadu(pi + j) - m).exp_u20().store(pi + j);
              for (int64_t j = g.keys; j < g.kpad; ++j) pi[j] = 0.f;  // padding columns: no probability
              Vec dsum(0.f);
              for (int64_t j = 0; j < g.kpad; j += VL) dsum = at::vec::fmadd(Vec::loadu(pi + j), Vec::loadu(dpi + j), dsum);
              const Vec d(reduce_sum(dsum));  // D = rowsum(P * dP) = rowsum(dO * O)
              for (int64_t j = 0; j < g.kpad; j += VL)
                (Vec::loadu(pi + j) * (Vec::loadu(dpi + j) - d)).store(dpi + j);  // dS = P * (dP - D)
            }
            p_tiles<ROWS>(dp.data(), g.kpad, kr_tiles.data(), g.topk, Lk, g.dq_pad, g.dq_pad, dq.data(), g.dq_pad);
            pt_x<ROWS>(p.data(), g.kpad, go.data(), g.dv_pad, dv_tiles.data(), g.topk, Lk, g.dv_pad, g.dv_pad);
            pt_x<ROWS>(dp.data(), g.kpad, a.data(), g.dq_pad, dk_tiles.data(), g.topk, Lk, g.dq_pad, g.dq_pad);
          });
          for (int64_t i = 0; i < rows; ++i) {
            T* gq = at_token<T>(gqv, gq_off, n, r * Lq + i0 + i, h);
            const float* dqi = dq.data() + i * g.dq_pad;
            for (int64_t c = 0; c < g.dq; ++c) gq[c] = static_cast<T>(dqi[c] * scale);
          }
        }
      }
      for (int64_t r = 0; r < R; ++r) {
        for (int64_t l = 0; l < Lk; ++l) {
          T* gk = at_token<T>(gkv, gk_off, n, r * Lk + l, h);
          T* gv = at_token<T>(gvv, gv_off, n, r * Lk + l, h);
          const float* dki = dk_all + r * kr_size + l * g.dq_pad;
          const float* dvi = dv_all + r * dv_size + l * g.dv_pad;
          for (int64_t c = 0; c < g.dq; ++c) gk[c] = static_cast<T>(dki[c]);
          for (int64_t c = 0; c < g.dv; ++c) gv[c] = static_cast<T>(dvi[c]);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// bfloat16 inputs on CPUs with AVX512-BF16: the products as VDPBF16PS (two bfloat16 products summed into each
// float32 lane per instruction: twice the float32 FMA's work), everything else as above in float32. The operands
// of a product are laid out in pairs along its summed axis: "pair rows" (depth / 2, cols, 2) for the score-type
// products (pairs of head channels, columns the keys) and (keys / 2, channels, 2) for the value-type products
// (pairs of keys). Probabilities and score gradients are rounded to bfloat16 before their products, as the
// PyTorch backends' bfloat16 matrix products do; sums stay float32.

// Whether bfloat16 calls take the dot-product kernels (on by default where compiled; the tests run both forms).
std::atomic<bool> use_bf16_dot{true};

#if defined(BIFORMER_AVX512_BF16)

using u16 = uint16_t;
constexpr int64_t BL = 16;  // float32 lanes of a 512-bit vector

inline u16 bf16_bits(float x) { return c10::BFloat16(x).x; }  // round to nearest even
inline u16 bf16_bits(c10::BFloat16 x) { return x.x; }

inline __m512bh as_bh(__m512i x) { return reinterpret_cast<__m512bh&>(x); }

inline uint32_t pair_at(const u16* p) {
  uint32_t w;
  std::memcpy(&w, p, 4);
  return w;
}

// c[i][0:cols] = sum over pairs p of a[i][p] . b[p][0:cols]: a (ROWS, depth2) 32-bit pairs (row stride lda pairs),
// b pair rows of ldb columns (each column 2 bfloat16), cols a multiple of 16.
template <int ROWS, int NVV>
inline void dot_a_bt_block(const uint32_t* a, int64_t lda, int64_t depth2, const u16* b, int64_t ldb, float* c,
                           int64_t ldc) {
  __m512 acc[ROWS][NVV];
  for (int i = 0; i < ROWS; ++i)
    for (int u = 0; u < NVV; ++u) acc[i][u] = _mm512_setzero_ps();
  for (int64_t p = 0; p < depth2; ++p) {
    __m512bh bv[NVV];
    for (int u = 0; u < NVV; ++u) bv[u] = as_bh(_mm512_loadu_si512(b + (p * ldb + u * BL) * 2));
    for (int i = 0; i < ROWS; ++i) {
      const __m512bh ai = as_bh(_mm512_set1_epi32(static_cast<int>(a[i * lda + p])));
      for (int u = 0; u < NVV; ++u) acc[i][u] = _mm512_dpbf16_ps(acc[i][u], ai, bv[u]);
    }
  }
  for (int i = 0; i < ROWS; ++i)
    for (int u = 0; u < NVV; ++u) _mm512_storeu_ps(c + i * ldc + u * BL, acc[i][u]);
}

template <int ROWS>
inline void dot_a_bt(const uint32_t* a, int64_t lda, int64_t depth2, const u16* b, int64_t ldb, int64_t cols,
                     float* c, int64_t ldc) {
  int64_t j = 0;
  for (; j + 4 * BL <= cols; j += 4 * BL) dot_a_bt_block<ROWS, 4>(a, lda, depth2, b + j * 2, ldb, c + j, ldc);
  for (; j < cols; j += BL) dot_a_bt_block<ROWS, 1>(a, lda, depth2, b + j * 2, ldb, c + j, ldc);
}

// c[i][col:col+16*DV] = sum over tiles t and key pairs q of p[i][t * 2 * pairs + 2q : +2] . tile_t[q][col..][2]:
// p (ROWS, ldp) bfloat16, tiles of `pairs` key pairs, each a row of ld channels (pairs of bfloat16).
template <int ROWS, int DV>
inline void dot_p_tiles_block(const u16* p, int64_t ldp, const u16* const* tiles, int64_t ntiles, int64_t pairs,
                              int64_t ld, int64_t col, float* c, int64_t ldc) {
  __m512 acc[ROWS][DV];
  for (int i = 0; i < ROWS; ++i)
    for (int u = 0; u < DV; ++u) acc[i][u] = _mm512_setzero_ps();
  for (int64_t t = 0; t < ntiles; ++t) {
    const u16* tile = tiles[t] + col * 2;
    const u16* pt = p + t * pairs * 2;
    for (int64_t q = 0; q < pairs; ++q) {
      __m512bh x[DV];
      for (int u = 0; u < DV; ++u) x[u] = as_bh(_mm512_loadu_si512(tile + (q * ld + u * BL) * 2));
      for (int i = 0; i < ROWS; ++i) {
        const __m512bh pi = as_bh(_mm512_set1_epi32(static_cast<int>(pair_at(pt + i * ldp + 2 * q))));
        for (int u = 0; u < DV; ++u) acc[i][u] = _mm512_dpbf16_ps(acc[i][u], pi, x[u]);
      }
    }
  }
  for (int i = 0; i < ROWS; ++i)
    for (int u = 0; u < DV; ++u) _mm512_storeu_ps(c + i * ldc + col + u * BL, acc[i][u]);
}

template <int ROWS>
inline void dot_p_tiles(const u16* p, int64_t ldp, const u16* const* tiles, int64_t ntiles, int64_t pairs,
                        int64_t ld, int64_t width, float* c, int64_t ldc) {
  int64_t col = 0;
  for (; col + 2 * BL <= width; col += 2 * BL) dot_p_tiles_block<ROWS, 2>(p, ldp, tiles, ntiles, pairs, ld, col, c, ldc);
  for (; col < width; col += BL) dot_p_tiles_block<ROWS, 1>(p, ldp, tiles, ntiles, pairs, ld, col, c, ldc);
}

// acc_t[l][0:width] += sum over row pairs ip of pt[ip][t * keys_per_tile + l] . x[ip][0:width][2] for every tile t
// and key l < len: the transposed products (dV += P^T dO, dK += dS^T q) with the query rows in pairs. pt: the
// probabilities (or score gradients) of row pairs as 32-bit words (row_pairs, ldpt); x: (row_pairs, ldx, 2)
// bfloat16; accumulators float32 rows of ld.
template <int RP, int DV>
inline void dot_pt_x_block(const uint32_t* pt, int64_t ldpt, const u16* x, int64_t ldx, float* const* tiles,
                           int64_t ntiles, int64_t keys_per_tile, int64_t len, int64_t ld, int64_t col) {
  __m512bh xv[RP][DV];
  for (int i = 0; i < RP; ++i)
    for (int u = 0; u < DV; ++u) xv[i][u] = as_bh(_mm512_loadu_si512(x + (i * ldx + col + u * BL) * 2));
  for (int64_t t = 0; t < ntiles; ++t) {
    float* tile = tiles[t] + col;
    const uint32_t* pk = pt + t * keys_per_tile;
    for (int64_t l = 0; l < len; ++l) {
      __m512 acc[DV];
      for (int u = 0; u < DV; ++u) acc[u] = _mm512_loadu_ps(tile + l * ld + u * BL);
      for (int i = 0; i < RP; ++i) {
        const __m512bh pi = as_bh(_mm512_set1_epi32(static_cast<int>(pk[i * ldpt + l])));
        for (int u = 0; u < DV; ++u) acc[u] = _mm512_dpbf16_ps(acc[u], pi, xv[i][u]);
      }
      for (int u = 0; u < DV; ++u) _mm512_storeu_ps(tile + l * ld + u * BL, acc[u]);
    }
  }
}

template <int RP>
inline void dot_pt_x(const uint32_t* pt, int64_t ldpt, const u16* x, int64_t ldx, float* const* tiles, int64_t ntiles,
                     int64_t keys_per_tile, int64_t len, int64_t ld, int64_t width) {
  int64_t col = 0;
  for (; col + 2 * BL <= width; col += 2 * BL)
    dot_pt_x_block<RP, 2>(pt, ldpt, x, ldx, tiles, ntiles, keys_per_tile, len, ld, col);
  for (; col < width; col += BL) dot_pt_x_block<RP, 1>(pt, ldpt, x, ldx, tiles, ntiles, keys_per_tile, len, ld, col);
}

template <typename F>
inline void with_pairs(int64_t pairs, F&& f) {
  switch (pairs) {
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{}); break;
  }
}

// Geometry of the pair layouts: tokens per key region padded to even (Lkp), the keys of a query region
// (topk * Lkp) padded to whole vectors, head sizes padded to even (pairs) and to whole vectors (rows).
struct PairGeometry {
  int64_t lkp, keys, kpad, dq2, dv2, dq_pad, dv_pad;
  bool direct;  // Lkp a whole number of vectors: score products run on the tiles themselves
};

PairGeometry make_pairs(const Geometry& g) {
  PairGeometry pg;
  pg.lkp = round_up(g.kv_tokens, 2);
  pg.keys = g.topk * pg.lkp;
  pg.kpad = round_up(pg.keys, BL);
  pg.dq2 = (g.dq + 1) / 2;
  pg.dv2 = (g.dv + 1) / 2;
  pg.dq_pad = round_up(g.dq, BL);
  pg.dv_pad = round_up(g.dv, BL);
  pg.direct = pg.lkp % BL == 0;
  return pg;
}

// q (or dO) rows of a block as 32-bit pairs (ROWS, d2), a missing odd channel zero.
inline void pair_row(const u16* x, int64_t d, uint32_t* dst) {
  const int64_t d2 = (d + 1) / 2;
  if (d % 2 == 0) {
    std::memcpy(dst, x, d * sizeof(u16));
  } else {
    std::memcpy(dst, x, (d - 1) * sizeof(u16));
    dst[d2 - 1] = x[d - 1];
  }
}

// A region's tokens (d channels of head h) as pair rows: tile[p][l][e] = x[l][2p + e], (d2, lkp, 2), zero-padded.
// A pair of channels is one 32-bit word, so this is a 32-bit transpose of the tokens' rows.
void pair_rows_tile(const View& v, const std::vector<int64_t>& off, int64_t n, int64_t r, int64_t h, int64_t d,
                    const Geometry& g, const PairGeometry& pg, uint32_t* tmp, u16* tile) {
  const int64_t L = g.kv_tokens, d2 = (d + 1) / 2;
  for (int64_t l = 0; l < L; ++l)
    pair_row(reinterpret_cast<const u16*>(at_token<const c10::BFloat16>(v, off, n, r * L + l, h)), d, tmp + l * d2);
  uint32_t* words = reinterpret_cast<uint32_t*>(tile);
  at::vec::transpose_mxn<float>(reinterpret_cast<const float*>(tmp), d2, reinterpret_cast<float*>(words), pg.lkp,
                                static_cast<int>(L), static_cast<int>(d2));
  for (int64_t l = L; l < pg.lkp; ++l)
    for (int64_t p = 0; p < d2; ++p) words[p * pg.lkp + l] = 0;
}

// Two token rows a, b (d channels) interleaved: out[2c] = a[c], out[2c + 1] = b[c] for c < d_pad (zeros past d;
// b may be null: zeros).
inline void interleave_rows(const u16* a, const u16* b, int64_t d, int64_t d_pad, u16* out) {
  static const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                             37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  static const __m512i hi = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24, 55, 23, 54,
                                             22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
  for (int64_t c = 0; c < d_pad; c += 32) {
    const int64_t count = std::max<int64_t>(0, std::min<int64_t>(32, d - c));
    const __mmask32 mask = count >= 32 ? ~__mmask32(0) : (__mmask32(1) << count) - 1;
    const __m512i x = _mm512_maskz_loadu_epi16(mask, a + c);
    const __m512i y = b ? _mm512_maskz_loadu_epi16(mask, b + c) : _mm512_setzero_si512();
    const int64_t words = std::min<int64_t>(32, d_pad - c);  // channels of this step: 16 or 32
    _mm512_storeu_si512(out + 2 * c, _mm512_permutex2var_epi16(x, lo, y));
    if (words > 16) _mm512_storeu_si512(out + 2 * c + 32, _mm512_permutex2var_epi16(x, hi, y));
  }
}

// A region's tokens as key pairs: tile[q][c][e] = x[2q + e][c], (lkp / 2, d_pad, 2), zero-padded.
void key_pairs_tile(const View& v, const std::vector<int64_t>& off, int64_t n, int64_t r, int64_t h, int64_t d,
                    int64_t d_pad, const Geometry& g, const PairGeometry& pg, u16* tile) {
  const int64_t L = g.kv_tokens;
  for (int64_t l = 0; l < L; l += 2) {
    const u16* a = reinterpret_cast<const u16*>(at_token<const c10::BFloat16>(v, off, n, r * L + l, h));
    const u16* b = l + 1 < L ? reinterpret_cast<const u16*>(at_token<const c10::BFloat16>(v, off, n, r * L + l + 1, h))
                             : nullptr;
    interleave_rows(a, b, d, d_pad, tile + (l / 2) * d_pad * 2);
  }
}

// The pair-row tiles of a query region's routed regions side by side: buf (d2, kpad, 2).
template <int64_t LKP>
inline void assemble_pair_runs(const u16* const* tiles, int64_t ntiles, int64_t d2, int64_t lkp_rt, int64_t kpad,
                               u16* buf) {
  const int64_t run = (LKP ? LKP : lkp_rt) * 2;  // a constant length compiles to plain moves
  for (int64_t p = 0; p < d2; ++p) {
    u16* dst = buf + p * kpad * 2;
    for (int64_t t = 0; t < ntiles; ++t) std::memcpy(dst + t * run, tiles[t] + p * run, run * sizeof(u16));
    std::memset(dst + ntiles * run, 0, (kpad * 2 - ntiles * run) * sizeof(u16));
  }
}

void assemble_pairs(const u16* const* tiles, int64_t ntiles, int64_t d2, const PairGeometry& pg, u16* buf) {
  switch (pg.lkp) {
    case 2: assemble_pair_runs<2>(tiles, ntiles, d2, pg.lkp, pg.kpad, buf); break;
    case 4: assemble_pair_runs<4>(tiles, ntiles, d2, pg.lkp, pg.kpad, buf); break;
    case 6: assemble_pair_runs<6>(tiles, ntiles, d2, pg.lkp, pg.kpad, buf); break;
    case 8: assemble_pair_runs<8>(tiles, ntiles, d2, pg.lkp, pg.kpad, buf); break;
    default: assemble_pair_runs<0>(tiles, ntiles, d2, pg.lkp, pg.kpad, buf); break;
  }
}

template <int ROWS>
inline void pair_scores(const Geometry& g, const PairGeometry& pg, const uint32_t* a, int64_t lda, int64_t depth2,
                        const u16* const* tiles, const u16* buf, float* s) {
  if (pg.direct) {
    for (int64_t t = 0; t < g.topk; ++t)
      dot_a_bt<ROWS>(a, lda, depth2, tiles[t], pg.lkp, pg.lkp, s + t * pg.lkp, pg.kpad);
  } else {
    dot_a_bt<ROWS>(a, lda, depth2, buf, pg.kpad, pg.kpad, s + 0, pg.kpad);
  }
}

// Score columns that are no key: a padding token of each tile (odd region sizes) and the tail.
inline void mask_columns(const Geometry& g, const PairGeometry& pg, float* row) {
  if (pg.lkp != g.kv_tokens)
    for (int64_t t = 0; t < g.topk; ++t) row[t * pg.lkp + g.kv_tokens] = NEG_INF;
  for (int64_t j = pg.keys; j < pg.kpad; ++j) row[j] = NEG_INF;
}

inline void to_bf16_row(const float* src, int64_t n, u16* dst) {  // n a multiple of 16
  for (int64_t j = 0; j < n; j += BL) {
    const __m256bh x = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + j));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), reinterpret_cast<const __m256i&>(x));
  }
}

void forward_bf16_dot(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& topk_index,
                      double scale_d, const c10::optional<at::Tensor>& add_to, const at::Tensor& out,
                      const c10::optional<at::Tensor>& lse) {
  using T = c10::BFloat16;
  const Geometry g = make_geometry(q, k, v, topk_index);
  const PairGeometry pg = make_pairs(g);
  const float scale = static_cast<float>(scale_d);
  const View qv = make_view(q), kv = make_view(k), vv = make_view(v), ov = make_view(out);
  const View av = add_to.has_value() ? make_view(*add_to) : View();
  const auto q_off = token_offsets(qv, g, g.q_rh, g.q_rw), o_off = token_offsets(ov, g, g.q_rh, g.q_rw);
  const auto k_off = token_offsets(kv, g, g.kv_rh, g.kv_rw), v_off = token_offsets(vv, g, g.kv_rh, g.kv_rw);
  const auto a_off = add_to.has_value() ? token_offsets(av, g, g.q_rh, g.q_rw) : std::vector<int64_t>();
  const int64_t* index = topk_index.data_ptr<int64_t>();
  float* lse_ptr = lse.has_value() ? lse->data_ptr<float>() : nullptr;
  const int64_t R = g.regions, Lq = g.q_tokens;
  const int64_t k_size = pg.dq2 * pg.lkp * 2, v_size = pg.lkp * pg.dv_pad;
  const Scratch tiles(0, g.heads * R * (k_size + v_size) * sizeof(u16));
  u16* k_all = tiles.as<u16>();
  u16* v_all = k_all + g.heads * R * k_size;
  for (int64_t n = 0; n < g.batch; ++n) {
    at::parallel_for(0, g.heads * R, 1, [&](int64_t begin, int64_t end) {
      std::vector<uint32_t> tmp(g.kv_tokens * pg.dq2);
      for (int64_t hr = begin; hr < end; ++hr) {
        const int64_t h = hr / R, r = hr % R;
        pair_rows_tile(kv, k_off, n, r, h, g.dq, g, pg, tmp.data(), k_all + hr * k_size);
        key_pairs_tile(vv, v_off, n, r, h, g.dv, pg.dv_pad, g, pg, v_all + hr * v_size);
      }
    });
    at::parallel_for(0, R * g.heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<u16> buf(pg.direct ? 0 : pg.dq2 * pg.kpad * 2), pbf(MQ * pg.kpad);
      std::vector<float> s(MQ * pg.kpad), o(MQ * pg.dv_pad);
      std::vector<uint32_t> a(MQ * pg.dq2);
      std::vector<const u16*> k_tiles(g.topk), v_tiles(g.topk);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t r = task / g.heads, h = task % g.heads;
        for (int64_t t = 0; t < g.topk; ++t) {
          const int64_t routed = index[(n * R + r) * g.topk + t];
          k_tiles[t] = k_all + (h * R + routed) * k_size;
          v_tiles[t] = v_all + (h * R + routed) * v_size;
        }
        if (!pg.direct) assemble_pairs(k_tiles.data(), g.topk, pg.dq2, pg, buf.data());
        for (int64_t i0 = 0; i0 < Lq; i0 += MQ) {
          const int64_t rows = std::min<int64_t>(MQ, Lq - i0);
          for (int64_t i = 0; i < rows; ++i)
            pair_row(reinterpret_cast<const u16*>(at_token<const T>(qv, q_off, n, r * Lq + i0 + i, h)), g.dq,
                     a.data() + i * pg.dq2);
          float m[MQ], total[MQ];
          with_rows(rows, [&](auto rows_c) {
            constexpr int ROWS = decltype(rows_c)::value;
            pair_scores<ROWS>(g, pg, a.data(), pg.dq2, pg.dq2, k_tiles.data(), buf.data(), s.data());
            const Vec sv(scale);
            for (int i = 0; i < ROWS; ++i) {
              float* row = s.data() + i * pg.kpad;
              for (int64_t j = 0; j < pg.kpad; j += VL) (Vec::loadu(row + j) * sv).store(row + j);
              mask_columns(g, pg, row);
            }
            softmax_rows<ROWS, true>(s.data(), pg.kpad, pg.kpad, pg.kpad, m, total);
            for (int i = 0; i < ROWS; ++i) to_bf16_row(s.data() + i * pg.kpad, pg.kpad, pbf.data() + i * pg.kpad);
            dot_p_tiles<ROWS>(pbf.data(), pg.kpad, v_tiles.data(), g.topk, pg.lkp / 2, pg.dv_pad, pg.dv_pad, o.data(),
                              pg.dv_pad);
          });
          for (int64_t i = 0; i < rows; ++i) {
            if (lse_ptr) lse_ptr[((n * g.heads + h) * R + r) * Lq + i0 + i] = m[i] + std::log(total[i]);
            const int64_t token = r * Lq + i0 + i;
            store_row(at_token<T>(ov, o_off, n, token, h), o.data() + i * pg.dv_pad, g.dv, 1.f / total[i],
                      add_to.has_value() ? at_token<const T>(av, a_off, n, token, h) : nullptr);
          }
        }
      }
    });
  }
}

void backward_bf16_dot(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& topk_index,
                       const at::Tensor& lse, const at::Tensor& grad_out, double scale_d, const at::Tensor& grad_q,
                       const at::Tensor& grad_k, const at::Tensor& grad_v) {
  using T = c10::BFloat16;
  const Geometry g = make_geometry(q, k, v, topk_index);
  const PairGeometry pg = make_pairs(g);
  const float scale = static_cast<float>(scale_d);
  const View qv = make_view(q), kv = make_view(k), vv = make_view(v), gov = make_view(grad_out);
  const View gqv = make_view(grad_q), gkv = make_view(grad_k), gvv = make_view(grad_v);
  const auto q_off = token_offsets(qv, g, g.q_rh, g.q_rw), go_off = token_offsets(gov, g, g.q_rh, g.q_rw);
  const auto gq_off = token_offsets(gqv, g, g.q_rh, g.q_rw);
  const auto k_off = token_offsets(kv, g, g.kv_rh, g.kv_rw), v_off = token_offsets(vv, g, g.kv_rh, g.kv_rw);
  const auto gk_off = token_offsets(gkv, g, g.kv_rh, g.kv_rw), gv_off = token_offsets(gvv, g, g.kv_rh, g.kv_rw);
  const int64_t* index = topk_index.data_ptr<int64_t>();
  const float* lse_ptr = lse.data_ptr<float>();
  const int64_t R = g.regions, Lq = g.q_tokens, Lk = g.kv_tokens;
  const int64_t kpr_size = pg.dq2 * pg.lkp * 2, vpr_size = pg.dv2 * pg.lkp * 2, kkp_size = pg.lkp * pg.dq_pad;
  const int64_t dk_size = pg.lkp * pg.dq_pad, dv_size = pg.lkp * pg.dv_pad;
  constexpr int64_t SB = 16, SP = SB / 2;  // query rows, and row pairs, of a super block
  at::parallel_for(0, g.batch * g.heads, 1, [&](int64_t begin, int64_t end) {
    const Scratch kpr_s(1, R * kpr_size * 2), vpr_s(2, R * vpr_size * 2), kkp_s(3, R * kkp_size * 2);
    const Scratch dk_s(4, R * dk_size * 4), dv_s(5, R * dv_size * 4);
    u16* kpr_all = kpr_s.as<u16>();
    u16* vpr_all = vpr_s.as<u16>();
    u16* kkp_all = kkp_s.as<u16>();
    float* dk_all = dk_s.as<float>();
    float* dv_all = dv_s.as<float>();
    std::vector<uint32_t> tmp(Lk * std::max(pg.dq2, pg.dv2));
    std::vector<u16> kbuf(pg.direct ? 0 : pg.dq2 * pg.kpad * 2), vbuf(pg.direct ? 0 : pg.dv2 * pg.kpad * 2);
    std::vector<float> p(MQ * pg.kpad), dp(MQ * pg.kpad), dq(MQ * pg.dq_pad);
    std::vector<u16> pbf(MQ * pg.kpad), dsbf(MQ * pg.kpad), q2(SP * pg.dq_pad * 2), go2(SP * pg.dv_pad * 2);
    std::vector<uint32_t> a(MQ * pg.dq2), go(MQ * pg.dv2), pt(SP * pg.kpad), dst(SP * pg.kpad);
    std::vector<const u16*> kpr_tiles(g.topk), vpr_tiles(g.topk), kkp_tiles(g.topk);
    std::vector<float*> dk_tiles(g.topk), dv_tiles(g.topk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / g.heads, h = task % g.heads;
      for (int64_t r = 0; r < R; ++r) {
        pair_rows_tile(kv, k_off, n, r, h, g.dq, g, pg, tmp.data(), kpr_all + r * kpr_size);
        pair_rows_tile(vv, v_off, n, r, h, g.dv, g, pg, tmp.data(), vpr_all + r * vpr_size);
        key_pairs_tile(kv, k_off, n, r, h, g.dq, pg.dq_pad, g, pg, kkp_all + r * kkp_size);
      }
      std::fill(dk_all, dk_all + R * dk_size, 0.f);
      std::fill(dv_all, dv_all + R * dv_size, 0.f);
      for (int64_t r = 0; r < R; ++r) {
        for (int64_t t = 0; t < g.topk; ++t) {
          const int64_t routed = index[(n * R + r) * g.topk + t];
          kpr_tiles[t] = kpr_all + routed * kpr_size;
          vpr_tiles[t] = vpr_all + routed * vpr_size;
          kkp_tiles[t] = kkp_all + routed * kkp_size;
          dk_tiles[t] = dk_all + routed * dk_size;
          dv_tiles[t] = dv_all + routed * dv_size;
        }
        if (!pg.direct) {
          assemble_pairs(kpr_tiles.data(), g.topk, pg.dq2, pg, kbuf.data());
          assemble_pairs(vpr_tiles.data(), g.topk, pg.dv2, pg, vbuf.data());
        }
        // super blocks of SB query rows: their P and dS (and q, dO) in row pairs, so that every key's dV and dK
        // accumulators are loaded and stored once per SB rows, not once per block of MQ
        for (int64_t s0 = 0; s0 < Lq; s0 += SB) {
          const int64_t srows = std::min<int64_t>(SB, Lq - s0);
          for (int64_t i0 = s0; i0 < s0 + srows; i0 += MQ) {
            const int64_t rows = std::min<int64_t>(MQ, s0 + srows - i0), pair0 = (i0 - s0) / 2;
            // the block's q and dO rows: as 32-bit pairs of channels, and as row pairs (channel-interleaved)
            const u16* qp[MQ];
            const u16* gp[MQ];
            for (int64_t i = 0; i < MQ; ++i) {
              qp[i] = i < rows ? reinterpret_cast<const u16*>(at_token<const T>(qv, q_off, n, r * Lq + i0 + i, h))
                               : nullptr;
              gp[i] = i < rows ? reinterpret_cast<const u16*>(at_token<const T>(gov, go_off, n, r * Lq + i0 + i, h))
                               : nullptr;
              if (i < rows) {
                pair_row(qp[i], g.dq, a.data() + i * pg.dq2);
                pair_row(gp[i], g.dv, go.data() + i * pg.dv2);
              }
            }
            for (int64_t ip = 0; 2 * ip < rows; ++ip) {
              interleave_rows(qp[2 * ip], qp[2 * ip + 1], g.dq, pg.dq_pad, q2.data() + (pair0 + ip) * pg.dq_pad * 2);
              interleave_rows(gp[2 * ip], gp[2 * ip + 1], g.dv, pg.dv_pad, go2.data() + (pair0 + ip) * pg.dv_pad * 2);
            }
            with_rows(rows, [&](auto rows_c) {
              constexpr int ROWS = decltype(rows_c)::value;
              pair_scores<ROWS>(g, pg, a.data(), pg.dq2, pg.dq2, kpr_tiles.data(), kbuf.data(), p.data());  // S
              pair_scores<ROWS>(g, pg, go.data(), pg.dv2, pg.dv2, vpr_tiles.data(), vbuf.data(), dp.data());  // dP
              for (int i = 0; i < ROWS; ++i) {
                float* pi = p.data() + i * pg.kpad;
                float* dpi = dp.data() + i * pg.kpad;
                mask_columns(g, pg, pi);
                const Vec m(lse_ptr[((n * g.heads + h) * R + r) * Lq + i0 + i]), sv(scale);
                Vec dsum(0.f);
                for (int64_t j = 0; j < pg.kpad; j += VL) {
                  const Vec e = (Vec::loadu(pi + j) * sv - m).fexp_u20();
                  e.store(pi + j);
                  dsum = at::vec::fmadd(e, Vec::loadu(dpi + j), dsum);
                }
                const Vec d(reduce_sum(dsum));
                for (int64_t j = 0; j < pg.kpad; j += VL)
                  (Vec::loadu(pi + j) * (Vec::loadu(dpi + j) - d)).store(dpi + j);  // dS
                to_bf16_row(pi, pg.kpad, pbf.data() + i * pg.kpad);
                to_bf16_row(dpi, pg.kpad, dsbf.data() + i * pg.kpad);
              }
              // P and dS of row pairs interleaved: pt[ip][j] = (P[2ip][j], P[2ip + 1][j]) as one 32-bit word
              for (int64_t ip = 0; 2 * ip < ROWS; ++ip) {
                const int64_t i = 2 * ip;
                const u16* p1 = i + 1 < ROWS ? pbf.data() + (i + 1) * pg.kpad : nullptr;
                const u16* s1 = i + 1 < ROWS ? dsbf.data() + (i + 1) * pg.kpad : nullptr;
                interleave_rows(pbf.data() + i * pg.kpad, p1, pg.kpad, pg.kpad,
                                reinterpret_cast<u16*>(pt.data() + (pair0 + ip) * pg.kpad));
                interleave_rows(dsbf.data() + i * pg.kpad, s1, pg.kpad, pg.kpad,
                                reinterpret_cast<u16*>(dst.data() + (pair0 + ip) * pg.kpad));
              }
              dot_p_tiles<ROWS>(dsbf.data(), pg.kpad, kkp_tiles.data(), g.topk, pg.lkp / 2, pg.dq_pad, pg.dq_pad,
                                dq.data(), pg.dq_pad);  // dQ / scale
            });
            for (int64_t i = 0; i < rows; ++i)
              store_row(at_token<T>(gqv, gq_off, n, r * Lq + i0 + i, h), dq.data() + i * pg.dq_pad, g.dq, scale,
                        static_cast<const T*>(nullptr));
          }
          with_pairs((srows + 1) / 2, [&](auto pairs_c) {
            constexpr int PAIRS = decltype(pairs_c)::value;
            dot_pt_x<PAIRS>(pt.data(), pg.kpad, go2.data(), pg.dv_pad, dv_tiles.data(), g.topk, pg.lkp, Lk,
                            pg.dv_pad, pg.dv_pad);
            dot_pt_x<PAIRS>(dst.data(), pg.kpad, q2.data(), pg.dq_pad, dk_tiles.data(), g.topk, pg.lkp, Lk,
                            pg.dq_pad, pg.dq_pad);
          });
        }
      }
      for (int64_t r = 0; r < R; ++r)
        for (int64_t l = 0; l < Lk; ++l) {
          store_row(at_token<T>(gkv, gk_off, n, r * Lk + l, h), dk_all + r * dk_size + l * pg.dq_pad, g.dq,
                    scale, static_cast<const T*>(nullptr));
          store_row(at_token<T>(gvv, gv_off, n, r * Lk + l, h), dv_all + r * dv_size + l * pg.dv_pad, g.dv,
                    1.f, static_cast<const T*>(nullptr));
        }
    }
  });
}

#endif  // BIFORMER_AVX512_BF16

// ---------------------------------------------------------------------------------------------------------------
// Region means (the routing's region-level q and k).

template <typename T, typename O = T>
void region_means_kernel(const at::Tensor& x, const at::Tensor& out) {
  const int64_t N = x.size(0), gh = x.size(1), gw = x.size(2), rh = x.size(3), rw = x.size(4);
  const int64_t groups = x.size(5), d = x.size(6), channels = groups * d, R = gh * gw;
  const View xv = make_view(x);
  O* o = out.data_ptr<O>();
  const float inv = 1.f / static_cast<float>(rh * rw);
  at::parallel_for(0, N * R, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(channels);
    for (int64_t nr = begin; nr < end; ++nr) {
      const int64_t n = nr / R, r = nr % R, gy = r / gw, gx = r % gw;
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t ly = 0; ly < rh; ++ly)
        for (int64_t lx = 0; lx < rw; ++lx) {
          const T* token = reinterpret_cast<const T*>(xv.base) + n * xv.stride[0] + gy * xv.stride[1] +
                           gx * xv.stride[2] + ly * xv.stride[3] + lx * xv.stride[4];
          for (int64_t gi = 0; gi < groups; ++gi) {
            const T* src = token + gi * xv.stride[5];
            float* dst = acc.data() + gi * d;
            for (int64_t c = 0; c < d; ++c) dst[c] += to_float(src[c]);
          }
        }
      for (int64_t c = 0; c < channels; ++c) o[nr * channels + c] = static_cast<O>(acc[c] * inv);
    }
  });
}

template <typename T>
void region_means_kernel_to_float(const at::Tensor& x, const at::Tensor& out) {
  region_means_kernel<T, float>(x, out);
}

// ---------------------------------------------------------------------------------------------------------------
// Entry points. The Python side checks shapes, dtypes and devices before calling; these check what would make a
// kernel read or write out of bounds.

void check_view(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 7, name, ": expected a 7-D view (N, grid_h, grid_w, region_h, region_w, heads, d), got ",
              t.dim(), " dimensions");
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor");
  TORCH_CHECK(t.stride(6) == 1, name, ": expected a contiguous last axis");
}

// b has a's (N, grid_h, grid_w, heads); with same_regions also a's (region_h, region_w).
void check_same_grid(const at::Tensor& a, const at::Tensor& b, const char* name, bool same_regions) {
  for (int i : {0, 1, 2, 5}) TORCH_CHECK(a.size(i) == b.size(i), name, ": expected (N, grid_h, grid_w, heads) ", a.sizes());
  if (same_regions)
    TORCH_CHECK(a.size(3) == b.size(3) && a.size(4) == b.size(4), name, ": expected regions of ", a.size(3), " x ",
                a.size(4), " tokens, got ", b.size(3), " x ", b.size(4));
}

void check_index(const at::Tensor& q, const at::Tensor& topk_index) {
  TORCH_CHECK(topk_index.scalar_type() == at::kLong && topk_index.is_contiguous() && topk_index.dim() == 3,
              "topk_index: expected a contiguous int64 (N, R, topk) tensor");
  TORCH_CHECK(topk_index.size(0) == q.size(0) && topk_index.size(1) == q.size(1) * q.size(2),
              "topk_index: expected (N, R, topk) for the query's N and R");
  const int64_t R = q.size(1) * q.size(2);
  const int64_t* p = topk_index.data_ptr<int64_t>();
  for (int64_t i = 0; i < topk_index.numel(); ++i)
    TORCH_CHECK(p[i] >= 0 && p[i] < R, "topk_index: expected values in [0, ", R, "), got ", p[i]);
}

void routed_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& topk_index, double scale, const c10::optional<at::Tensor>& add_to,
                              const at::Tensor& out, const c10::optional<at::Tensor>& lse) {
  check_view(q, "query");
  check_view(k, "key");
  check_view(v, "value");
  check_view(out, "out");
  check_same_grid(q, k, "key", false);
  check_same_grid(k, v, "value", true);
  check_same_grid(q, out, "out", true);
  TORCH_CHECK(k.size(6) == q.size(6) && out.size(6) == v.size(6), "key/out: head sizes do not match");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
              out.scalar_type() == q.scalar_type(), "query, key, value, out: expected one dtype");
  if (add_to.has_value()) {
    check_view(*add_to, "add_to");
    check_same_grid(q, *add_to, "add_to", true);
    TORCH_CHECK(add_to->size(6) == v.size(6) && add_to->scalar_type() == q.scalar_type(), "add_to: expected out's shape and dtype");
  }
  if (lse.has_value()) {
    TORCH_CHECK(lse->scalar_type() == at::kFloat && lse->is_contiguous() &&
                lse->numel() == q.size(0) * q.size(5) * q.size(1) * q.size(2) * q.size(3) * q.size(4),
                "lse: expected a contiguous float32 (N, heads, R, L) tensor");
  }
  check_index(q, topk_index);
  if (q.scalar_type() == at::kFloat) {
    forward_kernel<float>(q, k, v, topk_index, scale, add_to, out, lse);
  } else {
    TORCH_CHECK(q.scalar_type() == at::kBFloat16, "query: expected float32 or bfloat16, got ", q.scalar_type());
#if defined(BIFORMER_AVX512_BF16)
    if (use_bf16_dot.load()) return forward_bf16_dot(q, k, v, topk_index, scale, add_to, out, lse);
#endif
    forward_kernel<c10::BFloat16>(q, k, v, topk_index, scale, add_to, out, lse);
  }
}

void routed_attention_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& topk_index, const at::Tensor& lse, const at::Tensor& grad_out,
                               double scale, const at::Tensor& grad_q, const at::Tensor& grad_k,
                               const at::Tensor& grad_v) {
  const char* names[] = {"query", "key", "value", "grad_out", "grad_query", "grad_key", "grad_value"};
  const at::Tensor* views[] = {&q, &k, &v, &grad_out, &grad_q, &grad_k, &grad_v};
  for (int i = 0; i < 7; ++i) {
    check_view(*views[i], names[i]);
    const bool key_shaped = i == 1 || i == 2 || i == 5 || i == 6;
    check_same_grid(key_shaped ? k : q, *views[i], names[i], true);
    TORCH_CHECK(views[i]->scalar_type() == q.scalar_type(), names[i], ": expected the query's dtype");
  }
  check_same_grid(q, k, "key", false);
  TORCH_CHECK(k.size(6) == q.size(6) && grad_q.size(6) == q.size(6) && grad_k.size(6) == q.size(6) &&
              grad_out.size(6) == v.size(6) && grad_v.size(6) == v.size(6), "head sizes do not match");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
              lse.numel() == q.size(0) * q.size(5) * q.size(1) * q.size(2) * q.size(3) * q.size(4),
              "lse: expected a contiguous float32 (N, heads, R, L) tensor");
  check_index(q, topk_index);
  if (q.scalar_type() == at::kFloat) {
    backward_kernel<float>(q, k, v, topk_index, lse, grad_out, scale, grad_q, grad_k, grad_v);
  } else {
    TORCH_CHECK(q.scalar_type() == at::kBFloat16, "query: expected float32 or bfloat16, got ", q.scalar_type());
#if defined(BIFORMER_AVX512_BF16)
    if (use_bf16_dot.load()) return backward_bf16_dot(q, k, v, topk_index, lse, grad_out, scale, grad_q, grad_k, grad_v);
#endif
    backward_kernel<c10::BFloat16>(q, k, v, topk_index, lse, grad_out, scale, grad_q, grad_k, grad_v);
  }
}

// --- entries on the BRA projection's NHWC output (the views made here: no Python in between) -----------------

// (N, H, W, heads * d) (a channel slice is fine) as the 7-D view (N, gh, gw, rh, rw, heads, d).
at::Tensor image_view(const at::Tensor& x, int64_t gh, int64_t gw, int64_t heads) {
  const int64_t N = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  return x.view({N, gh, H / gh, gw, W / gw, heads, C / heads}).permute({0, 1, 3, 2, 4, 5, 6});
}

std::array<at::Tensor, 3> image_parts(const at::Tensor& qkv, int64_t gh, int64_t gw, int64_t heads, int64_t qk) {
  const int64_t C = qkv.size(3) - 2 * qk;
  return {image_view(qkv.narrow(3, 0, qk), gh, gw, heads), image_view(qkv.narrow(3, qk, qk), gh, gw, heads),
          image_view(qkv.narrow(3, 2 * qk, C), gh, gw, heads)};
}

void check_image(const at::Tensor& qkv, int64_t gh, int64_t gw, int64_t heads, int64_t qk) {
  TORCH_CHECK(qkv.dim() == 4 && qkv.stride(3) == 1, "qkv: expected an (N, H, W, 2 * qk_dim + C) map, channels contiguous");
  TORCH_CHECK(gh > 0 && gw > 0 && qkv.size(1) % gh == 0 && qkv.size(2) % gw == 0,
              "qkv: H and W must be multiples of the grid, got ", qkv.size(1), " x ", qkv.size(2), " for ", gh, " x ", gw);
  TORCH_CHECK(heads > 0 && qk > 0 && qk % heads == 0 && (qkv.size(3) - 2 * qk) > 0 && (qkv.size(3) - 2 * qk) % heads == 0,
              "qkv: expected 2 * qk_dim + C channels with qk_dim and C multiples of the heads");
}

std::tuple<at::Tensor, at::Tensor> image_attention_forward(const at::Tensor& qkv, const at::Tensor& topk_index,
                                                           int64_t gh, int64_t gw, int64_t heads, int64_t qk,
                                                           double scale, const c10::optional<at::Tensor>& add_to,
                                                           bool with_lse) {
  check_image(qkv, gh, gw, heads, qk);
  const int64_t N = qkv.size(0), H = qkv.size(1), W = qkv.size(2), C = qkv.size(3) - 2 * qk;
  auto out = at::empty({N, H, W, C}, qkv.options());
  at::Tensor lse = with_lse ? at::empty({N, heads, gh * gw, (H / gh) * (W / gw)}, qkv.options().dtype(at::kFloat))
                            : at::empty({0}, qkv.options().dtype(at::kFloat));
  const auto parts = image_parts(qkv, gh, gw, heads, qk);
  c10::optional<at::Tensor> add;
  if (add_to.has_value()) {
    TORCH_CHECK(add_to->sizes() == out.sizes() && add_to->stride(3) == 1, "add_to: expected an (N, H, W, C) map");
    add = image_view(*add_to, gh, gw, heads);
  }
  routed_attention_forward(parts[0], parts[1], parts[2], topk_index, scale, add, image_view(out, gh, gw, heads),
                           with_lse ? c10::optional<at::Tensor>(lse) : c10::nullopt);
  return {out, lse};
}

at::Tensor image_attention_backward(const at::Tensor& qkv, const at::Tensor& topk_index, const at::Tensor& lse,
                                    const at::Tensor& grad, int64_t gh, int64_t gw, int64_t heads, int64_t qk,
                                    double scale, const c10::optional<at::Tensor>& add_v) {
  check_image(qkv, gh, gw, heads, qk);
  auto grad_qkv = at::empty(qkv.sizes(), qkv.options());  // every element is written
  const auto parts = image_parts(qkv, gh, gw, heads, qk);
  const auto grads = image_parts(grad_qkv, gh, gw, heads, qk);
  const auto g = grad.stride(3) == 1 ? grad : grad.contiguous();
  routed_attention_backward(parts[0], parts[1], parts[2], topk_index, lse, image_view(g, gh, gw, heads), scale,
                            grads[0], grads[1], grads[2]);
  if (add_v.has_value()) {  // another gradient of the value channels (the LCE conv's input): added in place
    auto value = grad_qkv.narrow(3, 2 * qk, qkv.size(3) - 2 * qk);
    TORCH_CHECK(add_v->sizes() == value.sizes(), "add_v: expected the value channels' shape");
    value.add_(*add_v);
  }
  return grad_qkv;
}

// The routing's affinities from the projection in one pass: the float32 means of each region's q and k channels,
// then logits[n, r, s] = scale * mean_q[n, r] . mean_k[n, s] in float32. (N, H, W, 2 * qk_dim + C) -> (N, R, R).
at::Tensor region_logits(const at::Tensor& qkv, int64_t gh, int64_t gw, int64_t qk, double scale_d) {
  TORCH_CHECK(qkv.dim() == 4 && qkv.stride(3) == 1 && qkv.size(3) >= 2 * qk && qk > 0,
              "qkv: expected an (N, H, W, >= 2 * qk_dim) map, channels contiguous");
  TORCH_CHECK(gh > 0 && gw > 0 && qkv.size(1) % gh == 0 && qkv.size(2) % gw == 0, "qkv: H and W must be multiples of the grid");
  const int64_t N = qkv.size(0), R = gh * gw, qk_pad = round_up(qk, VL);
  auto means = at::empty({N, R, 2 * qk}, qkv.options().dtype(at::kFloat));
  const auto view = image_view(qkv.narrow(3, 0, 2 * qk), gh, gw, 1);
  if (qkv.scalar_type() == at::kFloat) {
    region_means_kernel<float>(view, means);
  } else {
    TORCH_CHECK(qkv.scalar_type() == at::kBFloat16, "qkv: expected float32 or bfloat16, got ", qkv.scalar_type());
    region_means_kernel_to_float<c10::BFloat16>(view, means);
  }
  auto logits = at::empty({N, R, R}, qkv.options().dtype(at::kFloat));
  const float* M = means.data_ptr<float>();
  float* O = logits.data_ptr<float>();
  const float scale = static_cast<float>(scale_d);
  at::parallel_for(0, N * R, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(qk_pad, 0.f);
    for (int64_t nr = begin; nr < end; ++nr) {
      const int64_t n = nr / R;
      std::copy(M + nr * 2 * qk, M + nr * 2 * qk + qk, q.begin());
      for (int64_t s = 0; s < R; ++s) {
        const float* k = M + (n * R + s) * 2 * qk + qk;
        Vec acc(0.f);
        int64_t c = 0;
        for (; c + VL <= qk; c += VL) acc = at::vec::fmadd(Vec::loadu(q.data() + c), Vec::loadu(k + c), acc);
        if (c < qk) acc = at::vec::fmadd(Vec::loadu(q.data() + c, qk - c), Vec::loadu(k + c, qk - c), acc);
        O[nr * R + s] = scale * reduce_sum(acc);
      }
    }
  });
  return logits;
}

// Turn the bfloat16 dot-product kernels on or off; returns whether they are compiled in (the setting is ignored
// where they are not).
bool set_bf16_dot_products(bool enabled) {
  use_bf16_dot.store(enabled);
#if defined(BIFORMER_AVX512_BF16)
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(biformer_cpu, m) {
  m.def("routed_attention_forward(Tensor query, Tensor key, Tensor value, Tensor topk_index, float scale, "
        "Tensor? add_to, Tensor(a!) out, Tensor(b!)? lse) -> ()");
  m.def("routed_attention_backward(Tensor query, Tensor key, Tensor value, Tensor topk_index, Tensor lse, "
        "Tensor grad_out, float scale, Tensor(a!) grad_query, Tensor(b!) grad_key, Tensor(c!) grad_value) -> ()");
  m.def("depthwise_conv(Tensor x, Tensor weight, Tensor? bias, bool add_input, Tensor? add) -> Tensor");
  m.def("depthwise_conv_weight_grad(Tensor x, Tensor grad, int kernel) -> (Tensor, Tensor)");
  m.def("image_attention_forward(Tensor qkv, Tensor topk_index, int grid_h, int grid_w, int heads, int qk_dim, "
        "float scale, Tensor? add_to, bool with_lse) -> (Tensor, Tensor)");
  m.def("image_attention_backward(Tensor qkv, Tensor topk_index, Tensor lse, Tensor grad, int grid_h, int grid_w, "
        "int heads, int qk_dim, float scale, Tensor? add_v) -> Tensor");
  m.def("region_logits(Tensor qkv, int grid_h, int grid_w, int qk_dim, float scale) -> Tensor");
  m.def("set_bf16_dot_products(bool enabled) -> bool", &set_bf16_dot_products);
}

TORCH_LIBRARY_IMPL(biformer_cpu, CPU, m) {
  m.impl("routed_attention_forward", &routed_attention_forward);
  m.impl("routed_attention_backward", &routed_attention_backward);
  m.impl("depthwise_conv", &depthwise_conv);
  m.impl("depthwise_conv_weight_grad", &depthwise_conv_weight_grad);
  m.impl("image_attention_forward", &image_attention_forward);
  m.impl("image_attention_backward", &image_attention_backward);
  m.impl("region_logits", &region_logits);
}
