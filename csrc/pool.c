/* Max and average pooling, forward and backward (NHWC).
 *
 * Design: every loop nest is parallel over (image, output row) or (image, input row), and
 * each output element is produced by one thread in a fixed order: bit-identical for any
 * n_threads. Channels are contiguous in NHWC; each window is reduced one block of
 * CHANNEL_BLOCK channels at a time, the running max (or sum) and its index held in
 * registers over all the window's cells and stored once (the old loop kept them in the
 * output array: a load and a store per cell). Pooling is memory-bound, so what counts is
 * the bytes: the max's position can be kept as one byte per output (its place inside the
 * window, CNNX_ARGMAX_WINDOW) instead of an int32 cell index, and large outputs that no
 * cache could hold for the next pass are written with non-temporal stores (AVX2 variant),
 * which skip the read-for-ownership a normal store pays.
 * Max-pool backward: when windows tile the input (stride == pool) every input cell is
 * written once, gradient or zero, with the index only compared; otherwise it zeroes and
 * scatters, threads taking whole images. Over a ReLU output (relu_y) it also applies
 * ReLU's backward, grad * (y > 0) with y the pooled value (the ReLU output at the max
 * cell): the layer before skips its own pass over the whole gradient, three big arrays.
 * Average-pool backward is a gather.
 */
#include <float.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "cnnx_kernels.h"

#define CHANNEL_BLOCK 8                   /* one AVX2 vector, two SSE2 vectors */
#define STREAM_MIN_BYTES (16L << 20)      /* outputs this large leave every cache anyway */

/* First and one-past-last window tap that lands inside [0, size) for a window at start. */
static void clip_window(int start, int pool, int size, int *first, int *end)
{
    *first = start < 0 ? -start : 0;
    *end = start + pool > size ? size - start : pool;
}

/* One output row (image, out_y) of max-pool forward, portable C. Branch-free over channels
 * (a select per lane, vectorised by gcc): strict > keeps the first maximum of the row-major
 * scan, like argmax; like argmax too, the first NaN wins (so a NaN reaches the loss). The
 * running max lives in y, the index in an int32 scratch (the cell h*in_w + w, or the tap
 * i*pool_w + j when window_index, then narrowed: a select between a float compare and bytes
 * is one gcc leaves scalar), stored once, SCAN_CHANNELS channels at a time. */
/* One index of an argmax: a uint8 tap inside the window (window_index) or an int32 cell. */
static inline __attribute__((always_inline)) int load_index(const void *argmax,
                                                            int window_index, long at)
{
    return window_index ? ((const uint8_t *)argmax)[at] : ((const int32_t *)argmax)[at];
}

static inline __attribute__((always_inline)) void store_index(void *argmax, int window_index,
                                                              long at, int where)
{
    if (window_index)
        ((uint8_t *)argmax)[at] = (uint8_t)where;
    else
        ((int32_t *)argmax)[at] = where;
}

#define SCAN_CHANNELS 256
static inline __attribute__((always_inline)) void max_pool_forward_row(
    const cnnx_pool_geometry *g, const float *restrict x, float *restrict y,
    void *restrict argmax, const int window_index, long row)
{
    int channels = g->channels;
    long image = row / g->out_h;
    int out_y = (int)(row % g->out_h);
    const float *x_image = x + image * g->in_h * g->in_w * channels;
    int start_y = out_y * g->stride_h - g->pad_top, first_i, end_i;
    clip_window(start_y, g->pool_h, g->in_h, &first_i, &end_i);
    for (int out_x = 0; out_x < g->out_w; ++out_x) {
        long out = (row * g->out_w + out_x) * channels;
        int start_x = out_x * g->stride_w - g->pad_left, first_j, end_j;
        clip_window(start_x, g->pool_w, g->in_w, &first_j, &end_j);
        int first_cell = (start_y + first_i) * g->in_w + start_x + first_j;
        for (int c0 = 0; c0 < channels; c0 += SCAN_CHANNELS) {
            int width = channels - c0 < SCAN_CHANNELS ? channels - c0 : SCAN_CHANNELS;
            float *restrict best = y + out + c0;
            int32_t where[SCAN_CHANNELS];    /* on the stack: written to argmax once */
            const float *restrict first = x_image + (long)first_cell * channels + c0;
            int first_code = window_index ? first_i * g->pool_w + first_j : first_cell;
            for (int c = 0; c < width; ++c) {
                best[c] = first[c];
                where[c] = first_code;
            }
            for (int i = first_i; i < end_i; ++i)
                for (int j = first_j; j < end_j; ++j) {
                    int cell = (start_y + i) * g->in_w + start_x + j;
                    if (cell == first_cell)
                        continue;
                    int code = window_index ? i * g->pool_w + j : cell;
                    const float *restrict values = x_image + (long)cell * channels + c0;
                    for (int c = 0; c < width; ++c) {
                        float v = values[c], b = best[c];
                        int take = (v > b) | ((v != v) & (b == b));
                        best[c] = take ? v : b;
                        where[c] = take ? code : where[c];
                    }
                }
            if (window_index)
                for (int c = 0; c < width; ++c)
                    ((uint8_t *)argmax)[out + c0 + c] = (uint8_t)where[c];
            else
                memcpy((int32_t *)argmax + out + c0, where, sizeof(int32_t) * width);
        }
    }
}

/* ReLU's backward at the max cell, where the ReLU output is the pooled value y: the same
 * multiply as cnnx_relu_backward (grad * 1 or grad * 0: a NaN gradient stays NaN, a
 * negative one becomes -0), so the fused pass gives its bits. */
