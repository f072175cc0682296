/* Max and average pooling, forward and backward (NHWC).
 *
 * Design: every loop nest is parallel over (image, output row) or (image, input row), and
 * each output element is produced by one thread in a fixed order: bit-identical for any
 * n_threads. The innermost loop runs over channels, contiguous in NHWC, so it vectorises.
 * Max-pool backward scatters into the input by argmax; images are independent, so threads
 * take whole images and no two threads touch the same cell. Average-pool backward is a
 * gather (each input cell sums the windows that cover it), so it needs no atomics either.
 */
#include <float.h>
#include <string.h>

#include "cnnx_kernels.h"

/* First and one-past-last window tap that lands inside [0, size) for a window at start. */
static void clip_window(int start, int pool, int size, int *first, int *end)
{
    *first = start < 0 ? -start : 0;
    *end = start + pool > size ? size - start : pool;
}

/* One output row (image, out_y) of max-pool forward. Branch-free over channels (a select
 * per lane), so it vectorises: strict > keeps the first maximum of the row-major scan, like
 * argmax; like argmax too, the first NaN wins (so a NaN reaches the loss). */
static inline __attribute__((always_inline)) void max_pool_forward_row(
    const cnnx_pool_geometry *g, const float *restrict x, float *restrict y,
    int *restrict argmax, long row)
{
    int channels = g->channels;
    long image = row / g->out_h;
    int out_y = (int)(row % g->out_h);
    const float *x_image = x + image * g->in_h * g->in_w * channels;
    int start_y = out_y * g->stride_h - g->pad_top, first_i, end_i;
    clip_window(start_y, g->pool_h, g->in_h, &first_i, &end_i);
    for (int out_x = 0; out_x < g->out_w; ++out_x) {
        long out = (row * g->out_w + out_x) * channels;
        float *restrict best = y + out;
        int *restrict best_index = argmax + out;
        int start_x = out_x * g->stride_w - g->pad_left, first_j, end_j;
        clip_window(start_x, g->pool_w, g->in_w, &first_j, &end_j);
        int first_cell = (start_y + first_i) * g->in_w + start_x + first_j;
        const float *restrict first = x_image + (long)first_cell * channels;
        for (int c = 0; c < channels; ++c) {
            best[c] = first[c];
            best_index[c] = first_cell;
        }
        for (int i = first_i; i < end_i; ++i)
            for (int j = first_j; j < end_j; ++j) {
                int cell = (start_y + i) * g->in_w + start_x + j;
                if (cell == first_cell)
                    continue;
                const float *restrict values = x_image + (long)cell * channels;
                for (int c = 0; c < channels; ++c) {
                    float v = values[c], b = best[c];
                    int take = (v > b) | ((v != v) & (b == b));
                    best[c] = take ? v : b;
                    best_index[c] = take ? cell : best_index[c];
                }
            }
    }
}

/* One output row of max-pool backward when windows tile the input (stride == pool): every
 * input cell of the window rows gets its gradient or 0 in one write pass, no scatter. */
static inline __attribute__((always_inline)) void max_pool_backward_row(
    const cnnx_pool_geometry *g, const float *restrict grad_output,
    const int *restrict argmax, float *restrict grad_input, long row)
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
            const int *restrict index = argmax + out;
            int start_x = out_x * g->stride_w - g->pad_left, first_j, end_j;
            clip_window(start_x, g->pool_w, g->in_w, &first_j, &end_j);
            for (int j = first_j; j < end_j; ++j) {
                int cell = in_y * g->in_w + start_x + j;
                float *restrict target = grad_image + (long)cell * channels;
                for (int c = 0; c < channels; ++c)
                    target[c] = index[c] == cell ? grad[c] : 0.0f;
            }
        }
    }
}

static void max_pool_forward_row_generic(const cnnx_pool_geometry *g, const float *x,
                                         float *y, int *argmax, long row)
{
    max_pool_forward_row(g, x, y, argmax, row);
}

static void max_pool_backward_row_generic(const cnnx_pool_geometry *g,
                                          const float *grad_output, const int *argmax,
                                          float *grad_input, long row)
{
    max_pool_backward_row(g, grad_output, argmax, grad_input, row);
}

#if defined(__x86_64__) || defined(__i386__)
/* the same loops compiled for AVX2: 8 lanes per select instead of SSE2's 4 */
static __attribute__((target("avx2,fma"))) void max_pool_forward_row_avx2(
    const cnnx_pool_geometry *g, const float *x, float *y, int *argmax, long row)
{
    max_pool_forward_row(g, x, y, argmax, row);
}

static __attribute__((target("avx2,fma"))) void max_pool_backward_row_avx2(
    const cnnx_pool_geometry *g, const float *grad_output, const int *argmax,
    float *grad_input, long row)
{
    max_pool_backward_row(g, grad_output, argmax, grad_input, row);
}
#endif

