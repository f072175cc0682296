/* Micro-kernels: the only code that knows the instruction set (BLIS's kernels/ layer).
 *
 * Design: one portable C kernel set and one AVX2+FMA set (intrinsics with named
 * accumulators, target attribute, no -march flag); cnnx_set_isa / cnnx_get_isa pick one at
 * run time with __builtin_cpu_supports, and micro_kernels() hands the frame the chosen
 * table. Nothing else in csrc/ dispatches on the ISA for the GEMM.
 */
#include <string.h>

#include "microkernel.h"

#if defined(__x86_64__) || defined(__i386__)
#define CNNX_X86 1
#include <immintrin.h>
#else
#define CNNX_X86 0
#endif

/* ------------------------------------------------------------------ portable micro-kernel */

static void micro_kernel_generic(int kc, const float *a, long a_row_stride, long a_k_stride,
                                 const float *b, long b_k_stride, float *c, long ldc,
                                 int accumulate, const float *bias, int relu)
{
    float acc[GEMM_MR][GEMM_NR];
    memset(acc, 0, sizeof(acc));
    for (int p = 0; p < kc; ++p) {
        for (int r = 0; r < GEMM_MR; ++r) {
            float a_value = a[r * a_row_stride];
            for (int j = 0; j < GEMM_NR; ++j)
                acc[r][j] += a_value * b[j];
        }
        a += a_k_stride;
        b += b_k_stride;
    }
    for (int r = 0; r < GEMM_MR; ++r) {
        float *row = c + r * ldc;
        for (int j = 0; j < GEMM_NR; ++j) {
            float value = accumulate ? row[j] + acc[r][j] : acc[r][j];
            if (bias) value += bias[j];
            if (relu) value = value < 0.0f ? 0.0f : value;   /* NaN stays NaN */
            row[j] = value;
        }
    }
}

/* ------------------------------------------------------------------ AVX2 + FMA micro-kernel */
#if CNNX_X86

#define AVX2 __attribute__((target("avx2,fma")))

/* The epilogue of both AVX2 kernels: one 6x16 tile of accumulators (+ C when accumulating,
 * + bias, then ReLU) stored to c. Inlined: the accumulators stay in registers. */
static inline __attribute__((always_inline)) AVX2 void
store_row_avx2(float *row, __m256 v0, __m256 v1, int accumulate, int has_bias, __m256 bias0,
               __m256 bias1, int relu)
{
    if (accumulate) {
        v0 = _mm256_add_ps(_mm256_loadu_ps(row), v0);
        v1 = _mm256_add_ps(_mm256_loadu_ps(row + 8), v1);
    }
    if (has_bias) {
        v0 = _mm256_add_ps(v0, bias0);
        v1 = _mm256_add_ps(v1, bias1);
    }
    if (relu) {                 /* max_ps returns its second operand on NaN: NaN propagates */
        const __m256 zero = _mm256_setzero_ps();
        v0 = _mm256_max_ps(zero, v0);
        v1 = _mm256_max_ps(zero, v1);
    }
    _mm256_storeu_ps(row, v0);
    _mm256_storeu_ps(row + 8, v1);
}

static inline __attribute__((always_inline)) AVX2 void
store_tile_avx2(float *c, long ldc, int accumulate, const float *bias, int relu,
                __m256 c00, __m256 c01, __m256 c10, __m256 c11, __m256 c20, __m256 c21,
                __m256 c30, __m256 c31, __m256 c40, __m256 c41, __m256 c50, __m256 c51)
{
    __m256 bias0 = _mm256_setzero_ps(), bias1 = _mm256_setzero_ps();
    if (bias) {
        bias0 = _mm256_loadu_ps(bias);
        bias1 = _mm256_loadu_ps(bias + 8);
    }
    store_row_avx2(c + 0 * ldc, c00, c01, accumulate, bias != NULL, bias0, bias1, relu);
    store_row_avx2(c + 1 * ldc, c10, c11, accumulate, bias != NULL, bias0, bias1, relu);
    store_row_avx2(c + 2 * ldc, c20, c21, accumulate, bias != NULL, bias0, bias1, relu);
    store_row_avx2(c + 3 * ldc, c30, c31, accumulate, bias != NULL, bias0, bias1, relu);
    store_row_avx2(c + 4 * ldc, c40, c41, accumulate, bias != NULL, bias0, bias1, relu);
    store_row_avx2(c + 5 * ldc, c50, c51, accumulate, bias != NULL, bias0, bias1, relu);
}

