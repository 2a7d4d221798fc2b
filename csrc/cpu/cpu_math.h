// What the CPU kernel files (focal_cpu_kernels.cpp, softmax_cpu_kernels.cpp) share: the vector
// Math policy of focal_math.h and its fast functions, the subnormal flush, and the block reads and
// writes that convert any floating dtype to the math type. Included once per instruction set:
// each kernel file is compiled once per FOCAL_CPU_ISA (see setup.py).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/cpu/vec/vec.h>

#include <limits>
#include <type_traits>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

#include "focal.h"

#ifndef FOCAL_CPU_ISA
#error "FOCAL_CPU_ISA must name the instruction set this file is compiled for (see setup.py)"
#endif

namespace focal::cpu::FOCAL_CPU_ISA {
namespace {

using at::vec::Vectorized;

// 1 / v. A division has a throughput of ~10 cycles per vector on x86 cores; the hardware
// reciprocal estimate refined by Newton steps, r + r * (1 - v * r), costs 3-5 and is within
// 1 ulp of 1 / v for the positive, normal v it gets here (1 + exp(-|x|), log1p's 1 + v / 2, q).
// For v = 0 or inf the AVX2 and AVX-512 float estimates below give NaN, not inf or 0 (this
// generic version divides): q = 0 is masked out where 1 / q is used.
template <typename S>
Vectorized<S> fast_reciprocal(const Vectorized<S>& v) {
  return Vectorized<S>(S(1)) / v;
}

#if defined(CPU_CAPABILITY_AVX512)
template <>
Vectorized<float> fast_reciprocal(const Vectorized<float>& v) {
  const __m512 estimate = _mm512_rcp14_ps(v);  // relative error < 2^-14
  // The Newton step squares the relative error; written as a correction added to r, its
  // rounding stays below half an ulp.
  return _mm512_fmadd_ps(estimate, _mm512_fnmadd_ps(v, estimate, _mm512_set1_ps(1.0f)), estimate);
}
#elif defined(CPU_CAPABILITY_AVX2)
template <>
Vectorized<float> fast_reciprocal(const Vectorized<float>& v) {
  // Relative error < 1.5 * 2^-12: one Newton step would leave ~2^-23, so take two.
  __m256 estimate = _mm256_rcp_ps(v);
  for (int step = 0; step < 2; ++step) {
    const __m256 error = _mm256_fnmadd_ps(v, estimate, _mm256_set1_ps(1.0f));
    estimate = _mm256_fmadd_ps(estimate, error, estimate);
  }
  return estimate;
}
#endif

// The vector Math policy of focal_terms (focal_math.h); its transcendental functions follow.
template <typename S>
Vectorized<S> exp_nonpositive(const Vectorized<S>& v);
template <typename S>
Vectorized<S> log1p_unit(const Vectorized<S>& v);
template <typename S>
Vectorized<S> log_unit(const Vectorized<S>& v);

template <typename S>
struct VecMath {
  using Vec = Vectorized<S>;
  // at::vec::fmadd is one instruction on AVX2 and AVX-512; elsewhere it may be a * b + c.
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  static constexpr bool kFusedMultiplyAdd = true;
#else
  static constexpr bool kFusedMultiplyAdd = false;
#endif
  static Vec exp(const Vec& v) { return exp_nonpositive(v); }
  static Vec log1p(const Vec& v) { return log1p_unit(v); }
  // exp(exponent * log|base|): several times faster than SLEEF's pow, and exact enough for the
  // exponents > 0 it gets (pow(0, e) = exp(-inf) = 0). The product is capped at float's
  // overflow, 128 ln 2, where the AVX2 exp builds 2^n in the exponent bits (powers above
  // 2^127.5, the last 29% below FLT_MAX, round up to inf). A negative base (q of a target
  // outside [0, 1]) follows pow: the power negated for an odd whole exponent, NaN for an
  // exponent that is not whole.
  static Vec pow(const Vec& base, const Vec& exponent) {
    constexpr S kLogOverflow = std::is_same_v<S, float> ? S(88.7228391f)
                                                         : std::numeric_limits<S>::infinity();
    const Vec magnitude =
        exp_nonpositive(at::vec::minimum(exponent * log_unit(base.abs()), Vec(kLogOverflow)));
    const Vec half = Vec(S(0.5)) * exponent;
    const Vec signed_power = select(half.trunc() != half, Vec(S(0)) - magnitude, magnitude);
    const Vec negative_base_power =
        select(exponent.trunc() != exponent, Vec(std::numeric_limits<S>::quiet_NaN()), signed_power);
    return select(base < Vec(S(0)), negative_base_power, magnitude);
  }
  static Vec sqrt(const Vec& v) { return v.sqrt(); }
  static Vec log(const Vec& v) { return log_unit(v); }
  static Vec reciprocal(const Vec& v) { return fast_reciprocal(v); }
  static Vec fma(const Vec& a, const Vec& b, const Vec& c) { return at::vec::fmadd(a, b, c); }
  static Vec abs(const Vec& v) { return v.abs(); }
  // One instruction, where at::vec::maximum spends three on NaN in b; a NaN in a still
  // propagates.
  static Vec max(const Vec& a, const Vec& b) { return at::vec::clamp_min(a, b); }
  static Vec min(const Vec& a, const Vec& b) { return at::vec::clamp_max(a, b); }
  static Vec clamp(const Vec& v, const Vec& low, const Vec& high) {
    return at::vec::clamp(v, low, high);  // NaN stays NaN
  }
  static Vec select(const Vec& mask, const Vec& if_true, const Vec& if_false) {
    return Vec::blendv(if_false, if_true, mask);
  }
  // The lanes of v > 0, compared as integers (focal_math.h's positive_bits): FlushSubnormals
  // makes a float comparison read a subnormal v as 0.
  static Vec positive(const Vec& v) {
    using Bits = at::vec::int_same_size_t<S>;
    static_assert(Vectorized<Bits>::size() == Vec::size(), "one integer lane per lane");
    alignas(64) S lanes[Vec::size()];
    v.store(lanes);
    const Vectorized<Bits> mask = Vectorized<Bits>::loadu(lanes) > Vectorized<Bits>(0);
    mask.store(lanes);  // all bits set where true: select's mask
    return Vec::loadu(lanes);
  }
};

// exp(v) for v <= 0, nearly all the loss needs (exp(-|x|), and q^gamma = exp(gamma log q) with
// q <= 1 for targets in [0, 1]; pow caps larger arguments at float's overflow):
// SLEEF's exp where nothing faster is written.
template <typename S>
Vectorized<S> exp_nonpositive(const Vectorized<S>& v) {
  return v.exp();
}

// ln 2 = kLn2High + kLn2Low, the high part with 16 significant bits so that k * kLn2High is exact
// for the |k| <= 150 of float exponents.
constexpr float kLn2High = 0.693145751953125f;
constexpr float kLn2Low = 1.42860677e-06f;
constexpr float kLogFloatMin = -87.3365402f;  // ln(FLT_MIN), rounded up: exp of it is normal

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// float: exp(v) = 2^n * exp(r) with n = round(v / ln 2), r = v - n ln 2 in [-ln2/2, ln2/2],
// exp(r) = 1 + r + r^2 Q(r), Q a quartic fitted to (exp(r) - 1 - r) / r^2 (fit error < 4e-9
// relative). Half the instructions of SLEEF's exp (which also serves positive and huge
// arguments); within 1.1 ulp of exp.
template <>
Vectorized<float> exp_nonpositive(const Vectorized<float>& v) {
  using Vec = Vectorized<float>;
#if defined(CPU_CAPABILITY_AVX512)
  // Below -104 the result is 0 (scalef underflows; a subnormal is flushed anyway); the clamp
  // keeps -inf from making r = -inf + inf.
  const Vec clamped = _mm512_max_ps(_mm512_set1_ps(-104.0f), v);
  const Vec n = _mm512_roundscale_ps(clamped * Vec(1.44269504f),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  // 2^n is built in the exponent bits, which need n >= -126: below ln(FLT_MIN) = -87.3365
  // (exp < 1.2e-38, the flush-to-zero threshold) the result is 0.
  const Vec clamped = _mm256_max_ps(_mm256_set1_ps(kLogFloatMin), v);
  const Vec n = _mm256_round_ps(clamped * Vec(1.44269504f),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#endif
  Vec r = at::vec::fnmadd(n, Vec(kLn2High), clamped);
  r = at::vec::fnmadd(n, Vec(kLn2Low), r);
  Vec poly = at::vec::fmadd(r, Vec(0.0013950478f), Vec(0.0083688820f));
  poly = at::vec::fmadd(r, poly, Vec(0.041666206f));
  poly = at::vec::fmadd(r, poly, Vec(0.16666518f));
  poly = at::vec::fmadd(r, poly, Vec(0.5f));
  const Vec exp_r = at::vec::fmadd(r * r, poly, r) + Vec(1.0f);
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_scalef_ps(exp_r, n);
#else
  const __m256i exponent = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const Vec scaled = Vec(exp_r) * Vec(_mm256_castsi256_ps(exponent));
  return Vec::blendv(scaled, Vec(0.0f), v < Vec(kLogFloatMin));
#endif
}
#endif

// log(1 + v) for v in [0, 1]. log(u) + log(1 + (v - (u - 1)) / u) with u = 1 + v, where
// v - (u - 1) is exactly the rounding error of u: as exact as log1p (also when u rounds to 1),
// for one log (ATen's vectorized log1p is several times slower than its log).
template <typename S>
Vectorized<S> log1p_unit(const Vectorized<S>& v) {
  const Vectorized<S> one(S(1));
  const Vectorized<S> u = one + v;
  return u.log() + (v - (u - one)) / u;
}

// float: the shared polynomial (focal_math.h), also for v in [-0.25, 0) as log_unit needs.
template <>
Vectorized<float> log1p_unit(const Vectorized<float>& v) {
  return log1p_float<VecMath<float>>(v);
}

// log(v) for v >= 0 (|q| in q^gamma): SLEEF's log where nothing faster is written.
template <typename S>
Vectorized<S> log_unit(const Vectorized<S>& v) {
  return v.log();
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// float: v = m * 2^k with m in [0.75, 1.5), log(v) = k ln 2 + log1p(m - 1), where m - 1 is exact
// and lies in log1p_unit's domain. Half the cost of SLEEF's log (which SLEEF spends on 1-ulp
// accuracy that exp(gamma * log(q)) cannot keep anyway: log q near -87 is only good to ~4e-6).
template <>
Vectorized<float> log_unit(const Vectorized<float>& v) {
  using Vec = Vectorized<float>;
#if defined(CPU_CAPABILITY_AVX512)
  // getexp(0) = -inf, so log(0) = -inf and q^gamma = 0 there; a negative v gives NaN (pow
  // passes |q|).
  const Vec m = _mm512_getmant_ps(v, _MM_MANT_NORM_p75_1p5, _MM_MANT_SIGN_nan);
  const __m512 exponent = _mm512_getexp_ps(v);  // floor(log2(v)); m < 1 halved the mantissa
  const __mmask16 halved = _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.0f), _CMP_LT_OQ);
  const Vec k = _mm512_mask_add_ps(exponent, halved, exponent, _mm512_set1_ps(1.0f));
#else
  // Subtracting the bits of 0.75 puts k in the exponent field and m's bits in the rest.
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i shifted = _mm256_sub_epi32(bits, _mm256_set1_epi32(0x3f400000));
  const __m256i k_bits = _mm256_srai_epi32(shifted, 23);
  const Vec m = _mm256_castsi256_ps(_mm256_sub_epi32(bits, _mm256_slli_epi32(k_bits, 23)));
  const Vec k = _mm256_cvtepi32_ps(k_bits);
#endif
  const Vec log_m = log1p_unit(m - Vec(1.0f));
  const Vec log_v = at::vec::fmadd(k, Vec(kLn2High), at::vec::fmadd(k, Vec(kLn2Low), log_m));
#if defined(CPU_CAPABILITY_AVX512)
  return log_v;
#else
  // The bit split needs a normal v: 0 (and the subnormals flush-to-zero makes 0) give -inf; a
  // negative or NaN v gives NaN (pow passes |q|).
  const Vec log_normal = Vec::blendv(log_v, Vec(-std::numeric_limits<float>::infinity()),
                                     v < Vec(std::numeric_limits<float>::min()));
  return Vec::blendv(Vec(std::numeric_limits<float>::quiet_NaN()), log_normal, v >= Vec(0.0f));
#endif
}
#endif

// Flushes subnormal floats to zero (FTZ, DAZ) on this thread while alive. Saturated logits make
// subnormal intermediates (e.g. exp(-95), or q^2 * CE near 1e-39), which x86 cores handle in
// microcode at up to 5x the cost of the whole loss; values below 1.2e-38 (float32) are
// meaningless for a loss or its gradient, so they become 0.
class FlushSubnormals {
 public:
#if defined(__x86_64__) || defined(_M_X64)
  FlushSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFlushToZero | kDenormalsAreZero); }
  ~FlushSubnormals() { _mm_setcsr(saved_); }

