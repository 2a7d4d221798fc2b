// The fused forward kernels (loss and gradients in one pass over inputs and targets), their
// deterministic two-stage reduction, and their launch for one inputs dtype and kind of targets:
// the kernel files (forward_<dtype>.cu, forward_<dtype>_labels.cu) call forward_with_inputs for
// theirs, so that a build compiles them in parallel.
//
// Grid-stride loops over packs of elements (16-byte loads of the inputs where every pointer is
// aligned, one element at a time otherwise), 64-bit indices, math in float (double for float64)
// through focal_math.h. Reductions write one partial sum per block and a one-block kernel adds
// them in a fixed order: no floating-point atomics, so results are bitwise reproducible.
#pragma once

#include <cstring>

#include "launch.cuh"

namespace focal::cuda {
namespace {

#ifndef FOCAL_CUDA_EMULATION
// PTX rcp.approx.ftz.f32, MUFU.RCP alone: 1 / v within 1 ulp, subnormal v and results flushed to
// zero. __fdividef(1, v) is the same estimate behind a rescaling of subnormal divisors (4 more
// instructions), which the formulas below never divide by. The CUDA emulation, which cannot run
// PTX, supplies its own, no better than the documented 1 ulp.
__device__ __forceinline__ float rcp_approx_ftz(float v) {
  float estimate;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(estimate) : "f"(v));
  return estimate;
}

// PTX ex2.approx.f32: 2^v within 2 ulp (CUDA's exp2f, which is this instruction), subnormal
// results kept (MUFU.EX2 behind a rescaling of arguments below -126) or, with .ftz (MUFU.EX2
// alone), flushed to zero. The emulation supplies its own, no better than 2 ulp.
template <bool kFlushSubnormals>
__device__ __forceinline__ float ex2_approx(float v) {
  float power;
  if constexpr (kFlushSubnormals) {
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(power) : "f"(v));
  } else {
    asm("ex2.approx.f32 %0, %1;" : "=f"(power) : "f"(v));
  }
  return power;
}
#endif

// The kernels' math: focal_math.h's scalar functions, with the GPU's reciprocal in float. The
// formulas divide only by normal floats (1 + e in [1, 2], log1p's 1 + v / 2 in [1, 1.5]; q and |p - t| scaled by
// kUnitScale, in [2^-117, 2^32] for targets in [0, 1], larger in magnitude beyond; 0 only where
// a select drops the result), so the hardware
// estimate and one Newton step (which squares the estimate's error) give 1 / v within 0.5 ulp
// and a hair, without IEEE division's range check and branch to its out-of-line slow path (a
// branch that also keeps the scheduler from moving loads across it).
template <typename S>
struct DeviceMath : ScalarMath<S> {};

template <>
struct DeviceMath<float> : ScalarMath<float> {
  static __device__ __forceinline__ float reciprocal(float v) {
    const float estimate = rcp_approx_ftz(v);
    return fmaf(fmaf(-v, estimate, 1.0f), estimate, estimate);
  }
  static __device__ __forceinline__ float log1p(float v) { return log1p_float<DeviceMath>(v); }
};

// The math of kernels whose results are stored in 16 bits (8 or 11 significant bits): the GPU's
// estimates unrefined, and log1p's shorter fit. exp(v) = 2^(v log2 e) errs by 2 ulp (ex2) plus
// |v| / 2 ulp (the product's rounding), a reciprocal by 1 ulp: for |x| <= 16 the loss and its
// derivatives stay within ~2^-18 of their exact values, so a stored value is at most 1 ulp off
// and differs from the correctly rounded one only where that lies that close to a rounding
// boundary (tests/test_cuda_emulation.py sweeps every 16-bit logit; bench/NOTES.md).
// kExpFlushesSubnormals: exp gives 0 for results below 2^-126, where the loss and its
// derivatives, powers of exp(-|x|) of degree above one, are below float's range anyway (gamma 2).
template <bool kExpFlushesSubnormals>
struct StorageRoundedMath : DeviceMath<float> {
  static __device__ __forceinline__ float exp(float v) {
    return ex2_approx<kExpFlushesSubnormals>(v * 1.44269504f);
  }
  static __device__ __forceinline__ float reciprocal(float v) { return rcp_approx_ftz(v); }
  static __device__ __forceinline__ float log1p(float v) {
    return log1p_float<StorageRoundedMath, 2>(v);
  }
};

// The math of a kernel of inputs x_t and loss out_t: the estimates where the loss is stored in 16
// bits, float32's (float64's) accuracy wherever it is not.
template <typename x_t, typename out_t, GammaMode kGamma>
using KernelMath = std::conditional_t<sizeof(out_t) == 2,
                                      StorageRoundedMath<kGamma == GammaMode::Two>,
                                      DeviceMath<math_t<x_t>>>;

