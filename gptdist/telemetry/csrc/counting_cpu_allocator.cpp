// A CPU allocator that counts: bytes of live tensors and their peak, across every thread.
//
// torch keeps such counters for CUDA (torch.cuda.memory_allocated / max_memory_allocated) but not for the CPU, and
// torch.profiler's memory events are recorded per thread, so a tensor made on one thread and freed on another (gloo's
// worker threads release collective buffers) is never seen to go. Installed as the process's CPU allocator, this
// one counts at the only place every CPU tensor passes through. Each block carries its size in a 64-byte header in
// front of the data, so the data keeps c10's 64-byte alignment and a free needs no lookup.
//
// Blocks of 1 MiB and more are mapped straight from the kernel and unmapped when freed. Through malloc they would
// come from heaps that glibc rarely gives back (its mmap threshold grows to 32 MiB as large blocks are freed), so a
// rank whose tensors come and go (ZeRO-3 gathering and releasing parameters) would keep its highest heap as
// resident memory: the OS would see a rank holding far more than its tensors.
#include <torch/extension.h>

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/alignment.h>
#include <c10/core/impl/alloc_cpu.h>

#include <sys/mman.h>

#include <atomic>
#include <cstdint>
#include <new>

namespace {

constexpr size_t kHeader = 64;  // >= c10::gAlignment, so data stays aligned like c10's own
constexpr size_t kMapped = size_t(1) << 20;  // blocks at least this large are mapped and unmapped directly
static_assert(kHeader % c10::gAlignment == 0, "header must keep c10's alignment");

std::atomic<int64_t> g_live{0};
std::atomic<int64_t> g_peak{0};
std::atomic<int64_t> g_allocations{0};

void raise_peak(int64_t now) {
  int64_t seen = g_peak.load(std::memory_order_relaxed);
  while (now > seen && !g_peak.compare_exchange_weak(seen, now, std::memory_order_relaxed)) {
  }
}

void counting_free(void* data) {
  if (data == nullptr) {
    return;
  }
  char* base = static_cast<char*>(data) - kHeader;
  const int64_t size = *reinterpret_cast<int64_t*>(base);
  g_live.fetch_sub(size, std::memory_order_relaxed);
  if (static_cast<size_t>(size) >= kMapped) {
    munmap(base, static_cast<size_t>(size) + kHeader);
  } else {
    c10::free_cpu(base);
  }
}

struct CountingCPUAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t nbytes) override {
    void* base = nullptr;
    if (nbytes >= kMapped) {
      base = mmap(nullptr, nbytes + kHeader, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (base == MAP_FAILED) {
        TORCH_CHECK_WITH(OutOfMemoryError, false, "gptdist counting allocator: cannot map ", nbytes, " bytes");
      }
    } else {
      base = c10::alloc_cpu(nbytes + kHeader);
    }
    *reinterpret_cast<int64_t*>(base) = static_cast<int64_t>(nbytes);
    void* data = static_cast<char*>(base) + kHeader;
    const int64_t now = g_live.fetch_add(static_cast<int64_t>(nbytes), std::memory_order_relaxed) + nbytes;
    g_allocations.fetch_add(1, std::memory_order_relaxed);
    raise_peak(now);
    return {data, data, &counting_free, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override {
    return &counting_free;
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

CountingCPUAllocator g_allocator;
c10::Allocator* g_previous = nullptr;  // the allocator this one replaced, given back by uninstall()
constexpr uint8_t kPriority = 100;  // above the default allocator's, so GetCPUAllocator() returns this one

void install() {
  if (g_previous == nullptr) {
    g_previous = c10::GetCPUAllocator();
    c10::SetCPUAllocator(&g_allocator, kPriority);
  }
}

// Counting costs the training step (every block of 1 MiB or more is fresh pages from the kernel), so the memory
// report counts only while it measures. Tensors made while installed keep this allocator's deleter, so their
// frees still go through counting_free and the counters stay consistent.
void uninstall() {
  if (g_previous != nullptr) {
    c10::SetCPUAllocator(g_previous, kPriority);
    g_previous = nullptr;
  }
}

// (live bytes, peak bytes since the last reset, allocations so far)
std::tuple<int64_t, int64_t, int64_t> stats() {
  return {g_live.load(), g_peak.load(), g_allocations.load()};
}

void reset_peak() {
  g_peak.store(g_live.load());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("install", &install, "make the counting allocator the process's CPU allocator");
  m.def("uninstall", &uninstall, "give the process its previous CPU allocator back");
  m.def("stats", &stats, "(live bytes, peak bytes since the last reset, allocations)");
  m.def("reset_peak", &reset_peak, "start a new peak at the current live bytes");
}
