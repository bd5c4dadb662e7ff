// pybind11 module `spidr_fast._C`: NumPy in, NumPy out, no torch headers (the build never needs torch).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "masks.h"

namespace py = pybind11;
using Int64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

namespace {

py::tuple span_masks(const Int64Array& sizes, const Int64Array& num_masks, int64_t mask_length, int strategy,
                     double mask_other, bool no_overlap, int64_t min_space, uint64_t seed, bool equalize) {
  if (sizes.ndim() != 1 || num_masks.ndim() != 1 || sizes.shape(0) != num_masks.shape(0))
    throw std::invalid_argument("sizes and num_masks must be 1-D arrays of the same length");
  if (strategy < 0 || strategy > 3) throw std::invalid_argument("strategy must be 0..3, got " + std::to_string(strategy));
  if (mask_length < 1) throw std::invalid_argument("mask_length must be >= 1");
  spidr_fast::MaskParams params;
  params.mask_length = mask_length;
  params.strategy = static_cast<spidr_fast::MaskStrategy>(strategy);
  params.mask_other = mask_other;
  params.no_overlap = no_overlap;
  params.min_space = min_space;
  const int64_t batch = sizes.shape(0);
  std::vector<int64_t> flat, offsets;
  {
    // Pure C++ from here: let DataLoader threads (or the training thread) run meanwhile.
    py::gil_scoped_release release;
    spidr_fast::compute_span_masks(sizes.data(), num_masks.data(), batch, params, seed, equalize, flat, offsets);
  }
  Int64Array flat_out(static_cast<py::ssize_t>(flat.size()));
  Int64Array offsets_out(static_cast<py::ssize_t>(offsets.size()));
  std::copy(flat.begin(), flat.end(), flat_out.mutable_data());
  std::copy(offsets.begin(), offsets.end(), offsets_out.mutable_data());
  return py::make_tuple(flat_out, offsets_out);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "spidr_fast C++ helpers (span masking).";
  m.def("span_masks", &span_masks, py::arg("sizes"), py::arg("num_masks"), py::arg("mask_length"),
        py::arg("strategy"), py::arg("mask_other"), py::arg("no_overlap"), py::arg("min_space"), py::arg("seed"),
        py::arg("equalize"),
        R"doc(Span masks for `len(sizes)` rows.

Args:
  sizes: int64 (B,), valid frames per row.
  num_masks: int64 (B,), number of spans per row (already rounded).
  strategy: 0 static, 1 uniform, 2 normal, 3 poisson.
  seed: uint64 seed of the generator (xoshiro256**).
  equalize: trim every row at random to the smallest row count.

Returns:
  (flat int64 (N,), offsets int64 (B + 1,)): row i's sorted indices are flat[offsets[i]:offsets[i + 1]].)doc");
}
