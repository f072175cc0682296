/* Convolutions as GEMMs over the whole batch (NHWC, HWIO).
 *
 * Design:
 *   - Forward: y[N*OH*OW, F] = im2col(x)[N*OH*OW, KH*KW*C] @ kernel[KH*KW*C, F]. The im2col
 *     operand is an OPERAND_IM2COL: the GEMM packs each 6-row panel straight from x, so no
 *     im2col matrix is ever materialised. Bias and ReLU ride in the GEMM epilogue.
 *   - Grad input is the same forward kernel run on grad_output with the weights flipped and
 *     transposed (Python prepares them) and a geometry whose input is dilated by the stride:
 *     each input cell gathers its own sum, so there are no scatter races and no col2im.
 *   - Grad kernel: [KH*KW*C, F] = im2col(x)^T @ grad_output, a reduction over N*OH*OW. The
 *     pixels are cut into fixed chunks of PIXEL_CHUNK; each chunk's partial product lands in
 *     its own slot, and the slots are added in chunk order: bit-identical for any n_threads.
 *   The three bullets above are the general path (any stride); stride 1 takes this one:
 *   - Fast path for stride 1 (forward, grad input, grad kernel; any channel count): the
 *     batch is cut into bands of BAND_ROWS output rows of one image; a thread copies its
 *     band, zero-padded, into an L2-sized buffer Wp = OW + KW - 1 cells wide. Output pixel
 *     (y, x) is then "virtual row" v = y*Wp + x, and its im2col row is the buffer read at
 *     v*C + tap_offset[tap] + c, so the micro-kernel reads im2col in place, no packing.
 *   - Forward and grad input: a micro-tile takes six real output pixels by their offsets,
 *     across row ends (on 11x11 outputs a tile per row end computed 15% junk), and a tile
 *     on the border leaves out the taps that read only padding (the grad input of a 3x3
 *     'valid' conv on 11x11 pads by 2: a third of its products are zeros).
 *   - Grad kernel (pixels are its k): on small images (OW < 32) each band becomes a compact
 *     row im2col (KW*C floats per real pixel, no junk); wider ones read the band with its
 *     KW - 1 junk columns per row (zero grad_output rows there) or grad_output rows in
 *     place. Bands are fixed by the geometry and cut into at most GRAD_PARTS fixed runs;
 *     a run's bands add into one partial, the partials are added in run order.
 *   - Grad kernel, few channels (C <= 4, F % 16 == 0): direct, no im2col: grad_tile tiles of
 *     up to 6 k rows x 16 filters read the band (or x, 'valid') and grad_output in place;
 *     the bias sums ride on one tile.
 *   - Forward with a max-pool epilogue (stride 1, pool windows that tile the output and fit
 *     a band): the band's output rows land in a per-thread L2-sized buffer instead of y and
 *     are pooled from there (pool.c's row code): a Conv2D(relu) + MaxPool2D(2) pair writes a
 *     quarter of the output plus a byte of taps per pooled value; the full output, which a
 *     1-channel first layer spends most of its time writing, never reaches memory.
 *   - This file calls the GEMM frame (gemm.c), the micro-kernel table (microkernel.c) and
 *     max-pool's rows (pool.c); none calls back into it. The im2col rows it packs from live
 *     in packing.c.
 */
#include <string.h>

#include "gemm_internal.h"

#if CNNX_OPENMP
#include <omp.h>
#define THREAD_ID() omp_get_thread_num()
#else
#define THREAD_ID() 0
#endif

#define PIXEL_CHUNK 4096
#define BAND_ROWS 16
#define MAX_TAPS 64                /* fast path for kernels up to 8x8 */
#define EDGE_FLOATS (GEMM_MR * GEMM_NR + GEMM_NR)
#define PANEL_MAJOR_MIN_DEPTH 64   /* grad-kernel: grad_output in 16-column panels from here */
#define GRAD_PARTS 8              /* grad-kernel partials: at most this many runs of bands */
/* grad_output rows read in place by the grad-kernel fast path only when this wide: each
 * micro-tile call then runs k = out_w deep; narrower rows take the virtual-row layout. */
#define IN_PLACE_MIN_WIDTH 32

static int use_fast_path(const cnnx_conv_geometry *g)
{
    return g->stride_h == 1 && g->stride_w == 1 && g->dilation_h == 1 && g->dilation_w == 1
           && g->kernel_h * g->kernel_w <= MAX_TAPS;
}

static int padded_width(const cnnx_conv_geometry *g) { return g->out_w + g->kernel_w - 1; }

static long band_count(const cnnx_conv_geometry *g)
{
    return (long)g->batch * ((g->out_h + BAND_ROWS - 1) / BAND_ROWS);
}

/* The zero-padded band buffer, with slack for the last micro-tile's junk rows. */
static long band_floats(const cnnx_conv_geometry *g)
{
    return ((long)(BAND_ROWS + g->kernel_h - 1) * padded_width(g) + g->kernel_w + GEMM_MR + 2)
           * g->channels;
}

static void tap_offsets_for(const cnnx_conv_geometry *g, int *offsets)
{
    for (int i = 0; i < g->kernel_h; ++i)
        for (int j = 0; j < g->kernel_w; ++j)
            offsets[i * g->kernel_w + j] = (i * padded_width(g) + j) * g->channels;
}

