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
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/cpu_math.h"

namespace focal::cpu::FOCAL_CPU_ISA {
namespace {

constexpr int64_t kBlock = 512;
constexpr int64_t kChunk = 64 * kBlock;

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

// Asks for the cache line kPrefetchBytes after p. compute_block's loop is long (~70 instructions
// per vector), so few of its loads are in flight at once, and on some Intel Xeons the
// hardware prefetcher alone leaves a loop that only reads (a reduced no-grad call) waiting on L3
// (bench/NOTES.md). The address is computed as an integer: past the end of a tensor or buffer it
// is still harmless, as a prefetch never faults.
constexpr std::uintptr_t kPrefetchBytes = 2048;

inline void prefetch_ahead(const void* p) {
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<std::uintptr_t>(p) + kPrefetchBytes));
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
    prefetch_ahead(x + i);
    prefetch_ahead(t + i);
    if (w != nullptr) {
      prefetch_ahead(w + i);
    }
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
  const LossCoeffs<S> coeffs(args.form, args.coefficients, args.label_smoothing);
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
  *args.count.mutable_data_ptr<int64_t>() = count;
  if (!elementwise) {
    if (args.reduction == Reduction::Mean) {
      total /= static_cast<double>(count);  // NaN when nothing counts, as torch.mean of nothing
    }
    store_scalar(args.loss, total);
  }
}

template <typename S>
void backward_impl(const BackwardArgs& args) {
  const int64_t n = args.out.numel();
  // One grad_output value for all elements (mean/sum, or an expanded scalar): fold it and the
  // mean's divisor into one factor. On CPU reading them is free: no device to wait for.
  // Read through their pointers: item() would be a dispatch each.
  const S scale = static_cast<S>(backward_factor(
      args.grad_output_is_scalar ? static_cast<double>(*args.grad_output.const_data_ptr<S>()) : 1.0,
      args.divisor.defined() ? args.divisor.const_data_ptr<int64_t>() : nullptr));
  // In place with a factor of 1 (a sum's loss.backward(), or a sum among losses), the saved
  // gradient already is the answer: a pass over it would read and write it unchanged.
  if (args.grad_output_is_scalar && scale == S(1) && args.out.is_same(args.saved_grad)) {
    return;
  }
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

}  // namespace

void forward(const ForwardArgs& args) {
  with_math_type(args.loss, [&](auto math_type) {
    using S = decltype(math_type);
    // gamma 1 gets loops of its own: the General loops choose the exponent's products (or pow)
    // once per vector, which q^1 = q does not need (bench/NOTES.md).
    const double gamma = args.coefficients.gamma;
    const GammaMode mode = gamma == 1.0 ? GammaMode::One : gamma_mode(gamma);
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
