// What a GPU would catch and a plain run on fibers would not, for the CPU emulator (cuda_runtime.h).
//
// Every build knows where the kernels' static __shared__ objects live (function statics of
// namespace sharedllm::cuda, read from the harness's own symbol table with `nm`) and poisons them
// before each block, as it poisons the dynamic shared memory.
//
// Built with SHAREDLLM_EMULATOR_CHECKS and `-fsanitize=thread,alignment` (tests/test_cuda_emulated.py), the
// compiler calls __tsan_{read,write}N before every memory access, static objects included (an
// AddressSanitizer build skips the accesses it can prove in bounds, such as a tile's constant
// index). The definitions at the end stand in for the ThreadSanitizer runtime: they see the
// accesses a kernel makes while one of its blocks runs, and check:
//
// * shared-memory races: each byte of the block's shared memory (static and dynamic) remembers its
//   last write and up to two reads since, with the thread and the code address. An interval is the
//   stretch between two __syncthreads (block epoch) or, inside one warp, two warp collectives
//   (__syncwarp, shuffles, mma: warp epoch; generous, since CUDA's memory model promises ordering
//   at __syncwarp only, so a kernel that orders shared memory by a shuffle alone is not flagged). Two threads touching a byte in the same interval, one
//   of them writing, is a race: reported with both threads, both source lines and the block;
// * accesses through a pointer off its type's alignment (uint4 and the kernels' Vec types: 16
//   bytes), which -fsanitize=alignment reports to __ubsan_handle_type_mismatch_v1: a GPU faults on
//   them, so the thread ends there;
// * static (the objects the launch touched) plus dynamic shared memory over sm_90's limit.
//
// The first few findings of a launch are kept; the launch then fails with them as its error
// string, so that the binding's check_launch raises them as it raises the GPU's errors.
#pragma once

#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

// the checks' own code must not call itself back
#define SHAREDLLM_UNCHECKED __attribute__((no_sanitize("thread")))

namespace emulator {
void trap_fiber();  // cuda_runtime.h: ends the running thread where it stands
}

namespace emulator::checks {

struct Object {
  uintptr_t begin;
  size_t size, shadow;  // where its bytes start in the shadow
};

struct Access {
  uint32_t block = 0;  // the serial number of the block that made it (0: none)
  int32_t thread = -1;
  uint32_t epoch = 0, warp_epoch = 0;
  const void* pc = nullptr;
};

struct Byte {
  Access write, reads[2];
};

struct State {
  bool active = false, busy = false;  // a block's fiber is running; a check is in progress (no re-entry)
  std::vector<Object> objects;        // the static shared objects, by address
  bool objects_read = false;
  uintptr_t static_low = 0, static_high = 0;
  size_t static_bytes = 0;  // of all the objects: where the dynamic memory's shadow starts
  // the running block: serial number, dynamic shared memory, thread, barrier generations
  uint32_t block_serial = 0;
  uintptr_t dynamic_begin = 0, dynamic_end = 0, dynamic_slack_end = 0;
  int thread = 0;
  const int* generation = nullptr;
  unsigned block[3] = {0, 0, 0};
  std::vector<Byte> shadow;  // static objects' bytes, then the dynamic shared memory's
  std::vector<unsigned char> touched;  // per static object: touched by the current launch
  std::string findings;
  int count = 0;
};

// a namespace-scope object, not a function-local static: its storage is zeroed before any code
// runs (active = false), so that a check called while it is being constructed returns at once
// instead of re-entering a guarded initialisation
inline State the_state;
SHAREDLLM_UNCHECKED inline State& state() { return the_state; }

SHAREDLLM_UNCHECKED inline bool enabled() {
#ifdef SHAREDLLM_EMULATOR_CHECKS
  return true;
#else
  return false;
#endif
}

inline std::string run(const std::string& command) {
  std::string out;
  if (FILE* pipe = popen(command.c_str(), "r")) {
    char buf[4096];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, pipe)) > 0) out.append(buf, n);
    pclose(pipe);
  }
  return out;
}

