// valor-fast: contrastive (MGA) losses in plain CUDA C++ with a C ABI, on tensor cores.
// Loaded through ctypes by valor_fast/ops/_cuda.py; no torch headers, so it builds where only nvcc
// exists.  Same algorithms and numerics as the Triton kernels in kernels/contrastive.py (read that
// docstring first); every matrix product runs on `mma.sync` (HMMA on sm_80 and sm_90a).
//
//   coarse   vf_coarse_lse:  per row i of A, lse_i = logsumexp_j (A_i . B_j / tau) and the label logit
//                            z_{i, i+off}.  128 x 64 z tiles, online (max, sum) per row.  When the row
//                            blocks alone cannot fill the GPU (B = 4096 gives 32 of them for 108-132
//                            SMs) the columns are split over blockIdx.y and a second kernel merges the
//                            partial (max, sum) pairs in a fixed order (deterministic; the workspace
//                            is stream-ordered cudaMallocAsync memory, 12 bytes per row and split).
//            vf_coarse_grad: dA[i, :] = scale * sum_j P_ij B[j, :] with the z tile recomputed and
//                            P_ij = exp(z - lse_a_i) + exp(z - lse_b_j) - coef [j == i + off];
//                            tsum_i = sum_j P_ij z_ij (temperature gradient).  One block owns 64 rows
//                            and 512 output columns (all of D = 512), so z is computed ONCE per tile;
//                            the Triton kernel splits D into 128-column blocks and recomputes z 4x.
//   fine     vf_fine_fwd:    one block = AT texts x BB clips packed into one (AT*T) x (BB*S) token-sim
//                            tile (T = 40, S = 4 frames + 1 audio: 3 texts x 12 clips = 120 x 60 of a
//                            128 x 64 tile, 12% padding); the three groups (x, y, x++y) come out of one
//                            read of the features.
//            vf_fine_bwd:    recomputes the sim tile and its argmaxes (first index on ties, like torch),
//                            builds d_sim in shared memory and multiplies it by the features: one kernel
//                            for d_text (+ text weight grads) per (text, 512 D columns) looping over clip
//                            blocks, one for d_modal (+ modal weight grads) per (clip block, 512 D
//                            columns) looping over text blocks.  No atomics: every sum has one owner and
//                            a fixed order, so results are bitwise deterministic.
//
// Numerics (the Triton path's intent):
//   * feature products (z, token sims): 16-bit operands as-is (exact products, fp32 accumulation,
//     mma m16n8k16); fp32 operands as 3xTF32 (big/small tf32 split, three m16n8k8 MMAs: fp32-grade,
//     like Triton's "tf32x3" when torch disallows tf32).  The C ABI has no precision flag, so fp32 is
//     never plain tf32 here.
//   * gradient products (fp32 P / d_sim times 16-bit features): P is split into a 16-bit hi and lo
//     part (two MMAs).  A single rounding of P was measured (float64 emulation, fresh seeds, the
//     tests' bound of 2x eager's error) to fail 1-3.5% of the odd-shape cases, because eager's only
//     error is the final output rounding; hi + lo never did.  fp16 P / d_sim are pre-scaled by a power
//     of two (a bound computed per block) so small probabilities do not flush to zero; bf16 has fp32's
//     exponent range and needs none.
//   * softmax statistics, maxima and all reductions in fp32; expf / logf (not the fast intrinsics).
//
// Layouts (all contiguous, row-major): A, B (R, D); text (Bt, T, D); x (Bm, Mx, D); y (Bm, My, D);
// wt (Bt, T) fp32 softmaxed weights, 0 at padding; tmask (Bt, T) u8; mw (G, Bm, S) fp32 per-group
// softmaxed slot weights (G = 1: x only, G = 3: x, y, x++y); mmask (Bm, S) u8; S / dS (G, Bt, Bm).
// dtype codes: 0 = fp32, 1 = fp16, 2 = bf16.  Every entry point returns a cudaError_t as int.
// Operands are staged with 16-byte cp.async when every base pointer is 16-byte aligned and
// D * sizeof(elem) % 16 == 0 (true for D = 512); otherwise with element loads (any D, any offset).
//
// Untimed: no GPU was available to the session that wrote this (compiled for sm_80 / sm_90a and
// audited with bench/kernel_audit.py: registers, spills, shared memory, HMMA present).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include <atomic>
#include <type_traits>

// VF_EMULATE: the same source compiled for the CPU by a host C++ compiler (csrc/emulate/vf_emulate.h:
// CUDA threads as cooperative contexts, the PTX below replaced by emulations of its documented
// semantics).  tests/test_csrc_emulated.py runs the float64 checks through it; see that file for
// what it can and cannot prove.
#ifdef VF_EMULATE
#include "emulate/vf_emulate.h"
#endif

#if defined(__GNUC__)
#define VF_API __attribute__((visibility("default")))
#else
#define VF_API
#endif

namespace {

constexpr int NT8 = 256;  // threads of the 8-warp kernels

// ---------------------------------------------------------------------------------------------
// element helpers
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float to_f(float x) { return x; }  // NOLINT: fp32 GradTile
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

constexpr size_t align128(size_t n) { return (n + 127) / 128 * 128; }
constexpr size_t cmax(size_t a, size_t b) { return a > b ? a : b; }

// ---------------------------------------------------------------------------------------------
// PTX wrappers (sm_80+)
// ---------------------------------------------------------------------------------------------
#ifndef VF_EMULATE
__device__ __forceinline__ uint32_t smem_u32(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

// the block's dynamic shared memory
__device__ __forceinline__ unsigned char* dyn_smem() {
  extern __shared__ __align__(128) unsigned char smem_dyn[];
  return smem_dyn;
}

// 16-byte async copy global -> shared; bytes < 16 zero-fills the rest (0: a pure zero fill, src unread)
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}
template <typename H>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same<H, __nv_bfloat16>::value) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}
__device__ __forceinline__ void mma1688tf32(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#else
__device__ __forceinline__ unsigned char* dyn_smem() { return vf_emu::dyn_smem(); }
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int bytes) { vf_emu::cp_async16(dst, src, bytes); }
__device__ __forceinline__ void cp_async_commit() { vf_emu::cp_async_commit(); }
template <int N> __device__ __forceinline__ void cp_async_wait() { vf_emu::cp_async_wait(N); }
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) { vf_emu::ldmatrix_x4(r, p, false); }
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) { vf_emu::ldmatrix_x4(r, p, true); }
__device__ __forceinline__ uint32_t to_tf32(float x) { return vf_emu::cvt_rna_tf32(x); }
template <typename H>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  vf_emu::mma_m16n8k16(c, a, b, std::is_same<H, __nv_bfloat16>::value);
}
__device__ __forceinline__ void mma1688tf32(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  vf_emu::mma_m16n8k8_tf32(c, a, b);
}
#endif

// ---------------------------------------------------------------------------------------------
// warp-level MMA traits.  Fragment layouts are PTX's (m16n8k16 for 16-bit, m16n8k8 for tf32), with
// g = lane / 4, t = lane % 4:  A (16 x K, row-major): rows g and g + 8;  B (K x 8): column g;
// C (16 x 8): c0, c1 = (g, 2t), (g, 2t + 1); c2, c3 = (g + 8, 2t), (g + 8, 2t + 1).
// Shared-memory operand layouts:  lda: A at (m0, k0) of [m][k];  ldb_nk2: two n8 B tiles at (n0, k0)
// of [n][k] (feature rows: the K = D axis contiguous);  ldb_kn2: two n8 B tiles at (k0, n0) of [k][n]
// (the gradient products' right operand, D contiguous).  Strides are chosen so that the 8 row
// addresses of each ldmatrix phase (or the 32 scalar reads of the fp32 path) hit distinct banks.
// ---------------------------------------------------------------------------------------------
template <typename H>
struct Mma16 {
  using E = H;
  static constexpr int KS = 16;
  struct A { uint32_t x[4]; };
  struct B { uint32_t x[2]; };
  __device__ static void lda(A& a, const E* p, int ld) {
    const int l = threadIdx.x & 31;
    // matrices: (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15)
    ldsm_x4(a.x, p + (l & 15) * ld + (l >> 4) * 8);
  }
  __device__ static void ldb_nk2(B& b0, B& b1, const E* p, int ld) {
    const int l = threadIdx.x & 31;
    // matrices: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
    uint32_t r[4];
    ldsm_x4(r, p + ((l & 7) + ((l >> 4) << 3)) * ld + ((l >> 3) & 1) * 8);
    b0.x[0] = r[0]; b0.x[1] = r[1]; b1.x[0] = r[2]; b1.x[1] = r[3];
  }
  __device__ static void ldb_kn2(B& b0, B& b1, const E* p, int ld) {
    const int l = threadIdx.x & 31;
    // row addresses are k rows; .trans hands thread (g, t) the elements (k = 2t, 2t+1; n = g)
    uint32_t r[4];
    ldsm_x4_t(r, p + ((l & 7) + (((l >> 3) & 1) << 3)) * ld + (l >> 4) * 8);
    b0.x[0] = r[0]; b0.x[1] = r[1]; b1.x[0] = r[2]; b1.x[1] = r[3];
  }
  __device__ static void mma(float (&c)[4], const A& a, const B& b) { mma16816<H>(c, a.x, b.x); }
};

