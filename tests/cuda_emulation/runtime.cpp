// The emulated device behind emulation.h: launches, the block scheduler, barriers, warp
// shuffles, errors. Everything runs on the calling thread; the threads of a block are fibers
// (ucontext) that give control back at every barrier and warp operation, so that a block's
// threads meet there as they do on a GPU.
#include "emulation.h"

#include <dlfcn.h>
#include <elf.h>
#include <link.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <deque>
#include <fstream>
#include <iterator>
#include <map>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "runtime.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define FOCAL_EMU_ASAN 1
#endif

uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

namespace focal_emu {

struct KernelInstance {
  std::string name;
  long launches = 0;
  unsigned long long last_grid = 0;  // blocks of the latest launch
};

namespace {

constexpr unsigned kWarpSize = 32;
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr std::size_t kMaxStaticShared = 48 * 1024;
constexpr std::size_t kStackBytes = 256 << 10;

enum class ThreadState { Runnable, AtBarrier, AtWarpOp, Exited };
enum class WarpOp { SyncWarp, Shuffle };

struct Fiber {
  ucontext_t context;
  char* stack = nullptr;
  ThreadState state = ThreadState::Exited;
  uint3 index{};
  // Where the thread waits (barrier or warp operation) and with what.
  const char* file = "";
  int line = 0;
  WarpOp op = WarpOp::SyncWarp;
  ShuffleMode mode = ShuffleMode::Index;
  unsigned mask = 0;
  int operand = 0;
  int width = 0;
  std::uint64_t value = 0;
  std::uint64_t result = 0;
#ifdef FOCAL_EMU_ASAN
  void* fake_stack = nullptr;
#endif
};

// The runnable threads of a block, as a bit set: the schedule takes the lowest, the highest or a
// random one.
class RunQueue {
 public:
  void clear(unsigned threads) {
    words_.assign((threads + 63) / 64, 0);
    count_ = 0;
  }
  void add(unsigned t) {
    words_[t / 64] |= 1ull << (t % 64);
    ++count_;
  }
  bool empty() const { return count_ == 0; }
  unsigned take(Schedule schedule, std::mt19937_64& random) {
    unsigned t = 0;
    if (schedule == Schedule::Forward) {
      t = nth(0);
    } else if (schedule == Schedule::Reverse) {
      t = nth(count_ - 1);
    } else {
      t = nth(static_cast<unsigned>(random() % count_));
    }
    words_[t / 64] &= ~(1ull << (t % 64));
    --count_;
    return t;
  }

 private:
  unsigned nth(unsigned n) const {
    for (std::size_t w = 0; w < words_.size(); ++w) {
      const unsigned in_word = static_cast<unsigned>(__builtin_popcountll(words_[w]));
      if (n < in_word) {
        std::uint64_t word = words_[w];
        for (unsigned skip = 0; skip < n; ++skip) {
          word &= word - 1;
        }
        return static_cast<unsigned>(w * 64 + __builtin_ctzll(word));
      }
      n -= in_word;
    }
    std::abort();  // n < count_ always
  }
  std::vector<std::uint64_t> words_;
  unsigned count_ = 0;
};

struct Device {
  std::mutex mutex;  // one launch at a time: __shared__ statics and the builtins are global
  Schedule schedule = Schedule::Forward;
  std::uint64_t seed = 0;
  // The emulated devices' SM counts by device index, and the current device: each count that
  // set_multiprocessor_count asks for is a device of its own, so that what the kernel glue keeps
  // per device stays true.
  std::vector<int> multiprocessors{132};  // device 0: an H100 SXM
  int current_device = 0;
  long multiprocessor_queries = 0;
  cudaError_t last_error = cudaSuccess;
  cudaError_t sticky_error = cudaSuccess;
  std::string error_detail = "no error";

  std::vector<std::pair<unsigned char*, std::size_t>> shared_variables;
  char* stacks = nullptr;
  unsigned fibers_allocated = 0;

