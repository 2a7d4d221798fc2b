"""The CUDA emulator itself (tests/cuda_emulation), against what the CUDA programming guide and
the PTX ISA say a GPU does: warp shuffles, barriers, __shared__ memory, schedules, launch limits,
device-side asserts, printf, faults. Its self-test kernels are in tests/cuda_emulation/self_test.cpp.
"""

import os
import subprocess
import sys

import pytest
import torch

import cuda_emulation

pytestmark = pytest.mark.cuda_emulation

INDEX, UP, DOWN, XOR = 0, 1, 2, 3
FULL = 0xFFFFFFFF


@pytest.fixture(scope="module")
def emulator():
    module = cuda_emulation.load()
    module.set_schedule("forward", 0)
    yield module
    module.set_schedule("forward", 0)


@pytest.fixture(autouse=True)
def fresh_context(emulator):
    """Errors inside a kernel are sticky, as on a GPU: each test starts as a new process would."""
    emulator.reset_device()
    yield
    emulator.reset_device()


def shuffled(emulator, mode, mask, operand, width, threads=32, threads_that_exit=0):
    out = torch.full((threads,), -1, dtype=torch.int64)
    emulator.self_test.shuffle(out, mode, mask, operand, width, threads, threads_that_exit)
    return out.tolist()


def guide_source_lane(mode, lane, operand, width):
    """The CUDA programming guide's description of each shuffle, for lane `lane` and an operand
    in [0, 32) (idx: any): the lane whose value it gets (its own where the value is unchanged)."""
    start = lane // width * width
    if mode == INDEX:  # "srcLane modulo width", within the lane's own group of width lanes
        return start + operand % width
    if mode == UP:  # "the lower delta lanes will remain unchanged"
        return lane if lane - start < operand else lane - operand
    if mode == DOWN:  # "the upper delta lanes will remain unchanged"
        return lane if lane - start + operand >= width else lane + operand
    source = lane ^ operand  # XOR: "elements from earlier groups", later groups give their own
    return lane if source // width > lane // width else source


def test_shuffle_operands_use_their_low_five_bits(emulator):
    """The PTX ISA's shfl.sync reads b[4:0]: a delta of 33 is a delta of 1, -1 is 31."""
    for mode in (UP, DOWN, XOR):
        for operand, same_as in [(32, 0), (33, 1), (-1, 31), (47, 15)]:
            for width in (32, 8):
                assert shuffled(emulator, mode, FULL, operand, width) == \
                    shuffled(emulator, mode, FULL, same_as, width), (mode, operand, width)


@pytest.mark.parametrize("width", [1, 2, 4, 8, 16, 32])
@pytest.mark.parametrize("mode, operands", [
    (INDEX, [0, 3, 17, 31, 40, -1]), (UP, [0, 1, 3, 16, 31]), (DOWN, [0, 1, 3, 16, 31]),
    (XOR, [0, 1, 5, 16, 31]),
])
def test_shuffles_follow_the_programming_guide(emulator, mode, operands, width):
    for operand in operands:
        got = shuffled(emulator, mode, FULL, operand, width)
        expected = [guide_source_lane(mode, lane, operand, width) * 100 + 7 for lane in range(32)]
        assert got == expected, f"mode {mode} operand {operand} width {width}"


def test_shuffle_within_a_partial_mask(emulator):
    """Lanes 0-15 shuffle among themselves with mask 0xffff; lanes 16-31 are not involved."""
    out = torch.full((32,), -1, dtype=torch.int64)
    # Only lanes in the mask may call: let lanes 16-31 exit first (they count as exited).
    emulator.self_test.shuffle(out, XOR, 0xFFFF, 1, 32, 32, 16)
    assert out[:16].tolist() == [(lane ^ 1) * 100 + 7 for lane in range(16)]
    assert out[16:].tolist() == [-1] * 16


def test_exited_lanes_in_the_mask_do_not_block(emulator):
    """shfl.sync waits for the non-exited lanes of its mask only (PTX ISA)."""
    got = shuffled(emulator, XOR, FULL, 1, 32, threads=32, threads_that_exit=16)
    assert got[:16] == [(lane ^ 1) * 100 + 7 for lane in range(16)]


@pytest.mark.parametrize("mode, mask, operand, width, exits, message", [
    (DOWN, FULL, 1, 32, 16, "lane 15 reads lane 16 in __shfl_down_sync.*which has exited"),
    (DOWN, 0xFFFF, 8, 32, 16, "lane 8 reads lane 16 in __shfl_down_sync.*outside the mask"),
    (INDEX, 0x0F0F, 4, 32, 0, "does not hold the calling lane 4"),
    (XOR, FULL, 1, 3, 0, "width 3, not a power of 2"),
    (XOR, FULL, 1, 64, 0, "width 64, not a power of 2"),
])
def test_shuffle_misuse_is_reported(emulator, mode, mask, operand, width, exits, message):
    with pytest.raises(RuntimeError, match=message):
        shuffled(emulator, mode, mask, operand, width, threads_that_exit=exits)