/* band[r, x, :] = source[image, y0 + r - pad_top, x - pad_left, :], zero outside. */
static void copy_band(const cnnx_conv_geometry *g, const float *source, long image, int y0,
                      int rows, float *band)
{
    int width = padded_width(g), channels = g->channels;
    const float *source_image = source + image * g->in_h * g->in_w * channels;
    int x0 = g->pad_left, x1 = g->pad_left + g->in_w < width ? g->pad_left + g->in_w : width;
    for (int r = 0; r < rows + g->kernel_h - 1; ++r) {
        float *dst = band + (long)r * width * channels;
        int in_y = y0 + r - g->pad_top;
        if (in_y < 0 || in_y >= g->in_h || x1 <= x0) {
            memset(dst, 0, sizeof(float) * width * channels);
            continue;
        }
        memset(dst, 0, sizeof(float) * x0 * channels);
        memcpy(dst + (long)x0 * channels, source_image + (long)in_y * g->in_w * channels,
               sizeof(float) * (x1 - x0) * channels);
        memset(dst + (long)x1 * channels, 0, sizeof(float) * (width - x1) * channels);
    }
    /* slack read by junk rows of the last tiles: zeros keep denormals and NaNs out */
    memset(band + (long)(rows + g->kernel_h - 1) * width * channels, 0,
           sizeof(float) * (g->kernel_w + GEMM_MR + 2) * channels);
}

/* The taps a forward tile of output pixels (first_y, first_x) .. (last_y, last_x) needs, as offsets into the band (a_taps) and the packed kernel (b_taps); a tap that reads
 * only padding for all of them is left out (b_taps NULL: all taps, the kernel read in order) (its products are all zero; on 13x13 grad-input
 * tiles, padded by 2, about a third of the taps). The list depends on the geometry alone. */
static int tile_taps(const cnnx_conv_geometry *g, int first_y, int first_x, int last_y,
                     int last_x, const int *tap_offsets, int *a_taps, int *b_taps,
                     const int **a_list, const int **b_list)
{
    if (last_y > first_y) {      /* the tile wraps: it holds both row ends, take all columns */
        first_x = 0;
        last_x = g->out_w - 1;
    }
    int used = 0, taps = g->kernel_h * g->kernel_w;
    if (first_y >= g->pad_top && last_y + g->kernel_h - 1 - g->pad_top < g->in_h
        && first_x >= g->pad_left && last_x + g->kernel_w - 1 - g->pad_left < g->in_w) {
        *a_list = tap_offsets;                        /* inside: every tap (no padding: all) */
        *b_list = NULL;                               /* the packed kernel read straight on */
        return taps;
    }
    *a_list = a_taps;
    *b_list = b_taps;
    for (int i = 0; i < g->kernel_h; ++i) {
        /* input rows first_y + i - pad_top .. last_y + i - pad_top must meet [0, in_h) */
        if (last_y + i - g->pad_top < 0 || first_y + i - g->pad_top >= g->in_h)
            continue;
        for (int j = 0; j < g->kernel_w; ++j) {
            if (last_x + j - g->pad_left < 0 || first_x + j - g->pad_left >= g->in_w)
                continue;
            int tap = i * g->kernel_w + j;
            a_taps[used] = tap_offsets[tap];
            b_taps[used++] = tap * g->channels * GEMM_NR;
        }
    }
    return used;
}

/* One forward micro-tile of a band: six real output pixels, across row ends, by their band
 * cells' offsets (a tile past the band's last pixel repeats its first row), and the band
 * rows and columns of its first and last real pixel (for tile_taps). */
typedef struct {
    long row_offsets[GEMM_MR];
    int first_y, first_x, last_y, last_x, rows;
} forward_tile;

/* The tiles of a band of `rows` output rows, from pixel 0: walked, not divided (with one
 * channel the divisions cost as much as the tile). Bands of BAND_ROWS rows all have the
 * same tiles: they are planned once per call, shared by the threads, and a shorter last
 * band plans its own. */
static int plan_forward_tiles(const cnnx_conv_geometry *g, int rows, forward_tile *tiles)
{
    int pixels = rows * g->out_w, width = padded_width(g), row_y = 0, row_x = 0, count = 0;
    for (int q0 = 0; q0 < pixels; q0 += GEMM_MR, ++count) {
        forward_tile *tile = tiles + count;
        tile->rows = pixels - q0 < GEMM_MR ? pixels - q0 : GEMM_MR;
        tile->first_y = row_y;
        tile->first_x = row_x;
        for (int r = 0; r < GEMM_MR; ++r) {
            if (r < tile->rows) {
                tile->last_y = row_y;
                tile->last_x = row_x;
            }
            tile->row_offsets[r] = r < tile->rows
                                       ? ((long)row_y * width + row_x) * g->channels
                                       : tile->row_offsets[0];
            if (++row_x == g->out_w) {
                row_x = 0;
                ++row_y;
            }
        }
    }
    return count;
}

/* Floats that hold the tiles of one full band. */
static long forward_plan_floats(const cnnx_conv_geometry *g)
{
    long tiles = ((long)BAND_ROWS * g->out_w + GEMM_MR - 1) / GEMM_MR;
    return (tiles * (long)sizeof(forward_tile) + 63) / 64 * 16;
}

/* Per thread: a short band's tile plan, with a pool epilogue the band's output rows
 * [BAND_ROWS][OW][F] (L2-sized: 200 KB on comics' 98x98x32 layer), the zero-padded band and
 * an edge tile, rounded up to whole cache lines. */
static long forward_thread_floats(const cnnx_conv_geometry *g, int filters, int pooling)
{
    long floats = band_floats(g) + EDGE_FLOATS + forward_plan_floats(g)
                  + (pooling ? (long)BAND_ROWS * g->out_w * filters : 0);
    return (floats + 15) / 16 * 16;
}

