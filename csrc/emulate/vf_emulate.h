// CPU emulation of the CUDA subset that csrc/contrastive.cu uses, so that the *same device source*
// can be compiled by a host C++ compiler (-DVF_EMULATE) and run on a machine without a GPU.
//
// What is emulated, from the PTX ISA's documented semantics:
//   * a CTA: one cooperative context per CUDA thread (hand-written x86-64 context switch), run
//     round-robin; __syncthreads is a CTA barrier, warp collectives are barriers of the warp's lanes.
//     A barrier no thread can pass (divergent __syncthreads, a lane missing from a collective) is
//     reported as a deadlock.
//   * __shfl_xor_sync; ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 (per-lane row addresses ->
//     per-lane fragments); mma.sync m16n8k16 (f16 / bf16) and m16n8k8 (tf32, low 13 mantissa bits
//     ignored as the hardware does) with fp32 accumulation (products summed exactly in double, one
//     rounding per instruction); cvt.rna.tf32.f32.
//   * cp.async.cg 16-byte copies with zero fill, commit_group, wait_group N.  Mode "lazy" (default)
//     performs the copies only when a wait_group retires their group, so reading staged data
//     before waiting for it yields the poison below; mode "eager" copies at issue (overwriting a
//     buffer other threads still read shows up there).  VF_EMU_CPASYNC=eager|lazy.
//   * dynamic shared memory: filled with 0xFF bytes (NaN as fp32 / fp16 / bf16) before each block,
//     guarded by canaries on both sides; ldmatrix / cp.async addresses are checked to lie inside it
//     and be 16-byte aligned; cp.async sources must be 16-byte aligned.
// Not emulated: the memory model beyond barriers, timing, bank conflicts, registers / spills (the
// audit reads those from ptxas), and the hardware's exact accumulation rounding.  The fragment
// layouts are this file's reading of the PTX ISA: a misreading shared by the kernels and this file
// would not be caught here (only on a GPU, by the same tests with VALOR_FAST_TEST_DEVICE=cuda).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <deque>
#include <tuple>
#include <vector>

#if !defined(__x86_64__)
#error "the csrc emulator needs x86-64 (its context switch is written for the SysV ABI)"
#endif

extern "C" void vf_emu_switch(void** save_sp, void* load_sp);
// save the callee-saved registers on the current stack, store its pointer in *save_sp, switch to
// load_sp and restore its registers (the System V x86-64 ABI preserves rbx, rbp, r12-r15).
asm(R"(
.text
.hidden vf_emu_switch
.globl vf_emu_switch
.type vf_emu_switch,@function
vf_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size vf_emu_switch,.-vf_emu_switch
)");

