/* A cblas_sgemm for MLX's Linux CPU build that takes over products of a few rows, which
   OpenBLAS runs far below the memory bandwidth.

   Decoding multiplies a few rows (one per sequence) by every weight matrix: x[M, K] @ W.T with W
   stored [N, K]. Debian bookworm's OpenBLAS 0.3.21 packs W into a buffer on every such call, so
   at M = 1-32 it reads and writes the weights before it multiplies, and runs sgemm with M = 1 at
   about a third of the memory bandwidth that its own sgemv reaches on the same matrix. Here:
     - x[2 <= M <= SKINNY_ROWS (31), K] @ W.T on a CPU with AVX-512 (or AVX2 with FMA) goes to `skinny`,
       which reads W once, straight from where it lies, and takes dot products of 4 of its rows
       with 4 rows of x at a time (2 with AVX2), the work split by rows of W over OpenBLAS's
       thread count;
     - other products of one to three rows, or of one column, go to sgemv (one call per row).
   backend.py loads this library with RTLD_GLOBAL ahead of OpenBLAS, so MLX's `cblas_sgemm`
   lookup lands here, and hands it OpenBLAS's own sgemm and sgemv. Preloaded ahead of OpenBLAS
   instead (LD_PRELOAD="this.so libopenblas.so.0", what `backend.stock_preload()` prints), it
   finds them itself, so stock mlx_lm gets it too. Everything else goes to OpenBLAS's sgemm
   unchanged. Built by setup.py as an optional extension; no Python API, loaded with ctypes. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

/* ---- skinny: x[M, K] @ W.T with W stored [N, K], for few rows M ---------------------------- */

/* From 2 to SKINNY_ROWS rows skinny beats OpenBLAS's sgemm: measured on Qwen2.5-0.5B's weights on
   2 AVX-512 cores (bench/skinny.py), a whole decode step runs 1.4x faster at 2 rows (where sgemv
   read the weights once per row), 1.5x at 8, 1.25x at 16, 1.3x at 24-28 and 1.15x at 30.
   OpenBLAS's SkylakeX sgemm runs whole panels of 16 rows best: at 32 rows it is 1.08x faster than
   skinny, even from 34 to 44, and 1.2-1.35x faster at 48-64, where its packed kernels reuse each
   weight across more rows than 4 x 4 tiles do. One row stays on sgemv, which reads the weights as
   fast (the same at 1 row, 20% slower through here). */
#define SKINNY_ROWS 31
/* The 2 x 4 tiles of AVX2 reuse each load less. Timed on the same machine against OpenBLAS's
   AVX-512 kernels (a CPU with only AVX2 runs OpenBLAS's slower Haswell ones): a step 1.4x faster
   at 2 rows, 1.1-1.4x at 8, even at 16, 0.9x at 24. */
#define SKINNY_ROWS_AVX2 12
#define SKINNY_MAX_ROWS 64
static unsigned long long skinny_calls;

/* How many products went to skinny: lets a test prove the path ran. */
unsigned long long skinny_count(void) { return __atomic_load_n(&skinny_calls, __ATOMIC_RELAXED); }

/* The kernel is x86-64 only (AVX-512 or AVX2); elsewhere the forward is sgemv's alone.
   GEMV_FORWARD_NO_KERNEL builds that version here, for a test. */
#if defined(__x86_64__) && !defined(GEMV_FORWARD_NO_KERNEL)
#define SKINNY_KERNEL 1
#include <immintrin.h>

static int skinny_rows; /* products of up to this many rows go to skinny; 0 = off */

/* The tiles come in two widths: 16 lanes (AVX-512, 32 registers: 4 x 4 tiles) and 8 lanes (AVX2
   with FMA, 16 registers: 2 x 4 tiles). aligned(4): the loads take any float. */
typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef float v8 __attribute__((vector_size(32), aligned(4)));
#define SHUF __builtin_shufflevector

/* Unaligned loads: a memcpy for the 16-lane tiles, an intrinsic for the 8-lane ones (GCC 12 sent
   their memcpy through the stack, 2-4x slower). MLX's arrays start 8-56 bytes into a cache line, so
   most 64-byte loads straddle two. Aligning them (x copied to W's offset, a masked first vector)
   made the tiles 1.3-1.4x faster on one core with the weights in cache, but decoding streams the
   weights from memory on every core, and there it measured the same, so the loads stay plain. */
