/* The GEMM frame: BLIS-style blocked single-precision GEMM with a fused bias/ReLU epilogue.
 *
 * Design:
 *   - Output is cut into MC x NC tiles; OpenMP threads take whole tiles, so every output
 *     element is computed by one thread in one fixed order: results do not depend on
 *     n_threads. Tiles are handed out dynamically: on a shared machine a descheduled thread
 *     then delays one tile, not a static half of the work.
 *   - Inside a tile, k runs in equal blocks of at most KC (chosen from k alone). For each
 *     block, B is packed into KC x 16 panels (L1) and A into KC x 6 panels (the A block sits
 *     in L2); a 6x16 micro-kernel then sweeps the tile. The first k block stores, later ones
 *     add, the last adds bias and applies ReLU.
 *   - An A operand may be an im2col view of a convolution input: packing builds its panels
 *     straight from the NHWC tensor, so the batch's im2col matrix never exists.
 *   - Operands already in the right shape are read in place (no packing) when packing would
 *     not pay: a row-major A feeding few column panels, a row-major B feeding few rows.
 *   - Packing lives in packing.c, the micro-kernels (and the ISA choice) in microkernel.c;
 *     this file only blocks, schedules and handles the edges.
 */
#include <string.h>

#include "gemm_internal.h"

#if CNNX_OPENMP
#include <omp.h>
#define THREAD_ID() omp_get_thread_num()
#else
#define THREAD_ID() 0
#endif

/* ------------------------------------------------------------------ driver */

int gemm_k_block(int k)
{
    int blocks = (k + GEMM_KC - 1) / GEMM_KC;
    return (k + blocks - 1) / blocks;
}

/* One micro-tile, with an edge copy when it sticks out of c (rows < 6 or cols < 16). */
static void micro_tile(micro_kernel_fn kernel, int kc, const float *a, long a_row_stride,
                       long a_k_stride, const float *b, long b_k_stride, float *c, long ldc,
                       int rows, int cols, int accumulate, const float *bias, int relu,
                       float *edge_tile, float *edge_bias)
{
    if (rows == GEMM_MR && cols == GEMM_NR) {
        kernel(kc, a, a_row_stride, a_k_stride, b, b_k_stride, c, ldc, accumulate, bias,
               relu);
        return;
    }
    for (int r = 0; r < rows; ++r)
        if (accumulate)
            memcpy(edge_tile + r * GEMM_NR, c + r * ldc, sizeof(float) * cols);
    if (bias) {
        memset(edge_bias, 0, sizeof(float) * GEMM_NR);
        memcpy(edge_bias, bias, sizeof(float) * cols);
    }
    kernel(kc, a, a_row_stride, a_k_stride, b, b_k_stride, edge_tile, GEMM_NR, accumulate,
           bias ? edge_bias : NULL, relu);
    for (int r = 0; r < rows; ++r)
        memcpy(c + r * ldc, edge_tile + r * GEMM_NR, sizeof(float) * cols);
}

