/* Element-wise kernels: memory-bound passes over flat float32 arrays.
 *
 * Design: each array is cut into n_threads contiguous ranges (OpenMP static schedule) and
 * every element is computed by one thread from its own inputs only, so the results do not
 * depend on the thread count. Loops are plain C over restrict pointers, vectorised by gcc.
 */
#include <math.h>
#include <stddef.h>
#include <string.h>

#include "cnnx_kernels.h"

/* ranges of whole cache lines, so no two threads write one line */
#define BLOCK 4096L

void cnnx_copy(long n, const float *source, float *target, int n_threads)
{
    long blocks = (n + BLOCK - 1) / BLOCK;
    (void)n_threads;
    #pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1)
    for (long b = 0; b < blocks; ++b) {
        long start = b * BLOCK, count = n - start < BLOCK ? n - start : BLOCK;
        memcpy(target + start, source + start, sizeof(float) * count);
    }
}

static long blocks_of(long n) { return (n + BLOCK - 1) / BLOCK; }
static long block_end(long block, long n) { return block * BLOCK + BLOCK < n ? block * BLOCK + BLOCK : n; }

void cnnx_relu_forward(long n, const float *restrict x, float *restrict y, int n_threads)
{
    (void)n_threads;
    #pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1)
    for (long b = 0; b < blocks_of(n); ++b)
        for (long i = b * BLOCK; i < block_end(b, n); ++i) {
            float v = x[i];
            y[i] = (v > 0.0f || v != v) ? v : 0.0f;       /* NumPy's maximum(x, 0): NaN kept */
        }
}

void cnnx_relu_backward(long n, const float *restrict y, float *restrict grad, int n_threads)
{
    (void)n_threads;
    #pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1)
    for (long b = 0; b < blocks_of(n); ++b)
        for (long i = b * BLOCK; i < block_end(b, n); ++i) {
            float keep = y[i] > 0.0f ? 1.0f : 0.0f;
            grad[i] = grad[i] * keep;              /* NumPy's grad * (y > 0): a NaN stays */
        }
}

void cnnx_adam_update(long n, float *restrict param, const float *restrict grad,
                      float *restrict m, float *restrict v, const cnnx_adam_scalars *s,
                      int n_threads)
{
    float beta_1 = s->beta_1, one_minus_beta_1 = s->one_minus_beta_1;
    float beta_2 = s->beta_2, one_minus_beta_2 = s->one_minus_beta_2;
    float m_scale = s->m_scale, grad_scale = s->grad_scale;
    float step = s->step, epsilon = s->epsilon;
    int nesterov = grad_scale != 0.0f;
    (void)n_threads;
    #pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1)
    for (long b = 0; b < blocks_of(n); ++b)
        for (long i = b * BLOCK; i < block_end(b, n); ++i) {
            float g = grad[i];
            float m_i = m[i] * beta_1 + g * one_minus_beta_1;
            float v_i = v[i] * beta_2 + (g * g) * one_minus_beta_2;
            m[i] = m_i;
            v[i] = v_i;
            float numerator = nesterov ? m_i * m_scale + g * grad_scale : m_i;
            param[i] = param[i] - numerator / (sqrtf(v_i) + epsilon) * step;
        }
}

void cnnx_rmsprop_update(long n, float *restrict param, const float *restrict grad,
                         float *restrict square, float decay, float weight,
                         float learning_rate, float epsilon, int n_threads)
{
    (void)n_threads;
    #pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1)
    for (long b = 0; b < blocks_of(n); ++b)
        for (long i = b * BLOCK; i < block_end(b, n); ++i) {
            float g = grad[i], s = square[i] * decay + (g * g) * weight;
            square[i] = s;
            param[i] = param[i] - g / (sqrtf(s) + epsilon) * learning_rate;
        }
}

void cnnx_adamax_update(long n, float *restrict param, const float *restrict grad,
                        float *restrict m, float *restrict u, float beta_1,
                        float one_minus_beta_1, float beta_2, float step, float epsilon,
                        int n_threads)
{
    (void)n_threads;
    #pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1)
    for (long b = 0; b < blocks_of(n); ++b)
        for (long i = b * BLOCK; i < block_end(b, n); ++i) {
            float g = grad[i], m_i = m[i] * beta_1 + g * one_minus_beta_1;
            float decayed = u[i] * beta_2, size = fabsf(g);
            /* NumPy's maximum: a NaN on either side wins */
            float u_i = (decayed != decayed || decayed >= size) ? decayed : size;
            m[i] = m_i;
            u[i] = u_i;
            param[i] = param[i] - m_i / (u_i + epsilon) * step;
        }
}

void cnnx_sgd_update(long n, float *restrict param, const float *restrict grad,
                     float *restrict velocity, float learning_rate, float momentum,
                     int nesterov, int n_threads)
{
    (void)n_threads;
    #pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1)
    for (long b = 0; b < blocks_of(n); ++b) {
        long end = block_end(b, n);
        if (velocity == NULL) {
            for (long i = b * BLOCK; i < end; ++i)
                param[i] = param[i] - grad[i] * learning_rate;
        } else if (nesterov) {
            for (long i = b * BLOCK; i < end; ++i) {
                float step = grad[i] * learning_rate, v = velocity[i] * momentum - step;
                velocity[i] = v;
                param[i] = (param[i] - step) + v * momentum;
            }
        } else {
            for (long i = b * BLOCK; i < end; ++i) {
                float v = velocity[i] * momentum - grad[i] * learning_rate;
                velocity[i] = v;
                param[i] = param[i] + v;
            }
        }
    }
}
