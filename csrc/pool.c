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

void cnnx_max_pool2d_forward(const cnnx_pool_geometry *g, const float *x, float *y,
                             int *argmax, int n_threads)
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
            long out = (row * g->out_w + out_x) * channels;
            float *best = y + out;
            int *best_index = argmax + out;
            int start_x = out_x * g->stride_w - g->pad_left, first_j, end_j;
            clip_window(start_x, g->pool_w, g->in_w, &first_j, &end_j);
            for (int c = 0; c < channels; ++c) {
                best[c] = -FLT_MAX;
                best_index[c] = -1;
            }
            for (int i = first_i; i < end_i; ++i)
                for (int j = first_j; j < end_j; ++j) {
                    int cell = (start_y + i) * g->in_w + start_x + j;
                    const float *values = x_image + (long)cell * channels;
                    /* strict > keeps the first maximum of the row-major scan, like argmax;
                     * like argmax too, the first NaN wins (so a NaN reaches the loss) */
                    for (int c = 0; c < channels; ++c)
                        if (best_index[c] < 0 || values[c] > best[c]
                            || (values[c] != values[c] && best[c] == best[c])) {
                            best[c] = values[c];
                            best_index[c] = cell;
                        }
                }
        }
    }
}

void cnnx_max_pool2d_backward(const cnnx_pool_geometry *g, const float *grad_output,
                              const int *argmax, float *grad_input, int n_threads)
{
    int channels = g->channels;
    long plane_in = (long)g->in_h * g->in_w * channels;
    long plane_out = (long)g->out_h * g->out_w * channels;
    (void)n_threads;
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