def test_shuffle_reading_outside_its_mask_is_reported(emulator):
    """Lanes 0-15 in mask 0xffff: reading lane 24 (outside the mask) is undefined."""
    with pytest.raises(RuntimeError, match="lane 0 reads lane 24 .* outside the mask"):
        emulator.self_test.shuffle(torch.zeros(32, dtype=torch.int64), INDEX, 0xFFFF, 24, 32, 32, 16)


def test_partial_warp_missing_lanes_are_not_readable(emulator):
    """A block of 20 threads: lanes 20-31 do not exist; reading one is an error."""
    with pytest.raises(RuntimeError, match="lane 19 reads lane 20 .* has exited or does not exist"):
        shuffled(emulator, DOWN, FULL, 1, 32, threads=20)
    emulator.reset_device()
    assert shuffled(emulator, INDEX, FULL, 3, 32, threads=20) == [307] * 20


@pytest.mark.parametrize("schedule", [("forward", 0), ("reverse", 0), ("shuffled", 1), ("shuffled", 2)])
def test_barrier_orders_shared_memory_under_every_schedule(emulator, schedule):
    emulator.set_schedule(*schedule)
    try:
        out = torch.zeros(3 * 64)
        emulator.self_test.neighbour(out, 3, True)
    finally:
        emulator.set_schedule("forward", 0)
    expected = torch.tensor([b * 1000 + (t + 1) % 64 for b in range(3) for t in range(64)], dtype=torch.float32)
    assert torch.equal(out, expected)


def test_missing_barrier_is_a_schedule_dependent_result(emulator):
    """Without __syncthreads a thread may read its neighbour's slot before it is written: what
    it reads depends on the order threads run in, which is how a race shows in the sweep."""
    results = []
    for schedule in [("forward", 0), ("reverse", 0)]:
        emulator.set_schedule(*schedule)
        out = torch.zeros(64)
        emulator.self_test.neighbour(out, 1, False)
        results.append(out)
    emulator.set_schedule("forward", 0)
    assert torch.isnan(results[0]).sum() == 63  # forward: threads 0-62 read before 1-63 write
    assert torch.isnan(results[1]).sum() == 1   # reverse: only thread 63 reads an unwritten slot
    assert not torch.equal(results[0].nan_to_num(), results[1].nan_to_num())


def test_shared_memory_is_poisoned_before_every_block(emulator):
    out = torch.zeros(3 * 64)
    emulator.self_test.read_before_write(out, 3)
    assert torch.isnan(out).all(), "block 1 and 2 must not see what block 0 left"
    assert emulator.shared_variable_count() >= 4  # block_sum's, for 3 types, and the self-test's


def test_syncwarp_orders_a_warp(emulator):
    out = torch.zeros(32, dtype=torch.int64)
    emulator.self_test.launch("syncwarp", out, [1, 1, 1], [32, 1, 1])
    assert out.tolist() == list(range(31, -1, -1))


@pytest.mark.parametrize("schedule, expected", [
    ("forward", list(range(8))), ("reverse", list(range(7, -1, -1))),
])
def test_schedules_order_threads_and_blocks(emulator, schedule, expected):
    """Threads first run in the schedule's order, blocks too (2 blocks of 4 threads)."""
    emulator.set_schedule(schedule, 0)
    order = torch.full((8,), -1, dtype=torch.int64)
    emulator.self_test.arrival(order, 2, 4)
    emulator.set_schedule("forward", 0)
    assert order.tolist() == expected


def test_shuffled_schedule_is_a_seeded_permutation(emulator):
    orders = []
    for seed in (1, 1, 2):
        emulator.set_schedule("shuffled", seed)
        order = torch.full((64,), -1, dtype=torch.int64)
        emulator.self_test.arrival(order, 1, 64)
        orders.append(order.tolist())
    emulator.set_schedule("forward", 0)
    assert sorted(orders[0]) == list(range(64)) and orders[0] != list(range(64))
    assert orders[0] == orders[1] and orders[0] != orders[2]


@pytest.mark.parametrize("blocks, threads, n", [(1, 32, 1000), (3, 64, 1000), (4, 256, 100)])
def test_grid_stride_loop_visits_each_element_once(emulator, blocks, threads, n):
    visits = torch.zeros(n, dtype=torch.int64)
    emulator.self_test.grid_stride(visits, blocks, threads)
    assert torch.equal(visits, torch.ones_like(visits))


