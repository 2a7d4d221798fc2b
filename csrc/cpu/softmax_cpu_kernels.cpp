// CPU kernel of the softmax focal loss: the loss and d(loss)/d(inputs) in one pass over each
// position's C logits (focal_math.h's softmax terms), compiled once per instruction set like
// focal_cpu_kernels.cpp.
//
// Two ways to fill a vector. compute_block: W positions, one per lane, the loops over the
// classes, so the math of one position never crosses lanes and every C and layout vectorizes
// alike; W consecutive positions of an NCHW map lie side by side in each class's plane and are
// read where they lie, other blocks (channels-last, few classes in rows, a sample's last
// positions, 16-bit storage) are first gathered class-major into a buffer in the math type and
// their outputs scattered back. compute_row, where at least 4 W classes lie side by side ((N, C)
// rows, wide channels-last maps): one position at a time, vectors over its classes, their sums
// reduced across lanes. Chunks of a fixed number of positions (for a given C) are summed in
// order, so the reduction is bitwise the same at any thread count.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu/cpu_math.h"

namespace focal::cpu::FOCAL_CPU_ISA {
namespace {

// About this many elements per chunk of the parallel loop.
constexpr int64_t kChunkElements = 1 << 15;

// Where the W (or fewer) positions of a block lie: the element of class c at lane l is at
// offsets[l] + c * class_stride of the inputs and of every per-element output.
template <typename S>
struct BlockPlace {
  static constexpr int64_t kLanes = Vectorized<S>::size();
  int64_t first;                  // the first position
  int64_t lanes;                  // positions in the block, <= kLanes
  bool direct;                    // kLanes positions with offsets[l] = offsets[0] + l
  int64_t offsets[Vectorized<S>::size()];
};

// lanes x classes values of src at the block's offsets, class-major into buffer (class c of lane
// l at c * kLanes + l) in the math type; the lanes past the block are 0.
template <typename S>
void gather(const RawTensor& src, const BlockPlace<S>& place, int64_t classes, int64_t class_stride,
            S* buffer) {
  constexpr int64_t kLanes = BlockPlace<S>::kLanes;
  std::fill(buffer, buffer + classes * kLanes, S(0));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.dtype, "focal_softmax_gather", [&] {
    const auto* data = static_cast<const scalar_t*>(src.data);
    for (int64_t lane = 0; lane < place.lanes; ++lane) {
      const scalar_t* values = data + place.offsets[lane];
      for (int64_t c = 0; c < classes; ++c) {
        buffer[c * kLanes + lane] = static_cast<S>(values[c * class_stride]);
      }
    }
  });
}

// The inverse of gather for the block's lanes: buffer's values into dst, converted.
template <typename S>
void scatter(const RawTensor& dst, const BlockPlace<S>& place, int64_t classes, int64_t class_stride,
             const S* buffer) {
  constexpr int64_t kLanes = BlockPlace<S>::kLanes;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dst.dtype, "focal_softmax_scatter", [&] {
    auto* data = static_cast<scalar_t*>(dst.data);
    for (int64_t lane = 0; lane < place.lanes; ++lane) {
      scalar_t* values = data + place.offsets[lane];
      for (int64_t c = 0; c < classes; ++c) {
        values[c * class_stride] = static_cast<scalar_t>(buffer[c * kLanes + lane]);
      }
    }
  });
}

// n zeros into dst from offset on, in its dtype.
inline void store_zeros(const RawTensor& dst, int64_t offset, int64_t n) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dst.dtype, "focal_softmax_zeros", [&] {
    std::fill_n(static_cast<scalar_t*>(dst.data) + offset, n, scalar_t(0));
  });
}

// A per-element tensor of the block as the loops see it: class c's lane vector at
// data + c * stride, in the tensor itself (direct blocks of a tensor holding S) or in a buffer.
template <typename S>
struct ClassMajor {
  S* data;
  int64_t stride;
  bool buffered;
};

template <typename S>
ClassMajor<S> view_of(const RawTensor& tensor, const BlockPlace<S>& place, int64_t class_stride,
                      S* buffer) {
  if (place.direct && tensor.holds<S>()) {
    return {static_cast<S*>(tensor.data) + place.offsets[0], class_stride, false};
  }
  return {buffer, BlockPlace<S>::kLanes, true};
}