// fp32 operands: 3xTF32.  x = big + small with big = tf32(x), small = tf32(x - big); the product
// a*b ~ a.small*b.big + a.big*b.small + a.big*b.big (the dropped small*small term is ~2^-22 |ab|).
struct MmaF32 {
  using E = float;
  static constexpr int KS = 8;
  struct A { uint32_t big[4], small[4]; };
  struct B { uint32_t big[2], small[2]; };
  __device__ static void split(float v, uint32_t& big, uint32_t& small) {
    big = to_tf32(v);
    small = to_tf32(v - __uint_as_float(big));
  }
  __device__ static void lda(A& a, const float* p, int ld) {
    const int l = threadIdx.x & 31, g = l >> 2, t = l & 3;
    split(p[g * ld + t], a.big[0], a.small[0]);
    split(p[(g + 8) * ld + t], a.big[1], a.small[1]);
    split(p[g * ld + t + 4], a.big[2], a.small[2]);
    split(p[(g + 8) * ld + t + 4], a.big[3], a.small[3]);
  }
  __device__ static void ldb_nk2(B& b0, B& b1, const float* p, int ld) {
    const int l = threadIdx.x & 31, g = l >> 2, t = l & 3;
    split(p[g * ld + t], b0.big[0], b0.small[0]);
    split(p[g * ld + t + 4], b0.big[1], b0.small[1]);
    split(p[(g + 8) * ld + t], b1.big[0], b1.small[0]);
    split(p[(g + 8) * ld + t + 4], b1.big[1], b1.small[1]);
  }
  __device__ static void ldb_kn2(B& b0, B& b1, const float* p, int ld) {
    const int l = threadIdx.x & 31, g = l >> 2, t = l & 3;
    split(p[t * ld + g], b0.big[0], b0.small[0]);
    split(p[(t + 4) * ld + g], b0.big[1], b0.small[1]);
    split(p[t * ld + g + 8], b1.big[0], b1.small[0]);
    split(p[(t + 4) * ld + g + 8], b1.big[1], b1.small[1]);
  }
  __device__ static void mma(float (&c)[4], const A& a, const B& b) {
    mma1688tf32(c, a.small, b.big);  // small terms first
    mma1688tf32(c, a.big, b.small);
    mma1688tf32(c, a.big, b.big);
  }
};

template <typename T> struct MmaOf { using type = Mma16<T>; };
template <> struct MmaOf<float> { using type = MmaF32; };

// ---------------------------------------------------------------------------------------------
// global -> shared staging: rows [0, NR) (row pointers in `rp`, null = zero row) x columns
// [k0, k0 + BK) into dst[r * LD + k]; columns >= D read as zero.  vec: 16-byte cp.async is legal
// (every row start 16-byte aligned and D a multiple of 16 bytes, so a piece is wholly in or out).
// ---------------------------------------------------------------------------------------------
template <typename E, int NR, int BK, int LD, int NTHR>
__device__ __forceinline__ void stage_rows(E* dst, const E* const* rp, int64_t k0, int64_t D, bool vec,
                                           const void* dummy) {
  constexpr int V = 16 / (int)sizeof(E), PR = BK / V;
  static_assert(BK % V == 0, "chunk width must be a multiple of 16 bytes");
  for (int q = threadIdx.x; q < NR * PR; q += NTHR) {
    const int r = q / PR, kk = (q % PR) * V;
    const E* p = rp[r];
    E* d = dst + r * LD + kk;
    const int64_t k = k0 + kk;
    if (vec) {
      const bool ok = p != nullptr && k < D;
      cp_async16(d, ok ? static_cast<const void*>(p + k) : dummy, ok ? 16 : 0);
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) d[e] = (p != nullptr && k + e < D) ? p[k + e] : from_f<E>(0.f);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Phase 1 of every kernel: acc (warp tile) = rows . cols^T over K = D, a 3-stage cp.async ring of
// 64-byte-wide K chunks (32 16-bit or 16 fp32 elements per row).  Warps form a WGM x WGN grid; a
// warp owns 32 rows x (COLS / WGN) columns.  Warp m-tiles at or beyond `rows_active` are skipped
// (T = 40 text rows in a 64-row tile).  Ends drained and synchronised: the ring may be reused.
// ---------------------------------------------------------------------------------------------
template <typename T, int ROWS, int COLS, int WGM, int WGN>
struct ZTile {
  using M = typename MmaOf<T>::type;
  using E = typename M::E;
  static constexpr int NTHR = WGM * WGN * 32, GN = WGN;
  static constexpr int BK = 64 / (int)sizeof(E);
  static constexpr int LD = BK + 16 / (int)sizeof(E);  // 80-byte rows: conflict-free ldmatrix / lds
  static constexpr int STAGES = 3;
  static constexpr int WM = ROWS / WGM, WN = COLS / WGN, MT = WM / 16, NT = WN / 8;
  static_assert(WM == 32 && WN % 16 == 0, "warp tile is 32 x (16k)");
  static constexpr size_t stage_elems = (size_t)(ROWS + COLS) * LD;
  static constexpr size_t bytes = STAGES * stage_elems * sizeof(E);

  __device__ static void load(E* ring, int chunk, const E* const* rowp, const E* const* colp, int64_t D, bool vec,
                              const void* dummy) {
    E* a = ring + (chunk % STAGES) * stage_elems;
    stage_rows<E, ROWS, BK, LD, NTHR>(a, rowp, (int64_t)chunk * BK, D, vec, dummy);
    stage_rows<E, COLS, BK, LD, NTHR>(a + ROWS * LD, colp, (int64_t)chunk * BK, D, vec, dummy);
  }

  __device__ static void run(float (&acc)[MT][NT][4], E* ring, const E* const* rowp, const E* const* colp,
                             int64_t D, bool vec, const void* dummy, int rows_active) {
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
    const int nk = (int)((D + BK - 1) / BK);
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < nk) load(ring, s, rowp, colp, D, vec, dummy);
      cp_async_commit();
    }
    const int warp = threadIdx.x >> 5, wm = warp / WGN, wn = warp % WGN;
    for (int kc = 0; kc < nk; ++kc) {
      cp_async_wait<STAGES - 2>();
      __syncthreads();  // chunk kc landed for every thread; chunk kc - 1's buffer is free
      if (kc + STAGES - 1 < nk) load(ring, kc + STAGES - 1, rowp, colp, D, vec, dummy);
      cp_async_commit();
      const E* As = ring + (kc % STAGES) * stage_elems + wm * WM * LD;
      const E* Bs = ring + (kc % STAGES) * stage_elems + (ROWS + wn * WN) * LD;
#pragma unroll
      for (int kk = 0; kk < BK; kk += M::KS) {
        typename M::B b[NT];
#pragma unroll
        for (int j = 0; j < NT / 2; ++j) M::ldb_nk2(b[2 * j], b[2 * j + 1], Bs + j * 16 * LD + kk, LD);
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          if (wm * WM + i * 16 >= rows_active) continue;  // warp-uniform
          typename M::A a;
          M::lda(a, As + i * 16 * LD + kk, LD);
#pragma unroll
          for (int j = 0; j < NT; ++j) M::mma(acc[i][j], a, b[j]);
        }
      }
    }
    cp_async_wait<0>();
    __syncthreads();
  }
};

// ---------------------------------------------------------------------------------------------
// The left operand of a gradient product: fp32 values (P or d_sim, ROWS x K) kept in shared memory
// as a 16-bit hi + lo pair (two MMAs: ~2^-17 relative, fp32-grade) or, for fp32 inputs, as fp32
// (split into tf32 big/small at load: 3xTF32).
// ---------------------------------------------------------------------------------------------
template <typename T, int ROWS, int K>
struct GradTile {
  using M = typename MmaOf<T>::type;
  using E = typename M::E;
  static constexpr bool F32 = std::is_same<T, float>::value;
  static constexpr int LD = F32 ? K + 4 : K + 8;
  static constexpr size_t bytes = (F32 ? 1 : 2) * (size_t)ROWS * LD * sizeof(E);
  E* hi;
  E* lo;
  __device__ explicit GradTile(unsigned char* p) : hi(reinterpret_cast<E*>(p)), lo(reinterpret_cast<E*>(p) + ROWS * LD) {}
  __device__ void put(int r, int c, float v) const {
    if constexpr (F32) {
      hi[r * LD + c] = v;
    } else {
      const E h = from_f<E>(v);
      hi[r * LD + c] = h;
      lo[r * LD + c] = from_f<E>(v - to_f(h));
    }
  }
  template <int NTHR> __device__ void zero() const {
    for (int e = threadIdx.x; e < (F32 ? 1 : 2) * ROWS * LD; e += NTHR) hi[e] = from_f<E>(0.f);
  }
  // acc[i][j] += this[16 i .., k0 .. k0 + KS) @ b[j] for the m-tiles below rows_active
  template <int MT, int NT>
  __device__ void mma(float (&acc)[MT][NT][4], const typename M::B (&b)[NT], int k0, int rows_active) const {
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      if (i * 16 >= rows_active) continue;  // warp-uniform
      if constexpr (F32) {
        typename M::A a;
        M::lda(a, hi + i * 16 * LD + k0, LD);
#pragma unroll
        for (int j = 0; j < NT; ++j) M::mma(acc[i][j], a, b[j]);
      } else {
        typename M::A ah, al;
        M::lda(ah, hi + i * 16 * LD + k0, LD);
        M::lda(al, lo + i * 16 * LD + k0, LD);
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          M::mma(acc[i][j], al, b[j]);
          M::mma(acc[i][j], ah, b[j]);
        }
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Phase 3: acc (ROWS x BD output, 8 warps side by side along BD) += G (ROWS x K, a GradTile) @ R,
// R's row k = bp[k][d0 .. d0 + BD) streamed through a 3-stage ring of one MMA k-step of rows each.
// `prologue` may be issued early (before G is written) to overlap the first loads.
// ---------------------------------------------------------------------------------------------
template <typename T, int ROWS, int BD>
struct Product {
  using M = typename MmaOf<T>::type;
  using E = typename M::E;
  static constexpr int NTHR = NT8, WN = BD / 8, NT = WN / 8, MT = ROWS / 16;
  static constexpr int KC = M::KS, LDB = BD + 8, STAGES = 3;  // (BD + 8) rows: conflict-free .trans
  static_assert(NT % 2 == 0, "two n8 tiles per ldmatrix");
  static constexpr size_t bytes = (size_t)STAGES * KC * LDB * sizeof(E);

  __device__ static void load(E* ring, int kc, const E* const* bp, int64_t d0, int64_t D, bool vec, const void* dummy) {
    stage_rows<E, KC, BD, LDB, NTHR>(ring + (kc % STAGES) * KC * LDB, bp + kc * KC, d0, D, vec, dummy);
  }
  __device__ static void prologue(E* ring, int nkc, const E* const* bp, int64_t d0, int64_t D, bool vec,
                                  const void* dummy) {
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < nkc) load(ring, s, bp, d0, D, vec, dummy);
      cp_async_commit();
    }
  }
  template <int K>
  __device__ static void run(float (&acc)[MT][NT][4], const GradTile<T, ROWS, K>& G, E* ring, int nkc,
                             const E* const* bp, int64_t d0, int64_t D, bool vec, const void* dummy,
                             int rows_active) {
    const int wn = threadIdx.x >> 5;
    for (int kc = 0; kc < nkc; ++kc) {
      cp_async_wait<STAGES - 2>();
      __syncthreads();  // also orders the writes of G before its first read
      if (kc + STAGES - 1 < nkc) load(ring, kc + STAGES - 1, bp, d0, D, vec, dummy);
      cp_async_commit();
      const E* Bs = ring + (kc % STAGES) * KC * LDB + wn * WN;
      typename M::B b[NT];
#pragma unroll
      for (int j = 0; j < NT / 2; ++j) M::ldb_kn2(b[2 * j], b[2 * j + 1], Bs + j * 16, LDB);
      G.template mma<MT, NT>(acc, b, kc * KC, rows_active);
    }
    cp_async_wait<0>();
    __syncthreads();
  }
};

