// Experiment for issue 5 item 8: a fused C++/OpenMP codebook assignment on CPU, against the PyTorch paths.
// Not part of the package: run.sh builds it in a temp folder and times it (see RESULTS.md).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <cstdint>
#include <limits>
#include <vector>
namespace py = pybind11;
using F = py::array_t<float, py::array::c_style | py::array::forcecast>;
using L = py::array_t<int64_t, py::array::c_style>;

// labels[c, n] = argmin_k ||c_k||^2 - 2 x_n . c_k, ties to the lowest k. Blocks of 4 frames share each codeword load.
L assign(const F& x, const F& centers) {
  const int64_t C = x.shape(0), N = x.shape(1), D = x.shape(2), K = centers.shape(1);
  L labels({C, N});
  const float* xp = x.data(); const float* cp = centers.data(); int64_t* lp = labels.mutable_data();
  std::vector<float> norms(C * K);
  {
    py::gil_scoped_release release;
    for (int64_t c = 0; c < C; ++c)
      for (int64_t k = 0; k < K; ++k) {
        const float* ck = cp + (c * K + k) * D; float s = 0.f;
        #pragma omp simd reduction(+:s)
        for (int64_t d = 0; d < D; ++d) s += ck[d] * ck[d];
        norms[c * K + k] = s;
      }
    const int64_t RB = 4, blocks = (N + RB - 1) / RB;
    #pragma omp parallel for collapse(2) schedule(static)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t n0 = b * RB, nr = std::min(RB, N - n0);
        const float* xr[RB];
        for (int64_t r = 0; r < RB; ++r) xr[r] = xp + (c * N + n0 + std::min(r, nr - 1)) * D;
        float best[RB]; int64_t arg[RB];
        for (int64_t r = 0; r < RB; ++r) { best[r] = std::numeric_limits<float>::infinity(); arg[r] = 0; }
        for (int64_t k = 0; k < K; ++k) {
          const float* ck = cp + (c * K + k) * D;
          float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
          #pragma omp simd reduction(+:s0,s1,s2,s3)
          for (int64_t d = 0; d < D; ++d) {
            const float v = ck[d];
            s0 += xr[0][d] * v; s1 += xr[1][d] * v; s2 += xr[2][d] * v; s3 += xr[3][d] * v;
          }
          const float nk = norms[c * K + k];
          const float sc[RB] = {nk - 2.f * s0, nk - 2.f * s1, nk - 2.f * s2, nk - 2.f * s3};
          for (int64_t r = 0; r < RB; ++r) if (sc[r] < best[r]) { best[r] = sc[r]; arg[r] = k; }
        }
        for (int64_t r = 0; r < nr; ++r) lp[c * N + n0 + r] = arg[r];
      }
  }
  return labels;
}
PYBIND11_MODULE(cpu_assign, m) { m.def("assign", &assign); }