void gemm_tile(int i0, int mc, int j0, int nc, int k0, int k1, const gemm_operand *a,
               const gemm_operand *b, float *c, long ldc, const float *bias, int relu,
               int direct_b, float *workspace)
{
    float *packed_a = workspace;
    float *packed_b = packed_a + (long)GEMM_MC * GEMM_KC;
    float *edge_tile = packed_b + (long)GEMM_KC * GEMM_NC;
    float *edge_bias = edge_tile + GEMM_MR * GEMM_NR;
    const micro_kernel_table *kernels = micro_kernels();
    micro_kernel_fn packed = kernels->packed, strided = kernels->strided;
    int kc_max = gemm_k_block(k1 - k0);
    int a_panels = (mc + GEMM_MR - 1) / GEMM_MR, b_panels = (nc + GEMM_NR - 1) / GEMM_NR;
    /* A read in place pays when each A panel meets few B panels (conv-shaped GEMMs) and its
     * rows are short: six rows far apart alias in L1 and the TLB (dense layers, k = 51200). */
    int direct_a = a->kind == OPERAND_MATRIX && b_panels <= 4 && a->col_stride == 1
                   && a->row_stride <= 1024;

    for (int kb = k0; kb < k1; kb += kc_max) {
        int kc = k1 - kb < kc_max ? k1 - kb : kc_max;
        int first = kb == k0, last = kb + kc == k1;
        if (!direct_b)
            for (int jp = 0; jp < b_panels; ++jp) {
                int cols = nc - jp * GEMM_NR < GEMM_NR ? nc - jp * GEMM_NR : GEMM_NR;
                pack_b_panel(b, kb, kc, j0 + jp * GEMM_NR, cols, packed_b + (long)jp * kc * GEMM_NR);
            }
        for (int ip = 0; ip < a_panels; ++ip) {
            int rows = mc - ip * GEMM_MR < GEMM_MR ? mc - ip * GEMM_MR : GEMM_MR;
            if (!direct_a || rows < GEMM_MR)
                pack_a_panel(a, i0 + ip * GEMM_MR, rows, kb, kc,
                             packed_a + (long)ip * kc * GEMM_MR);
        }
        for (int jp = 0; jp < b_panels; ++jp) {
            int j = j0 + jp * GEMM_NR;
            int cols = nc - jp * GEMM_NR < GEMM_NR ? nc - jp * GEMM_NR : GEMM_NR;
            const float *b_panel;
            long b_k_stride;
            if (direct_b && cols == GEMM_NR) {
                b_panel = b->data + kb * b->row_stride + j;
                b_k_stride = b->row_stride;
            } else {
                if (direct_b)                           /* the ragged last panel only */
                    pack_b_panel(b, kb, kc, j, cols, packed_b + (long)jp * kc * GEMM_NR);
                b_panel = packed_b + (long)jp * kc * GEMM_NR;
                b_k_stride = GEMM_NR;
            }
            micro_kernel_fn kernel = b_k_stride == GEMM_NR ? packed : strided;
            for (int ip = 0; ip < a_panels; ++ip) {
                int i = i0 + ip * GEMM_MR;
                int rows = mc - ip * GEMM_MR < GEMM_MR ? mc - ip * GEMM_MR : GEMM_MR;
                float *c_tile = c + (long)(i - i0) * ldc + (j - j0);
                const float *tile_bias = last && bias ? bias + j : NULL;
                if (direct_a && rows == GEMM_MR)
                    micro_tile(strided, kc, a->data + (long)i * a->row_stride + kb,
                               a->row_stride, 1, b_panel, b_k_stride, c_tile, ldc, rows, cols,
                               !first, tile_bias, relu && last, edge_tile, edge_bias);
                else
                    micro_tile(kernel, kc, packed_a + (long)ip * kc * GEMM_MR, 1, GEMM_MR,
                               b_panel, b_k_stride, c_tile, ldc, rows, cols, !first,
                               tile_bias, relu && last, edge_tile, edge_bias);
            }
        }
    }
}

/* Large GEMMs, BLIS loop order: for each NC x KC block of B, pack it once into a buffer all
 * threads share, then split the rows among the threads, each packing its own A block. The
 * row split may depend on n_threads (balance): each element's k order never does. */
