// The shared-memory collectives' hot path (tp/comm.py's SharedMemoryComm), one call each instead of
// the ~10 torch and numpy operations and the Python polling loop they took: ~35 us an all-reduce
// of one token's hidden state between 2 ranks on an AMD EPYC, most of it interpreter and dispatch.
//
//   data   uint8 [2, W, max_bytes]: two slots (alternating between consecutive collectives) of one
//          row per rank, in a /dev/shm file every rank maps;  flags  int64 [W] after it
//   x      contiguous, at most max_bytes
// shm_exchange: copy x into row `rank` of slot seq % 2, publish seq in flags[rank] (a release store:
//   the copy is visible before the flag), then wait until every rank has published seq (acquire
//   loads): a short spin, then sched_yield (more ranks than cores); after timeout_s a RuntimeError
//   naming the ranks that never arrived.
// shm_all_reduce: shm_exchange, then x = the sum of every rank's row in rank order, accumulated in
//   float32 and rounded once to x's dtype (as torch.sum over the rank dimension): every rank computes
//   the same sum in the same order, so all hold bit-identical results.
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>
#include <sched.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <string>

#ifndef OPS_NAMESPACE
#error "build with -DOPS_NAMESPACE=<op namespace>"
#endif

namespace {

using Clock = std::chrono::steady_clock;
constexpr auto kSpin = std::chrono::microseconds(20);  // then yield the core to a rank that may need it


void exchange(const at::Tensor& x, const at::Tensor& data, const at::Tensor& flags, int64_t rank, int64_t seq,
              double timeout_s) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "x: contiguous, on the CPU");
  TORCH_CHECK(data.scalar_type() == at::kByte && data.dim() == 3 && data.size(0) == 2 && data.is_contiguous(),
              "data: uint8 [2, world_size, max_bytes]");
  TORCH_CHECK(flags.scalar_type() == at::kLong && flags.dim() == 1 && flags.size(0) == data.size(1) &&
              flags.is_contiguous(), "flags: int64 [world_size]");
  const int64_t W = data.size(1), max_bytes = data.size(2), nbytes = x.numel() * x.element_size();
  TORCH_CHECK(rank >= 0 && rank < W, "rank out of range");
  TORCH_CHECK(nbytes <= max_bytes, "x: ", nbytes, " bytes, past a slot's ", max_bytes);
  std::memcpy(data.data_ptr<uint8_t>() + ((seq % 2) * W + rank) * max_bytes, x.data_ptr(), nbytes);
  int64_t* f = flags.data_ptr<int64_t>();
  __atomic_store_n(&f[rank], seq, __ATOMIC_RELEASE);
  const auto start = Clock::now();
  const auto deadline = start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s));
  for (int64_t r = 0; r < W; ++r) {
    while (__atomic_load_n(&f[r], __ATOMIC_ACQUIRE) < seq) {
      const auto now = Clock::now();
      if (now - start < kSpin) {
        _mm_pause();
        continue;
      }
      if (now > deadline) {
        std::string late;
        for (int64_t q = 0; q < W; ++q)
          if (__atomic_load_n(&f[q], __ATOMIC_ACQUIRE) < seq) late += (late.empty() ? "" : ", ") + std::to_string(q);
        TORCH_CHECK(false, "rank(s) [", late, "] did not reach collective #", seq, " within ", timeout_s,
                    " s: a peer process died or hangs");
      }
      sched_yield();
    }
  }
}

template <typename T>
void sum_rows(const uint8_t* slot, int64_t W, int64_t max_bytes, int64_t n, T* out) {
  constexpr int64_t kChunk = 1024;  // float32 partial sums on the stack, each loop below vectorized
  float acc[kChunk];
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t len = std::min(kChunk, n - start);
    const T* first = reinterpret_cast<const T*>(slot) + start;
    for (int64_t i = 0; i < len; ++i) acc[i] = static_cast<float>(first[i]);
    for (int64_t r = 1; r < W; ++r) {
      const T* row = reinterpret_cast<const T*>(slot + r * max_bytes) + start;
      for (int64_t i = 0; i < len; ++i) acc[i] += static_cast<float>(row[i]);
    }
    for (int64_t i = 0; i < len; ++i) out[start + i] = static_cast<T>(acc[i]);
  }
}

void shm_all_reduce(const at::Tensor& x, const at::Tensor& data, const at::Tensor& flags, int64_t rank, int64_t seq,
                    double timeout_s) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x: float32 or bfloat16");
  exchange(x, data, flags, rank, seq, timeout_s);
  const int64_t W = data.size(1), max_bytes = data.size(2);
  const uint8_t* slot = data.data_ptr<uint8_t>() + (seq % 2) * W * max_bytes;
  if (x.scalar_type() == at::kFloat) sum_rows(slot, W, max_bytes, x.numel(), x.data_ptr<float>());
  else sum_rows(slot, W, max_bytes, x.numel(), x.data_ptr<c10::BFloat16>());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(OPS_NAMESPACE, m) {
  m.def("shm_exchange(Tensor x, Tensor data, Tensor flags, int rank, int seq, float timeout_s) -> ()", exchange);
  m.def("shm_all_reduce(Tensor(a!) x, Tensor data, Tensor flags, int rank, int seq, float timeout_s) -> ()",
        shm_all_reduce);
}
