// Small GEMMs for attention's per-head blocks, written for the compiler's vectorizer (-O3 -march=native): the
// output's columns (the head dim K, or keys) are the contiguous, vectorized axis; 4 output rows share each load of B.
#include <algorithm>
#include <cstdint>

// C[m, n] = alpha * A[m, k] B[k, n] + beta * C   (row-major; lda, ldb, ldc row strides). beta is 0 or 1.
// A is read as A[i, j] = a[i * a_row + j * a_col], so a transposed A (TN) is the same loop.
template <int NC>
static inline void tile(int rows, int n0, int k, float alpha, const float* a, int64_t a_row, int64_t a_col,
                        const float* b, int ldb, float beta, float* c, int ldc) {
  float acc[4][NC] = {};
  for (int j = 0; j < k; ++j) {
    const float* brow = b + (int64_t)j * ldb + n0;
    for (int r = 0; r < 4; ++r) {
      float x = r < rows ? a[r * a_row + j * a_col] : 0.0f;
#pragma GCC ivdep
      for (int t = 0; t < NC; ++t) acc[r][t] += x * brow[t];
    }
  }
  for (int r = 0; r < rows; ++r) {
    float* crow = c + (int64_t)r * ldc + n0;
    for (int t = 0; t < NC; ++t) crow[t] = alpha * acc[r][t] + (beta != 0.0f ? crow[t] : 0.0f);
  }
}

static void gemm(int m, int n, int k, float alpha, const float* a, int64_t a_row, int64_t a_col, const float* b,
                 int ldb, float beta, float* c, int ldc) {
  for (int i = 0; i < m; i += 4) {
    int rows = std::min(4, m - i);
    const float* ai = a + i * a_row;
    float* ci = c + (int64_t)i * ldc;
    int n0 = 0;
    for (; n0 + 32 <= n; n0 += 32) tile<32>(rows, n0, k, alpha, ai, a_row, a_col, b, ldb, beta, ci, ldc);
    for (; n0 + 8 <= n; n0 += 8) tile<8>(rows, n0, k, alpha, ai, a_row, a_col, b, ldb, beta, ci, ldc);
    for (; n0 < n; ++n0) tile<1>(rows, n0, k, alpha, ai, a_row, a_col, b, ldb, beta, ci, ldc);
  }
}
// C = alpha A B + beta C, A [m, k] with row stride lda
static inline void gemm_nn(int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb,
                           float beta, float* c, int ldc) {
  gemm(m, n, k, alpha, a, lda, 1, b, ldb, beta, c, ldc);
}
// C = alpha A^T B + beta C, A [k, m] with row stride lda
static inline void gemm_tn(int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb,
                           float beta, float* c, int ldc) {
  gemm(m, n, k, alpha, a, 1, lda, b, ldb, beta, c, ldc);
}
