// Span masking hot loop; see masks.h for the contract. Semantics follow the reference
// (fairseq-style) masker: span lengths drawn per strategy, distinct span starts when overlap is
// allowed, the "parts" allocator when it is not, union of spans, then random trimming to the
// smallest row.
#include "masks.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

namespace spidr_fast {

namespace {

uint64_t splitmix64(uint64_t& x) {
  uint64_t z = (x += 0x9E3779B97F4A7C15ULL);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

// Reusable buffers: one allocation per batch rather than per row.
struct Scratch {
  std::vector<int64_t> lengths;
  std::vector<int64_t> perm;
  std::vector<uint8_t> marks;
  std::vector<std::pair<int64_t, int64_t>> parts;
};

void draw_lengths(int64_t num_mask, int64_t size, const MaskParams& p, Rng& rng, std::vector<int64_t>& out) {
  out.assign(static_cast<size_t>(num_mask), p.mask_length);
  switch (p.strategy) {
    case MaskStrategy::kStatic:
      break;
    case MaskStrategy::kUniform: {
      // Integers in [int(mask_other), 2 * mask_length].
      const int64_t lo = static_cast<int64_t>(p.mask_other);
      const int64_t span = std::max<int64_t>(1, 2 * p.mask_length + 1 - lo);
      for (auto& v : out) v = lo + rng.below(span);
      break;
    }
    case MaskStrategy::kNormal:
      // max(1, round-half-even(N(mask_length, mask_other))); nearbyint uses the default
      // round-to-nearest-even mode, as torch.round does.
      for (auto& v : out) {
        const double x = std::nearbyint(static_cast<double>(p.mask_length) + p.mask_other * rng.normal());
        v = static_cast<int64_t>(std::max(1.0, x));
      }
      break;
    case MaskStrategy::kPoisson:
      // Poisson with a rate drawn uniformly in [0, mask_length) per span.
      for (auto& v : out) v = rng.poisson(rng.uniform() * static_cast<double>(p.mask_length));
      break;
  }
  int64_t total = 0;
  for (const auto v : out) total += v;
  if (total == 0 && num_mask > 0) out[0] = std::min(p.mask_length, size - 1);
}

// Distinct starts drawn without replacement; each span marks [start, start + length) ∩ [0, size).
void spans_with_overlap(int64_t size, const std::vector<int64_t>& lengths, Rng& rng, Scratch& s) {
  const int64_t num_mask = static_cast<int64_t>(lengths.size());
  int64_t min_len = *std::min_element(lengths.begin(), lengths.end());
  if (size - min_len <= num_mask) min_len = size - num_mask - 1;
  const int64_t n = size - min_len;  // > num_mask >= 1 after the adjustment above
  const int64_t k = std::min(num_mask, n);
  s.perm.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) s.perm[i] = i;
  for (int64_t i = 0; i < k; ++i) {  // partial Fisher-Yates: the first k entries are a uniform k-subset
    const int64_t j = i + rng.below(n - i);
    std::swap(s.perm[i], s.perm[j]);
    const int64_t start = s.perm[i];
    const int64_t end = std::min(size, start + lengths[i]);
    for (int64_t t = start; t < end; ++t) s.marks[t] = 1;
  }
}

// Longest spans first, each placed in a free part chosen with probability proportional to its
// length; parts too short for the span (plus min_space) are skipped, and placing stops when none fits.
void spans_without_overlap(int64_t size, std::vector<int64_t>& lengths, int64_t min_space, Rng& rng, Scratch& s) {
  std::sort(lengths.begin(), lengths.end(), std::greater<int64_t>());
  const int64_t keep_length = lengths.back();
  s.parts.clear();
  s.parts.emplace_back(0, size);
  for (const int64_t length : lengths) {
    int64_t total = 0;
    for (const auto& [a, b] : s.parts) total += (b - a >= length + min_space) ? b - a : 0;
    if (total == 0) break;
    int64_t r = rng.below(total);
    size_t c = 0;
    for (; c < s.parts.size(); ++c) {
      const int64_t w = (s.parts[c].second - s.parts[c].first >= length + min_space)
                            ? s.parts[c].second - s.parts[c].first : 0;
      if (r < w) break;
      r -= w;
    }
    const auto [a, b] = s.parts[c];
    s.parts.erase(s.parts.begin() + static_cast<std::ptrdiff_t>(c));
    const int64_t hi = b - length;
    const int64_t start = hi > a ? a + rng.below(hi - a) : a;
    for (int64_t t = start; t < std::min(size, start + length); ++t) s.marks[t] = 1;
    if (start - a - min_space >= keep_length) s.parts.emplace_back(a, start - min_space + 1);
    if (b - start - keep_length - min_space > keep_length) s.parts.emplace_back(start + length + min_space, b);
  }
}

}  // namespace

Rng::Rng(uint64_t seed) {
  uint64_t x = seed;
  for (auto& v : s_) v = splitmix64(x);
}

uint64_t Rng::next() {
  const uint64_t result = rotl(s_[1] * 5, 7) * 9;
  const uint64_t t = s_[1] << 17;
  s_[2] ^= s_[0];
  s_[3] ^= s_[1];
  s_[1] ^= s_[2];
  s_[0] ^= s_[3];
  s_[2] ^= t;
  s_[3] = rotl(s_[3], 45);
  return result;
}

double Rng::uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

int64_t Rng::below(int64_t n) {
  // Rejection keeps it unbiased: draws in the incomplete top block are redrawn.
  const uint64_t un = static_cast<uint64_t>(n);
  const uint64_t limit = std::numeric_limits<uint64_t>::max() - std::numeric_limits<uint64_t>::max() % un;
  uint64_t x = next();
  while (x >= limit) x = next();
  return static_cast<int64_t>(x % un);
}

double Rng::normal() {
  const double u1 = 1.0 - uniform();  // (0, 1]: log is finite
  const double u2 = uniform();
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

int64_t Rng::poisson(double lam) {
  if (lam <= 0.0) return 0;
  if (lam < 10.0) {
    const double limit = std::exp(-lam);
    int64_t k = 0;
    double prod = uniform();
    while (prod > limit) {
      ++k;
      prod *= uniform();
    }
    return k;
  }
  // PTRS: W. Hormann, "The transformed rejection method for generating Poisson random variables" (1993).
  const double slam = std::sqrt(lam), loglam = std::log(lam);
  const double b = 0.931 + 2.53 * slam, a = -0.059 + 0.02483 * b;
  const double invalpha = 1.1239 + 1.1328 / (b - 3.4), vr = 0.9277 - 3.6224 / (b - 2);
  while (true) {
    const double u = uniform() - 0.5, v = uniform();
    const double us = 0.5 - std::fabs(u);
    const double k = std::floor((2 * a / us + b) * u + lam + 0.43);
    if (us >= 0.07 && v <= vr) return static_cast<int64_t>(k);
    if (k < 0 || (us < 0.013 && v > us)) continue;
    if (std::log(v) + std::log(invalpha) - std::log(a / (us * us) + b) <= -lam + k * loglam - std::lgamma(k + 1))
      return static_cast<int64_t>(k);
  }
}

void compute_span_masks(const int64_t* sizes, const int64_t* num_masks, int64_t batch, const MaskParams& params,
                        uint64_t seed, bool equalize, std::vector<int64_t>& flat, std::vector<int64_t>& offsets) {
  Rng rng(seed);
  Scratch s;
  flat.clear();
  offsets.assign(1, 0);
  for (int64_t row = 0; row < batch; ++row) {
    const int64_t size = sizes[row], num_mask = num_masks[row];
    s.marks.assign(static_cast<size_t>(std::max<int64_t>(size, 0)), 0);
    if (size > 0 && num_mask > 0) {
      draw_lengths(num_mask, size, params, rng, s.lengths);
      if (params.no_overlap) {
        spans_without_overlap(size, s.lengths, params.min_space, rng, s);
      } else {
        spans_with_overlap(size, s.lengths, rng, s);
      }
    }
    for (int64_t t = 0; t < size; ++t)
      if (s.marks[t]) flat.push_back(t);
    offsets.push_back(static_cast<int64_t>(flat.size()));
  }
  if (!equalize || batch == 0) return;

  int64_t target = std::numeric_limits<int64_t>::max();
  for (int64_t row = 0; row < batch; ++row) target = std::min(target, offsets[row + 1] - offsets[row]);
  // Selection sampling (Knuth's algorithm S) keeps a uniform `target`-subset of each row, in order,
  // so trimmed rows stay sorted without a sort. Compacts `flat` in place (writes never pass reads).
  int64_t write = 0;
  for (int64_t row = 0; row < batch; ++row) {
    const int64_t begin = offsets[row], count = offsets[row + 1] - begin;
    int64_t needed = target;
    for (int64_t i = 0; i < count && needed > 0; ++i) {
      if (needed == count - i || rng.below(count - i) < needed) {
        flat[write++] = flat[begin + i];
        --needed;
      }
    }
  }
  flat.resize(static_cast<size_t>(write));
  for (int64_t row = 0; row <= batch; ++row) offsets[row] = row * target;
}

}  // namespace spidr_fast