static inline __attribute__((always_inline)) float masked_grad(float grad, float y, int masked)
{
    return masked ? grad * (y > 0.0f ? 1.0f : 0.0f) : grad;
}

/* One output row of max-pool backward when windows tile the input (stride == pool), portable
 * C: every input cell of the window rows gets its gradient or 0 in one write pass. */
static inline __attribute__((always_inline)) void max_pool_backward_row(
    const cnnx_pool_geometry *g, const float *restrict grad_output,
    const void *restrict argmax, const int window_index, const float *restrict relu_y,
    const int masked, float *restrict grad_input, long row)
{
    int channels = g->channels;
    long image = row / g->out_h;
    int out_y = (int)(row % g->out_h);
    float *grad_image = grad_input + image * g->in_h * g->in_w * channels;
    int start_y = out_y * g->stride_h - g->pad_top, first_i, end_i;
    clip_window(start_y, g->pool_h, g->in_h, &first_i, &end_i);
    for (int i = first_i; i < end_i; ++i) {
        int in_y = start_y + i;
        for (int out_x = 0; out_x < g->out_w; ++out_x) {
            long out = (row * g->out_w + out_x) * channels;
            const float *restrict grad = grad_output + out;
            /* unmasked, never read (grad only keeps the expression a valid pointer) */
            const float *restrict pooled = masked ? relu_y + out : grad;
            const int32_t *restrict cell_index = (const int32_t *)argmax + out;
            const uint8_t *restrict tap_index = (const uint8_t *)argmax + out;
            int start_x = out_x * g->stride_w - g->pad_left, first_j, end_j;
            clip_window(start_x, g->pool_w, g->in_w, &first_j, &end_j);
            for (int j = first_j; j < end_j; ++j) {
                int cell = in_y * g->in_w + start_x + j;
                float *restrict target = grad_image + (long)cell * channels;
                if (window_index) {
                    uint8_t tap = (uint8_t)(i * g->pool_w + j);
                    for (int c = 0; c < channels; ++c)
                        target[c] = tap_index[c] == tap ? masked_grad(grad[c], pooled[c], masked)
                                                        : 0.0f;
                } else {
                    for (int c = 0; c < channels; ++c)
                        target[c] = cell_index[c] == cell ? masked_grad(grad[c], pooled[c], masked)
                                                          : 0.0f;
                }
            }
        }
    }
}

#if defined(__x86_64__) || defined(__i386__)
/* The AVX2 rows: the same results, 8 channels per vector, the running max and its index
 * in registers over the whole window, stored once (gcc did not keep them in registers
 * from the C above). */
static inline __attribute__((always_inline, target("avx2,fma"))) void store_indices(
    void *argmax, const int window_index, long at, __m256i where)
{
    if (window_index) {
        __m128i low = _mm256_castsi256_si128(where), high = _mm256_extracti128_si256(where, 1);
        __m128i words = _mm_packus_epi32(low, high);                  /* taps are < 256 */
        _mm_storel_epi64((__m128i *)((uint8_t *)argmax + at), _mm_packus_epi16(words, words));
    } else {
        _mm256_storeu_si256((__m256i *)((int32_t *)argmax + at), where);
    }
}

static inline __attribute__((always_inline, target("avx2,fma"))) __m256i load_indices(
    const void *argmax, const int window_index, long at)
{
    if (window_index)
        return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)((const uint8_t *)argmax + at)));
    return _mm256_loadu_si256((const __m256i *)((const int32_t *)argmax + at));
}

/* blocks vectors of 8 channels from c0 of one output through one window row: the running
 * max and index start from the window's first cell (first_row) or from y and argmax. */
static inline __attribute__((always_inline, target("avx2,fma"))) void max_blocks_avx2(
    const cnnx_pool_geometry *g, const float *restrict x_image, float *restrict y,
    void *restrict argmax, const int window_index, long out, int c0, int first_row,
    int first_j, int j0, int end_j, int row_cell, int i, const int blocks)
{
    int channels = g->channels;
    __m256 best[4], where[4];
    for (int k = 0; k < blocks; ++k) {
        long at = out + c0 + k * CHANNEL_BLOCK;
        if (first_row) {                              /* the window's first cell */
            int cell = row_cell + first_j;
            best[k] = _mm256_loadu_ps(x_image + (long)cell * channels + c0 + k * CHANNEL_BLOCK);
            where[k] = _mm256_castsi256_ps(_mm256_set1_epi32(
                window_index ? i * g->pool_w + first_j : cell));
        } else {
            best[k] = _mm256_loadu_ps(y + at);
            where[k] = _mm256_castsi256_ps(load_indices(argmax, window_index, at));
        }
    }
    for (int j = j0; j < end_j; ++j) {
        int cell = row_cell + j;
        __m256 code = _mm256_castsi256_ps(_mm256_set1_epi32(window_index ? i * g->pool_w + j
                                                                         : cell));
        const float *values = x_image + (long)cell * channels + c0;
        for (int k = 0; k < blocks; ++k) {
            __m256 v = _mm256_loadu_ps(values + k * CHANNEL_BLOCK);
            /* v > best or v NaN, unless best is NaN already: not (v <= best), and best
             * ordered */
            __m256 take = _mm256_and_ps(_mm256_cmp_ps(v, best[k], _CMP_NLE_UQ),
                                        _mm256_cmp_ps(best[k], best[k], _CMP_ORD_Q));
            best[k] = _mm256_blendv_ps(best[k], v, take);
            where[k] = _mm256_blendv_ps(where[k], code, take);
        }
    }
    for (int k = 0; k < blocks; ++k) {
        long at = out + c0 + k * CHANNEL_BLOCK;
        _mm256_storeu_ps(y + at, best[k]);
        store_indices(argmax, window_index, at, _mm256_castps_si256(where[k]));
    }
}

