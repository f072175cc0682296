/* cnnx C kernels: raw loops on contiguous float32 buffers.
 * Contract: callers (cnnx/_kernels.pyx) have checked shapes, dtypes, contiguity and
 * non-emptiness, and allocated any workspace (sized by the *_workspace_floats functions).
 * Kernels never allocate, never fail, never touch the GIL. Every kernel takes n_threads and
 * gives bit-identical results for any n_threads (fixed partitions, fixed-order sums).
 * Layout: NHWC activations, HWIO kernels (KH, KW, C, F), row-major matrices. */
#ifndef CNNX_KERNELS_H
#define CNNX_KERNELS_H

#include <stdint.h>

/* 1 when built with OpenMP, 0 otherwise. */
int cnnx_openmp_enabled(void);

/* Instruction set of the GEMM micro-kernel: CNNX_ISA_AUTO picks AVX2+FMA when the CPU has
 * it; CNNX_ISA_GENERIC forces the portable C kernel (tests). Returns the ISA now in use. */
enum { CNNX_ISA_AUTO = 0, CNNX_ISA_GENERIC = 1, CNNX_ISA_AVX2 = 2 };
int cnnx_set_isa(int isa);
int cnnx_get_isa(void);
int cnnx_cpu_has_avx2_fma(void);

/* Floats of workspace the GEMM-based kernels need (sgemm, conv forward, conv grad input). */
long cnnx_gemm_workspace_floats(int n_threads);

/* c[m,n] = op(a) @ op(b) (+ bias[n]) (relu if flagged); op(a) is a[m,k] or, transposed,
 * a stored as [k,m]; op(b) is b[k,n] or b stored as [n,k]. c is row-major [m,n]. */
void cnnx_sgemm(int m, int n, int k, const float *a, int transpose_a, const float *b,
                int transpose_b, const float *bias, int relu, float *c, int n_threads,
                float *workspace);

/* Geometry of one convolution seen from its GEMM rows: a source tensor (batch, in_h, in_w,
 * channels) read through a kernel_h x kernel_w window for each of the out_h x out_w grid
 * cells. Source row of tap i for grid row y: q = y*stride_h + i - pad_top, used when q is a
 * multiple of dilation_h (input dilation; 1 for a forward convolution) and q/dilation_h is
 * inside the source. The GEMM's k index is (i*kernel_w + j)*channels + c (HWIO order). */
typedef struct {
    int batch, in_h, in_w, channels;
    int out_h, out_w;
    int kernel_h, kernel_w;
    int stride_h, stride_w;
    int dilation_h, dilation_w;
    int pad_top, pad_left;
} cnnx_conv_geometry;

/* y[N*OH*OW, F] = im2col(x) @ kernel[KH*KW*C, F] (+ bias) (relu). The im2col operand is built
 * panel by panel inside the GEMM, never for the whole batch. Also the grad-input pass: the
 * same call on grad_output with flipped, transposed weights and a dilated geometry. */
long cnnx_conv2d_forward_workspace_floats(const cnnx_conv_geometry *geometry, int filters,
                                          int n_threads);
void cnnx_conv2d_forward(const cnnx_conv_geometry *geometry, const float *x,
                         const float *kernel, int filters, const float *bias, int relu,
                         float *y, int n_threads, float *workspace);

/* grad_kernel[KH*KW*C, F] = im2col(x)^T @ grad_output[N*OH*OW, F];
 * grad_bias[F] = column sums of grad_output. Sums run over fixed chunks of output pixels,
 * combined in chunk order. */
long cnnx_conv2d_grad_kernel_workspace_floats(const cnnx_conv_geometry *geometry,
                                              int filters, int n_threads);
void cnnx_conv2d_grad_kernel(const cnnx_conv_geometry *geometry, const float *x,
                             const float *grad_output, int filters, float *grad_kernel,
                             float *grad_bias, int n_threads, float *workspace);

/* flipped[i, j, f, c] = kernel[KH-1-i, KW-1-j, c, f]: the weights of the grad-input pass
 * (flipped in space, transposed in channels). */