/* Named accumulators (not arrays) keep all 12 in registers: gcc spills arrays here. */
static inline __attribute__((always_inline)) AVX2 void
micro_kernel_avx2_body(int kc, const float *a, long a_row_stride, long a_k_stride,
                       const float *b, long b_k_stride, float *c, long ldc, int accumulate,
                       const float *bias, int relu)
{
    __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
    __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
    __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
    __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
    __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps();
    __m256 c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
    #pragma GCC unroll 4
    for (int p = 0; p < kc; ++p, a += a_k_stride) {
        __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
        __m256 a_value = _mm256_broadcast_ss(a);
        c00 = _mm256_fmadd_ps(a_value, b0, c00);
        c01 = _mm256_fmadd_ps(a_value, b1, c01);
        a_value = _mm256_broadcast_ss(a + a_row_stride);
        c10 = _mm256_fmadd_ps(a_value, b0, c10);
        c11 = _mm256_fmadd_ps(a_value, b1, c11);
        a_value = _mm256_broadcast_ss(a + 2 * a_row_stride);
        c20 = _mm256_fmadd_ps(a_value, b0, c20);
        c21 = _mm256_fmadd_ps(a_value, b1, c21);
        a_value = _mm256_broadcast_ss(a + 3 * a_row_stride);
        c30 = _mm256_fmadd_ps(a_value, b0, c30);
        c31 = _mm256_fmadd_ps(a_value, b1, c31);
        a_value = _mm256_broadcast_ss(a + 4 * a_row_stride);
        c40 = _mm256_fmadd_ps(a_value, b0, c40);
        c41 = _mm256_fmadd_ps(a_value, b1, c41);
        a_value = _mm256_broadcast_ss(a + 5 * a_row_stride);
        c50 = _mm256_fmadd_ps(a_value, b0, c50);
        c51 = _mm256_fmadd_ps(a_value, b1, c51);
        b += b_k_stride;
    }
    store_tile_avx2(c, ldc, accumulate, bias, relu, c00, c01, c10, c11, c20, c21, c30, c31,
                    c40, c41, c50, c51);
}

/* Packed panels: constant strides let gcc use fixed addressing. */
static AVX2 void micro_kernel_avx2_packed(int kc, const float *a, long a_row_stride,
                                          long a_k_stride, const float *b, long b_k_stride,
                                          float *c, long ldc, int accumulate,
                                          const float *bias, int relu)
{
    (void)a_row_stride;
    (void)a_k_stride;
    (void)b_k_stride;
    micro_kernel_avx2_body(kc, a, 1, GEMM_MR, b, GEMM_NR, c, ldc, accumulate, bias,
                           relu);
}

static AVX2 void micro_kernel_avx2_strided(int kc, const float *a, long a_row_stride,
                                           long a_k_stride, const float *b, long b_k_stride,
                                           float *c, long ldc, int accumulate,
                                           const float *bias, int relu)
{
    micro_kernel_avx2_body(kc, a, a_row_stride, a_k_stride, b, b_k_stride, c, ldc,
                           accumulate, bias, relu);
}

/* Rows of A adjacent in memory (the grad-kernel GEMM): constant offsets for the broadcasts. */
static AVX2 void micro_kernel_avx2_adjacent_rows(int kc, const float *a, long a_row_stride,
                                                 long a_k_stride, const float *b,
                                                 long b_k_stride, float *c, long ldc,
                                                 int accumulate, const float *bias, int relu)
{
    (void)a_row_stride;
    micro_kernel_avx2_body(kc, a, 1, a_k_stride, b, b_k_stride, c, ldc, accumulate,
                           bias, relu);
}

#endif

static void conv_kernel_generic(int taps, const int *tap_offsets, const int *b_tap_offsets,
                                int channels, const float *a, const long *row_offsets,
                                const float *b_base, float *c, long ldc, const float *bias,
                                int relu)
{
    float acc[GEMM_MR][GEMM_NR];
    memset(acc, 0, sizeof(acc));
    for (int tap = 0; tap < taps; ++tap) {
        const float *a_tap = a + tap_offsets[tap];
        const float *b = b_base + (b_tap_offsets ? b_tap_offsets[tap]
                                                 : tap * channels * GEMM_NR);
        for (int p = 0; p < channels; ++p, b += GEMM_NR)
            for (int r = 0; r < GEMM_MR; ++r) {
                float a_value = a_tap[row_offsets[r] + p];
                for (int j = 0; j < GEMM_NR; ++j)
                    acc[r][j] += a_value * b[j];
            }
    }
    for (int r = 0; r < GEMM_MR; ++r)
        for (int j = 0; j < GEMM_NR; ++j) {
            float value = acc[r][j];
            if (bias) value += bias[j];
            if (relu) value = value < 0.0f ? 0.0f : value;   /* NaN stays NaN */
            c[r * ldc + j] = value;
        }
}