/* Window rows outermost, as in the portable row above: each input row is read once, front
 * to back; a window's running max and index go through y and argmax (in L1) between its
 * rows and stay in registers across its cells within a row. */
static inline __attribute__((always_inline, target("avx2,fma"))) void max_pool_forward_row_avx2(
    const cnnx_pool_geometry *g, const float *restrict x, float *restrict y,
    void *restrict argmax, const int window_index, long row)
{
    int channels = g->channels;
    long image = row / g->out_h;
    int out_y = (int)(row % g->out_h);
    const float *x_image = x + image * g->in_h * g->in_w * channels;
    int start_y = out_y * g->stride_h - g->pad_top, first_i, end_i;
    clip_window(start_y, g->pool_h, g->in_h, &first_i, &end_i);
    for (int i = first_i; i < end_i; ++i)
        for (int out_x = 0; out_x < g->out_w; ++out_x) {
            long out = (row * g->out_w + out_x) * channels;
            int start_x = out_x * g->stride_w - g->pad_left, first_j, end_j;
            clip_window(start_x, g->pool_w, g->in_w, &first_j, &end_j);
            int first_row = i == first_i, j0 = first_row ? first_j + 1 : first_j;
            int row_cell = (start_y + i) * g->in_w + start_x;
            int c0 = 0;
            /* four vectors at a time: four independent compare-select chains hide each
             * one's latency (one chain ran latency-bound on data in cache) */
            for (; c0 + 4 * CHANNEL_BLOCK <= channels; c0 += 4 * CHANNEL_BLOCK)
                max_blocks_avx2(g, x_image, y, argmax, window_index, out, c0, first_row,
                                first_j, j0, end_j, row_cell, i, 4);
            for (; c0 + CHANNEL_BLOCK <= channels; c0 += CHANNEL_BLOCK)
                max_blocks_avx2(g, x_image, y, argmax, window_index, out, c0, first_row,
                                first_j, j0, end_j, row_cell, i, 1);
            for (int c = c0; c < channels; ++c) {      /* the channels past the last vector */
                float best;
                int where;
                if (first_row) {
                    int cell = row_cell + first_j;
                    best = x_image[(long)cell * channels + c];
                    where = window_index ? i * g->pool_w + first_j : cell;
                } else {
                    best = y[out + c];
                    where = load_index(argmax, window_index, out + c);
                }
                for (int j = j0; j < end_j; ++j) {
                    int cell = row_cell + j;
                    float v = x_image[(long)cell * channels + c];
                    if ((v > best) | ((v != v) & (best == best))) {
                        best = v;
                        where = window_index ? i * g->pool_w + j : cell;
                    }
                }
                y[out + c] = best;
                store_index(argmax, window_index, out + c, where);
            }
        }
}

/* With stream, non-temporal stores (target 16-byte aligned): a gradient too big for any
 * cache goes straight to memory without first being read for ownership. */
static inline __attribute__((always_inline, target("avx2,fma"))) void max_pool_backward_row_avx2(
    const cnnx_pool_geometry *g, const float *restrict grad_output,
    const void *restrict argmax, const int window_index, const float *restrict relu_y,
    const int masked, float *restrict grad_input, const int stream, long row)
{
    int channels = g->channels;
    long image = row / g->out_h;
    int out_y = (int)(row % g->out_h);
    float *grad_image = grad_input + image * g->in_h * g->in_w * channels;
    int start_y = out_y * g->stride_h - g->pad_top, first_i, end_i;
    clip_window(start_y, g->pool_h, g->in_h, &first_i, &end_i);
    for (int i = first_i; i < end_i; ++i) {
        int in_y = start_y + i;
        for (int out_x = 0; out_x < g->out_w; ++out_x) {
            long out = (row * g->out_w + out_x) * channels;
            const float *restrict grad = grad_output + out;
            int start_x = out_x * g->stride_w - g->pad_left, first_j, end_j;
            clip_window(start_x, g->pool_w, g->in_w, &first_j, &end_j);
            for (int j = first_j; j < end_j; ++j) {
                int cell = in_y * g->in_w + start_x + j;
                int code = window_index ? i * g->pool_w + j : cell;
                __m256i wanted = _mm256_set1_epi32(code);
                float *restrict target = grad_image + (long)cell * channels;
                int c0 = 0;
                for (; c0 + CHANNEL_BLOCK <= channels; c0 += CHANNEL_BLOCK) {
                    __m256i index = load_indices(argmax, window_index, out + c0);
                    __m256 gradient = _mm256_loadu_ps(grad + c0);
                    if (masked)             /* grad * (y > 0 ? 1 : 0), as masked_grad */
                        gradient = _mm256_mul_ps(gradient, _mm256_and_ps(
                            _mm256_cmp_ps(_mm256_loadu_ps(relu_y + out + c0),
                                          _mm256_setzero_ps(), _CMP_GT_OQ),
                            _mm256_set1_ps(1.0f)));
                    /* the gradient's bits where the index matches, +0 elsewhere */
                    __m256 value = _mm256_and_ps(gradient,
                                                 _mm256_castsi256_ps(_mm256_cmpeq_epi32(index, wanted)));
                    if (stream) {
                        _mm_stream_ps(target + c0, _mm256_castps256_ps128(value));
                        _mm_stream_ps(target + c0 + 4, _mm256_extractf128_ps(value, 1));
                    } else {
                        _mm256_storeu_ps(target + c0, value);
                    }
                }
                for (int c = c0; c < channels; ++c) {
                    int index = load_index(argmax, window_index, out + c);
                    target[c] = index == code
                                ? masked_grad(grad[c], masked ? relu_y[out + c] : 0.0f, masked)
                                : 0.0f;
                }
            }
        }
    }
}
#endif

