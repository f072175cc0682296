/* Measure the fp32 FMA peak: enough independent chains to hide the FMA latency.
 *
 * Design: each thread runs 12 independent 8-wide accumulator chains (latency 4-5 cycles x
 * 2 FMA ports needs >= 10 in flight). The result is stored to a sink so the loop survives
 * the optimiser. Time is wall-clock around the parallel region.
 */
#include <time.h>

#include "cnnx_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

static __attribute__((target("avx2,fma"))) float fma_chains_avx2(long n_iterations)
{
    __m256 a0 = _mm256_set1_ps(1.0f), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
    __m256 a6 = a0, a7 = a0, a8 = a0, a9 = a0, a10 = a0, a11 = a0;
    const __m256 scale = _mm256_set1_ps(0.999999f), shift = _mm256_set1_ps(1e-7f);
    for (long i = 0; i < n_iterations; ++i) {
        a0 = _mm256_fmadd_ps(a0, scale, shift);
        a1 = _mm256_fmadd_ps(a1, scale, shift);
        a2 = _mm256_fmadd_ps(a2, scale, shift);
        a3 = _mm256_fmadd_ps(a3, scale, shift);
        a4 = _mm256_fmadd_ps(a4, scale, shift);
        a5 = _mm256_fmadd_ps(a5, scale, shift);
        a6 = _mm256_fmadd_ps(a6, scale, shift);
        a7 = _mm256_fmadd_ps(a7, scale, shift);
        a8 = _mm256_fmadd_ps(a8, scale, shift);
        a9 = _mm256_fmadd_ps(a9, scale, shift);
        a10 = _mm256_fmadd_ps(a10, scale, shift);
        a11 = _mm256_fmadd_ps(a11, scale, shift);
    }
    __m256 sum = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                               _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
    sum = _mm256_add_ps(sum, _mm256_add_ps(_mm256_add_ps(a8, a9), _mm256_add_ps(a10, a11)));
    float lanes[8];
    _mm256_storeu_ps(lanes, sum);
    return lanes[0];
}
#endif

static float fma_chains_generic(long n_iterations)
{
    float a[96];
    for (int t = 0; t < 96; ++t)
        a[t] = 1.0f;
    for (long i = 0; i < n_iterations; ++i)
        for (int t = 0; t < 96; ++t)
            a[t] = a[t] * 0.999999f + 1e-7f;
    float sum = 0.0f;
    for (int t = 0; t < 96; ++t)
        sum += a[t];
    return sum;
}

double cnnx_fma_peak_seconds(long n_iterations, int n_threads, float *sink)
{
    struct timespec start, stop;
    int use_avx2 = cnnx_get_isa() == CNNX_ISA_AVX2;
    float total = 0.0f;
    (void)n_threads;
    clock_gettime(CLOCK_MONOTONIC, &start);
    #pragma omp parallel num_threads(n_threads) reduction(+:total)
    {
#if defined(__x86_64__) || defined(__i386__)
        if (use_avx2)
            total += fma_chains_avx2(n_iterations);
        else
#endif
            total += fma_chains_generic(n_iterations);
    }
    clock_gettime(CLOCK_MONOTONIC, &stop);
    *sink = total;
    return (double)(stop.tv_sec - start.tv_sec) + 1e-9 * (double)(stop.tv_nsec - start.tv_nsec);
}