/* The packed kernel, the full bands' tile plan, then each thread's space. */
static long forward_fast_workspace(const cnnx_conv_geometry *g, int filters, int n_threads,
                                   int pooling)
{
    long depth = (long)g->kernel_h * g->kernel_w * g->channels;
    long panels = (filters + GEMM_NR - 1) / GEMM_NR;
    return depth * GEMM_NR * panels + forward_plan_floats(g)
           + (long)n_threads * forward_thread_floats(g, filters, pooling);
}

/* The pool epilogue of one band: the windows that start in the band's output rows
 * y0 .. y0 + rows - 1 (all of each lies in the band: pool_h divides BAND_ROWS, and the
 * last band ends where the output does, where windows are clipped either way), pooled by
 * max-pool's own row code over a geometry of this band alone. */
static void pool_band(const cnnx_pool_geometry *pool, const float *band_output, long image,
                      int y0, int rows, float *pooled, uint8_t *taps)
{
    int first = y0 / pool->pool_h, end = (y0 + rows + pool->pool_h - 1) / pool->pool_h;
    if (end > pool->out_h)
        end = pool->out_h;                /* 'valid': rows past the last window */
    if (end <= first)
        return;
    cnnx_pool_geometry band = *pool;
    band.batch = 1;
    band.in_h = rows;
    band.out_h = end - first;
    long offset = (image * pool->out_h + first) * (long)pool->out_w * pool->channels;
    cnnx_max_pool2d_forward_rows(&band, band_output, pooled + offset, taps + offset,
                                 CNNX_ARGMAX_WINDOW, 0, band.out_h);
}

/* pool NULL: y = the convolution. Otherwise the band's output rows land in a per-thread
 * buffer (y unused) and pool_band writes pooled and taps from it: the same tiles, the same
 * bits, and the output never goes to memory. */
static void conv_forward_fast(const cnnx_conv_geometry *g, const float *x, const float *kernel,
                              int filters, const float *bias, int relu, float *y,
                              const cnnx_pool_geometry *pool, float *pooled, uint8_t *taps,
                              int n_threads, float *workspace)
{
    int depth = g->kernel_h * g->kernel_w * g->channels;
    int panels = (filters + GEMM_NR - 1) / GEMM_NR;
    int bands_per_image = (g->out_h + BAND_ROWS - 1) / BAND_ROWS;
    long bands = band_count(g);
    long thread_floats = forward_thread_floats(g, filters, pool != NULL);
    float *packed_kernel = workspace;                     /* [panel][depth][16], zero-padded */
    forward_tile *full_band_tiles = (forward_tile *)(workspace + (long)depth * GEMM_NR * panels);
    float *thread_space = (float *)full_band_tiles + forward_plan_floats(g);
    int tap_offsets[MAX_TAPS];
    tap_offsets_for(g, tap_offsets);
    int full_band_tile_count = plan_forward_tiles(g, BAND_ROWS, full_band_tiles);
    for (int panel = 0; panel < panels; ++panel) {
        int cols = filters - panel * GEMM_NR < GEMM_NR ? filters - panel * GEMM_NR : GEMM_NR;
        float *dst = packed_kernel + (long)panel * depth * GEMM_NR;
        memset(dst, 0, sizeof(float) * depth * GEMM_NR);
        for (int k = 0; k < depth; ++k)
            memcpy(dst + k * GEMM_NR, kernel + (long)k * filters + panel * GEMM_NR,
                   sizeof(float) * cols);
    }
    (void)n_threads;
    const micro_kernel_table *kernels = micro_kernels();

    #pragma omp parallel for schedule(dynamic) num_threads(n_threads) if (n_threads > 1 && bands > 1)
    for (long band_index = 0; band_index < bands; ++band_index) {
        /* the thread's space: tile plan, band output (pooling), band, edge tile */
        forward_tile *short_band_tiles = (forward_tile *)(thread_space
                                                          + THREAD_ID() * thread_floats);
        float *band_output = (float *)short_band_tiles + forward_plan_floats(g);
        float *band = band_output + (pool ? (long)BAND_ROWS * g->out_w * filters : 0);
        float *edge_tile = band + band_floats(g), *edge_bias = edge_tile + GEMM_MR * GEMM_NR;
        int a_taps[MAX_TAPS], b_taps[MAX_TAPS];
        long image = band_index / bands_per_image;
        int y0 = (int)(band_index % bands_per_image) * BAND_ROWS;
        int rows = g->out_h - y0 < BAND_ROWS ? g->out_h - y0 : BAND_ROWS;
        float *y_band = pool ? band_output
                             : y + ((image * g->out_h + y0) * (long)g->out_w) * filters;
        copy_band(g, x, image, y0, rows, band);
        const forward_tile *tiles = full_band_tiles;
        int tile_count = full_band_tile_count;
        if (rows < BAND_ROWS) {
            tiles = short_band_tiles;
            tile_count = plan_forward_tiles(g, rows, short_band_tiles);
        }
        for (int t = 0; t < tile_count; ++t) {
            const long *row_offsets = tiles[t].row_offsets;
            int q0 = t * GEMM_MR, tile_rows = tiles[t].rows;
            const int *a_list, *b_list;
            int used_taps = tile_taps(g, y0 + tiles[t].first_y, tiles[t].first_x,
                                      y0 + tiles[t].last_y, tiles[t].last_x, tap_offsets,
                                      a_taps, b_taps, &a_list, &b_list);
            for (int panel = 0; panel < panels; ++panel) {
                int cols = filters - panel * GEMM_NR < GEMM_NR ? filters - panel * GEMM_NR
                                                               : GEMM_NR;
                const float *b = packed_kernel + (long)panel * depth * GEMM_NR;
                const float *panel_bias = bias ? bias + panel * GEMM_NR : NULL;
                float *c = y_band + (long)q0 * filters + panel * GEMM_NR;
                if (tile_rows == GEMM_MR && cols == GEMM_NR) {
                    kernels->conv(used_taps, a_list, b_list, g->channels, band, row_offsets,
                                  b, c, filters, panel_bias, relu);
                    continue;
                }
                if (bias) {
                    memset(edge_bias, 0, sizeof(float) * GEMM_NR);
                    memcpy(edge_bias, panel_bias, sizeof(float) * cols);
                }
                kernels->conv(used_taps, a_list, b_list, g->channels, band, row_offsets, b,
                              edge_tile, GEMM_NR, bias ? edge_bias : NULL, relu);
                for (int r = 0; r < tile_rows; ++r)
                    memcpy(c + (long)r * filters, edge_tile + r * GEMM_NR,
                           sizeof(float) * cols);
            }
        }
        if (pool)
            pool_band(pool, band_output, image, y0, rows, pooled, taps);
    }
}

