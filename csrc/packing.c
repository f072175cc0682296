/* Packing: GEMM operands copied into the micro-kernels' panel layout (BLIS's packm), and
 * the im2col rows a convolution operand is packed from (never a whole im2col matrix).
 */
#include <string.h>

#include "gemm_internal.h"

/* dst[p*6 + r] = a(i0 + r, k0 + p) for r < rows, zero for the rows past the edge. */
void pack_a_panel(const gemm_operand *a, int i0, int rows, int k0, int kc, float *dst)
{
    if (rows < GEMM_MR)
        memset(dst, 0, sizeof(float) * GEMM_MR * kc);
    if (a->kind == OPERAND_MATRIX) {
        const float *base = a->data + i0 * a->row_stride + k0 * a->col_stride;
        if (a->row_stride == 1) {                       /* transposed: 6 rows contiguous */
            for (int p = 0; p < kc; ++p)
                for (int r = 0; r < rows; ++r)
                    dst[p * GEMM_MR + r] = base[p * a->col_stride + r];
        } else if (rows == GEMM_MR && a->col_stride == 1) {
            /* six rows walked side by side: the writes stay sequential */
            const float *row0 = base, *row1 = base + a->row_stride;
            const float *row2 = row1 + a->row_stride, *row3 = row2 + a->row_stride;
            const float *row4 = row3 + a->row_stride, *row5 = row4 + a->row_stride;
            for (int p = 0; p < kc; ++p, dst += GEMM_MR) {
                dst[0] = row0[p];
                dst[1] = row1[p];
                dst[2] = row2[p];
                dst[3] = row3[p];
                dst[4] = row4[p];
                dst[5] = row5[p];
            }
        } else {
            for (int r = 0; r < rows; ++r)
                for (int p = 0; p < kc; ++p)
                    dst[p * GEMM_MR + r] = base[r * a->row_stride + p * a->col_stride];
        }
    } else if (a->kind == OPERAND_IM2COL) {
        for (int r = 0; r < rows; ++r)
            im2col_row_segment(a->geometry, a->data, (long)i0 + r, k0, kc, dst + r, GEMM_MR);
    } else {                                            /* rows are (tap, channel) indices */
        for (int p = 0; p < kc; ++p)
            im2col_row_segment(a->geometry, a->data, (long)k0 + p, i0, rows,
                               dst + p * GEMM_MR, 1);
    }
}

/* dst[p*16 + j] = b(k0 + p, j0 + j) for j < cols, zero past the edge. */
void pack_b_panel(const gemm_operand *b, int k0, int kc, int j0, int cols, float *dst)
{
    const float *base = b->data + k0 * b->row_stride + j0 * b->col_stride;
    if (cols < GEMM_NR)
        memset(dst, 0, sizeof(float) * GEMM_NR * kc);
    if (b->col_stride == 1) {
        for (int p = 0; p < kc; ++p)
            memcpy(dst + p * GEMM_NR, base + p * b->row_stride, sizeof(float) * cols);
    } else {                                            /* transposed: walk k contiguously */
        for (int j = 0; j < cols; ++j)
            for (int p = 0; p < kc; ++p)
                dst[p * GEMM_NR + j] = base[j * b->col_stride + p * b->row_stride];
    }
}

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