static void gemm_run_shared_b(int m, int n, int k, const gemm_operand *a, const gemm_operand *b,
                              float *c, long ldc, const float *bias, int relu, int n_threads,
                              float *workspace)
{
    float *shared_b = workspace + (long)n_threads * GEMM_WORKSPACE_FLOATS;
    int kc_max = gemm_k_block(k);
    int blocks = (m + GEMM_MC - 1) / GEMM_MC;
    blocks = (blocks + n_threads - 1) / n_threads * n_threads;
    int mc_step = (m + blocks - 1) / blocks;
    mc_step = (mc_step + GEMM_MR - 1) / GEMM_MR * GEMM_MR;
    blocks = (m + mc_step - 1) / mc_step;
    micro_kernel_fn kernel = micro_kernels()->packed;
    (void)n_threads;

    #pragma omp parallel num_threads(n_threads) if (n_threads > 1)
    {
        float *packed_a = workspace + THREAD_ID() * GEMM_WORKSPACE_FLOATS;
        float *edge_tile = packed_a + (long)GEMM_MC * GEMM_KC + (long)GEMM_KC * GEMM_NC;
        float *edge_bias = edge_tile + GEMM_MR * GEMM_NR;
        for (int j0 = 0; j0 < n; j0 += GEMM_NC_SHARED) {
            int nc = n - j0 < GEMM_NC_SHARED ? n - j0 : GEMM_NC_SHARED;
            int b_panels = (nc + GEMM_NR - 1) / GEMM_NR;
            for (int k0 = 0; k0 < k; k0 += kc_max) {
                int kc = k - k0 < kc_max ? k - k0 : kc_max;
                int first = k0 == 0, last = k0 + kc == k;
                #pragma omp for schedule(static)
                for (int jp = 0; jp < b_panels; ++jp) {
                    int cols = nc - jp * GEMM_NR < GEMM_NR ? nc - jp * GEMM_NR : GEMM_NR;
                    pack_b_panel(b, k0, kc, j0 + jp * GEMM_NR, cols,
                                 shared_b + (long)jp * kc * GEMM_NR);
                }
                #pragma omp for schedule(dynamic)
                for (int block = 0; block < blocks; ++block) {
                    int i0 = block * mc_step;
                    int mc = m - i0 < mc_step ? m - i0 : mc_step;
                    int a_panels = (mc + GEMM_MR - 1) / GEMM_MR;
                    for (int ip = 0; ip < a_panels; ++ip) {
                        int rows = mc - ip * GEMM_MR < GEMM_MR ? mc - ip * GEMM_MR : GEMM_MR;
                        pack_a_panel(a, i0 + ip * GEMM_MR, rows, k0, kc,
                                     packed_a + (long)ip * kc * GEMM_MR);
                    }
                    for (int jp = 0; jp < b_panels; ++jp) {
                        int j = j0 + jp * GEMM_NR;
                        int cols = nc - jp * GEMM_NR < GEMM_NR ? nc - jp * GEMM_NR : GEMM_NR;
                        const float *tile_bias = last && bias ? bias + j : NULL;
                        for (int ip = 0; ip < a_panels; ++ip) {
                            int i = i0 + ip * GEMM_MR;
                            int rows = mc - ip * GEMM_MR < GEMM_MR ? mc - ip * GEMM_MR : GEMM_MR;
                            micro_tile(kernel, kc, packed_a + (long)ip * kc * GEMM_MR, 1,
                                       GEMM_MR, shared_b + (long)jp * kc * GEMM_NR, GEMM_NR,
                                       c + (long)i * ldc + j, ldc, rows, cols, !first,
                                       tile_bias, relu && last, edge_tile, edge_bias);
                        }
                    }
                }
            }
        }
    }
}

void gemm_run(int m, int n, int k, const gemm_operand *a, const gemm_operand *b, float *c,
              long ldc, const float *bias, int relu, int n_threads, float *workspace)
{
    cnnx_get_isa();                                    /* resolve before threads race on it */
    /* B reused by many row blocks and wide enough that re-packing it per tile would cost */
    if (m > 4 * GEMM_MC && n > 4 * GEMM_NR && k > 64) {
        gemm_run_shared_b(m, n, k, a, b, c, ldc, bias, relu, n_threads, workspace);
        return;
    }
    int row_tiles = (m + GEMM_MC - 1) / GEMM_MC, nc_step = GEMM_NC;
    /* Few rows (dense layers on a small batch): narrower column tiles give every thread work.
     * Tiling decides who computes an element, never the order of its sum. */
    while (nc_step > GEMM_NR && (long)row_tiles * ((n + nc_step - 1) / nc_step) < n_threads)
        nc_step /= 2;
    int column_tiles = (n + nc_step - 1) / nc_step;
    long tiles = (long)row_tiles * column_tiles;
    /* B read in place when few row tiles reuse it; only row-major B qualifies. */
    int direct_b = b->kind == OPERAND_MATRIX && b->col_stride == 1 && row_tiles <= 2;
    (void)n_threads;
    #pragma omp parallel for schedule(dynamic) num_threads(n_threads) if (n_threads > 1 && tiles > 1)
    for (long t = 0; t < tiles; ++t) {
        int i0 = (int)(t / column_tiles) * GEMM_MC, j0 = (int)(t % column_tiles) * nc_step;
        int mc = m - i0 < GEMM_MC ? m - i0 : GEMM_MC, nc = n - j0 < nc_step ? n - j0 : nc_step;
        gemm_tile(i0, mc, j0, nc, 0, k, a, b, c + (long)i0 * ldc + j0, ldc, bias, relu,
                  direct_b, workspace + THREAD_ID() * GEMM_WORKSPACE_FLOATS);
    }
}

