// The elementwise sigmoid focal loss, its family (FL*, quality focal loss, varifocal loss), the
// softmax focal loss and their analytic derivatives: the one place the formulas live, beside
// the table of what each form takes (kFormSignatures), which the op layer checks against.
//
// Used by the CUDA kernels (V = float/double), the CPU kernels (V = at::vec::Vectorized<float/double>)
// and their scalar tails (V = float/double), so the CPU tests exercise the very formulas the GPU runs.
// Everything a value type needs beyond + - * / and comparisons comes from a Math policy:
// exp, log1p (called only for arguments in [0, 1]), log (for arguments >= 1), pow, sqrt,
// reciprocal, abs, max, min, select(mask, if_true, if_false), positive (v > 0 by its bits).
//
// With p = sigmoid(x), t the target (after label smoothing), w the element's weight (the loss and
// its derivatives below are multiplied by it):
//   CE      = t * softplus(-x) + (1 - t) * softplus(x)
//   q       = 1 - p_t = t * sigmoid(-x) + (1 - t) * sigmoid(x)
//   alpha_t = alpha * t + (1 - alpha) * (1 - t)          (1 when alpha < 0)
//   loss    = alpha_t * q^gamma * CE
//   dL/dx   = alpha_t * q^gamma * [ (p - t) + gamma * (1 - 2t) * CE * p(1-p)/q ]
//   dL/dt   = q^gamma * [ (2 alpha - 1) * CE + alpha_t * (gamma * (1 - 2p) * CE / q - x) ]
// For t in [0, 1], p(1-p)/q lies in [0, 1] (q >= min(p, 1-p)), so q^(gamma-1) never appears on
// its own and the gradient stays finite as q -> 0 for every gamma >= 0, fractional ones included.
// Any other t continues the formulas as torchvision's composite form does: q may then be 0 at a
// finite logit (where the derivative of q^gamma for gamma < 1 is the loss's own infinity) or
// negative (q^gamma is then NaN for a gamma that is not a whole number, as pow gives it).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__CUDACC__)
#define FOCAL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FOCAL_HOST_DEVICE inline
#endif

namespace focal {

// Matches at::Reduction so the codes cross the Python boundary unchanged.
enum class Reduction : int { None = 0, Mean = 1, Sum = 2 };

// The factor the backward scales a saved gradient by: grad_output (1 where it comes per
// element), over the mean's count where there is one (divisor non-null); 0 when nothing
// counted, whatever grad_output is (every saved gradient is 0 there, and NaN * 0 is NaN). In
// double, then rounded once to the math type: a count above 2^24 is no float.
FOCAL_HOST_DEVICE double backward_factor(double grad_output, const int64_t* divisor) {
  if (divisor == nullptr) {
    return grad_output;
  }
  return *divisor > 0 ? grad_output / static_cast<double>(*divisor) : 0.0;
}

// gamma == 2 (the RetinaNet default) squares and gamma == 0 (weighted BCE) skips the power, each
// in a kernel of its own. Every other gamma shares the General kernels, which decide at run time
// (the same way for all elements) between products and pow: see FocalCoeffs. One (q^1 = q) is
// a kernel of its own on the CPU only, whose vector loops pay that decision per vector (see
// focal_cpu_kernels.cpp); it is last so that the other modes keep the numbers that
// tests/test_sass.py reads in the kernels' mangled names.
enum class GammaMode : int { Zero, Two, General, One };

inline GammaMode gamma_mode(double gamma) {
  return gamma == 0.0 ? GammaMode::Zero : gamma == 2.0 ? GammaMode::Two : GammaMode::General;
}

// Scalar parameters of the loss, in the math type S.
//   alpha_t = alpha_offset + alpha_slope * t: alpha * t + (1 - alpha) * (1 - t), or 1 when the
//     weighting is off; exact at t = 0 and t = 1, so alpha = 0 or 1 gives exact zeros.
//   label smoothing: the loss sees t * target_scale + target_offset = t * (1 - eps) + eps / 2.
//   q^gamma for a multiple of 1/2 up to kMaxProductGamma (the exponents in use: 0.5, 1, 1.5, 2.5,
//     3, 4, ...) is q^whole_powers times sqrt(q) when half_power: no exp and no log, and at most
//     6 roundings; whole_powers is -1 for any other gamma, which takes pow.
constexpr int kMaxProductGamma = 8;

template <typename S>
struct FocalCoeffs {
  S alpha_offset;
  S alpha_slope;
  S gamma;
  S target_scale;
  S target_offset;
  int whole_powers;
  bool half_power;

  FocalCoeffs(double alpha, double gamma_, double label_smoothing)
      : alpha_offset(static_cast<S>(alpha < 0 ? 1.0 : 1.0 - alpha)),
        alpha_slope(static_cast<S>(alpha < 0 ? 0.0 : 2.0 * alpha - 1.0)),
        gamma(static_cast<S>(gamma_)),
        target_scale(static_cast<S>(1.0 - label_smoothing)),
        target_offset(static_cast<S>(label_smoothing / 2.0)),
        whole_powers(is_product_gamma(gamma_) ? static_cast<int>(gamma_) : -1),
        half_power(is_product_gamma(gamma_) && gamma_ != static_cast<int>(gamma_)) {}