// The arguments' data, looked up once per call rather than once per block.
template <typename S>
struct Operands {
  RawTensor inputs, probabilities, grad_inputs, grad_targets, unweighted;
  const int64_t* labels;
  const S* weight;
  S* loss;  // per position (elementwise), else null

  explicit Operands(const SoftmaxArgs& args)
      : inputs(args.inputs), probabilities(args.probabilities), grad_inputs(args.grad_inputs),
        grad_targets(args.grad_targets), unweighted(args.unweighted_loss),
        labels(args.labels.defined() ? args.labels.const_data_ptr<int64_t>() : nullptr),
        weight(args.weight.defined() ? args.weight.const_data_ptr<S>() : nullptr),
        loss(args.reduction == Reduction::None ? args.loss.mutable_data_ptr<S>() : nullptr) {}
};

// Everything one thread needs beyond the arguments: a buffer of `size` values (a block's
// classes x kLanes, or a row's classes) for each per-element tensor the call reads or writes,
// and for what a later pass over the classes takes from an earlier one, so that each class
// takes one exp: shifted_exps, each class's exp(z - m) from the sums' pass (the soft targets'
// terms pass leaves p there for the gradient's), and class_g, the soft targets' class terms g.
template <typename S>
struct Buffers {
  std::vector<S> inputs, probabilities, grad_inputs, grad_targets, unweighted, shifted_exps, class_g;
  Buffers(int64_t size, const SoftmaxArgs& args, bool soft, bool gradient)
      : inputs(size),
        probabilities(args.probabilities.defined() ? size : 0),
        grad_inputs(args.grad_inputs.defined() ? size : 0),
        grad_targets(args.grad_targets.defined() ? size : 0),
        unweighted(args.unweighted_loss.defined() ? size : 0),
        shifted_exps(soft || gradient ? size : 0),
        class_g(soft && gradient ? size : 0) {}
};

