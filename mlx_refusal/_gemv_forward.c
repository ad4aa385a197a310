/* A cblas_sgemm for MLX's Linux CPU build that sends products of one to three rows, or of one
   column, to sgemv.

   Batch-1 decoding is nothing but one-row products (x[1, K] @ W.T), and Debian bookworm's OpenBLAS
   0.3.21 runs sgemm with M = 1 at about a third of the memory bandwidth that its own sgemv
   reaches on the same matrix. backend.py loads this library with RTLD_GLOBAL ahead of OpenBLAS,
   so MLX's `cblas_sgemm` lookup lands here, and hands it OpenBLAS's own sgemm and sgemv.
   Preloaded ahead of OpenBLAS instead (LD_PRELOAD="this.so libopenblas.so.0", what
   `backend.stock_preload()` prints), it finds them itself, so stock mlx_lm gets it too.
   Everything else goes to OpenBLAS's sgemm unchanged. Built by setup.py as an optional
   extension; no Python API, loaded with ctypes. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>

enum { ROW_MAJOR = 101, COL_MAJOR = 102, NO_TRANS = 111, TRANS = 112 };

/* A batch of generations ends with a few rows left. Up to this many, one sgemv per row beats
   sgemm although each row reads the weights again: measured on 896- and 4864-wide weights, the
   row loop is 1.2-1.8x faster at M = 2 and 3, even at M = 4, and slower from M = 6. */
#define MAX_ROWS 3

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *,
                         int, float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);

static sgemm_fn blas_sgemm;
static sgemv_fn blas_sgemv;
static int forwarding = 1;
static unsigned long long forwarded;

void gemv_forward_init(sgemm_fn sgemm, sgemv_fn sgemv) {
  blas_sgemm = sgemm;
  blas_sgemv = sgemv;
}

/* Under LD_PRELOAD every preloaded library is in place before constructors run, so the next
   definitions are OpenBLAS's. Loaded by backend.py, OpenBLAS is not global yet: nothing is
   found here, and gemv_forward_init follows at once. */
__attribute__((constructor)) static void find_the_next_blas(void) {
  blas_sgemm = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");
  blas_sgemv = (sgemv_fn)dlsym(RTLD_NEXT, "cblas_sgemv");
}

/* On by default; off lets a benchmark time plain sgemm in the same process. */
void gemv_forward_enable(int on) { forwarding = on; }

/* How many products went to sgemv: lets a test prove the forward path ran. */
unsigned long long gemv_forward_count(void) { return __atomic_load_n(&forwarded, __ATOMIC_RELAXED); }

/* sgemv scales y by beta, and MLX hands sgemm an uninitialised C with beta = 0, where 0 * NaN
   would stay NaN: give it zeros. */
static void clear_if_overwritten(float beta, float *y, int n, int inc) {
  if (beta == 0.0f)
    for (int i = 0; i < n; i++) y[(size_t)i * inc] = 0.0f;
}

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc) {
  if (!blas_sgemm || !blas_sgemv) {
    fprintf(stderr, "mlx-refusal: _gemv_forward has no BLAS to call; preload an OpenBLAS after it\n");
    abort();
  }
  if (order == COL_MAJOR) { /* a column-major C = A B is the row-major C^T = B^T A^T */
    cblas_sgemm(ROW_MAJOR, trans_b, trans_a, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
    return;
  }
  if (forwarding && k > 0 && m <= MAX_ROWS && n > 1) { /* row r: c[r, :] = a[r, :] op(b) = op(b)^T x */
    int inc_x = trans_a == NO_TRANS ? 1 : lda;
    for (int r = 0; r < m; r++) {
      const float *x = trans_a == NO_TRANS ? a + (size_t)r * lda : a + r;
      float *y = c + (size_t)r * ldc;
      clear_if_overwritten(beta, y, n, 1);
      if (trans_b == NO_TRANS)
        blas_sgemv(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, x, inc_x, beta, y, 1);
      else
        blas_sgemv(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, x, inc_x, beta, y, 1);
    }
    __atomic_fetch_add(&forwarded, 1, __ATOMIC_RELAXED);
    return;
  }
  if (forwarding && k > 0 && n == 1 && m > 1) { /* c[m, 1] = op(a) b[k, 1] */
    int inc_x = trans_b == NO_TRANS ? ldb : 1;
    clear_if_overwritten(beta, c, m, ldc);
    if (trans_a == NO_TRANS)
      blas_sgemv(ROW_MAJOR, NO_TRANS, m, k, alpha, a, lda, b, inc_x, beta, c, ldc);
    else
      blas_sgemv(ROW_MAJOR, TRANS, k, m, alpha, a, lda, b, inc_x, beta, c, ldc);
    __atomic_fetch_add(&forwarded, 1, __ATOMIC_RELAXED);
    return;
  }
  blas_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