void cnnx_max_pool2d_forward(const cnnx_pool_geometry *g, const float *x, float *y,
                             int *argmax, int n_threads)
{
    long rows = (long)g->batch * g->out_h;
    void (*forward_row)(const cnnx_pool_geometry *, const float *, float *, int *, long) =
        max_pool_forward_row_generic;
#if defined(__x86_64__) || defined(__i386__)
    if (cnnx_get_isa() == CNNX_ISA_AVX2)
        forward_row = max_pool_forward_row_avx2;
#endif
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

void cnnx_max_pool2d_backward(const cnnx_pool_geometry *g, const float *grad_output,
                              const int *argmax, float *grad_input, int n_threads)
{
    int channels = g->channels;
    long plane_in = (long)g->in_h * g->in_w * channels;
    long plane_out = (long)g->out_h * g->out_w * channels;
    (void)n_threads;
    if (g->stride_h == g->pool_h && g->stride_w == g->pool_w) {
        /* windows tile the input: every cell lies in at most one window and is written
         * once, gradient or zero; argmax is only compared, never used as an address */
        long rows = (long)g->batch * g->out_h;
        void (*backward_row)(const cnnx_pool_geometry *, const float *, const int *, float *,
                             long) = max_pool_backward_row_generic;
#if defined(__x86_64__) || defined(__i386__)
        if (cnnx_get_isa() == CNNX_ISA_AVX2)
            backward_row = max_pool_backward_row_avx2;
#endif
        #pragma omp parallel num_threads(n_threads) if (n_threads > 1)
        {
            #pragma omp for schedule(static) nowait
            for (long image = 0; image < g->batch; ++image)
                zero_uncovered(g, grad_input + image * plane_in);
            #pragma omp for schedule(static)
            for (long row = 0; row < rows; ++row)
                backward_row(g, grad_output, argmax, grad_input, row);
        }
        return;
    }
    #pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1)
    for (long image = 0; image < g->batch; ++image) {
        float *grad_image = grad_input + image * plane_in;
        memset(grad_image, 0, sizeof(float) * plane_in);
        const float *grad_out = grad_output + image * plane_out;
        const int *index = argmax + image * plane_out;
        for (long out = 0; out < plane_out; out += channels)
            for (int c = 0; c < channels; ++c)
                grad_image[(long)index[out + c] * channels + c] += grad_out[out + c];
    }
}

void cnnx_avg_pool2d_forward(const cnnx_pool_geometry *g, const float *x, float *y,
                             int n_threads)
{
    int channels = g->channels;
    long rows = (long)g->batch * g->out_h;
    (void)n_threads;
    #pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1)
    for (long row = 0; row < rows; ++row) {
        long image = row / g->out_h;
        int out_y = (int)(row % g->out_h);
        const float *x_image = x + image * g->in_h * g->in_w * channels;
        int start_y = out_y * g->stride_h - g->pad_top, first_i, end_i;
        clip_window(start_y, g->pool_h, g->in_h, &first_i, &end_i);
        for (int out_x = 0; out_x < g->out_w; ++out_x) {
            float *sum = y + (row * g->out_w + out_x) * channels;
            int start_x = out_x * g->stride_w - g->pad_left, first_j, end_j;
            clip_window(start_x, g->pool_w, g->in_w, &first_j, &end_j);
            float count = (float)((end_i - first_i) * (end_j - first_j));
            memset(sum, 0, sizeof(float) * channels);
            for (int i = first_i; i < end_i; ++i)
                for (int j = first_j; j < end_j; ++j) {
                    const float *values =
                        x_image + ((long)(start_y + i) * g->in_w + start_x + j) * channels;
                    for (int c = 0; c < channels; ++c)
                        sum[c] += values[c];
                }
            for (int c = 0; c < channels; ++c)
                sum[c] /= count;
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

void cnnx_avg_pool2d_backward(const cnnx_pool_geometry *g, const float *grad_output,
                              float *grad_input, int n_threads)
{
    int channels = g->channels;
    long rows = (long)g->batch * g->in_h;
    (void)n_threads;
    #pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1)
    for (long row = 0; row < rows; ++row) {
        long image = row / g->in_h;
        int in_y = (int)(row % g->in_h), first_y, end_y;
        covering_windows(in_y, g->pool_h, g->stride_h, g->pad_top, g->out_h, &first_y, &end_y);
        const float *grad_image = grad_output + image * g->out_h * g->out_w * channels;
        for (int in_x = 0; in_x < g->in_w; ++in_x) {
            float *grad = grad_input + (row * g->in_w + in_x) * channels;
            int first_x, end_x;
            covering_windows(in_x, g->pool_w, g->stride_w, g->pad_left, g->out_w, &first_x,
                             &end_x);
            memset(grad, 0, sizeof(float) * channels);
            for (int oy = first_y; oy < end_y; ++oy) {
                int cells_y = window_cells(oy * g->stride_h - g->pad_top, g->pool_h, g->in_h);
                for (int ox = first_x; ox < end_x; ++ox) {
                    float count = (float)(cells_y * window_cells(ox * g->stride_w - g->pad_left,
                                                                 g->pool_w, g->in_w));
                    const float *share = grad_image + ((long)oy * g->out_w + ox) * channels;
                    for (int c = 0; c < channels; ++c)
                        grad[c] += share[c] / count;
                }
            }
        }
    }
}