// float64's pow inlined: CUDA's, a subroutine, saved registers to a stack at 64 per thread.
template <>
struct DeviceMath<double> : ScalarMath<double> {
  static __device__ __forceinline__ double pow(double base, double exponent) {
    return pow_double<DeviceMath>(base, exponent);
  }
};

// What the forward saves for backward (gradients, the loss before the weight) is stored as
// float32 for float16 operands: float16 would flush small values to zero before backward
// multiplies them by a loss scale (GradScaler's 2^16). bfloat16 has float32's range.
template <typename T>
using saved_t = std::conditional_t<std::is_same_v<T, c10::Half>, float, T>;


// The forward's, but float64's one element at a time: with packs of two, three float64 kernels
// spilled inside their loops at 64 registers (bench/NOTES.md). Its 8-byte loads already fill a
// warp's 256-byte transactions. Labels take packs of eight whatever the inputs (two 16-byte
// loads of float32), and 16-bit inputs without the inputs' gradient packs of sixteen: a pack's
// label reads and row bookkeeping (~33 SASS instructions) shared by more elements. With the
// gradient's pack held too, the 16-bit kernels spilled at sixteen.
template <typename x_t, typename t_t, bool kGradInputs>
constexpr int forward_pack_size() {
  return std::is_same_v<x_t, double>        ? 1
         : !std::is_same_v<t_t, int64_t>    ? pack_size<x_t>()
         : sizeof(x_t) == 2 && !kGradInputs ? 16
                                            : 8;
}


// values[k] in the math type. A bfloat16 is the high half of a float, so an odd element of a pack
// (the high half of its 32-bit word) takes a mask instead of a move and a shift.
template <typename T>
__device__ __forceinline__ math_t<T> to_math(const T* values, int k) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (k % 2 == 1) {  // in a pack: values[k - 1] starts a 4-byte aligned word
      uint32_t word;
      std::memcpy(&word, values + k - 1, sizeof(word));
      const uint32_t bits = word & 0xffff0000u;
      float value;
      std::memcpy(&value, &bits, sizeof(value));
      return value;
    }
  }
  return static_cast<math_t<T>>(values[k]);
}

// Sum over a block of kThreads threads, combined in a fixed order; the result is valid in
// thread 0. Every thread of the block must call it.
template <typename A>
__device__ A block_sum(A value) {
  __shared__ A warp_sums[kThreads / 32];
  __syncthreads();  // an earlier call's readers are done with warp_sums
  for (int offset = 16; offset > 0; offset /= 2) {
    value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) {
    warp_sums[warp] = value;
  }
  __syncthreads();
  if (warp == 0) {
    value = lane < kThreads / 32 ? warp_sums[lane] : A(0);
    for (int offset = kThreads / 64; offset > 0; offset /= 2) {
      value += __shfl_down_sync(0xffffffffu, value, offset);
    }
  }
  return value;
}

// Everything a forward kernel reads and writes. x_t: inputs; t_t: floating targets, or int64
// class labels; out_t: loss; S: math type; what backward reads in saved_t of each. Null output
// pointers are outputs not requested (loss: a reduced loss, which only block_sums carries).
template <typename x_t, typename t_t, typename out_t>
struct ForwardPointers {
  using S = math_t<x_t>;
  const x_t* inputs;
  const t_t* targets;
  const S* weight;
  const S* scores;  // labels only: the labelled class's target per row; null: 1
  WeightKind weight_kind;
  int64_t classes;
  int64_t ignore_index;
  int64_t n;
  LossCoeffs<S> coeffs;
  out_t* loss;
  saved_t<out_t>* unweighted_loss;
  saved_t<x_t>* grad_inputs;
  saved_t<t_t>* grad_targets;
  S* grad_scores;  // labels only: d(loss)/d(scores) per row, written by the labelled element
  double* block_sums;
  int64_t* block_counts;
  bool rows_pass;  // labels: the second launch, over rows (labelled_rows)
};

template <typename t_t>
constexpr bool kIsLabels = std::is_same_v<t_t, int64_t>;

// The weight of the element at (row, cls), element_weights[k] being its own (kind Element).
template <typename x_t, typename t_t, typename out_t>
__device__ __forceinline__ math_t<x_t> weight_of(const ForwardPointers<x_t, t_t, out_t>& p,
                                                 const math_t<x_t>* element_weights, int64_t k,
                                                 int64_t row, int64_t cls) {
  switch (p.weight_kind) {
    case WeightKind::None: break;
    case WeightKind::Element: return element_weights[k];
    case WeightKind::Row: return p.weight[row];
    case WeightKind::Class: return p.weight[cls];
  }
  return math_t<x_t>(1);
}