template <int MT, int NT>
__device__ __forceinline__ void zero_acc(float (&acc)[MT][NT][4]) {
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
}

// power of two s with bound * s < 2^13 (fp16 pre-scale of P / d_sim; 8x headroom below 65504)
__host__ __device__ inline float pow2_scale(float bound) {
  if (!(bound > 0.f) || !(bound < 3.0e38f)) return 1.f;
  int e;
  frexpf(bound, &e);  // bound < 2^e
  int k = 13 - e;
  k = k < -60 ? -60 : (k > 60 ? 60 : k);
  return ldexpf(1.f, k);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
template <int NTHR>
__device__ float block_max(float v, float* red) {  // red: NTHR / 32 floats; result in every thread
  v = warp_max(v);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  float m = red[0];
  for (int w = 1; w < NTHR / 32; ++w) m = fmaxf(m, red[w]);
  __syncthreads();
  return m;
}

// ---------------------------------------------------------------------------------------------
// coarse
// ---------------------------------------------------------------------------------------------
struct CoarseLseArgs {
  const void* A; const void* B; const float* temp; float* lse; float* zl; float* part;
  int64_t Ra, Rb, D, lab_off, cols_per_split;
  int vec;
};

// 4 warps, 128 rows x 64 columns per tile; a warp owns 32 rows, so its rows' statistics reduce over
// the 4 lanes of a quad only.
template <typename T>
struct CoarseLseCfg {
  using Z = ZTile<T, 128, 64, 4, 1>;
  static constexpr int NTHR = 128;
  static constexpr size_t off_rowp = align128(Z::bytes);
  static constexpr size_t off_colp = off_rowp + 128 * sizeof(void*);
  static constexpr size_t bytes = off_colp + 64 * sizeof(void*);
};

template <typename T>
__device__ void coarse_lse_body(const CoarseLseArgs& p) {
  using C = CoarseLseCfg<T>;
  using Z = typename C::Z;
  using E = typename Z::E;
  unsigned char* smem = dyn_smem();
  E* ring = reinterpret_cast<E*>(smem);
  const E** rowp = reinterpret_cast<const E**>(smem + C::off_rowp);
  const E** colp = reinterpret_cast<const E**>(smem + C::off_colp);
  const E* A = static_cast<const E*>(p.A);
  const E* B = static_cast<const E*>(p.B);
  const int tid = threadIdx.x, warp = tid >> 5, g = (tid & 31) >> 2, t = tid & 3;
  const int64_t r0 = (int64_t)blockIdx.x * 128;
  const int64_t cb = (int64_t)blockIdx.y * p.cols_per_split;
  const int64_t ce = cb + p.cols_per_split < p.Rb ? cb + p.cols_per_split : p.Rb;
  const float inv_t = 1.f / p.temp[0];
  for (int r = tid; r < 128; r += C::NTHR) rowp[r] = r0 + r < p.Ra ? A + (r0 + r) * p.D : nullptr;
  // this thread's rows: warp * 32 + i * 16 + g + 8 h; its running (max, sum) over its own columns
  float m[2][2], s[2][2], zl[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) { m[i][h] = -INFINITY; s[i][h] = 0.f; zl[i][h] = 0.f; }
  float acc[Z::MT][Z::NT][4];
  for (int64_t c0 = cb; c0 < ce; c0 += 64) {
    for (int c = tid; c < 64; c += C::NTHR) colp[c] = c0 + c < ce ? B + (c0 + c) * p.D : nullptr;
    __syncthreads();
    Z::run(acc, ring, rowp, colp, p.D, p.vec != 0, p.A, 128);
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t row = r0 + warp * 32 + i * 16 + g + 8 * h;
        float tmax = -INFINITY;
#pragma unroll
        for (int j = 0; j < Z::NT; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float z = acc[i][j][2 * h + e] * inv_t;
            acc[i][j][2 * h + e] = z;
            if (c0 + j * 8 + 2 * t + e < ce) tmax = fmaxf(tmax, z);
          }
        const float mn = fmaxf(m[i][h], tmax);
        if (mn > -INFINITY) {  // -inf only if this thread has no live column yet
          float ts = 0.f;
#pragma unroll
          for (int j = 0; j < Z::NT; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int64_t col = c0 + j * 8 + 2 * t + e;
              if (col < ce) {
                const float z = acc[i][j][2 * h + e];
                ts += expf(z - mn);
                if (col == row + p.lab_off) zl[i][h] += z;
              }
            }
          s[i][h] = s[i][h] * expf(m[i][h] - mn) + ts;
          m[i][h] = mn;
        }
      }
  }
  // merge the quad's four (max, sum) pairs; xor 1 then 2, the same order in every quad
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int o = 1; o <= 2; o <<= 1) {
        const float mo = __shfl_xor_sync(0xffffffffu, m[i][h], o);
        const float so = __shfl_xor_sync(0xffffffffu, s[i][h], o);
        zl[i][h] += __shfl_xor_sync(0xffffffffu, zl[i][h], o);
        const float mn = fmaxf(m[i][h], mo);
        if (mn > -INFINITY) {
          s[i][h] = s[i][h] * expf(m[i][h] - mn) + so * expf(mo - mn);
          m[i][h] = mn;
        }
      }
      const int64_t row = r0 + warp * 32 + i * 16 + g + 8 * h;
      if (t == 0 && row < p.Ra) {
        if (p.part == nullptr) {
          p.lse[row] = m[i][h] + logf(s[i][h]);
          p.zl[row] = zl[i][h];
        } else {
          float* q = p.part + ((int64_t)blockIdx.y * p.Ra + row) * 3;
          q[0] = m[i][h]; q[1] = s[i][h]; q[2] = zl[i][h];
        }
      }
    }
}

struct CoarseGradArgs {
  const void* A; const void* B; const float* temp; const float* scale; const float* lse_a; const float* lse_b;
  void* dA; float* tsum;
  int64_t Ra, Rb, D, lab_off;
  float lab_coef, pscale;  // pscale: fp16 pre-scale of P (1 otherwise)
  int vec;
};

// 8 warps; 64 rows x 64 columns of z per tile (2 x 4 warps of 32 x 16), then dA[64, 512] += P @ B_j
// (8 warps of 64 x 64 accumulators: 128 fp32 registers each).  ring: z ring and product ring alias.
template <typename T>
struct CoarseGradCfg {
  using Z = ZTile<T, 64, 64, 2, 4>;
  using PR = Product<T, 64, 512>;
  using GT = GradTile<T, 64, 64>;
  static constexpr int BM = 64, BN = 64, BD = 512;
  static constexpr size_t off_p = align128(cmax(Z::bytes, PR::bytes));
  static constexpr size_t off_rowp = align128(off_p + GT::bytes);
  static constexpr size_t off_colp = off_rowp + BM * sizeof(void*);
  static constexpr size_t off_red = off_colp + BN * sizeof(void*);
  static constexpr size_t bytes = off_red + 4 * BM * sizeof(float);
};