// kSoft: every class has a target (probabilities, or smoothed labels); else one label per
// position. Returns the block's loss summed over its positions; writes the per-position loss
// (elementwise), the requested per-element outputs, and adds the labels' weight to divisor.
template <typename S, bool kSoft, bool kGrad>
double compute_block(const SoftmaxArgs& args, const Operands<S>& operands,
                     const SoftmaxCoeffs<S>& coeffs, const BlockPlace<S>& place,
                     Buffers<S>& buffers, double& divisor) {
  using Vec = Vectorized<S>;
  using Math = VecMath<S>;
  constexpr int64_t kLanes = BlockPlace<S>::kLanes;
  const int64_t classes = args.classes;
  const int64_t stride = args.class_stride;
  const S* weight = operands.weight;

  // A per-element tensor's view of the block: gathered into its buffer where not direct.
  const auto input_view = [&](const RawTensor& tensor, std::vector<S>& buffer) {
    const ClassMajor<S> view = view_of(tensor, place, stride, buffer.data());
    if (view.buffered) {
      gather(tensor, place, classes, stride, view.data);
    }
    return view;
  };
  const auto output_view = [&](const RawTensor& tensor, std::vector<S>& buffer) {
    return tensor.data != nullptr ? view_of(tensor, place, stride, buffer.data()) : ClassMajor<S>{};
  };
  const ClassMajor<S> x = input_view(operands.inputs, buffers.inputs);
  const ClassMajor<S> t = operands.probabilities.data != nullptr
                              ? input_view(operands.probabilities, buffers.probabilities)
                              : ClassMajor<S>{};
  const ClassMajor<S> grad_inputs = output_view(operands.grad_inputs, buffers.grad_inputs);
  const ClassMajor<S> grad_targets = output_view(operands.grad_targets, buffers.grad_targets);
  const ClassMajor<S> unweighted = output_view(operands.unweighted, buffers.unweighted);

  // Per lane: the label as a class number in S (-1 for none), whether the position counts (past
  // the block: not), and its share of the mean's divisor.
  S label_lanes[kLanes], valid_lanes[kLanes], weight_lanes[kLanes];
  for (int64_t lane = 0; lane < kLanes; ++lane) {
    const auto label = lane < place.lanes ? position_label(operands.labels, place.first + lane, args.ignore_index,
                                                           classes, weight)
                                          : PositionLabel<S>{-1, false, S(0)};
    label_lanes[lane] = static_cast<S>(label.label);
    valid_lanes[lane] = label.counts ? S(1) : S(0);
    weight_lanes[lane] = label.weight;
    divisor += static_cast<double>(label.weight);
  }
  const Vec label = Vec::loadu(label_lanes);
  const Vec counts = Vec::loadu(valid_lanes) != Vec(S(0));

  // The row: its max, then its sums (and the label's logit).
  Vec max = Vec::loadu(x.data);
  for (int64_t c = 1; c < classes; ++c) {
    max = Math::max(Vec::loadu(x.data + c * x.stride), max);
  }
  SoftmaxSums<Vec> sums = softmax_sums_start<Vec>();
  Vec label_logit = max;  // where no label is: the term at the max, zeroed
  for (int64_t c = 0; c < classes; ++c) {
    const Vec z = Vec::loadu(x.data + c * x.stride);
    const Vec shifted_exp = softmax_accumulate<Math>(z, max, sums);
    if constexpr (!kSoft) {
      label_logit = Math::select(label == Vec(static_cast<S>(c)), z, label_logit);
    }
    if constexpr (kSoft || kGrad) {  // for the later passes, which then take no exp of their own
      shifted_exp.store(buffers.shifted_exps.data() + c * kLanes);
    }
  }
  const SoftmaxRow<Vec> row = softmax_row<Math>(max, sums);

  Vec loss(S(0));
  if constexpr (!kSoft) {
    const auto terms = softmax_terms<Math, kGrad>(label_logit, Vec(S(1)), Vec::loadu(weight_lanes), row,
                                                  coeffs);
    loss = where_counts<Math>(counts, terms.loss);
    for (int64_t c = 0; c < classes; ++c) {
      const Vec is_label = label == Vec(static_cast<S>(c));
      if constexpr (kGrad) {
        const Vec p = Vec::loadu(buffers.shifted_exps.data() + c * kLanes) * row.inv_sum;
        where_counts<Math>(counts, softmax_label_gradient<Math>(is_label, p, terms.g, terms.u))
            .store(grad_inputs.data + c * grad_inputs.stride);
      }
      if (unweighted.data != nullptr) {
        Math::select(is_label, terms.unweighted, Vec(S(0))).store(unweighted.data + c * unweighted.stride);
      }
    }
  } else {
    SoftmaxGradientSums<Vec> g_sums = softmax_gradient_sums_start<Vec>();
    ClassLossSum<Vec> class_losses = class_loss_sum_start<Vec>();
    for (int64_t c = 0; c < classes; ++c) {
      const Vec z = Vec::loadu(x.data + c * x.stride);
      const Vec target =
          operands.labels != nullptr ? Math::select(label == Vec(static_cast<S>(c)), Vec(coeffs.target_scale), Vec(S(0)))
                 : Vec::loadu(t.data + c * t.stride) * Vec(coeffs.target_scale);
      const Vec q = target + Vec(coeffs.smoothing_share);
      const Vec w = weight != nullptr ? Vec(weight[c]) : Vec(S(1));
      S* class_exp = buffers.shifted_exps.data() + c * kLanes;
      const auto terms = softmax_terms<Math, kGrad>(z, Vec::loadu(class_exp), q, w, row, coeffs);
      class_losses.add(terms.loss);
      if constexpr (kGrad) {
        softmax_gradient_accumulate<Math>(z, max, terms.g, g_sums);
        terms.g.store(buffers.class_g.data() + c * kLanes);
        terms.p.store(class_exp);
      }
      if (unweighted.data != nullptr) {
        where_counts<Math>(counts, terms.unweighted).store(unweighted.data + c * unweighted.stride);
      }
      if (grad_targets.data != nullptr) {
        where_counts<Math>(counts, terms.d_target * Vec(coeffs.target_scale))
            .store(grad_targets.data + c * grad_targets.stride);
      }
    }
    loss = where_counts<Math>(counts, class_losses.template value<Math>());
    if constexpr (kGrad) {
      for (int64_t c = 0; c < classes; ++c) {
        const Vec z = Vec::loadu(x.data + c * x.stride);
        const Vec p = Vec::loadu(buffers.shifted_exps.data() + c * kLanes);
        const Vec g = Vec::loadu(buffers.class_g.data() + c * kLanes);
        where_counts<Math>(counts, softmax_gradient<Math>(z, g, p, row, g_sums))
            .store(grad_inputs.data + c * grad_inputs.stride);
      }
    }
  }
  for (const auto& [view, tensor] : {std::pair{grad_inputs, &operands.grad_inputs},
                                     std::pair{grad_targets, &operands.grad_targets},
                                     std::pair{unweighted, &operands.unweighted}}) {
    if (view.buffered) {
      scatter(*tensor, place, classes, stride, view.data);
    }
  }

  S loss_lanes[kLanes];
  loss.store(loss_lanes);
  if (operands.loss != nullptr) {
    std::copy(loss_lanes, loss_lanes + place.lanes, operands.loss + place.first);
  }
  double sum = 0;
  for (int64_t lane = 0; lane < place.lanes; ++lane) {
    sum += loss_lanes[lane];
  }
  return sum;
}