static void gathered_kernel_generic(int kc, const float *a, const long *row_offsets,
                                    long a_k_stride, const float *b, long b_k_stride, float *c,
                                    long ldc, int accumulate)
{
    float acc[GEMM_MR][GEMM_NR];
    memset(acc, 0, sizeof(acc));
    for (int p = 0; p < kc; ++p, b += b_k_stride)
        for (int r = 0; r < GEMM_MR; ++r) {
            float a_value = a[row_offsets[r] + p * a_k_stride];
            for (int j = 0; j < GEMM_NR; ++j)
                acc[r][j] += a_value * b[j];
        }
    for (int r = 0; r < GEMM_MR; ++r)
        for (int j = 0; j < GEMM_NR; ++j)
            c[r * ldc + j] = accumulate ? c[r * ldc + j] + acc[r][j] : acc[r][j];
}

#if CNNX_X86
/* Rows at any offsets (six pointers). With tap lists (the direct convolution): k runs over
 * taps x kc, tap t reading row + tap_offsets[t] and b from b_base + b_tap_offsets[t]. */
static inline __attribute__((always_inline)) AVX2 void
gathered_avx2_body(int taps, const int *tap_offsets, const int *b_tap_offsets, int kc,
                   const float *a,
                   const long *row_offsets, long a_k_stride, const float *b_base,
                   long b_k_stride, float *c, long ldc, int accumulate, const float *bias,
                   int relu)
{
    const float *b = b_base;
    __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
    __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
    __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
    __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
    __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps();
    __m256 c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
    for (int tap = 0; tap < taps; ++tap) {
      const float *a_tap = tap_offsets ? a + tap_offsets[tap] : a;
      if (b_tap_offsets)
          b = b_base + b_tap_offsets[tap];
      const float *a0 = a_tap + row_offsets[0], *a1 = a_tap + row_offsets[1];
      const float *a2 = a_tap + row_offsets[2], *a3 = a_tap + row_offsets[3];
      const float *a4 = a_tap + row_offsets[4], *a5 = a_tap + row_offsets[5];
      #pragma GCC unroll 4
      for (long p = 0; p < (long)kc * a_k_stride; p += a_k_stride) {
        __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
        __m256 a_value = _mm256_broadcast_ss(a0 + p);
        c00 = _mm256_fmadd_ps(a_value, b0, c00);
        c01 = _mm256_fmadd_ps(a_value, b1, c01);
        a_value = _mm256_broadcast_ss(a1 + p);
        c10 = _mm256_fmadd_ps(a_value, b0, c10);
        c11 = _mm256_fmadd_ps(a_value, b1, c11);
        a_value = _mm256_broadcast_ss(a2 + p);
        c20 = _mm256_fmadd_ps(a_value, b0, c20);
        c21 = _mm256_fmadd_ps(a_value, b1, c21);
        a_value = _mm256_broadcast_ss(a3 + p);
        c30 = _mm256_fmadd_ps(a_value, b0, c30);
        c31 = _mm256_fmadd_ps(a_value, b1, c31);
        a_value = _mm256_broadcast_ss(a4 + p);
        c40 = _mm256_fmadd_ps(a_value, b0, c40);
        c41 = _mm256_fmadd_ps(a_value, b1, c41);
        a_value = _mm256_broadcast_ss(a5 + p);
        c50 = _mm256_fmadd_ps(a_value, b0, c50);
        c51 = _mm256_fmadd_ps(a_value, b1, c51);
        b += b_k_stride;
      }
    }
    store_tile_avx2(c, ldc, accumulate, bias, relu, c00, c01, c10, c11, c20, c21, c30, c31,
                    c40, c41, c50, c51);
}

static AVX2 void gathered_kernel_avx2(int kc, const float *a, const long *row_offsets,
                                      long a_k_stride, const float *b, long b_k_stride,
                                      float *c, long ldc, int accumulate)
{
    gathered_avx2_body(1, NULL, NULL, kc, a, row_offsets, a_k_stride, b, b_k_stride, c, ldc,
                       accumulate, NULL, 0);
}