// The kernels' static shared objects of the shared object holding this code, read once with nm.
inline const std::vector<Object>& static_objects() {
  State& s = state();
  if (s.objects_read) return s.objects;
  s.objects_read = true;
  Dl_info info;
  if (!dladdr(reinterpret_cast<void*>(&static_objects), &info) || info.dli_fname == nullptr) return s.objects;
  const std::string table = run(std::string("nm -S --defined-only '") + info.dli_fname + "' 2>/dev/null");
  const uintptr_t base = reinterpret_cast<uintptr_t>(info.dli_fbase);
  size_t start = 0;
  while (start < table.size()) {
    size_t end = table.find('\n', start);
    if (end == std::string::npos) end = table.size();
    unsigned long value = 0, size = 0;
    char type = 0, name[1024];
    if (std::sscanf(table.c_str() + start, "%lx %lx %c %1023s", &value, &size, &type, name) == 4 &&
        std::strchr("bB", type) && std::strncmp(name, "_ZZN9sharedllm4cuda", 19) == 0 && size > 0)
      s.objects.push_back({base + value, size, 0});
    start = end + 1;
  }
  std::sort(s.objects.begin(), s.objects.end(), [](const Object& a, const Object& b) { return a.begin < b.begin; });
  for (Object& o : s.objects) o.shadow = s.static_bytes, s.static_bytes += o.size;
  if (!s.objects.empty()) s.static_low = s.objects.front().begin, s.static_high = s.objects.back().begin + s.objects.back().size;
  s.touched.assign(s.objects.size(), 0);
  return s.objects;
}

// Before each launch: no findings, no static object touched yet.
inline void start_launch() {
  State& s = state();
  s.findings.clear();
  s.count = 0;
  std::fill(s.touched.begin(), s.touched.end(), 0);
}

// Before each block: NaN in every static shared object; a fresh shadow for the dynamic memory.
inline void start_block(unsigned x, unsigned y, unsigned z, const std::vector<unsigned char>& dynamic,
                        size_t dynamic_bytes, const int* generation) {
  State& s = state();
  for (const Object& o : static_objects()) std::memset(reinterpret_cast<void*>(o.begin), 0xff, o.size);
  if (!enabled()) return;
  ++s.block_serial;  // older accesses in the shadow now belong to another block: ignored
  s.dynamic_begin = reinterpret_cast<uintptr_t>(dynamic.data());
  s.dynamic_end = s.dynamic_begin + dynamic_bytes;  // what the launch asked for; the rest is slack
  s.dynamic_slack_end = s.dynamic_begin + dynamic.size();
  if (s.shadow.size() < s.static_bytes + dynamic.size()) s.shadow.resize(s.static_bytes + dynamic.size());
  s.generation = generation;
  s.block[0] = x, s.block[1] = y, s.block[2] = z;
}

// "file:line" of a code address (addr2line on the shared object), or the object and offset
inline std::string source_line(const void* pc) {
  Dl_info info;
  if (pc == nullptr || !dladdr(pc, &info) || info.dli_fname == nullptr) return "?";
  char offset[32];
  // the return address is the instruction after the call to the check: step back into the call
  std::snprintf(offset, sizeof offset, "0x%lx",
                static_cast<unsigned long>(reinterpret_cast<uintptr_t>(pc) - reinterpret_cast<uintptr_t>(info.dli_fbase) - 1));
  // with -i the first line is the innermost inlined frame: the access itself, unless that is one of
  // cuda_common.cuh's intrinsic wrappers (cp.async), whose caller is the line worth naming
  const std::string frames = run(std::string("addr2line -i -e '") + info.dli_fname + "' " + offset + " 2>/dev/null");
  std::string line = frames.substr(0, frames.find('\n'));
  for (size_t at = 0; line.find("cuda_common.cuh:") != std::string::npos && at != std::string::npos;) {
    at = frames.find('\n', at);
    if (at == std::string::npos || at + 1 >= frames.size()) break;
    ++at;
    line = frames.substr(at, frames.find('\n', at) - at);
  }
  if (line.empty() || line[0] == '?') return std::string(info.dli_fname) + "+" + offset;
  const size_t slash = line.rfind('/', line.find(':'));
  return slash == std::string::npos ? line : line.substr(slash + 1);
}

inline std::string where(const void* pc) {
  static std::map<const void*, std::string> known;  // addr2line reads the debug info: once per address
  if (auto it = known.find(pc); it != known.end()) return it->second;
  return known[pc] = source_line(pc);
}

