// What the harness and the emulator's self-test control in the emulated device (runtime.cpp).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace focal_emu {

// The order in which the blocks of a grid, and the runnable threads of a block, take turns.
// A kernel whose results depend on it has a race.
enum class Schedule : int { Forward, Reverse, Shuffled };
void set_schedule(Schedule schedule, std::uint64_t seed);

// Makes the current device one with `count` SMs (what cudaDevAttrMultiProcessorCount reports,
// which sizes the grids of the kernel glue): each count is a device index of its own, as on a
// machine with several GPU models, since the kernel glue asks each device once.
void set_multiprocessor_count(int count);
int multiprocessor_count();
// How often cudaDevAttrMultiProcessorCount was asked for, on any device.
long multiprocessor_queries();

// Every kernel instance the module can launch, with how often each was launched.
std::vector<std::pair<std::string, long>> kernel_instances();
// Blocks in each instance's latest launch (0: never launched).
std::vector<std::pair<std::string, unsigned long long>> last_grids();
void reset_launch_counts();

// Clears the sticky error a device-side assert leaves, which on a GPU only a new process does.
void reset_device();

// How many __shared__ variables the runtime found (and poisons before every block).
int shared_variable_count();

}  // namespace focal_emu