#ifndef FOCAL_CUDA_EMULATION
// PTX's vprintf system call, what printf compiles to, given an argument buffer that already lies
// in memory: printf would first copy its arguments into a buffer on the stack.
__device__ __forceinline__ void vprintf_from(const char* format, const void* arguments) {
  asm volatile(
      "{\n"
      ".extern .func (.param .b32 status) vprintf (.param .b64 format, .param .b64 arguments);\n"
      ".param .b64 format_param;\n"
      ".param .b64 arguments_param;\n"
      ".param .b32 status_param;\n"
      "st.param.b64 [format_param], %0;\n"
      "st.param.b64 [arguments_param], %1;\n"
      "call.uni (status_param), vprintf, (format_param, arguments_param);\n"
      "}\n" ::"l"(format), "l"(arguments) : "memory");
}
#endif

// The GPU's report of a label (at `label` in targets) that is no class, not the background
// (with_background: class C, the sigmoid losses') and not ignore_index: out of line, so that the
// kernels hold only a branch to it. The label is printed from where it lies in targets, which
// makes it vprintf's argument buffer: no stack.
__device__ __noinline__ void report_bad_label(const int64_t* label, int64_t classes,
                                              bool with_background) {
  vprintf_from(with_background
                   ? "focal_cuda: targets holds the class label %lld; valid labels are 0 to C - 1, "
                     "C (background) and ignore_index, for the C classes of inputs\n"
                   : "focal_cuda: targets holds the class label %lld; valid labels are 0 to C - 1 "
                     "and ignore_index, for the C classes along inputs' class dimension\n",
               label);
  CUDA_KERNEL_ASSERT(*label >= 0 && *label < classes + with_background && "class label out of range");
}

// The elements of a pack that are not their counted row's negatives, as a bit mask: its rows'
// labelled classes and the elements of ignored rows. The pack's first row holds its elements
// [0, boundary), the next the rest (the host packs label rows at least a pack long, so there are
// at most two). The labels are read once per pack and taken on trust: compared with classes,
// never used as an index (the second launch checks them).
template <typename x_t, typename out_t>
__device__ __forceinline__ uint32_t special_elements(
    const ForwardPointers<x_t, int64_t, out_t>& p, int64_t row, int32_t cls, int32_t boundary,
    int num) {
  const int in_first = std::min(boundary, num);
  const int64_t first = p.targets[row];
  const int64_t next = p.targets[row + (in_first < num ? 1 : 0)];  // else the first row's again
  // Offsets of the labelled elements in 32 bits (a checked label is at most C, which fits): the
  // background (C) and a label below cls fall outside [0, in_first), a label of the next row
  // outside [0, num - in_first) unless it is a class.
  const uint32_t first_offset = static_cast<uint32_t>(first) - static_cast<uint32_t>(cls);
  const uint32_t next_offset = static_cast<uint32_t>(next);
  const uint32_t first_row = (1u << in_first) - 1u;
  const uint32_t next_row = ((1u << num) - 1u) & ~first_row;
  return (first_offset < static_cast<uint32_t>(in_first) ? 1u << first_offset : 0u) |
         (next_offset < static_cast<uint32_t>(num - in_first) ? 1u << (in_first + next_offset) : 0u) |
         (first == p.ignore_index ? first_row : 0u) | (next == p.ignore_index ? next_row : 0u);
}

// The weights a forward loop reads: none, one per element, or any kind through a switch per
// element (the only loop that tracks rows and classes for weights per row or per class).
enum class WeightLoop { None, Element, AnyKind };
template <WeightLoop kWeights>
using weight_loop_t = std::integral_constant<WeightLoop, kWeights>;

// Whether a forward's loops track each element's row and class: for labels, and for weights
// per row or per class (which only the AnyKind loop reads). The host packs such rows only when
// they are at least a pack long, so that a pack meets at most two rows.
FOCAL_HOST_DEVICE bool tracks_rows(bool labels, WeightKind weights) {
  return labels || weights == WeightKind::Row || weights == WeightKind::Class;
}

// The sum of the loss over a thread's elements, and how many of them count for the mean. The
// sum in double, each pack's added in the math type first: a thread may add thousands of terms,
// which float alone rounded to 5-25 ulp of the result (1,000-4,000 a thread), double to the
// CPU's ~1 (tests/test_cuda_emulation.py), at one double add per pack.
struct Partial {
  double sum;
  int64_t count;
};

