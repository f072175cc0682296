/* The micro-kernel contract (internal): every kernel computes one GEMM_MR x GEMM_NR tile. */
#ifndef CNNX_MICROKERNEL_H
#define CNNX_MICROKERNEL_H

#include "cnnx_kernels.h"

#define GEMM_MR 6      /* micro-tile rows: 6x16 = 12 ymm accumulators + 2 for b + 1 for a */
#define GEMM_NR 16

/* c[0:6, 0:16] (=, or += when accumulate) sum_p a(r, p) * b(p, j), then + bias[j] and ReLU
 * when given. a(r, p) = a[r*a_row_stride + p*a_k_stride]; b(p, j) = b[p*b_k_stride + j]. */
typedef void (*micro_kernel_fn)(int kc, const float *a, long a_row_stride, long a_k_stride,
                                const float *b, long b_k_stride, float *c, long ldc,
                                int accumulate, const float *bias, int relu);

/* Direct convolution tile: c[0:6, 0:16] = sum over taps t < taps, channels p of
 * a[row_offsets[r] + a_tap_offsets[t] + p] * b[b_tap_offsets[t] + p*16 + j] (+ bias) (relu).
 * Rows at any offsets: a tile takes six real output pixels even across an output row's end,
 * so no junk columns are computed. The tap lists let a tile on the border leave out the taps
 * that read only padding (zeros); b_tap_offsets NULL: b_tap_offsets[t] = t*channels*16. */
typedef void (*conv_kernel_fn)(int taps, const int *a_tap_offsets, const int *b_tap_offsets,
                               int channels, const float *a, const long *row_offsets,
                               const float *b, float *c, long ldc, const float *bias,
                               int relu);

/* c[0:6, 0:16] (=, or += when accumulate) sum_p a(r, p) * b(p, j) with rows at any offsets:
 * a(r, p) = a[row_offsets[r] + p*a_k_stride] (the grad-kernel GEMM of a convolution whose
 * kernel row is narrower than 6 k rows: one tile then spans several kernel rows). */
typedef void (*gathered_kernel_fn)(int kc, const float *a, const long *row_offsets,
                                   long a_k_stride, const float *b, long b_k_stride, float *c,
                                   long ldc, int accumulate);

/* The kernel gradient of a stride-1 convolution with few channels, read in place (no im2col):
 * c[r, 0:16] (=, or += when accumulate) the sum over pixels (y, x) < (rows, cols), in pixel
 * order, of a[a_offsets[r] + y*a_row_stride + x*a_pixel_stride] * g[(y*cols + x) *
 * g_pixel_stride + j], for r < k_rows <= 6; bias[0:16] (unless NULL; then k_rows <= 5) the
 * same sum with a = 1, the bias gradient (its adds ride on the g loads the products make
 * anyway). a is the zero-padded input band (its offsets the taps), g the grad_output rows.
 * g_prefetch_ahead > 0: each pixel's g row that many floats ahead is prefetched (the next
 * rows, streamed from memory while these are computed). */
#define GRAD_TILE_MAX_ROWS 6
typedef void (*grad_tile_fn)(int k_rows, const float *a, const long *a_offsets,
                             long a_pixel_stride, long a_row_stride, int rows, int cols,
                             const float *g, long g_pixel_stride, long g_prefetch_ahead,
                             float *c, long ldc, float *bias, int accumulate);

typedef struct {
    micro_kernel_fn packed;          /* a packed (row stride 1, k stride 6), b packed (16) */
    micro_kernel_fn strided;         /* any strides */
    micro_kernel_fn adjacent_rows;   /* a row stride 1, any k stride (grad-kernel GEMM) */
    conv_kernel_fn conv;
    gathered_kernel_fn gathered_rows;
    grad_tile_fn grad_tile;          /* few-channel kernel gradient (conv.c) */
} micro_kernel_table;

/* The kernels of the instruction set in use (cnnx_set_isa); resolve it before threads start. */
const micro_kernel_table *micro_kernels(void);

#endif
