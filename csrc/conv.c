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

void im2col_row_segment(const cnnx_conv_geometry *g, const float *source, long pixel, int k0,
                        int length, float *dst, int dst_stride)
{
    int out_x = (int)(pixel % g->out_w);
    long rest = pixel / g->out_w;
    int out_y = (int)(rest % g->out_h);
    long image = rest / g->out_h;
    int channels = g->channels;
    const float *source_image = source + image * g->in_h * g->in_w * channels;
    int tap = k0 / channels, channel = k0 % channels;
    while (length > 0) {
        int run = channels - channel < length ? channels - channel : length;
        int tap_y = tap / g->kernel_w, tap_x = tap % g->kernel_w;
        int q_y = out_y * g->stride_h + tap_y - g->pad_top;
        int q_x = out_x * g->stride_w + tap_x - g->pad_left;
        const float *cell = NULL;
        if (q_y >= 0 && q_x >= 0 && q_y % g->dilation_h == 0 && q_x % g->dilation_w == 0) {
            int in_y = q_y / g->dilation_h, in_x = q_x / g->dilation_w;
            if (in_y < g->in_h && in_x < g->in_w)
                cell = source_image + ((long)in_y * g->in_w + in_x) * channels + channel;
        }
        if (cell) {
            if (dst_stride == 1)
                memcpy(dst, cell, sizeof(float) * run);
            else
                for (int t = 0; t < run; ++t)
                    dst[t * dst_stride] = cell[t];
        } else {
            for (int t = 0; t < run; ++t)
                dst[t * dst_stride] = 0.0f;
        }
        dst += (long)run * dst_stride;
        length -= run;
        channel = 0;
        ++tap;
    }
}

void cnnx_conv2d_forward(const cnnx_conv_geometry *geometry, const float *x,
                         const float *kernel, int filters, const float *bias, int relu,
                         float *y, int n_threads, float *workspace)
{
    int rows = geometry->batch * geometry->out_h * geometry->out_w;
    int depth = geometry->kernel_h * geometry->kernel_w * geometry->channels;
    gemm_operand a = {OPERAND_IM2COL, x, 0, 0, geometry};
    gemm_operand b = {OPERAND_MATRIX, kernel, filters, 1, 0};
    gemm_run(rows, filters, depth, &a, &b, y, filters, bias, relu, n_threads, workspace);
}

static long chunk_count(const cnnx_conv_geometry *g)
{
    long pixels = (long)g->batch * g->out_h * g->out_w;
    return (pixels + PIXEL_CHUNK - 1) / PIXEL_CHUNK;
}

long cnnx_conv2d_grad_kernel_workspace_floats(const cnnx_conv_geometry *geometry,
                                              int filters, int n_threads)
{
    long depth = (long)geometry->kernel_h * geometry->kernel_w * geometry->channels;
    return (long)n_threads * GEMM_WORKSPACE_FLOATS
           + chunk_count(geometry) * (depth * filters + filters);
}

void cnnx_conv2d_grad_kernel(const cnnx_conv_geometry *geometry, const float *x,
                             const float *grad_output, int filters, float *grad_kernel,
                             float *grad_bias, int n_threads, float *workspace)
{
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
        #pragma omp for schedule(static)
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
            for (int p = p0; p < p1; ++p)
                for (int f = 0; f < filters; ++f)
                    bias_partial[f] += grad_output[(long)p * filters + f];
        }
        /* Fixed-order sum of the chunk partials, parallel over elements. */
        #pragma omp for schedule(static)
        for (long e = 0; e < partial_size; ++e) {
            float total = partials[e];
            for (long chunk = 1; chunk < chunks; ++chunk)
                total += partials[chunk * partial_size + e];
            if (e < (long)depth * filters)
                grad_kernel[e] = total;
            else
                grad_bias[e - (long)depth * filters] = total;
        }
    }
}