inline void report(const std::string& what) {
  State& s = state();
  if (++s.count > 4) return;
  char head[96];
  std::snprintf(head, sizeof head, "cuda emulator, block (%u, %u, %u): ", s.block[0], s.block[1], s.block[2]);
  s.findings += (s.findings.empty() ? "" : "\n") + std::string(head) + what;
}

// whether access `a` is ordered before `now` (by a barrier, or by being the same thread's)
SHAREDLLM_UNCHECKED inline bool ordered(const Access& a, const Access& now) {
  return a.block != now.block || a.thread == now.thread || a.epoch < now.epoch ||
         (a.thread / 32 == now.thread / 32 && a.warp_epoch < now.warp_epoch);
}

inline void race(const char* kind, const Access& first, const Access& now, uintptr_t address) {
  char text[160];
  std::snprintf(text, sizeof text, "shared-memory race (%s) at 0x%lx: thread %d at ", kind,
                static_cast<unsigned long>(address), first.thread);
  report(std::string(text) + where(first.pc) + ", thread " + std::to_string(now.thread) + " at " + where(now.pc) +
         ", with no barrier between them");
}

// The shadow byte of a shared-memory address, or null for any other memory.
SHAREDLLM_UNCHECKED inline Byte* shadow_of(State& s, uintptr_t address) {
  if (address >= s.dynamic_begin && address < s.dynamic_end) return &s.shadow[s.static_bytes + (address - s.dynamic_begin)];
  if (address < s.static_low || address >= s.static_high) return nullptr;  // global memory or a stack
  auto it = std::upper_bound(s.objects.begin(), s.objects.end(), address,
                             [](uintptr_t a, const Object& o) { return a < o.begin; });
  if (it == s.objects.begin()) return nullptr;
  --it;
  if (address >= it->begin + it->size) return nullptr;
  s.touched[it - s.objects.begin()] = 1;
  return &s.shadow[it->shadow + (address - it->begin)];
}

// The running thread's access at `pc`, in its current block and warp epochs.
SHAREDLLM_UNCHECKED inline Access access_now(const State& s, const void* pc) {
  return Access{s.block_serial, s.thread, static_cast<uint32_t>(s.generation[0]),
                static_cast<uint32_t>(s.generation[1 + s.thread / 32]), pc};
}

SHAREDLLM_UNCHECKED inline void on_access(uintptr_t address, size_t size, bool write,
                                                           const void* pc) {
  State& s = state();
  if (!s.active || s.busy) return;
  s.busy = true;
  const Access now = access_now(s, pc);
  // an access never straddles two shared objects: one lookup, then its bytes' consecutive shadows
  Byte* first = shadow_of(s, address);
  uintptr_t end = address + size;
  if ((address >= s.dynamic_begin && address < s.dynamic_end && end > s.dynamic_end) ||
      (address >= s.dynamic_end && address < s.dynamic_slack_end)) {
    char text[128];
    std::snprintf(text, sizeof text, "access of %zu bytes at 0x%lx by thread %d runs past the dynamic shared memory, at ",
                  size, static_cast<unsigned long>(address), s.thread);
    report(text + where(pc));
    end = s.dynamic_end;
  }
  bool reported = false;  // one report per access, not one per byte
  auto check = [&](const char* kind, const Access& first_access, uintptr_t a) {
    if (!reported) race(kind, first_access, now, a);
    reported = true;
  };
  for (uintptr_t a = address; first != nullptr && a < end; ++a) {
    Byte* byte = first + (a - address);
    if (!ordered(byte->write, now)) check(write ? "write after write" : "read after write", byte->write, a);
    if (write) {
      for (const Access& r : byte->reads)
        if (!ordered(r, now)) check("write after read", r, a);
      byte->write = now;
      byte->reads[0] = byte->reads[1] = Access{};
      continue;
    }
    // keep the reads a later write could race with: this thread's latest, else a slot whose read is
    // ordered before this one, else (two concurrent readers) the slot of this thread's warp, so
    // that reads from two warps stay
    Access* slot = nullptr;
    for (Access& r : byte->reads)
      if (r.block == now.block && r.thread == now.thread) slot = &r;
    if (slot == nullptr) slot = ordered(byte->reads[0], now) ? &byte->reads[0] : ordered(byte->reads[1], now) ? &byte->reads[1]
                                : byte->reads[0].thread / 32 == now.thread / 32 ? &byte->reads[0] : &byte->reads[1];
    *slot = now;
  }
  s.busy = false;
}