// A thread's share of the forward's first (with floating targets, only) launch: every output of
// its elements, and their Partial. With labels every element is computed as its row's negative
// (target 0, counted), so that the loops hold no per-element label work, only a read of the
// labels per pack; the special elements (a row's labelled class, and an ignored row's elements:
// one element of a row at most in dense detection, none for the background) are left out of the
// sum, and labelled_rows overwrites their outputs in a second launch. The scores' gradient
// (the labels' target gradient) is that launch's too.
template <typename x_t, typename t_t, typename out_t, GammaMode kGamma, bool kGradInputs,
          bool kGradTargets, bool kFamily, int kPack>
__device__ __forceinline__ Partial forward_elements(
    const ForwardPointers<x_t, t_t, out_t>& p) {
  using S = math_t<x_t>;
  using Math = KernelMath<x_t, out_t, kGamma>;
  // A label's class, and a class plus a grid stride's classes, fit 32 bits (the host checks C
  // <= 2^30); float targets' classes may not.
  using class_t = std::conditional_t<kIsLabels<t_t>, int32_t, int64_t>;
  static_assert(!(kGradTargets && kIsLabels<t_t>), "the scores' gradient is labelled_rows'");
  double sum = 0;
  int64_t count = 0;
  // Whether the loop of `weights` (a weight_loop_t, below) tracks rows; the None and Element
  // loops, which never meet weights per row or per class, know it at compile time.
  const bool launch_tracks_rows = tracks_rows(kIsLabels<t_t>, p.weight_kind);
  const auto loop_tracks_rows = [&](auto weights) {
    return decltype(weights)::value == WeightLoop::AnyKind ? launch_tracks_rows : kIsLabels<t_t>;
  };

  // The num elements of one pack, the first of which lies in row `row`, class `cls`; labels'
  // special elements left out of the sum (their values are the second launch's).
  // weights (a weight_loop_t): the weights the code reads. Without weights per row or per class
  // it needs no switch over the weight kinds, and no row and class unless labels do. The switch
  // is a branch per element, which keeps the scheduler from interleaving a pack's elements (~30
  // SASS instructions per element for floating targets, ~15 for labels: bench/NOTES.md); without
  // weights, the loop multiplies by none. The packed kernels take a loop of each, chosen once
  // per launch. element_weights: the elements' weights where weight_kind is Element.
  auto process = [&](auto weights, int64_t row, class_t cls, int num, const x_t* xs,
                     const t_t* ts, const S* element_weights, out_t* losses,
                     saved_t<out_t>* unweighted, saved_t<x_t>* grads_inputs,
                     saved_t<t_t>* grads_targets) {
    constexpr WeightLoop kWeights = decltype(weights)::value;
    const bool tracking = loop_tracks_rows(weights);
    // Elements [0, boundary) lie in `row`, the rest in the next row (the host packs rows only
    // when they are at least a pack long).
    const class_t boundary = static_cast<class_t>(p.classes - cls);
    uint32_t special = 0u;
    if constexpr (kIsLabels<t_t>) {
      special = special_elements(p, row, cls, boundary, num);  // counted by labelled_rows
    } else {
      count += num;
    }
    S pack_sum(0);
#pragma unroll
    for (int k = 0; k < kPack; ++k) {
      if (k < num) {
        const bool next_row = tracking && k > 0 && k >= boundary;  // boundary >= 1
        S target(0);  // a label's negative
        if constexpr (!kIsLabels<t_t>) {
          target = to_math(ts, k);
        }
        S weight(1);
        if constexpr (kWeights == WeightLoop::AnyKind) {
          weight = weight_of(p, element_weights, k, row + (next_row ? 1 : 0),
                             next_row ? cls + k - p.classes : cls + k);
        } else if constexpr (kWeights == WeightLoop::Element) {
          weight = element_weights[k];
        }
        const auto terms = loss_terms<Math, kGamma, kGradInputs, kGradTargets, kFamily>(
            to_math(xs, k), target, weight, S(1), p.coeffs);
        if ((special >> k & 1u) == 0u) {
          pack_sum += terms.loss;
        }
        losses[k] = static_cast<out_t>(terms.loss);
        unweighted[k] = static_cast<saved_t<out_t>>(terms.unweighted_loss);
        grads_inputs[k] = static_cast<saved_t<x_t>>(terms.grad_inputs);
        if constexpr (kGradTargets) {
          grads_targets[k] = static_cast<saved_t<t_t>>(terms.grad_targets);
        }
      }
    }
    sum += pack_sum;
  };

  const int64_t thread = grid_thread();
  const int64_t num_threads = grid_threads();
  const int64_t num_packs = p.n / kPack;
  auto all_elements = [&](auto weight_loop) {
    const bool tracking = loop_tracks_rows(weight_loop);
    // The row and class of each pack's first element. The packed loops advance them by the grid
    // stride (divisions once per thread, not per pack); the element loops divide per element,
    // which keeps the registers the float64 kernels lack at 64.
    const auto classes = static_cast<class_t>(p.classes);
    const auto position = [&](int64_t element, int64_t& row, class_t& cls) {
      row = tracking ? element / p.classes : 0;
      cls = tracking ? static_cast<class_t>(element - row * p.classes) : 0;
    };
    int64_t row;
    class_t cls;
    position(thread * kPack, row, cls);
    int64_t stride_rows;
    class_t stride_classes;
    position(num_threads * kPack, stride_rows, stride_classes);
    for (int64_t pack = thread; pack < num_packs; pack += num_threads) {
      if constexpr (kPack == 1) {
        position(pack, row, cls);
      }
      const auto xs = reinterpret_cast<const Pack<x_t, kPack>*>(p.inputs)[pack];
      Pack<t_t, kPack> ts;  // unused for labels, which are read per row
      if constexpr (!kIsLabels<t_t>) {
        ts = reinterpret_cast<const Pack<t_t, kPack>*>(p.targets)[pack];
      }
      Pack<out_t, kPack> losses;
      Pack<saved_t<out_t>, kPack> unweighted;
      Pack<saved_t<x_t>, kPack> grads_inputs;
      Pack<saved_t<t_t>, kPack> grads_targets;
      // Weights per element are read one at a time, as each element needs its own: a pack of
      // them held through the math made the General kernels spill.
      const S* element_weights =
          p.weight_kind == WeightKind::Element ? p.weight + pack * kPack : nullptr;
      process(weight_loop, row, cls, kPack, xs.v, ts.v, element_weights, losses.v, unweighted.v,
              grads_inputs.v, grads_targets.v);
      if (p.loss != nullptr) {
        reinterpret_cast<Pack<out_t, kPack>*>(p.loss)[pack] = losses;
      }
      if (p.unweighted_loss != nullptr) {
        reinterpret_cast<Pack<saved_t<out_t>, kPack>*>(p.unweighted_loss)[pack] = unweighted;
      }
      if constexpr (kGradInputs) {
        reinterpret_cast<Pack<saved_t<x_t>, kPack>*>(p.grad_inputs)[pack] = grads_inputs;
      }
      if constexpr (kGradTargets) {
        reinterpret_cast<Pack<saved_t<t_t>, kPack>*>(p.grad_targets)[pack] = grads_targets;
      }
      if (kPack > 1 && tracking) {
        cls += stride_classes;
        const bool wraps = cls >= classes;
        cls -= wraps ? classes : 0;
        row += wraps ? stride_rows + 1 : stride_rows;
      }
    }
    // The last n % kPack elements (fewer than the threads of one block).
    const int64_t tail = num_packs * kPack + thread;
    if (tail < p.n) {
      int64_t tail_row;
      class_t tail_class;
      position(tail, tail_row, tail_class);
      out_t loss_value;
      saved_t<out_t> unweighted_value;
      saved_t<x_t> grad_inputs_value;
      saved_t<t_t> grad_targets_value;
      process(weight_loop, tail_row, tail_class, 1, p.inputs + tail,
              kIsLabels<t_t> ? nullptr : p.targets + tail,
              p.weight_kind == WeightKind::Element ? p.weight + tail : nullptr, &loss_value,
              &unweighted_value, &grad_inputs_value, &grad_targets_value);
      if (p.loss != nullptr) {
        p.loss[tail] = loss_value;
      }
      if (p.unweighted_loss != nullptr) {
        p.unweighted_loss[tail] = unweighted_value;
      }
      if constexpr (kGradInputs) {
        p.grad_inputs[tail] = grad_inputs_value;
      }
      if constexpr (kGradTargets) {
        p.grad_targets[tail] = grad_targets_value;
      }
    }
  };
  if constexpr (kPack > 1) {
    if (p.weight_kind == WeightKind::None) {
      all_elements(weight_loop_t<WeightLoop::None>{});
      return {sum, count};
    }
    // Labels with weights per element take the switch: a loop of their own spilled registers.
    if (!kIsLabels<t_t> && p.weight_kind == WeightKind::Element) {
      all_elements(weight_loop_t<WeightLoop::Element>{});
      return {sum, count};
    }
  }
  all_elements(weight_loop_t<WeightLoop::AnyKind>{});
  return {sum, count};
}