typedef void (*forward_row_fn)(const cnnx_pool_geometry *, const float *, float *, void *,
                               long);
typedef void (*backward_row_fn)(const cnnx_pool_geometry *, const float *, const void *,
                                const float *, float *, long);

static void forward_cell_generic(const cnnx_pool_geometry *g, const float *x, float *y,
                                 void *argmax, long row)
{
    max_pool_forward_row(g, x, y, argmax, 0, row);
}

static void forward_window_generic(const cnnx_pool_geometry *g, const float *x, float *y,
                                   void *argmax, long row)
{
    max_pool_forward_row(g, x, y, argmax, 1, row);
}

#define BACKWARD_GENERIC(name, window_index, masked)                                        \
    static void name(const cnnx_pool_geometry *g, const float *grad_output,                  \
                     const void *argmax, const float *relu_y, float *grad_input, long row)   \
    {                                                                                       \
        max_pool_backward_row(g, grad_output, argmax, window_index, relu_y, masked,         \
                              grad_input, row);                                             \
    }
BACKWARD_GENERIC(backward_cell_generic, 0, 0)
BACKWARD_GENERIC(backward_window_generic, 1, 0)
BACKWARD_GENERIC(backward_cell_generic_masked, 0, 1)
BACKWARD_GENERIC(backward_window_generic_masked, 1, 1)

#if defined(__x86_64__) || defined(__i386__)
#define AVX2 __attribute__((target("avx2,fma")))
static AVX2 void forward_cell_avx2(const cnnx_pool_geometry *g, const float *x, float *y,
                                   void *argmax, long row)
{
    max_pool_forward_row_avx2(g, x, y, argmax, 0, row);
}

static AVX2 void forward_window_avx2(const cnnx_pool_geometry *g, const float *x, float *y,
                                     void *argmax, long row)
{
    max_pool_forward_row_avx2(g, x, y, argmax, 1, row);
}

/* One window's max and tap, cell by cell in row-major order with the rule of the rows above
 * (strict >, the first NaN wins): the clipped windows of the 2x2 row below. */
static void max_window_scalar(const cnnx_pool_geometry *g, const float *x_image, int start_y,
                              int start_x, float *y, uint8_t *taps)
{
    int first_i, end_i, first_j, end_j;
    clip_window(start_y, g->pool_h, g->in_h, &first_i, &end_i);
    clip_window(start_x, g->pool_w, g->in_w, &first_j, &end_j);
    for (int c = 0; c < g->channels; ++c) {
        float best = 0.0f;
        int where = -1;
        for (int i = first_i; i < end_i; ++i)
            for (int j = first_j; j < end_j; ++j) {
                float v = x_image[((long)(start_y + i) * g->in_w + start_x + j) * g->channels + c];
                if (where < 0 || (v > best) | ((v != v) & (best == best))) {
                    best = v;
                    where = i * g->pool_w + j;
                }
            }
        y[c] = best;
        taps[c] = (uint8_t)where;
    }
}

/* The max of 8 channels' 2x2 windows (cells a b / d e at top + c and bottom + c) and its
 * tap (0..3) as int32 lanes. A tree: each row's pair, then the bottom row's winner taken only
 * when it beats the top row's (or is the first NaN): the cell the row-major scan keeps, in
 * two dependent steps instead of three. */
static inline __attribute__((always_inline, target("avx2,fma"))) __m256 max_2x2_avx2(
    const float *top, const float *bottom, int channels, int c, __m256i *tap)
{
    __m256 a = _mm256_loadu_ps(top + c), b = _mm256_loadu_ps(top + channels + c);
    __m256 d = _mm256_loadu_ps(bottom + c), e = _mm256_loadu_ps(bottom + channels + c);
    __m256 take_b = _mm256_and_ps(_mm256_cmp_ps(b, a, _CMP_NLE_UQ), _mm256_cmp_ps(a, a, _CMP_ORD_Q));
    __m256 take_e = _mm256_and_ps(_mm256_cmp_ps(e, d, _CMP_NLE_UQ), _mm256_cmp_ps(d, d, _CMP_ORD_Q));
    __m256 upper = _mm256_blendv_ps(a, b, take_b), lower = _mm256_blendv_ps(d, e, take_e);
    __m256 take_lower = _mm256_and_ps(_mm256_cmp_ps(lower, upper, _CMP_NLE_UQ),
                                      _mm256_cmp_ps(upper, upper, _CMP_ORD_Q));
    /* masks are -1 or 0: the top tap is 0 - take_b, the bottom one 2 - take_e */
    __m256i upper_tap = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_castps_si256(take_b));
    __m256i lower_tap = _mm256_sub_epi32(_mm256_set1_epi32(2), _mm256_castps_si256(take_e));
    *tap = _mm256_blendv_epi8(upper_tap, lower_tap, _mm256_castps_si256(take_lower));
    return _mm256_blendv_ps(upper, lower, take_lower);
}

/* 2x2 windows, stride 2, window taps, AVX2: the four cells of a window read straight from
 * the two input rows, max and tap in registers, stored once (the general row above passes
 * them through y and argmax between window rows: 3x slower on 98x98x32, where a
 * convolution's pool epilogue spent more than its convolution). The same rule, in the same
 * cell order, so the same bits. */