void gemm_micro_tile(int kc, const float *a, long a_row_stride, long a_k_stride,
                     const float *b, long b_k_stride, float *c, long ldc, int rows, int cols,
                     int accumulate, float *edge_tile)
{
    const micro_kernel_table *kernels = micro_kernels();
    micro_kernel_fn kernel = a_row_stride == 1 ? kernels->adjacent_rows : kernels->strided;
    micro_tile(kernel, kc, a, a_row_stride, a_k_stride, b, b_k_stride, c, ldc, rows, cols,
               accumulate, NULL, 0, edge_tile, NULL);
}

void gemm_gathered_tile(int kc, const float *a, const long *row_offsets, long a_k_stride,
                        const float *b, long b_k_stride, float *c, long ldc, int rows, int cols,
                        int accumulate, float *edge_tile)
{
    gathered_kernel_fn kernel = micro_kernels()->gathered_rows;
    if (rows == GEMM_MR && cols == GEMM_NR) {
        kernel(kc, a, row_offsets, a_k_stride, b, b_k_stride, c, ldc, accumulate);
        return;
    }
    for (int r = 0; r < rows; ++r)
        if (accumulate)
            memcpy(edge_tile + r * GEMM_NR, c + r * ldc, sizeof(float) * cols);
    kernel(kc, a, row_offsets, a_k_stride, b, b_k_stride, edge_tile, GEMM_NR, accumulate);
    for (int r = 0; r < rows; ++r)
        memcpy(c + r * ldc, edge_tile + r * GEMM_NR, sizeof(float) * cols);
}

long cnnx_gemm_workspace_floats(int n_threads)
{
    return (long)n_threads * GEMM_WORKSPACE_FLOATS + (long)GEMM_KC * GEMM_NC_SHARED;
}

void cnnx_sgemm(int m, int n, int k, const float *a, int transpose_a, const float *b,
                int transpose_b, const float *bias, int relu, float *c, int n_threads,
                float *workspace)
{
    gemm_operand a_operand = {OPERAND_MATRIX, a, transpose_a ? 1 : k, transpose_a ? m : 1, 0};
    gemm_operand b_operand = {OPERAND_MATRIX, b, transpose_b ? 1 : n, transpose_b ? k : 1, 0};
    gemm_run(m, n, k, &a_operand, &b_operand, c, n, bias, relu, n_threads, workspace);
}

void cnnx_column_sums(int m, int n, const float *a, float *sums, int n_threads)
{
    (void)n_threads;
    /* Parallel over column strips; rows are added in order within each column. */
    #pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1 && n >= 256)
    for (int j0 = 0; j0 < n; j0 += 64) {
        int width = n - j0 < 64 ? n - j0 : 64;
        float strip[64];
        memset(strip, 0, sizeof(strip));
        for (int i = 0; i < m; ++i)
            for (int j = 0; j < width; ++j)
                strip[j] += a[(long)i * n + j0 + j];
        memcpy(sums + j0, strip, sizeof(float) * width);
    }
}