template <typename T>
__device__ void coarse_grad_body(const CoarseGradArgs& p) {
  using C = CoarseGradCfg<T>;
  using Z = typename C::Z;
  using PR = typename C::PR;
  using E = typename Z::E;
  unsigned char* smem = dyn_smem();
  E* ring = reinterpret_cast<E*>(smem);
  const typename C::GT P(smem + C::off_p);
  const E** rowp = reinterpret_cast<const E**>(smem + C::off_rowp);
  const E** colp = reinterpret_cast<const E**>(smem + C::off_colp);
  float* red = reinterpret_cast<float*>(smem + C::off_red);
  const E* A = static_cast<const E*>(p.A);
  const E* B = static_cast<const E*>(p.B);
  const bool vec = p.vec != 0;
  const int tid = threadIdx.x, warp = tid >> 5, g = (tid & 31) >> 2, t = tid & 3;
  const int wm = warp / 4, wn = warp % 4;  // z-tile warp grid (2 x 4)
  const int64_t r0 = (int64_t)blockIdx.x * C::BM, d0 = (int64_t)blockIdx.y * C::BD;
  const float inv_t = 1.f / p.temp[0];
  if (tid < C::BM) rowp[tid] = r0 + tid < p.Ra ? A + (r0 + tid) * p.D : nullptr;
  float la[2][2], trow[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t r = r0 + wm * 32 + i * 16 + g + 8 * h;
      la[i][h] = (p.lse_a != nullptr && r < p.Ra) ? p.lse_a[r] : 0.f;
      trow[i][h] = 0.f;
    }
  float acc[PR::MT][PR::NT][4];
  zero_acc(acc);
  constexpr int nkc = C::BN / PR::KC;
  for (int64_t c0 = 0; c0 < p.Rb; c0 += C::BN) {
    if (tid < C::BN) colp[tid] = c0 + tid < p.Rb ? B + (c0 + tid) * p.D : nullptr;
    __syncthreads();
    float z[Z::MT][Z::NT][4];
    Z::run(z, ring, rowp, colp, p.D, vec, p.A, C::BM);
    PR::prologue(ring, nkc, colp, d0, p.D, vec, p.A);  // the loads overlap the exps below
#pragma unroll
    for (int j = 0; j < Z::NT; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int cl = wn * 16 + j * 8 + 2 * t + e;
        const int64_t c = c0 + cl;
        const float lb = (p.lse_b != nullptr && c < p.Rb) ? p.lse_b[c] : 0.f;
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int rl = wm * 32 + i * 16 + g + 8 * h;
            const int64_t r = r0 + rl;
            const float zz = z[i][j][2 * h + e] * inv_t;
            float pv = 0.f;
            if (r < p.Ra && c < p.Rb) {
              if (p.lse_a != nullptr) pv += expf(zz - la[i][h]);
              if (p.lse_b != nullptr) pv += expf(zz - lb);
              if (c == r + p.lab_off) pv -= p.lab_coef;
              trow[i][h] += pv * zz;
            }
            P.put(rl, cl, pv * p.pscale);
          }
      }
    PR::template run<C::BN>(acc, P, ring, nkc, colp, d0, p.D, vec, p.A, C::BM);
  }
  // dA = acc * scale / pscale; warp `warp` owns columns d0 + 64 warp ..
  const float sc = p.scale[0] / p.pscale;
  E* dA = static_cast<E*>(p.dA);
#pragma unroll
  for (int i = 0; i < PR::MT; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t r = r0 + i * 16 + g + 8 * h;
      if (r >= p.Ra) continue;
#pragma unroll
      for (int j = 0; j < PR::NT; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t d = d0 + warp * PR::WN + j * 8 + 2 * t + e;
          if (d < p.D) dA[r * p.D + d] = from_f<E>(acc[i][j][2 * h + e] * sc);
        }
    }
  // tsum: quad, then the 4 column warps, in a fixed order
  if (p.tsum != nullptr && blockIdx.y == 0) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float v = trow[i][h];
        v += __shfl_xor_sync(0xffffffffu, v, 1);
        v += __shfl_xor_sync(0xffffffffu, v, 2);
        if (t == 0) red[wn * C::BM + wm * 32 + i * 16 + g + 8 * h] = v;
      }
    __syncthreads();
    if (tid < C::BM && r0 + tid < p.Ra)
      p.tsum[r0 + tid] = ((red[tid] + red[C::BM + tid]) + red[2 * C::BM + tid]) + red[3 * C::BM + tid];
  }
}

// ---------------------------------------------------------------------------------------------
// fine
// ---------------------------------------------------------------------------------------------
struct FineArgs {
  const void* text; const float* wt; const uint8_t* tmask;
  const void* x; const void* y; const float* mw; const uint8_t* mmask;
  const float* dS; float* S_out;
  void* d_text; float* g_wt; void* d_x; void* d_y; float* g_mw;
  int64_t Bt, Bm, T, Mx, My, D;
  int G, S, AT, BB;  // groups (1 or 3), slots per clip, texts / clips per block
  int vec;
};

template <typename E>
__device__ __forceinline__ const E* slot_row(const FineArgs& f, int64_t b, int s) {
  return s < f.Mx ? static_cast<const E*>(f.x) + (b * f.Mx + s) * f.D
                  : static_cast<const E*>(f.y) + (b * f.My + (s - f.Mx)) * f.D;
}
__device__ __forceinline__ float ds_at(const FineArgs& f, int g, int64_t a, int64_t b) {
  return f.dS[((int64_t)g * f.Bt + a) * f.Bm + b];
}

// Text side of one (text token, clip) pair: the argmax slots of the x and y groups (first index on
// ties; masked slots skipped) and their d_sim values; gw = d loss / d wt_i (w.r.t. the softmaxed
// weight).  sp[s] = sim(token, slot s).
struct TextSide { int jx, jy; float vx, vy, gw; };
__device__ __forceinline__ TextSide text_side(const FineArgs& f, const float* sp, int64_t a, int64_t b, int i) {
  const uint8_t* mm = f.mmask + b * f.S;
  float mx = -INFINITY, my = -INFINITY;
  int jx = -1, jy = -1;
  for (int s = 0; s < f.S; ++s) {
    if (!mm[s]) continue;
    const float v = sp[s];
    if (s < f.Mx) { if (jx < 0 || v > mx) { mx = v; jx = s; } }
    else { if (jy < 0 || v > my) { my = v; jy = s; } }
  }
  const float dsx = ds_at(f, 0, a, b);
  const float dsy = f.G == 3 ? ds_at(f, 1, a, b) : 0.f;
  const float dsxy = f.G == 3 ? ds_at(f, 2, a, b) : 0.f;
  const float fx = jx >= 0 ? mx : 0.f, fy = jy >= 0 ? my : 0.f;
  TextSide r;
  r.jx = jx; r.jy = jy;
  r.gw = 0.5f * (dsx * fx + dsy * fy + dsxy * fmaxf(fx, fy));
  const float w = f.wt[a * f.T + i];
  r.vx = r.vy = 0.f;
  if (w > 0.f) {
    const bool xwin = !(my > mx);  // ties go to x: torch.max over cat([x, y]) returns the first index
    r.vx = 0.5f * w * (dsx + (xwin ? dsxy : 0.f));
    r.vy = 0.5f * w * (dsy + (xwin ? 0.f : dsxy));
  }
  return r;
}

// Modal side of one (slot, text) pair: the argmax real text token (first index on ties) of column
// `sp` (stride ld), its d_sim value vm and the finite maximum fm (0 without a real token).
struct ModalSide { int im; float vm, fm; };
__device__ __forceinline__ ModalSide modal_side(const FineArgs& f, const float* sp, int ld, int64_t a, int64_t b,
                                                int s) {
  const uint8_t* tm = f.tmask + a * f.T;
  float m2t = -INFINITY;
  int im = -1;
  for (int i = 0; i < f.T; ++i) {
    if (!tm[i]) continue;
    const float v = sp[i * ld];
    if (im < 0 || v > m2t) { m2t = v; im = i; }
  }
  float cm = 0.f;
  for (int g = 0; g < f.G; ++g) cm += f.mw[((int64_t)g * f.Bm + b) * f.S + s] * ds_at(f, g, a, b);
  ModalSide r;
  r.im = im; r.vm = 0.5f * cm; r.fm = im >= 0 ? m2t : 0.f;
  return r;
}

// The fp16 pre-scale for one block: every d_sim entry is <= sum_g |dS_g(a, b)| (softmaxed weights are
// <= 1), so bound that over the pairs the block touches.  bf16 / fp32: 1.
template <typename T>
__device__ float fine_pscale(const FineArgs& f, int64_t a_lo, int64_t a_n, int64_t b_lo, int64_t b_n, float* red) {
  if constexpr (!std::is_same<T, __half>::value) {
    return 1.f;
  } else {
    float m = 0.f;
    for (int64_t q = threadIdx.x; q < a_n * b_n; q += NT8) {
      const int64_t a = a_lo + q / b_n, b = b_lo + q % b_n;
      float v = 0.f;
      for (int g = 0; g < f.G; ++g) v += fabsf(ds_at(f, g, a, b));
      m = fmaxf(m, v);
    }
    return pow2_scale(block_max<NT8>(m, red));
  }
}

// forward: rows = AT texts x T tokens (128), cols = BB clips x S slots (CN)
template <typename T, int CN>
struct FineFwdCfg {
  using Z = ZTile<T, 128, CN, 4, 2>;
  static constexpr int NTHR = NT8, RM = 128, LDS = CN + 4;
  static constexpr size_t off_rowp = align128(cmax(Z::bytes, (size_t)RM * LDS * sizeof(float)));
  static constexpr size_t off_colp = off_rowp + RM * sizeof(void*);
  static constexpr size_t bytes = off_colp + CN * sizeof(void*);
};

__device__ __forceinline__ void sim_to_smem_rows(float* Sim, int ld, int r_base, int c_base, const float* acc4, int g,
                                                 int t) {
  Sim[(r_base + g) * ld + c_base + 2 * t] = acc4[0];
  Sim[(r_base + g) * ld + c_base + 2 * t + 1] = acc4[1];
  Sim[(r_base + g + 8) * ld + c_base + 2 * t] = acc4[2];
  Sim[(r_base + g + 8) * ld + c_base + 2 * t + 1] = acc4[3];
}