void cnnx_conv2d_forward(const cnnx_conv_geometry *geometry, const float *x,
                         const float *kernel, int filters, const float *bias, int relu,
                         float *y, int n_threads, float *workspace)
{
    if (use_fast_path(geometry)) {
        conv_forward_fast(geometry, x, kernel, filters, bias, relu, y, NULL, NULL, NULL,
                          n_threads, workspace);
        return;
    }
    int rows = geometry->batch * geometry->out_h * geometry->out_w;
    int depth = geometry->kernel_h * geometry->kernel_w * geometry->channels;
    gemm_operand a = {OPERAND_IM2COL, x, 0, 0, geometry};
    gemm_operand b = {OPERAND_MATRIX, kernel, filters, 1, 0};
    gemm_run(rows, filters, depth, &a, &b, y, filters, bias, relu, n_threads, workspace);
}

long cnnx_conv2d_forward_workspace_floats(const cnnx_conv_geometry *geometry, int filters,
                                          int n_threads)
{
    long generic = cnnx_gemm_workspace_floats(n_threads);
    if (!use_fast_path(geometry))
        return generic;
    long fast = forward_fast_workspace(geometry, filters, n_threads, 0);
    return fast > generic ? fast : generic;
}

int cnnx_conv2d_max_pool_fusable(const cnnx_conv_geometry *geometry,
                                 const cnnx_pool_geometry *pool)
{
    return use_fast_path(geometry) && pool->in_h == geometry->out_h
           && pool->in_w == geometry->out_w && pool->stride_h == pool->pool_h
           && pool->stride_w == pool->pool_w && pool->pad_top == 0 && pool->pad_left == 0
           && BAND_ROWS % pool->pool_h == 0 && pool->pool_h * pool->pool_w <= 256;
}

long cnnx_conv2d_max_pool_workspace_floats(const cnnx_conv_geometry *geometry, int filters,
                                           int n_threads)
{
    return forward_fast_workspace(geometry, filters, n_threads, 1);
}

void cnnx_conv2d_max_pool_forward(const cnnx_conv_geometry *geometry, const float *x,
                                  const float *kernel, int filters, const float *bias,
                                  int relu, const cnnx_pool_geometry *pool, float *pooled,
                                  uint8_t *taps, int n_threads, float *workspace)
{
    conv_forward_fast(geometry, x, kernel, filters, bias, relu, NULL, pool, pooled, taps,
                      n_threads, workspace);
}

static long chunk_count(const cnnx_conv_geometry *g)
{
    long pixels = (long)g->batch * g->out_h * g->out_w;
    return (pixels + PIXEL_CHUNK - 1) / PIXEL_CHUNK;
}

/* grad_kernel[e] (e < kernel_size), then grad_bias, = the sum over parts of
 * partials[part * (kernel_size + filters) + e], added in part order: the same bits for any
 * n_threads. Called inside a parallel region; its orphaned omp for shares out the elements. */
static void sum_partials_in_order(const float *partials, long parts, long kernel_size,
                                  int filters, float *grad_kernel, float *grad_bias)
{
    long size = kernel_size + filters;
    #pragma omp for schedule(static)
    for (long e = 0; e < size; ++e) {
        float total = partials[e];
        for (long part = 1; part < parts; ++part)
            total += partials[part * size + e];
        if (e < kernel_size)
            grad_kernel[e] = total;
        else
            grad_bias[e - kernel_size] = total;
    }
}

/* The grad-kernel partials: bands are cut into at most GRAD_PARTS fixed runs (by the
 * geometry alone); a run's bands add into one partial, and the partials are added in run
 * order. Few partials: little to write and add up (an 11x11 image is one band, and one
 * partial per image cost more than its products). */
static long grad_part_count(const cnnx_conv_geometry *g)
{
    long bands = band_count(g);
    return bands < GRAD_PARTS ? bands : GRAD_PARTS;
}

/* Per thread: band, virtual grad_output in 16-column panels, an edge tile. */
static long grad_virtual_floats(const cnnx_conv_geometry *g, int filters)
{
    long panels = (filters + GEMM_NR - 1) / GEMM_NR;
    return panels * ((long)BAND_ROWS * padded_width(g) + GEMM_MR) * GEMM_NR;
}

