/* The GEMM engine shared by sgemm and the convolutions (not part of the Python contract):
 * operands and packing (packing.c), the blocked frame (gemm.c). The micro-kernels behind
 * it are in microkernel.c. Callers: gemm.c, conv.c; packing.c calls nothing of theirs. */
#ifndef CNNX_GEMM_INTERNAL_H
#define CNNX_GEMM_INTERNAL_H

#include "microkernel.h"
#define GEMM_MC 96     /* rows of a packed A block: 96 x 256 floats = 96 KiB, in L2 */
#define GEMM_NC 256    /* columns of a packed B block */
#define GEMM_KC 256    /* depth of one block; k is split into equal blocks of at most this */

#define GEMM_NC_SHARED 1024   /* B block shared by all threads in the large-GEMM path (L3) */

/* Per-thread workspace: packed A block, packed B block, one edge tile, one edge bias. */
#define GEMM_WORKSPACE_FLOATS \
    ((long)GEMM_MC * GEMM_KC + (long)GEMM_KC * GEMM_NC + GEMM_MR * GEMM_NR + GEMM_NR + 64)

enum { OPERAND_MATRIX, OPERAND_IM2COL, OPERAND_IM2COL_TRANSPOSED };

/* Where the elements of a GEMM operand live. A operands are indexed (row, k), B operands
 * (k, column). MATRIX: element (r, s) at data[r*row_stride + s*col_stride]. IM2COL: rows are
 * output pixels, k the (tap, channel) index, read from a conv source. IM2COL_TRANSPOSED:
 * rows are (tap, channel), k the output pixel (the grad-kernel GEMM). */
typedef struct {
    int kind;
    const float *data;
    long row_stride, col_stride;
    const cnnx_conv_geometry *geometry;
} gemm_operand;

/* k is split into blocks that depend on k alone, so sums never depend on n_threads. */
int gemm_k_block(int k);

/* c[i0:i0+mc, j0:j0+nc] = a[i0:.., k0:k1] @ b[k0:k1, j0:..] (+ bias[j]) (relu), serially.
 * bias points at bias[0] (column j0 reads bias[j0]). */
void gemm_tile(int i0, int mc, int j0, int nc, int k0, int k1, const gemm_operand *a,
               const gemm_operand *b, float *c, long ldc, const float *bias, int relu,
               int direct_b, float *workspace);

/* The whole product c[m,n], parallel over MC x NC output tiles. */
void gemm_run(int m, int n, int k, const gemm_operand *a, const gemm_operand *b, float *c,
              long ldc, const float *bias, int relu, int n_threads, float *workspace);

/* dst[p*6 + r] = a(i0 + r, k0 + p) for r < rows, zero for the rows past the edge. */
void pack_a_panel(const gemm_operand *a, int i0, int rows, int k0, int kc, float *dst);

/* dst[p*16 + j] = b(k0 + p, j0 + j) for j < cols, zero past the edge. */
void pack_b_panel(const gemm_operand *b, int k0, int kc, int j0, int cols, float *dst);

/* dst[t*dst_stride] = im2col(source)[pixel, k0 + t] for t < length (zeros in the padding). */
void im2col_row_segment(const cnnx_conv_geometry *g, const float *source, long pixel, int k0,
                        int length, float *dst, int dst_stride);

/* c[0:rows, 0:cols] (=, or += when accumulate) a @ b over kc (strided operands, as a
 * micro-kernel reads them; reads 6 full rows of a and 16 full columns of b). */
void gemm_micro_tile(int kc, const float *a, long a_row_stride, long a_k_stride,
                     const float *b, long b_k_stride, float *c, long ldc, int rows, int cols,
                     int accumulate, float *edge_tile);

/* gemm_micro_tile for rows of a at any offsets: a(r, p) = a[row_offsets[r] + p*a_k_stride]
 * for r < rows (row_offsets holds 6 entries; those past rows must point at readable data). */
void gemm_gathered_tile(int kc, const float *a, const long *row_offsets, long a_k_stride,
                        const float *b, long b_k_stride, float *c, long ldc, int rows, int cols,
                        int accumulate, float *edge_tile);

#endif
