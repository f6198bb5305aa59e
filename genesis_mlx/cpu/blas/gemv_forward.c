/* Routes MLX's vector-times-matrix products to OpenBLAS's GEMV.
 *
 * MLX's CPU backend computes every matmul with cblas_sgemm, decoding included, where
 * one side is a single row: x[1, K] @ W^T. OpenBLAS before 0.3.27 (Debian 12 ships
 * 0.3.21) runs that through its general GEMM kernel, which packs W first, and reaches
 * a fraction of the memory bandwidth its cblas_sgemv does (figures in BENCHMARKS.md).
 * Decoding reads every weight once per token, so it is bound by exactly that
 * bandwidth.
 *
 * Preloaded in front of OpenBLAS (LD_PRELOAD="this.so:libopenblas.so.0"): row-major
 * products with M == 1 become GEMV calls, everything else goes to the next
 * cblas_sgemm in the search order, OpenBLAS's own.
 */
#define _GNU_SOURCE
#include <dlfcn.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int,
                         const float *, int, float, float *, int);

void cblas_sgemv(int order, int trans, int m, int n, float alpha, const float *a,
                 int lda, const float *x, int incx, float beta, float *y, int incy);

static sgemm_fn next_sgemm;

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c,
                 int ldc) {
  if (order == ROW_MAJOR && m == 1 && n > 1 && k > 0) {
    /* c[1, n] = alpha * a[1, k] @ op(b)[k, n] + beta * c. The row a is contiguous
       unless a is stored transposed ([k, 1] with leading dimension lda). */
    int inc_a = trans_a == NO_TRANS ? 1 : lda;
    if (trans_b == NO_TRANS) /* b is [k, n]: c = b^T a */
      cblas_sgemv(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, a, inc_a, beta, c, 1);
    else /* b is [n, k]: c = b a */
      cblas_sgemv(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, a, inc_a, beta, c, 1);
    return;
  }
  if (!next_sgemm)
    next_sgemm = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");
  next_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