static AVX2 void forward_window_2x2_avx2(const cnnx_pool_geometry *g, const float *x, float *y,
                                         void *argmax, long row)
{
    int channels = g->channels;
    long image = row / g->out_h;
    int out_y = (int)(row % g->out_h);
    const float *x_image = x + image * g->in_h * g->in_w * channels;
    int start_y = out_y * 2 - g->pad_top;
    for (int out_x = 0; out_x < g->out_w; ++out_x) {
        long out = (row * g->out_w + out_x) * channels;
        int start_x = out_x * 2 - g->pad_left;
        uint8_t *taps = (uint8_t *)argmax + out;
        if (start_y < 0 || start_y + 2 > g->in_h || start_x < 0 || start_x + 2 > g->in_w) {
            max_window_scalar(g, x_image, start_y, start_x, y + out, taps);
            continue;
        }
        const float *top = x_image + ((long)start_y * g->in_w + start_x) * channels;
        const float *bottom = top + (long)g->in_w * channels;
        int c = 0;
        for (; c + 4 * CHANNEL_BLOCK <= channels; c += 4 * CHANNEL_BLOCK) {
            /* four vectors' taps packed to 32 bytes at once (packs work within 128-bit
             * lanes: the permute puts the 4-byte groups back in order) */
            __m256i taps32[4];
            for (int k = 0; k < 4; ++k)
                _mm256_storeu_ps(y + out + c + k * CHANNEL_BLOCK,
                                 max_2x2_avx2(top, bottom, channels, c + k * CHANNEL_BLOCK,
                                              &taps32[k]));
            __m256i words = _mm256_packs_epi32(taps32[0], taps32[1]);
            __m256i bytes = _mm256_packus_epi16(words, _mm256_packs_epi32(taps32[2], taps32[3]));
            _mm256_storeu_si256((__m256i *)(taps + c), _mm256_permutevar8x32_epi32(
                bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
        }
        for (; c + CHANNEL_BLOCK <= channels; c += CHANNEL_BLOCK) {
            __m256i tap;
            _mm256_storeu_ps(y + out + c, max_2x2_avx2(top, bottom, channels, c, &tap));
            store_indices(argmax, 1, out + c, tap);
        }
        for (; c < channels; ++c) {               /* the channels past the last vector */
            const float values[4] = {top[c], top[channels + c], bottom[c],
                                     bottom[channels + c]};
            float best = values[0];
            int where = 0;
            for (int k = 1; k < 4; ++k)
                if ((values[k] > best) | ((values[k] != values[k]) & (best == best))) {
                    best = values[k];
                    where = k;
                }
            y[out + c] = best;
            taps[c] = (uint8_t)where;
        }
    }
}

#define BACKWARD_AVX2(name, window_index, masked, stream)                                   \
    static AVX2 void name(const cnnx_pool_geometry *g, const float *grad_output,            \
                          const void *argmax, const float *relu_y, float *grad_input,        \
                          long row)                                                         \
    {                                                                                       \
        max_pool_backward_row_avx2(g, grad_output, argmax, window_index, relu_y, masked,    \
                                   grad_input, stream, row);                                \
    }
BACKWARD_AVX2(backward_cell_avx2, 0, 0, 0)
BACKWARD_AVX2(backward_window_avx2, 1, 0, 0)
BACKWARD_AVX2(backward_cell_avx2_stream, 0, 0, 1)
BACKWARD_AVX2(backward_window_avx2_stream, 1, 0, 1)
BACKWARD_AVX2(backward_cell_avx2_masked, 0, 1, 0)
BACKWARD_AVX2(backward_window_avx2_masked, 1, 1, 0)
BACKWARD_AVX2(backward_cell_avx2_masked_stream, 0, 1, 1)
BACKWARD_AVX2(backward_window_avx2_masked_stream, 1, 1, 1)
#endif

/* in_cache: x is in L2 (a convolution's band, just made). The 2x2 rows then run at 2.8 ns
 * per 8 outputs against the general rows' 3x that; from memory the general rows are the
 * faster (23 GB/s against 17-19 on comics' 98x98x32: they read one input row front to
 * back at a time, the 2x2 rows two rows side by side). */
static forward_row_fn forward_row_for(const cnnx_pool_geometry *g, int argmax_kind,
                                      int in_cache)
{
    int window_index = argmax_kind == CNNX_ARGMAX_WINDOW;
#if defined(__x86_64__) || defined(__i386__)
    if (cnnx_get_isa() == CNNX_ISA_AVX2) {
        if (in_cache && window_index && g->pool_h == 2 && g->pool_w == 2 && g->stride_h == 2
            && g->stride_w == 2)
            return forward_window_2x2_avx2;
        return window_index ? forward_window_avx2 : forward_cell_avx2;
    }
#endif
    (void)g;
    (void)in_cache;
    return window_index ? forward_window_generic : forward_cell_generic;
}

void cnnx_max_pool2d_forward_rows(const cnnx_pool_geometry *g, const float *x, float *y,
                                  void *argmax, int argmax_kind, long first_row, long end_row)
{
    forward_row_fn forward_row = forward_row_for(g, argmax_kind, 1);
    for (long row = first_row; row < end_row; ++row)
        forward_row(g, x, y, argmax, row);
}

void cnnx_max_pool2d_forward(const cnnx_pool_geometry *g, const float *x, float *y,
                             void *argmax, int argmax_kind, int n_threads)
{
    long rows = (long)g->batch * g->out_h;
    forward_row_fn forward_row = forward_row_for(g, argmax_kind, 0);
    (void)n_threads;
    #pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1)
    for (long row = 0; row < rows; ++row)
        forward_row(g, x, y, argmax, row);
}

/* Zero the input cells no window covers (rows and columns past the last window). */
static void zero_uncovered(const cnnx_pool_geometry *g, float *grad_image)
{
    int channels = g->channels;
    int end_y = (g->out_h - 1) * g->stride_h - g->pad_top + g->pool_h;
    int end_x = (g->out_w - 1) * g->stride_w - g->pad_left + g->pool_w;
    end_y = end_y < g->in_h ? end_y : g->in_h;
    end_x = end_x < g->in_w ? end_x : g->in_w;
    for (int in_y = 0; in_y < g->in_h; ++in_y) {
        float *row = grad_image + (long)in_y * g->in_w * channels;
        if (in_y >= end_y)
            memset(row, 0, sizeof(float) * g->in_w * channels);
        else if (end_x < g->in_w)
            memset(row + (long)end_x * channels, 0,
                   sizeof(float) * (g->in_w - end_x) * channels);
    }
}

/* The backward row function for this index kind, mask, ISA and output. */
static backward_row_fn backward_row_for(const cnnx_pool_geometry *g, int window_index,
                                        int masked, const float *grad_input)
{
#if defined(__x86_64__) || defined(__i386__)
    if (cnnx_get_isa() == CNNX_ISA_AVX2) {
        static const backward_row_fn avx2[2][2][2] = {     /* [masked][stream][window_index] */
            {{backward_cell_avx2, backward_window_avx2},
             {backward_cell_avx2_stream, backward_window_avx2_stream}},
            {{backward_cell_avx2_masked, backward_window_avx2_masked},
             {backward_cell_avx2_masked_stream, backward_window_avx2_masked_stream}}};
        long bytes = (long)g->batch * g->in_h * g->in_w * g->channels * (long)sizeof(float);
        int stream = bytes >= STREAM_MIN_BYTES && g->channels % CHANNEL_BLOCK == 0
                     && (uintptr_t)grad_input % 16 == 0;
        return avx2[masked][stream][window_index];
    }
#endif
    static const backward_row_fn generic[2][2] = {
        {backward_cell_generic, backward_window_generic},
        {backward_cell_generic_masked, backward_window_generic_masked}};
    (void)g;
    (void)grad_input;
    return generic[masked][window_index];
}

void cnnx_max_pool2d_backward(const cnnx_pool_geometry *g, const float *grad_output,
                              const void *argmax, int argmax_kind, const float *relu_y,
                              float *grad_input, int n_threads)
{
    int channels = g->channels;
    int window_index = argmax_kind == CNNX_ARGMAX_WINDOW;
    int masked = relu_y != NULL;
    long plane_in = (long)g->in_h * g->in_w * channels;
    long plane_out = (long)g->out_h * g->out_w * channels;
    (void)n_threads;
    if (g->stride_h == g->pool_h && g->stride_w == g->pool_w) {
        /* windows tile the input: every cell lies in at most one window and is written
         * once, gradient or zero; argmax is only compared, never used as an address */
        long rows = (long)g->batch * g->out_h;
        backward_row_fn backward_row = backward_row_for(g, window_index, masked, grad_input);
        #pragma omp parallel num_threads(n_threads) if (n_threads > 1)
        {
            #pragma omp for schedule(static) nowait
            for (long image = 0; image < g->batch; ++image)
                zero_uncovered(g, grad_input + image * plane_in);
            #pragma omp for schedule(static) nowait
            for (long row = 0; row < rows; ++row)
                backward_row(g, grad_output, argmax, relu_y, grad_input, row);
#if defined(__x86_64__) || defined(__i386__)
            _mm_sfence();           /* each thread's non-temporal stores, before the barrier */
#endif
        }
        return;
    }
    #pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1)
    for (long image = 0; image < g->batch; ++image) {
        float *grad_image = grad_input + image * plane_in;
        memset(grad_image, 0, sizeof(float) * plane_in);
        const float *grad_out = grad_output + image * plane_out;
        const float *pooled = masked ? relu_y + image * plane_out : NULL;
        if (!window_index) {
            const int32_t *index = (const int32_t *)argmax + image * plane_out;
            for (long out = 0; out < plane_out; out += channels)
                for (int c = 0; c < channels; ++c)
                    grad_image[(long)index[out + c] * channels + c] += grad_out[out + c];
            /* ReLU's mask after the sums, as ReLU's backward applies it: a cell that is
             * the max of several windows is multiplied once per window, by the same 1 or
             * 0 (its own value), and s * k * k == s * k bit for bit for k in {0, 1} */
            if (masked)
                for (long out = 0; out < plane_out; out += channels)
                    for (int c = 0; c < channels; ++c) {
                        float *cell = grad_image + (long)index[out + c] * channels + c;
                        *cell = masked_grad(*cell, pooled[out + c], 1);
                    }
            continue;
        }
        const uint8_t *index = (const uint8_t *)argmax + image * plane_out;
        for (int out_y = 0; out_y < g->out_h; ++out_y)
            for (int out_x = 0; out_x < g->out_w; ++out_x) {
                long out = ((long)out_y * g->out_w + out_x) * channels;
                int start_y = out_y * g->stride_h - g->pad_top;
                int start_x = out_x * g->stride_w - g->pad_left;
                for (int c = 0; c < channels; ++c) {
                    int tap = index[out + c];
                    long cell = (long)(start_y + tap / g->pool_w) * g->in_w
                                + start_x + tap % g->pool_w;
                    grad_image[cell * channels + c] += grad_out[out + c];
                }
            }
        if (masked)                                  /* the mask after the sums, as above */
            for (int out_y = 0; out_y < g->out_h; ++out_y)
                for (int out_x = 0; out_x < g->out_w; ++out_x) {
                    long out = ((long)out_y * g->out_w + out_x) * channels;
                    int start_y = out_y * g->stride_h - g->pad_top;
                    int start_x = out_x * g->stride_w - g->pad_left;
                    for (int c = 0; c < channels; ++c) {
                        int tap = index[out + c];
                        long cell = (long)(start_y + tap / g->pool_w) * g->in_w
                                    + start_x + tap % g->pool_w;
                        float *value = grad_image + cell * channels + c;
                        *value = masked_grad(*value, pooled[out + c], 1);
                    }
                }
    }
}

/* One output row of average-pool forward, window rows outermost like max-pool's (each
 * input row read once, front to back): the partial sums go through y between rows, in the
 * same cell order as before (row-major, starting from 0), and the last row divides. */
static inline __attribute__((always_inline)) void avg_pool_forward_row(
    const cnnx_pool_geometry *g, const float *restrict x, float *restrict y, long row)
{
    int channels = g->channels;
    long image = row / g->out_h;
    int out_y = (int)(row % g->out_h);
    const float *x_image = x + image * g->in_h * g->in_w * channels;
    int start_y = out_y * g->stride_h - g->pad_top, first_i, end_i;
    clip_window(start_y, g->pool_h, g->in_h, &first_i, &end_i);
    for (int i = first_i; i < end_i; ++i)
        for (int out_x = 0; out_x < g->out_w; ++out_x) {
            float *restrict mean = y + (row * g->out_w + out_x) * channels;
            int start_x = out_x * g->stride_w - g->pad_left, first_j, end_j;
            clip_window(start_x, g->pool_w, g->in_w, &first_j, &end_j);
            const float *row_cells = x_image + ((long)(start_y + i) * g->in_w + start_x) * channels;
            float count = (float)((end_i - first_i) * (end_j - first_j));
            int last_row = i == end_i - 1;
            int c0 = 0;
            for (; c0 + CHANNEL_BLOCK <= channels; c0 += CHANNEL_BLOCK) {
                float sum[CHANNEL_BLOCK];
                for (int k = 0; k < CHANNEL_BLOCK; ++k)
                    sum[k] = i == first_i ? 0.0f : mean[c0 + k];
                for (int j = first_j; j < end_j; ++j) {
                    const float *restrict values = row_cells + (long)j * channels + c0;
                    for (int k = 0; k < CHANNEL_BLOCK; ++k)
                        sum[k] += values[k];
                }
                for (int k = 0; k < CHANNEL_BLOCK; ++k)
                    mean[c0 + k] = last_row ? sum[k] / count : sum[k];
            }
            for (int c = c0; c < channels; ++c) {
                float sum = i == first_i ? 0.0f : mean[c];
                for (int j = first_j; j < end_j; ++j)
                    sum += row_cells[(long)j * channels + c];
                mean[c] = last_row ? sum / count : sum;
            }
        }
}

/* Output windows along one axis that cover input position p: out in [first, end). */
static void covering_windows(int p, int pool, int stride, int pad, int out_size, int *first,
                             int *end)
{
    /* window o covers p when o*stride - pad <= p < o*stride - pad + pool */
    int low = p + pad - pool + 1;
    *first = low <= 0 ? 0 : (low + stride - 1) / stride;
    int high = (p + pad) / stride + 1;
    *end = high < out_size ? high : out_size;
}

static int window_cells(int start, int pool, int size)
{
    int first, end;
    clip_window(start, pool, size, &first, &end);
    return end - first;
}

/* One input row of average-pool backward: each cell gathers share / count from the
 * windows covering it, summed in registers a block of channels at a time. */
static inline __attribute__((always_inline)) void avg_pool_backward_row(
    const cnnx_pool_geometry *g, const float *restrict grad_output,
    float *restrict grad_input, long row)
{
    int channels = g->channels;
    long image = row / g->in_h;
    int in_y = (int)(row % g->in_h), first_y, end_y;
    covering_windows(in_y, g->pool_h, g->stride_h, g->pad_top, g->out_h, &first_y, &end_y);
    const float *grad_image = grad_output + image * g->out_h * g->out_w * channels;
    for (int in_x = 0; in_x < g->in_w; ++in_x) {
        float *restrict grad = grad_input + (row * g->in_w + in_x) * channels;
        int first_x, end_x;
        covering_windows(in_x, g->pool_w, g->stride_w, g->pad_left, g->out_w, &first_x,
                         &end_x);
        int c0 = 0;
        for (; c0 + CHANNEL_BLOCK <= channels; c0 += CHANNEL_BLOCK) {
            float sum[CHANNEL_BLOCK] = {0};
            for (int oy = first_y; oy < end_y; ++oy) {
                int cells_y = window_cells(oy * g->stride_h - g->pad_top, g->pool_h, g->in_h);
                for (int ox = first_x; ox < end_x; ++ox) {
                    float count = (float)(cells_y * window_cells(ox * g->stride_w - g->pad_left,
                                                                 g->pool_w, g->in_w));
                    const float *restrict share =
                        grad_image + ((long)oy * g->out_w + ox) * channels + c0;
                    for (int k = 0; k < CHANNEL_BLOCK; ++k)
                        sum[k] += share[k] / count;
                }
            }
            for (int k = 0; k < CHANNEL_BLOCK; ++k)
                grad[c0 + k] = sum[k];
        }
        for (int c = c0; c < channels; ++c) {
            float sum = 0.0f;
            for (int oy = first_y; oy < end_y; ++oy) {
                int cells_y = window_cells(oy * g->stride_h - g->pad_top, g->pool_h, g->in_h);
                for (int ox = first_x; ox < end_x; ++ox) {
                    float count = (float)(cells_y * window_cells(ox * g->stride_w - g->pad_left,
                                                                 g->pool_w, g->in_w));
                    sum += grad_image[((long)oy * g->out_w + ox) * channels + c] / count;
                }
            }
            grad[c] = sum;
        }
    }
}

typedef void (*avg_row_fn)(const cnnx_pool_geometry *, const float *, float *, long);

#define AVG_VARIANTS(suffix, attributes)                                                    \
    static attributes void avg_forward_##suffix(const cnnx_pool_geometry *g, const float *x, \
                                                float *y, long row)                         \
    {                                                                                       \
        avg_pool_forward_row(g, x, y, row);                                                 \
    }                                                                                       \
    static attributes void avg_backward_##suffix(const cnnx_pool_geometry *g,               \
                                                 const float *grad_output, float *grad_input,\
                                                 long row)                                  \
    {                                                                                       \
        avg_pool_backward_row(g, grad_output, grad_input, row);                             \
    }