// the phase-1 accumulators (fragment layout) -> Sim[row][col] fp32
template <typename ZT, typename AccT>
__device__ __forceinline__ void store_sim(float* Sim, int ld, const AccT& acc) {
  const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, t = threadIdx.x & 3;
  const int wm = warp / ZT::GN, wn = warp % ZT::GN;
#pragma unroll
  for (int i = 0; i < ZT::MT; ++i)
#pragma unroll
    for (int j = 0; j < ZT::NT; ++j)
      sim_to_smem_rows(Sim, ld, wm * ZT::WM + i * 16, wn * ZT::WN + j * 8, acc[i][j], g, t);
}

template <typename T, int CN>
__device__ void fine_fwd_body(const FineArgs& f) {
  using C = FineFwdCfg<T, CN>;
  using Z = typename C::Z;
  using E = typename Z::E;
  unsigned char* smem = dyn_smem();
  E* ring = reinterpret_cast<E*>(smem);
  float* Sim = reinterpret_cast<float*>(smem);  // aliases the ring once the sims are done
  const E** rowp = reinterpret_cast<const E**>(smem + C::off_rowp);
  const E** colp = reinterpret_cast<const E**>(smem + C::off_colp);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int T_ = (int)f.T, S = f.S, AT = f.AT, BB = f.BB;
  const int64_t b0 = (int64_t)blockIdx.x * BB, a0 = (int64_t)blockIdx.y * AT;
  const E* text = static_cast<const E*>(f.text);
  for (int r = tid; r < C::RM; r += C::NTHR) {
    const int al = r / T_, i = r % T_;
    rowp[r] = (al < AT && a0 + al < f.Bt) ? text + ((a0 + al) * f.T + i) * f.D : nullptr;
  }
  for (int c = tid; c < CN; c += C::NTHR) {
    const int bb = c / S;
    colp[c] = (bb < BB && b0 + bb < f.Bm) ? slot_row<E>(f, b0 + bb, c % S) : nullptr;
  }
  __syncthreads();
  float acc[Z::MT][Z::NT][4];
  Z::run(acc, ring, rowp, colp, f.D, f.vec != 0, f.text, AT * T_);
  store_sim<Z>(Sim, C::LDS, acc);
  __syncthreads();
  // one warp per (text, clip) pair; lanes over text tokens; butterfly sums: a fixed order
  for (int pp = warp; pp < AT * BB; pp += C::NTHR / 32) {
    const int al = pp / BB, bb = pp % BB;
    const int64_t a = a0 + al, b = b0 + bb;
    if (a >= f.Bt || b >= f.Bm) continue;
    const uint8_t* mm = f.mmask + b * S;
    const float* base = Sim + (al * T_) * C::LDS + bb * S;
    float tx = 0.f, ty = 0.f, txy = 0.f;
    for (int i = lane; i < T_; i += 32) {
      const float w = f.wt[a * f.T + i];
      if (!(w > 0.f)) continue;
      float mx = -INFINITY, my = -INFINITY;
      for (int s = 0; s < S; ++s) {
        if (!mm[s]) continue;
        const float v = base[i * C::LDS + s];
        if (s < f.Mx) mx = fmaxf(mx, v); else my = fmaxf(my, v);
      }
      tx += w * mx;
      if (f.G == 3) { ty += w * my; txy += w * fmaxf(mx, my); }
    }
    float acc_g[3] = {warp_sum(tx), warp_sum(ty), warp_sum(txy)};
    const uint8_t* tm = f.tmask + a * f.T;
    for (int s = 0; s < S; ++s) {
      float m2t = -INFINITY;
      for (int i = lane; i < T_; i += 32)
        if (tm[i]) m2t = fmaxf(m2t, base[i * C::LDS + s]);
      m2t = warp_max(m2t);
#pragma unroll
      for (int g = 0; g < 3; ++g) {  // constant trip count: acc_g stays in registers
        if (g >= f.G) break;
        const float w = f.mw[((int64_t)g * f.Bm + b) * S + s];
        if (w > 0.f) acc_g[g] += w * m2t;
      }
    }
    if (lane == 0)
#pragma unroll
      for (int g = 0; g < 3; ++g)
        if (g < f.G) f.S_out[((int64_t)g * f.Bt + a) * f.Bm + b] = 0.5f * acc_g[g];
  }
}

// backward, text side: one text (RM rows >= T), clip blocks of CN columns, BD output columns.
// OVL: the product ring is separate from the sim tile, so its loads overlap the d_sim build.
template <typename T, int RM, int CN, int BD, bool OVL>
struct FineTextCfg {
  using Z = ZTile<T, RM, CN, RM / 32, 8 / (RM / 32)>;
  using PR = Product<T, RM, BD>;
  using GT = GradTile<T, RM, CN>;
  static constexpr int NTHR = NT8, LDS = CN + 4;
  static constexpr size_t sim_bytes = (size_t)RM * LDS * sizeof(float);
  static constexpr size_t ring_bytes = OVL ? cmax(Z::bytes, PR::bytes) : cmax(cmax(Z::bytes, PR::bytes), sim_bytes);
  static constexpr size_t off_sim = OVL ? align128(ring_bytes) : 0;
  static constexpr size_t off_gt = align128(OVL ? off_sim + sim_bytes : ring_bytes);
  static constexpr size_t off_rowp = align128(off_gt + GT::bytes);
  static constexpr size_t off_colp = off_rowp + RM * sizeof(void*);
  static constexpr size_t off_im = off_colp + CN * sizeof(void*);
  static constexpr size_t off_vm = off_im + CN * sizeof(int);
  static constexpr size_t off_red = off_vm + CN * sizeof(float);
  static constexpr size_t bytes = off_red + 8 * sizeof(float);
};

template <typename T, int RM, int CN, int BD, bool OVL>
__device__ void fine_bwd_text_body(const FineArgs& f) {
  using C = FineTextCfg<T, RM, CN, BD, OVL>;
  using Z = typename C::Z;
  using PR = typename C::PR;
  using E = typename Z::E;
  unsigned char* smem = dyn_smem();
  E* ring = reinterpret_cast<E*>(smem);
  float* Sim = reinterpret_cast<float*>(smem + C::off_sim);
  const typename C::GT Ds(smem + C::off_gt);
  const E** rowp = reinterpret_cast<const E**>(smem + C::off_rowp);
  const E** colp = reinterpret_cast<const E**>(smem + C::off_colp);
  int* im_s = reinterpret_cast<int*>(smem + C::off_im);
  float* vm_s = reinterpret_cast<float*>(smem + C::off_vm);
  float* red = reinterpret_cast<float*>(smem + C::off_red);
  const int tid = threadIdx.x;
  const int T_ = (int)f.T, S = f.S, BB = f.BB, NC = BB * S;
  const int64_t a = blockIdx.x, d0 = (int64_t)blockIdx.y * BD;
  const bool vec = f.vec != 0;
  const E* text = static_cast<const E*>(f.text);
  for (int r = tid; r < RM; r += C::NTHR) rowp[r] = r < T_ ? text + (a * f.T + r) * f.D : nullptr;
  Ds.template zero<C::NTHR>();  // rows >= T and columns >= NC stay zero
  const float ps = fine_pscale<T>(f, a, 1, 0, f.Bm, red);
  float gwt = 0.f;  // thread i < T owns token i's weight gradient
  float acc[PR::MT][PR::NT][4];
  zero_acc(acc);
  const int nkc = (NC + PR::KC - 1) / PR::KC;
  for (int64_t b0 = 0; b0 < f.Bm; b0 += BB) {
    for (int c = tid; c < CN; c += C::NTHR) {
      const int bb = c / S;
      colp[c] = (c < NC && b0 + bb < f.Bm) ? slot_row<E>(f, b0 + bb, c % S) : nullptr;
    }
    __syncthreads();
    {
      float z[Z::MT][Z::NT][4];
      Z::run(z, ring, rowp, colp, f.D, vec, f.text, T_);
      if (OVL) PR::prologue(ring, nkc, colp, d0, f.D, vec, f.text);
      store_sim<Z>(Sim, C::LDS, z);
    }
    __syncthreads();
    // modal side: one thread per column (slot of a clip)
    for (int c = tid; c < NC; c += C::NTHR) {
      const int64_t b = b0 + c / S;
      ModalSide ms{-1, 0.f, 0.f};
      if (b < f.Bm) ms = modal_side(f, Sim + c, C::LDS, a, b, c % S);
      im_s[c] = ms.im;
      vm_s[c] = ms.vm;
    }
    __syncthreads();
    // text side: one task per (token, clip), clips fastest (stride-S reads of a row)
    for (int q = tid; q < T_ * BB; q += C::NTHR) {
      const int bb = q % BB, i = q / BB;
      const int64_t b = b0 + bb;
      float* sp = Sim + i * C::LDS + bb * S;
      float gw = 0.f;
      if (b < f.Bm) {
        const TextSide ts = text_side(f, sp, a, b, i);
        for (int s = 0; s < S; ++s) {
          const int c = bb * S + s;
          const float v = (s == ts.jx ? ts.vx : 0.f) + (s == ts.jy ? ts.vy : 0.f) + (im_s[c] == i ? vm_s[c] : 0.f);
          Ds.put(i, c, v * ps);
        }
        gw = ts.gw;
      } else {
        for (int s = 0; s < S; ++s) Ds.put(i, bb * S + s, 0.f);
      }
      sp[0] = gw;  // scratch: this task's own (already read) slots
    }
    __syncthreads();
    if (tid < T_)
      for (int bb = 0; bb < BB; ++bb) gwt += Sim[tid * C::LDS + bb * S];
    if (!OVL) {
      __syncthreads();  // the ring aliases Sim
      PR::prologue(ring, nkc, colp, d0, f.D, vec, f.text);
    }
    PR::template run<CN>(acc, Ds, ring, nkc, colp, d0, f.D, vec, f.text, T_);
  }
  const float inv = 1.f / ps;
  const int warp = tid >> 5, g = (tid & 31) >> 2, t = tid & 3;
  E* dt = static_cast<E*>(f.d_text);
#pragma unroll
  for (int i = 0; i < PR::MT; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = i * 16 + g + 8 * h;
      if (r >= T_) continue;
#pragma unroll
      for (int j = 0; j < PR::NT; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t d = d0 + warp * PR::WN + j * 8 + 2 * t + e;
          if (d < f.D) dt[(a * f.T + r) * f.D + d] = from_f<E>(acc[i][j][2 * h + e] * inv);
        }
    }
  if (blockIdx.y == 0 && tid < T_) f.g_wt[a * f.T + tid] = gwt;
}

