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
