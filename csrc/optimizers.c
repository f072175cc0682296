/* Optimizer updates: one fused, threaded pass per parameter tensor.
 *
 * Design: each update reads its gradient once, as the gradient the optimizer sees:
 *     g = grad / divisor + l1 sign(param) + two_l2 param       (cnnx_gradient_terms)
 * so a summed gradient (divisor = the batch's sample count) and an L1L2 penalty reach the
 * update without a mean or penalty array per step. grad / divisor is a division, not a
 * multiplication by 1/divisor: the bits are those of NumPy's grad / n (GradientSum's mean).
 * The arrays are cut into fixed blocks of BLOCK floats (whole cache lines, so no two threads
 * write one line); every element is computed from its own inputs only, in the NumPy
 * formulas' float32 order, so the results do not depend on the thread count. LARS also
 * needs two norms: block sums in double, added in block order (the same bits for any
 * thread count). Loops are plain C over restrict pointers, vectorised by gcc.
 */
#include <math.h>
#include <stddef.h>

#include "cnnx_kernels.h"

#define BLOCK 4096L

static long blocks_of(long n) { return (n + BLOCK - 1) / BLOCK; }
static long block_end(long block, long n)
{
    return block * BLOCK + BLOCK < n ? block * BLOCK + BLOCK : n;
}

/* The gradient an update reads (see the top). regularized = l1 or two_l2 is non-zero;
 * penalty = l1 sign(param) + two_l2 param, added to the mean as NumPy adds the arrays. */
static inline float gradient_at(const cnnx_gradient_terms *terms, int regularized, float grad,
                                float param)
{
    float g = grad / terms->divisor;
    if (regularized) {
        float sign = (float)(param > 0.0f) - (float)(param < 0.0f);
        g = g + (sign * terms->l1 + param * terms->two_l2);
    }
    return g;
}

static int is_regularized(const cnnx_gradient_terms *terms)
{
    return terms->l1 != 0.0f || terms->two_l2 != 0.0f;
}

void cnnx_adam_update(long n, float *restrict param, const float *restrict grad,
                      float *restrict m, float *restrict v, const cnnx_adam_scalars *s,
                      const cnnx_gradient_terms *terms, int n_threads)
{
    float beta_1 = s->beta_1, one_minus_beta_1 = s->one_minus_beta_1;
    float beta_2 = s->beta_2, one_minus_beta_2 = s->one_minus_beta_2;
    float m_scale = s->m_scale, grad_scale = s->grad_scale;
    float step = s->step, epsilon = s->epsilon;
    int nesterov = grad_scale != 0.0f, regularized = is_regularized(terms);
    (void)n_threads;
    #pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1)
    for (long b = 0; b < blocks_of(n); ++b)
        for (long i = b * BLOCK; i < block_end(b, n); ++i) {
            float p = param[i], g = gradient_at(terms, regularized, grad[i], p);
            float m_i = m[i] * beta_1 + g * one_minus_beta_1;
            float v_i = v[i] * beta_2 + (g * g) * one_minus_beta_2;
            m[i] = m_i;
            v[i] = v_i;
            float numerator = nesterov ? m_i * m_scale + g * grad_scale : m_i;
            param[i] = p - numerator / (sqrtf(v_i) + epsilon) * step;
        }
}

void cnnx_rmsprop_update(long n, float *restrict param, const float *restrict grad,
                         float *restrict square, float decay, float weight,
                         float learning_rate, float epsilon, const cnnx_gradient_terms *terms,
                         int n_threads)
{
    int regularized = is_regularized(terms);
    (void)n_threads;
    #pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1)
    for (long b = 0; b < blocks_of(n); ++b)
        for (long i = b * BLOCK; i < block_end(b, n); ++i) {
            float p = param[i], g = gradient_at(terms, regularized, grad[i], p);
            float s = square[i] * decay + (g * g) * weight;
            square[i] = s;
            param[i] = p - g / (sqrtf(s) + epsilon) * learning_rate;
        }
}

void cnnx_adamax_update(long n, float *restrict param, const float *restrict grad,
                        float *restrict m, float *restrict u, float beta_1,
                        float one_minus_beta_1, float beta_2, float step, float epsilon,
                        const cnnx_gradient_terms *terms, int n_threads)
{
    int regularized = is_regularized(terms);
    (void)n_threads;
    #pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1)
    for (long b = 0; b < blocks_of(n); ++b)
        for (long i = b * BLOCK; i < block_end(b, n); ++i) {
            float p = param[i], g = gradient_at(terms, regularized, grad[i], p);
            float m_i = m[i] * beta_1 + g * one_minus_beta_1;
            float decayed = u[i] * beta_2, size = fabsf(g);
            /* NumPy's maximum: a NaN on either side wins */
            float u_i = (decayed != decayed || decayed >= size) ? decayed : size;
            m[i] = m_i;
            u[i] = u_i;
            param[i] = p - m_i / (u_i + epsilon) * step;
        }
}

