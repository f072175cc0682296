/* Element-wise kernels: memory-bound passes over flat float32 arrays.
 *
 * Design: each array is cut into n_threads contiguous ranges (OpenMP static schedule) and
 * every element is computed by one thread from its own inputs only, so the results do not
 * depend on the thread count. Loops are plain C over restrict pointers, vectorised by gcc.
 */
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