// backward, modal side: one clip block (CN slot rows >= BB*S), text blocks of KT = 128 token columns
// (AT <= 8 texts), BD output columns.  The sim tile is computed text-major exactly as in the other
// two kernels (same operand roles and K order, so all three see bitwise-identical sims and agree
// on every argmax); d_sim is written transposed for the product.
constexpr int KT = 128, ATMAX = 8;
template <typename T, int CN, int BD, bool OVL>
struct FineModalCfg {
  using Z = ZTile<T, KT, CN, 4, 2>;
  using PR = Product<T, CN, BD>;
  using GT = GradTile<T, CN, KT>;
  static constexpr int NTHR = NT8, LDS = CN + 4;
  static constexpr size_t sim_bytes = (size_t)KT * LDS * sizeof(float);
  static constexpr size_t ring_bytes = OVL ? cmax(Z::bytes, PR::bytes) : cmax(cmax(Z::bytes, PR::bytes), sim_bytes);
  static constexpr size_t off_sim = OVL ? align128(ring_bytes) : 0;
  static constexpr size_t off_gt = align128(OVL ? off_sim + sim_bytes : ring_bytes);
  static constexpr size_t off_rowp = align128(off_gt + GT::bytes);
  static constexpr size_t off_colp = off_rowp + KT * sizeof(void*);
  static constexpr size_t off_im = off_colp + CN * sizeof(void*);
  static constexpr size_t off_vm = off_im + CN * ATMAX * sizeof(int);
  static constexpr size_t off_fm = off_vm + CN * ATMAX * sizeof(float);
  static constexpr size_t off_red = off_fm + CN * ATMAX * sizeof(float);
  static constexpr size_t bytes = off_red + 8 * sizeof(float);
};

template <typename T, int CN, int BD, bool OVL>
__device__ void fine_bwd_modal_body(const FineArgs& f) {
  using C = FineModalCfg<T, CN, BD, OVL>;
  using Z = typename C::Z;
  using PR = typename C::PR;
  using E = typename Z::E;
  unsigned char* smem = dyn_smem();
  E* ring = reinterpret_cast<E*>(smem);
  float* Sim = reinterpret_cast<float*>(smem + C::off_sim);
  const typename C::GT Ds(smem + C::off_gt);  // d_sim^T: slot rows x token columns
  const E** rowp = reinterpret_cast<const E**>(smem + C::off_rowp);
  const E** colp = reinterpret_cast<const E**>(smem + C::off_colp);
  int* im_s = reinterpret_cast<int*>(smem + C::off_im);
  float* vm_s = reinterpret_cast<float*>(smem + C::off_vm);
  float* fm_s = reinterpret_cast<float*>(smem + C::off_fm);
  float* red = reinterpret_cast<float*>(smem + C::off_red);
  const int tid = threadIdx.x;
  const int T_ = (int)f.T, S = f.S, BB = f.BB, NC = BB * S, AT = f.AT, KV = AT * T_;
  const int64_t b0 = (int64_t)blockIdx.x * BB, d0 = (int64_t)blockIdx.y * BD;
  const bool vec = f.vec != 0;
  const E* text = static_cast<const E*>(f.text);
  for (int c = tid; c < CN; c += C::NTHR) {
    const int bb = c / S;
    colp[c] = (c < NC && b0 + bb < f.Bm) ? slot_row<E>(f, b0 + bb, c % S) : nullptr;
  }
  Ds.template zero<C::NTHR>();  // rows >= NC and token columns >= AT*T stay zero
  const int64_t nb = f.Bm - b0 < BB ? f.Bm - b0 : BB;
  const float ps = fine_pscale<T>(f, 0, f.Bt, b0, nb, red);
  float gm[3] = {0.f, 0.f, 0.f};  // thread c < NC owns slot c's modal weight gradients
  float acc[PR::MT][PR::NT][4];
  zero_acc(acc);
  const int nkc = (KV + PR::KC - 1) / PR::KC;
  for (int64_t a0 = 0; a0 < f.Bt; a0 += AT) {
    for (int j = tid; j < KT; j += C::NTHR) {
      const int al = j / T_, i = j % T_;
      rowp[j] = (j < KV && a0 + al < f.Bt) ? text + ((a0 + al) * f.T + i) * f.D : nullptr;
    }
    __syncthreads();
    {
      float z[Z::MT][Z::NT][4];
      Z::run(z, ring, rowp, colp, f.D, vec, f.text, KV);
      if (OVL) PR::prologue(ring, nkc, rowp, d0, f.D, vec, f.text);
      store_sim<Z>(Sim, C::LDS, z);
    }
    __syncthreads();
    // modal side: one task per (slot, text), slots fastest (consecutive columns)
    for (int q = tid; q < NC * AT; q += C::NTHR) {
      const int c = q % NC, al = q / NC;
      const int64_t a = a0 + al, b = b0 + c / S;
      ModalSide ms{-1, 0.f, 0.f};
      if (a < f.Bt && b < f.Bm) ms = modal_side(f, Sim + (al * T_) * C::LDS + c, C::LDS, a, b, c % S);
      im_s[c * ATMAX + al] = ms.im;
      vm_s[c * ATMAX + al] = ms.vm;
      fm_s[c * ATMAX + al] = ms.fm;
    }
    __syncthreads();
    if (tid < NC) {  // modal weight gradients, texts in ascending order
      const int64_t b = b0 + tid / S;
      if (b < f.Bm)
        for (int al = 0; al < AT && a0 + al < f.Bt; ++al)
#pragma unroll
          for (int g = 0; g < 3; ++g)
            if (g < f.G) gm[g] += 0.5f * ds_at(f, g, a0 + al, b) * fm_s[tid * ATMAX + al];
    }
    // text side: one task per (token, clip), clips fastest
    for (int q = tid; q < KV * BB; q += C::NTHR) {
      const int bb = q % BB, j = q / BB, al = j / T_, i = j % T_;
      const int64_t a = a0 + al, b = b0 + bb;
      if (a < f.Bt && b < f.Bm) {
        const TextSide ts = text_side(f, Sim + j * C::LDS + bb * S, a, b, i);
        for (int s = 0; s < S; ++s) {
          const int c = bb * S + s;
          const float v = (s == ts.jx ? ts.vx : 0.f) + (s == ts.jy ? ts.vy : 0.f) +
                          (im_s[c * ATMAX + al] == i ? vm_s[c * ATMAX + al] : 0.f);
          Ds.put(c, j, v * ps);
        }
      } else {
        for (int s = 0; s < S; ++s) Ds.put(bb * S + s, j, 0.f);
      }
    }
    if (!OVL) {
      __syncthreads();  // the ring aliases Sim
      PR::prologue(ring, nkc, rowp, d0, f.D, vec, f.text);
    }
    PR::template run<KT>(acc, Ds, ring, nkc, rowp, d0, f.D, vec, f.text, NC);
  }
  const float inv = 1.f / ps;
  const int warp = tid >> 5, g = (tid & 31) >> 2, t = tid & 3;
#pragma unroll
  for (int i = 0; i < PR::MT; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int c = i * 16 + g + 8 * h;
      if (c >= NC) continue;
      const int64_t b = b0 + c / S;
      const int s = c % S;
      if (b >= f.Bm) continue;
      E* dst = s < f.Mx ? static_cast<E*>(f.d_x) + (b * f.Mx + s) * f.D
                        : static_cast<E*>(f.d_y) + (b * f.My + (s - f.Mx)) * f.D;
#pragma unroll
      for (int j = 0; j < PR::NT; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t d = d0 + warp * PR::WN + j * 8 + 2 * t + e;
          if (d < f.D) dst[d] = from_f<E>(acc[i][j][2 * h + e] * inv);
        }
    }
  if (blockIdx.y == 0 && tid < NC) {
    const int64_t b = b0 + tid / S;
    if (b < f.Bm)
#pragma unroll
      for (int g2 = 0; g2 < 3; ++g2)
        if (g2 < f.G) f.g_mw[((int64_t)g2 * f.Bm + b) * S + tid % S] = gm[g2];
  }
}

// Tile configurations (the launchers below pick one per shape):
//   fine fwd     c64: S <= 64 (BB = 64 / S clips)          c128: S <= 128 (one clip)
//   fine text    r64: T <= 64 and S <= 64, 512 D columns   r128: T, S <= 128, 128 D columns
//   fine modal   c64: S <= 64, 512 D columns               c128: S <= 128, 128 D columns
template <typename T> using FwdC64 = FineFwdCfg<T, 64>;
template <typename T> using FwdC128 = FineFwdCfg<T, 128>;
template <typename T> using TextR64 = FineTextCfg<T, 64, 64, 512, true>;
template <typename T> using TextR128 = FineTextCfg<T, 128, 128, 128, false>;
template <typename T> using ModalC64 = FineModalCfg<T, 64, 512, true>;
template <typename T> using ModalC128 = FineModalCfg<T, 128, 128, false>;

}  // namespace