// Checks the labels of the rows a thread visits in a label forward's second launch, one read
// per row, reporting a bad one, and returns how many elements of those rows count for the mean.
// A loop of its own: inside labelled_rows' loop, the registers live across the report's call
// went to a stack in the float64 kernels.
template <typename x_t, typename out_t>
__device__ __forceinline__ int64_t check_and_count_labels(
    const ForwardPointers<x_t, int64_t, out_t>& p) {
  const int64_t rows = p.n / p.classes;
  int64_t counted_rows = 0;
  for (int64_t row = grid_thread(); row < rows; row += grid_threads()) {
    const int64_t label = p.targets[row];
    const bool counted = label != p.ignore_index;
    if (counted && static_cast<uint64_t>(label) > static_cast<uint64_t>(p.classes)) {
      report_bad_label(p.targets + row, p.classes, /*with_background=*/true);
    }
    counted_rows += counted ? 1 : 0;
  }
  return counted_rows * p.classes;
}

// A thread's share of a label forward's second launch, over rows: each row's special elements
// recomputed over the first launch's outputs, their loss added to the sum, then the labels
// checked and counted: the labelled class with the row's score (1 without scores) as its
// target, and every element of an ignored row with target 0, not counted (0, or NaN where the
// logit makes the terms NaN, as the CPU kernels' validity factor gives).
template <typename x_t, typename out_t, GammaMode kGamma, bool kGradInputs, bool kGradTargets,
          bool kFamily>