  static bool is_product_gamma(double gamma_) {
    return gamma_ > 0 && gamma_ <= kMaxProductGamma && 2 * gamma_ == static_cast<int>(2 * gamma_);
  }
};

// The member of the family a launch computes: a run-time switch, the same for every element of
// a launch (no divergence on a GPU, no kernel per form). The codes cross the Python
// boundary unchanged.
enum class LossForm : int { Focal = 0, Star = 1, Quality = 2, Varifocal = 3 };
// The last code: a new form moves it, and the static_asserts below then point at each place
// that must know the form (its row in kFormSignatures, its case in loss_terms).
inline constexpr LossForm kLastForm = LossForm::Varifocal;

// What each loss takes: its coefficients in the op's order (csrc/focal_ops.h), each with the
// range it must lie in and the coefficient of the terms it sets (FormScalars holds the others'
// defaults), and whether its targets may be smoothed. The op layer checks and converts every
// form through this table alone: a new form adds its row here, its terms and its case in
// loss_terms below (kLastForm's static_asserts point at both).
// Every range also ends at float32's largest number: the kernels compute every dtype but
// float64 in float32, where a larger coefficient would be inf (and 0 * inf NaN). A gamma
// (Exponent, or FL*'s Positive slope) ends at kMaxGamma: float32 rounds q to 24 bits, an error
// q^gamma multiplies by gamma (1e-4 relative at 1,000, 4% at 10^6, and past ~10^8 a gradient of
// the wrong magnitude), and FL*'s gamma * x overflows long before float32's largest.
enum class CoefficientRange { UnitOrOff, NonNegative, NonNegativeOrOff, Positive, Finite, Exponent, Flag };
inline constexpr double kMaxGamma = 1000.0;
enum class CoefficientRole { Alpha, Gamma, Beta, DetachModulation };
struct FormCoefficient {
  const char* name;
  CoefficientRange range;
  CoefficientRole role;
};
struct FormSignature {
  const char* name;
  int count;
  FormCoefficient coefficients[3];
  bool smoothable;  // takes label smoothing
};
// The family, by LossForm code.
inline constexpr FormSignature kFormSignatures[] = {
    {"focal loss", 2,
     {{"alpha", CoefficientRange::UnitOrOff, CoefficientRole::Alpha},
      {"gamma", CoefficientRange::Exponent, CoefficientRole::Gamma}},
     true},
    {"FL*", 3,
     {{"alpha", CoefficientRange::UnitOrOff, CoefficientRole::Alpha},
      {"gamma", CoefficientRange::Positive, CoefficientRole::Gamma},
      {"beta", CoefficientRange::Finite, CoefficientRole::Beta}},
     true},
    // Its exponent is named beta, as in the paper; the terms take it as the modulating gamma.
    {"quality focal loss", 1, {{"beta", CoefficientRange::Exponent, CoefficientRole::Gamma}},
     false},
    // alpha weighs the negatives (the terms switch alpha_t off); targets are soft scores already.
    // detach_modulation 1: the negatives' |p - t|^gamma carries no gradient to x (RT-DETR's).
    {"varifocal loss", 3,
     {{"alpha", CoefficientRange::NonNegative, CoefficientRole::Alpha},
      {"gamma", CoefficientRange::Exponent, CoefficientRole::Gamma},
      {"detach_modulation", CoefficientRange::Flag, CoefficientRole::DetachModulation}},
     false},
};
inline constexpr FormSignature kSoftmaxSignature = {
    "softmax focal loss", 2,
    {{"alpha", CoefficientRange::NonNegativeOrOff, CoefficientRole::Alpha},
     {"gamma", CoefficientRange::Exponent, CoefficientRole::Gamma}},
    true};

// Every row names the coefficients it counts, and every LossForm has its row: the op layer
// formats names and casts codes from the table alone.
constexpr bool names_its_coefficients(const FormSignature& signature) {
  if (signature.name == nullptr || signature.count < 0 || signature.count > 3) {
    return false;
  }
  for (int i = 0; i < signature.count; ++i) {
    if (signature.coefficients[i].name == nullptr) {
      return false;
    }
  }
  return true;
}
constexpr bool every_form_names_its_coefficients() {
  for (const FormSignature& signature : kFormSignatures) {
    if (!names_its_coefficients(signature)) {
      return false;
    }
  }
  return names_its_coefficients(kSoftmaxSignature);
}
static_assert(every_form_names_its_coefficients(), "a row of kFormSignatures is incomplete");
static_assert(sizeof(kFormSignatures) / sizeof(kFormSignatures[0]) ==
                  static_cast<size_t>(kLastForm) + 1,
              "kFormSignatures needs one row per LossForm, in code order");

// A signature's coefficients (count of them, checked) as the terms' alpha, gamma, beta and
// VFL's detach flag (LossCoeffs', SoftmaxCoeffs').
struct FormScalars {
  double alpha = -1.0;
  double gamma = 0.0;
  double beta = 0.0;
  bool detach_modulation = false;
};
inline FormScalars form_scalars(const FormSignature& signature, const double* coefficients) {
  FormScalars scalars;
  for (int i = 0; i < signature.count; ++i) {
    switch (signature.coefficients[i].role) {
      case CoefficientRole::Alpha: scalars.alpha = coefficients[i]; break;
      case CoefficientRole::Gamma: scalars.gamma = coefficients[i]; break;
      case CoefficientRole::Beta: scalars.beta = coefficients[i]; break;
      case CoefficientRole::DetachModulation: scalars.detach_modulation = coefficients[i] != 0.0; break;
    }
  }
  return scalars;
}

// FocalCoeffs plus what the other forms need. gamma (FocalCoeffs) is the exponent of the
// modulating factor (the focal loss's gamma, QFL's beta, VFL's gamma), or FL*'s gamma; alpha
// is alpha_t's (focal loss, FL*) or VFL's weight of the negatives (its alpha_t is off).
template <typename S>
struct LossCoeffs : FocalCoeffs<S> {
  LossForm form;
  S star_beta;       // FL*'s beta
  S star_inv_gamma;  // FL*'s 1 / gamma (gamma > 0 there)
  S negative_scale;  // VFL's alpha
  // VFL's detach_modulation: p in |p - t|^gamma carries no gradient to x, so that the factor
  // only weighs the cross-entropy's gradient.
  bool detach_modulation;