  // The grid being run.
  KernelInstance* instance = nullptr;
  KernelThunk run = nullptr;
  const void* params = nullptr;
  unsigned threads = 0;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  ucontext_t scheduler;
  bool stopped = false;
  RunQueue run_queue;
  unsigned exited = 0;
  unsigned at_barrier = 0;
#ifdef FOCAL_EMU_ASAN
  const void* scheduler_stack = nullptr;
  std::size_t scheduler_stack_size = 0;
#endif
};

Device& device() {
  static Device* const instance = new Device();  // never destroyed: kernels may run at exit
  return *instance;
}

std::deque<KernelInstance>& registry() {
  static auto* const instances = new std::deque<KernelInstance>();
  return *instances;
}

std::string dims(uint3 v) {
  return "(" + std::to_string(v.x) + "," + std::to_string(v.y) + "," + std::to_string(v.z) + ")";
}

std::string dims(dim3 v) { return dims(uint3{v.x, v.y, v.z}); }

std::string site(const char* file, int line) { return std::string(file) + ":" + std::to_string(line); }

std::string hex(std::uint64_t value) {
  std::ostringstream out;
  out << "0x" << std::hex << value;
  return out.str();
}

std::string kernel_context() {
  const Device& d = device();
  std::string text = "kernel " + (d.instance ? d.instance->name : std::string("?")) + ", grid " +
                     dims(gridDim) + " x block " + dims(blockDim) + ", block " + dims(blockIdx);
  if (d.current != nullptr) {
    text += ", thread " + dims(d.current->index);
  }
  return text;
}

// Records an error as cudaGetLastError will report it. As on a GPU, an error inside a kernel
// (device assert, or what stands in here for a fault or a hang: cudaErrorLaunchFailure) is
// sticky; a refused launch is not.
void set_error(cudaError_t code, const std::string& detail) {
  Device& d = device();
  d.last_error = code;
  d.error_detail = detail;
  if (code == cudaErrorAssert || code == cudaErrorLaunchFailure) {
    d.sticky_error = code;
  }
}

// An error found while the scheduler runs a block: the grid stops.
void stop_grid(cudaError_t code, const std::string& what) {
  set_error(code, kernel_context() + ": " + what);
  device().stopped = true;
}

// ---- Fibers --------------------------------------------------------------------------------------

void switch_to_scheduler(bool exiting) {
  Device& d = device();
  Fiber& fiber = *d.current;
#ifdef FOCAL_EMU_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &fiber.fake_stack, d.scheduler_stack,
                                 d.scheduler_stack_size);
#else
  (void)exiting;
#endif
  swapcontext(&fiber.context, &d.scheduler);
#ifdef FOCAL_EMU_ASAN
  __sanitizer_finish_switch_fiber(fiber.fake_stack, &d.scheduler_stack, &d.scheduler_stack_size);
#endif
}

void fiber_entry() {
  Device& d = device();
#ifdef FOCAL_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &d.scheduler_stack, &d.scheduler_stack_size);
#endif
  d.run(d.params);
  d.current->state = ThreadState::Exited;
  switch_to_scheduler(true);
  std::abort();  // an exited thread is never resumed
}

void resume(Fiber& fiber) {
  Device& d = device();
  d.current = &fiber;
  threadIdx = fiber.index;
#ifdef FOCAL_EMU_ASAN
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(&fake_stack, fiber.stack, kStackBytes);
#endif
  swapcontext(&d.scheduler, &fiber.context);
#ifdef FOCAL_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#endif
  d.current = nullptr;
}

// The calling kernel thread: what every device-side runtime function starts with.
Fiber& current_thread(const char* what) {
  Fiber* fiber = device().current;
  if (fiber == nullptr) {
    std::fprintf(stderr, "focal_emu: %s called outside a kernel\n", what);
    std::abort();
  }
  return *fiber;
}

// Stops the grid from inside a kernel thread; the thread is never resumed.
[[noreturn]] void fail_in_thread(cudaError_t code, const std::string& what) {
  stop_grid(code, what);
  device().current->state = ThreadState::Exited;
  switch_to_scheduler(true);
  std::abort();
}

// Stacks for the most threads a block can have, each with a guard page below it, so that an
// overflow faults. Reserved, not committed: only the pages a thread touches take memory.
void ensure_fibers() {
  Device& d = device();
  if (d.fibers_allocated > 0) {
    return;
  }
  const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  const std::size_t slot = kStackBytes + page;
  void* memory = mmap(nullptr, slot * kMaxThreadsPerBlock, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (memory == MAP_FAILED) {
    std::perror("focal_emu: mmap of the fiber stacks");
    std::abort();
  }
  d.stacks = static_cast<char*>(memory);
  d.fibers.assign(kMaxThreadsPerBlock, Fiber{});
  for (unsigned i = 0; i < kMaxThreadsPerBlock; ++i) {
    char* base = d.stacks + i * slot;
    mprotect(base, page, PROT_NONE);
    d.fibers[i].stack = base + page;
  }
  d.fibers_allocated = kMaxThreadsPerBlock;
}

// ---- __shared__ variables ------------------------------------------------------------------------

// The tagged statics, from this module's own symbol table, at the module's load bias.
void find_shared_variables() {
  Device& d = device();
  Dl_info module{};
  link_map* map = nullptr;
  if (dladdr1(reinterpret_cast<void*>(&find_shared_variables), &module, reinterpret_cast<void**>(&map),
              RTLD_DL_LINKMAP) == 0 || !module.dli_fname || map == nullptr) {
    std::fprintf(stderr, "focal_emu: cannot locate the emulation module to find its __shared__ variables\n");
    std::abort();
  }
  std::ifstream file(module.dli_fname, std::ios::binary);
  const std::vector<char> bytes{std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>()};
  const auto* header = reinterpret_cast<const Elf64_Ehdr*>(bytes.data());
  if (bytes.size() < sizeof(Elf64_Ehdr) || std::memcmp(header->e_ident, ELFMAG, SELFMAG) != 0) {
    std::fprintf(stderr, "focal_emu: %s is not an ELF file\n", module.dli_fname);
    std::abort();
  }
  const auto* sections = reinterpret_cast<const Elf64_Shdr*>(bytes.data() + header->e_shoff);
  bool has_symbols = false;
  for (int s = 0; s < header->e_shnum; ++s) {
    if (sections[s].sh_type != SHT_SYMTAB) {
      continue;
    }
    has_symbols = true;
    const char* names = bytes.data() + sections[sections[s].sh_link].sh_offset;
    const auto* symbols = reinterpret_cast<const Elf64_Sym*>(bytes.data() + sections[s].sh_offset);
    const std::size_t count = sections[s].sh_size / sizeof(Elf64_Sym);
    for (std::size_t i = 0; i < count; ++i) {
      const Elf64_Sym& symbol = symbols[i];
      if (ELF64_ST_TYPE(symbol.st_info) == STT_OBJECT && symbol.st_size > 0 &&
          std::strstr(names + symbol.st_name, "B16focal_emu_shared") != nullptr) {
        auto* address = reinterpret_cast<unsigned char*>(map->l_addr + symbol.st_value);
        d.shared_variables.emplace_back(address, symbol.st_size);
      }
    }
  }
  if (!has_symbols) {
    std::fprintf(stderr, "focal_emu: %s has no symbol table (stripped?)\n", module.dli_fname);
    std::abort();
  }
  std::sort(d.shared_variables.begin(), d.shared_variables.end());
  d.shared_variables.erase(std::unique(d.shared_variables.begin(), d.shared_variables.end()),
                           d.shared_variables.end());
}

// At load: the file is the one just loaded (read later, a rebuild in place could differ).
const bool shared_variables_found = (find_shared_variables(), true);

std::size_t shared_bytes() {
  std::size_t total = 0;
  for (const auto& variable : device().shared_variables) {
    total += variable.second;
  }
  return total;
}

// NaN in every floating type, -1 in every integer one.
void poison_shared_variables() {
  for (const auto& variable : device().shared_variables) {
    std::memset(variable.first, 0xff, variable.second);
  }
}

// ---- Barriers and warp operations, resolved as threads arrive ------------------------------------

// The lane a shuffle reads, or -1 for the lane's own value: the pseudo-code of shfl.sync in the
// PTX ISA, with the c operand that __shfl_*_sync pass for `width` (segment mask 32 - width;
// clamp 0 for up, 31 otherwise). Only the low 5 bits of the lane operand count.
int source_lane(ShuffleMode mode, int lane, int operand, int width) {
  const int b = operand & 31;
  const int segment_mask = (32 - width) & 31;
  const int clamp = mode == ShuffleMode::Up ? 0 : 31;
  const int max_lane = (lane & segment_mask) | (clamp & ~segment_mask);
  const int min_lane = lane & segment_mask;
  int source = lane;
  bool in_range = false;
  switch (mode) {
    case ShuffleMode::Up: source = lane - b; in_range = source >= max_lane; break;
    case ShuffleMode::Down: source = lane + b; in_range = source <= max_lane; break;
    case ShuffleMode::Xor: source = lane ^ b; in_range = source <= max_lane; break;
    case ShuffleMode::Index: source = min_lane | (b & ~segment_mask); in_range = source <= max_lane; break;
  }
  return in_range ? source : -1;
}

const char* shuffle_name(ShuffleMode mode) {
  switch (mode) {
    case ShuffleMode::Index: return "__shfl_sync";
    case ShuffleMode::Up: return "__shfl_up_sync";
    case ShuffleMode::Down: return "__shfl_down_sync";
    case ShuffleMode::Xor: return "__shfl_xor_sync";
  }
  return "?";
}

std::string operation_name(const Fiber& fiber) {
  return (fiber.op == WarpOp::SyncWarp ? std::string("__syncwarp") : shuffle_name(fiber.mode)) +
         "(mask " + hex(fiber.mask) + (fiber.op == WarpOp::Shuffle ? ", width " + std::to_string(fiber.width) : "") +
         ") at " + site(fiber.file, fiber.line);
}

bool same_warp_operation(const Fiber& a, const Fiber& b) {
  return a.mask == b.mask && a.op == b.op &&
         (a.op != WarpOp::Shuffle || (a.mode == b.mode && a.width == b.width));
}

// Completes the warp operations of the warp starting at thread `base` whose mask's lanes have all
// arrived (exited lanes excepted, as in shfl.sync and bar.warp.sync). False when it stopped the grid.
bool complete_warp_operations(unsigned base) {
  Device& d = device();
  const unsigned lanes = std::min(kWarpSize, d.threads - base);
  Fiber* warp = &d.fibers[base];
  for (unsigned lane = 0; lane < lanes; ++lane) {
    const Fiber& first = warp[lane];
    if (first.state != ThreadState::AtWarpOp) {
      continue;
    }
    bool ready = true;
    for (unsigned other = 0; other < lanes && ready; ++other) {
      const Fiber& peer = warp[other];
      if (!(first.mask >> other & 1u) || peer.state == ThreadState::Exited) {
        continue;
      }
      // Still to arrive, or waiting at another warp operation or the barrier first (sm_70 and
      // later let a lane's other warp operations complete in between): a deadlock if nothing moves.
      ready = peer.state == ThreadState::AtWarpOp && same_warp_operation(first, peer);
    }
    if (!ready) {
      continue;
    }
    const unsigned mask = first.mask;
    for (unsigned other = 0; other < lanes; ++other) {
      Fiber& peer = warp[other];
      if (!(mask >> other & 1u) || peer.state != ThreadState::AtWarpOp || peer.op != WarpOp::Shuffle) {
        continue;
      }
      const int source = source_lane(peer.mode, static_cast<int>(other), peer.operand, peer.width);
      if (source < 0 || source == static_cast<int>(other)) {
        peer.result = peer.value;
        continue;
      }
      const bool in_mask = mask >> source & 1u;
      const bool alive = source < static_cast<int>(lanes) && warp[source].state == ThreadState::AtWarpOp;
      if (!in_mask || !alive) {
        d.current = &peer;
        stop_grid(cudaErrorLaunchFailure,
                  "lane " + std::to_string(other) + " reads lane " + std::to_string(source) + " in " +
                      operation_name(peer) + ", which " +
                      (!in_mask ? "is outside the mask" : "has exited or does not exist") +
                      " (undefined in the PTX ISA)");
        d.current = nullptr;
        return false;
      }
      peer.result = warp[source].value;
    }
    for (unsigned other = 0; other < lanes; ++other) {
      if ((mask >> other & 1u) && warp[other].state == ThreadState::AtWarpOp) {
        warp[other].state = ThreadState::Runnable;
        d.run_queue.add(base + other);
      }
    }
  }
  return true;
}

// Releases the barrier once every thread of the block waits at it, from one call site. False
// when it stopped the grid.
bool release_barrier_if_complete() {
  Device& d = device();
  if (d.at_barrier == 0 || d.at_barrier + d.exited < d.threads) {
    return true;
  }
  std::map<std::string, unsigned> sites;
  for (unsigned t = 0; t < d.threads; ++t) {
    if (d.fibers[t].state == ThreadState::AtBarrier) {
      ++sites[site(d.fibers[t].file, d.fibers[t].line)];
    }
  }
  if (d.exited > 0) {
    stop_grid(cudaErrorLaunchFailure,
              "__syncthreads at " + sites.begin()->first + " is reached by " + std::to_string(d.at_barrier) +
                  " threads while " + std::to_string(d.exited) +
                  " have exited: a barrier must be reached by the whole block (CUDA programming guide)");
    return false;
  }
  if (sites.size() > 1) {
    std::string where;
    for (const auto& entry : sites) {
      where += (where.empty() ? "" : ", ") + std::to_string(entry.second) + " threads at " + entry.first;
    }
    stop_grid(cudaErrorLaunchFailure, "divergent __syncthreads: " + where);
    return false;
  }
  for (unsigned t = 0; t < d.threads; ++t) {
    d.fibers[t].state = ThreadState::Runnable;
    d.run_queue.add(t);
  }
  d.at_barrier = 0;
  return true;
}

void report_deadlock() {
  Device& d = device();
  // Lanes of one mask stuck at different warp operations: the likely cause, named first.
  for (unsigned t = 0; t < d.threads; ++t) {
    const Fiber& first = d.fibers[t];
    const unsigned base = t - t % kWarpSize;
    for (unsigned other = base; first.state == ThreadState::AtWarpOp && other < std::min(base + kWarpSize, d.threads); ++other) {
      const Fiber& peer = d.fibers[other];
      if ((first.mask >> (other - base) & 1u) && peer.state == ThreadState::AtWarpOp &&
          !same_warp_operation(first, peer)) {
        stop_grid(cudaErrorLaunchFailure,
                  "deadlock: lanes " + std::to_string(t - base) + " and " + std::to_string(other - base) +
                      " of warp " + std::to_string(base / kWarpSize) + " meet at different warp operations: " +
                      operation_name(first) + " and " + operation_name(peer));
        return;
      }
    }
  }
  std::map<std::string, unsigned> waits;
  for (unsigned t = 0; t < d.threads; ++t) {
    const Fiber& fiber = d.fibers[t];
    if (fiber.state == ThreadState::AtBarrier) {
      ++waits["__syncthreads at " + site(fiber.file, fiber.line)];
    } else if (fiber.state == ThreadState::AtWarpOp) {
      ++waits[operation_name(fiber)];
    }
  }
  std::string where;
  for (const auto& entry : waits) {
    where += (where.empty() ? "" : "; ") + std::to_string(entry.second) + " threads wait in " + entry.first;
  }
  stop_grid(cudaErrorLaunchFailure, "deadlock: " + where);
}

// ---- Blocks and grids ----------------------------------------------------------------------------

void arrange(std::vector<unsigned>& order, std::mt19937_64& random) {
  std::iota(order.begin(), order.end(), 0u);
  switch (device().schedule) {
    case Schedule::Forward: break;
    case Schedule::Reverse: std::reverse(order.begin(), order.end()); break;
    case Schedule::Shuffled: std::shuffle(order.begin(), order.end(), random); break;
  }
}

// Runs one block to its end; false when an error stopped the grid. The schedule picks the next
// thread among the runnable ones each time a thread stops: the lowest (forward), the highest
// (reverse) or a random one (shuffled). Barriers and warp operations complete as soon as their
// last thread arrives, so one warp may run far ahead of the others, as on a GPU.
bool run_block(std::mt19937_64& random) {
  Device& d = device();
  poison_shared_variables();
  d.run_queue.clear(d.threads);
  d.exited = 0;
  d.at_barrier = 0;
  for (unsigned t = 0; t < d.threads; ++t) {
    Fiber& fiber = d.fibers[t];
    fiber.state = ThreadState::Runnable;
    fiber.index = uint3{t % blockDim.x, t / blockDim.x % blockDim.y, t / (blockDim.x * blockDim.y)};
    getcontext(&fiber.context);
    fiber.context.uc_stack.ss_sp = fiber.stack;
    fiber.context.uc_stack.ss_size = kStackBytes;
    fiber.context.uc_link = nullptr;
    makecontext(&fiber.context, fiber_entry, 0);
#ifdef FOCAL_EMU_ASAN
    // AddressSanitizer's swapcontext clears the shadow of the whole target stack at every
    // switch (most of the sanitized sweep's time). Clear it once, here, where the stack is
    // reused, and give the switches no stack to clear.
    __asan_unpoison_memory_region(fiber.stack, kStackBytes);
    fiber.context.uc_stack.ss_size = 0;
#endif
    d.run_queue.add(t);
  }
  while (!d.run_queue.empty()) {
    const unsigned t = d.run_queue.take(d.schedule, random);
    resume(d.fibers[t]);
    if (d.stopped) {
      return false;
    }
    switch (d.fibers[t].state) {
      case ThreadState::Exited: ++d.exited; break;
      case ThreadState::AtBarrier: ++d.at_barrier; break;
      case ThreadState::AtWarpOp:
      case ThreadState::Runnable: break;
    }
    // An arrival or an exit can complete its warp's operations, and the block's barrier.
    if (!complete_warp_operations(t - t % kWarpSize) || !release_barrier_if_complete()) {
      return false;
    }
  }
  if (d.exited == d.threads) {
    return true;
  }
  report_deadlock();
  return false;
}

std::string check_configuration(dim3 grid, dim3 block) {
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (grid.x < 1 || grid.x > 0x7fffffffu || grid.y < 1 || grid.y > 65535 || grid.z < 1 || grid.z > 65535) {
    return "grid " + dims(grid) + " outside [1, 2^31-1] x [1, 65535] x [1, 65535]";
  }
  if (block.x < 1 || block.y < 1 || block.z < 1 || block.x > 1024 || block.y > 1024 || block.z > 64 ||
      threads > kMaxThreadsPerBlock) {
    return "block " + dims(block) + " outside 1024 x 1024 x 64 or above 1024 threads";
  }
  return {};
}

// A fault inside a kernel names the kernel instance, block and thread before the process dies.
struct FaultReporter {
  static constexpr int kSignals[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL};
  struct sigaction previous[4];

  static void on_fault(int signal, siginfo_t* info, void*) {
    const std::string text = "focal_emu: signal " + std::to_string(signal) + " (" + strsignal(signal) +
                             ") at address " + hex(reinterpret_cast<std::uintptr_t>(info->si_addr)) +
                             " in " + kernel_context() + "\n";
    ssize_t ignored = write(STDERR_FILENO, text.data(), text.size());
    (void)ignored;
    FaultReporter& self = instance();
    for (int i = 0; i < 4; ++i) {
      if (kSignals[i] == signal) {
        sigaction(signal, &self.previous[i], nullptr);  // the fault repeats into the old handler
      }
    }
  }

  static FaultReporter& instance() {
    static FaultReporter reporter;
    return reporter;
  }

  void install() {
#ifndef FOCAL_EMU_ASAN  // the sanitizers report faults themselves (with the context, below)
    static thread_local std::vector<char> alternate_stack;
    if (alternate_stack.empty()) {
      alternate_stack.resize(1 << 16);
      stack_t stack{};
      stack.ss_sp = alternate_stack.data();
      stack.ss_size = alternate_stack.size();
      sigaltstack(&stack, nullptr);
    }
    struct sigaction action {};
    action.sa_sigaction = &on_fault;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    for (int i = 0; i < 4; ++i) {
      sigaction(kSignals[i], &action, &previous[i]);
    }
#endif
  }

  void restore() {
#ifndef FOCAL_EMU_ASAN
    for (int i = 0; i < 4; ++i) {
      sigaction(kSignals[i], &previous[i], nullptr);
    }
#endif
  }
};

#ifdef FOCAL_EMU_ASAN
// AddressSanitizer and UndefinedBehaviorSanitizer call this before they end the process.
void print_context_at_death() {
  if (device().instance != nullptr) {
    std::fprintf(stderr, "focal_emu: the error above happened in %s\n", kernel_context().c_str());
  }
}
// GCC links UBSan as a runtime of its own, with its own list of callbacks: register with both.
bool install_death_callbacks() {
  __sanitizer_set_death_callback(print_context_at_death);
  if (void* ubsan = dlopen("libubsan.so.1", RTLD_NOW | RTLD_NOLOAD)) {
    using Setter = void (*)(void (*)());
    if (auto set = reinterpret_cast<Setter>(dlsym(ubsan, "__sanitizer_set_death_callback"))) {
      set(print_context_at_death);
    }
  }
  return true;
}
const bool death_callbacks_installed = install_death_callbacks();
#endif

}  // namespace

// ---- Device-side entry points --------------------------------------------------------------------

void sync_threads(const char* file, int line) {
  Fiber& fiber = current_thread("__syncthreads");
  fiber.state = ThreadState::AtBarrier;
  fiber.file = file;
  fiber.line = line;
  switch_to_scheduler(false);
}

namespace {
void check_in_mask(const Fiber& fiber, unsigned mask, const char* what, const char* file, int line) {
  const unsigned lane = (fiber.index.x + fiber.index.y * blockDim.x + fiber.index.z * blockDim.x * blockDim.y) %
                        kWarpSize;
  if (!(mask >> lane & 1u)) {
    fail_in_thread(cudaErrorLaunchFailure, std::string(what) + " at " + site(file, line) + " with mask " +
                                               hex(mask) + " that does not hold the calling lane " +
                                               std::to_string(lane) + " (undefined in the PTX ISA)");
  }
}
}  // namespace

void sync_warp(unsigned mask, const char* file, int line) {
  Fiber& fiber = current_thread("__syncwarp");
  check_in_mask(fiber, mask, "__syncwarp", file, line);
  fiber.state = ThreadState::AtWarpOp;
  fiber.op = WarpOp::SyncWarp;
  fiber.mask = mask;
  fiber.file = file;
  fiber.line = line;
  switch_to_scheduler(false);
}

std::uint64_t shuffle(ShuffleMode mode, unsigned mask, std::uint64_t bits, int operand, int width,
                      const char* file, int line) {
  Fiber& fiber = current_thread(shuffle_name(mode));
  if (width < 1 || width > static_cast<int>(kWarpSize) || (width & (width - 1)) != 0) {
    fail_in_thread(cudaErrorLaunchFailure, std::string(shuffle_name(mode)) + " at " + site(file, line) +
                                               " with width " + std::to_string(width) +
                                               ", not a power of 2 in [1, 32]");
  }
  check_in_mask(fiber, mask, shuffle_name(mode), file, line);
  fiber.state = ThreadState::AtWarpOp;
  fiber.op = WarpOp::Shuffle;
  fiber.mode = mode;
  fiber.mask = mask;
  fiber.value = bits;
  fiber.operand = operand;
  fiber.width = width;
  fiber.file = file;
  fiber.line = line;
  switch_to_scheduler(false);
  return fiber.result;
}

void assert_fail(const char* condition, const char* file, int line, const char* function) {
  current_thread("CUDA_KERNEL_ASSERT");
  // The GPU's wording, so that tests and users see what a device-side assert prints there.
  std::printf("%s:%d: %s: block: [%u,%u,%u], thread: [%u,%u,%u] Assertion `%s` failed.\n", file, line,
              function, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z,
              condition);
  std::fflush(stdout);
  fail_in_thread(cudaErrorAssert, std::string("device-side assert `") + condition + "` failed at " +
                                      site(file, line));
}

// ---- Launches ------------------------------------------------------------------------------------

KernelInstance& register_instance(const char* pretty_function) {
  // "... [with Params = {...}; void (* Kernel)(Params ...) = NAME]": GCC's __PRETTY_FUNCTION__ of
  // Launch<Kernel>::name.
  std::string name = pretty_function;
  const auto start = name.rfind(" = ");
  if (start != std::string::npos && name.back() == ']') {
    name = name.substr(start + 3, name.size() - start - 4);
  }
  registry().push_back(KernelInstance{name, 0});
  return registry().back();
}

void launch(KernelInstance& instance, dim3 grid, dim3 block, cudaStream_t, KernelThunk run, const void* params) {
  Device& d = device();
  std::lock_guard<std::mutex> lock(d.mutex);
  if (d.sticky_error != cudaSuccess) {
    d.last_error = d.sticky_error;  // a context with a sticky error runs nothing more
    return;
  }
  const std::string bad_configuration = check_configuration(grid, block);
  if (!bad_configuration.empty()) {
    set_error(cudaErrorInvalidConfiguration, "launch of " + instance.name + ": " + bad_configuration);
    return;
  }
  if (shared_bytes() > kMaxStaticShared) {
    set_error(cudaErrorLaunchOutOfResources, "the module's __shared__ variables take " +
                                                 std::to_string(shared_bytes()) + " bytes, above 48 KiB");
    return;
  }
  ensure_fibers();
  ++instance.launches;
  instance.last_grid = 1ull * grid.x * grid.y * grid.z;
  d.instance = &instance;
  d.run = run;
  d.params = params;
  d.threads = block.x * block.y * block.z;
  d.stopped = false;
  gridDim = grid;
  blockDim = block;

  const unsigned long long blocks = 1ull * grid.x * grid.y * grid.z;
  std::vector<unsigned> order(blocks);
  std::mt19937_64 random(d.seed);
  arrange(order, random);
  FaultReporter& faults = FaultReporter::instance();
  faults.install();
  for (const unsigned b : order) {
    blockIdx = uint3{b % grid.x, b / grid.x % grid.y, b / (grid.x * grid.y)};
    if (!run_block(random)) {
      break;
    }
  }
  faults.restore();
  d.instance = nullptr;
}

const char* last_error_detail() { return device().error_detail.c_str(); }

// ---- Control, for the harness --------------------------------------------------------------------

void set_schedule(Schedule schedule, std::uint64_t seed) {
  Device& d = device();
  std::lock_guard<std::mutex> lock(d.mutex);
  d.schedule = schedule;
  d.seed = seed;
}

void set_multiprocessor_count(int count) {
  Device& d = device();
  std::lock_guard<std::mutex> lock(d.mutex);
  const auto found = std::find(d.multiprocessors.begin(), d.multiprocessors.end(), count);
  d.current_device = static_cast<int>(found - d.multiprocessors.begin());
  if (found == d.multiprocessors.end()) {
    d.multiprocessors.push_back(count);
  }
}

int multiprocessor_count() {
  Device& d = device();
  std::lock_guard<std::mutex> lock(d.mutex);
  return d.multiprocessors[d.current_device];
}

long multiprocessor_queries() {
  Device& d = device();
  std::lock_guard<std::mutex> lock(d.mutex);
  return d.multiprocessor_queries;
}

std::vector<std::pair<std::string, long>> kernel_instances() {
  std::lock_guard<std::mutex> lock(device().mutex);
  std::vector<std::pair<std::string, long>> result;
  for (const auto& instance : registry()) {
    result.emplace_back(instance.name, instance.launches);
  }
  return result;
}

std::vector<std::pair<std::string, unsigned long long>> last_grids() {
  std::lock_guard<std::mutex> lock(device().mutex);
  std::vector<std::pair<std::string, unsigned long long>> result;
  for (const auto& instance : registry()) {
    result.emplace_back(instance.name, instance.last_grid);
  }
  return result;
}

void reset_launch_counts() {
  std::lock_guard<std::mutex> lock(device().mutex);
  for (auto& instance : registry()) {
    instance.launches = 0;
  }
}

void reset_device() {
  Device& d = device();
  std::lock_guard<std::mutex> lock(d.mutex);
  d.sticky_error = cudaSuccess;
  d.last_error = cudaSuccess;
  d.error_detail = "no error";
}

int shared_variable_count() {
  Device& d = device();
  std::lock_guard<std::mutex> lock(d.mutex);
  return static_cast<int>(d.shared_variables.size());
}

}  // namespace focal_emu