// A cp.async copy of `size` bytes issued in block epoch `issued` lands now: any access to its bytes
// by another thread since that epoch could have met the copy half done (a read before the issuing
// thread's wait and a barrier, a write the copy then overwrote). The landing is then this thread's write.
SHAREDLLM_UNCHECKED inline void async_copy_lands(uintptr_t address, size_t size, int issued, const void* pc) {
  State& s = state();
  if (!s.active || s.busy) return;
  s.busy = true;
  const Access now = access_now(s, pc);
  Byte* first = shadow_of(s, address);
  bool reported = false;
  auto in_flight = [&](const Access& a) {
    return a.block == now.block && a.thread >= 0 && a.thread != now.thread && a.epoch >= static_cast<uint32_t>(issued);
  };
  for (size_t i = 0; first != nullptr && i < size; ++i) {
    Byte* byte = first + i;
    for (const Access* a : {&byte->write, &byte->reads[0], &byte->reads[1]})
      if (!reported && in_flight(*a)) {
        race("access while a cp.async to it was in flight", *a, now, address + i);
        reported = true;
      }
    byte->write = now;
    byte->reads[0] = byte->reads[1] = Access{};
  }
  s.busy = false;
}

// What -fsanitize=alignment passes for an access through a pointer its type's alignment does not
// hold (the layout of UBSan's TypeMismatchData and TypeDescriptor).
struct SourceLocation {
  const char* file;
  uint32_t line, column;
};
struct TypeDescriptor {
  uint16_t kind, info;
  char name[1];
};
struct TypeMismatch {
  SourceLocation location;
  const TypeDescriptor* type;
  unsigned char log_alignment, check_kind;
};

SHAREDLLM_UNCHECKED inline void misaligned(const TypeMismatch* data, uintptr_t address) {
  State& s = state();
  if (!s.active || s.busy || address == 0) return;
  s.busy = true;
  static const char* const kinds[] = {"load of", "store to", "reference to", "member access within",
                                      "member call on"};
  const char* file = data->location.file ? data->location.file : "?";
  if (const char* slash = std::strrchr(file, '/')) file = slash + 1;
  char text[320];
  std::snprintf(text, sizeof text, "misaligned %s %s (needs %u-byte alignment) at 0x%lx by thread %d at %s:%u",
                data->check_kind < 5 ? kinds[data->check_kind] : "access to", data->type->name,
                1u << data->log_alignment, static_cast<unsigned long>(address), s.thread, file, data->location.line);
  report(text);
  s.busy = false;
  trap_fiber();  // the GPU would fault: the access never happens
}

// The bytes of the static shared objects the launch has touched so far.
inline size_t touched_static_bytes() {
  State& s = state();
  size_t bytes = 0;
  for (size_t i = 0; i < s.touched.size(); ++i) bytes += s.touched[i] ? s.objects[i].size : 0;
  return bytes;
}

}  // namespace emulator::checks

#ifdef SHAREDLLM_EMULATOR_CHECKS
// The calls -fsanitize=thread inserts, served here instead of by the ThreadSanitizer runtime
// (which is not linked): every load and store goes to on_access; atomics do what they say.
// Weak: every harness translation unit has them.
#define SHAREDLLM_EMULATOR_EXPORT extern "C" __attribute__((weak)) SHAREDLLM_UNCHECKED
#define SHAREDLLM_EMULATOR_ACCESS(size)                                                          \
  SHAREDLLM_EMULATOR_EXPORT void __tsan_read##size(void* a) {                                    \
    emulator::checks::on_access(reinterpret_cast<uintptr_t>(a), size, false, __builtin_return_address(0)); \
  }                                                                                              \
  SHAREDLLM_EMULATOR_EXPORT void __tsan_write##size(void* a) {                                   \
    emulator::checks::on_access(reinterpret_cast<uintptr_t>(a), size, true, __builtin_return_address(0));  \
  }                                                                                              \
  SHAREDLLM_EMULATOR_EXPORT void __tsan_unaligned_read##size(void* a) {                          \
    emulator::checks::on_access(reinterpret_cast<uintptr_t>(a), size, false, __builtin_return_address(0)); \
  }                                                                                              \
  SHAREDLLM_EMULATOR_EXPORT void __tsan_unaligned_write##size(void* a) {                         \
    emulator::checks::on_access(reinterpret_cast<uintptr_t>(a), size, true, __builtin_return_address(0));  \
  }
