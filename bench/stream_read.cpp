// bench/decode.py's second read ceiling: a float32 sum over a buffer read the way tp/csrc/gemv.cpp
// reads weights (rows of 2048 floats; each thread's rows cut in 4 parts, one sequential stream
// each, a vector of each row of every part per step) with the least arithmetic (one FMA per vector
// read, as gemv's float32 path). torch's `sum` reads one stream a thread, which some hosts serve
// more slowly than several; bench/decode.py prints both.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <vector>

#include "../tp/csrc/vec.h"

namespace {

using namespace cpu_vec;
constexpr int64_t kRow = 2048, kStreams = 4;

double stream_sum(const torch::Tensor& buf) {
  TORCH_CHECK(buf.scalar_type() == torch::kFloat && buf.is_contiguous() && buf.numel() % kRow == 0,
              "buf: contiguous float32, a multiple of 2048 values");
  const float* p = buf.data_ptr<float>();
  const int64_t rows = buf.numel() / kRow;
  std::vector<double> partial(at::get_num_threads(), 0.0);  // one slot a thread
  at::parallel_for(0, rows, kStreams, [&](int64_t begin, int64_t end) {
    const int64_t part = (end - begin) / kStreams;
    const vec one = broadcast(1.0f);
    vec acc[kStreams] = {zero(), zero(), zero(), zero()};
    for (int64_t i = 0; i < part; ++i) {
      const float* row[kStreams];
      for (int64_t s = 0; s < kStreams; ++s) row[s] = p + (begin + i + s * part) * kRow;
      for (int64_t k = 0; k < kRow; k += kWidth)
        for (int64_t s = 0; s < kStreams; ++s) acc[s] = fma(one, load(row[s] + k), acc[s]);
    }
    for (int64_t r = begin + kStreams * part; r < end; ++r)  // the rows past the 4 equal parts
      for (int64_t k = 0; k < kRow; k += kWidth) acc[0] = fma(one, load(p + r * kRow + k), acc[0]);
    double total = 0;
    for (const vec& a : acc) total += sum(a);
    partial[at::get_thread_num()] = total;
  });
  double total = 0;
  for (double v : partial) total += v;
  return total;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("stream_sum", &stream_sum); }