void cnnx_adadelta_update(long n, float *restrict param, const float *restrict grad,
                          float *restrict mean_grad, float *restrict mean_delta, float rho,
                          float one_minus_rho, float learning_rate, float epsilon,
                          const cnnx_gradient_terms *terms, int n_threads)
{
    int regularized = is_regularized(terms);
    (void)n_threads;
    #pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1)
    for (long b = 0; b < blocks_of(n); ++b)
        for (long i = b * BLOCK; i < block_end(b, n); ++i) {
            float p = param[i], g = gradient_at(terms, regularized, grad[i], p);
            float eg = mean_grad[i] * rho + (g * g) * one_minus_rho;
            float ed = mean_delta[i];
            float delta = sqrtf(ed + epsilon) / sqrtf(eg + epsilon) * g;
            mean_grad[i] = eg;
            mean_delta[i] = ed * rho + (delta * delta) * one_minus_rho;
            param[i] = p - delta * learning_rate;
        }
}

void cnnx_sgd_update(long n, float *restrict param, const float *restrict grad,
                     float *restrict velocity, float learning_rate, float momentum,
                     int nesterov, const cnnx_gradient_terms *terms, int n_threads)
{
    int regularized = is_regularized(terms);
    (void)n_threads;
    #pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1)
    for (long b = 0; b < blocks_of(n); ++b) {
        long end = block_end(b, n);
        if (velocity == NULL) {
            for (long i = b * BLOCK; i < end; ++i) {
                float p = param[i];
                param[i] = p - gradient_at(terms, regularized, grad[i], p) * learning_rate;
            }
        } else if (nesterov) {
            for (long i = b * BLOCK; i < end; ++i) {
                float p = param[i];
                float step = gradient_at(terms, regularized, grad[i], p) * learning_rate;
                float v = velocity[i] * momentum - step;
                velocity[i] = v;
                param[i] = (p - step) + v * momentum;
            }
        } else {
            for (long i = b * BLOCK; i < end; ++i) {
                float p = param[i];
                float v = velocity[i] * momentum
                          - gradient_at(terms, regularized, grad[i], p) * learning_rate;
                velocity[i] = v;
                param[i] = p + v;
            }
        }
    }
}

long cnnx_lars_norms_partials(long n) { return 2 * blocks_of(n); }

void cnnx_lars_norms(long n, const float *restrict param, const float *restrict grad,
                     const cnnx_gradient_terms *terms, double *norms,
                     double *restrict partials, int n_threads)
{
    int regularized = is_regularized(terms);
    long blocks = blocks_of(n);
    (void)n_threads;
    #pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1)
    for (long b = 0; b < blocks; ++b) {
        double weight_sum = 0.0, grad_sum = 0.0;
        for (long i = b * BLOCK; i < block_end(b, n); ++i) {
            float p = param[i], g = gradient_at(terms, regularized, grad[i], p);
            weight_sum += (double)p * p;
            grad_sum += (double)g * g;
        }
        partials[2 * b] = weight_sum;
        partials[2 * b + 1] = grad_sum;
    }
    double weight_sum = 0.0, grad_sum = 0.0;
    for (long b = 0; b < blocks; ++b) {            /* block order: any thread count */
        weight_sum += partials[2 * b];
        grad_sum += partials[2 * b + 1];
    }
    norms[0] = sqrt(weight_sum);
    norms[1] = sqrt(grad_sum);
}

void cnnx_lars_update(long n, float *restrict param, const float *restrict grad,
                      float *restrict velocity, float momentum, float weight_decay,
                      float step, const cnnx_gradient_terms *terms, int n_threads)
{
    int regularized = is_regularized(terms);
    (void)n_threads;
    #pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1)
    for (long b = 0; b < blocks_of(n); ++b)
        for (long i = b * BLOCK; i < block_end(b, n); ++i) {
            float p = param[i], g = gradient_at(terms, regularized, grad[i], p);
            float v = velocity[i] * momentum + (g + p * weight_decay) * step;
            velocity[i] = v;
            param[i] = p - v;
        }
}
