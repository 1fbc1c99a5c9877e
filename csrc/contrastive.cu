// valor-fast: contrastive (MGA) losses in plain CUDA C++ with a C ABI (loaded through ctypes by
// valor_fast/ops/_cuda.py; no torch headers, so it builds where only nvcc exists).
//
// The same algorithms as the Triton kernels in kernels/contrastive.py (read that docstring first):
//
//   coarse   vf_coarse_lse:  per row i of A, lse_i = logsumexp_j (A_i . B_j / tau) streamed over
//                            64-column tiles (online max / sum), plus the label logit z_{i, i+off}.
//            vf_coarse_grad: dA[i, d] = scale * sum_j P_ij B[j, d] with z tiles recomputed and
//                            P_ij = exp(z - lse_a_i) + exp(z - lse_b_j) - coef [j == i + off];
//                            tsum_i = sum_j P_ij z_ij for the temperature gradient.  The (B, B)
//                            logits never exist; D is split over blockIdx.y (64 columns each).
//   fine     vf_fine_fwd:    one block = one text x BB clips; the clips' x and y tokens are laid out
//                            as S = Mx + My slots per clip, one (T, BB*S) sim tile in shared memory
//                            yields all three groups (x, y, x++y) from one read of the features.
//            vf_fine_bwd:    recomputes the tile and its argmaxes (first index on ties, like torch);
//                            d_sim (two entries per text token and group, one per modal slot) is
//                            built in shared memory and multiplied by the features: one kernel for
//                            d_text (+ text weight grads) per (text, D chunk), one for d_modal
//                            (+ modal weight grads) per (clip block, D chunk).  No atomics: every
//                            sum has one owner thread, so results are deterministic.
//
// Arithmetic: fp32 FMA tiling (16x16 threads, register micro-tiles, K chunks of 16 in shared
// memory) for fp32 / fp16 / bf16 inputs; fp32 accumulation and softmax statistics.  This is the
// dependency-free fallback; the Triton kernels use tensor cores.  Not run in the session that wrote
// it (no GPU there): compiled for sm_80 / sm_90a only.
//
// Layouts (all contiguous, row-major): A, B (R, D); text (Bt, T, D); x (Bm, Mx, D); y (Bm, My, D);
// wt (Bt, T) fp32 softmaxed weights, 0 at padding; tmask (Bt, T) u8; mw (G, Bm, S) fp32 per-group
// softmaxed slot weights (G = 1: x only, G = 3: x, y, x++y); mmask (Bm, S) u8; S / dS (G, Bt, Bm).
// dtype codes: 0 = fp32, 1 = fp16, 2 = bf16.  Every entry point returns a cudaError_t as int.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