/* The compact row im2col of a band of a small image (OW < IN_PLACE_MIN_WIDTH):
 * rows[y][x][j*C + c] = band[y][x + j][c], KW*C floats per pixel, + slack for the last
 * micro-tile's reads past a kernel row. */
static long row_im2col_floats(const cnnx_conv_geometry *g)
{
    if (g->out_w >= IN_PLACE_MIN_WIDTH)
        return 0;
    return (long)(BAND_ROWS + g->kernel_h - 1) * g->out_w * g->kernel_w * g->channels + GEMM_MR;
}

static void fill_row_im2col(const cnnx_conv_geometry *g, const float *band, int rows,
                            float *dst)
{
    long row_span = (long)g->kernel_w * g->channels;
    int width = padded_width(g);
    for (int y = 0; y < rows + g->kernel_h - 1; ++y)
        for (int x = 0; x < g->out_w; ++x)       /* the KW cells from (y, x) are adjacent */
            memcpy(dst + ((long)y * g->out_w + x) * row_span,
                   band + ((long)y * width + x) * g->channels, sizeof(float) * row_span);
    memset(dst + (long)(rows + g->kernel_h - 1) * g->out_w * row_span, 0,
           sizeof(float) * GEMM_MR);
}

static void add_bias_sums(const float *grad, int pixels, int filters, float *bias_partial)
{
    for (int q = 0; q < pixels; ++q)
        for (int f = 0; f < filters; ++f)
            bias_partial[f] += grad[(long)q * filters + f];
}

static long grad_kernel_thread_floats(const cnnx_conv_geometry *g, int filters)
{
    return band_floats(g) + grad_virtual_floats(g, filters) + row_im2col_floats(g)
           + EDGE_FLOATS;
}

static long grad_kernel_fast_workspace(const cnnx_conv_geometry *g, int filters, int n_threads)
{
    long depth = (long)g->kernel_h * g->kernel_w * g->channels;
    return (long)n_threads * grad_kernel_thread_floats(g, filters)
           + grad_part_count(g) * (depth * filters + filters);
}

/* partial[depth, F] (=, or += when accumulate) = im2col(band)^T @ grad[pixels, F] over
 * `pixels` rows of band: im2col[q][i*KW*C + t] = band[q*pixel_stride + i*row_stride + t]
 * (the band buffer: pixel stride C, row stride Wp*C; the compact row im2col: pixel stride
 * KW*C, row stride OW*KW*C); grad's column panel f0/16 starts at grad + f0/16 *
 * panel_stride, its rows grad_k_stride apart. The KW*C k indices (j, c) of one kernel row i
 * are contiguous in both layouts. Six k rows are read in place, adjacent when they share a kernel row; a narrow
 * kernel row (KW*C < 6: one-channel inputs) lets a tile span several kernel rows at
 * gathered offsets instead of leaving half of it empty. Column panels outermost: one
 * panel of grad stays in L1 while every k tile reads it. */
static void grad_kernel_rows(const cnnx_conv_geometry *g, const float *band, long row_stride,
                             long pixel_stride, int pixels, const float *grad,
                             long grad_k_stride, long panel_stride, int filters,
                             float *partial, int accumulate, float *edge_tile)
{
    int depth = g->kernel_h * g->kernel_w * g->channels, row_span = g->kernel_w * g->channels;
    for (int f0 = 0; f0 < filters; f0 += GEMM_NR) {
        int cols = filters - f0 < GEMM_NR ? filters - f0 : GEMM_NR;
        const float *b = grad + (f0 / GEMM_NR) * panel_stride;
        for (int k0 = 0; k0 < depth; ) {
            /* one tile: the rest of this kernel row, or (narrow rows) up to 6 k rows */
            int rest_of_row = row_span - k0 % row_span;
            int k_rows = row_span >= GEMM_MR ? (rest_of_row < GEMM_MR ? rest_of_row : GEMM_MR)
                                             : (depth - k0 < GEMM_MR ? depth - k0 : GEMM_MR);
            long offsets[GEMM_MR];
            for (int r = 0; r < GEMM_MR; ++r) {
                int k = k0 + (r < k_rows ? r : 0);
                offsets[r] = (k / row_span) * row_stride + k % row_span;
            }
            float *c = partial + (long)k0 * filters + f0;
            if (k_rows <= rest_of_row)        /* rows adjacent in the band: constant stride */
                gemm_micro_tile(pixels, band + offsets[0], 1, pixel_stride, b, grad_k_stride,
                                c, filters, k_rows, cols, accumulate, edge_tile);
            else
                gemm_gathered_tile(pixels, band, offsets, pixel_stride, b, grad_k_stride, c,
                                   filters, k_rows, cols, accumulate, edge_tile);
            k0 += k_rows;
        }
    }
}

/* The direct kernel gradient of few-channel layers (the first layer: C = 1 or 3): depth
 * KH*KW*C is only 9 or 27, so k tiles cut from the im2col GEMM's 6-row shape ran part empty
 * (27 = 6+3 per kernel row). Here a tile holds up to 6 k rows x 16 filters in registers,
 * reads the band and grad_output in place (no im2col), and the bias sums ride on one tile's
 * loads of grad_output. */
#define DIRECT_GRAD_MAX_CHANNELS 4
#define DIRECT_GRAD_L1_FLOATS 4096   /* grad_output rows one call sweeps, to stay in L1 */

static int use_direct_grad_kernel(const cnnx_conv_geometry *g, int filters)
{
    return g->channels <= DIRECT_GRAD_MAX_CHANNELS && filters % GEMM_NR == 0;
}