AVG_VARIANTS(generic, )
#if defined(__x86_64__) || defined(__i386__)
AVG_VARIANTS(avx2, __attribute__((target("avx2,fma"))))
#endif

void cnnx_avg_pool2d_forward(const cnnx_pool_geometry *g, const float *x, float *y,
                             int n_threads)
{
    long rows = (long)g->batch * g->out_h;
    avg_row_fn forward_row = avg_forward_generic;
#if defined(__x86_64__) || defined(__i386__)
    if (cnnx_get_isa() == CNNX_ISA_AVX2)
        forward_row = avg_forward_avx2;
#endif
    (void)n_threads;
    #pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1)
    for (long row = 0; row < rows; ++row)
        forward_row(g, x, y, row);
}

/* One input row of average-pool backward when windows tile the input (stride == pool):
 * each cell lies in at most one window and takes 0 + share / count, as the gather above
 * computes it; the quotient is worked out once per window and input row instead of once
 * per cell, and as a product when count is a power of two (then share * (1 / count) is
 * the same correctly rounded number). */
static inline __attribute__((always_inline)) void avg_pool_backward_tiling_row(
    const cnnx_pool_geometry *g, const float *restrict grad_output,
    float *restrict grad_input, long row)
{
    int channels = g->channels;
    long image = row / g->in_h;
    int in_y = (int)(row % g->in_h);
    float *restrict grad_row = grad_input + row * g->in_w * channels;
    int out_y = (in_y + g->pad_top) / g->stride_h;
    if (out_y >= g->out_h) {                       /* below the last window */
        memset(grad_row, 0, sizeof(float) * g->in_w * channels);
        return;
    }
    int cells_y = window_cells(out_y * g->stride_h - g->pad_top, g->pool_h, g->in_h);
    const float *share_row = grad_output + (image * g->out_h + out_y) * g->out_w * channels;
    int covered_end = 0;
    for (int out_x = 0; out_x < g->out_w; ++out_x) {
        int start_x = out_x * g->stride_w - g->pad_left, first_j, end_j;
        clip_window(start_x, g->pool_w, g->in_w, &first_j, &end_j);
        int count = cells_y * (end_j - first_j);
        const float *restrict share = share_row + (long)out_x * channels;
        float *restrict first = grad_row + (long)(start_x + first_j) * channels;
        if ((count & (count - 1)) == 0) {
            float reciprocal = 1.0f / (float)count;
            for (int c = 0; c < channels; ++c)
                first[c] = 0.0f + share[c] * reciprocal;
        } else {
            float divisor = (float)count;
            for (int c = 0; c < channels; ++c)
                first[c] = 0.0f + share[c] / divisor;
        }
        for (int j = first_j + 1; j < end_j; ++j)
            memcpy(grad_row + (long)(start_x + j) * channels, first, sizeof(float) * channels);
        covered_end = start_x + end_j;
    }
    if (covered_end < g->in_w)                    /* right of the last window */
        memset(grad_row + (long)covered_end * channels, 0,
               sizeof(float) * (g->in_w - covered_end) * channels);
}