namespace {

constexpr int NT = 256;  // threads per block, viewed as 16 x 16
constexpr int KC = 16;   // K chunk staged in shared memory
constexpr int CT = 64;   // coarse tile (rows, columns, D chunk)
constexpr int DO = 64;   // fine backward: output columns per block

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// out[r * ldo + c] = sum_k rowp[r][k] * colp[c][k] for r < R, c < C (null pointers read as zero
// rows).  RMAX / CMAX bound R / C; each thread owns rows ty + 16 i and columns tx + 16 j.
template <typename T, int RMAX, int CMAX>
__device__ void tile_dot(const T* const* rowp, int R, const T* const* colp, int C, int64_t D,
                         float* As, float* Bs, float* out, int ldo) {
  constexpr int RI = RMAX / 16, CI = CMAX / 16;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[RI][CI];
#pragma unroll
  for (int i = 0; i < RI; ++i)
#pragma unroll
    for (int j = 0; j < CI; ++j) acc[i][j] = 0.f;
  for (int64_t k0 = 0; k0 < D; k0 += KC) {
    for (int e = threadIdx.x; e < RMAX * KC; e += NT) {
      const int r = e / KC, k = e % KC;
      const T* p = r < R ? rowp[r] : nullptr;
      As[r * (KC + 1) + k] = (p != nullptr && k0 + k < D) ? to_f(p[k0 + k]) : 0.f;
    }
    for (int e = threadIdx.x; e < CMAX * KC; e += NT) {
      const int c = e / KC, k = e % KC;
      const T* p = c < C ? colp[c] : nullptr;
      Bs[c * (KC + 1) + k] = (p != nullptr && k0 + k < D) ? to_f(p[k0 + k]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < KC; ++k) {
      float a[RI], b[CI];
#pragma unroll
      for (int i = 0; i < RI; ++i) a[i] = As[(ty + 16 * i) * (KC + 1) + k];
#pragma unroll
      for (int j = 0; j < CI; ++j) b[j] = Bs[(tx + 16 * j) * (KC + 1) + k];
#pragma unroll
      for (int i = 0; i < RI; ++i)
#pragma unroll
        for (int j = 0; j < CI; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < RI; ++i)
#pragma unroll
    for (int j = 0; j < CI; ++j) {
      const int r = ty + 16 * i, c = tx + 16 * j;
      if (r < R && c < C) out[r * ldo + c] = acc[i][j];
    }
}

// ---------------------------------------------------------------------------------------------
// coarse
// ---------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(NT) coarse_lse_kernel(const T* __restrict__ A, const T* __restrict__ B,
                                                        const float* __restrict__ temp, float* lse, float* zl,
                                                        int64_t Ra, int64_t Rb, int64_t D, int64_t lab_off) {
  __shared__ float As[CT * (KC + 1)], Bs[CT * (KC + 1)], Z[CT * (CT + 1)];
  __shared__ const T* rowp[CT];
  __shared__ const T* colp[CT];
  const int tid = threadIdx.x;
  const int64_t r0 = (int64_t)blockIdx.x * CT;
  const float inv_t = 1.f / temp[0];
  if (tid < CT) rowp[tid] = r0 + tid < Ra ? A + (r0 + tid) * D : nullptr;
  // four consecutive lanes own one row's running (max, sum)
  const int row = tid >> 2, part = tid & 3;
  float m = -INFINITY, s = 0.f, zlab = 0.f;
  for (int64_t c0 = 0; c0 < Rb; c0 += CT) {
    if (tid < CT) colp[tid] = c0 + tid < Rb ? B + (c0 + tid) * D : nullptr;
    __syncthreads();
    tile_dot<T, CT, CT>(rowp, CT, colp, CT, D, As, Bs, Z, CT + 1);
    __syncthreads();
    const int ncol = (int)(Rb - c0 < CT ? Rb - c0 : CT);
    float tmax = -INFINITY;
    for (int c = part; c < ncol; c += 4) tmax = fmaxf(tmax, Z[row * (CT + 1) + c] * inv_t);
    tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
    tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 2));
    const float mn = fmaxf(m, tmax);  // finite: every tile has >= 1 live column
    float ts = 0.f;
    for (int c = part; c < ncol; c += 4) {
      const float z = Z[row * (CT + 1) + c] * inv_t;
      ts += expf(z - mn);
      if (c0 + c == r0 + row + lab_off) zlab += z;
    }
    ts += __shfl_xor_sync(0xffffffffu, ts, 1);
    ts += __shfl_xor_sync(0xffffffffu, ts, 2);
    s = s * expf(m - mn) + ts;
    m = mn;
    __syncthreads();  // Z and colp are rewritten next tile
  }
  zlab += __shfl_xor_sync(0xffffffffu, zlab, 1);
  zlab += __shfl_xor_sync(0xffffffffu, zlab, 2);
  if (part == 0 && r0 + row < Ra) {
    lse[r0 + row] = m + logf(s);
    zl[r0 + row] = zlab;
  }
}

template <typename T>
__global__ void __launch_bounds__(NT) coarse_grad_kernel(const T* __restrict__ A, const T* __restrict__ B,
                                                         const float* __restrict__ temp, const float* __restrict__ scale,
                                                         const float* __restrict__ lse_a, const float* __restrict__ lse_b,
                                                         T* dA, float* tsum, int64_t Ra, int64_t Rb, int64_t D,
                                                         int64_t lab_off, float lab_coef) {
  __shared__ float As[CT * (KC + 1)], Bs[CT * (KC + 1)], Pm[CT * (CT + 1)], Bd[KC * (CT + 1)];
  __shared__ float trow[CT];
  __shared__ const T* rowp[CT];
  __shared__ const T* colp[CT];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t r0 = (int64_t)blockIdx.x * CT, d0 = (int64_t)blockIdx.y * CT;
  const float inv_t = 1.f / temp[0];
  if (tid < CT) {
    rowp[tid] = r0 + tid < Ra ? A + (r0 + tid) * D : nullptr;
    trow[tid] = 0.f;
  }
  float acc[4][4] = {};
  for (int64_t c0 = 0; c0 < Rb; c0 += CT) {
    if (tid < CT) colp[tid] = c0 + tid < Rb ? B + (c0 + tid) * D : nullptr;
    __syncthreads();
    tile_dot<T, CT, CT>(rowp, CT, colp, CT, D, As, Bs, Pm, CT + 1);
    __syncthreads();
    // z -> P in place; 4 lanes per row, so the row's sum(P z) has one owner (lane part 0)
    {
      const int r = tid >> 2, part = tid & 3;
      const bool rv = r0 + r < Ra;
      const float la = (lse_a != nullptr && rv) ? lse_a[r0 + r] : 0.f;
      float t = 0.f;
      for (int c = part; c < CT; c += 4) {
        const float z = Pm[r * (CT + 1) + c] * inv_t;
        float p = 0.f;
        if (rv && c0 + c < Rb) {
          if (lse_a != nullptr) p += expf(z - la);
          if (lse_b != nullptr) p += expf(z - lse_b[c0 + c]);
          if (c0 + c == r0 + r + lab_off) p -= lab_coef;
          t += p * z;
        }
        Pm[r * (CT + 1) + c] = p;
      }
      t += __shfl_xor_sync(0xffffffffu, t, 1);
      t += __shfl_xor_sync(0xffffffffu, t, 2);
      if (part == 0) trow[r] += t;
    }
    __syncthreads();
    // acc += P (64 x 64) @ B[c0 .. c0+64, d0 .. d0+64]
    for (int kc = 0; kc < CT; kc += KC) {
      for (int e = tid; e < KC * CT; e += NT) {
        const int k = e / CT, d = e % CT;
        const T* p = colp[kc + k];
        Bd[k * (CT + 1) + d] = (p != nullptr && d0 + d < D) ? to_f(p[d0 + d]) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int k = 0; k < KC; ++k) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = Pm[(ty + 16 * i) * (CT + 1) + kc + k];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = Bd[k * (CT + 1) + tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }
  }
  const float sc = scale[0];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t r = r0 + ty + 16 * i, d = d0 + tx + 16 * j;
      if (r < Ra && d < D) dA[r * D + d] = from_f<T>(acc[i][j] * sc);
    }
  if (tsum != nullptr && blockIdx.y == 0 && tid < CT && r0 + tid < Ra) tsum[r0 + tid] = trow[tid];
}

// ---------------------------------------------------------------------------------------------
// fine
// ---------------------------------------------------------------------------------------------
struct FineArgs {
  const void* text; const float* wt; const uint8_t* tmask;
  const void* x; const void* y; const float* mw; const uint8_t* mmask;
  int64_t Bt, Bm, T, Mx, My, D;
  int G, BB;  // groups (1 or 3), clips per block
};

// Shared-memory layout of the fine kernels (pointers first for alignment).
template <typename T, int RMAX, int CMAX>
struct FineSmem {
  const T** rowp; const T** colp; float* As; float* Bs; float* Sim; float* Ds; float* Fd;
  static size_t bytes(bool bwd) {
    size_t f = (size_t)RMAX * (KC + 1) + (size_t)CMAX * (KC + 1) + (size_t)RMAX * (CMAX + 1);
    if (bwd) f += (size_t)RMAX * (CMAX + 1) + (size_t)KC * (DO + 1);
    return (RMAX + CMAX) * sizeof(void*) + f * sizeof(float);
  }
  __device__ explicit FineSmem(unsigned char* base) {
    rowp = reinterpret_cast<const T**>(base);
    colp = rowp + RMAX;
    As = reinterpret_cast<float*>(colp + CMAX);
    Bs = As + RMAX * (KC + 1);
    Sim = Bs + CMAX * (KC + 1);
    Ds = Sim + RMAX * (CMAX + 1);
    Fd = Ds + RMAX * (CMAX + 1);
  }
};

// Token sims of text a vs clips b0 .. b0+BB into Sim (T rows, BB*S columns).
template <typename T, int RMAX, int CMAX>
__device__ void fine_tile(const FineArgs& f, int64_t a, int64_t b0, FineSmem<T, RMAX, CMAX>& sm) {
  const int S = (int)(f.Mx + f.My), NC = f.BB * S;
  const T* text = static_cast<const T*>(f.text);
  const T* x = static_cast<const T*>(f.x);
  const T* y = static_cast<const T*>(f.y);
  for (int i = threadIdx.x; i < RMAX; i += NT) sm.rowp[i] = i < f.T ? text + (a * f.T + i) * f.D : nullptr;
  for (int c = threadIdx.x; c < CMAX; c += NT) {
    const T* p = nullptr;
    if (c < NC) {
      const int64_t b = b0 + c / S;
      const int s = c % S;
      if (b < f.Bm) p = s < f.Mx ? x + (b * f.Mx + s) * f.D : y + (b * f.My + (s - f.Mx)) * f.D;
    }
    sm.colp[c] = p;
  }
  __syncthreads();
  tile_dot<T, RMAX, CMAX>(sm.rowp, (int)f.T, sm.colp, NC, f.D, sm.As, sm.Bs, sm.Sim, CMAX + 1);
  __syncthreads();
}

__device__ __forceinline__ bool text_real(const FineArgs& f, int64_t a, int i) {
  return i < f.T && f.tmask[a * f.T + i] != 0;
}

template <typename T, int RMAX, int CMAX>
__global__ void __launch_bounds__(NT) fine_fwd_kernel(FineArgs f, float* S_out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  FineSmem<T, RMAX, CMAX> sm(smem_raw);
  const int64_t a = blockIdx.x, b0 = (int64_t)blockIdx.y * f.BB;
  fine_tile<T, RMAX, CMAX>(f, a, b0, sm);
  const int S = (int)(f.Mx + f.My);
  const int bb = threadIdx.x;  // one thread per clip: sequential, deterministic sums
  const int64_t b = b0 + bb;
  if (bb >= f.BB || b >= f.Bm) return;
  const uint8_t* mm = f.mmask + b * S;
  const float* Srow = sm.Sim + bb * S;
  float acc[3] = {0.f, 0.f, 0.f};
  for (int i = 0; i < f.T; ++i) {  // text side
    const float w = f.wt[a * f.T + i];
    if (!(w > 0.f)) continue;
    float mx = -INFINITY, my = -INFINITY;
    for (int s = 0; s < S; ++s) {
      if (!mm[s]) continue;
      const float v = Srow[i * (CMAX + 1) + s];
      if (s < f.Mx) mx = fmaxf(mx, v); else my = fmaxf(my, v);
    }
    acc[0] += w * mx;
    if (f.G == 3) { acc[1] += w * my; acc[2] += w * fmaxf(mx, my); }
  }
  for (int s = 0; s < S; ++s) {  // modal side
    float m2t = -INFINITY;
    for (int i = 0; i < f.T; ++i)
      if (text_real(f, a, i)) m2t = fmaxf(m2t, Srow[i * (CMAX + 1) + s]);
    for (int g = 0; g < f.G; ++g) {
      const float w = f.mw[((int64_t)g * f.Bm + b) * S + s];
      if (w > 0.f) acc[g] += w * m2t;
    }
  }
  for (int g = 0; g < f.G; ++g) S_out[((int64_t)g * f.Bt + a) * f.Bm + b] = 0.5f * acc[g];
}

// Build d_sim for (text a, clip block b0) in sm.Ds from sm.Sim.  Text side: thread i owns row i
// (and returns its weight-gradient contribution); modal side: thread c owns column c (and adds
// its weight-gradient contributions into gm[3]).
template <typename T, int RMAX, int CMAX>
__device__ float fine_dsim(const FineArgs& f, const float* dS, int64_t a, int64_t b0,
                           FineSmem<T, RMAX, CMAX>& sm, float* gm) {
  const int S = (int)(f.Mx + f.My), NC = f.BB * S;
  const int tid = threadIdx.x;
  for (int e = tid; e < RMAX * (CMAX + 1); e += NT) sm.Ds[e] = 0.f;
  __syncthreads();
  float gwt = 0.f;
  if (tid < f.T) {
    const int i = tid;
    const float w = f.wt[a * f.T + i];
    for (int bb = 0; bb < f.BB; ++bb) {
      const int64_t b = b0 + bb;
      if (b >= f.Bm) break;
      const uint8_t* mm = f.mmask + b * S;
      const float* srow = sm.Sim + i * (CMAX + 1) + bb * S;
      float mx = -INFINITY, my = -INFINITY;
      int jx = -1, jy = -1;
      for (int s = 0; s < S; ++s) {
        if (!mm[s]) continue;
        const float v = srow[s];
        if (s < f.Mx) { if (jx < 0 || v > mx) { mx = v; jx = s; } }
        else { if (jy < 0 || v > my) { my = v; jy = s; } }
      }
      const float dsx = dS[a * f.Bm + b];
      const float dsy = f.G == 3 ? dS[((int64_t)f.Bt + a) * f.Bm + b] : 0.f;
      const float dsxy = f.G == 3 ? dS[((int64_t)2 * f.Bt + a) * f.Bm + b] : 0.f;
      const float fx = jx >= 0 ? mx : 0.f, fy = jy >= 0 ? my : 0.f;
      gwt += 0.5f * (dsx * fx + dsy * fy + dsxy * fmaxf(fx, fy));
      if (w > 0.f) {
        const bool xwin = !(my > mx);  // ties go to x (first index of the concatenation)
        float cx = dsx, cy = dsy;
        if (xwin) cx += dsxy; else cy += dsxy;
        float* drow = sm.Ds + i * (CMAX + 1) + bb * S;
        if (jx >= 0) drow[jx] += 0.5f * w * cx;
        if (jy >= 0) drow[jy] += 0.5f * w * cy;
      }
    }
  }
  __syncthreads();
  if (tid < NC) {
    const int c = tid, bb = c / S, s = c % S;
    const int64_t b = b0 + bb;
    if (b < f.Bm) {
      float m2t = -INFINITY;
      int im = -1;
      for (int i = 0; i < f.T; ++i) {
        if (!text_real(f, a, i)) continue;
        const float v = sm.Sim[i * (CMAX + 1) + c];
        if (im < 0 || v > m2t) { m2t = v; im = i; }
      }
      float cm = 0.f;
      for (int g = 0; g < f.G; ++g) {
        const float dsg = dS[((int64_t)g * f.Bt + a) * f.Bm + b];
        cm += f.mw[((int64_t)g * f.Bm + b) * S + s] * dsg;
        if (im >= 0) gm[g] += 0.5f * dsg * m2t;
      }
      if (im >= 0) sm.Ds[im * (CMAX + 1) + c] += 0.5f * cm;
    }
  }
  __syncthreads();
  return gwt;
}

template <typename T, int RMAX, int CMAX>
__global__ void __launch_bounds__(NT) fine_bwd_text_kernel(FineArgs f, const float* dS, T* d_text, float* g_wt) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  FineSmem<T, RMAX, CMAX> sm(smem_raw);
  constexpr int RI = RMAX / 16, DJ = DO / 16;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t a = blockIdx.x, d0 = (int64_t)blockIdx.y * DO;
  const int S = (int)(f.Mx + f.My), NC = f.BB * S;
  float acc[RI][DJ] = {};
  float gm[3] = {0.f, 0.f, 0.f};
  float gwt = 0.f;
  for (int64_t b0 = 0; b0 < f.Bm; b0 += f.BB) {
    fine_tile<T, RMAX, CMAX>(f, a, b0, sm);
    gwt += fine_dsim<T, RMAX, CMAX>(f, dS, a, b0, sm, gm);
    // acc (T x DO) += Ds (T x NC) @ features[cols, d0 .. d0+DO]
    for (int kc = 0; kc < NC; kc += KC) {
      for (int e = tid; e < KC * DO; e += NT) {
        const int k = e / DO, d = e % DO;
        const T* p = kc + k < NC ? sm.colp[kc + k] : nullptr;
        sm.Fd[k * (DO + 1) + d] = (p != nullptr && d0 + d < f.D) ? to_f(p[d0 + d]) : 0.f;
      }
      __syncthreads();
      const int kmax = NC - kc < KC ? NC - kc : KC;
      for (int k = 0; k < kmax; ++k) {
        float av[RI], bv[DJ];
#pragma unroll
        for (int i = 0; i < RI; ++i) av[i] = sm.Ds[(ty + 16 * i) * (CMAX + 1) + kc + k];
#pragma unroll
        for (int j = 0; j < DJ; ++j) bv[j] = sm.Fd[k * (DO + 1) + tx + 16 * j];
#pragma unroll
        for (int i = 0; i < RI; ++i)
#pragma unroll
          for (int j = 0; j < DJ; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
      }
      __syncthreads();
    }
  }
#pragma unroll
  for (int i = 0; i < RI; ++i)
#pragma unroll
    for (int j = 0; j < DJ; ++j) {
      const int r = ty + 16 * i;
      const int64_t d = d0 + tx + 16 * j;
      if (r < f.T && d < f.D) d_text[(a * f.T + r) * f.D + d] = from_f<T>(acc[i][j]);
    }
  if (blockIdx.y == 0 && tid < f.T) g_wt[a * f.T + tid] = gwt;
}

template <typename T, int RMAX, int CMAX>
__global__ void __launch_bounds__(NT) fine_bwd_modal_kernel(FineArgs f, const float* dS, T* d_x, T* d_y, float* g_mw) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  FineSmem<T, RMAX, CMAX> sm(smem_raw);
  constexpr int CI = CMAX / 16, DJ = DO / 16;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t b0 = (int64_t)blockIdx.x * f.BB, d0 = (int64_t)blockIdx.y * DO;
  const int S = (int)(f.Mx + f.My), NC = f.BB * S;
  const T* text = static_cast<const T*>(f.text);
  float acc[CI][DJ] = {};
  float gm[3] = {0.f, 0.f, 0.f};
  for (int64_t a = 0; a < f.Bt; ++a) {
    fine_tile<T, RMAX, CMAX>(f, a, b0, sm);
    fine_dsim<T, RMAX, CMAX>(f, dS, a, b0, sm, gm);
    // acc (NC x DO) += Ds^T (NC x T) @ text[a, :, d0 .. d0+DO]
    for (int kc = 0; kc < f.T; kc += KC) {
      for (int e = tid; e < KC * DO; e += NT) {
        const int k = e / DO, d = e % DO;
        sm.Fd[k * (DO + 1) + d] = (kc + k < f.T && d0 + d < f.D) ? to_f(text[(a * f.T + kc + k) * f.D + d0 + d]) : 0.f;
      }
      __syncthreads();
      const int kmax = (int)(f.T - kc < KC ? f.T - kc : KC);
      for (int k = 0; k < kmax; ++k) {
        float av[CI], bv[DJ];
#pragma unroll
        for (int i = 0; i < CI; ++i) av[i] = sm.Ds[(kc + k) * (CMAX + 1) + ty + 16 * i];
#pragma unroll
        for (int j = 0; j < DJ; ++j) bv[j] = sm.Fd[k * (DO + 1) + tx + 16 * j];
#pragma unroll
        for (int i = 0; i < CI; ++i)
#pragma unroll
          for (int j = 0; j < DJ; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
      }
      __syncthreads();
    }
  }
#pragma unroll
  for (int i = 0; i < CI; ++i) {
    const int c = ty + 16 * i;
    if (c >= NC) continue;
    const int64_t b = b0 + c / S;
    const int s = c % S;
    if (b >= f.Bm) continue;
#pragma unroll
    for (int j = 0; j < DJ; ++j) {
      const int64_t d = d0 + tx + 16 * j;
      if (d >= f.D) continue;
      if (s < f.Mx) d_x[(b * f.Mx + s) * f.D + d] = from_f<T>(acc[i][j]);
      else d_y[(b * f.My + (s - f.Mx)) * f.D + d] = from_f<T>(acc[i][j]);
    }
  }
  if (blockIdx.y == 0 && tid < NC) {
    const int64_t b = b0 + tid / S;
    const int s = tid % S;
    if (b < f.Bm)
      for (int g = 0; g < f.G; ++g) g_mw[((int64_t)g * f.Bm + b) * S + s] = gm[g];
  }
}

// ---------------------------------------------------------------------------------------------
// host launchers
// ---------------------------------------------------------------------------------------------
template <typename T>
int launch_coarse_lse(const void* A, const void* B, const float* temp, float* lse, float* zl, int64_t Ra,
                      int64_t Rb, int64_t D, int64_t lab_off, cudaStream_t st) {
  if (Ra == 0) return 0;
  dim3 grid((unsigned)((Ra + CT - 1) / CT));
  coarse_lse_kernel<T><<<grid, NT, 0, st>>>(static_cast<const T*>(A), static_cast<const T*>(B), temp, lse, zl,
                                             Ra, Rb, D, lab_off);
  return (int)cudaGetLastError();
}

template <typename T>
int launch_coarse_grad(const void* A, const void* B, const float* temp, const float* scale, const float* lse_a,
                       const float* lse_b, void* dA, float* tsum, int64_t Ra, int64_t Rb, int64_t D,
                       int64_t lab_off, float lab_coef, cudaStream_t st) {
  if (Ra == 0 || D == 0) return 0;
  dim3 grid((unsigned)((Ra + CT - 1) / CT), (unsigned)((D + CT - 1) / CT));
  coarse_grad_kernel<T><<<grid, NT, 0, st>>>(static_cast<const T*>(A), static_cast<const T*>(B), temp, scale,
                                              lse_a, lse_b, static_cast<T*>(dA), tsum, Ra, Rb, D, lab_off, lab_coef);
  return (int)cudaGetLastError();
}

template <typename K>
int set_smem(K kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return 0;
  return (int)cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
}

template <typename T, int RMAX, int CMAX>
int launch_fine(const FineArgs& f, const float* dS, float* S_out, void* d_text, float* g_wt, void* d_x, void* d_y,
                float* g_mw, bool bwd, cudaStream_t st) {
  using SM = FineSmem<T, RMAX, CMAX>;
  const unsigned nblk = (unsigned)((f.Bm + f.BB - 1) / f.BB);
  if (!bwd) {
    const size_t bytes = SM::bytes(false);
    int e = set_smem(fine_fwd_kernel<T, RMAX, CMAX>, bytes);
    if (e) return e;
    fine_fwd_kernel<T, RMAX, CMAX><<<dim3((unsigned)f.Bt, nblk), NT, bytes, st>>>(f, S_out);
    return (int)cudaGetLastError();
  }
  const size_t bytes = SM::bytes(true);
  const unsigned nd = (unsigned)((f.D + DO - 1) / DO);
  int e = set_smem(fine_bwd_text_kernel<T, RMAX, CMAX>, bytes);
  if (e) return e;
  fine_bwd_text_kernel<T, RMAX, CMAX><<<dim3((unsigned)f.Bt, nd), NT, bytes, st>>>(f, dS, static_cast<T*>(d_text), g_wt);
  e = (int)cudaGetLastError();
  if (e) return e;
  e = set_smem(fine_bwd_modal_kernel<T, RMAX, CMAX>, bytes);
  if (e) return e;
  fine_bwd_modal_kernel<T, RMAX, CMAX><<<dim3(nblk, nd), NT, bytes, st>>>(f, dS, static_cast<T*>(d_x),
                                                                         static_cast<T*>(d_y), g_mw);
  return (int)cudaGetLastError();
}

template <typename T>
int dispatch_fine(FineArgs f, const float* dS, float* S_out, void* d_text, float* g_wt, void* d_x, void* d_y,
                  float* g_mw, bool bwd, cudaStream_t st) {
  const int S = (int)(f.Mx + f.My);
  if (f.T < 1 || f.T > 128 || S < 1 || S > 128 || f.Mx < 1 || (f.G != 1 && f.G != 3)) return (int)cudaErrorInvalidValue;
  if (f.Bt == 0 || f.Bm == 0) return 0;
  // 64 columns per tile (BB clips of S slots), one clip when S > 64
  f.BB = S <= 64 ? 64 / S : 1;
  const bool wide = f.BB * S > 64;
  if (f.T <= 64 && !wide) return launch_fine<T, 64, 64>(f, dS, S_out, d_text, g_wt, d_x, d_y, g_mw, bwd, st);
  if (!wide) return launch_fine<T, 128, 64>(f, dS, S_out, d_text, g_wt, d_x, d_y, g_mw, bwd, st);
  return launch_fine<T, 128, 128>(f, dS, S_out, d_text, g_wt, d_x, d_y, g_mw, bwd, st);
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

int vf_version(void) { return 1; }

// 0 when the runtime this library was built with can talk to the driver and sees a device.
int vf_probe(void) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) return (int)e;
  return n > 0 ? 0 : (int)cudaErrorNoDevice;
}

