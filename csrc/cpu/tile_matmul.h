// The two matrix products of the CPU attention tiles:
//   matmul_nt:  C = alpha * A . B^T          (scores, dP)
//   matmul_acc: C += alpha * P . V           (outputs, dQ, and with P read transposed dK, dV)
// Tiles with few rows (decode steps, GQA groups) use register-blocked loops over ATen's Vectorized;
// larger tiles use the BLAS that torch links (its Fortran `sgemm_` symbol, bound weakly at load time,
// because torch's own cpublas is not exported). The loops also cover a torch without exported BLAS.
// Included by the per-capability kernel sources (cpu/attention_kernels.h), inside their namespace:
// every variant gets its own copy, compiled with its own flags.
#pragma once

#ifndef ANLLM_CPU_NS
#error "cpu/tile_matmul.h is part of the per-capability CPU kernels; include it via cpu/attention_kernels.h"
#endif

#include <ATen/cpu/vec/vec.h>

#include <cstdint>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b,
                       const int* ldb, const float* beta, float* c, const int* ldc)
    __attribute__((weak));
// MKL's per-thread thread count, C interface (the lower-case symbol is MKL's Fortran one, by pointer);
// absent with other BLAS libraries, whose small GEMMs run serially anyway.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace anllm {
namespace ANLLM_CPU_NS {

// Tiles are small GEMMs issued from many threads at once: BLAS-level threading only adds overhead,
// and outside an OpenMP region MKL would start its own threads for every call.
class SerialBlasScope {
 public:
  SerialBlasScope() : previous_(&MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SerialBlasScope() {
    if (&MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);
  }
  SerialBlasScope(const SerialBlasScope&) = delete;
  SerialBlasScope& operator=(const SerialBlasScope&) = delete;

 private:
  int previous_;
};

constexpr int64_t kBlasMinDim = 16;  // both M and N at least this: the BLAS call pays off

inline bool use_blas(int64_t M, int64_t N, int64_t K) {
  return &sgemm_ != nullptr && M >= kBlasMinDim && N >= kBlasMinDim && K > 0;
}

// Column-major BLAS call: C[m x n] = alpha * op(A) * op(B) + beta * C.
inline void blas_sgemm(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                       int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const int im = m, in = n, ik = k, ilda = lda, ildb = ldb, ildc = ldc;
  sgemm_(&ta, &tb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
}

using Vec = at::vec::Vectorized<float>;

// C[i][j] = alpha * dot(A[i][:K], B[j][:K]) for i < M, j < N. Rows of A, B, C are lda/ldb/ldc apart.
template <int R, int NB>
inline void dot_block(float* C, int64_t ldc, const float* A, int64_t lda, const float* B, int64_t ldb,
                      int64_t K, float alpha) {
  constexpr int64_t W = Vec::size();
  Vec acc[R][NB];
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < NB; ++n) acc[r][n] = Vec(0.f);
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    Vec b[NB];
    for (int n = 0; n < NB; ++n) b[n] = Vec::loadu(B + n * ldb + k);
    for (int r = 0; r < R; ++r) {
      const Vec a = Vec::loadu(A + r * lda + k);
      for (int n = 0; n < NB; ++n) acc[r][n] = at::vec::fmadd(a, b[n], acc[r][n]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int n = 0; n < NB; ++n) {
      float sum = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc[r][n]);
      for (int64_t kk = k; kk < K; ++kk) sum += A[r * lda + kk] * B[n * ldb + kk];
      C[r * ldc + n] = alpha * sum;
    }
  }
}

// Rows of B (keys) or V this far ahead are prefetched by the few-row loops: in a decode step the
// cache rows come cold from memory and each row is used for only a few multiply-adds.
constexpr int64_t kPrefetchRows = 8;

inline void prefetch_row(const float* row, int64_t n) {
  for (int64_t off = 0; off < n; off += 64 / sizeof(float)) __builtin_prefetch(row + off, 0, 3);
}

// `next`, when given, is a matrix with B's row layout that the caller reads right after (the V rows
// of the same keys): its rows are prefetched alongside B's, so both streams are in flight at once.
template <int R>
inline void dot_rows(float* C, int64_t ldc, const float* A, int64_t lda, const float* B, int64_t ldb,
                     int64_t N, int64_t K, float alpha, const float* next) {
  constexpr int NB = R >= 3 ? 2 : 4;  // keeps R * NB accumulators + NB loads within 16 registers
  int64_t j = 0;
  for (; j + NB <= N; j += NB) {
    for (int n = 0; n < NB; ++n)
      if (j + n + kPrefetchRows < N) {
        prefetch_row(B + (j + n + kPrefetchRows) * ldb, K);
        if (next) prefetch_row(next + (j + n + kPrefetchRows) * ldb, K);
      }
    dot_block<R, NB>(C + j, ldc, A, lda, B + j * ldb, ldb, K, alpha);
  }
  for (; j < N; ++j) dot_block<R, 1>(C + j, ldc, A, lda, B + j * ldb, ldb, K, alpha);
}

inline void matmul_nt(float* C, int64_t ldc, const float* A, int64_t lda, const float* B, int64_t ldb,
                      int64_t M, int64_t N, int64_t K, float alpha, const float* next = nullptr) {
  if (use_blas(M, N, K)) {  // row-major C = A B^T is column-major C^T = B A^T
    blas_sgemm('T', 'N', N, M, K, alpha, B, ldb, A, lda, 0.f, C, ldc);
    return;
  }
  int64_t i = 0;
  for (; i + 4 <= M; i += 4) dot_rows<4>(C + i * ldc, ldc, A + i * lda, lda, B, ldb, N, K, alpha, i == 0 ? next : nullptr);
  switch (M - i) {
    case 3: dot_rows<3>(C + i * ldc, ldc, A + i * lda, lda, B, ldb, N, K, alpha, i == 0 ? next : nullptr); break;
    case 2: dot_rows<2>(C + i * ldc, ldc, A + i * lda, lda, B, ldb, N, K, alpha, i == 0 ? next : nullptr); break;
    case 1: dot_rows<1>(C + i * ldc, ldc, A + i * lda, lda, B, ldb, N, K, alpha, i == 0 ? next : nullptr); break;
    default: break;
  }
}

// C[i][:K] += alpha * sum_{j < N} P(i, j) * V[j][:K], with P(i, j) = P[i * p_row + j * p_col]
// (so P may be read transposed). Rows of C and V are ldc/ldv apart.
template <int R, int KV, bool kPrefetch = false>
inline void axpy_block(float* C, int64_t ldc, const float* P, int64_t p_row, int64_t p_col,
                       const float* V, int64_t ldv, int64_t N, float alpha, int64_t row_len = 0) {
  constexpr int64_t W = Vec::size();
  Vec acc[R][KV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < KV; ++c) acc[r][c] = Vec::loadu(C + r * ldc + c * W);
  for (int64_t j = 0; j < N; ++j) {
    if (kPrefetch && j + kPrefetchRows < N) prefetch_row(V + (j + kPrefetchRows) * ldv, row_len);
    Vec v[KV];
    for (int c = 0; c < KV; ++c) v[c] = Vec::loadu(V + j * ldv + c * W);
    for (int r = 0; r < R; ++r) {
      const Vec p(alpha * P[r * p_row + j * p_col]);
      for (int c = 0; c < KV; ++c) acc[r][c] = at::vec::fmadd(p, v[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < KV; ++c) acc[r][c].store(C + r * ldc + c * W);
}

template <int R>
inline void axpy_rows(float* C, int64_t ldc, const float* P, int64_t p_row, int64_t p_col,
                      const float* V, int64_t ldv, int64_t N, int64_t K, float alpha) {
  constexpr int64_t W = Vec::size();
  int64_t k = 0;
  // The column passes each read a slice of every V row: the first one fetches whole rows ahead.
  if (k + 2 * W <= K) {
    axpy_block<R, 2, true>(C + k, ldc, P, p_row, p_col, V + k, ldv, N, alpha, K);
    k += 2 * W;
  }
  for (; k + 2 * W <= K; k += 2 * W) axpy_block<R, 2>(C + k, ldc, P, p_row, p_col, V + k, ldv, N, alpha);
  for (; k + W <= K; k += W) axpy_block<R, 1>(C + k, ldc, P, p_row, p_col, V + k, ldv, N, alpha);
  for (; k < K; ++k)  // head dims that are not a multiple of the vector width
    for (int r = 0; r < R; ++r) {
      float sum = 0.f;
      for (int64_t j = 0; j < N; ++j) sum += P[r * p_row + j * p_col] * V[j * ldv + k];
      C[r * ldc + k] += alpha * sum;
    }
}

inline void matmul_acc(float* C, int64_t ldc, const float* P, int64_t p_row, int64_t p_col,
                       const float* V, int64_t ldv, int64_t M, int64_t N, int64_t K, float alpha) {
  if (use_blas(M, N, K) && (p_col == 1 || p_row == 1)) {  // column-major C^T += V^T P^T
    const bool p_row_major = p_col == 1;
    blas_sgemm('N', p_row_major ? 'N' : 'T', K, M, N, alpha, V, ldv, P, p_row_major ? p_row : p_col,
               1.f, C, ldc);
    return;
  }
  int64_t i = 0;
  for (; i + 4 <= M; i += 4)
    axpy_rows<4>(C + i * ldc, ldc, P + i * p_row, p_row, p_col, V, ldv, N, K, alpha);
  float* c = C + i * ldc;
  const float* p = P + i * p_row;
  switch (M - i) {  // each V row is loaded once for all remaining rows
    case 3: axpy_rows<3>(c, ldc, p, p_row, p_col, V, ldv, N, K, alpha); break;
    case 2: axpy_rows<2>(c, ldc, p, p_row, p_col, V, ldv, N, K, alpha); break;
    case 1: axpy_rows<1>(c, ldc, p, p_row, p_col, V, ldv, N, K, alpha); break;
    default: break;
  }
}

}  // namespace ANLLM_CPU_NS
}  // namespace anllm