#define DIRECT_GRAD_MAX_DEPTH (MAX_TAPS * DIRECT_GRAD_MAX_CHANNELS)
#define DIRECT_GRAD_MAX_TILES (DIRECT_GRAD_MAX_DEPTH / GRAD_TILE_MAX_ROWS + 1)

/* How the direct path cuts the work, worked out once per call (the geometry alone). The
 * depth is cut into equal tiles with room for the bias on the first smallest one (27 ->
 * 5, 5, 6, 5, 6 k rows; 9 -> 4, 5); rows are swept chunk_rows at a time, so that a chunk's
 * grad_output panel stays in L1 while every tile reads it. */
typedef struct {
    int tiles, bias_tile, chunk_rows;
    int first_k[DIRECT_GRAD_MAX_TILES + 1];        /* tile t holds k rows first_k[t].. */
    long offsets[DIRECT_GRAD_MAX_DEPTH];           /* k = (i, j, c): band row i, cell j*C + c */
} direct_grad_plan;

static void plan_direct_grad(const cnnx_conv_geometry *g, direct_grad_plan *plan)
{
    int depth = g->kernel_h * g->kernel_w * g->channels, row_span = g->kernel_w * g->channels;
    int tiles = (depth + GRAD_TILE_MAX_ROWS) / GRAD_TILE_MAX_ROWS;   /* depth + 1 rows */
    plan->tiles = tiles;
    for (int tile = 0; tile <= tiles; ++tile)
        plan->first_k[tile] = tile * depth / tiles;
    plan->bias_tile = 0;
    while (plan->first_k[plan->bias_tile + 1] - plan->first_k[plan->bias_tile] > depth / tiles)
        ++plan->bias_tile;
    for (int k = 0; k < depth; ++k)
        plan->offsets[k] = (long)(k / row_span) * padded_width(g) * g->channels + k % row_span;
    plan->chunk_rows = DIRECT_GRAD_L1_FLOATS / (g->out_w * GEMM_NR);
    if (plan->chunk_rows < 1)
        plan->chunk_rows = 1;
}

/* The band's rows read straight from x when they need no padding ('valid'): the band
 * buffer would be a copy of them. NULL when the band needs its padded copy. */
static const float *band_in_place(const cnnx_conv_geometry *g, const float *x, long image,
                                  int y0, int rows)
{
    if (g->pad_top != 0 || g->pad_left != 0 || padded_width(g) != g->in_w
        || y0 + rows + g->kernel_h - 1 > g->in_h)
        return NULL;
    return x + ((image * g->in_h + y0) * (long)g->in_w) * g->channels;
}

/* The x rows band band_index reads (copy_band's source): first, and their count of floats
 * (0 past the last band). */
static long band_source_rows(const cnnx_conv_geometry *g, const float *x, long band_index,
                             long bands, const float **first)
{
    int bands_per_image = (g->out_h + BAND_ROWS - 1) / BAND_ROWS;
    if (band_index >= bands)
        return 0;
    long image = band_index / bands_per_image;
    int y0 = (int)(band_index % bands_per_image) * BAND_ROWS - g->pad_top;
    int y1 = y0 + BAND_ROWS + g->kernel_h - 1;
    y0 = y0 < 0 ? 0 : y0;
    y1 = y1 > g->in_h ? g->in_h : y1;
    *first = x + ((image * g->in_h + y0) * (long)g->in_w) * g->channels;
    return y1 > y0 ? (long)(y1 - y0) * g->in_w * g->channels : 0;
}

/* partial (=, or += when accumulate) the band's im2col^T @ grad_band, and its bias sums,
 * chunk by chunk; the bias tile prefetches the next chunk's grad_output (from memory when
 * grad_output is larger than the caches) into L2, and each chunk a share of prefetch (the
 * next band's x rows: its copy then stalls on no cache miss; on glasses' first layer the
 * copy cost 10% of the time without). */
static void grad_kernel_direct_band(const cnnx_conv_geometry *g, const direct_grad_plan *plan,
                                    const float *band, int rows, const float *grad_band,
                                    int filters, float *partial, int accumulate,
                                    float *bias_partial, const float *prefetch,
                                    long prefetch_floats)
{
    long band_row = (long)padded_width(g) * g->channels;
    grad_tile_fn grad_tile = micro_kernels()->grad_tile;
    int chunks = (rows + plan->chunk_rows - 1) / plan->chunk_rows;
    long prefetch_share = (prefetch_floats + chunks - 1) / chunks;
    for (int y0 = 0; y0 < rows; y0 += plan->chunk_rows) {
        for (long f = 0; f < prefetch_share && prefetch_floats > 0; f += 16, prefetch_floats -= 16)
            __builtin_prefetch(prefetch + f, 0, 2);
        prefetch += prefetch_share;
        int chunk = rows - y0 < plan->chunk_rows ? rows - y0 : plan->chunk_rows;
        const float *grad_chunk = grad_band + (long)y0 * g->out_w * filters;
        const float *band_chunk = band + y0 * band_row;
        long ahead = (long)chunk * g->out_w * filters;
        for (int f0 = 0; f0 < filters; f0 += GEMM_NR)
            for (int tile = 0; tile < plan->tiles; ++tile) {
                int k0 = plan->first_k[tile], with_bias = tile == plan->bias_tile;
                grad_tile(plan->first_k[tile + 1] - k0, band_chunk, plan->offsets + k0,
                          g->channels, band_row, chunk, g->out_w, grad_chunk + f0, filters,
                          with_bias ? ahead : 0, partial + (long)k0 * filters + f0, filters,
                          with_bias ? bias_partial + f0 : NULL, accumulate || y0 > 0);
            }
    }
}