__device__ __forceinline__ Partial labelled_rows(const ForwardPointers<x_t, int64_t, out_t>& p) {
  using S = math_t<x_t>;
  using Math = KernelMath<x_t, out_t, kGamma>;
  double sum = 0;
  const auto recompute = [&](int64_t row, int64_t cls, S target, S valid) {
    const int64_t i = row * p.classes + cls;
    const auto terms = loss_terms<Math, kGamma, kGradInputs, kGradTargets, kFamily>(
        to_math(p.inputs + i, 0), target, weight_of(p, p.weight, i, row, cls), valid, p.coeffs);
    sum += terms.loss;
    if (p.loss != nullptr) {
      p.loss[i] = static_cast<out_t>(terms.loss);
    }
    if (p.unweighted_loss != nullptr) {
      p.unweighted_loss[i] = static_cast<saved_t<out_t>>(terms.unweighted_loss);
    }
    if constexpr (kGradInputs) {
      p.grad_inputs[i] = static_cast<saved_t<x_t>>(terms.grad_inputs);
    }
    return terms.grad_targets;
  };
  const int64_t rows = p.n / p.classes;
  for (int64_t row = grid_thread(); row < rows; row += grid_threads()) {
    const int64_t label = p.targets[row];
    if (label == p.ignore_index) {
      for (int64_t cls = 0; cls < p.classes; ++cls) {
        recompute(row, cls, S(0), S(0));
      }
    } else if (static_cast<uint64_t>(label) < static_cast<uint64_t>(p.classes)) {
      const S grad_score = recompute(row, label, p.scores != nullptr ? p.scores[row] : S(1), S(1));
      if constexpr (kGradTargets) {
        p.grad_scores[row] = grad_score;
      }
    }
  }
  return {sum, check_and_count_labels(p)};  // after the math, so as not to hold the count over it
}

// fn(target gradient, family), each as a std::bool_constant: the family's forms only in kernels
// that have them.
template <bool kHasFamily, typename Fn>
__device__ __forceinline__ auto with_flags(bool target_gradient, bool family, Fn&& fn) {
  if constexpr (kHasFamily) {
    if (family) {
      return target_gradient ? fn(std::true_type{}, std::true_type{})
                             : fn(std::false_type{}, std::true_type{});
    }
  }
  return target_gradient ? fn(std::true_type{}, std::false_type{})
                         : fn(std::false_type{}, std::false_type{});
}

template <typename x_t, typename t_t, typename out_t, GammaMode kGamma, bool kGradInputs, int kPack>
__global__ void __launch_bounds__(kThreads, kMaxBlocksPerSM)
    focal_forward_kernel(const ForwardPointers<x_t, t_t, out_t> p) {
  // The target gradient (of floating targets, or of the scores of labels) and the loss form
  // are decided here, once, rather than compiled into kernels of their own or tested per
  // element. The focal loss's loops hold no other form's code (small, and kind to the
  // instruction cache); the family's are in the General element kernels only (the host sends
  // every other form there): unrolled over a pack, and in every kernel, its three forms
  // tripled the build time. A label forward's second launch (rows_pass) runs in the element
  // kernels.
  constexpr bool kHasFamily = kGamma == GammaMode::General && kPack == 1;
  const bool target_gradient = p.grad_targets != nullptr || p.grad_scores != nullptr;
  const bool family = p.coeffs.form != LossForm::Focal;
  // The first (or only) launch; the scores' gradient, the labels' target gradient, is the
  // second launch's.
  const auto elements = [&] {
    return with_flags<kHasFamily>(!kIsLabels<t_t> && target_gradient, family,
                                  [&](auto gradient, auto forms) {
      return forward_elements<x_t, t_t, out_t, kGamma, kGradInputs,
                              decltype(gradient)::value && !kIsLabels<t_t>, decltype(forms)::value,
                              kPack>(p);
    });
  };
  Partial partial;
  if constexpr (kIsLabels<t_t> && kPack == 1) {
    partial = !p.rows_pass ? elements()
                           : with_flags<kHasFamily>(target_gradient, family, [&](auto gradient, auto forms) {
                               return labelled_rows<x_t, out_t, kGamma, kGradInputs,
                                                    decltype(gradient)::value, decltype(forms)::value>(p);
                             });
  } else {
    partial = elements();
  }
  const auto sum = block_sum(partial.sum);
  const auto count = block_sum(partial.count);
  if (threadIdx.x == 0) {
    p.block_sums[blockIdx.x] = sum;
    p.block_counts[blockIdx.x] = count;
  }
}

