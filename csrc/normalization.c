/* Per-channel reductions and affine maps over (rows, channels) arrays: BatchNormalization.
 *
 * Design: rows are cut into fixed chunks of CHUNK_ROWS (independent of the thread count);
 * each chunk's sums go to its own row of a partials buffer in double, and the partials are
 * added in chunk order afterwards: the same bits for any n_threads. One read pass gives
 * both sums a channel needs (sum x and sum (x - k)^2 forward; sum g and sum g (x - k)
 * backward, k a per-channel shift near the mean: no cancellation in E[x^2] - E[x]^2).
 * BatchNorm followed by ReLU runs fused: the affine pass writes the activated output, and
 * the backward passes apply ReLU's mask themselves, recomputed from x (which they read
 * anyway) rather than read from the output: keep = (x - mean) * scale > -beta, the very
 * product the forward compared (a product with two uses is never contracted into an FMA),
 * so the mask is the forward's bit for bit and no separate ReLU pass remains.
 */
#include <stddef.h>
#include <stdint.h>

#include "cnnx_kernels.h"

/* 1.0f where a ReLU after out = (b - shift) * scale + offset passed its input, else 0.0f:
 * (b - shift) * scale > -offset is exactly out > 0 when out is rounded once from that
 * product (and false for a NaN, like ReLU's backward). */
static inline __attribute__((always_inline)) float relu_keep(float b, float shift, float scale,
                                                             float offset)
{
    int keep = (b - shift) * scale > -offset;     /* an int, then a float: no branch */
    return (float)keep;
}

#define CHUNK_ROWS 512L

long cnnx_channel_sums_partials(long rows, int channels)
{
    return 2 * ((rows + CHUNK_ROWS - 1) / CHUNK_ROWS) * (long)channels;
}

/* A chunk's sums for a channel count known at compile time: the per-channel sums live in
 * registers as float over the chunk's rows (at most CHUNK_ROWS, so float's rounding stays
 * small), then go to double for the sum across chunks. */
static inline __attribute__((always_inline)) void chunk_sums_fixed(
    long row0, long row1, const int channels, const float *restrict a,
    const float *restrict b, const float *restrict a_shift, const float *restrict b_shift,
    const cnnx_relu_mask *mask, double *restrict sum, double *restrict product)
{
    float s[64], q[64];
    for (int c = 0; c < channels; ++c)
        s[c] = q[c] = 0.0f;
    if (mask != NULL) {
        const float *restrict m_shift = mask->shift, *restrict m_scale = mask->scale;
        const float *restrict m_offset = mask->offset;
        for (long row = row0; row < row1; ++row)
            for (int c = 0; c < channels; ++c) {
                float x = b[row * channels + c];
                /* a * keep: ReLU's backward, the same multiply as cnnx_relu_backward */
                float g = a[row * channels + c]
                          * relu_keep(x, m_shift[c], m_scale[c], m_offset[c]);
                s[c] += g - a_shift[c];
                q[c] += (g - a_shift[c]) * (x - b_shift[c]);
            }
    } else {
        for (long row = row0; row < row1; ++row)
            for (int c = 0; c < channels; ++c) {
                s[c] += a[row * channels + c] - a_shift[c];
                q[c] += (a[row * channels + c] - a_shift[c])
                        * (b[row * channels + c] - b_shift[c]);
            }
    }
    for (int c = 0; c < channels; ++c) {
        sum[c] = s[c];
        product[c] = q[c];
    }
}

typedef void (*chunk_sums_fn)(long, long, const float *, const float *, const float *,
                              const float *, const cnnx_relu_mask *, double *, double *);

#define CHUNK_SUMS(name, channels, attributes)                                            \
    static attributes void name(long row0, long row1, const float *a, const float *b,    \
                                const float *a_shift, const float *b_shift,               \
                                const cnnx_relu_mask *mask, double *sum, double *product) \
    {                                                                                     \
        chunk_sums_fixed(row0, row1, channels, a, b, a_shift, b_shift, mask, sum,        \
                         product);                                                        \
    }
CHUNK_SUMS(chunk_sums_16_generic, 16, )
CHUNK_SUMS(chunk_sums_32_generic, 32, )
#if defined(__x86_64__) || defined(__i386__)
CHUNK_SUMS(chunk_sums_16_avx2, 16, __attribute__((target("avx2,fma"))))
CHUNK_SUMS(chunk_sums_32_avx2, 32, __attribute__((target("avx2,fma"))))
#endif