/* grad_output's band in virtual-row layout, rows `width` wide (Wp: zeros in the junk
 * columns; OW: none), bias sums added in pixel order. panel_major: 16-column panels panel_floats apart (zeros past the last
 * filter: one panel stays in L1 while the depth/6 k tiles
 * read it); otherwise rows of all F columns (F % 16 == 0: one copy per pixel, cheaper when
 * the depth, hence the reuse, is small). */
static void fill_grad_virtual(const cnnx_conv_geometry *g, int width, const float *grad_band,
                              int virtual_rows, int filters, int panel_major, float *dst,
                              long panel_floats, float *bias_partial)
{
    int panels = (filters + GEMM_NR - 1) / GEMM_NR;
    for (int v = 0; v < virtual_rows; ++v) {
        int out_x = v % width;
        const float *src = grad_band + ((long)(v / width) * g->out_w + out_x) * filters;
        if (!panel_major) {
            float *row = dst + (long)v * filters;
            if (out_x >= g->out_w)
                memset(row, 0, sizeof(float) * filters);
            else
                memcpy(row, src, sizeof(float) * filters);
        } else {
            for (int panel = 0; panel < panels; ++panel) {
                float *row = dst + panel * panel_floats + (long)v * GEMM_NR;
                int cols = filters - panel * GEMM_NR < GEMM_NR ? filters - panel * GEMM_NR
                                                               : GEMM_NR;
                if (out_x >= g->out_w)
                    cols = 0;
                else
                    memcpy(row, src + panel * GEMM_NR, sizeof(float) * cols);
                memset(row + cols, 0, sizeof(float) * (GEMM_NR - cols));
            }
        }
        if (out_x < g->out_w)
            for (int f = 0; f < filters; ++f)
                bias_partial[f] += src[f];
    }
}

/* grad_kernel[depth, F] = im2col(x)^T @ grad_output, band by band, both read from the band
 * buffers; each run of bands adds into its partial, and the partials are added in order. */
static void conv_grad_kernel_fast(const cnnx_conv_geometry *g, const float *x,
                                  const float *grad_output, int filters, float *grad_kernel,
                                  float *grad_bias, int n_threads, float *workspace)
{
    int depth = g->kernel_h * g->kernel_w * g->channels, width = padded_width(g);
    int bands_per_image = (g->out_h + BAND_ROWS - 1) / BAND_ROWS;
    long bands = band_count(g), parts = grad_part_count(g);
    long partial_size = (long)depth * filters + filters;
    long thread_floats = grad_kernel_thread_floats(g, filters);
    long panel_floats = ((long)BAND_ROWS * width + GEMM_MR) * GEMM_NR;
    float *partials = workspace + (long)n_threads * thread_floats;
    int panel_major = filters % GEMM_NR != 0 || depth >= PANEL_MAJOR_MIN_DEPTH;
    /* grad_output as grad_kernel_rows reads it: 16-column panels, or rows of all F */
    long grad_k_stride = panel_major ? GEMM_NR : filters;
    long grad_panel_stride = panel_major ? panel_floats : GEMM_NR;
    int direct = use_direct_grad_kernel(g, filters);
    direct_grad_plan plan;
    if (direct)
        plan_direct_grad(g, &plan);
    (void)n_threads;
    cnnx_get_isa();

    #pragma omp parallel num_threads(n_threads) if (n_threads > 1 && parts > 1)
    {
        float *band = workspace + THREAD_ID() * thread_floats;
        float *grad_virtual = band + band_floats(g);
        float *row_im2col = grad_virtual + grad_virtual_floats(g, filters);
        float *edge_tile = row_im2col + row_im2col_floats(g);
        #pragma omp for schedule(dynamic)
        for (long part = 0; part < parts; ++part) {
            long first = part * bands / parts, end = (part + 1) * bands / parts;
            float *partial = partials + part * partial_size;
            float *bias_partial = partial + (long)depth * filters;
            memset(bias_partial, 0, sizeof(float) * filters);
            for (long band_index = first; band_index < end; ++band_index) {
                long image = band_index / bands_per_image;
                int y0 = (int)(band_index % bands_per_image) * BAND_ROWS;
                int rows = g->out_h - y0 < BAND_ROWS ? g->out_h - y0 : BAND_ROWS;
                int virtual_rows = (rows - 1) * width + g->out_w;
                int accumulate = band_index > first;
                const float *grad_band =
                    grad_output + ((image * g->out_h + y0) * (long)g->out_w) * filters;
                if (direct) {
                    const float *rows_in = band_in_place(g, x, image, y0, rows);
                    const float *next_rows = NULL;
                    long next_floats = 0;
                    if (!rows_in) {
                        copy_band(g, x, image, y0, rows, band);
                        rows_in = band;
                        next_floats = band_source_rows(g, x, band_index + 1, bands, &next_rows);
                    }
                    grad_kernel_direct_band(g, &plan, rows_in, rows, grad_band, filters,
                                            partial, accumulate, bias_partial, next_rows,
                                            next_floats);
                    continue;
                }
                copy_band(g, x, image, y0, rows, band);
                if (filters % GEMM_NR == 0 && g->out_w >= IN_PLACE_MIN_WIDTH) {
                    /* grad_output read in place, one output row at a time (no junk
                     * columns); rows are added into the partial in order */
                    for (int y = 0; y < rows; ++y) {
                        const float *grad_row = grad_band + (long)y * g->out_w * filters;
                        add_bias_sums(grad_row, g->out_w, filters, bias_partial);
                        grad_kernel_rows(g, band + (long)y * width * g->channels,
                                         (long)width * g->channels, g->channels, g->out_w,
                                         grad_row, filters, GEMM_NR, filters, partial,
                                         accumulate || y > 0, edge_tile);
                    }
                    continue;
                }
                if (g->out_w < IN_PLACE_MIN_WIDTH) {
                    /* small images: the compact row im2col, no junk columns (on 11x11
                     * outputs the virtual rows would be 14% junk) */
                    int pixels = rows * g->out_w;
                    long row_span = (long)g->kernel_w * g->channels;
                    fill_row_im2col(g, band, rows, row_im2col);
                    const float *b = grad_band;
                    if (panel_major) {
                        fill_grad_virtual(g, g->out_w, grad_band, pixels, filters, 1,
                                          grad_virtual, panel_floats, bias_partial);
                        b = grad_virtual;
                    } else {
                        add_bias_sums(grad_band, pixels, filters, bias_partial);
                    }
                    grad_kernel_rows(g, row_im2col, g->out_w * row_span, row_span, pixels, b,
                                     grad_k_stride, grad_panel_stride, filters, partial,
                                     accumulate, edge_tile);
                    continue;
                }
                fill_grad_virtual(g, width, grad_band, virtual_rows, filters, panel_major,
                                  grad_virtual, panel_floats, bias_partial);
                grad_kernel_rows(g, band, (long)width * g->channels, g->channels, virtual_rows,
                                 grad_virtual, grad_k_stride, grad_panel_stride, filters,
                                 partial, accumulate, edge_tile);
            }
        }
        sum_partials_in_order(partials, parts, (long)depth * filters, filters, grad_kernel,
                              grad_bias);
    }
}