static AVX2 void conv_kernel_avx2(int taps, const int *tap_offsets, const int *b_tap_offsets,
                                  int channels, const float *a, const long *row_offsets,
                                  const float *b, float *c, long ldc, const float *bias,
                                  int relu)
{
    gathered_avx2_body(taps, tap_offsets, b_tap_offsets, channels, a, row_offsets, 1, b,
                       GEMM_NR, c, ldc, 0, bias, relu);
}
#endif

static void grad_tile_generic(int k_rows, const float *a, const long *a_offsets,
                              long a_pixel_stride, long a_row_stride, int rows, int cols,
                              const float *g, long g_pixel_stride, long g_prefetch_ahead,
                              float *c, long ldc, float *bias, int accumulate)
{
    float acc[GRAD_TILE_MAX_ROWS][GEMM_NR], bias_acc[GEMM_NR];
    (void)g_prefetch_ahead;
    memset(acc, 0, sizeof(acc));
    memset(bias_acc, 0, sizeof(bias_acc));
    for (int y = 0; y < rows; ++y)
        for (int x = 0; x < cols; ++x, g += g_pixel_stride) {
            long pixel = y * a_row_stride + x * a_pixel_stride;
            for (int j = 0; bias && j < GEMM_NR; ++j)
                bias_acc[j] += g[j];
            for (int r = 0; r < k_rows; ++r) {
                float a_value = a[a_offsets[r] + pixel];
                for (int j = 0; j < GEMM_NR; ++j)
                    acc[r][j] += a_value * g[j];
            }
        }
    for (int r = 0; r < k_rows; ++r)
        for (int j = 0; j < GEMM_NR; ++j)
            c[r * ldc + j] = accumulate ? c[r * ldc + j] + acc[r][j] : acc[r][j];
    for (int j = 0; bias && j < GEMM_NR; ++j)
        bias[j] = accumulate ? bias[j] + bias_acc[j] : bias_acc[j];
}

#if CNNX_X86
static inline __attribute__((always_inline)) AVX2 void
grad_tile_store_avx2(float *target, __m256 value, int accumulate)
{
    if (accumulate)
        value = _mm256_add_ps(_mm256_loadu_ps(target), value);
    _mm256_storeu_ps(target, value);
}

/* The two g vectors of a pixel stay in registers while each k row's value is broadcast:
 * 12 accumulators + 2 + 1 registers (10 + 2 for the bias + 2 + 1). Named accumulators
 * (gcc stores arrays of them to the stack every pixel); k_rows and with_bias are constants
 * after inlining, so the unused ones and their FMAs drop out. */
static inline __attribute__((always_inline)) AVX2 void
grad_tile_avx2_body(const int k_rows, const int with_bias, const float *a,
                    const long *a_offsets, long a_pixel_stride, long a_row_stride, int rows,
                    int cols, const float *g, long g_pixel_stride, long g_prefetch_ahead,
                    float *c, long ldc, float *bias, int accumulate)
{
    __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
    __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
    __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
    __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
    __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps();
    __m256 c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
    __m256 bias0 = _mm256_setzero_ps(), bias1 = _mm256_setzero_ps();
    const float *a0 = a + a_offsets[0];
    const float *a1 = a + a_offsets[k_rows > 1 ? 1 : 0], *a2 = a + a_offsets[k_rows > 2 ? 2 : 0];
    const float *a3 = a + a_offsets[k_rows > 3 ? 3 : 0], *a4 = a + a_offsets[k_rows > 4 ? 4 : 0];
    const float *a5 = a + a_offsets[k_rows > 5 ? 5 : 0];
    for (int y = 0; y < rows; ++y) {
        long pixel = y * a_row_stride;
        for (int x = 0; x < cols; ++x, pixel += a_pixel_stride, g += g_pixel_stride) {
            if (g_prefetch_ahead)
                _mm_prefetch((const char *)(g + g_prefetch_ahead), _MM_HINT_T1);
            __m256 g0 = _mm256_loadu_ps(g), g1 = _mm256_loadu_ps(g + 8);
            if (with_bias) {
                bias0 = _mm256_add_ps(bias0, g0);
                bias1 = _mm256_add_ps(bias1, g1);
            }
            __m256 a_value = _mm256_broadcast_ss(a0 + pixel);
            c00 = _mm256_fmadd_ps(a_value, g0, c00);
            c01 = _mm256_fmadd_ps(a_value, g1, c01);
            if (k_rows > 1) {
                a_value = _mm256_broadcast_ss(a1 + pixel);
                c10 = _mm256_fmadd_ps(a_value, g0, c10);
                c11 = _mm256_fmadd_ps(a_value, g1, c11);
            }
            if (k_rows > 2) {
                a_value = _mm256_broadcast_ss(a2 + pixel);
                c20 = _mm256_fmadd_ps(a_value, g0, c20);
                c21 = _mm256_fmadd_ps(a_value, g1, c21);
            }
            if (k_rows > 3) {
                a_value = _mm256_broadcast_ss(a3 + pixel);
                c30 = _mm256_fmadd_ps(a_value, g0, c30);
                c31 = _mm256_fmadd_ps(a_value, g1, c31);
            }
            if (k_rows > 4) {
                a_value = _mm256_broadcast_ss(a4 + pixel);
                c40 = _mm256_fmadd_ps(a_value, g0, c40);
                c41 = _mm256_fmadd_ps(a_value, g1, c41);
            }
            if (k_rows > 5) {
                a_value = _mm256_broadcast_ss(a5 + pixel);
                c50 = _mm256_fmadd_ps(a_value, g0, c50);
                c51 = _mm256_fmadd_ps(a_value, g1, c51);
            }
        }
    }
    __m256 tile[6][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41},
                         {c50, c51}};
    for (int r = 0; r < k_rows; ++r) {
        grad_tile_store_avx2(c + r * ldc, tile[r][0], accumulate);
        grad_tile_store_avx2(c + r * ldc + 8, tile[r][1], accumulate);
    }
    if (with_bias) {
        grad_tile_store_avx2(bias, bias0, accumulate);
        grad_tile_store_avx2(bias + 8, bias1, accumulate);
    }
}

