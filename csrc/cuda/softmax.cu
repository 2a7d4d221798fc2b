// The softmax focal loss's CUDA kernel: each position's C logits read where they lie, a pass for
// the max, one for the sums, then the terms of focal_math.h's softmax terms, giving the loss and
// d(loss)/d(inputs). Where neighbouring positions lie side by side (an NCHW map) a thread takes
// a position and the loads coalesce across the warp; where a position's classes do (class
// stride 1, at least a warp of them), a warp takes it, lane by lane over the classes, which
// coalesces those loads and gives few positions (16,384 rows of 1,000 classes) the threads to
// fill a GPU. Its reduction is the sigmoid forward's: one partial sum per block, added in a
// fixed order by its finish kernel (no floating-point atomics).
#include "forward.cuh"

namespace focal::cuda {
namespace {

template <typename x_t>
struct SoftmaxPointers {
  using S = math_t<x_t>;
  const x_t* inputs;
  const int64_t* labels;      // or null: probabilities
  const S* probabilities;     // or null: labels
  const S* weight;            // per class, or null
  int64_t classes;
  int64_t positions;          // per sample
  int64_t num_positions;      // in all
  int64_t batch_stride;
  int64_t class_stride;
  int64_t position_stride;
  int64_t ignore_index;
  SoftmaxCoeffs<S> coeffs;
  S* loss;                    // per position, or null (reduced)
  saved_t<x_t>* grad_inputs;  // or null
  S* grad_targets;            // or null
  S* unweighted_loss;         // or null
  double* block_sums;
  double* block_divisors;
};

// The mean's divisor over a thread's positions (the weight of their labels not ignored, or their
// number), in a loop of its own after the loss's: the label check's report stays out of the hot
// loop, and its accumulator does not live across the hot loop's calls.
template <typename x_t>
__device__ __forceinline__ double labels_divisor(const SoftmaxPointers<x_t>& p) {
  const int64_t thread = grid_thread();
  const int64_t num_threads = grid_threads();
  double divisor = 0;
  for (int64_t position = thread; position < p.num_positions; position += num_threads) {
    const auto label = position_label(p.labels, position, p.ignore_index, p.classes, p.weight);
    if (!label.counts && p.labels[position] != p.ignore_index) {
      report_bad_label(p.labels + position, p.classes, /*with_background=*/false);
    }
    divisor += static_cast<double>(label.weight);
  }
  return divisor;
}

// Resident blocks per SM of a softmax kernel (its launch bounds and grid): float64's keeps 128
// registers a thread, where its double divisions' out-of-line slow paths (calls, which save what
// is live) spilled at 64.
template <typename x_t>
constexpr int kSoftmaxBlocksPerSM = std::is_same_v<x_t, double> ? 2 : kMaxBlocksPerSM;

// The threads that take a position, over every kLanes-th class from their lane: one thread, or
// a warp (where the classes lie side by side). What a position's lanes accumulate is combined
// across them by shuffles, in one order for every lane, so that each holds the same row; with
// one lane, it is the lane's own.
template <int kLanes>
struct PositionLanes {
  int lane;

