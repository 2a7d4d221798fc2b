// CPU kernels: the fused forward (loss and gradients in one pass) and the backward scaling.
//
// setup.py compiles this file once per instruction set (FOCAL_CPU_ISA = DEFAULT, AVX2, AVX512,
// with the matching -m flags and CPU_CAPABILITY) and focal_cpu.cpp picks one at run time.
//
// Work is split into fixed chunks of kChunk elements whatever the thread count, each chunk summed
// in a fixed order and the chunk sums added in order, so reductions are bitwise the same at any
// number of threads. Inside a chunk, blocks of kBlock elements are converted to the math type
// (float, or double for float64) on the stack, computed with at::vec, and converted back: every
// pairing of input and target dtypes runs without a full-size float copy.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <limits>
#include <vector>

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

constexpr int64_t kBlock = 512;
constexpr int64_t kChunk = 64 * kBlock;

// 1 / v. A division has a throughput of ~10 cycles per vector on x86 cores; the hardware
// reciprocal estimate refined by Newton steps, r + r * (1 - v * r), costs 3-5 and is within
// 1 ulp of 1 / v for the positive, normal v it gets here (1 + exp(-|x|), 2 + exp(-|x|) and q).
// For v = 0 or inf it gives NaN, not inf or 0: q = 0 is masked out where 1 / q is used.
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
  static Vec reciprocal(const Vec& v) { return fast_reciprocal(v); }
  static Vec fma(const Vec& a, const Vec& b, const Vec& c) { return at::vec::fmadd(a, b, c); }
  static Vec abs(const Vec& v) { return v.abs(); }
  // One instruction, where at::vec::maximum spends three on NaN in b; a NaN in a still
  // propagates.
  static Vec max(const Vec& a, const Vec& b) { return at::vec::clamp_min(a, b); }
  static Vec select(const Vec& mask, const Vec& if_true, const Vec& if_false) {
    return Vec::blendv(if_false, if_true, mask);
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

// Calls fn(i, row, first_class, length) for each run of the n elements from offset on that
// lie in one row: elements i .. i + length - 1 of the block, classes first_class onwards.
template <typename Fn>
void for_each_row_run(int64_t offset, int64_t n, int64_t classes, Fn&& fn) {
  for (int64_t i = 0; i < n;) {
    const int64_t row = (offset + i) / classes;
    const int64_t first_class = offset + i - row * classes;
    const int64_t length = std::min(n - i, classes - first_class);
    fn(i, row, first_class, length);
    i += length;
  }
}

// Targets of n elements from offset on, from class labels: the row's score (1 without scores)
// for the labelled class, else 0; valid is 0 in ignored rows, else 1. Returns how many elements
// are not ignored.
template <typename S>
int64_t label_targets(const ForwardArgs& args, const int64_t* labels, const S* scores,
                      int64_t offset, int64_t n, S* targets, S* valid) {
  std::fill(targets, targets + n, S(0));
  int64_t counted = 0;
  for_each_row_run(offset, n, args.classes, [&](int64_t i, int64_t row, int64_t first_class,
                                                int64_t length) {
    const int64_t label = labels[row];
    const bool ignored = label == args.ignore_index;
    if (!ignored && label >= first_class && label < first_class + length) {
      targets[i + label - first_class] = scores != nullptr ? scores[row] : S(1);
    }
    std::fill(valid + i, valid + i + length, ignored ? S(0) : S(1));
    counted += ignored ? 0 : length;
  });
  return counted;
}

// d(loss)/d(scores) of the rows whose labelled class lies among the n elements from offset
// on: that element's d(loss)/d(target). Only one element of a row is labelled, so only one
// block writes each row.
template <typename S>
void gather_score_gradients(const ForwardArgs& args, const int64_t* labels, int64_t offset,
                            int64_t n, const S* grad_targets, S* grad_scores) {
  for_each_row_run(offset, n, args.classes, [&](int64_t i, int64_t row, int64_t first_class,
                                                int64_t length) {
    const int64_t label = labels[row];
    if (label != args.ignore_index && label >= first_class && label < first_class + length) {
      grad_scores[row] = grad_targets[i + label - first_class];
    }
  });
}

// Weights of n elements from offset on (there is a weight tensor): the weight's own memory
// when it has one per element, else the per-row or per-class values spread into buffer.
template <typename S>
const S* element_weights(const ForwardArgs& args, const S* weight, int64_t offset, int64_t n,
                         S* buffer) {
  if (args.weight_kind == WeightKind::Element) {
    return weight + offset;
  }
  const bool per_row = args.weight_kind == WeightKind::Row;
  for_each_row_run(offset, n, args.classes, [&](int64_t i, int64_t row, int64_t first_class,
                                                int64_t length) {
    if (per_row) {
      std::fill(buffer + i, buffer + i + length, weight[row]);
    } else {
      std::copy(weight + first_class, weight + first_class + length, buffer + i);
    }
  });
  return buffer;
}

// Computes n elements; writes the loss where loss is non-null, the unweighted loss where
// unweighted is non-null and the requested gradients; returns the sum of the loss over the
// block, added in a fixed order. coeffs is a copy, which no store of the loop can alias: the
// compiler may keep its broadcasts out of the loop (3-4 instructions fewer per AVX-512 vector).
template <typename S, GammaMode kGamma, bool kGradInputs, bool kGradTargets, bool kFamily>
double compute_block(const S* x, const S* t, const S* w, const S* v, int64_t n,
                     const LossCoeffs<S> coeffs, S* loss, S* unweighted, S* grad_inputs,
                     S* grad_targets) {
  using Vec = Vectorized<S>;
  Vec vec_sum(S(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const auto terms = loss_terms<VecMath<S>, kGamma, kGradInputs, kGradTargets, kFamily>(
        Vec::loadu(x + i), Vec::loadu(t + i), w != nullptr ? Vec::loadu(w + i) : Vec(S(1)),
        v != nullptr ? Vec::loadu(v + i) : Vec(S(1)), coeffs);
    vec_sum = vec_sum + terms.loss;
    if (loss != nullptr) {
      terms.loss.store(loss + i);
    }
    if (unweighted != nullptr) {
      terms.unweighted_loss.store(unweighted + i);
    }
    if constexpr (kGradInputs) {
      terms.grad_inputs.store(grad_inputs + i);
    }
    if constexpr (kGradTargets) {
      terms.grad_targets.store(grad_targets + i);
    }
  }
  S lanes[Vec::size()];
  vec_sum.store(lanes);
  double sum = 0;
  for (int64_t lane = 0; lane < Vec::size(); ++lane) {
    sum += lanes[lane];
  }
  for (; i < n; ++i) {  // the block's last partial vector
    const auto terms = loss_terms<ScalarMath<S>, kGamma, kGradInputs, kGradTargets, kFamily>(
        x[i], t[i], w != nullptr ? w[i] : S(1), v != nullptr ? v[i] : S(1), coeffs);
    sum += terms.loss;
    if (loss != nullptr) {
      loss[i] = terms.loss;
    }
    if (unweighted != nullptr) {
      unweighted[i] = terms.unweighted_loss;
    }
    if constexpr (kGradInputs) {
      grad_inputs[i] = terms.grad_inputs;
    }
    if constexpr (kGradTargets) {
      grad_targets[i] = terms.grad_targets;
    }
  }
  return sum;
}

template <typename S, GammaMode kGamma, bool kGradInputs, bool kGradTargets>
void forward_impl(const ForwardArgs& args) {
  const int64_t n = args.inputs.numel();
  const LossCoeffs<S> coeffs(args.form, args.alpha, args.gamma, args.beta, args.label_smoothing);
  const bool elementwise = args.reduction == Reduction::None;
  const bool weighted = args.weight_kind != WeightKind::None;
  const int64_t num_chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> chunk_sums(num_chunks, 0.0);
  std::vector<int64_t> chunk_counts(num_chunks, 0);
  const RawTensor inputs(args.inputs), targets(args.targets), loss_out(args.loss);
  const RawTensor unweighted_out(args.unweighted_loss), grad_inputs_out(args.grad_inputs);
  const RawTensor grad_targets_out(args.grad_targets);
  const S* weight = args.weight.defined() ? args.weight.const_data_ptr<S>() : nullptr;
  const S* scores = args.scores.defined() ? args.scores.const_data_ptr<S>() : nullptr;
  S* grad_scores = args.grad_scores.defined() ? args.grad_scores.mutable_data_ptr<S>() : nullptr;
  const auto* labels = args.labels ? static_cast<const int64_t*>(targets.data) : nullptr;

  at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    const FlushSubnormals flush_subnormals;
    S x_buffer[kBlock], t_buffer[kBlock], w_buffer[kBlock], v_buffer[kBlock], loss_buffer[kBlock];
    S unweighted_buffer[kBlock], grad_inputs_buffer[kBlock], grad_targets_buffer[kBlock];
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      const int64_t chunk_stop = std::min(n, (chunk + 1) * kChunk);
      double chunk_sum = 0;
      int64_t chunk_count = 0;
      for (int64_t offset = chunk * kChunk; offset < chunk_stop; offset += kBlock) {
        const int64_t len = std::min(kBlock, chunk_stop - offset);
        const S* x = read_block(inputs, offset, len, x_buffer);
        const S* w = weighted ? element_weights(args, weight, offset, len, w_buffer) : nullptr;
        const S* t = t_buffer;
        if (args.labels) {
          chunk_count += label_targets(args, labels, scores, offset, len, t_buffer, v_buffer);
        } else {
          t = read_block(targets, offset, len, t_buffer);
          chunk_count += len;
        }
        S* loss = elementwise ? block_destination(loss_out, offset, loss_buffer) : nullptr;
        S* unweighted = unweighted_out.data != nullptr
                            ? block_destination(unweighted_out, offset, unweighted_buffer)
                            : nullptr;
        S* grad_inputs = kGradInputs
                             ? block_destination(grad_inputs_out, offset, grad_inputs_buffer)
                             : nullptr;
        // Scores' gradients are gathered from the block's d(loss)/d(target).
        S* grad_targets = !kGradTargets       ? nullptr
                          : grad_scores != nullptr ? grad_targets_buffer
                                                   : block_destination(grad_targets_out, offset,
                                                                       grad_targets_buffer);
        // The focal loss in a loop of its own (loss_terms' kFamily), the other forms in another.
        const auto block = coeffs.form == LossForm::Focal
                               ? compute_block<S, kGamma, kGradInputs, kGradTargets, false>
                               : compute_block<S, kGamma, kGradInputs, kGradTargets, true>;
        chunk_sum += block(x, t, w, args.labels ? v_buffer : nullptr, len, coeffs, loss,
                           unweighted, grad_inputs, grad_targets);
        if (elementwise) {
          store_block(loss_out, offset, len, loss);
        }
        if (unweighted != nullptr) {
          store_block(unweighted_out, offset, len, unweighted);
        }
        if constexpr (kGradInputs) {
          store_block(grad_inputs_out, offset, len, grad_inputs);
        }
        if constexpr (kGradTargets) {
          if (grad_scores != nullptr) {
            gather_score_gradients(args, labels, offset, len, grad_targets, grad_scores);
          } else {
            store_block(grad_targets_out, offset, len, grad_targets);
          }
        }
      }
      chunk_sums[chunk] = chunk_sum;
      chunk_counts[chunk] = chunk_count;
    }
  });

  double total = 0;
  int64_t count = 0;
  for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
    total += chunk_sums[chunk];
    count += chunk_counts[chunk];
  }
  args.count.fill_(count);
  if (!elementwise) {
    if (args.reduction == Reduction::Mean) {
      total /= static_cast<double>(count);  // NaN when nothing counts, as torch.mean of nothing
    }
    args.loss.fill_(total);
  }
}