const char* vf_error_string(int code) { return cudaGetErrorString((cudaError_t)code); }

int vf_coarse_lse(int dtype, const void* A, const void* B, const float* temp, float* lse, float* zl, int64_t Ra,
                  int64_t Rb, int64_t D, int64_t lab_off, cudaStream_t stream) {
  VF_DISPATCH(dtype, launch_coarse_lse, A, B, temp, lse, zl, Ra, Rb, D, lab_off, stream)
}

int vf_coarse_grad(int dtype, const void* A, const void* B, const float* temp, const float* scale,
                   const float* lse_a, const float* lse_b, void* dA, float* tsum, int64_t Ra, int64_t Rb,
                   int64_t D, int64_t lab_off, float lab_coef, cudaStream_t stream) {
  VF_DISPATCH(dtype, launch_coarse_grad, A, B, temp, scale, lse_a, lse_b, dA, tsum, Ra, Rb, D, lab_off, lab_coef,
              stream)
}

int vf_fine_fwd(int dtype, const void* text, const float* wt, const uint8_t* tmask, const void* x, const void* y,
                const float* mw, const uint8_t* mmask, float* S_out, int64_t Bt, int64_t Bm, int64_t T, int64_t Mx,
                int64_t My, int64_t D, int G, cudaStream_t stream) {
  FineArgs f{text, wt, tmask, x, y != nullptr ? y : x, mw, mmask, Bt, Bm, T, Mx, My, D, G, 1};
  VF_DISPATCH(dtype, dispatch_fine, f, nullptr, S_out, nullptr, nullptr, nullptr, nullptr, nullptr, false, stream)
}

int vf_fine_bwd(int dtype, const float* dS, const void* text, const float* wt, const uint8_t* tmask, const void* x,
                const void* y, const float* mw, const uint8_t* mmask, void* d_text, float* g_wt, void* d_x,
                void* d_y, float* g_mw, int64_t Bt, int64_t Bm, int64_t T, int64_t Mx, int64_t My, int64_t D, int G,
                cudaStream_t stream) {
  FineArgs f{text, wt, tmask, x, y != nullptr ? y : x, mw, mmask, Bt, Bm, T, Mx, My, D, G, 1};
  VF_DISPATCH(dtype, dispatch_fine, f, dS, nullptr, d_text, g_wt, d_x, d_y != nullptr ? d_y : d_x, g_mw, true,
              stream)
}

}  // extern "C"