namespace vf_emu {

struct Idx3 { unsigned x, y, z; };

struct CpOp { void* dst; const void* src; int bytes; };

constexpr size_t kStack = 256 * 1024;
constexpr size_t kCanary = 256;
constexpr int kMaxThreads = 1024;

struct Thread {
  void* sp = nullptr;
  int tid = 0;
  bool done = false;
  std::vector<CpOp> open;               // issued, not yet committed
  std::deque<std::vector<CpOp>> groups;  // committed, not yet retired
};

struct Block {
  unsigned bx = 0, by = 0;
  int nthreads = 0;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  int bar_arrived = 0;
  long bar_gen = 0;
  int warp_arrived[kMaxThreads / 32] = {};
  long warp_gen[kMaxThreads / 32] = {};
  uint32_t xchg[kMaxThreads / 32][32][6] = {};
  const void* xptr[kMaxThreads / 32][32] = {};
  long events = 0;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
};

inline Block* g_blk = nullptr;
inline Thread* g_cur = nullptr;
inline void* g_sched_sp = nullptr;
inline std::vector<Thread> g_threads;
inline std::vector<unsigned char*> g_stacks;
inline const char* g_fail = nullptr;

[[noreturn]] inline void die(const char* what) {
  fprintf(stderr, "[vf_emulate] %s (block %u,%u thread %d)\n", what, g_blk ? g_blk->bx : 0u, g_blk ? g_blk->by : 0u,
          g_cur ? g_cur->tid : -1);
  abort();
}

inline bool g_lazy = true;  // read from VF_EMU_CPASYNC at each launch
inline bool lazy_cp_async() { return g_lazy; }
inline int num_sms() {
  const char* s = getenv("VF_EMU_SMS");
  return s ? atoi(s) : 108;
}

inline Idx3 thread_idx() { return Idx3{(unsigned)g_cur->tid, 0u, 0u}; }
inline Idx3 block_idx() { return Idx3{g_blk->bx, g_blk->by, 0u}; }
inline Idx3 block_dim() { return Idx3{(unsigned)g_blk->nthreads, 1u, 1u}; }
inline unsigned char* dyn_smem() { return g_blk->smem; }

inline void yield() { vf_emu_switch(&g_cur->sp, g_sched_sp); }

inline void block_sync() {
  Block& B = *g_blk;
  const long gen = B.bar_gen;
  ++B.events;
  if (++B.bar_arrived == B.nthreads) {
    B.bar_arrived = 0;
    ++B.bar_gen;
    return;
  }
  while (B.bar_gen == gen) yield();
}

inline void warp_sync() {
  Block& B = *g_blk;
  const int w = g_cur->tid / 32;
  const int lanes = B.nthreads - 32 * w < 32 ? B.nthreads - 32 * w : 32;
  const long gen = B.warp_gen[w];
  ++B.events;
  if (++B.warp_arrived[w] == lanes) {
    B.warp_arrived[w] = 0;
    ++B.warp_gen[w];
    return;
  }
  while (B.warp_gen[w] == gen) yield();
}

template <typename T>
inline T shfl_xor(T v, int o) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  Block& B = *g_blk;
  const int w = g_cur->tid / 32, l = g_cur->tid % 32;
  memcpy(&B.xchg[w][l][0], &v, 4);
  warp_sync();
  T r;
  memcpy(&r, &B.xchg[w][l ^ o][0], 4);
  warp_sync();
  return r;
}

inline void check_smem(const void* p, size_t n, const char* what) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  if (c < g_blk->smem || c + n > g_blk->smem + g_blk->smem_bytes) die(what);
  if (((uintptr_t)c & 15u) != 0) die("misaligned shared-memory address (needs 16 bytes)");
}

// ldmatrix .x4: lanes 8i .. 8i+7 give the row addresses of matrix i; lane l receives, from each
// matrix, the pair (row l/4, columns 2(l%4), 2(l%4)+1) or, transposed, (rows 2(l%4), 2(l%4)+1, column l/4)
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p, bool trans) {
  Block& B = *g_blk;
  const int w = g_cur->tid / 32, l = g_cur->tid % 32;
  check_smem(p, 16, "ldmatrix row address outside shared memory");
  B.xptr[w][l] = p;
  warp_sync();
  const int g = l >> 2, t = l & 3;
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    if (!trans) {
      const uint16_t* row = static_cast<const uint16_t*>(B.xptr[w][8 * i + g]);
      lo = row[2 * t];
      hi = row[2 * t + 1];
    } else {
      lo = static_cast<const uint16_t*>(B.xptr[w][8 * i + 2 * t])[g];
      hi = static_cast<const uint16_t*>(B.xptr[w][8 * i + 2 * t + 1])[g];
    }
    r[i] = (uint32_t)lo | ((uint32_t)hi << 16);
  }
  warp_sync();
}

inline float h16_to_f(uint16_t v, bool bf16) {
  if (bf16) {
    const uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
  }
  __half h;
  memcpy(&h, &v, 2);
  return __half2float(h);
}