void cnnx_conv2d_flip_kernel(int kernel_h, int kernel_w, int channels, int filters,
                             const float *kernel, float *flipped);

/* sums[n] = sum over rows of a[m, n], rows added in order (dense grad bias). */
void cnnx_column_sums(int m, int n, const float *a, float *sums, int n_threads);

/* Pooling over NHWC x (batch, in_h, in_w, channels) -> (batch, out_h, out_w, channels).
 * Windows start at y*stride - pad; cells outside the input are skipped. */
typedef struct {
    int batch, in_h, in_w, channels;
    int out_h, out_w;
    int pool_h, pool_w;
    int stride_h, stride_w;
    int pad_top, pad_left;
} cnnx_pool_geometry;

/* Where each max-pool output's maximum came from: CNNX_ARGMAX_CELL, an int32 cell index
 * h*in_w + w in the input plane; CNNX_ARGMAX_WINDOW, a uint8 tap i*pool_w + j inside the
 * output's window (pool_h*pool_w <= 256; a quarter of the bytes to write and read back). */
enum { CNNX_ARGMAX_CELL = 0, CNNX_ARGMAX_WINDOW = 1 };
/* y = max over the window, argmax = the index (of argmax_kind) of the first maximum in
 * row-major order. */
void cnnx_max_pool2d_forward(const cnnx_pool_geometry *geometry, const float *x, float *y,
                             void *argmax, int argmax_kind, int n_threads);
/* grad_input (zeroed here) [n, argmax, c] += grad_output, in output order. When the pool
 * geometry is known and windows tile the input (stride == pool), one write pass instead,
 * with argmax only compared to each cell (so it needs no range check); stride_h = 0 marks
 * the geometry unknown (CNNX_ARGMAX_CELL only; argmax must then lie inside the input
 * plane; CNNX_ARGMAX_WINDOW taps must lie inside their clipped window).
 * relu_y, when not NULL, is this pool's forward output y over a ReLU output: each routed
 * gradient is then multiplied by (y > 0 ? 1 : 0), ReLU's backward (cnnx_relu_backward)
 * folded in, with its bits; NULL routes the gradient as it is. */
void cnnx_max_pool2d_backward(const cnnx_pool_geometry *geometry, const float *grad_output,
                              const void *argmax, int argmax_kind, const float *relu_y,
                              float *grad_input, int n_threads);
/* Output rows [first_row, end_row) of cnnx_max_pool2d_forward (row = image * out_h + out_y),
 * on the calling thread: the fused convolution + max-pool pools each band of convolution
 * output it has just made, with the same row code, so the same bits. */
void cnnx_max_pool2d_forward_rows(const cnnx_pool_geometry *geometry, const float *x, float *y,
                                  void *argmax, int argmax_kind, long first_row, long end_row);

/* Convolution (stride 1) with a max-pool epilogue: pooled = max_pool(conv(x) + bias (relu)),
 * taps = the pool's window taps (CNNX_ARGMAX_WINDOW), the same bits as cnnx_conv2d_forward
 * then cnnx_max_pool2d_forward, and the convolution's output never reaches memory: each band
 * of output rows is made in a per-thread buffer and pooled there. pool describes the pool
 * over the convolution's output (batch, out_h, out_w, filters). Only where
 * cnnx_conv2d_max_pool_fusable says 1: the conv's stride-1 path, windows that tile the
 * output (stride == pool), no padding before, pool_h dividing the band height. */
int cnnx_conv2d_max_pool_fusable(const cnnx_conv_geometry *geometry,
                                 const cnnx_pool_geometry *pool);
long cnnx_conv2d_max_pool_workspace_floats(const cnnx_conv_geometry *geometry, int filters,
                                           int n_threads);
void cnnx_conv2d_max_pool_forward(const cnnx_conv_geometry *geometry, const float *x,
                                  const float *kernel, int filters, const float *bias,
                                  int relu, const cnnx_pool_geometry *pool, float *pooled,
                                  uint8_t *taps, int n_threads, float *workspace);