template <typename S>
void backward_impl(const BackwardArgs& args) {
  const int64_t n = args.out.numel();
  // One grad_output value for all elements (mean/sum, or an expanded scalar): fold it and the
  // mean's divisor into one factor. On CPU reading them is free: no device to wait for.
  double factor = args.grad_output_is_scalar ? args.grad_output.item<double>() : 1.0;
  if (args.divisor.defined()) {
    const int64_t divisor = args.divisor.item<int64_t>();
    factor = divisor > 0 ? factor / static_cast<double>(divisor) : 0.0;
  }
  const S scale = static_cast<S>(factor);
  const int64_t num_blocks = (n + kBlock - 1) / kBlock;
  const RawTensor saved_grad(args.saved_grad), grad_output(args.grad_output), out_tensor(args.out);
  at::parallel_for(0, num_blocks, kChunk / kBlock, [&](int64_t block_begin, int64_t block_end) {
    const FlushSubnormals flush_subnormals;
    S saved_buffer[kBlock], grad_buffer[kBlock], out_buffer[kBlock];
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t offset = block * kBlock;
      const int64_t len = std::min(kBlock, n - offset);
      const S* saved = read_block(saved_grad, offset, len, saved_buffer);
      S* out = block_destination(out_tensor, offset, out_buffer);
      if (args.grad_output_is_scalar) {
        for (int64_t i = 0; i < len; ++i) {
          out[i] = saved[i] * scale;
        }
      } else {
        const S* grad = read_block(grad_output, offset, len, grad_buffer);
        for (int64_t i = 0; i < len; ++i) {
          out[i] = saved[i] * grad[i] * scale;
        }
      }
      store_block(out_tensor, offset, len, out);
    }
  });
}

