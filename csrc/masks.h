// Span masking over frames (wav2vec 2.0 / HuBERT / SpidR), pure C++17: no torch, no Python.
//
// Inputs per row: the number of valid frames `size` and the number of spans `num_mask` (the
// probabilistic rounding of mask_prob * size / mask_length is done by the caller, in Python, so
// that the C++ and NumPy paths share it). Output per row: the sorted, unique masked frame indices
// in [0, size). With `equalize`, every row is trimmed at random to the smallest row count, so the
// result reshapes to (batch, num_masked).
#pragma once

#include <cstdint>
#include <vector>

namespace spidr_fast {

enum class MaskStrategy : int { kStatic = 0, kUniform = 1, kNormal = 2, kPoisson = 3 };

struct MaskParams {
  int64_t mask_length = 10;
  MaskStrategy strategy = MaskStrategy::kStatic;
  double mask_other = 0.0;
  bool no_overlap = false;
  int64_t min_space = 1;
};

// xoshiro256** seeded through splitmix64: fast, small state, and identical on every platform
// (std:: distributions are implementation-defined, so all variates below are written out).
class Rng {
 public:
  explicit Rng(uint64_t seed);
  uint64_t next();
  double uniform();              // [0, 1)
  int64_t below(int64_t n);      // uniform integer in [0, n), n > 0, unbiased
  double normal();               // standard normal (Box-Muller)
  int64_t poisson(double lam);   // Knuth below 10, Hormann's PTRS above

 private:
  uint64_t s_[4];
};

// Masks `batch` rows; writes the concatenated per-row indices to `flat` and row boundaries
// (batch + 1 entries) to `offsets`.
void compute_span_masks(const int64_t* sizes, const int64_t* num_masks, int64_t batch, const MaskParams& params,
                        uint64_t seed, bool equalize, std::vector<int64_t>& flat, std::vector<int64_t>& offsets);

}  // namespace spidr_fast