// The sum of a vector's lanes, in lane order.
template <typename S>
S sum_of_lanes(const Vectorized<S>& values) {
  S lanes[Vectorized<S>::size()];
  values.store(lanes);
  S sum(0);
  for (const S lane : lanes) {
    sum += lane;
  }
  return sum;
}

// A position whose many classes lie side by side (class_stride 1: (N, C) rows, large C): vectors
// over its classes, their sums reduced across lanes, one position at a time. The last partial
// vector is padded: -inf for the max and the sums (no term, no tie), the max itself for the
// terms, whose targets are 0 there. Writes what compute_block writes, for one position at
// `offset` (its first class) in the inputs; returns its loss.
template <typename S, bool kSoft, bool kGrad>
double compute_row(const SoftmaxArgs& args, const Operands<S>& operands,
                   const SoftmaxCoeffs<S>& coeffs, int64_t position, int64_t offset,
                   Buffers<S>& buffers, double& divisor) {
  using Vec = Vectorized<S>;
  using Math = VecMath<S>;
  constexpr int64_t kLanes = Vec::size();
  const int64_t classes = args.classes;
  const S* weight = operands.weight;
  const PositionLabel<S> label = position_label(operands.labels, position, args.ignore_index, classes, weight);
  divisor += static_cast<double>(label.weight);
  if (!label.counts) {
    // No loss, no gradient, whatever the logits hold (inf, NaN).
    for (const RawTensor* output : {&operands.grad_inputs, &operands.grad_targets, &operands.unweighted}) {
      if (output->data != nullptr) {
        store_zeros(*output, offset, classes);
      }
    }
    if (operands.loss != nullptr) {
      operands.loss[position] = S(0);
    }
    return 0.0;
  }
  const S* x = read_block(operands.inputs, offset, classes, buffers.inputs.data());
  const auto load = [&](const S* values, int64_t c, S fill) {
    if (c + kLanes <= classes) {
      return Vec::loadu(values + c);
    }
    S lanes[kLanes];
    std::fill(lanes, lanes + kLanes, fill);
    std::copy(values + c, values + classes, lanes);
    return Vec::loadu(lanes);
  };
  const auto store = [&](const Vec& values, S* destination, int64_t c) {
    values.store(destination + c, static_cast<int>(std::min(kLanes, classes - c)));
  };
  S class_lanes[kLanes];
  for (int64_t lane = 0; lane < kLanes; ++lane) {
    class_lanes[lane] = static_cast<S>(lane);
  }
  const Vec lane_classes = Vec::loadu(class_lanes);
  constexpr S kMinusInf = -std::numeric_limits<S>::infinity();

  const Vec label_class(static_cast<S>(label.label));

  Vec max_lanes = load(x, 0, kMinusInf);
  for (int64_t c = kLanes; c < classes; c += kLanes) {
    max_lanes = Math::max(load(x, c, kMinusInf), max_lanes);
  }
  S lanes[kLanes];
  max_lanes.store(lanes);
  S max = lanes[0];
  for (int64_t lane = 1; lane < kLanes; ++lane) {
    max = ScalarMath<S>::max(lanes[lane], max);
  }
  const Vec vmax(max);
  SoftmaxSums<Vec> sum_lanes = softmax_sums_start<Vec>();
  for (int64_t c = 0; c < classes; c += kLanes) {
    const Vec shifted_exp = softmax_accumulate<Math>(load(x, c, kMinusInf), vmax, sum_lanes);
    if constexpr (kSoft || kGrad) {  // for the later passes, which then take no exp of their own
      store(shifted_exp, buffers.shifted_exps.data(), c);
    }
  }
  const Vec others(sum_of_lanes(sum_lanes.others.value()));
  const SoftmaxRow<Vec> row =
      softmax_row<Math>(vmax, SoftmaxSums<Vec>{{others, Vec(S(0))}, Vec(sum_of_lanes(sum_lanes.ties))});

  S* grad_inputs = kGrad ? block_destination(operands.grad_inputs, offset, buffers.grad_inputs.data())
                         : nullptr;
  S* unweighted = operands.unweighted.data != nullptr
                      ? block_destination(operands.unweighted, offset, buffers.unweighted.data())
                      : nullptr;
  S* grad_targets = operands.grad_targets.data != nullptr
                        ? block_destination(operands.grad_targets, offset, buffers.grad_targets.data())
                        : nullptr;
  S loss(0);
  if constexpr (!kSoft) {
    const auto terms = softmax_terms<Math, kGrad>(Vec(x[label.label]), Vec(S(1)), Vec(label.weight), row, coeffs);
    terms.loss.store(lanes);
    loss = lanes[0];
    for (int64_t c = 0; c < classes; c += kLanes) {
      const Vec is_label = lane_classes + Vec(static_cast<S>(c)) == label_class;
      if constexpr (kGrad) {
        const Vec p = load(buffers.shifted_exps.data(), c, S(0)) * row.inv_sum;
        store(softmax_label_gradient<Math>(is_label, p, terms.g, terms.u), grad_inputs, c);
      }
      if (unweighted != nullptr) {
        store(Math::select(is_label, terms.unweighted, Vec(S(0))), unweighted, c);
      }
    }
  } else {
    const S* t = operands.probabilities.data != nullptr
                     ? read_block(operands.probabilities, offset, classes, buffers.probabilities.data())
                     : nullptr;
    ClassLossSum<Vec> loss_lanes = class_loss_sum_start<Vec>();
    SoftmaxGradientSums<Vec> g_sum_lanes = softmax_gradient_sums_start<Vec>();
    for (int64_t c = 0; c < classes; c += kLanes) {
      const Vec class_index = lane_classes + Vec(static_cast<S>(c));
      const Vec target =
          t != nullptr ? load(t, c, S(0)) * Vec(coeffs.target_scale)
                       : Math::select(class_index == label_class, Vec(coeffs.target_scale), Vec(S(0)));
      // Past the last class (padding) the target is 0.
      const Vec in_row = class_index < Vec(static_cast<S>(classes));
      const Vec q = Math::select(in_row, target + Vec(coeffs.smoothing_share), Vec(S(0)));
      const Vec w = weight != nullptr ? load(weight, c, S(1)) : Vec(S(1));
      const Vec z = load(x, c, max);  // padding: the max (exp 1), with target 0
      const auto terms = softmax_terms<Math, kGrad>(z, load(buffers.shifted_exps.data(), c, S(1)),
                                                    q, w, row, coeffs);
      loss_lanes.add(terms.loss);
      if constexpr (kGrad) {
        softmax_gradient_accumulate<Math>(z, vmax, terms.g, g_sum_lanes);
        store(terms.g, buffers.class_g.data(), c);
        store(terms.p, buffers.shifted_exps.data(), c);
      }
      if (unweighted != nullptr) {
        store(terms.unweighted, unweighted, c);
      }
      if (grad_targets != nullptr) {
        store(terms.d_target * Vec(coeffs.target_scale), grad_targets, c);
      }
    }
    loss = sum_of_lanes(loss_lanes.template value<Math>());
    if constexpr (kGrad) {
      const SoftmaxGradientSums<Vec> g_sums{{Vec(sum_of_lanes(g_sum_lanes.below.value())), Vec(S(0))},
                                            Vec(sum_of_lanes(g_sum_lanes.at_max))};
      for (int64_t c = 0; c < classes; c += kLanes) {
        const Vec z = load(x, c, max);
        const Vec p = load(buffers.shifted_exps.data(), c, S(0));
        store(softmax_gradient<Math>(z, load(buffers.class_g.data(), c, S(0)), p, row, g_sums), grad_inputs, c);
      }
    }
  }
  if constexpr (kGrad) {
    store_block(operands.grad_inputs, offset, classes, grad_inputs);
  }
  if (unweighted != nullptr) {
    store_block(operands.unweighted, offset, classes, unweighted);
  }
  if (grad_targets != nullptr) {
    store_block(operands.grad_targets, offset, classes, grad_targets);
  }
  if (operands.loss != nullptr) {
    operands.loss[position] = loss;
  }
  return loss;
}