// ---------------------------------------------------------------------------------------------
// kernels: one named entry per (op, dtype, tile), so the audit (bench/kernel_audit.py) can match
// cuobjdump / ptxas output with the table below.
// ---------------------------------------------------------------------------------------------
#define VF_KERNELS(T, SFX)                                                                                       \
  extern "C" __global__ void __launch_bounds__(128) vfk_coarse_lse_##SFX(CoarseLseArgs a) { coarse_lse_body<T>(a); } \
  extern "C" __global__ void __launch_bounds__(256, 1) vfk_coarse_grad_##SFX(CoarseGradArgs a) {                  \
    coarse_grad_body<T>(a);                                                                                      \
  }                                                                                                              \
  extern "C" __global__ void __launch_bounds__(256, 2) vfk_fine_fwd_##SFX##_c64(FineArgs f) { fine_fwd_body<T, 64>(f); } \
  extern "C" __global__ void __launch_bounds__(256, 2) vfk_fine_fwd_##SFX##_c128(FineArgs f) {                       \
    fine_fwd_body<T, 128>(f);                                                                                    \
  }                                                                                                              \
  extern "C" __global__ void __launch_bounds__(256, 1) vfk_fine_bwd_text_##SFX##_r64(FineArgs f) {                \
    fine_bwd_text_body<T, 64, 64, 512, true>(f);                                                                 \
  }                                                                                                              \
  extern "C" __global__ void __launch_bounds__(256, 1) vfk_fine_bwd_text_##SFX##_r128(FineArgs f) {               \
    fine_bwd_text_body<T, 128, 128, 128, false>(f);                                                              \
  }                                                                                                              \
  extern "C" __global__ void __launch_bounds__(256, 1) vfk_fine_bwd_modal_##SFX##_c64(FineArgs f) {               \
    fine_bwd_modal_body<T, 64, 512, true>(f);                                                                    \
  }                                                                                                              \
  extern "C" __global__ void __launch_bounds__(256, 1) vfk_fine_bwd_modal_##SFX##_c128(FineArgs f) {              \
    fine_bwd_modal_body<T, 128, 128, false>(f);                                                                  \
  }

// the column splits' (max, sum, label) triples -> lse, zl; splits in ascending order
extern "C" __global__ void __launch_bounds__(256) vfk_coarse_lse_merge(const float* part, float* lse, float* zl, int64_t Ra,
                                                             int nsplit) {
  const int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= Ra) return;
  float m = -INFINITY;
  for (int k = 0; k < nsplit; ++k) m = fmaxf(m, part[((int64_t)k * Ra + r) * 3]);
  float s = 0.f, z = 0.f;
  for (int k = 0; k < nsplit; ++k) {
    const float* q = part + ((int64_t)k * Ra + r) * 3;
    if (q[0] > -INFINITY) s += q[1] * expf(q[0] - m);
    z += q[2];
  }
  lse[r] = m + logf(s);
  zl[r] = z;
}

VF_KERNELS(float, f32)
VF_KERNELS(__half, f16)
VF_KERNELS(__nv_bfloat16, bf16)