static inline __attribute__((always_inline, target("avx512f"))) v16 load16(const float *p) {
  v16 v;
  memcpy(&v, p, sizeof v);
  return v;
}
static inline __attribute__((always_inline, target("avx2,fma"))) v8 load8(const float *p) {
  return (v8)_mm256_loadu_ps(p);
}

/* 16 vectors -> one whose lane t is the sum of v[t]'s lanes: four rounds of pairwise shuffles and
   adds, where summing each vector alone would take 16 horizontal reductions. */
static inline __attribute__((always_inline, target("avx512f"))) v16 sum_each16(v16 *v) {
  v16 w[8], x[4], y[2];
  for (int i = 0; i < 8; i++)
    w[i] = SHUF(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           SHUF(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; i++)
    x[i] = SHUF(w[2 * i], w[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           SHUF(w[2 * i], w[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; i++)
    y[i] = SHUF(x[2 * i], x[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           SHUF(x[2 * i], x[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return SHUF(y[0], y[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         SHUF(y[0], y[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

/* 8 vectors -> one whose lane t is the sum of v[t]'s lanes, in three rounds. */
static inline __attribute__((always_inline, target("avx2,fma"))) v8 sum_each8(v8 *v) {
  v8 w[4], x[2];
  for (int i = 0; i < 4; i++)
    w[i] = SHUF(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11) + SHUF(v[2 * i], v[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
  for (int i = 0; i < 2; i++)
    x[i] = SHUF(w[2 * i], w[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13) + SHUF(w[2 * i], w[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15);
  return SHUF(x[0], x[1], 0, 2, 4, 6, 8, 10, 12, 14) + SHUF(x[0], x[1], 1, 3, 5, 7, 9, 11, 13, 15);
}

/* out[i * NR + j] = sum over p < k of a[i, p] b[j, p], for i < MR rows of a and j < NR rows of b:
   MR x NR accumulators of LANES lanes each, summed lane-wise at the end (the k % LANES tail in
   scalar). */
#define TILE(VEC, LANES, ISA, MR, NR)                                                             \
  static __attribute__((target(ISA), noinline)) void tile##LANES##_##MR##x##NR(                   \
      int k, const float *a, int lda, const float *b, int ldb, float *out) {                      \
    VEC acc[LANES];                                                                               \
    for (int i = 0; i < LANES; i++) acc[i] = (VEC){0};                                            \
    int p = 0;                                                                                    \
    for (; p + LANES <= k; p += LANES) {                                                          \
      VEC av[MR], bv[NR];                                                                         \
      for (int i = 0; i < MR; i++) av[i] = load##LANES(a + (size_t)i * lda + p);                  \
      for (int j = 0; j < NR; j++) bv[j] = load##LANES(b + (size_t)j * ldb + p);                  \
      for (int i = 0; i < MR; i++)                                                                \
        for (int j = 0; j < NR; j++) acc[i * NR + j] += av[i] * bv[j];                            \
    }                                                                                             \
    VEC sums = sum_each##LANES(acc);                                                              \
    for (int i = 0; i < MR; i++)                                                                  \
      for (int j = 0; j < NR; j++) {                                                              \
        float t = sums[i * NR + j];                                                               \
        for (int q = p; q < k; q++) t += a[(size_t)i * lda + q] * b[(size_t)j * ldb + q];         \
        out[i * NR + j] = t;                                                                      \
      }                                                                                           \
  }
#define TILE16(MR, NR) TILE(v16, 16, "avx512f", MR, NR)
#define TILE8(MR, NR) TILE(v8, 8, "avx2,fma", MR, NR)
TILE16(4, 4) TILE16(3, 4) TILE16(2, 4) TILE16(1, 4) TILE16(4, 1) TILE16(3, 1) TILE16(2, 1) TILE16(1, 1)
TILE8(2, 4) TILE8(1, 4) TILE8(2, 1) TILE8(1, 1)

typedef void (*tile_fn)(int, const float *, int, const float *, int, float *);
typedef struct {
  int bits, rows;       /* vector width; rows of x a full tile takes */
  int best_rows;        /* the default SKINNY rows: up to here it beats OpenBLAS */
  tile_fn by_four[5];   /* [rows of x]: against 4 rows of W */
  tile_fn by_one[5];    /* against 1 row of W */
} kernel_set;
static const kernel_set AVX512 = {512, 4, SKINNY_ROWS, {0, tile16_1x4, tile16_2x4, tile16_3x4, tile16_4x4},
                                  {0, tile16_1x1, tile16_2x1, tile16_3x1, tile16_4x1}};
static const kernel_set AVX2 = {256, 2, SKINNY_ROWS_AVX2, {0, tile8_1x4, tile8_2x4, 0, 0},
                                {0, tile8_1x1, tile8_2x1, 0, 0}};
static const kernel_set *kernels; /* the widest the CPU has; NULL: none, the kernel is off */

/* Depth is taken in chunks of KC, so the 4 rows of W a tile reads (4 x KC floats) stay in the
   L1 cache while every row block of x passes over them. */
#define KC 1024

typedef struct {
  int m, n, k, lda, ldb, ldc, parts;
  float alpha, beta;
  const float *a, *b;
  float *c;
  const kernel_set *set;
} product_t;

/* Rows [n0, n1) of W: c[:, n0:n1] = alpha x W[n0:n1].T + beta c[:, n0:n1]. */
static void skinny_part(const product_t *q, int n0, int n1) {
  float out[16], sum[SKINNY_MAX_ROWS * 4];
  for (int j = n0; j < n1;) {
    int nr = n1 - j >= 4 ? 4 : 1;
    for (int p = 0; p < q->k; p += KC) {
      int kc = q->k - p < KC ? q->k - p : KC;
      for (int i = 0; i < q->m; i += q->set->rows) {
        int mr = q->m - i < q->set->rows ? q->m - i : q->set->rows;
        (nr == 4 ? q->set->by_four : q->set->by_one)[mr](kc, q->a + (size_t)i * q->lda + p, q->lda,
                                                         q->b + (size_t)j * q->ldb + p, q->ldb, out);
        for (int r = 0; r < mr; r++)
          for (int s = 0; s < nr; s++) sum[(i + r) * 4 + s] = (p ? sum[(i + r) * 4 + s] : 0.0f) + out[r * nr + s];
      }
    }
    for (int i = 0; i < q->m; i++)
      for (int s = 0; s < nr; s++) { /* beta = 0 ignores c's old contents: MLX hands it uninitialised */
        float *y = q->c + (size_t)i * q->ldc + j + s;
        *y = q->alpha * sum[i * 4 + s] + (q->beta == 0.0f ? 0.0f : q->beta * *y);
      }
    j += nr;
  }
}

/* Part t of `parts`: rows of W split evenly, on multiples of 4. */
static void skinny_share(const product_t *q, int t) {
  int per = ((q->n + q->parts - 1) / q->parts + 3) & ~3;
  int n0 = t * per < q->n ? t * per : q->n, n1 = n0 + per < q->n ? n0 + per : q->n;
  if (n0 < n1) skinny_part(q, n0, n1);
}

/* The pool: workers that each take one part of every product, spinning a while for the next one
   (decoding calls back within microseconds) and then sleeping. One product at a time uses it; a
   call from a second thread meanwhile runs on its caller alone. */
#define MAX_THREADS 16
#define SPINS 20000
static pthread_mutex_t pool_busy = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t wake_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static product_t posted_product;
static unsigned posted;   /* products posted so far */
static unsigned finished; /* workers done with the current one */
static int workers, threads;
static unsigned start_gen[MAX_THREADS];

static void *pool_worker(void *arg) {
  int t = (int)(size_t)arg;
  unsigned seen = start_gen[t];
  for (;;) {
    for (int spins = 0; __atomic_load_n(&posted, __ATOMIC_ACQUIRE) == seen;) {
      if (++spins < SPINS) {
        __builtin_ia32_pause();
        continue;
      }
      pthread_mutex_lock(&wake_lock);
      while (__atomic_load_n(&posted, __ATOMIC_ACQUIRE) == seen) pthread_cond_wait(&wake, &wake_lock);
      pthread_mutex_unlock(&wake_lock);
    }
    seen = __atomic_load_n(&posted, __ATOMIC_ACQUIRE);
    product_t q = posted_product;
    if (t < q.parts) skinny_share(&q, t);
    __atomic_add_fetch(&finished, 1, __ATOMIC_ACQ_REL);
  }
  return NULL;
}

/* After fork() the child has none of the parent's workers. */
static void pool_forget(void) {
  pthread_mutex_init(&pool_busy, NULL);
  pthread_mutex_init(&wake_lock, NULL);
  pthread_cond_init(&wake, NULL);
  workers = threads = 0;
  posted = finished = 0;
}

static int thread_count(void) {
  int (*get)(void) = (int (*)(void))dlsym(RTLD_DEFAULT, "openblas_get_num_threads");
  int n = get ? get() : 1;
  return n < 1 ? 1 : n > MAX_THREADS ? MAX_THREADS : n;
}

static void skinny(const product_t *in) {
  product_t q = *in;
  if (pthread_mutex_trylock(&pool_busy) != 0) {
    q.parts = 1;
    skinny_share(&q, 0);
    return;
  }
  if (threads == 0) {
    threads = thread_count();
    for (int t = 1; t < threads; t++) {
      pthread_t id;
      start_gen[t] = posted;
      if (pthread_create(&id, NULL, pool_worker, (void *)(size_t)t) != 0) break;
      pthread_detach(id);
      workers++;
    }
  }
  /* at least 64 rows of W a part: below that a part costs less than waking a worker */
  q.parts = 1 + workers < (q.n + 63) / 64 ? 1 + workers : (q.n + 63) / 64;
  if (q.parts > 1) {
    posted_product = q;
    __atomic_store_n(&finished, 0, __ATOMIC_RELEASE);
    pthread_mutex_lock(&wake_lock);
    __atomic_add_fetch(&posted, 1, __ATOMIC_ACQ_REL);
    pthread_cond_broadcast(&wake);
    pthread_mutex_unlock(&wake_lock);
  }
  skinny_share(&q, 0);
  if (q.parts > 1)
    while (__atomic_load_n(&finished, __ATOMIC_ACQUIRE) != (unsigned)workers) __builtin_ia32_pause();
  pthread_mutex_unlock(&pool_busy);
  __atomic_fetch_add(&skinny_calls, 1, __ATOMIC_RELAXED);
}

/* Products of 2 to `rows` rows go to skinny (0 or 1: none; at most SKINNY_MAX_ROWS; < 0 changes
   nothing). Returns the setting in force: 0 where the CPU has no kernel (see skinny_set_width).
   Benchmarks time both paths in one process. */
int skinny_set_rows(int rows) {
  if (rows < 0) return skinny_rows;
  skinny_rows = !kernels ? 0 : rows > SKINNY_MAX_ROWS ? SKINNY_MAX_ROWS : rows;
  return skinny_rows;
}

/* The tiles' vector width: 512 (AVX-512), 256 (AVX2 with FMA), or 0 (none: the kernel is off);
   the widest the CPU has unless set. Setting one also sets the rows to that width's default, what
   a CPU with no wider one gets. A width the CPU lacks, or < 0, changes nothing. Returns the width
   in force. Tests and benchmarks run both widths where the CPU has both. */
int skinny_set_width(int bits) {
  __builtin_cpu_init();
  const kernel_set *set;
  if (bits == 512 && __builtin_cpu_supports("avx512f")) set = &AVX512;
  else if (bits == 256 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) set = &AVX2;
  else if (bits == 0) set = NULL;
  else return kernels ? kernels->bits : 0;
  kernels = set;
  skinny_rows = set ? set->best_rows : 0;
  return kernels ? kernels->bits : 0;
}

/* The threads a product runs on (its caller and the pool's workers); 0 before the first one. */
int skinny_threads(void) { return threads ? 1 + workers : 0; }

__attribute__((constructor)) static void skinny_setup(void) {
  if (skinny_set_width(512) != 512) skinny_set_width(256);
  pthread_atfork(NULL, NULL, pool_forget);
}
#else
int skinny_set_rows(int rows) { (void)rows; return 0; }
int skinny_set_width(int bits) { (void)bits; return 0; }
int skinny_threads(void) { return 0; }
#endif

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
#ifdef SKINNY_KERNEL
  const kernel_set *set = kernels;
  if (forwarding && set && k > 0 && m >= 2 && m <= skinny_rows && n >= 1 && trans_a == NO_TRANS && trans_b == TRANS) {
    product_t q = {m, n, k, lda, ldb, ldc, 1, alpha, beta, a, b, c, set};
    skinny(&q);
    return;
  }
#endif
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