// ---- The runtime API -------------------------------------------------------------------------------

using focal_emu::device;

void vprintf_from(const char* format, const void* arguments) {
  focal_emu::current_thread("vprintf");
  const auto* next = static_cast<const unsigned char*>(arguments);
  std::string text;
  for (const char* c = format; *c != '\0'; ++c) {
    if (*c != '%') {
      text += *c;
    } else if (c[1] == '%') {
      text += '%';
      ++c;
    } else if (std::strncmp(c + 1, "lld", 3) == 0) {
      next = reinterpret_cast<const unsigned char*>(
          (reinterpret_cast<std::uintptr_t>(next) + 7) / 8 * 8);  // aligned to its size
      long long value = 0;
      std::memcpy(&value, next, sizeof(value));
      next += sizeof(value);
      text += std::to_string(value);
      c += 3;
    } else {
      focal_emu::fail_in_thread(cudaErrorLaunchFailure,
                                std::string("vprintf: the emulation reads %lld arguments only, format \"") +
                                    format + "\"");
    }
  }
  std::fputs(text.c_str(), stdout);
  std::fflush(stdout);
}

cudaError_t cudaGetDevice(int* index) {
  std::lock_guard<std::mutex> lock(device().mutex);
  if (device().sticky_error != cudaSuccess) {
    return device().sticky_error;
  }
  *index = device().current_device;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int index) {
  std::lock_guard<std::mutex> lock(device().mutex);
  if (device().sticky_error != cudaSuccess) {
    return device().sticky_error;
  }
  if (index < 0 || index >= static_cast<int>(device().multiprocessors.size())) {
    return cudaErrorInvalidDevice;
  }
  switch (attribute) {
    case cudaDevAttrMultiProcessorCount:
      ++device().multiprocessor_queries;
      *value = device().multiprocessors[index];
      return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

cudaError_t cudaGetLastError() {
  std::lock_guard<std::mutex> lock(device().mutex);
  const cudaError_t error = device().last_error;
  if (device().sticky_error == cudaSuccess) {
    device().last_error = cudaSuccess;
  }
  return error;
}

cudaError_t cudaPeekAtLastError() {
  std::lock_guard<std::mutex> lock(device().mutex);
  return device().last_error;
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorAssert: return "device-side assert triggered";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}