  LossCoeffs(LossForm form_, const FormScalars& scalars, double label_smoothing)
      : FocalCoeffs<S>(form_ == LossForm::Varifocal ? -1.0 : scalars.alpha, scalars.gamma,
                       label_smoothing),
        form(form_),
        star_beta(static_cast<S>(scalars.beta)),
        star_inv_gamma(static_cast<S>(scalars.gamma > 0.0 ? 1.0 / scalars.gamma : 0.0)),
        negative_scale(static_cast<S>(scalars.alpha)),
        detach_modulation(scalars.detach_modulation) {}
};

// log(1 + v) for float v in [-0.25, 1]: 2 atanh(s) with s = v / (2 + v), |s| <= 1/3. In h = 2s
// (s itself would be subnormal for v < 2.4e-38, and flushed to 0 on the CPU): log1p(v) =
// h + h^3 R(h^2), R fitted to (2 atanh(h/2) - h) / h^3 on [0, 4/9]: a cubic (fit error < 5e-9
// relative), or for results kept to 16 bits a quadratic (< 2e-7, 1.6 float32 ulp). No log and
// no range reduction: about half the instructions of CUDA's log1pf and a third of SLEEF's log;
// with the cubic within 2.5 ulp of log1p, relative accuracy kept for tiny v
// (tests/test_extremes.py checks the loss to 4 ulp). Math supplies reciprocal and fma.
template <typename Math, int kDegree = 3, typename V>
FOCAL_HOST_DEVICE V log1p_float(V v) {
  static_assert(kDegree == 2 || kDegree == 3, "log1p_float has fits of degree 2 and 3");
  const V h = v * Math::reciprocal(Math::fma(v, V(0.5f), V(1.0f)));  // 2v / (2 + v), as rounded
  const V h2 = h * h;
  V r;
  if constexpr (kDegree == 3) {
    r = Math::fma(h2, V(0.00054735790f), V(0.0021874290f));
    r = Math::fma(h2, r, V(0.012506782f));
    r = Math::fma(h2, r, V(0.083333015f));
  } else {
    r = Math::fma(h2, V(0.0026549629f), V(0.012386242f));
    r = Math::fma(h2, r, V(0.083341852f));
  }
  return Math::fma(h * h2, r, h);
}

// base^exponent in double for exponent > 0, as exp(y_hi) * (1 + y_lo) with y_hi +
// y_lo = exponent * log(base) carried in two doubles: y reaches -745 and more, where one double
// would lose 10 bits of the result. log(base) = e ln 2 + 2 atanh(s), base = m 2^e with m in
// [sqrt(1/2), sqrt(2)), s = (m - 1) / (m + 1), |s| < 0.1716: 2s in two doubles, the odd series
// after it to s^21 (the rest below 2^-62 absolute). Error: half an ulp (the last rounding), the
// exp's, and exponent / 32 ulp (the logarithm's, below 2^-58 absolute): with CUDA's exp (1 ulp)
// within 1.6 ulp for exponents up to 3, where libdevice's pow is documented to 2. Straight-line
// code, inlined at each use: CUDA's double pow is a subroutine that saves registers to a stack
// at 64 per thread. A negative base (q for a target outside [0, 1]) follows pow: |base|^exponent,
// negated for an odd whole exponent, NaN for an exponent that is not whole. Math supplies exp, fma
// and reciprocal.
template <typename Math>
FOCAL_HOST_DEVICE double pow_double(double base, double exponent) {
  int e;
  double m = ::frexp(::fabs(base), &e);  // in [0.5, 1)
  if (m < 0.70710678118654752) {
    m += m;
    --e;
  }
  const double f = m - 1.0;  // exact
  // s = f / (2 + f) as s_hi + s_lo: 2 + f = d + d_lo exactly, and the remainder of s_hi by fma.
  const double d = 2.0 + f;
  const double d_lo = f - (d - 2.0);
  const double inv_d = Math::reciprocal(d);
  const double s_hi = f * inv_d;
  const double s_lo = (Math::fma(-s_hi, d, f) - s_hi * d_lo) * inv_d;
  const double z = s_hi * s_hi;
  double series = 2.0 / 21;
  series = Math::fma(z, series, 2.0 / 19);
  series = Math::fma(z, series, 2.0 / 17);
  series = Math::fma(z, series, 2.0 / 15);
  series = Math::fma(z, series, 2.0 / 13);
  series = Math::fma(z, series, 2.0 / 11);
  series = Math::fma(z, series, 2.0 / 9);
  series = Math::fma(z, series, 2.0 / 7);
  series = Math::fma(z, series, 2.0 / 5);
  series = Math::fma(z, series, 2.0 / 3);
  const double tail = s_hi * z * series;  // 2 atanh(s) - 2s, |tail| < 0.0035
  // log(m) = log_m + log_m_lo, then + e ln 2 (ln 2's high part has 21 trailing zero bits, so its
  // product with e is exact): each sum's rounding error kept (|a| >= |b| in each a + b), and the
  // result renormalized, |log_lo| <= ulp(log_hi) / 2, so that y_lo is small enough for
  // exp(y_lo) = 1 + y_lo.
  const double log_m = 2.0 * s_hi + tail;
  // s_lo enters through the series' derivative 2 / (1 - s^2), about 2 (1 + z).
  const double log_m_lo = (2.0 * s_hi - log_m) + tail + Math::fma(2.0 * s_lo, z, 2.0 * s_lo);
  const double e_ln2 = e * 6.93147180369123816490e-01;
  const double sum = e_ln2 + log_m;
  const double sum_lo = (log_m - (sum - e_ln2)) + log_m_lo + e * 1.90821492927058770002e-10;
  const double log_hi = sum + sum_lo;
  const double log_lo = sum_lo - (log_hi - sum);
  const double y_hi = exponent * log_hi;
  const double y_lo = Math::fma(exponent, log_hi, -y_hi) + exponent * log_lo;
  const double power = Math::exp(y_hi);
  const double corrected = Math::fma(power, y_lo, power);
  // NaN only where power is 0 or inf and y_lo infinite; frexp(0) gives m = 0 (a finite wrong log).
  const double magnitude = base == 0.0 ? 0.0 : corrected == corrected ? corrected : power;
  if (!(base < 0.0)) {
    return magnitude;
  }
  const double half = 0.5 * exponent;
  return exponent != ::trunc(exponent) ? ::nan("")
         : half != ::trunc(half)       ? -magnitude
                                       : magnitude;
}

// v > 0 read from v's bits (sign clear, not zero): a subnormal v is positive where the CPU
// kernels' flush-to-zero mode would compare it as 0 (VFL's t > 0 must not turn it negative).
template <typename S>
FOCAL_HOST_DEVICE bool positive_bits(S v) {
  std::conditional_t<sizeof(S) == sizeof(int64_t), int64_t, int32_t> bits;
  static_assert(sizeof(bits) == sizeof(S), "positive_bits: float or double");
  std::memcpy(&bits, &v, sizeof(bits));
  return bits > 0;
}

// A Math policy says whether its fma rounds once (kFusedMultiplyAdd): the formulas that rely on
// it take another form where it does not.
template <typename S>
struct ScalarMath {
  static constexpr bool kFusedMultiplyAdd = true;
  static FOCAL_HOST_DEVICE S exp(S v) { return ::exp(v); }
  static FOCAL_HOST_DEVICE S log1p(S v) { return ::log1p(v); }
  static FOCAL_HOST_DEVICE S log(S v) { return ::log(v); }
  static FOCAL_HOST_DEVICE S fma(S a, S b, S c) { return ::fma(a, b, c); }
  static FOCAL_HOST_DEVICE S pow(S base, S exponent) { return ::pow(base, exponent); }
  static FOCAL_HOST_DEVICE S sqrt(S v) { return ::sqrt(v); }
  static FOCAL_HOST_DEVICE S reciprocal(S v) { return S(1) / v; }
  static FOCAL_HOST_DEVICE S abs(S v) { return ::fabs(v); }
  static FOCAL_HOST_DEVICE S max(S a, S b) { return a > b ? a : b; }
  static FOCAL_HOST_DEVICE S min(S a, S b) { return a < b ? a : b; }
  static FOCAL_HOST_DEVICE S clamp(S v, S low, S high) {
    return v > high ? high : v < low ? low : v;  // NaN stays NaN
  }
  static FOCAL_HOST_DEVICE S select(bool mask, S if_true, S if_false) {
    return mask ? if_true : if_false;
  }
  static FOCAL_HOST_DEVICE bool positive(S v) { return positive_bits(v); }
};

template <>
struct ScalarMath<float> {
  static constexpr bool kFusedMultiplyAdd = true;
  static FOCAL_HOST_DEVICE float exp(float v) { return ::expf(v); }
  static FOCAL_HOST_DEVICE float log1p(float v) { return log1p_float<ScalarMath<float>>(v); }
  static FOCAL_HOST_DEVICE float log(float v) { return ::logf(v); }
  static FOCAL_HOST_DEVICE float fma(float a, float b, float c) { return ::fmaf(a, b, c); }
  static FOCAL_HOST_DEVICE float pow(float base, float exponent) { return ::powf(base, exponent); }
  static FOCAL_HOST_DEVICE float sqrt(float v) { return ::sqrtf(v); }
  static FOCAL_HOST_DEVICE float reciprocal(float v) { return 1.0f / v; }
  static FOCAL_HOST_DEVICE float abs(float v) { return ::fabsf(v); }
  static FOCAL_HOST_DEVICE float max(float a, float b) { return a > b ? a : b; }
  static FOCAL_HOST_DEVICE float min(float a, float b) { return a < b ? a : b; }
  static FOCAL_HOST_DEVICE float clamp(float v, float low, float high) {
    return v > high ? high : v < low ? low : v;  // NaN stays NaN
  }
  static FOCAL_HOST_DEVICE float select(bool mask, float if_true, float if_false) {
    return mask ? if_true : if_false;
  }
  static FOCAL_HOST_DEVICE bool positive(float v) { return positive_bits(v); }
};

// 1 / v for v in (0, 1] overflows to inf for the smallest subnormal v (below 2^-128 in float,
// 2^-1024 in double), which a GPU keeps (CUDA does not flush them to zero by default): a ratio
// bounded by 1 such as p(1-p)/q then becomes inf, and q^gamma * inf = 0 * inf = NaN, at logits
// near -/+ 89..104 in float and 709..745 in double. So the kernels take 1 / (v * kUnitScale)
// (finite for every v > 0) and multiply the numerator by kUnitScale: a power of two, so where no
// value involved is subnormal the result is the same to the bit (and where one is, more exact).
template <typename S>
constexpr S kUnitScale = sizeof(S) == sizeof(double) ? S(0x1p64) : S(0x1p32);

// v clamped to the finite numbers of its type. A target gradient's bracket, whose terms grow
// like the logit, overflows only at logits near float's largest, where the power that then
// multiplies it may have underflowed to 0: clamped, the product is 0 there, not 0 * inf = NaN.
// (The power multiplied into each term instead would flush small terms at moderate logits.)
// A NaN (an infinite logit's inf - inf) stays NaN, in the vector lanes and the scalar tail alike.
template <typename S, typename Math, typename V>
FOCAL_HOST_DEVICE V within_range(V v) {
  const V largest(sizeof(S) == sizeof(double) ? S(0x1.fffffffffffffp1023) : S(0x1.fffffep127));
  return Math::clamp(v, V(S(0)) - largest, largest);
}

template <typename V>
struct FocalTerms {
  V loss;             // weight * focal loss
  V unweighted_loss;  // the loss before the weight: d(loss)/d(weight)
  V grad_inputs;      // d(loss)/d(inputs)
  V grad_targets;     // d(loss)/d(targets), through the label smoothing
};

// sigmoid(x), sigmoid(-x) and the binary cross-entropy CE(x, t), without cancellation.
template <typename V>
struct Logistic {
  V p;   // sigmoid(x)
  V pm;  // sigmoid(-x) = 1 - p
  V ce;  // t * softplus(-x) + (1 - t) * softplus(x)
};

template <typename Math, typename V>
FOCAL_HOST_DEVICE Logistic<V> logistic(V x, V t) {
  const V zero(0.0f);
  const V one(1.0f);
  const V e = Math::exp(-Math::abs(x));  // exp(-|x|), in (0, 1]
  const V sig_abs = Math::reciprocal(one + e);  // sigmoid(|x|)
  const auto x_nonneg = x >= zero;
  // softplus(-x) = log1p(e) + max(-x, 0), softplus(x) = log1p(e) + max(x, 0), so CE = log1p(e)
  // + max(x, 0) - t x: for t in [0, 1] the last two are (1 - t) x or -t x, non-negative, and one
  // fused multiply-add rounds them once. Unfused, x - t x would round t x first and cancel for
  // t near 1: each branch's product then, 1 - t exact for t in [0.5, 1]. At x = +inf the fused
  // inf - t inf is NaN but for t < 0; x - x (+0 for finite x) makes the product agree.
  V linear;
  if constexpr (Math::kFusedMultiplyAdd) {
    linear = Math::fma(-t, x, Math::max(x, zero));
  } else {
    const V nan_at_inf = Math::select(t < zero, zero, x - x);
    linear = Math::select(x_nonneg, (one - t) * x + nan_at_inf, (zero - t) * x);
  }
  return {Math::select(x_nonneg, sig_abs, e * sig_abs), Math::select(x_nonneg, e * sig_abs, sig_abs),
          Math::log1p(e) + linear};
}

// base^gamma (base in [0, 1] for targets in [0, 1], of any sign beyond) for the launch's
// exponent coeffs.gamma: 1 for Zero, base for One, a square for Two, products (and one sqrt) for
// a multiple of 1/2 up to kMaxProductGamma, else pow.
template <typename Math, GammaMode kGamma, typename V, typename S>
FOCAL_HOST_DEVICE V gamma_power(V base, const FocalCoeffs<S>& coeffs) {
  if constexpr (kGamma == GammaMode::Zero) {
    return V(S(1));
  } else if constexpr (kGamma == GammaMode::One) {
    return base;
  } else if constexpr (kGamma == GammaMode::Two) {
    return base * base;
  } else {
    // base^whole_powers in at most 4 products, the same products in the same order both ways.
    V power(S(1));
    if constexpr (std::is_arithmetic_v<V>) {
      // One element (CUDA, CPU tails): by squaring. On a GPU a jump table over the exponents
      // made the label kernels spill.
      if (coeffs.whole_powers < 0) {
        return Math::pow(base, V(coeffs.gamma));  // gamma > 0 here: pow(0, gamma) = 0
      }
      V square = base;
      for (int bits = coeffs.whole_powers; bits > 0; bits >>= 1) {
        if (bits & 1) {
          power = power * square;
        }
        square = square * square;
      }
    } else {
      // A CPU vector: a switch, one jump through a table, where the loop's tests and branches
      // cost ~19 instructions per vector, more than the products (the compiler shares the
      // repeated squares).
      const V b = base;
      switch (coeffs.whole_powers) {
        case 0: break;
        case 1: power = b; break;
        case 2: power = b * b; break;
        case 3: power = b * (b * b); break;
        case 4: power = (b * b) * (b * b); break;
        case 5: power = b * ((b * b) * (b * b)); break;
        case 6: power = (b * b) * ((b * b) * (b * b)); break;
        case 7: power = (b * (b * b)) * ((b * b) * (b * b)); break;
        case 8: power = ((b * b) * (b * b)) * ((b * b) * (b * b)); break;
        default: return Math::pow(base, V(coeffs.gamma));
      }
    }
    return coeffs.half_power ? power * Math::sqrt(base) : power;
  }
}

// x: logit; t: target before label smoothing; weight: the element's weight (1 when there is
// none); valid: 0 for an ignored element (no loss, no gradient), else 1.
template <typename Math, GammaMode kGamma, bool kGradInputs, bool kGradTargets, typename V,
          typename S>
FOCAL_HOST_DEVICE FocalTerms<V> focal_terms(V x, V t, V weight, V valid,
                                            const FocalCoeffs<S>& coeffs) {
  const V zero(S(0));
  const V one(S(1));
  t = t * V(coeffs.target_scale) + V(coeffs.target_offset);
  const Logistic<V> logit = logistic<Math>(x, t);
  const V p = logit.p;
  const V pm = logit.pm;
  const V ce = logit.ce;
  const V tm = one - t;
  const V q = t * pm + tm * p;  // 1 - p_t without subtracting from 1
  const V alpha_t = V(coeffs.alpha_offset) + V(coeffs.alpha_slope) * t;
  const V gamma(coeffs.gamma);
  const V q_gamma = gamma_power<Math, kGamma>(q, coeffs);

  FocalTerms<V> terms{zero, zero, zero, zero};
  terms.unweighted_loss = valid * alpha_t * q_gamma * ce;
  terms.loss = weight * terms.unweighted_loss;
  const V weight_valid = weight * valid;
  // The modulating factor's derivative, gamma * q^(gamma-1) * dq; it vanishes for gamma == 0.
  // For gamma 1 and 2, q^(gamma-1) is 1 or q, a factor of both derivatives, which then divide by
  // nothing. Other gammas write it as q^gamma times ratios over q, bounded for t in [0, 1].
  constexpr bool kModulated = kGamma != GammaMode::Zero;
  constexpr bool kWholeGamma = kGamma == GammaMode::One || kGamma == GammaMode::Two;
  const V whole_gamma(S(kGamma == GammaMode::Two ? 2 : 1));
  const V q_lower = kGamma == GammaMode::Two ? q : one;  // q^(gamma-1) for a whole gamma
  const V unit_scale(kUnitScale<S>);
  [[maybe_unused]] V inv_scaled_q = zero;  // 1 / (q kUnitScale)
  if constexpr (kModulated && !kWholeGamma && (kGradInputs || kGradTargets)) {
    inv_scaled_q = Math::reciprocal(q * unit_scale);
  }
  if constexpr (kGradInputs) {
    V bracket = tm * p - t * pm;  // p - t, exact near t = 1 where p - 1 would cancel
    if constexpr (kWholeGamma) {
      // q^(gamma-1) [q (p - t) + gamma (1 - 2t) CE p(1-p)]; CE p(1-p) first: it is bounded
      // where CE alone, times gamma, would overflow (|x| near float's largest) and meet a 0.
      bracket = q * bracket + whole_gamma * (tm - t) * (ce * (p * pm));
      terms.grad_inputs = weight_valid * alpha_t * q_lower * bracket;
    } else {
      if constexpr (kModulated) {
        // p(1-p)/q (in [0, 1] for t in [0, 1]); where q == 0 the factor q^gamma already zeroes
        // the term, so any finite value does. q < 0 (a target outside [0, 1]) takes the formula.
        const V ratio = Math::select(q != zero, p * unit_scale * pm * inv_scaled_q, zero);
        bracket = bracket + gamma * (tm - t) * (ce * ratio);  // CE ratio first, as above
      }
      terms.grad_inputs = weight_valid * alpha_t * q_gamma * bracket;
    }
  }
  if constexpr (kGradTargets) {
    const V slope(coeffs.alpha_slope);
    if constexpr (kWholeGamma) {
      // q^(gamma-1) [(2 alpha - 1) CE q + alpha_t (gamma (1 - 2p) CE - x q)]
      const V bracket = whole_gamma * (pm - p) * ce - x * q;
      terms.grad_targets = weight_valid * V(coeffs.target_scale) * q_lower *
                           (slope * ce * q + alpha_t * bracket);
    } else {
      V bracket = -x;
      if constexpr (kModulated) {
        // CE / q is bounded as q -> 0 (CE vanishes with q there); the same q^gamma argument.
        // For t in [0, 1], CE >= q (-log y >= 1 - y), so ce / (q kUnitScale) is a normal number.
        const V ce_over_q = Math::select(q != zero, ce * inv_scaled_q * unit_scale, zero);
        bracket = bracket + gamma * (pm - p) * ce_over_q;
      }
      terms.grad_targets = weight_valid * V(coeffs.target_scale) * q_gamma *
                           within_range<S, Math>(slope * ce + alpha_t * bracket);
    }
  }
  return terms;
}

// The other forms' elementwise results before the weight and the ignored rows: the loss and
// its derivatives w.r.t. the logit and the (smoothed) target.
template <typename V>
struct FormTerms {
  V loss;
  V d_inputs;
  V d_targets;
};

// FocalTerms from FormTerms: weight and validity applied, d/dt taken through the smoothing.
template <typename V, typename S>
FOCAL_HOST_DEVICE FocalTerms<V> weighted_terms(const FormTerms<V>& form, V weight, V valid,
                                               const FocalCoeffs<S>& coeffs) {
  const V weight_valid = weight * valid;
  return {weight_valid * form.loss, valid * form.loss, weight_valid * form.d_inputs,
          weight_valid * V(coeffs.target_scale) * form.d_targets};
}

// FL* (Lin et al., appendix A), with y = 2t - 1 (+-1 for hard targets, continued linearly for
// soft ones as fvcore does) and z = gamma * y * x + beta:
//   loss  = alpha_t * softplus(-z) / gamma                       (-log(p*_t) / gamma)
//   dL/dx = -alpha_t * y * sigmoid(-z)                           (appendix B: y (p*_t - 1))
//   dL/dt = alpha_slope * softplus(-z) / gamma - 2 alpha_t x sigmoid(-z)   (dz/dt = 2 gamma x)
// softplus(-z) and sigmoid(-z) from exp(-|z|): finite and without cancellation at any z.
template <typename Math, bool kGradInputs, bool kGradTargets, typename V, typename S>
FOCAL_HOST_DEVICE FormTerms<V> star_terms(V x, V t, const LossCoeffs<S>& coeffs) {
  const V zero(S(0));
  const V one(S(1));
  const V y = t + t - one;
  const V z = V(coeffs.gamma) * y * x + V(coeffs.star_beta);
  const V e = Math::exp(zero - Math::abs(z));
  const V sig_abs = Math::reciprocal(one + e);                // sigmoid(|z|)
  const V sig_neg = Math::select(z >= zero, e * sig_abs, sig_abs);  // sigmoid(-z)
  const V softplus_neg = Math::log1p(e) + Math::max(zero - z, zero);
  const V alpha_t = V(coeffs.alpha_offset) + V(coeffs.alpha_slope) * t;
  const V star = softplus_neg * V(coeffs.star_inv_gamma);
  FormTerms<V> terms{alpha_t * star, zero, zero};
  if constexpr (kGradInputs) {
    terms.d_inputs = zero - alpha_t * y * sig_neg;
  }
  if constexpr (kGradTargets) {
    // x sigmoid(-z) first: bounded where it vanishes and 2 alpha_t x alone would overflow.
    terms.d_targets = V(coeffs.alpha_slope) * star - V(S(2)) * alpha_t * (x * sig_neg);
  }
  return terms;
}

// CE * |p - t|^g, QFL's loss (Li et al., GFL) and VFL's on negatives (without its alpha). With
// d = p - t, a = |d|, dCE/dx = d, dCE/dt = -x, da/dx = sign(d) p(1-p), da/dt = -sign(d):
//   loss  = a^g * CE
//   dL/dx = a^g * [d + g * sign(d) * (CE / a) * p(1-p)]     (a^g * d where p is detached)
//   dL/dt = a^g * [-x - g * sign(d) * (CE / a)]
// At a saturated logit with a hard target CE vanishes like a (CE / a -> 1), so the gradient
// stays finite for fractional g; at a == 0 the sign(d) terms are 0 (abs'(0) = 0, as autograd
// takes it). Near sigmoid(x) == t with a soft target and g < 1 the derivative of a^g is
// unbounded: a property of the loss, not of its evaluation.
template <typename Math, GammaMode kGamma, bool kGradInputs, bool kGradTargets, typename V,
          typename S>
FOCAL_HOST_DEVICE FormTerms<V> quality_terms(V x, V t, const Logistic<V>& logit,
                                             const LossCoeffs<S>& coeffs) {
  const V zero(S(0));
  const V d = (V(S(1)) - t) * logit.p - t * logit.pm;  // p - t, exact near t = 1
  const V a = Math::abs(d);
  const V gamma(coeffs.gamma);
  const V a_gamma = gamma_power<Math, kGamma>(a, coeffs);
  FormTerms<V> terms{a_gamma * logit.ce, zero, zero};
  constexpr bool kModulated = kGamma != GammaMode::Zero;
  // 1 / (a kUnitScale) (see kUnitScale): the numerators below, CE and p(1-p), are of a's order
  // or larger where a is subnormal (a hard target), so their ratios to a stay finite.
  [[maybe_unused]] V inv_scaled_a = zero;
  if constexpr (kModulated && (kGradInputs || kGradTargets)) {
    inv_scaled_a = Math::reciprocal(a * V(kUnitScale<S>));
  }
  // g * sign(d) * numerator / a, 0 where a == 0.
  const auto signed_over_a = [&](V numerator) {
    const V over_a = Math::select(a > zero, numerator * inv_scaled_a * V(kUnitScale<S>), zero);
    return gamma * Math::select(d < zero, zero - over_a, over_a);
  };
  if constexpr (kGradInputs) {
    V bracket = d;
    if constexpr (kModulated) {
      // Detached, the term is left out, not weighed by 0: at x = +-inf CE is inf or NaN.
      if (!coeffs.detach_modulation) {
        // p(1-p) / a (at most 1 for a hard target) before CE: CE / a, times gamma, overflows
        // at |x| near float's largest, where p(1-p) is 0.
        bracket = bracket + logit.ce * signed_over_a(logit.p * logit.pm);
      }
    }
    terms.d_inputs = a_gamma * bracket;
  }
  if constexpr (kGradTargets) {
    V bracket = zero - x;
    if constexpr (kModulated) {
      bracket = within_range<S, Math>(bracket - signed_over_a(logit.ce));
    }
    terms.d_targets = a_gamma * bracket;
  }
  return terms;
}

// VFL (Zhang et al., VarifocalNet): a positive (t > 0, t its IoU score) weighs CE by t, a
// negative by alpha * |p - t|^gamma:
//   t > 0: loss = t * CE, dL/dx = t * (p - t), dL/dt = CE - t * x
//   else:  alpha * quality_terms
// The loss jumps at t = 0; there d/dt is the negative branch's, as autograd of the composite
// form gives it. A subnormal t is a positive on every device (Math::positive).
template <typename Math, GammaMode kGamma, bool kGradInputs, bool kGradTargets, typename V,
          typename S>
FOCAL_HOST_DEVICE FormTerms<V> varifocal_terms(V x, V t, const LossCoeffs<S>& coeffs) {
  const V zero(S(0));
  const Logistic<V> logit = logistic<Math>(x, t);
  const FormTerms<V> negative =
      quality_terms<Math, kGamma, kGradInputs, kGradTargets>(x, t, logit, coeffs);
  const V alpha(coeffs.negative_scale);
  const auto positive = Math::positive(t);
  FormTerms<V> terms{Math::select(positive, t * logit.ce, alpha * negative.loss), zero, zero};
  if constexpr (kGradInputs) {
    const V d = (V(S(1)) - t) * logit.p - t * logit.pm;
    terms.d_inputs = Math::select(positive, t * d, alpha * negative.d_inputs);
  }
  if constexpr (kGradTargets) {
    terms.d_targets = Math::select(positive, logit.ce - t * x, alpha * negative.d_targets);
  }
  return terms;
}

// The loss of coeffs.form: what the kernels call for every element. The kernels choose kFamily
// once per launch (or block), so that the focal loss's loop holds no other form's code: kFamily
// false computes the focal loss alone, kFamily true any form, switching on coeffs.form.
template <typename Math, GammaMode kGamma, bool kGradInputs, bool kGradTargets, bool kFamily,
          typename V, typename S>
FOCAL_HOST_DEVICE FocalTerms<V> loss_terms(V x, V t, V weight, V valid,
                                           const LossCoeffs<S>& coeffs) {
  if constexpr (!kFamily) {
    return focal_terms<Math, kGamma, kGradInputs, kGradTargets>(x, t, weight, valid, coeffs);
  }
  static_assert(kLastForm == LossForm::Varifocal, "loss_terms needs a case for the new form");
  switch (coeffs.form) {
    case LossForm::Star: {
      t = t * V(coeffs.target_scale) + V(coeffs.target_offset);
      return weighted_terms(star_terms<Math, kGradInputs, kGradTargets>(x, t, coeffs), weight,
                            valid, coeffs);
    }
    case LossForm::Quality:  // no label smoothing (the op refuses it): t as it is
      return weighted_terms(quality_terms<Math, kGamma, kGradInputs, kGradTargets>(
                                x, t, logistic<Math>(x, t), coeffs),
                            weight, valid, coeffs);
    case LossForm::Varifocal:
      return weighted_terms(varifocal_terms<Math, kGamma, kGradInputs, kGradTargets>(x, t, coeffs),
                            weight, valid, coeffs);
    case LossForm::Focal:
    default:  // no other code reaches a kernel: the op layer checks it against the table
      return focal_terms<Math, kGamma, kGradInputs, kGradTargets>(x, t, weight, valid, coeffs);
  }
}

// The softmax focal loss (the multi-class case of Lin et al.), position by position: z the C
// logits of one position, p = softmax(z), q the target distribution (one-hot for a label,
// smoothed as F.cross_entropy smooths it: (1 - eps) one-hot + eps / C, or given), w the class
// weights, u_c = 1 - p_c:
//   loss    = -alpha sum_c w_c q_c u_c^gamma log p_c
//   g_c     = p_c d(loss)/d(p_c) = alpha w_c q_c u_c^gamma (gamma p_c log p_c / u_c - 1)
//   dL/dz_j = g_j - p_j sum_c g_c       (a label y: g_y (1 - p_y) at y, -p_j g_y elsewhere)
//   dL/dq_c = -alpha w_c u_c^gamma log p_c
// p log p / u lies in [-1, 0] (-log p <= (1 - p) / p) and tends to -1 as p -> 1, so the
// gradient is finite for every gamma >= 0 though u^(gamma - 1) is not. With m = max z and
// r = sum over the classes but one at the max of exp(z_c - m): log p_c = (z_c - m) - log1p(r)
// and, at the max, u = r / (1 + r); elsewhere p <= 1/2 and u = 1 - p loses nothing. A confident
// position (the focal loss's common case) keeps its relative accuracy, where log(sum exp) and
// 1 - p would cancel.
// Of FocalCoeffs it reads the power (gamma, whole_powers, half_power) and target_scale; the
// sigmoid's alpha_offset, alpha_slope and target_offset (eps / 2) it leaves unread for its own.
template <typename S>
struct SoftmaxCoeffs : FocalCoeffs<S> {
  S alpha;            // 1 for alpha None
  S smoothing_share;  // label_smoothing / C: each class's share of the smoothed mass
  bool modulated;     // gamma != 0: u^gamma is not 1

