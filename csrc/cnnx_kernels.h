/* cnnx C kernels: raw loops on contiguous float32 buffers.
 * Contract: callers (cnnx/_kernels.pyx) have checked shapes, dtypes, contiguity and
 * non-emptiness. Kernels never allocate Python objects, never fail, never touch the GIL. */
#ifndef CNNX_KERNELS_H
#define CNNX_KERNELS_H

/* 1 when built with OpenMP, 0 otherwise. */
int cnnx_openmp_enabled(void);

#endif
