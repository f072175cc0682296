/* Dropout masks from a counter-based generator: Philox4x64-10 (Salmon et al., SC'11).
 *
 * Design: element i of a mask takes 32 bits of the Philox block i / 8 (counter i / 8 + 1,
 * as numpy.random.Philox numbers its outputs: word (i / 2) % 4, low half for even i), so
 * the mask is a pure function of (key, i): any thread count, any partition, the same mask,
 * and NumPy's own Philox is the reference the tests check it against.
 */
#include <stdint.h>

#include "cnnx_kernels.h"

static void philox4x64_10(uint64_t counter, uint64_t key0, uint64_t key1, uint64_t out[4])
{
    const uint64_t m0 = 0xD2E7470EE14C6C93ULL, m1 = 0xCA5A826395121157ULL;
    const uint64_t w0 = 0x9E3779B97F4A7C15ULL, w1 = 0xBB67AE8584CAA73BULL;
    uint64_t c0 = counter, c1 = 0, c2 = 0, c3 = 0;
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            key0 += w0;
            key1 += w1;
        }
        unsigned __int128 p0 = (unsigned __int128)m0 * c0, p1 = (unsigned __int128)m1 * c2;
        uint64_t hi0 = (uint64_t)(p0 >> 64), lo0 = (uint64_t)p0;
        uint64_t hi1 = (uint64_t)(p1 >> 64), lo1 = (uint64_t)p1;
        c0 = hi1 ^ c1 ^ key0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ key1;
        c3 = lo0;
    }
    out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

#define MASK_BLOCK 4096L      /* elements per work item: a multiple of 8 */

void cnnx_dropout_mask(long n, uint64_t key0, uint64_t key1, uint32_t threshold,
                       unsigned char *keep, int n_threads)
{
    long items = (n + MASK_BLOCK - 1) / MASK_BLOCK;
    (void)n_threads;
    #pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1)
    for (long item = 0; item < items; ++item) {
        long end = (item + 1) * MASK_BLOCK < n ? (item + 1) * MASK_BLOCK : n;
        for (long start = item * MASK_BLOCK; start < end; start += 8) {
            uint64_t words[4];
            philox4x64_10((uint64_t)(start / 8) + 1, key0, key1, words);
            for (long i = start; i < start + 8 && i < end; ++i) {
                uint64_t word = words[(i / 2) % 4];
                uint32_t bits = (uint32_t)(i % 2 == 0 ? word : word >> 32);
                keep[i] = bits >= threshold;
            }
        }
    }
}

void cnnx_dropout_apply(long n, const float *restrict x, const unsigned char *restrict keep,
                        float scale, float *restrict y, int n_threads)
{
    long items = (n + MASK_BLOCK - 1) / MASK_BLOCK;
    (void)n_threads;
    #pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1)
    for (long item = 0; item < items; ++item) {
        long end = (item + 1) * MASK_BLOCK < n ? (item + 1) * MASK_BLOCK : n;
        for (long i = item * MASK_BLOCK; i < end; ++i)
            y[i] = x[i] * (keep[i] ? scale : 0.0f);        /* x * mask, as NumPy: NaN kept */
    }
}