  SoftmaxCoeffs(double alpha_, double gamma_, double label_smoothing, int64_t classes)
      : FocalCoeffs<S>(-1.0, gamma_, label_smoothing),
        alpha(static_cast<S>(alpha_ < 0 ? 1.0 : alpha_)),
        smoothing_share(static_cast<S>(label_smoothing / static_cast<double>(classes))),
        modulated(gamma_ != 0.0) {}
};

// What a position's label means to its terms: its class (-1 for none: probability targets, or
// a label that does not count), whether the position counts, and its share of the mean's
// divisor (the label's class weight, 1 without weights or for probabilities, 0 if it does not
// count). A label that is neither a class nor ignore_index does not count here; the label
// check reports it (the op layer's on CPU, the kernels' on CUDA).
template <typename S>
struct PositionLabel {
  int64_t label;
  bool counts;
  S weight;
};

template <typename S>
FOCAL_HOST_DEVICE PositionLabel<S> position_label(const int64_t* labels, int64_t position,
                                                  int64_t ignore_index, int64_t classes,
                                                  const S* weight) {
  if (labels == nullptr) {
    return {-1, true, S(1)};
  }
  const int64_t label = labels[position];
  if (label == ignore_index || static_cast<uint64_t>(label) >= static_cast<uint64_t>(classes)) {
    return {-1, false, S(0)};
  }
  return {label, true, weight != nullptr ? weight[label] : S(1)};
}

// v where the position counts, else 0: an ignored position's logits (inf, NaN) leave no trace,
// where 0 times a NaN term would keep it.
template <typename Math, typename V, typename Mask>
FOCAL_HOST_DEVICE V where_counts(Mask counts, V v) {
  return Math::select(counts, v, V(0.0f));
}

// A running sum of finite terms with Kahan's compensation: within a few ulp of their exact sum
// however many they are, where a plain running sum drifts by up to n/2 ulp (a position's 5,000
// classes read one by one: 1e-4). value() is the sum; an inf term, or a sum past the float range
// (terms near 1e38), makes it NaN where a plain sum would be inf.
template <typename V>
struct CompensatedSum {
  V sum;
  V lost;  // what the last addition rounded away, negated