/* The register-resident chunk sums for this channel count and ISA, or NULL. */
static chunk_sums_fn chunk_sums_for(int channels)
{
#if defined(__x86_64__) || defined(__i386__)
    if (cnnx_get_isa() == CNNX_ISA_AVX2)
        return channels == 16 ? chunk_sums_16_avx2 : channels == 32 ? chunk_sums_32_avx2 : NULL;
#endif
    return channels == 16 ? chunk_sums_16_generic
                          : channels == 32 ? chunk_sums_32_generic : NULL;
}

void cnnx_channel_sums(long rows, int channels, const float *restrict a,
                       const float *restrict b, const float *restrict a_shift,
                       const float *restrict b_shift, const cnnx_relu_mask *mask,
                       double *restrict sums, double *restrict product_sums,
                       double *restrict partials, int n_threads)
{
    long chunks = (rows + CHUNK_ROWS - 1) / CHUNK_ROWS;
    const float *restrict second = b != NULL ? b : a;
    chunk_sums_fn chunk_sums = chunk_sums_for(channels);
    (void)n_threads;
    #pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1)
    for (long chunk = 0; chunk < chunks; ++chunk) {
        double *restrict sum = partials + 2 * chunk * channels;
        double *restrict product = sum + channels;
        long end = (chunk + 1) * CHUNK_ROWS < rows ? (chunk + 1) * CHUNK_ROWS : rows;
        if (chunk_sums != NULL) {
            chunk_sums(chunk * CHUNK_ROWS, end, a, second, a_shift, b_shift, mask, sum,
                       product);
            continue;
        }
        for (int c = 0; c < channels; ++c)
            sum[c] = product[c] = 0.0;
        for (long row = chunk * CHUNK_ROWS; row < end; ++row) {
            const float *restrict a_row = a + row * channels;
            const float *restrict b_row = second + row * channels;
            for (int c = 0; c < channels; ++c) {
                float g = a_row[c];
                if (mask != NULL)
                    g *= relu_keep(b_row[c], mask->shift[c], mask->scale[c], mask->offset[c]);
                sum[c] += (double)(g - a_shift[c]);
                product[c] += (double)(g - a_shift[c]) * (double)(b_row[c] - b_shift[c]);
            }
        }
    }
    for (int c = 0; c < channels; ++c)
        sums[c] = product_sums[c] = 0.0;
    for (long chunk = 0; chunk < chunks; ++chunk)           /* chunk order: deterministic */
        for (int c = 0; c < channels; ++c) {
            sums[c] += partials[2 * chunk * channels + c];
            product_sums[c] += partials[(2 * chunk + 1) * channels + c];
        }
}

/* The affine pass for this row range; relu and mask are constants in each instance. */
static inline __attribute__((always_inline)) void affine_rows(
    long row0, long row1, int channels, const float *restrict a,
    const float *restrict a_shift, const float *restrict a_scale, const float *restrict b,
    const float *restrict b_shift, const float *restrict b_scale,
    const float *restrict shift, const cnnx_relu_mask *mask, const int relu,
    float *restrict out)
{
    for (long row = row0; row < row1; ++row) {
        const float *restrict a_row = a + row * channels;
        float *restrict out_row = out + row * channels;
        if (b == NULL && relu) {
            for (int c = 0; c < channels; ++c) {
                /* out > 0 decided on the product, as the backward's mask decides it */
                float product = (a_row[c] - a_shift[c]) * a_scale[c];
                float value = product + shift[c];
                out_row[c] = (product > -shift[c] || value != value) ? value : 0.0f;
            }
        } else if (b == NULL) {
            for (int c = 0; c < channels; ++c)
                out_row[c] = (a_row[c] - a_shift[c]) * a_scale[c] + shift[c];
        } else if (mask != NULL) {
            const float *restrict b_row = b + row * channels;
            const float *restrict m_shift = mask->shift, *restrict m_scale = mask->scale;
            const float *restrict m_offset = mask->offset;
            for (int c = 0; c < channels; ++c) {
                float g = a_row[c] * relu_keep(b_row[c], m_shift[c], m_scale[c], m_offset[c]);
                out_row[c] = ((g - a_shift[c]) * a_scale[c]
                              + (b_row[c] - b_shift[c]) * b_scale[c]) + shift[c];
            }
        } else {
            const float *restrict b_row = b + row * channels;
            for (int c = 0; c < channels; ++c)
                out_row[c] = ((a_row[c] - a_shift[c]) * a_scale[c]
                              + (b_row[c] - b_shift[c]) * b_scale[c]) + shift[c];
        }
    }
}

