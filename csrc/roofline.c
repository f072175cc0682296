/* Measure the fp32 FMA peak, and the clock it runs at, to report kernels as a fraction.
 *
 * Design: each thread runs 12 independent 8-wide accumulator chains (FMA latency 4-5 cycles
 * x 2 FMA ports needs >= 10 in flight). Two things keep the chains independent in the
 * compiled loop: every chain starts from its own value (chains that start equal and are
 * updated alike are one chain to the optimiser, which then emits a single vfmadd per
 * iteration: ~1.5x the real peak was reported that way), and an empty asm statement that
 * claims to read and write all 12 registers after every iteration, so no algebra across
 * iterations is possible. The clock is measured by a chain of dependent integer adds
 * (one cycle each on every x86-64 and ARM core), so a peak can be checked against
 * flops/cycle x clock. Time is wall-clock around the parallel region.
 */
#include <time.h>

#include "cnnx_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#define FMA_STEP(a) a = _mm256_fmadd_ps(a, scale, shift)

static __attribute__((target("avx2,fma"))) float fma_chains_avx2(long n_iterations)
{
    __m256 a0 = _mm256_set1_ps(1.00f), a1 = _mm256_set1_ps(1.01f), a2 = _mm256_set1_ps(1.02f);
    __m256 a3 = _mm256_set1_ps(1.03f), a4 = _mm256_set1_ps(1.04f), a5 = _mm256_set1_ps(1.05f);
    __m256 a6 = _mm256_set1_ps(1.06f), a7 = _mm256_set1_ps(1.07f), a8 = _mm256_set1_ps(1.08f);
    __m256 a9 = _mm256_set1_ps(1.09f), a10 = _mm256_set1_ps(1.10f);
    __m256 a11 = _mm256_set1_ps(1.11f);
    const __m256 scale = _mm256_set1_ps(0.999999f), shift = _mm256_set1_ps(1e-7f);
    for (long i = 0; i < n_iterations; ++i) {
        FMA_STEP(a0); FMA_STEP(a1); FMA_STEP(a2); FMA_STEP(a3);
        FMA_STEP(a4); FMA_STEP(a5); FMA_STEP(a6); FMA_STEP(a7);
        FMA_STEP(a8); FMA_STEP(a9); FMA_STEP(a10); FMA_STEP(a11);
        /* register barrier: the compiler must assume each chain changed here */
        __asm__ volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3), "+x"(a4), "+x"(a5),
                              "+x"(a6), "+x"(a7), "+x"(a8), "+x"(a9), "+x"(a10), "+x"(a11));
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
        a[t] = 1.0f + 0.01f * (float)t;
    for (long i = 0; i < n_iterations; ++i) {
        for (int t = 0; t < 96; ++t)
            a[t] = a[t] * 0.999999f + 1e-7f;
        __asm__ volatile("" : : "r"(a) : "memory");
    }
    float sum = 0.0f;
    for (int t = 0; t < 96; ++t)
        sum += a[t];
    return sum;
}

static double seconds_since(const struct timespec *start)
{
    struct timespec stop;
    clock_gettime(CLOCK_MONOTONIC, &stop);
    return (double)(stop.tv_sec - start->tv_sec) + 1e-9 * (double)(stop.tv_nsec - start->tv_nsec);
}

double cnnx_fma_peak_seconds(long n_iterations, int n_threads, float *sink)
{
    struct timespec start;
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
    *sink = total;
    return seconds_since(&start);
}

/* one dependent add; the empty asm stops the compiler from summing the constants */
#define DEPENDENT_ADD(v) do { v += 1; __asm__ volatile("" : "+r"(v)); } while (0)
#define DEPENDENT_ADD_8(v) do { DEPENDENT_ADD(v); DEPENDENT_ADD(v); DEPENDENT_ADD(v); \
    DEPENDENT_ADD(v); DEPENDENT_ADD(v); DEPENDENT_ADD(v); DEPENDENT_ADD(v); \
    DEPENDENT_ADD(v); } while (0)

double cnnx_add_chain_seconds(long n_iterations, long *sink)
{
    struct timespec start;
    long value = *sink;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (long i = 0; i < n_iterations; ++i) {
        /* 64 adds in one chain: the loop counter runs beside it on another port */
        DEPENDENT_ADD_8(value); DEPENDENT_ADD_8(value); DEPENDENT_ADD_8(value);
        DEPENDENT_ADD_8(value); DEPENDENT_ADD_8(value); DEPENDENT_ADD_8(value);
        DEPENDENT_ADD_8(value); DEPENDENT_ADD_8(value);
    }
    double seconds = seconds_since(&start);
    *sink = value;
    return seconds;
}