namespace {

// ---------------------------------------------------------------------------------------------
// kernel table (names, threads, dynamic shared memory) exported for the audit
// ---------------------------------------------------------------------------------------------
struct KernelDesc { const char* name; int threads; int smem; int dtype; int mma; };

#define VF_DESC(T, SFX, CODE)                                                                         \
  {"vfk_coarse_lse_" #SFX, 128, (int)CoarseLseCfg<T>::bytes, CODE, 1},                                \
  {"vfk_coarse_grad_" #SFX, 256, (int)CoarseGradCfg<T>::bytes, CODE, 1},                              \
  {"vfk_fine_fwd_" #SFX "_c64", 256, (int)FwdC64<T>::bytes, CODE, 1},                                 \
  {"vfk_fine_fwd_" #SFX "_c128", 256, (int)FwdC128<T>::bytes, CODE, 1},                               \
  {"vfk_fine_bwd_text_" #SFX "_r64", 256, (int)TextR64<T>::bytes, CODE, 1},                           \
  {"vfk_fine_bwd_text_" #SFX "_r128", 256, (int)TextR128<T>::bytes, CODE, 1},                         \
  {"vfk_fine_bwd_modal_" #SFX "_c64", 256, (int)ModalC64<T>::bytes, CODE, 1},                         \
  {"vfk_fine_bwd_modal_" #SFX "_c128", 256, (int)ModalC128<T>::bytes, CODE, 1}

const KernelDesc kKernels[] = {
    VF_DESC(float, f32, 0), VF_DESC(__half, f16, 1), VF_DESC(__nv_bfloat16, bf16, 2),
    {"vfk_coarse_lse_merge", 256, 0, -1, 0},
};
constexpr int kNumKernels = (int)(sizeof(kKernels) / sizeof(kKernels[0]));

// A100's opt-in limit per block (163 KB): every configuration must fit it (H100: 227 KB).
constexpr size_t kSmemA100 = 166912;
#define VF_FIT(T)                                                                                        \
  static_assert(CoarseLseCfg<T>::bytes <= kSmemA100 && CoarseGradCfg<T>::bytes <= kSmemA100 &&           \
                    FwdC64<T>::bytes <= kSmemA100 && FwdC128<T>::bytes <= kSmemA100 &&                   \
                    TextR64<T>::bytes <= kSmemA100 && TextR128<T>::bytes <= kSmemA100 &&                 \
                    ModalC64<T>::bytes <= kSmemA100 && ModalC128<T>::bytes <= kSmemA100,                 \
                "a tile configuration exceeds 163 KB of shared memory");
VF_FIT(float)
VF_FIT(__half)
VF_FIT(__nv_bfloat16)

// ---------------------------------------------------------------------------------------------
// host side
// ---------------------------------------------------------------------------------------------
struct DevInfo { int sms; int smem_optin; };

int dev_info(DevInfo* out) {
#ifdef VF_EMULATE
  out->sms = vf_emu::num_sms();
  out->smem_optin = 232448;
  return 0;
#endif
  static std::atomic<int> cache_sms[64], cache_smem[64];
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return (int)e;
  if (dev >= 0 && dev < 64 && cache_sms[dev].load() > 0) {
    out->sms = cache_sms[dev].load();
    out->smem_optin = cache_smem[dev].load();
    return 0;
  }
  int sms = 0, smem = 0;
  e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (e != cudaSuccess) return (int)e;
  if (dev >= 0 && dev < 64) { cache_smem[dev].store(smem); cache_sms[dev].store(sms); }
  out->sms = sms;
  out->smem_optin = smem;
  return 0;
}

// launch `kernel` with `smem` dynamic bytes, raising the kernel's limit past 48 KB when needed
template <typename K, typename... Args>
int launch(K kernel, dim3 grid, int threads, size_t smem, cudaStream_t st, Args... args) {
  if (grid.x == 0 || grid.y == 0) return 0;
  if (smem > 48 * 1024) {
#ifdef VF_EMULATE
    if (smem > 166912) return (int)cudaErrorInvalidConfiguration;
#endif
    DevInfo di;
    int e = dev_info(&di);
    if (e) return e;
    if ((int)smem > di.smem_optin) return (int)cudaErrorInvalidConfiguration;  // e.g. sm_86: 99 KB
    e = (int)cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e) return e;
  }
#ifndef VF_EMULATE
  kernel<<<grid, threads, smem, st>>>(args...);
  return (int)cudaGetLastError();
#else
  (void)st;
  return vf_emu::launch(kernel, grid.x, grid.y, threads, smem, args...);
#endif
}

template <typename T> struct K;
#define VF_KTAB(T, SFX)                                                                                  \
  template <> struct K<T> {                                                                              \
    static constexpr auto lse = vfk_coarse_lse_##SFX;                                                    \
    static constexpr auto grad = vfk_coarse_grad_##SFX;                                                  \
    static constexpr auto fwd64 = vfk_fine_fwd_##SFX##_c64;                                              \
    static constexpr auto fwd128 = vfk_fine_fwd_##SFX##_c128;                                            \
    static constexpr auto text64 = vfk_fine_bwd_text_##SFX##_r64;                                        \
    static constexpr auto text128 = vfk_fine_bwd_text_##SFX##_r128;                                      \
    static constexpr auto modal64 = vfk_fine_bwd_modal_##SFX##_c64;                                      \
    static constexpr auto modal128 = vfk_fine_bwd_modal_##SFX##_c128;                                    \
  };
VF_KTAB(float, f32)
VF_KTAB(__half, f16)
VF_KTAB(__nv_bfloat16, bf16)

bool aligned16(const void* p) { return ((uintptr_t)p & 15u) == 0; }

template <typename T>
int launch_coarse_lse(const void* A, const void* B, const float* temp, float* lse, float* zl, int64_t Ra,
                      int64_t Rb, int64_t D, int64_t lab_off, cudaStream_t st) {
  if (Ra == 0) return 0;
  using C = CoarseLseCfg<T>;
  const int64_t rblocks = (Ra + 127) / 128, ctiles = (Rb + 63) / 64;
  if (rblocks > 0x7fffffff) return (int)cudaErrorInvalidValue;
  // Split the columns when the row blocks cannot fill the GPU: aim for 3 resident blocks per SM
  // (~100 registers x 128 threads, 46 KB each) with at least 4 column tiles per split.
  int64_t nsplit = 1;
  if (ctiles > 4) {
    DevInfo di;
    int e = dev_info(&di);
    if (e) return e;
    const int64_t want = (3LL * di.sms + rblocks - 1) / rblocks;
    const int64_t most = ctiles / 4;
    nsplit = want < most ? want : most;
    if (nsplit > 65535) nsplit = 65535;
    if (nsplit < 1) nsplit = 1;
  }
  CoarseLseArgs a{A, B, temp, lse, zl, nullptr, Ra, Rb, D, lab_off, Rb > 0 ? Rb : 1, 0};
  a.vec = aligned16(A) && aligned16(B) && (D * (int64_t)sizeof(T)) % 16 == 0;
  if (nsplit <= 1) return launch(K<T>::lse, dim3((unsigned)rblocks, 1), 128, C::bytes, st, a);
  const int64_t tps = (ctiles + nsplit - 1) / nsplit;  // column tiles per split (>= 4)
  nsplit = (ctiles + tps - 1) / tps;
  a.cols_per_split = tps * 64;
  float* part = nullptr;
  const size_t bytes = (size_t)nsplit * (size_t)Ra * 3 * sizeof(float);
  if (cudaMallocAsync(reinterpret_cast<void**>(&part), bytes, st) != cudaSuccess) {
    (void)cudaGetLastError();  // no stream-ordered allocator: one split (correct, fewer blocks)
    a.cols_per_split = Rb;
    return launch(K<T>::lse, dim3((unsigned)rblocks, 1), 128, C::bytes, st, a);
  }
  a.part = part;
  int e = launch(K<T>::lse, dim3((unsigned)rblocks, (unsigned)nsplit), 128, C::bytes, st, a);
  if (!e) e = launch(vfk_coarse_lse_merge, dim3((unsigned)((Ra + 255) / 256)), 256, 0, st,
                     static_cast<const float*>(part), lse, zl, Ra, (int)nsplit);
  const int ef = (int)cudaFreeAsync(part, st);
  return e ? e : ef;
}

template <typename T>
int launch_coarse_grad(const void* A, const void* B, const float* temp, const float* scale, const float* lse_a,
                       const float* lse_b, void* dA, float* tsum, int64_t Ra, int64_t Rb, int64_t D,
                       int64_t lab_off, float lab_coef, cudaStream_t st) {
  if (Ra == 0) return 0;
  using C = CoarseGradCfg<T>;
  const int64_t rblocks = (Ra + C::BM - 1) / C::BM, nd = D > 0 ? (D + C::BD - 1) / C::BD : 1;
  if (rblocks > 0x7fffffff) return (int)cudaErrorInvalidValue;
  // fp16: |P| <= 2 + |coef| (each exp term <= 1), scaled below 2^13 so tiny probabilities survive
  const float ps = std::is_same<T, __half>::value ? pow2_scale(2.f + fabsf(lab_coef)) : 1.f;
  CoarseGradArgs a{A, B, temp, scale, lse_a, lse_b, dA, tsum, Ra, Rb, D, lab_off, lab_coef, ps, 0};
  a.vec = aligned16(A) && aligned16(B) && (D * (int64_t)sizeof(T)) % 16 == 0;
  return launch(K<T>::grad, dim3((unsigned)rblocks, (unsigned)nd), 256, C::bytes, st, a);
}

template <typename T>
int dispatch_fine(FineArgs f, bool bwd, cudaStream_t st) {
  const int64_t S = f.Mx + f.My;
  if (f.T < 1 || f.T > 128 || S < 1 || S > 128 || f.Mx < 1 || (f.G != 1 && f.G != 3)) return (int)cudaErrorInvalidValue;
  if (f.Bt == 0 || f.Bm == 0) return 0;
  f.S = (int)S;
  f.vec = aligned16(f.text) && aligned16(f.x) && aligned16(f.y) && (f.D * (int64_t)sizeof(T)) % 16 == 0;
  const int T_ = (int)f.T;
  if (!bwd) {
    const bool wide = S > 64;
    const int CN = wide ? 128 : 64;
    f.AT = 128 / T_;
    f.BB = CN / (int)S;
    const int64_t gx = (f.Bm + f.BB - 1) / f.BB, gy = (f.Bt + f.AT - 1) / f.AT;
    if (gx > 0x7fffffff || gy > 65535) return (int)cudaErrorInvalidValue;
    const dim3 grid((unsigned)gx, (unsigned)gy);
    return wide ? launch(K<T>::fwd128, grid, 256, FwdC128<T>::bytes, st, f)
                : launch(K<T>::fwd64, grid, 256, FwdC64<T>::bytes, st, f);
  }
  if (f.Bt > 0x7fffffff) return (int)cudaErrorInvalidValue;
  const int64_t Dn = f.D > 0 ? f.D : 1;
  int e;
  {  // d_text (+ text weight grads)
    const bool big = T_ > 64 || S > 64;
    const int CN = big ? 128 : 64, BD = big ? 128 : 512;
    FineArgs ft = f;
    ft.BB = CN / (int)S;
    ft.AT = 1;
    const dim3 grid((unsigned)f.Bt, (unsigned)((Dn + BD - 1) / BD));
    e = big ? launch(K<T>::text128, grid, 256, TextR128<T>::bytes, st, ft)
            : launch(K<T>::text64, grid, 256, TextR64<T>::bytes, st, ft);
    if (e) return e;
  }
  {  // d_x, d_y (+ modal weight grads)
    const bool big = S > 64;
    const int CN = big ? 128 : 64, BD = big ? 128 : 512;
    FineArgs fm = f;
    fm.BB = CN / (int)S;
    fm.AT = KT / T_ < ATMAX ? KT / T_ : ATMAX;
    const int64_t gx = (f.Bm + fm.BB - 1) / fm.BB;
    if (gx > 0x7fffffff) return (int)cudaErrorInvalidValue;
    const dim3 grid((unsigned)gx, (unsigned)((Dn + BD - 1) / BD));
    e = big ? launch(K<T>::modal128, grid, 256, ModalC128<T>::bytes, st, fm)
            : launch(K<T>::modal64, grid, 256, ModalC64<T>::bytes, st, fm);
  }
  return e;
}

}  // namespace

#define VF_DISPATCH(dtype, FN, ...)                                          \
  switch (dtype) {                                                           \
    case 0: return FN<float>(__VA_ARGS__);                                   \
    case 1: return FN<__half>(__VA_ARGS__);                                  \
    case 2: return FN<__nv_bfloat16>(__VA_ARGS__);                           \
    default: return (int)cudaErrorInvalidValue;                              \
  }

extern "C" {

VF_API int vf_version(void) { return 1; }

// 0 when the runtime this library was built with can talk to the driver and sees a device.
VF_API int vf_probe(void) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) return (int)e;
  return n > 0 ? 0 : (int)cudaErrorNoDevice;
}

VF_API const char* vf_error_string(int code) { return cudaGetErrorString((cudaError_t)code); }

// Kernel table for the ahead-of-time audit (needs no GPU): name (the cubin symbol), threads per
// block, dynamic shared memory in bytes, dtype code (-1: none), whether it multiplies matrices.
VF_API int vf_kernel_count(void) { return kNumKernels; }
VF_API int vf_kernel_info(int i, const char** name, int* threads, int* smem_bytes, int* dtype, int* mma) {
  if (i < 0 || i >= kNumKernels) return (int)cudaErrorInvalidValue;
  const KernelDesc& k = kKernels[i];
  if (name) *name = k.name;
  if (threads) *threads = k.threads;
  if (smem_bytes) *smem_bytes = k.smem;
  if (dtype) *dtype = k.dtype;
  if (mma) *mma = k.mma;
  return 0;
}

VF_API int vf_coarse_lse(int dtype, const void* A, const void* B, const float* temp, float* lse, float* zl,
                         int64_t Ra, int64_t Rb, int64_t D, int64_t lab_off, cudaStream_t stream) {
  VF_DISPATCH(dtype, launch_coarse_lse, A, B, temp, lse, zl, Ra, Rb, D, lab_off, stream)
}

VF_API int vf_coarse_grad(int dtype, const void* A, const void* B, const float* temp, const float* scale,
                          const float* lse_a, const float* lse_b, void* dA, float* tsum, int64_t Ra, int64_t Rb,
                          int64_t D, int64_t lab_off, float lab_coef, cudaStream_t stream) {
  VF_DISPATCH(dtype, launch_coarse_grad, A, B, temp, scale, lse_a, lse_b, dA, tsum, Ra, Rb, D, lab_off, lab_coef,
              stream)
}

VF_API int vf_fine_fwd(int dtype, const void* text, const float* wt, const uint8_t* tmask, const void* x,
                       const void* y, const float* mw, const uint8_t* mmask, float* S_out, int64_t Bt, int64_t Bm,
                       int64_t T, int64_t Mx, int64_t My, int64_t D, int G, cudaStream_t stream) {
  FineArgs f{text, wt, tmask, x, y != nullptr ? y : x, mw, mmask, nullptr, S_out, nullptr, nullptr, nullptr,
             nullptr, nullptr, Bt, Bm, T, Mx, My, D, G, 0, 1, 1, 0};
  VF_DISPATCH(dtype, dispatch_fine, f, false, stream)
}

VF_API int vf_fine_bwd(int dtype, const float* dS, const void* text, const float* wt, const uint8_t* tmask,
                       const void* x, const void* y, const float* mw, const uint8_t* mmask, void* d_text,
                       float* g_wt, void* d_x, void* d_y, float* g_mw, int64_t Bt, int64_t Bm, int64_t T,
                       int64_t Mx, int64_t My, int64_t D, int G, cudaStream_t stream) {
  FineArgs f{text, wt, tmask, x, y != nullptr ? y : x, mw, mmask, dS, nullptr, d_text, g_wt, d_x,
             d_y != nullptr ? d_y : d_x, g_mw, Bt, Bm, T, Mx, My, D, G, 0, 1, 1, 0};
  VF_DISPATCH(dtype, dispatch_fine, f, true, stream)
}

}  // extern "C"