// mma.m16n8k16: A (16 x 16) regs {a0a1, a2a3, a4a5, a6a7} = rows (g, g+8, g, g+8) x columns
// (2t.., 2t.., 2t+8.., 2t+8..); B (16 x 8) regs {b0b1, b2b3} = rows (2t.., 2t+8..) x column g;
// C (16 x 8) c0..c3 = (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)
inline void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], bool bf16) {
  Block& B = *g_blk;
  const int w = g_cur->tid / 32, l = g_cur->tid % 32;
  for (int i = 0; i < 4; ++i) B.xchg[w][l][i] = a[i];
  B.xchg[w][l][4] = b[0];
  B.xchg[w][l][5] = b[1];
  warp_sync();
  const int g = l >> 2, t = l & 3;
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
    double s = 0.0;
    for (int k = 0; k < 16; ++k) {
      const uint32_t ar = B.xchg[w][(row % 8) * 4 + (k % 8) / 2][(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)];
      const uint32_t br = B.xchg[w][col * 4 + (k % 8) / 2][4 + (k >= 8 ? 1 : 0)];
      const float av = h16_to_f((uint16_t)(ar >> (16 * (k & 1))), bf16);
      const float bv = h16_to_f((uint16_t)(br >> (16 * (k & 1))), bf16);
      s += (double)av * (double)bv;
    }
    c[e] = (float)((double)c[e] + s);
  }
  warp_sync();
}

inline float tf32_bits(uint32_t u) {
  u &= ~0x1fffu;  // the tensor core reads 10 mantissa bits
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// mma.m16n8k8 tf32: A regs (g, t), (g+8, t), (g, t+4), (g+8, t+4); B regs (t, g), (t+4, g)
inline void mma_m16n8k8_tf32(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  Block& B = *g_blk;
  const int w = g_cur->tid / 32, l = g_cur->tid % 32;
  for (int i = 0; i < 4; ++i) B.xchg[w][l][i] = a[i];
  B.xchg[w][l][4] = b[0];
  B.xchg[w][l][5] = b[1];
  warp_sync();
  const int g = l >> 2, t = l & 3;
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
    double s = 0.0;
    for (int k = 0; k < 8; ++k) {
      const float av = tf32_bits(B.xchg[w][(row % 8) * 4 + k % 4][(row >= 8 ? 1 : 0) + (k >= 4 ? 2 : 0)]);
      const float bv = tf32_bits(B.xchg[w][col * 4 + k % 4][4 + (k >= 4 ? 1 : 0)]);
      s += (double)av * (double)bv;
    }
    c[e] = (float)((double)c[e] + s);
  }
  warp_sync();
}

// cvt.rna.tf32.f32: round to nearest, ties away from zero, keeping 10 mantissa bits
inline uint32_t cvt_rna_tf32(float x) {
  uint32_t u;
  memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) == 0x7f800000u) return u & ~0x1fffu;  // inf / nan
  return (u + 0x1000u) & ~0x1fffu;
}

inline void apply(const CpOp& op) {
  unsigned char* d = static_cast<unsigned char*>(op.dst);
  if (op.bytes > 0) memcpy(d, op.src, (size_t)op.bytes);
  if (op.bytes < 16) memset(d + op.bytes, 0, (size_t)(16 - op.bytes));
}
inline void cp_async16(void* dst, const void* src, int bytes) {
  check_smem(dst, 16, "cp.async destination outside shared memory");
  if (bytes < 0 || bytes > 16) die("cp.async src-size out of range");
  if (bytes > 0 && ((uintptr_t)src & 15u) != 0) die("cp.async 16-byte source not 16-byte aligned");
  const CpOp op{dst, src, bytes};
  if (lazy_cp_async()) g_cur->open.push_back(op); else apply(op);
}
inline void cp_async_commit() {
  g_cur->groups.emplace_back(std::move(g_cur->open));
  g_cur->open.clear();
}
inline void cp_async_wait(int n) {
  while ((int)g_cur->groups.size() > n) {
    for (const CpOp& op : g_cur->groups.front()) apply(op);
    g_cur->groups.pop_front();
  }
}

inline void trampoline() {
  g_blk->body(g_blk->body_arg);
  g_cur->done = true;
  ++g_blk->events;
  vf_emu_switch(&g_cur->sp, g_sched_sp);
  die("finished context resumed");
}