  FOCAL_HOST_DEVICE void add(V term) {
    const V corrected = term - lost;
    const V next = sum + corrected;
    lost = (next - sum) - corrected;
    sum = next;
  }
  FOCAL_HOST_DEVICE V value() const { return sum - lost; }
};

// A position's loss over its classes with soft targets: the compensated sum, or, where a term
// is not finite (an inf where the target names a masked class, as F.cross_entropy's loss is
// there), the plain sum, which keeps the inf that the compensation turns into NaN.
template <typename V>
struct ClassLossSum {
  CompensatedSum<V> compensated;
  V plain;

  FOCAL_HOST_DEVICE void add(V term) {
    compensated.add(term);
    plain = plain + term;
  }
  template <typename Math>
  FOCAL_HOST_DEVICE V value() const {
    return Math::select(plain - plain == V(0.0f), compensated.value(), plain);
  }
};

template <typename V>
FOCAL_HOST_DEVICE ClassLossSum<V> class_loss_sum_start() {
  const V zero(0.0f);
  return {{zero, zero}, zero};
}

// The sums of one position's exponentials, accumulated class by class (softmax_accumulate,
// which returns the class's exp(z - m): p = exp(z - m) / (1 + r) for a caller that keeps it),
// then finished (softmax_row).
template <typename V>
struct SoftmaxSums {
  CompensatedSum<V> others;  // exp(z_c - m) over the classes below the max (NaN if a logit is)
  V ties;                    // how many classes are at the max
};

template <typename V>
FOCAL_HOST_DEVICE SoftmaxSums<V> softmax_sums_start() {
  const V zero(0.0f);
  return {{zero, zero}, zero};
}

template <typename Math, typename V>
FOCAL_HOST_DEVICE V softmax_accumulate(V z, V max, SoftmaxSums<V>& sums) {
  const V zero(0.0f);
  const auto at_max = z == max;
  const V shifted_exp = Math::exp(z - max);
  sums.others.add(Math::select(at_max, zero, shifted_exp));
  sums.ties = sums.ties + Math::select(at_max, V(1.0f), zero);
  return shifted_exp;
}

template <typename V>
struct SoftmaxRow {
  V max;      // m
  V rest;     // r: the sum of exp(z - m) but one 1 (for the max)
  V log_sum;  // log1p(r) = log(sum exp(z - m))
  V inv_sum;  // 1 / (1 + r)
};

template <typename Math, typename V>
FOCAL_HOST_DEVICE SoftmaxRow<V> softmax_row(V max, const SoftmaxSums<V>& sums) {
  const V one(1.0f);
  const V rest = sums.others.value() + (sums.ties - one);
  // log1p's policy takes [0, 1]; above, 1 + r rounds by less than r's own rounding.
  const V log_sum = Math::select(rest <= one, Math::log1p(Math::min(rest, one)),
                                 Math::log(one + rest));
  return {max, rest, log_sum, Math::reciprocal(one + rest)};
}

template <typename V>
struct SoftmaxClass {
  V p;      // p_c
  V u;      // 1 - p_c
  V focal;  // -u^gamma log p_c: the class's loss before alpha, weight and target
  V slope;  // p_c d(focal)/d(p_c) = u^gamma (gamma p log p / u - 1) (when kSlope)
};

template <typename Math, bool kSlope, typename V, typename S>
FOCAL_HOST_DEVICE SoftmaxClass<V> softmax_class(V z, V shifted_exp, const SoftmaxRow<V>& row,
                                                const SoftmaxCoeffs<S>& coeffs) {
  const V zero(S(0));
  const V one(S(1));
  const V shifted = z - row.max;
  const V log_p = shifted - row.log_sum;
  const V p = shifted_exp * row.inv_sum;
  const V u = Math::select(shifted == zero, row.rest * row.inv_sum, one - p);
  V u_gamma = one;
  if (coeffs.modulated) {  // the same for the whole launch
    u_gamma = gamma_power<Math, GammaMode::General>(u, coeffs);
  }
  SoftmaxClass<V> terms{p, u, zero - u_gamma * log_p, zero};
  if constexpr (kSlope) {
    terms.slope = zero - u_gamma;
    if (coeffs.modulated) {
      // p log p / u, in [-1, 0]; -1 where u is 0 (see kUnitScale for the scaling). A logit of
      // -inf (a masked class) has p = 0 and log p = -inf: its p log p is the limit, 0.
      const V unit_scale(kUnitScale<S>);
      const V p_log_p = p * Math::max(log_p, V(std::numeric_limits<S>::lowest()));
      const V ratio =
          Math::select(u > zero, p_log_p * unit_scale * Math::reciprocal(u * unit_scale), zero - one);
      terms.slope = u_gamma * (V(coeffs.gamma) * ratio - one);
    }
  }
  return terms;
}

// One class's share of a position's loss and derivatives, for target q and class weight w (an
// ignored position's are selected away after: where_counts).
template <typename V>
struct SoftmaxTerms {
  V loss;        // alpha w q focal
  V unweighted;  // alpha q focal: d(loss)/d(w)
  V g;           // alpha w q slope (when kGrad)
  V d_target;    // alpha w focal: d(loss)/d(q), before the smoothing's scale
  V p;
  V u;
};

// shifted_exp: exp(z - m), which softmax_accumulate returned: a caller that kept it takes one exp
// per class instead of two.
template <typename Math, bool kGrad, typename V, typename S>
FOCAL_HOST_DEVICE SoftmaxTerms<V> softmax_terms(V z, V shifted_exp, V q, V w,
                                                const SoftmaxRow<V>& row,
                                                const SoftmaxCoeffs<S>& coeffs) {
  const SoftmaxClass<V> c = softmax_class<Math, kGrad>(z, shifted_exp, row, coeffs);
  const V alpha(coeffs.alpha);
  const V alpha_q = alpha * q;
  const V unweighted = alpha_q * c.focal;
  return {w * unweighted, unweighted, w * alpha_q * c.slope, alpha * w * c.focal, c.p, c.u};
}

// For callers that did not keep it: the CUDA kernels (a thread or warp per position keeps no
// buffer per class) and a label's one term per position.
template <typename Math, bool kGrad, typename V, typename S>
FOCAL_HOST_DEVICE SoftmaxTerms<V> softmax_terms(V z, V q, V w, const SoftmaxRow<V>& row,
                                                const SoftmaxCoeffs<S>& coeffs) {
  return softmax_terms<Math, kGrad>(z, Math::exp(z - row.max), q, w, row, coeffs);
}

// The class terms g summed over a position, apart at the max and below it (softmax_gradient).
template <typename V>
struct SoftmaxGradientSums {
  CompensatedSum<V> below;  // over the classes below the max
  V at_max;                 // over the classes at the max
};

template <typename V>
FOCAL_HOST_DEVICE SoftmaxGradientSums<V> softmax_gradient_sums_start() {
  const V zero(0.0f);
  return {{zero, zero}, zero};
}

template <typename Math, typename V>
FOCAL_HOST_DEVICE void softmax_gradient_accumulate(V z, V max, V g, SoftmaxGradientSums<V>& sums) {
  const V zero(0.0f);
  const auto at_max = z == max;
  sums.below.add(Math::select(at_max, zero, g));
  sums.at_max = sums.at_max + Math::select(at_max, g, zero);
}

// dL/dz_j = g_j - p_j sum_c g_c. At the max, where p_j and the targets may both near 1 and that
// difference would cancel, as g_j u_j - p_j (the other classes' g), u_j = r / (1 + r) from the
// row; the others' sum is the sum below plus at_max - g_j (0 for a lone max; tied classes
// have p <= 1/2 and cancel nothing).
template <typename Math, typename V>
FOCAL_HOST_DEVICE V softmax_gradient(V z, V g, V p, const SoftmaxRow<V>& row,
                                     const SoftmaxGradientSums<V>& sums) {
  const V u_at_max = row.rest * row.inv_sum;
  const V below = sums.below.value();
  return Math::select(z == row.max, g * u_at_max - p * (below + (sums.at_max - g)),
                      g - p * (below + sums.at_max));
}

// The same for a label y (no smoothing), where only g_y is not 0: g_y (1 - p_y) at the label,
// 1 - p_y taken as u_y, and -p_j g_y elsewhere.
template <typename Math, typename V, typename Mask>
FOCAL_HOST_DEVICE V softmax_label_gradient(Mask is_label, V p, V label_g, V label_u) {
  return Math::select(is_label, label_g * label_u, V(0.0f) - p * label_g);
}

}  // namespace focal