/* y = mean over the window's cells inside the input. */
void cnnx_avg_pool2d_forward(const cnnx_pool_geometry *geometry, const float *x, float *y,
                             int n_threads);
/* grad_input = sum over windows covering the cell of grad_output / window cell count. */
void cnnx_avg_pool2d_backward(const cnnx_pool_geometry *geometry, const float *grad_output,
                              float *grad_input, int n_threads);

/* target[i] = source[i] for i < n: the memory-bandwidth yardstick. */
void cnnx_copy(long n, const float *source, float *target, int n_threads);

/* y[i] = max(x[i], 0), a NaN kept (NumPy's maximum). */
void cnnx_relu_forward(long n, const float *x, float *y, int n_threads);
/* grad[i] *= (y[i] > 0): ReLU's backward from its output, in place. */
void cnnx_relu_backward(long n, const float *y, float *grad, int n_threads);

/* ---- optimizers.c: one fused pass per parameter tensor. Every update reads the gradient
 * g = grad / divisor + l1 sign(param) + two_l2 param: divisor is the sample count of a
 * summed gradient (1 for a mean), l1 and two_l2 an L1L2 regularizer's l1 and 2 l2 (0 when
 * none). float32 throughout, in the NumPy formulas' order. */
typedef struct {
    float divisor, l1, two_l2;
} cnnx_gradient_terms;

/* Adam (Kingma & Ba, Algorithm 1) with the bias corrections folded into step and epsilon:
 * m = beta_1 m + (1 - beta_1) g;  v = beta_2 v + (1 - beta_2) g^2;
 * param -= m / (sqrt(v) + epsilon) * step.  With grad_scale != 0 (Nadam) the numerator is
 * m * m_scale + g * grad_scale. */
typedef struct {
    float beta_1, one_minus_beta_1, beta_2, one_minus_beta_2, step, epsilon;
    float m_scale, grad_scale;
} cnnx_adam_scalars;
void cnnx_adam_update(long n, float *param, const float *grad, float *m, float *v,
                      const cnnx_adam_scalars *scalars, const cnnx_gradient_terms *terms,
                      int n_threads);

/* RMSprop (Adagrad: decay = weight = 1): square = decay square + weight g^2;
 * param -= g / (sqrt(square) + epsilon) * learning_rate. */
void cnnx_rmsprop_update(long n, float *param, const float *grad, float *square, float decay,
                         float weight, float learning_rate, float epsilon,
                         const cnnx_gradient_terms *terms, int n_threads);

/* AdaMax (Kingma & Ba, Algorithm 2): m = beta_1 m + (1 - beta_1) g;
 * u = max(beta_2 u, |g|);  param -= m / (u + epsilon) * step. */
void cnnx_adamax_update(long n, float *param, const float *grad, float *m, float *u,
                        float beta_1, float one_minus_beta_1, float beta_2, float step,
                        float epsilon, const cnnx_gradient_terms *terms, int n_threads);

/* Adadelta (Zeiler 2012): mean_grad = rho mean_grad + (1 - rho) g^2;
 * delta = sqrt(mean_delta + epsilon) / sqrt(mean_grad + epsilon) g;
 * mean_delta = rho mean_delta + (1 - rho) delta^2;  param -= delta * learning_rate. */
void cnnx_adadelta_update(long n, float *param, const float *grad, float *mean_grad,
                          float *mean_delta, float rho, float one_minus_rho,
                          float learning_rate, float epsilon,
                          const cnnx_gradient_terms *terms, int n_threads);

/* SGD: velocity NULL: param -= lr g.  Else v = momentum v - lr g, then param += v
 * (nesterov: param = (param - lr g) + momentum v). */
void cnnx_sgd_update(long n, float *param, const float *grad, float *velocity,
                     float learning_rate, float momentum, int nesterov,
                     const cnnx_gradient_terms *terms, int n_threads);

/* LARS (You et al. 2017), two passes: norms = (||param||, ||g||), block sums in double
 * added in block order (partials: cnnx_lars_norms_partials(n) doubles of scratch); then
 * v = momentum v + (g + weight_decay param) * step;  param -= v  (step = lr * local lr). */