 private:
  static constexpr unsigned kFlushToZero = 0x8000;
  static constexpr unsigned kDenormalsAreZero = 0x0040;
  unsigned saved_;
#endif
};

// float64 tensors compute in double, all others in float.
template <typename Fn>
void with_math_type(const at::Tensor& tensor, Fn&& fn) {
  if (tensor.scalar_type() == at::kDouble) {
    fn(double{});
  } else {
    fn(float{});
  }
}

// value stored into the one element of a 0-d floating tensor, converted as torch converts (to
// 16-bit through float), without fill_'s dispatch; beyond the dtype's range it is inf, as torch's
// sums give, where fill_ raised (a reduced loss is written once per call).
inline void store_scalar(const at::Tensor& tensor, double value) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensor.scalar_type(), "focal_store", [&] {
    *tensor.mutable_data_ptr<scalar_t>() = c10::convert<scalar_t>(value);
  });
}

// A contiguous tensor's data and dtype, looked up once per call rather than once per block.
struct RawTensor {
  void* data;
  at::ScalarType dtype;

  explicit RawTensor(const at::Tensor& tensor)
      : data(tensor.defined() ? tensor.data_ptr() : nullptr),
        dtype(tensor.defined() ? tensor.scalar_type() : at::ScalarType::Undefined) {}

  template <typename S>
  bool holds() const {
    return dtype == c10::CppTypeToScalarType<S>::value;
  }
};

// n values of src from offset on, as S: src's own memory when it already holds S, else a
// conversion into buffer.
template <typename S>
const S* read_block(const RawTensor& src, int64_t offset, int64_t n, S* buffer) {
  if (src.holds<S>()) {
    return static_cast<const S*>(src.data) + offset;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.dtype, "focal_read", [&] {
    at::vec::convert(static_cast<const scalar_t*>(src.data) + offset, buffer, n);
  });
  return buffer;
}

// Where to compute n values of dst from offset on: dst's own memory when it holds S, else
// buffer, which store_block then converts into dst.
template <typename S>
S* block_destination(const RawTensor& dst, int64_t offset, S* buffer) {
  return dst.holds<S>() ? static_cast<S*>(dst.data) + offset : buffer;
}

template <typename S>
void store_block(const RawTensor& dst, int64_t offset, int64_t n, const S* computed) {
  if (dst.holds<S>()) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dst.dtype, "focal_store", [&] {
    at::vec::convert(computed, static_cast<scalar_t*>(dst.data) + offset, n);
  });
}

}  // namespace
}  // namespace focal::cpu::FOCAL_CPU_ISA