// One block adds the per-block sums and counts in a fixed order, writes the count, and the loss
// (divided by the count for the mean) when it is reduced. count_t: int64_t, the elements
// counted; double, the softmax loss's divisor (a sum of class weights).
template <typename count_t, typename out_t>
__global__ void __launch_bounds__(kThreads)
    finish_forward_kernel(const double* __restrict__ block_sums,
                          const count_t* __restrict__ block_counts, int num_blocks, bool mean,
                          out_t* __restrict__ reduced_loss, count_t* __restrict__ count) {
  double sum = 0;
  count_t total = 0;
  for (int i = threadIdx.x; i < num_blocks; i += kThreads) {
    sum += block_sums[i];
    total += block_counts[i];
  }
  sum = block_sum(sum);
  total = block_sum(total);
  if (threadIdx.x == 0) {
    *count = total;
    if (reduced_loss != nullptr) {
      // The mean of nothing is NaN (0 / 0), as in torch.
      *reduced_loss = static_cast<out_t>(mean ? sum / static_cast<double>(total) : sum);
    }
  }
}

// fn(x_t{}, t_t{}, out_t{}) for the forward's combinations: floating targets in a pair above
// (the loss takes the targets' dtype, the promoted one), or int64 labels (the loss takes the
// inputs' dtype, or float32 for 16-bit inputs under autocast).
template <typename Fn>
bool dispatch_forward_types(const DeviceForwardArgs& args, Fn&& fn) {
  if (!args.labels) {
    return dispatch_dtype_pair(args.inputs.scalar_type(), args.targets.scalar_type(),
                               [&](auto x_value, auto t_value) { fn(x_value, t_value, t_value); });
  }
  const bool float_loss = args.loss.scalar_type() == c10::kFloat;
  return dispatch_dtype_pair(args.inputs.scalar_type(), args.inputs.scalar_type(),
                             [&](auto x_value, auto) {
                               using x_t = decltype(x_value);
                               if constexpr (std::is_same_v<math_t<x_t>, x_t>) {
                                 fn(x_value, int64_t{}, x_value);  // float, double
                               } else if (float_loss) {
                                 fn(x_value, int64_t{}, float{});
                               } else {
                                 fn(x_value, int64_t{}, x_value);
                               }
                             });
}

template <typename T>
T* data_or_null(const DeviceTensor& tensor) {
  return tensor.defined() ? tensor.mutable_data_ptr<T>() : nullptr;
}