template <typename S, bool kSoft, bool kGrad>
void forward_impl(const SoftmaxArgs& args) {
  constexpr int64_t kLanes = BlockPlace<S>::kLanes;
  const int64_t positions = args.batch * args.positions;
  const SoftmaxCoeffs<S> coeffs(args.alpha, args.gamma, args.label_smoothing, args.classes);
  const int64_t chunk = std::max<int64_t>(1, kChunkElements / (args.classes * kLanes)) * kLanes;
  const int64_t num_chunks = (positions + chunk - 1) / chunk;
  std::vector<double> chunk_sums(num_chunks, 0.0), chunk_divisors(num_chunks, 0.0);
  // NCHW: a sample's positions side by side in each class's plane.
  const bool planes = args.position_stride == 1 && args.positions >= kLanes;
  // Many classes side by side: vectors over each position's classes instead (compute_row).
  const bool rows = !planes && args.class_stride == 1 && args.classes >= 4 * kLanes;
  const Operands<S> operands(args);

  at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    const FlushSubnormals flush_subnormals;
    Buffers<S> buffers(rows ? args.classes : args.classes * kLanes, args, kSoft, kGrad);
    for (int64_t index = chunk_begin; index < chunk_end; ++index) {
      const int64_t stop = std::min(positions, (index + 1) * chunk);
      double sum = 0, divisor = 0;
      if (rows) {
        for (int64_t first = index * chunk; first < stop; ++first) {
          const int64_t n = first / args.positions;
          const int64_t offset =
              n * args.batch_stride + (first - n * args.positions) * args.position_stride;
          sum += compute_row<S, kSoft, kGrad>(args, operands, coeffs, first, offset, buffers, divisor);
        }
      } else {
        for (int64_t first = index * chunk; first < stop;) {
          BlockPlace<S> place;
          place.first = first;
          const int64_t sample = first / args.positions;
          const int64_t position = first - sample * args.positions;
          // In planes, a block stays within one sample, so that its lanes are side by side.
          place.lanes = std::min({kLanes, stop - first, planes ? args.positions - position : kLanes});
          place.direct = planes && place.lanes == kLanes;
          // Lane by lane from the first position's place: no division per lane.
          for (int64_t lane = 0, n = sample, at = position; lane < place.lanes; ++lane) {
            place.offsets[lane] = n * args.batch_stride + at * args.position_stride;
            if (++at == args.positions) {
              at = 0;
              ++n;
            }
          }
          sum += compute_block<S, kSoft, kGrad>(args, operands, coeffs, place, buffers, divisor);
          first += place.lanes;
        }
      }
      chunk_sums[index] = sum;
      chunk_divisors[index] = divisor;
    }
  });

  double total = 0, divisor = 0;
  for (int64_t index = 0; index < num_chunks; ++index) {
    total += chunk_sums[index];
    divisor += chunk_divisors[index];
  }
  *args.divisor.mutable_data_ptr<double>() = divisor;
  if (args.reduction != Reduction::None) {
    // The mean of nothing (or of zero weight) is NaN, as F.cross_entropy's.
    store_scalar(args.loss, args.reduction == Reduction::Mean ? total / divisor : total);
  }
}

}  // namespace

void softmax_forward(const SoftmaxArgs& args) {
  const bool soft = !args.labels.defined() || args.label_smoothing > 0.0;
  with_math_type(args.inputs, [&](auto math_type) {
    using S = decltype(math_type);
    dispatch_flag(soft, [&](auto soft_flag) {
      dispatch_flag(args.grad_inputs.defined(), [&](auto grad_flag) {
        forward_impl<S, decltype(soft_flag)::value, decltype(grad_flag)::value>(args);
      });
    });
  });
}

}  // namespace focal::cpu::FOCAL_CPU_ISA