static void avg_backward_tiling_generic(const cnnx_pool_geometry *g, const float *grad_output,
                                        float *grad_input, long row)
{
    avg_pool_backward_tiling_row(g, grad_output, grad_input, row);
}

#if defined(__x86_64__) || defined(__i386__)
static AVX2 void avg_backward_tiling_avx2(const cnnx_pool_geometry *g,
                                          const float *grad_output, float *grad_input, long row)
{
    avg_pool_backward_tiling_row(g, grad_output, grad_input, row);
}
#endif

void cnnx_avg_pool2d_backward(const cnnx_pool_geometry *g, const float *grad_output,
                              float *grad_input, int n_threads)
{
    long rows = (long)g->batch * g->in_h;
    int tiling = g->stride_h == g->pool_h && g->stride_w == g->pool_w;
    avg_row_fn backward_row = tiling ? avg_backward_tiling_generic : avg_backward_generic;
#if defined(__x86_64__) || defined(__i386__)
    if (cnnx_get_isa() == CNNX_ISA_AVX2)
        backward_row = tiling ? avg_backward_tiling_avx2 : avg_backward_avx2;
#endif
    (void)n_threads;
    #pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1)
    for (long row = 0; row < rows; ++row)
        backward_row(g, grad_output, grad_input, row);
}