@pytest.mark.parametrize("name, block, message", [
    ("divergent_barrier", 64, r"divergent __syncthreads: 16 threads at .*self_test.cpp:\d+, 48 threads at"),
    ("exited_barrier", 64, "reached by 32 threads while 32 have exited"),
    ("deadlock", 64, r"deadlock: .*__shfl_xor_sync\(mask 0xffffffff.*__syncthreads at"),
    ("mismatched_shuffle", 32, "deadlock: lanes 0 and 1 of warp 0 meet at different warp operations: "
                               "__shfl_down_sync.* and __shfl_xor_sync"),
])
def test_synchronisation_errors_name_kernel_block_and_thread(emulator, name, block, message):
    with pytest.raises(RuntimeError, match=message) as error:
        emulator.self_test.launch(name, torch.zeros(block, dtype=torch.int64), [1, 1, 1], [block, 1, 1])
    assert f"kernel {{anonymous}}::{name}_kernel" in str(error.value) and "block (0,0,0)" in str(error.value)
    assert "unspecified launch failure" in str(error.value)
    with pytest.raises(RuntimeError, match="unspecified launch failure"):  # sticky, as error 719 is
        emulator.self_test.launch("syncwarp", torch.zeros(32, dtype=torch.int64), [1, 1, 1], [32, 1, 1])


@pytest.mark.parametrize("schedule", [("forward", 0), ("reverse", 0), ("shuffled", 3)])
def test_lanes_may_meet_at_other_warp_operations_first(emulator, schedule):
    """sm_70+: lanes 4 and 5 sync among themselves while the warp waits in a shuffle."""
    emulator.set_schedule(*schedule)
    out = torch.zeros(32, dtype=torch.int64)
    try:
        emulator.self_test.launch("partial_syncwarp", out, [1, 1, 1], [32, 1, 1])
    finally:
        emulator.set_schedule("forward", 0)
    assert out.tolist() == [lane ^ 1 for lane in range(32)]


def test_device_assert_prints_stops_the_grid_and_is_sticky(emulator, capfd):
    out = torch.zeros(4 * 32, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="device-side assert triggered") as error:
        emulator.self_test.launch("assert", out, [4, 1, 1], [32, 1, 1], 2, 7)
    assert "block (2,0,0), thread (7,0,0)" in str(error.value)
    printed = capfd.readouterr().out
    assert "block: [2,0,0], thread: [7,0,0] Assertion `!(blockIdx.x == bad_block && threadIdx.x == bad_thread)` failed." in printed
    assert out[3 * 32:].sum() == 0, "the grid stops: block 3 never runs"
    with pytest.raises(RuntimeError, match="device-side assert triggered"):
        emulator.self_test.launch("syncwarp", torch.zeros(32, dtype=torch.int64), [1, 1, 1], [32, 1, 1])
    emulator.reset_device()
    emulator.self_test.launch("syncwarp", torch.zeros(32, dtype=torch.int64), [1, 1, 1], [32, 1, 1])


def test_printf_from_a_kernel(emulator, capfd):
    emulator.self_test.launch("printf", torch.zeros(1, dtype=torch.int64), [2, 1, 1], [8, 1, 1])
    assert capfd.readouterr().out.splitlines() == ["hello from block 0 thread 3", "hello from block 1 thread 3"]


@pytest.mark.parametrize("grid, block", [
    ([0, 1, 1], [32, 1, 1]), ([1, 65536, 1], [32, 1, 1]), ([1, 1, 1], [1025, 1, 1]),
    ([1, 1, 1], [32, 32, 2]), ([1, 1, 1], [1, 1, 65]), ([1, 1, 1], [0, 1, 1]),
])
def test_launch_limits_as_cuda(emulator, grid, block):
    with pytest.raises(RuntimeError, match="invalid configuration argument"):
        emulator.self_test.launch("printf", torch.zeros(1, dtype=torch.int64), grid, block)


def test_largest_legal_block_runs(emulator):
    emulator.self_test.launch("printf", torch.zeros(1, dtype=torch.int64), [1, 1, 1], [32, 32, 1])


def test_fault_names_kernel_block_and_thread(tmp_path):
    """A memory fault inside a kernel kills the process, as on a GPU, after naming where."""
    script = (
        "import sys, torch; sys.path.insert(0, %r); import cuda_emulation\n"
        "m = cuda_emulation.load()\n"
        "m.self_test.launch('fault', torch.zeros(1, dtype=torch.int64), [3, 1, 1], [32, 1, 1], 1, 5)\n"
    ) % os.path.dirname(__file__)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=os.environ)
    assert result.returncode != 0
    assert "kernel {anonymous}::fault_kernel" in result.stderr and "block (1,0,0)" in result.stderr
    assert "thread (5,0,0)" in result.stderr