long cnnx_conv2d_grad_kernel_workspace_floats(const cnnx_conv_geometry *geometry,
                                              int filters, int n_threads)
{
    if (use_fast_path(geometry))
        return grad_kernel_fast_workspace(geometry, filters, n_threads);

    long depth = (long)geometry->kernel_h * geometry->kernel_w * geometry->channels;
    return (long)n_threads * GEMM_WORKSPACE_FLOATS
           + chunk_count(geometry) * (depth * filters + filters);
}

void cnnx_conv2d_grad_kernel(const cnnx_conv_geometry *geometry, const float *x,
                             const float *grad_output, int filters, float *grad_kernel,
                             float *grad_bias, int n_threads, float *workspace)
{
    if (use_fast_path(geometry)) {
        conv_grad_kernel_fast(geometry, x, grad_output, filters, grad_kernel, grad_bias,
                              n_threads, workspace);
        return;
    }
    long pixels = (long)geometry->batch * geometry->out_h * geometry->out_w;
    int depth = geometry->kernel_h * geometry->kernel_w * geometry->channels;
    long chunks = chunk_count(geometry);
    long partial_size = (long)depth * filters + filters;    /* kernel partial, then bias */
    float *partials = workspace + (long)n_threads * GEMM_WORKSPACE_FLOATS;
    gemm_operand a = {OPERAND_IM2COL_TRANSPOSED, x, 0, 0, geometry};
    gemm_operand b = {OPERAND_MATRIX, grad_output, filters, 1, 0};
    (void)n_threads;
    cnnx_get_isa();

    #pragma omp parallel num_threads(n_threads) if (n_threads > 1 && chunks > 1)
    {
        float *thread_workspace = workspace + THREAD_ID() * GEMM_WORKSPACE_FLOATS;
        #pragma omp for schedule(dynamic)
        for (long chunk = 0; chunk < chunks; ++chunk) {
            int p0 = (int)(chunk * PIXEL_CHUNK);
            int p1 = pixels - p0 < PIXEL_CHUNK ? (int)pixels : p0 + PIXEL_CHUNK;
            float *partial = partials + chunk * partial_size;
            for (int i0 = 0; i0 < depth; i0 += GEMM_MC)
                for (int j0 = 0; j0 < filters; j0 += GEMM_NC) {
                    int mc = depth - i0 < GEMM_MC ? depth - i0 : GEMM_MC;
                    int nc = filters - j0 < GEMM_NC ? filters - j0 : GEMM_NC;
                    gemm_tile(i0, mc, j0, nc, p0, p1, &a, &b,
                              partial + (long)i0 * filters + j0, filters, NULL, 0, 0,
                              thread_workspace);
                }
            float *bias_partial = partial + (long)depth * filters;
            memset(bias_partial, 0, sizeof(float) * filters);
            add_bias_sums(grad_output + (long)p0 * filters, p1 - p0, filters, bias_partial);
        }
        sum_partials_in_order(partials, chunks, (long)depth * filters, filters, grad_kernel,
                              grad_bias);
    }
}

void cnnx_conv2d_flip_kernel(int kernel_h, int kernel_w, int channels, int filters,
                             const float *restrict kernel, float *restrict flipped)
{
    long tap_floats = (long)channels * filters;
    for (int i = 0; i < kernel_h; ++i)
        for (int j = 0; j < kernel_w; ++j) {
            const float *source = kernel + ((long)(kernel_h - 1 - i) * kernel_w
                                            + (kernel_w - 1 - j)) * tap_floats;
            float *target = flipped + ((long)i * kernel_w + j) * tap_floats;
            for (int c = 0; c < channels; ++c)          /* (C, F) -> (F, C), one tap */
                for (int f = 0; f < filters; ++f)
                    target[(long)f * channels + c] = source[(long)c * filters + f];
        }
}