// float64 tensors compute in double, all others in float.
template <typename Fn>
void with_math_type(const at::Tensor& tensor, Fn&& fn) {
  if (tensor.scalar_type() == at::kDouble) {
    fn(double{});
  } else {
    fn(float{});
  }
}

}  // namespace

void forward(const ForwardArgs& args) {
  with_math_type(args.loss, [&](auto math_type) {
    using S = decltype(math_type);
    // gamma 1 gets loops of its own: the General loops choose the exponent's products (or pow)
    // once per vector, which q^1 = q does not need (bench/NOTES.md).
    const GammaMode mode = args.gamma == 1.0 ? GammaMode::One : gamma_mode(args.gamma);
    dispatch_gamma_mode<GammaMode::Zero, GammaMode::One, GammaMode::Two, GammaMode::General>(
        mode, [&](auto gamma_mode) {
      dispatch_flag(args.grad_inputs.defined(), [&](auto grad_inputs) {
        dispatch_flag(args.grad_targets.defined() || args.grad_scores.defined(),
                      [&](auto grad_targets) {
          forward_impl<S, decltype(gamma_mode)::value, decltype(grad_inputs)::value,
                       decltype(grad_targets)::value>(args);
        });
      });
    });
  });
}

void backward(const BackwardArgs& args) {
  with_math_type(args.out, [&](auto math_type) { backward_impl<decltype(math_type)>(args); });
}

}  // namespace focal::cpu::FOCAL_CPU_ISA