// The forward for inputs x_t, targets t_t and loss out_t: the fused kernel of the launch's gamma
// mode and gradients, packed where every per-element array is aligned, then the reduction.
template <typename x_t, typename t_t, typename out_t>
void launch_forward(const DeviceForwardArgs& args, const LaunchPlace& place) {
  const int64_t n = args.inputs.numel();
  const bool elementwise = args.reduction == Reduction::None;
  using S = math_t<x_t>;
  ForwardPointers<x_t, t_t, out_t> p{
      args.inputs.const_data_ptr<x_t>(),
      args.targets.const_data_ptr<t_t>(),
      args.weight.defined() ? args.weight.const_data_ptr<S>() : nullptr,
      args.scores.defined() ? args.scores.const_data_ptr<S>() : nullptr,
      args.weight_kind,
      args.classes,
      args.ignore_index,
      n,
      LossCoeffs<S>(args.form, args.coefficients, args.label_smoothing),
      elementwise ? args.loss.mutable_data_ptr<out_t>() : nullptr,
      data_or_null<saved_t<out_t>>(args.unweighted_loss),
      data_or_null<saved_t<x_t>>(args.grad_inputs),
      kIsLabels<t_t> ? nullptr : data_or_null<saved_t<t_t>>(args.grad_targets),
      data_or_null<S>(args.grad_scores),
      nullptr,
      nullptr,
      false,
  };
  // Packs of inputs are loaded whole; the other per-element arrays must then be aligned too.
  // The family's forms run one element at a time (loads still coalesced across the warp), and
  // so do rows shorter than a pack where the loops track rows.
  const int pack = p.grad_inputs != nullptr ? forward_pack_size<x_t, t_t, true>()
                                            : forward_pack_size<x_t, t_t, false>();
  const bool packed =
      args.form == LossForm::Focal &&
      (!tracks_rows(kIsLabels<t_t>, args.weight_kind) || args.classes >= pack) &&
      is_aligned_for_pack<x_t>(p.inputs, pack) &&
      is_aligned_for_pack<saved_t<x_t>>(p.grad_inputs, pack) &&
      (kIsLabels<t_t> || is_aligned_for_pack<t_t>(p.targets, pack)) &&
      is_aligned_for_pack<saved_t<t_t>>(p.grad_targets, pack) &&
      is_aligned_for_pack<out_t>(p.loss, pack) &&
      is_aligned_for_pack<saved_t<out_t>>(p.unweighted_loss, pack);
  const int grid = grid_size(packed ? n / pack : n, place.device);
  // Labels take a second launch over the rows (labelled_rows), with partial sums of its own.
  const int rows_grid = kIsLabels<t_t> ? grid_size(n / args.classes, place.device) : 0;
  const int blocks = grid + rows_grid;
  // The per-block counts, then the partial sums, in the scratch.
  p.block_counts = static_cast<int64_t*>(place.partials(blocks));
  p.block_sums = reinterpret_cast<double*>(p.block_counts + blocks);

  // The family's forms run in the General element kernels only (their exponent by products
  // or pow): the Zero, Two and packed kernels carry the focal loss alone.
  const GammaMode mode =
      args.form == LossForm::Focal ? gamma_mode(args.coefficients.gamma) : GammaMode::General;
  // gamma 1 runs in the General kernels: their products-or-pow decision is uniform across a
  // warp, and one kernel set fewer keeps the build and the emulated sweep smaller.
  dispatch_gamma_mode<GammaMode::Zero, GammaMode::Two, GammaMode::General>(
      mode, [&](auto gamma_mode) {
    dispatch_flag(p.grad_inputs != nullptr, [&](auto grad_inputs_flag) {
      constexpr GammaMode kGamma = decltype(gamma_mode)::value;
      constexpr bool kGradInputs = decltype(grad_inputs_flag)::value;
      constexpr int kPack = forward_pack_size<x_t, t_t, kGradInputs>();
      if (packed) {
        FOCAL_LAUNCH(grid, kThreads, place.stream,
                     focal_forward_kernel<x_t, t_t, out_t, kGamma, kGradInputs, kPack>)(p);
      } else {
        FOCAL_LAUNCH(grid, kThreads, place.stream,
                     focal_forward_kernel<x_t, t_t, out_t, kGamma, kGradInputs, 1>)(p);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (rows_grid > 0) {
        auto rows = p;
        rows.rows_pass = true;
        rows.block_sums += grid;
        rows.block_counts += grid;
        FOCAL_LAUNCH(rows_grid, kThreads, place.stream,
                     focal_forward_kernel<x_t, t_t, out_t, kGamma, kGradInputs, 1>)(rows);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });

  FOCAL_LAUNCH(1, kThreads, place.stream, finish_forward_kernel<int64_t, out_t>)(
      p.block_sums, p.block_counts, blocks, args.reduction == Reduction::Mean,
      elementwise ? nullptr : args.loss.mutable_data_ptr<out_t>(),
      args.count.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The forward for inputs of dtype x_t and labels (kLabels) or floating targets: what the entry
// points forward_<dtype> and forward_<dtype>_labels call. In the anonymous namespace like the
// kernels, so that each kernel file has its own.
template <typename x_t, bool kLabels>
void forward_with_inputs(const DeviceForwardArgs& args, const LaunchPlace& place) {
  const bool dispatched = dispatch_forward_types(args, [&](auto x_value, auto t_value, auto out_value) {
    if constexpr (std::is_same_v<decltype(x_value), x_t> &&
                  std::is_integral_v<decltype(t_value)> == kLabels) {
      launch_forward<x_t, decltype(t_value), decltype(out_value)>(args, place);
    }
  });
  TORCH_INTERNAL_ASSERT(dispatched && args.inputs.scalar_type() == c10::CppTypeToScalarType<x_t>::value &&
                            args.labels == kLabels,
                        "focal_cuda: dtypes ", args.inputs.scalar_type(), ", ",
                        args.targets.scalar_type(), " -> ", args.loss.scalar_type(),
                        " reached the CUDA forward unconverted");
}

}  // namespace
}  // namespace focal::cuda
