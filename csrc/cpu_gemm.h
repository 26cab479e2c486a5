// Small fp32 GEMMs for the CPU attention tiles.
//
// torch's own cpublas::gemm is not exported from libtorch, so we call the BLAS that torch links:
// the Fortran `sgemm_` symbol (MKL on x86-64 wheels, OpenBLAS elsewhere) is bound weakly at load
// time, and a portable loop kernel takes over when the running torch exports no BLAS.
// Semantics are BLAS's: column-major C[m x n] = alpha * op(A) * op(B) + beta * C.
#pragma once

#include <cstdint>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b,
                       const int* ldb, const float* beta, float* c, const int* ldc)
    __attribute__((weak));

namespace anllm {

enum class Trans : char { N = 'N', T = 'T' };

inline void gemm_loops(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha,
                       const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                       int64_t ldc) {
  for (int64_t j = 0; j < n; ++j) {
    float* cj = c + j * ldc;
    for (int64_t i = 0; i < m; ++i) cj[i] = beta == 0.f ? 0.f : cj[i] * beta;
    for (int64_t p = 0; p < k; ++p) {
      const float bpj = alpha * (tb == Trans::N ? b[j * ldb + p] : b[p * ldb + j]);
      if (ta == Trans::N) {
        const float* ap = a + p * lda;
        for (int64_t i = 0; i < m; ++i) cj[i] += ap[i] * bpj;
      } else {
        for (int64_t i = 0; i < m; ++i) cj[i] += a[i * lda + p] * bpj;
      }
    }
  }
}

inline bool have_blas() { return &sgemm_ != nullptr; }

inline void gemm(Trans ta, Trans tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                 int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t j = 0; j < n; ++j)
      for (int64_t i = 0; i < m; ++i) c[j * ldc + i] = beta == 0.f ? 0.f : c[j * ldc + i] * beta;
    return;
  }
  if (have_blas()) {
    const char cta = static_cast<char>(ta), ctb = static_cast<char>(tb);
    const int im = m, in = n, ik = k, ilda = lda, ildb = ldb, ildc = ldc;
    sgemm_(&cta, &ctb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
    return;
  }
  gemm_loops(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace anllm
