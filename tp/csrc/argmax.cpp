// Greedy decoding's choice on the CPU: per row of logits, the index of the first largest value, NaN
// counting as the largest (torch.max(x, -1).indices exactly). torch.max takes ~95-116 us over one
// row of 103168 logits on an AMD EPYC (a scalar loop that tracks the index); here two vectorized
// passes, the maximum and then where it first occurs (tp/generate.py calls it through
// tp/cpu_kernels.py).
//
//   x    [M, V] float32 or bfloat16, contiguous, V >= 1
//   out  int64 [M]
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "vec.h"

#ifndef OPS_NAMESPACE
#error "build with -DOPS_NAMESPACE=<op namespace>"
#endif

namespace {

using namespace cpu_vec;

constexpr int64_t kChunk = 256;  // elements per step of the search pass (one vectorized check each)

// The first index in row[0, V) where match(value) holds, or -1; each chunk of kChunk is checked with
// a vectorized loop (no early exit) and only the chunk that holds it is walked element by element.
template <typename T, typename Match>
int64_t first_where(const T* row, int64_t V, Match match) {
  for (int64_t start = 0; start < V; start += kChunk) {
    const int64_t end = std::min(V, start + kChunk);
    int hit = 0;
    for (int64_t i = start; i < end; ++i) hit |= match(static_cast<float>(row[i]));
    if (hit)
      for (int64_t i = start; i < end; ++i)
        if (match(static_cast<float>(row[i]))) return i;
  }
  return -1;
}

template <typename T>
int64_t first_largest(const T* row, int64_t V) {
  // The maximum, and whether v - v was ever NaN (a NaN, or an infinity: the search below tells which).
  // maximum(v, m) keeps m where v is NaN.
  vec m = broadcast(-INFINITY), odd = zero();
  const int64_t vector_end = V - V % kWidth;
  for (int64_t i = 0; i < vector_end; i += kWidth) {
    const vec v = load(row + i);
    m = maximum(v, m);
    odd = odd + (v - v);
  }
  float lanes[kWidth], odd_lanes[kWidth];
  store(lanes, m);
  store(odd_lanes, odd);
  float largest = -INFINITY;
  bool maybe_nan = false;
  for (int j = 0; j < kWidth; ++j) {
    largest = lanes[j] > largest ? lanes[j] : largest;
    maybe_nan |= odd_lanes[j] != odd_lanes[j];
  }
  for (int64_t i = vector_end; i < V; ++i) {
    const float v = scalar(row[i]);
    largest = v > largest ? v : largest;
    maybe_nan |= v != v;
  }
  if (maybe_nan) {
    const int64_t first_nan = first_where(row, V, [](float v) { return int(v != v); });
    if (first_nan >= 0) return first_nan;
  }
  const int64_t i = first_where(row, V, [largest](float v) { return int(v == largest); });
  return i < 0 ? 0 : i;  // all -inf: largest is -inf and matches at 0 already
}

at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "argmax_rows runs on the CPU");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) > 0, "x: contiguous [M, V], V >= 1");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x: float32 or bfloat16");
  const int64_t M = x.size(0), V = x.size(1);
  at::Tensor out = at::empty({M}, x.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m)
      o[m] = x.scalar_type() == at::kFloat ? first_largest(x.data_ptr<float>() + m * V, V)
                                           : first_largest(x.data_ptr<c10::BFloat16>() + m * V, V);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(OPS_NAMESPACE, m) {
  m.def("argmax_rows(Tensor x) -> Tensor", argmax_rows);
}
