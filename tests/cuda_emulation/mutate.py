"""Mutation check of the CUDA emulation: plants one known kernel bug at a time in a copy of csrc
(in the kernel files of csrc/cuda, or in the device math of csrc/focal_math.h), rebuilds the
emulation against the copy, and runs the sweep (plain, and sanitized when the plain sweep misses
it). A sweep that fails has caught the bug.

    python tests/cuda_emulation/mutate.py                    # every mutant, a markdown table
    python tests/cuda_emulation/mutate.py --only tail_skip   # some of them

Each mutant takes a rebuild of the kernel source and a sweep that stops at its first failure
(1.5-4 minutes a mutant on 2 cores: the runs in docs/cuda-emulation.md). A mutant whose text
no longer matches the source fails the script: update it with the kernels; a name --only does
not know fails it too. docs/cuda-emulation.md has each mutant's last result.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"

# name, what the bug is, its text (in csrc/cuda, or in focal_math.h's softmax helpers), its replacement
MUTANTS = [
    ("no_publish_barrier", "block_sum: the barrier between writing and reading the per-warp sums removed",
     "    warp_sums[warp] = value;\n  }\n  __syncthreads();\n", "    warp_sums[warp] = value;\n  }\n"),
    ("no_reuse_barrier", "block_sum: the barrier before reusing the per-warp sums removed "
     "(a race between the softmax loss's two sums of doubles, which the reverse schedule shows)",
     "  __syncthreads();  // an earlier call's readers are done with warp_sums\n", ""),
    ("shuffle_mask", "block_sum: the second-stage shuffle's mask leaves out lanes 16-31",
     "    for (int offset = kThreads / 64; offset > 0; offset /= 2) {\n"
     "      value += __shfl_down_sync(0xffffffffu, value, offset);",
     "    for (int offset = kThreads / 64; offset > 0; offset /= 2) {\n"
     "      value += __shfl_down_sync(0x0000ffffu, value, offset);"),
    ("shuffle_offsets", "block_sum: the warp reduction starts at offset 8 (half the warp lost)",
     "  for (int offset = 16; offset > 0; offset /= 2) {", "  for (int offset = 8; offset > 0; offset /= 2) {"),
    ("warp_sums_bound", "block_sum: reads one per-warp sum past the array (lane <= 8)",
     "value = lane < kThreads / 32 ? warp_sums[lane] : A(0);",
     "value = lane <= kThreads / 32 ? warp_sums[lane] : A(0);"),
    ("tail_skip", "forward: the tail starts one element late (last element never written)",
     "    const int64_t tail = num_packs * kPack + thread;\n    if (tail < p.n) {",
     "    const int64_t tail = num_packs * kPack + thread + 1;\n    if (tail < p.n) {"),
    ("tail_overrun", "forward: the tail bound off by one (reads and writes one element past the end)",
     "  if (tail < p.n) {", "  if (tail <= p.n) {"),
    ("grid_stride", "forward: the grid-stride loop strides by one block instead of the whole grid",
     "    for (int64_t pack = thread; pack < num_packs; pack += num_threads) {\n"
     "      if constexpr (kPack == 1) {",
     "    for (int64_t pack = thread; pack < num_packs; pack += blockDim.x) {\n"
     "      if constexpr (kPack == 1) {"),
    ("misaligned_packed_store", "forward: the loss pointer left out of the alignment check of the packed path",
     "      is_aligned_for_pack<out_t>(p.loss, pack) &&\n", ""),
    ("class_wrap", "forward: the packed loops' class does not wrap at a new row",
     "        cls -= wraps ? classes : 0;\n", ""),
    ("stride_rows", "forward: the packed loops' row not advanced by the grid stride's whole rows",
     "        row += wraps ? stride_rows + 1 : stride_rows;", "        row += wraps ? 1 : 0;"),
    ("short_rows_packed", "forward: rows shorter than a pack sent to the packed loops that track rows",
     "      (!tracks_rows(kIsLabels<t_t>, args.weight_kind) || args.classes >= pack) &&\n", ""),
    ("block_sum_writer", "forward: thread 1 instead of thread 0 writes the block's partial sums",
     "  const auto count = block_sum(partial.count);\n  if (threadIdx.x == 0) {",
     "  const auto count = block_sum(partial.count);\n  if (threadIdx.x == 1) {"),
    ("finish_no_loop", "finish: one partial sum per thread, no loop (grids over 256 blocks lose sums)",
     "  for (int i = threadIdx.x; i < num_blocks; i += kThreads) {",
     "  for (int i = threadIdx.x; i < num_blocks && i < kThreads; i += kThreads) {"),
    ("backward_grid_stride", "backward: the grid-stride loop strides by one block instead of the whole grid",
     "  for (int64_t pack = thread; pack < num_packs; pack += num_threads) {\n"
     "    const auto saved_values",
     "  for (int64_t pack = thread; pack < num_packs; pack += blockDim.x) {\n"
     "    const auto saved_values"),
    ("backward_skip_not_in_place", "backward: a factor of 1 skips the pass also when out is not saved",
     "scale == S(1) && out == saved)", "scale == S(1))"),
    ("backward_tail", "backward: the last tail element is not scaled",
     "  if (tail < n) {\n    out[tail]", "  if (tail + 1 < n) {\n    out[tail]"),
    ("label_past_the_end", "forward: the next row's label read even where the pack does not reach it",
     "p.targets[row + (in_first < num ? 1 : 0)]", "p.targets[row + 1]"),
    ("next_row_offset", "forward: the next row's labelled element marked at its class, not past the boundary",
     "1u << (in_first + next_offset)", "1u << next_offset"),
    ("background_marked", "forward: the background label (C) marks the next row's first element",
     "first_offset < static_cast<uint32_t>(in_first)", "first_offset < static_cast<uint32_t>(num)"),
    ("ignored_next_row_summed", "forward: a pack's ignored second row left in the sum",
     " | (next == p.ignore_index ? next_row : 0u)", ""),
    ("special_summed", "forward: the labels' special elements added to the first launch's sum too",
     "        if ((special >> k & 1u) == 0u) {\n          pack_sum += terms.loss;\n        }",
     "        pack_sum += terms.loss;"),
    ("ignored_row_short", "forward: the second launch recomputes an ignored row but its last element",
     "for (int64_t cls = 0; cls < p.classes; ++cls)", "for (int64_t cls = 0; cls + 1 < p.classes; ++cls)"),
    ("ignored_rows_counted", "forward: ignored rows counted for the mean",
     "    counted_rows += counted ? 1 : 0;", "    counted_rows += 1;"),
    ("pack_sums_in_float", "forward: the packs' sums added up in float, not double (thousands of terms a "
     "thread rounded to 18 ulp)",
     "    sum += pack_sum;", "    sum = static_cast<float>(sum) + pack_sum;"),
    ("softmax_sum_in_float", "softmax: the positions' losses added up in float, not double",
     "  double sum = 0;  // as the sigmoid forward's Partial", "  float sum = 0;"),
    ("rows_pass_partials_overlap", "forward: the second launch's partial sums written over the first's",
     "        rows.block_sums += grid;\n        rows.block_counts += grid;\n", ""),
    ("unaligned_target_packs", "forward: the targets left out of the alignment check of the packed path",
     "      (kIsLabels<t_t> || is_aligned_for_pack<t_t>(p.targets, pack)) &&\n", ""),
    ("partials_overlap", "forward: the per-block sums placed over the per-block counts",
     "p.block_sums = reinterpret_cast<double*>(p.block_counts + blocks);",
     "p.block_sums = reinterpret_cast<double*>(p.block_counts);"),
    ("form_ignored", "forward: the focal loss computed whatever the form (FL*, QFL, VFL)",
     "  const bool family = p.coeffs.form != LossForm::Focal;", "  const bool family = false;"),
    ("score_ignored", "forward: a (labels, scores) pair's score not read (target 1)",
     "p.scores != nullptr ? p.scores[row] : S(1), S(1))", "S(1), S(1))"),
    ("score_gradient_dropped", "forward: the scores' gradient never written",
     "        p.grad_scores[row] = grad_score;\n", ""),
    ("float64_packs", "forward: float64 in packs of two (which spill at 64 registers)",
     "  return std::is_same_v<x_t, double>        ? 1\n", "  return false                              ? 1\n"),
    ("labels_in_input_packs", "forward: labels in packs of 16 bytes of inputs (float32 four, 16-bit eight), "
     "not eight and sixteen",
     "         : !std::is_same_v<t_t, int64_t>    ? pack_size<x_t>()",
     "         : true                             ? pack_size<x_t>()"),
    ("label_packs_of_sixteen_with_gradient", "forward: 16-bit labels in packs of sixteen with the inputs' "
     "gradient too (which spill at 64 registers)",
     "sizeof(x_t) == 2 && !kGradInputs ? 16", "sizeof(x_t) == 2 ? 16"),
    ("score_gradient_off", "forward: the scores' gradient alone does not select the target-gradient pass",
     "  const bool target_gradient = p.grad_targets != nullptr || p.grad_scores != nullptr;",
     "  const bool target_gradient = p.grad_targets != nullptr;"),
    ("reciprocal_estimate", "device math: the float reciprocal's estimate without its Newton step",
     "    return fmaf(fmaf(-v, estimate, 1.0f), estimate, estimate);", "    return estimate;"),
    ("element_weight_dropped", "forward: the packed loop of per-element weights ignores them",
     "        } else if constexpr (kWeights == WeightLoop::Element) {\n          weight = element_weights[k];",
     "        } else if constexpr (kWeights == WeightLoop::Element) {\n          weight = S(1);"),
    ("row_weights_untracked", "forward: per-row weights sent to the packed loop of per-element weights",
     "    if (!kIsLabels<t_t> && p.weight_kind == WeightKind::Element) {",
     "    if (!kIsLabels<t_t> && (p.weight_kind == WeightKind::Element || p.weight_kind == WeightKind::Row)) {"),
    ("bfloat16_high_half", "forward: a bfloat16 pack's odd element read as the even one (the word's low half)",
     "      const uint32_t bits = word & 0xffff0000u;", "      const uint32_t bits = word << 16;"),
    ("exp2_flushed_for_every_gamma", "device math: the 16-bit kernels' exp flushes subnormal results for "
     "every gamma, not only 2 (gamma 0's loss is e itself there)",
     "StorageRoundedMath<kGamma == GammaMode::Two>", "StorageRoundedMath<true>"),
    ("exp2_scale_short", "device math: the 16-bit kernels' exp scales by log2(e) to 5 digits (1.4427)",
     "ex2_approx<kExpFlushesSubnormals>(v * 1.44269504f)", "ex2_approx<kExpFlushesSubnormals>(v * 1.4427f)"),
    ("estimates_for_float_results", "device math: the unrefined estimates also for float32 results",
     "std::conditional_t<sizeof(out_t) == 2,", "std::conditional_t<sizeof(out_t) <= 4,"),
    ("softmax_sample_step", "softmax: a position's sample not advanced where the grid stride wraps past one",
     "      within -= p.positions;\n      ++sample;", "      within -= p.positions;"),
    ("softmax_label_weight", "softmax: the labelled class's weight not applied to its term",
     "return {label, true, weight != nullptr ? weight[label] : S(1)};", "return {label, true, S(1)};"),
    ("softmax_ignored_counted", "softmax: ignored positions counted in the mean's divisor",
     "    return {-1, false, S(0)};", "    return {-1, false, S(1)};"),
    ("softmax_ignored_not_zeroed", "softmax: an ignored position's terms multiplied by 0, not selected away "
     "(NaN logits there make the loss NaN)",
     "  return Math::select(counts, v, V(0.0f));", "  return v;"),
    ("softmax_soft_gradient_sum", "softmax: soft targets' gradient without the -p_j sum_c g_c part",
     "softmax_gradient<Math>(z, terms.g, terms.p, row, g_sums)",
     "softmax_gradient<Math>(z, terms.g, terms.p, row, softmax_gradient_sums_start<S>())"),
    ("softmax_warp_below_a_warp", "softmax: a warp a position also where there are fewer classes than lanes",
     "  return class_stride == 1 && classes >= 32;", "  return class_stride == 1 && classes >= 16;"),
    ("softmax_lanes_own_max", "softmax: a warp's lanes each keep the max of their own classes",
     "    max = lanes.template max<Math>(max);\n", ""),
    ("softmax_lanes_first_class", "softmax: every lane's max starts at class 0, not at its own first class",
     "S max = static_cast<S>(x[lanes.lane * class_stride]);", "S max = static_cast<S>(x[0]);"),
    ("softmax_lanes_sums_apart", "softmax: a warp's sums of exponentials not combined across its lanes",
     "softmax_row<Math>(max, lanes.combined(sums))", "softmax_row<Math>(max, sums)"),
    ("softmax_lanes_half_sum", "softmax: a warp's sums combined over half its lanes",
     "    for (int offset = kLanes / 2; offset > 0; offset /= 2) {\n      value += __shfl_xor_sync",
     "    for (int offset = kLanes / 4; offset > 0; offset /= 2) {\n      value += __shfl_xor_sync"),
    ("softmax_lanes_losses_apart", "softmax: a warp's soft-target losses not combined across its lanes",
     "lanes.combined(class_losses).template value<Math>()", "class_losses.template value<Math>()"),
    ("softmax_lanes_gradient_sums_apart", "softmax: a warp's soft-target gradient sums not combined across its lanes",
     "        g_sums = lanes.combined(g_sums);\n", ""),
    ("softmax_lanes_every_lane_adds", "softmax: every lane of a warp adds the position's loss",
     "const bool first_lane = lanes.lane == 0;", "const bool first_lane = true;"),
    ("finish_count_writer", "finish: the loss sum written as the count (the mean's divisor, the softmax "
     "loss's weighted one too)",
     "    *count = total;", "    *count = static_cast<count_t>(sum);"),
    ("sm_count_uncached", "launch: every launch asks the driver for the SM count",
     "  if (count == 0) {\n    C10_CUDA_CHECK(cudaDeviceGetAttribute",
     "  if (true) {\n    C10_CUDA_CHECK(cudaDeviceGetAttribute"),
    ("sm_count_of_device_0", "launch: every device's grid sized by device 0's SM count, once known",
     "  int count = counts[device].load(std::memory_order_relaxed);",
     "  int count = counts[0].load(std::memory_order_relaxed);"),
    ("scratch_of_one_grid", "launch: the forwards' scratch asked for the first grid, where labels launch two",
     "  p.block_counts = static_cast<int64_t*>(place.partials(blocks));",
     "  p.block_counts = static_cast<int64_t*>(place.partials(grid));"),
]

# The same, in the device math of csrc/focal_math.h (the float64 pow, the focal and softmax
# terms, the backward's factor for a mean of nothing).
MATH_MUTANTS = [
    ("pow_one_double", "device math: float64 pow without y's second double (exp(y_hi) alone)",
     "  const double corrected = Math::fma(power, y_lo, power);",
     "  const double corrected = power;"),
    ("pow_unnormalized_log", "device math: float64 pow's logarithm not renormalized (e ln 2's low part left in log_lo)",
     "  const double log_hi = sum + sum_lo;\n  const double log_lo = sum_lo - (log_hi - sum);",
     "  const double log_hi = sum;\n  const double log_lo = sum_lo;"),
    ("pow_zero_base", "device math: float64 pow of a zero base through the logarithm, not 0",
     "  const double magnitude = base == 0.0 ? 0.0 : corrected == corrected ? corrected : power;",
     "  const double magnitude = corrected == corrected ? corrected : power;"),
    ("pow_negative_base_sign", "device math: float64 pow of a negative base never negated (odd exponents)",
     "         : half != ::trunc(half)       ? -magnitude", "         : half != ::trunc(half)       ? magnitude"),
    ("backward_zero_count_times_nan", "backward: the mean's zero-count factor as grad_output * 0 (NaN for a NaN "
     "grad_output), not 0",
     "  return *divisor > 0 ? grad_output / static_cast<double>(*divisor) : 0.0;",
     "  return grad_output * (*divisor > 0 ? 1.0 / static_cast<double>(*divisor) : 0.0);"),
    ("softmax_masked_class_nan", "device math: p log p of a -inf logit as 0 * -inf (NaN), not its limit 0",
     "  const V p_log_p = p * Math::max(log_p, V(std::numeric_limits<S>::lowest()));",
     "  const V p_log_p = p * log_p;"),
    ("softmax_rest_ties", "device math: the softmax row's rest counts the max's own 1",
     "  const V rest = sums.others.value() + (sums.ties - one);",
     "  const V rest = sums.others.value() + sums.ties;"),
    ("softmax_sums_uncompensated", "device math: a position's sums over its classes without Kahan's "
     "compensation (a plain running sum, 1e-4 off over 5,000 classes)",
     "    lost = (next - sum) - corrected;", "    lost = V(0.0f);"),
    ("softmax_class_losses_plain", "device math: a position's loss over its classes (soft targets) "
     "summed plainly, without Kahan's compensation",
     "    return Math::select(plain - plain == V(0.0f), compensated.value(), plain);",
     "    return plain;"),
    ("softmax_class_losses_inf_lost", "device math: a position's loss over its classes always the "
     "compensated sum, NaN where a term is inf (a masked class the target names)",
     "    return Math::select(plain - plain == V(0.0f), compensated.value(), plain);",
     "    return compensated.value();"),
    ("softmax_u_at_max", "device math: 1 - p at the max by subtraction (cancels for confident positions)",
     "Math::select(shifted == zero, row.rest * row.inv_sum, one - p)", "one - p"),
    ("softmax_gradient_at_max", "device math: soft targets' gradient at the max as g - p sum(g), which "
     "cancels where p and the target both near 1",
     "  return Math::select(z == row.max, g * u_at_max - p * (below + (sums.at_max - g)),",
     "  return Math::select(z == row.max, g - p * (below + sums.at_max),"),
    ("softmax_label_gradient_u", "device math: the labelled class's gradient g (1 - p) taken as g",
     "Math::select(is_label, label_g * label_u, V(0.0f) - p * label_g)",
     "Math::select(is_label, label_g, V(0.0f) - p * label_g)"),
    ("whole_gamma_factor", "device math: gamma 2's derivative without its q^(gamma-1) factor",
     "      terms.grad_inputs = weight_valid * alpha_t * q_lower * bracket;",
     "      terms.grad_inputs = weight_valid * alpha_t * bracket;"),
    ("cross_entropy_sign", "device math: the cross-entropy's linear part as max(x, 0) + t x",
     "Math::fma(-t, x, Math::max(x, zero))", "Math::fma(t, x, Math::max(x, zero))"),
    ("modulation_ratio_positive_q", "device math: the modulating factor's derivative dropped where q < 0 "
     "(a target outside [0, 1]), as before the consistency fix",
     "Math::select(q != zero, p * unit_scale * pm * inv_scaled_q, zero)",
     "Math::select(q > zero, p * unit_scale * pm * inv_scaled_q, zero)"),
    ("detached_term_times_zero", "device math: VFL's detached modulation term weighed by 0, not left "
     "out (NaN at x = +-inf, where CE is inf or NaN)",
     "        bracket = bracket + logit.ce * signed_over_a(logit.p * logit.pm);\n      }\n    }",
     "        bracket = bracket + logit.ce * signed_over_a(logit.p * logit.pm);\n      } else {\n"
     "        bracket = bracket + logit.ce * (V(S(0)) * signed_over_a(logit.p * logit.pm));\n      }\n    }"),
    ("within_range_nan", "device math: a NaN target-gradient bracket (an infinite logit's) clamped to "
     "float's largest, where the CPU's vector lanes keep it NaN",
     "  return Math::clamp(v, V(S(0)) - largest, largest);",
     "  return Math::max(Math::min(v, largest), V(S(0)) - largest);"),
]


def plant(name, old, new, directory):
    """A copy of csrc in directory/csrc with old replaced by new in the one file that holds it."""
    copy = directory / "csrc"
    shutil.rmtree(copy, ignore_errors=True)
    # Fresh times: ninja must see every copied file as new, not only the mutated one.
    shutil.copytree(CSRC, copy, copy_function=shutil.copy)
    holders = [path for path in sorted(copy.rglob("*")) if path.is_file() and old in path.read_text()]
    occurrences = sum(path.read_text().count(old) for path in holders)
    if occurrences != 1:
        sys.exit(f"mutant {name}: its text occurs {occurrences} times in csrc; update it")
    holders[0].write_text(holders[0].read_text().replace(old, new))
    return copy


def sweep(variant, csrc, log):
    """Runs the sweep on the mutated copy of csrc; returns (caught, first failing test)."""
    environment = dict(os.environ, FOCAL_EMULATED_CSRC=str(csrc),
                       FOCAL_CUDA_EMULATION_BUILD=str(ROOT / "build" / "cuda_emulation" / f"mutant-{variant}"))
    command = [sys.executable, str(HERE / "sweep.py")] + (["--sanitized"] if variant == "sanitized" else [])
    command += ["--", "-x", str(ROOT / "tests" / "test_cuda_emulation.py")]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, cwd=ROOT)
    log.write(result.stdout + result.stderr)
    if "built in" not in result.stdout:
        raise RuntimeError(f"the {variant} build of {csrc} failed:\n{result.stderr[-3000:]}")
    failed = re.search(r"^(?:FAILED|ERROR) (\S+)", result.stdout, re.M)
    # A process that died: the sanitizer's or the emulator's own account of it.
    died = re.search(r"ERROR: AddressSanitizer: [\w-]+|runtime error: [^\n]+|focal_emu: signal \d+ \([^)]*\)",
                     result.stdout + result.stderr)
    reason = failed.group(1).split("::")[-1] if failed else (died.group(0) if died else "exit status only")
    return result.returncode != 0, reason


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="mutant names")
    args = parser.parse_args()
    known = {m[0] for m in MUTANTS + MATH_MUTANTS}
    unknown = sorted(set(args.only or ()) - known)
    if unknown:
        parser.error(f"--only: no mutant named {', '.join(unknown)} (retired or misspelt; the names are "
                     "MUTANTS' and MATH_MUTANTS' first fields)")
    chosen = [m for m in MUTANTS + MATH_MUTANTS if not args.only or m[0] in args.only]
    work = ROOT / "build" / "cuda_emulation" / "mutants"
    work.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with open(work.parent / "mutate.log", "w") as log:
        for name, description, old, new in chosen:
            started = time.monotonic()
            source = plant(name, old, new, work)
            caught, by = sweep("plain", source, log)
            how = "plain sweep"
            if not caught:
                caught, by = sweep("sanitized", source, log)
                how = "sanitized sweep"
            verdict = f"caught ({how}: {by})" if caught else "missed"
            rows.append(f"| `{name}` | {description} | {verdict} |")
            print(f"{name}: {verdict} [{time.monotonic() - started:.0f} s]", flush=True)
    print("\n| mutant | planted bug | result |\n|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