  template <typename V>
  __device__ __forceinline__ V sum(V value) const {
    for (int offset = kLanes / 2; offset > 0; offset /= 2) {
      value += __shfl_xor_sync(0xffffffffu, value, offset);  // a + b == b + a: lanes agree
    }
    return value;
  }
  // The largest value. Lanes may end with different ones only where a logit is NaN, whose
  // exponential then makes every lane's sums, and so the whole position, NaN.
  template <typename Math, typename V>
  __device__ __forceinline__ V max(V value) const {
    for (int offset = kLanes / 2; offset > 0; offset /= 2) {
      value = Math::max(__shfl_xor_sync(0xffffffffu, value, offset), value);
    }
    return value;
  }
  // The lanes' accumulators as one: a compensated sum's value summed, as a sum with nothing lost.
  template <typename V>
  __device__ __forceinline__ CompensatedSum<V> combined(const CompensatedSum<V>& sums) const {
    return {sum(sums.value()), V(0)};
  }
  template <typename V>
  __device__ __forceinline__ SoftmaxSums<V> combined(const SoftmaxSums<V>& sums) const {
    return {combined(sums.others), sum(sums.ties)};
  }
  template <typename V>
  __device__ __forceinline__ ClassLossSum<V> combined(const ClassLossSum<V>& losses) const {
    return {combined(losses.compensated), sum(losses.plain)};
  }
  template <typename V>
  __device__ __forceinline__ SoftmaxGradientSums<V> combined(const SoftmaxGradientSums<V>& sums) const {
    return {combined(sums.below), sum(sums.at_max)};
  }
};

// A warp per position where its classes lie side by side, at least one a lane.
inline bool warp_per_position(int64_t class_stride, int64_t classes) {
  return class_stride == 1 && classes >= 32;
}

// kSoft: every class has a target (probabilities, or labels with label smoothing); else the one
// label of each position. kGrad: d(loss)/d(inputs) is written. kLanes: threads a position
// (PositionLanes), 32 only where the classes lie side by side (class stride 1) and are as many.
template <typename x_t, bool kSoft, bool kGrad, int kLanes>
__global__ void __launch_bounds__(kThreads, kSoftmaxBlocksPerSM<x_t>)
    softmax_focal_kernel(const SoftmaxPointers<x_t> p) {
  using S = math_t<x_t>;
  using Math = DeviceMath<S>;
  const S zero(0);
  double sum = 0;  // as the sigmoid forward's Partial; lane 0's positions only
  const int64_t thread = grid_thread();
  const int64_t num_threads = grid_threads();
  const PositionLanes<kLanes> lanes{static_cast<int>(threadIdx.x % kLanes)};
  const bool first_lane = lanes.lane == 0;
  const int64_t class_stride = kLanes > 1 ? 1 : p.class_stride;
  // A position's loss, once (from its first lane): into the block's sum, and stored for "none".
  const auto take_loss = [&](int64_t position, S loss) {
    if (first_lane) {
      sum += loss;
      if (p.loss != nullptr) {
        p.loss[position] = loss;
      }
    }
  };
  // A position's threads, and the position's sample and place in it, stepped along with it: a
  // 64-bit division per position is a subroutine call of ~70 instructions.
  const int64_t first_position = thread / kLanes;
  const int64_t num_position_threads = num_threads / kLanes;
  const int64_t step_samples = num_position_threads / p.positions;
  const int64_t step_within = num_position_threads - step_samples * p.positions;
  int64_t sample = first_position / p.positions;
  int64_t within = first_position - sample * p.positions;
  for (int64_t position = first_position; position < p.num_positions; position += num_position_threads) {
    const int64_t base = sample * p.batch_stride + within * p.position_stride;
    sample += step_samples;
    within += step_within;
    if (within >= p.positions) {
      within -= p.positions;
      ++sample;
    }
    const x_t* x = p.inputs + base;
    const PositionLabel<S> label = position_label(p.labels, position, p.ignore_index, p.classes, p.weight);

    S max = static_cast<S>(x[lanes.lane * class_stride]);  // classes >= kLanes
    for (int64_t c = lanes.lane + kLanes; c < p.classes; c += kLanes) {
      max = Math::max(static_cast<S>(x[c * class_stride]), max);
    }
    max = lanes.template max<Math>(max);
    SoftmaxSums<S> sums = softmax_sums_start<S>();
    for (int64_t c = lanes.lane; c < p.classes; c += kLanes) {
      softmax_accumulate<Math>(static_cast<S>(x[c * class_stride]), max, sums);
    }
    const SoftmaxRow<S> row = softmax_row<Math>(max, lanes.combined(sums));

    if constexpr (!kSoft) {
      // Where no label is: the term at the max, zeroed.
      const S label_logit = label.label >= 0 ? static_cast<S>(x[label.label * class_stride]) : max;
      const auto terms = softmax_terms<Math, kGrad>(label_logit, S(1), label.weight, row, p.coeffs);
      const S loss = where_counts<Math>(label.counts, terms.loss);
      take_loss(position, loss);
      for (int64_t c = lanes.lane; c < p.classes; c += kLanes) {
        if constexpr (kGrad) {
          const S prob = Math::exp(static_cast<S>(x[c * class_stride]) - max) * row.inv_sum;
          p.grad_inputs[base + c * class_stride] = static_cast<saved_t<x_t>>(where_counts<Math>(
              label.counts, softmax_label_gradient<Math>(c == label.label, prob, terms.g, terms.u)));
        }
        if (p.unweighted_loss != nullptr) {
          p.unweighted_loss[base + c * class_stride] = c == label.label ? terms.unweighted : zero;
        }
      }
    } else {
      // The target of class c: a given probability or the smoothed label.
      const auto target = [&](int64_t c) {
        const S given = p.probabilities != nullptr
                            ? p.probabilities[base + c * class_stride]
                            : (c == label.label ? S(1) : zero);
        return given * p.coeffs.target_scale + p.coeffs.smoothing_share;
      };
      const auto class_weight = [&](int64_t c) { return p.weight != nullptr ? p.weight[c] : S(1); };
      ClassLossSum<S> class_losses = class_loss_sum_start<S>();
      SoftmaxGradientSums<S> g_sums = softmax_gradient_sums_start<S>();
      for (int64_t c = lanes.lane; c < p.classes; c += kLanes) {
        const S z = static_cast<S>(x[c * class_stride]);
        const auto terms = softmax_terms<Math, kGrad>(z, target(c), class_weight(c), row, p.coeffs);
        class_losses.add(terms.loss);
        if constexpr (kGrad) {
          softmax_gradient_accumulate<Math>(z, max, terms.g, g_sums);
        }
        if (p.unweighted_loss != nullptr) {
          p.unweighted_loss[base + c * class_stride] = where_counts<Math>(label.counts, terms.unweighted);
        }
        if (p.grad_targets != nullptr) {
          p.grad_targets[base + c * class_stride] =
              where_counts<Math>(label.counts, terms.d_target * p.coeffs.target_scale);
        }
      }
      const S loss = where_counts<Math>(label.counts, lanes.combined(class_losses).template value<Math>());
      take_loss(position, loss);
      if constexpr (kGrad) {
        // Each class's term again (no per-class buffer), now that their sum is known.
        g_sums = lanes.combined(g_sums);
        for (int64_t c = lanes.lane; c < p.classes; c += kLanes) {
          const S z = static_cast<S>(x[c * class_stride]);
          const auto terms = softmax_terms<Math, true>(z, target(c), class_weight(c), row, p.coeffs);
          p.grad_inputs[base + c * class_stride] = static_cast<saved_t<x_t>>(where_counts<Math>(
              label.counts, softmax_gradient<Math>(z, terms.g, terms.p, row, g_sums)));
        }
      }
    }
  }
  const double block_loss = block_sum(sum);
  const double block_divisor = block_sum(labels_divisor(p));
  if (threadIdx.x == 0) {
    p.block_sums[blockIdx.x] = block_loss;
    p.block_divisors[blockIdx.x] = block_divisor;
  }
}

template <typename x_t>
void launch_softmax(const DeviceSoftmaxArgs& args, const LaunchPlace& place) {
  using S = math_t<x_t>;
  const bool elementwise = args.reduction == Reduction::None;
  SoftmaxPointers<x_t> p{
      args.inputs.const_data_ptr<x_t>(),
      args.labels.defined() ? args.labels.const_data_ptr<int64_t>() : nullptr,
      args.probabilities.defined() ? args.probabilities.const_data_ptr<S>() : nullptr,
      args.weight.defined() ? args.weight.const_data_ptr<S>() : nullptr,
      args.classes,
      args.positions,
      args.batch * args.positions,
      args.batch_stride,
      args.class_stride,
      args.position_stride,
      args.ignore_index,
      SoftmaxCoeffs<S>(args.alpha, args.gamma, args.label_smoothing, args.classes),
      elementwise ? args.loss.mutable_data_ptr<S>() : nullptr,
      data_or_null<saved_t<x_t>>(args.grad_inputs),
      data_or_null<S>(args.grad_targets),
      data_or_null<S>(args.unweighted_loss),
      nullptr,
      nullptr,
  };
  const bool warp_rows = warp_per_position(args.class_stride, args.classes);
  const int grid = grid_size(p.num_positions * (warp_rows ? 32 : 1), place.device, kSoftmaxBlocksPerSM<x_t>);
  // The per-block divisors, then the sums (both double), in the scratch.
  p.block_divisors = static_cast<double*>(place.partials(grid));
  p.block_sums = p.block_divisors + grid;
  const bool soft = p.labels == nullptr || args.label_smoothing > 0.0;
  dispatch_flag(soft, [&](auto soft_flag) {
    dispatch_flag(p.grad_inputs != nullptr, [&](auto grad_flag) {
      dispatch_flag(warp_rows, [&](auto rows_flag) {
        FOCAL_LAUNCH(grid, kThreads, place.stream,
                     softmax_focal_kernel<x_t, decltype(soft_flag)::value, decltype(grad_flag)::value,
                                          decltype(rows_flag)::value ? 32 : 1>)(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  // The sigmoid forward's finish, its counts the divisors: the mean of nothing is NaN, as
  // F.cross_entropy's.
  FOCAL_LAUNCH(1, kThreads, place.stream, finish_forward_kernel<double, S>)(
      p.block_sums, p.block_divisors, grid, args.reduction == Reduction::Mean,
      elementwise ? nullptr : args.loss.mutable_data_ptr<S>(), args.divisor.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_softmax_forward(const DeviceSoftmaxArgs& args, const LaunchPlace& place) {
  switch (args.inputs.scalar_type()) {
    case c10::kHalf: launch_softmax<c10::Half>(args, place); break;
    case c10::kBFloat16: launch_softmax<c10::BFloat16>(args, place); break;
    case c10::kFloat: launch_softmax<float>(args, place); break;
    case c10::kDouble: launch_softmax<double>(args, place); break;
    default:
      TORCH_INTERNAL_ASSERT(false, "focal_cuda: inputs of dtype ", args.inputs.scalar_type(),
                            " reached the CUDA softmax forward");
  }
}

}  // namespace focal::cuda