inline void run_block(Block& B) {
  if (B.nthreads < 1 || B.nthreads > kMaxThreads) die("bad block size");
  while ((int)g_stacks.size() < B.nthreads) g_stacks.push_back(static_cast<unsigned char*>(malloc(kStack)));
  g_threads.assign((size_t)B.nthreads, Thread{});
  for (int i = 0; i < B.nthreads; ++i) {
    Thread& th = g_threads[(size_t)i];
    th.tid = i;
    uintptr_t top = ((uintptr_t)(g_stacks[(size_t)i] + kStack)) & ~(uintptr_t)15;
    void** sp = reinterpret_cast<void**>(top - 64);  // 6 callee-saved slots, entry, a fake return
    for (int k = 0; k < 6; ++k) sp[k] = nullptr;
    sp[6] = reinterpret_cast<void*>(&trampoline);
    sp[7] = nullptr;
    th.sp = sp;
  }
  g_blk = &B;
  int left = B.nthreads;
  while (left > 0) {
    const long before = B.events;
    for (int i = 0; i < B.nthreads; ++i) {
      Thread& th = g_threads[(size_t)i];
      if (th.done) continue;
      g_cur = &th;
      vf_emu_switch(&g_sched_sp, th.sp);
      if (th.done) --left;
    }
    if (left > 0 && B.events == before) die("deadlock: no thread can pass its barrier");
  }
  g_cur = nullptr;
}

template <typename K, typename... Args>
int launch(K kernel, unsigned gx, unsigned gy, int threads, size_t smem_bytes, Args... args) {
  struct Pack {
    K k;
    std::tuple<Args...> a;
  } pack{kernel, std::tuple<Args...>(args...)};
  const char* mode = getenv("VF_EMU_CPASYNC");
  g_lazy = !(mode && strcmp(mode, "eager") == 0);
  std::vector<unsigned char> buf(smem_bytes + 2 * kCanary + 128);
  unsigned char* base = buf.data() + ((128 - ((uintptr_t)buf.data() & 127)) & 127);
  for (unsigned by = 0; by < gy; ++by)
    for (unsigned bx = 0; bx < gx; ++bx) {
      Block* B = new Block();  // large (exchange buffers): on the heap
      B->bx = bx;
      B->by = by;
      B->nthreads = threads;
      memset(base, 0xA5, kCanary);
      B->smem = base + kCanary;
      B->smem_bytes = smem_bytes;
      memset(B->smem, 0xFF, smem_bytes);  // NaN in every float format
      memset(B->smem + smem_bytes, 0xA5, kCanary);
      B->body = [](void* p) {
        Pack* pk = static_cast<Pack*>(p);
        std::apply(pk->k, pk->a);
      };
      B->body_arg = &pack;
      run_block(*B);
      for (size_t i = 0; i < kCanary; ++i)
        if (base[i] != 0xA5 || B->smem[smem_bytes + i] != 0xA5) die("shared memory written out of bounds");
      delete B;
      g_blk = nullptr;
    }
  return 0;
}

}  // namespace vf_emu

#undef __launch_bounds__
#define __launch_bounds__(...)
#undef threadIdx
#undef blockIdx
#undef blockDim
#define threadIdx (vf_emu::thread_idx())
#define blockIdx (vf_emu::block_idx())
#define blockDim (vf_emu::block_dim())
#define __syncthreads() vf_emu::block_sync()
#define __shfl_xor_sync(mask, v, o) vf_emu::shfl_xor((v), (o))

inline float vf_uint_as_float(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}
#define __uint_as_float(u) vf_uint_as_float(u)

// the CUDA runtime calls the host code makes, on the CPU
extern "C" {
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }
cudaError_t cudaDeviceGetAttribute(int* v, enum cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMultiProcessorCount ? vf_emu::num_sms() : 232448;
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void*, enum cudaFuncAttribute, int) { return cudaSuccess; }
cudaError_t cudaMallocAsync(void** p, size_t n, cudaStream_t) {
  *p = malloc(n ? n : 1);
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
cudaError_t cudaFreeAsync(void* p, cudaStream_t) { free(p); return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error (emulated)" : "error (emulated)"; }
}