typedef void (*affine_rows_fn)(long, long, int, const float *, const float *, const float *,
                               const float *, const float *, const float *, const float *,
                               const cnnx_relu_mask *, int, float *);

static void affine_rows_generic(long row0, long row1, int channels, const float *a,
                                const float *a_shift, const float *a_scale, const float *b,
                                const float *b_shift, const float *b_scale, const float *shift,
                                const cnnx_relu_mask *mask, int relu, float *out)
{
    affine_rows(row0, row1, channels, a, a_shift, a_scale, b, b_shift, b_scale, shift, mask,
                relu, out);
}

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

/* 8 lanes instead of 4, and no FMA on purpose: without one gcc cannot contract the affine
 * map, so both ISAs round every product and sum alike (the same bits) and the fused ReLU
 * stays the unfused one bit for bit. */
static __attribute__((target("avx2"))) void affine_rows_avx2(
    long row0, long row1, int channels, const float *a, const float *a_shift,
    const float *a_scale, const float *b, const float *b_shift, const float *b_scale,
    const float *shift, const cnnx_relu_mask *mask, int relu, float *out)
{
    affine_rows(row0, row1, channels, a, a_shift, a_scale, b, b_shift, b_scale, shift, mask,
                relu, out);
}

/* target[0:n] = scratch[0:n] with non-temporal stores (target 16-byte aligned, n % 4 == 0) */
static __attribute__((target("avx2,fma"))) void stream_floats(float *target,
                                                              const float *scratch, long n)
{
    for (long i = 0; i < n; i += 4)
        _mm_stream_ps(target + i, _mm_loadu_ps(scratch + i));
}
#endif

#define STREAM_MIN_BYTES (16L << 20)   /* outputs this large leave every cache anyway */
#define STREAM_ROWS 16                 /* rows computed into L1 scratch, then streamed */
#define STREAM_SCRATCH_FLOATS 4096

void cnnx_channel_affine(long rows, int channels, const float *restrict a,
                         const float *restrict a_shift, const float *restrict a_scale,
                         const float *restrict b, const float *restrict b_shift,
                         const float *restrict b_scale, const float *restrict shift,
                         const cnnx_relu_mask *mask, int relu, float *restrict out,
                         int n_threads)
{
    long chunks = (rows + CHUNK_ROWS - 1) / CHUNK_ROWS;
    /* A large output goes to memory with non-temporal stores, which skip the read for
     * ownership a normal store pays (a third of the traffic of a one-input pass): each
     * STREAM_ROWS rows are computed into L1 scratch by the same code, then streamed. */
    int stream = 0;
    affine_rows_fn rows_pass = affine_rows_generic;
#if defined(__x86_64__) || defined(__i386__)
    if (cnnx_get_isa() == CNNX_ISA_AVX2) {
        rows_pass = affine_rows_avx2;
        stream = rows * channels * (long)sizeof(float) >= STREAM_MIN_BYTES
                 && channels % 4 == 0 && (long)channels * STREAM_ROWS <= STREAM_SCRATCH_FLOATS
                 && (uintptr_t)out % 16 == 0;
    }
#endif
    (void)n_threads;
    #pragma omp parallel num_threads(n_threads) if (n_threads > 1)
    {
        #pragma omp for schedule(static)
        for (long chunk = 0; chunk < chunks; ++chunk) {
            long end = (chunk + 1) * CHUNK_ROWS < rows ? (chunk + 1) * CHUNK_ROWS : rows;
            if (!stream) {
                rows_pass(chunk * CHUNK_ROWS, end, channels, a, a_shift, a_scale, b,
                            b_shift, b_scale, shift, mask, relu, out);
                continue;
            }
#if defined(__x86_64__) || defined(__i386__)
            float scratch[STREAM_SCRATCH_FLOATS];
            for (long row = chunk * CHUNK_ROWS; row < end; row += STREAM_ROWS) {
                long count = end - row < STREAM_ROWS ? end - row : STREAM_ROWS;
                /* pointers moved to row, so the scratch holds rows [row, row + count) */
                rows_pass(0, count, channels, a + row * channels, a_shift, a_scale,
                            b == NULL ? NULL : b + row * channels, b_shift, b_scale, shift,
                            mask, relu, scratch);
                stream_floats(out + row * channels, scratch, count * channels);
            }
#endif
        }
#if defined(__x86_64__) || defined(__i386__)
        if (stream)
            _mm_sfence();           /* each thread's non-temporal stores, before the barrier */
#endif
    }
}