SHAREDLLM_EMULATOR_ACCESS(1)
SHAREDLLM_EMULATOR_ACCESS(2)
SHAREDLLM_EMULATOR_ACCESS(4)
SHAREDLLM_EMULATOR_ACCESS(8)
SHAREDLLM_EMULATOR_ACCESS(16)
#undef SHAREDLLM_EMULATOR_ACCESS
SHAREDLLM_EMULATOR_EXPORT void __tsan_read_range(void* a, uintptr_t n) {
  emulator::checks::on_access(reinterpret_cast<uintptr_t>(a), n, false, __builtin_return_address(0));
}
SHAREDLLM_EMULATOR_EXPORT void __tsan_write_range(void* a, uintptr_t n) {
  emulator::checks::on_access(reinterpret_cast<uintptr_t>(a), n, true, __builtin_return_address(0));
}
SHAREDLLM_EMULATOR_EXPORT void __tsan_init() {}
SHAREDLLM_EMULATOR_EXPORT void __tsan_func_entry(void*) {}
SHAREDLLM_EMULATOR_EXPORT void __tsan_func_exit() {}
SHAREDLLM_EMULATOR_EXPORT void __tsan_vptr_update(void**, void*) {}
SHAREDLLM_EMULATOR_EXPORT void __tsan_vptr_read(void**) {}
// the atomics the torch headers use, sequentially consistent whatever order was asked for
#define SHAREDLLM_EMULATOR_ATOMICS(bits, type)                                                         \
  SHAREDLLM_EMULATOR_EXPORT type __tsan_atomic##bits##_load(const volatile type* a, int) {             \
    return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                                       \
  }                                                                                                    \
  SHAREDLLM_EMULATOR_EXPORT void __tsan_atomic##bits##_store(volatile type* a, type v, int) {          \
    __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                                          \
  }                                                                                                    \
  SHAREDLLM_EMULATOR_EXPORT type __tsan_atomic##bits##_exchange(volatile type* a, type v, int) {       \
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                                \
  }                                                                                                    \
  SHAREDLLM_EMULATOR_EXPORT type __tsan_atomic##bits##_fetch_add(volatile type* a, type v, int) {      \
    return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                                                 \
  }                                                                                                    \
  SHAREDLLM_EMULATOR_EXPORT type __tsan_atomic##bits##_fetch_sub(volatile type* a, type v, int) {      \
    return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);                                                 \
  }                                                                                                    \
  SHAREDLLM_EMULATOR_EXPORT int __tsan_atomic##bits##_compare_exchange_strong(volatile type* a, type* expected, \
                                                                             type v, int, int) {       \
    return __atomic_compare_exchange_n(a, expected, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);     \
  }
SHAREDLLM_EMULATOR_ATOMICS(8, uint8_t)
SHAREDLLM_EMULATOR_ATOMICS(16, uint16_t)
SHAREDLLM_EMULATOR_ATOMICS(32, uint32_t)
SHAREDLLM_EMULATOR_ATOMICS(64, uint64_t)
#undef SHAREDLLM_EMULATOR_ATOMICS
SHAREDLLM_EMULATOR_EXPORT void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
// and the call -fsanitize=alignment makes for a misaligned pointer, for UBSan's runtime
SHAREDLLM_EMULATOR_EXPORT void __ubsan_handle_type_mismatch_v1(void* data, uintptr_t address) {
  emulator::checks::misaligned(static_cast<const emulator::checks::TypeMismatch*>(data), address);
}
SHAREDLLM_EMULATOR_EXPORT void __ubsan_handle_type_mismatch_v1_abort(void* data, uintptr_t address) {
  emulator::checks::misaligned(static_cast<const emulator::checks::TypeMismatch*>(data), address);
}
#undef SHAREDLLM_EMULATOR_EXPORT
#endif