long cnnx_lars_norms_partials(long n);
void cnnx_lars_norms(long n, const float *param, const float *grad,
                     const cnnx_gradient_terms *terms, double *norms, double *partials,
                     int n_threads);
void cnnx_lars_update(long n, float *param, const float *grad, float *velocity,
                      float momentum, float weight_decay, float step,
                      const cnnx_gradient_terms *terms, int n_threads);

/* ---- loss.c: softmax cross-entropy over logits (rows, classes), labels in [0, classes).
 * grad[r, k] = softmax(logits[r])[k] - (k == labels[r]); row_losses[r] =
 * log sum_k exp(logits[r, k]) - logits[r, labels[r]] (shifted by the row's max: no overflow);
 * returns the sum of row_losses, added in row order. */
double cnnx_softmax_cross_entropy(int rows, int classes, const float *logits,
                                  const int64_t *labels, float *grad, double *row_losses,
                                  int n_threads);

/* ReLU's mask for a BatchNormalization fused with the ReLU after it, recomputed from the
 * BatchNorm input b: keep[r, c] = (b[r, c] - shift[c]) * scale[c] > -offset[c] (the
 * forward's output was that product + offset; a NaN is not kept). */
typedef struct {
    const float *shift, *scale, *offset;
} cnnx_relu_mask;

/* Per-channel sums over a (rows, channels) array: sums[c] = sum_r (a[r, c] - a_shift[c]) and
 * product_sums[c] = sum_r (a[r, c] - a_shift[c]) * (b[r, c] - b_shift[c]) (b NULL: a).
 * With a mask (needs b), a[r, c] * keep[r, c] replaces a[r, c].
 * In double across fixed chunks of rows (float within a chunk when channels is 16 or 32).
 * partials holds cnnx_channel_sums_partials(rows, channels) doubles of scratch. */
long cnnx_channel_sums_partials(long rows, int channels);
void cnnx_channel_sums(long rows, int channels, const float *a, const float *b,
                       const float *a_shift, const float *b_shift, const cnnx_relu_mask *mask,
                       double *sums, double *product_sums, double *partials, int n_threads);
/* out[r, c] = (a[r, c] - a_shift[c]) * a_scale[c]
 *             (+ (b[r, c] - b_shift[c]) * b_scale[c] unless b is NULL) + shift[c].
 * Shifts near the data's mean keep the products small: no cancellation against shift.
 * relu (b NULL only): max(out, 0), a NaN kept, decided on the product as the mask is.
 * mask (needs b): a[r, c] * keep[r, c] replaces a[r, c] (BatchNorm + ReLU backward). */
void cnnx_channel_affine(long rows, int channels, const float *a, const float *a_shift,
                         const float *a_scale, const float *b, const float *b_shift,
                         const float *b_scale, const float *shift, const cnnx_relu_mask *mask,
                         int relu, float *out, int n_threads);

/* keep[i] = (32 random bits of element i) >= threshold, from Philox4x64-10 keyed by
 * (key0, key1): P(keep) = 1 - threshold / 2^32, a pure function of (key, i). */
void cnnx_dropout_mask(long n, uint64_t key0, uint64_t key1, uint32_t threshold,
                       unsigned char *keep, int n_threads);
/* y[i] = x[i] * (keep[i] ? scale : 0): dropout forward, and its backward on the gradient. */
void cnnx_dropout_apply(long n, const float *x, const unsigned char *keep, float scale,
                        float *y, int n_threads);

/* Seconds to run n_iterations of 12 independent 8-wide FMA chains on each of n_threads
 * threads (2 * 8 * 12 * n_iterations * n_threads flops); generic code if no AVX2+FMA. */
double cnnx_fma_peak_seconds(long n_iterations, int n_threads, float *sink);
/* Seconds to run n_iterations of 64 dependent integer adds on the calling thread (one
 * cycle each): 64 * n_iterations / seconds is the clock. *sink seeds the chain, gets its end. */
double cnnx_add_chain_seconds(long n_iterations, long *sink);

#endif
