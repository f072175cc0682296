/* Build-time facts the Python side reports (OpenMP present or not). */
#include "cnnx_kernels.h"

int cnnx_openmp_enabled(void) { return CNNX_OPENMP; }
