/* Per-channel reductions and affine maps over (rows, channels) arrays: BatchNormalization.
 *
 * Design: rows are cut into fixed chunks of CHUNK_ROWS (independent of the thread count);
 * each chunk's sums go to its own row of a partials buffer in double, and the partials are
 * added in chunk order afterwards: the same bits for any n_threads. One read pass gives
 * both sums a channel needs (sum x and sum x^2 forward; sum g and sum g*x backward).
 */
#include <stddef.h>

#include "cnnx_kernels.h"

#define CHUNK_ROWS 512L

long cnnx_channel_sums_partials(long rows, int channels)
{
    return 2 * ((rows + CHUNK_ROWS - 1) / CHUNK_ROWS) * (long)channels;
}

void cnnx_channel_sums(long rows, int channels, const float *restrict a,
                       const float *restrict b, double *restrict sums,
                       double *restrict product_sums, double *restrict partials,
                       int n_threads)
{
    long chunks = (rows + CHUNK_ROWS - 1) / CHUNK_ROWS;
    const float *restrict second = b != NULL ? b : a;
    (void)n_threads;
    #pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1)
    for (long chunk = 0; chunk < chunks; ++chunk) {
        double *restrict sum = partials + 2 * chunk * channels;
        double *restrict product = sum + channels;
        for (int c = 0; c < channels; ++c)
            sum[c] = product[c] = 0.0;
        long end = (chunk + 1) * CHUNK_ROWS < rows ? (chunk + 1) * CHUNK_ROWS : rows;
        for (long row = chunk * CHUNK_ROWS; row < end; ++row) {
            const float *restrict a_row = a + row * channels;
            const float *restrict b_row = second + row * channels;
            for (int c = 0; c < channels; ++c) {
                sum[c] += (double)a_row[c];
                product[c] += (double)a_row[c] * (double)b_row[c];
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

void cnnx_channel_affine(long rows, int channels, const float *restrict a,
                         const float *restrict a_scale, const float *restrict b,
                         const float *restrict b_scale, const float *restrict shift,
                         float *restrict out, int n_threads)
{
    long chunks = (rows + CHUNK_ROWS - 1) / CHUNK_ROWS;
    (void)n_threads;
    #pragma omp parallel for schedule(static) num_threads(n_threads) if (n_threads > 1)
    for (long chunk = 0; chunk < chunks; ++chunk) {
        long end = (chunk + 1) * CHUNK_ROWS < rows ? (chunk + 1) * CHUNK_ROWS : rows;
        for (long row = chunk * CHUNK_ROWS; row < end; ++row) {
            const float *restrict a_row = a + row * channels;
            float *restrict out_row = out + row * channels;
            if (b == NULL) {
                for (int c = 0; c < channels; ++c)
                    out_row[c] = a_row[c] * a_scale[c] + shift[c];
            } else {
                const float *restrict b_row = b + row * channels;
                for (int c = 0; c < channels; ++c)
                    out_row[c] = (a_row[c] * a_scale[c] + b_row[c] * b_scale[c]) + shift[c];
            }
        }
    }
}