/* One instance per tile shape (k rows, with or without the bias). */
static AVX2 void grad_tile_avx2(int k_rows, const float *a, const long *a_offsets,
                                long a_pixel_stride, long a_row_stride, int rows, int cols,
                                const float *g, long g_pixel_stride, long g_prefetch_ahead,
                                float *c, long ldc, float *bias, int accumulate)
{
#define GRAD_TILE_CASE(k_rows, with_bias)                                                     \
    case 2 * k_rows + with_bias:                                                              \
        grad_tile_avx2_body(k_rows, with_bias, a, a_offsets, a_pixel_stride, a_row_stride,   \
                            rows, cols, g, g_pixel_stride, g_prefetch_ahead, c, ldc, bias,    \
                            accumulate);                                                      \
        return;
    switch (2 * k_rows + (bias != NULL)) {
        GRAD_TILE_CASE(1, 0) GRAD_TILE_CASE(2, 0) GRAD_TILE_CASE(3, 0)
        GRAD_TILE_CASE(4, 0) GRAD_TILE_CASE(5, 0) GRAD_TILE_CASE(6, 0)
        GRAD_TILE_CASE(1, 1) GRAD_TILE_CASE(2, 1) GRAD_TILE_CASE(3, 1)
        GRAD_TILE_CASE(4, 1) GRAD_TILE_CASE(5, 1) GRAD_TILE_CASE(6, 1)
    }
#undef GRAD_TILE_CASE
}
#endif

/* ------------------------------------------------------------------ run-time choice */

static int current_isa = CNNX_ISA_AUTO;    /* resolved on first use */

int cnnx_cpu_has_avx2_fma(void)
{
#if CNNX_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

int cnnx_set_isa(int isa)
{
    if (isa == CNNX_ISA_AUTO || (isa == CNNX_ISA_AVX2 && !cnnx_cpu_has_avx2_fma()))
        isa = cnnx_cpu_has_avx2_fma() ? CNNX_ISA_AVX2 : CNNX_ISA_GENERIC;
    current_isa = isa;
    return current_isa;
}

int cnnx_get_isa(void)
{
    if (current_isa == CNNX_ISA_AUTO)
        cnnx_set_isa(CNNX_ISA_AUTO);
    return current_isa;
}

static const micro_kernel_table generic_table = {
    micro_kernel_generic, micro_kernel_generic, micro_kernel_generic, conv_kernel_generic,
    gathered_kernel_generic, grad_tile_generic};
#if CNNX_X86
static const micro_kernel_table avx2_table = {
    micro_kernel_avx2_packed, micro_kernel_avx2_strided, micro_kernel_avx2_adjacent_rows,
    conv_kernel_avx2, gathered_kernel_avx2, grad_tile_avx2};
#endif

const micro_kernel_table *micro_kernels(void)
{
#if CNNX_X86
    if (cnnx_get_isa() == CNNX_ISA_AVX2)
        return &avx2_table;
#endif
    return &generic_table;
}
