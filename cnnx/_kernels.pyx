# cython: language_level=3
"""Cython driver for the C kernels: checks what memoryviews cannot, releases the GIL.

Every kernel takes float32 C-contiguous arrays and writes into the output arrays it is given;
it refuses anything else with a message naming the kernel, the argument, what it expected
and what it got. Workspace is allocated here (NumPy), so the C side never allocates.
"""
import threading

import numpy as np
cimport numpy as cnp
from libc.stdint cimport int64_t, uint32_t, uint64_t

cnp.import_array()

cdef extern from "cnnx_kernels.h" nogil:
    int cnnx_openmp_enabled()
    int cnnx_set_isa(int isa)
    int cnnx_get_isa()
    int cnnx_cpu_has_avx2_fma()
    long cnnx_gemm_workspace_floats(int n_threads)
    void cnnx_sgemm(int m, int n, int k, const float *a, int transpose_a, const float *b,
                    int transpose_b, const float *bias, int relu, float *c, int n_threads,
                    float *workspace)
    ctypedef struct cnnx_conv_geometry:
        int batch, in_h, in_w, channels
        int out_h, out_w
        int kernel_h, kernel_w
        int stride_h, stride_w
        int dilation_h, dilation_w
        int pad_top, pad_left
    long cnnx_conv2d_forward_workspace_floats(const cnnx_conv_geometry *geometry, int filters,
                                              int n_threads)
    void cnnx_conv2d_forward(const cnnx_conv_geometry *geometry, const float *x,
                             const float *kernel, int filters, const float *bias, int relu,
                             float *y, int n_threads, float *workspace)
    long cnnx_conv2d_grad_kernel_workspace_floats(const cnnx_conv_geometry *geometry,
                                                  int filters, int n_threads)
    void cnnx_conv2d_grad_kernel(const cnnx_conv_geometry *geometry, const float *x,
                                 const float *grad_output, int filters, float *grad_kernel,
                                 float *grad_bias, int n_threads, float *workspace)
    void cnnx_column_sums(int m, int n, const float *a, float *sums, int n_threads)
    void cnnx_conv2d_flip_kernel(int kernel_h, int kernel_w, int channels, int filters,
                                 const float *kernel, float *flipped)
    double cnnx_fma_peak_seconds(long n_iterations, int n_threads, float *sink)
    double cnnx_add_chain_seconds(long n_iterations, long *sink)
    void cnnx_copy(long n, const float *source, float *target, int n_threads)
    void cnnx_relu_forward(long n, const float *x, float *y, int n_threads)
    void cnnx_relu_backward(long n, const float *y, float *grad, int n_threads)
    void cnnx_dropout_mask(long n, uint64_t key0, uint64_t key1, uint32_t threshold,
                           unsigned char *keep, int n_threads)
    void cnnx_dropout_apply(long n, const float *x, const unsigned char *keep, float scale,
                            float *y, int n_threads)
    # optimizers.c
    ctypedef struct cnnx_gradient_terms:
        float divisor, l1, two_l2
    ctypedef struct cnnx_adam_scalars:
        float beta_1, one_minus_beta_1, beta_2, one_minus_beta_2, step, epsilon
        float m_scale, grad_scale
    void cnnx_adam_update(long n, float *param, const float *grad, float *m, float *v,
                          const cnnx_adam_scalars *scalars, const cnnx_gradient_terms *terms,
                          int n_threads)
    void cnnx_rmsprop_update(long n, float *param, const float *grad, float *square,
                             float decay, float weight, float learning_rate, float epsilon,
                             const cnnx_gradient_terms *terms, int n_threads)
    void cnnx_adamax_update(long n, float *param, const float *grad, float *m, float *u,
                            float beta_1, float one_minus_beta_1, float beta_2, float step,
                            float epsilon, const cnnx_gradient_terms *terms, int n_threads)
    void cnnx_adadelta_update(long n, float *param, const float *grad, float *mean_grad,
                              float *mean_delta, float rho, float one_minus_rho,
                              float learning_rate, float epsilon,
                              const cnnx_gradient_terms *terms, int n_threads)
    void cnnx_sgd_update(long n, float *param, const float *grad, float *velocity,
                         float learning_rate, float momentum, int nesterov,
                         const cnnx_gradient_terms *terms, int n_threads)
    long cnnx_lars_norms_partials(long n)
    void cnnx_lars_norms(long n, const float *param, const float *grad,
                         const cnnx_gradient_terms *terms, double *norms, double *partials,
                         int n_threads)
    void cnnx_lars_update(long n, float *param, const float *grad, float *velocity,
                          float momentum, float weight_decay, float step,
                          const cnnx_gradient_terms *terms, int n_threads)
    # loss.c
    double cnnx_softmax_cross_entropy(int rows, int classes, const float *logits,
                                      const int64_t *labels, float *grad, double *row_losses,
                                      int n_threads)

# The memory-bound kernels' declarations (pooling, BatchNorm's per-channel passes), a block
# of their own.
cdef extern from "cnnx_kernels.h" nogil:
    ctypedef struct cnnx_pool_geometry:
        int batch, in_h, in_w, channels
        int out_h, out_w
        int pool_h, pool_w
        int stride_h, stride_w
        int pad_top, pad_left
    enum: CNNX_ARGMAX_CELL
    enum: CNNX_ARGMAX_WINDOW
    void cnnx_max_pool2d_forward(const cnnx_pool_geometry *geometry, const float *x,
                                 float *y, void *argmax, int argmax_kind, int n_threads)
    void cnnx_max_pool2d_backward(const cnnx_pool_geometry *geometry,
                                  const float *grad_output, const void *argmax,
                                  int argmax_kind, const float *relu_y, float *grad_input,
                                  int n_threads)
    void cnnx_avg_pool2d_forward(const cnnx_pool_geometry *geometry, const float *x,
                                 float *y, int n_threads)
    int cnnx_conv2d_max_pool_fusable(const cnnx_conv_geometry *geometry,
                                     const cnnx_pool_geometry *pool)
    long cnnx_conv2d_max_pool_workspace_floats(const cnnx_conv_geometry *geometry,
                                               int filters, int n_threads)
    void cnnx_conv2d_max_pool_forward(const cnnx_conv_geometry *geometry, const float *x,
                                      const float *kernel, int filters, const float *bias,
                                      int relu, const cnnx_pool_geometry *pool,
                                      float *pooled, unsigned char *taps, int n_threads,
                                      float *workspace)
    void cnnx_avg_pool2d_backward(const cnnx_pool_geometry *geometry,
                                  const float *grad_output, float *grad_input, int n_threads)
    ctypedef struct cnnx_relu_mask:
        const float *shift
        const float *scale
        const float *offset
    long cnnx_channel_sums_partials(long rows, int channels)
    void cnnx_channel_sums(long rows, int channels, const float *a, const float *b,
                           const float *a_shift, const float *b_shift,
                           const cnnx_relu_mask *mask, double *sums, double *product_sums,
                           double *partials, int n_threads)
    void cnnx_channel_affine(long rows, int channels, const float *a, const float *a_shift,
                             const float *a_scale, const float *b, const float *b_shift,
                             const float *b_scale, const float *shift,
                             const cnnx_relu_mask *mask, int relu, float *out, int n_threads)

ISAS = {"auto": 0, "generic": 1, "avx2": 2}
_ISA_NAMES = {1: "generic", 2: "avx2"}
_INT_MAX = 2**31 - 1


def openmp_enabled():
    """True when the kernels were compiled with OpenMP."""
    return bool(cnnx_openmp_enabled())


def set_isa(name):
    """Pick the GEMM micro-kernel: 'auto' (best the CPU has), 'avx2' or 'generic' (portable C).
    Returns the name now in use ('avx2' falls back to 'generic' on CPUs without AVX2+FMA)."""
    if name not in ISAS:
        raise ValueError(f"set_isa: expected one of {sorted(ISAS)}, got {name!r}")
    return _ISA_NAMES[cnnx_set_isa(ISAS[name])]


def get_isa():
    """The GEMM micro-kernel in use: 'avx2' or 'generic'."""
    return _ISA_NAMES[cnnx_get_isa()]


def cpu_has_avx2_fma():
    return bool(cnnx_cpu_has_avx2_fma())


# ------------------------------------------------------------------------------ checks

cdef _check(who, name, array, shape=None, dtype=np.float32):
    """array must be a C-contiguous, non-empty ndarray of dtype (and shape, -1 = any).
    Plain loops and NumPy's C accessors: a step makes dozens of these calls, and a generator
    or a dtype comparison per call showed in its Python overhead."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{who}: {name} must be a numpy.ndarray, got {type(array).__name__}")
    cdef cnp.ndarray checked = <cnp.ndarray>array
    cdef bint dtype_ok
    if dtype is np.float32:
        dtype_ok = cnp.PyArray_TYPE(checked) == cnp.NPY_FLOAT32
    else:
        dtype_ok = checked.dtype == dtype
    if not dtype_ok:
        raise TypeError(f"{who}: {name} must be {np.dtype(dtype).name}, got {array.dtype}")
    cdef int ndim = cnp.PyArray_NDIM(checked), axis
    cdef cnp.npy_intp *dims = cnp.PyArray_DIMS(checked)
    cdef bint shape_ok = True
    if shape is not None:
        if ndim != len(shape):
            shape_ok = False
        else:
            for axis in range(ndim):
                want = shape[axis]
                if want != -1 and want != dims[axis]:
                    shape_ok = False
                    break
        if not shape_ok:
            expected = "(" + ", ".join("any" if s == -1 else str(s) for s in shape) + ")"
            raise ValueError(f"{who}: {name} must have shape {expected}, got {array.shape}")
    cdef cnp.npy_intp size = cnp.PyArray_SIZE(checked)
    if size == 0:
        raise ValueError(f"{who}: {name} is empty (shape {array.shape})")
    if size > _INT_MAX:
        raise ValueError(f"{who}: {name} has {array.size} elements, more than 2**31 - 1")
    if not cnp.PyArray_IS_C_CONTIGUOUS(checked):
        raise ValueError(f"{who}: {name} must be C-contiguous "
                         f"(use numpy.ascontiguousarray), got strides {array.strides}")


cdef inline float *_data(array):
    """The first float of an array _check has accepted (read-only arrays too: the kernels
    only read their inputs)."""
    return <float *>cnp.PyArray_DATA(<cnp.ndarray>array)


cdef _check_output(who, name, array, shape, dtype=np.float32):
    _check(who, name, array, shape, dtype)
    if not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>array):
        raise ValueError(f"{who}: {name} is read-only")


cdef int _threads(who, n_threads) except -1:
    if isinstance(n_threads, bool) or not isinstance(n_threads, int) or n_threads < 1:
        raise ValueError(f"{who}: n_threads must be a positive integer, got {n_threads!r}")
    return min(n_threads, 1024)


_local = threading.local()


cdef cnp.ndarray _workspace(long floats):
    """Scratch for one kernel call, kept per Python thread: a fresh multi-MB array each call
    would page-fault on every call. An ndarray (callers take _data() or a memoryview)."""
    buffer = getattr(_local, "workspace", None)
    if buffer is None or buffer.shape[0] < floats:
        buffer = np.empty(max(floats, 1), np.float32)
        _local.workspace = buffer
    return buffer


# ------------------------------------------------------------------------------ GEMM

def sgemm(a, b, c, bias=None, bint relu=False, bint transpose_a=False,
          bint transpose_b=False, n_threads=1):
    """c = op(a) @ op(b) (+ bias) (relu); op transposes when asked. float32, C-contiguous."""
    who = "sgemm"
    _check(who, "a", a, (-1, -1))
    _check(who, "b", b, (-1, -1))
    cdef int m = a.shape[1] if transpose_a else a.shape[0]
    cdef int k = a.shape[0] if transpose_a else a.shape[1]
    cdef int k_b = b.shape[1] if transpose_b else b.shape[0]
    cdef int n = b.shape[0] if transpose_b else b.shape[1]
    if k_b != k:
        raise ValueError(f"sgemm: op(a) is {m}x{k} but op(b) is {k_b}x{n}; "
                         f"inner sizes must match")
    _check_output(who, "c", c, (m, n))
    if bias is not None:
        _check(who, "bias", bias, (n,))
    cdef int threads = _threads(who, n_threads)
    cdef const float *a_data = _data(a)
    cdef const float *b_data = _data(b)
    cdef float *c_data = _data(c)
    cdef const float *bias_pointer = NULL if bias is None else _data(bias)
    cdef float *workspace = _data(_workspace(cnnx_gemm_workspace_floats(threads)))
    cdef int ta = transpose_a, tb = transpose_b, use_relu = relu
    with nogil:
        cnnx_sgemm(m, n, k, a_data, ta, b_data, tb, bias_pointer, use_relu, c_data, threads,
                   workspace)
    return c


def column_sums(a, sums, n_threads=1):
    """sums[j] = sum_i a[i, j], rows added in order."""
    who = "column_sums"
    _check(who, "a", a, (-1, -1))
    _check_output(who, "sums", sums, (a.shape[1],))
    cdef int threads = _threads(who, n_threads)
    cdef const float *a_data = _data(a)
    cdef float *sums_data = _data(sums)
    cdef int m = a.shape[0], n = a.shape[1]
    with nogil:
        cnnx_column_sums(m, n, a_data, sums_data, threads)
    return sums


# ------------------------------------------------------------------------------ convolution

cdef class ConvGeometry:
    """One convolution's geometry, worked out and checked once (Conv2D.build) and handed to
    every call: input (H, W, C), kernel_size (KH, KW), filters F, strides, pads (top, left)
    and output_size (OH, OW). It holds the C structs of the forward (and kernel-gradient)
    GEMM and of the input-gradient pass: a convolution of grad_output, dilated by the
    strides, with the kernel flipped in space and transposed in channels."""
    cdef cnnx_conv_geometry forward
    cdef cnnx_conv_geometry grad_input
    cdef readonly tuple input_size, kernel_size, strides, pads, output_size
    cdef readonly int filters

    def __init__(self, input_size, kernel_size, int filters, strides, pads, output_size):
        self.input_size = tuple(int(v) for v in input_size)
        self.kernel_size = tuple(int(v) for v in kernel_size)
        self.strides = tuple(int(v) for v in strides)
        self.pads = tuple(int(v) for v in pads)
        self.output_size = tuple(int(v) for v in output_size)
        self.filters = filters
        if (len(self.input_size) != 3 or len(self.kernel_size) != 2 or len(self.strides) != 2
                or len(self.pads) != 2 or len(self.output_size) != 2):
            raise ValueError(f"ConvGeometry: expected input_size (H, W, C) and pairs for "
                             f"kernel_size, strides, pads and output_size, got {self!r}")
        (h, w, c), (kh, kw) = self.input_size, self.kernel_size
        (sh, sw), (top, left), (oh, ow) = self.strides, self.pads, self.output_size
        if min(h, w, c, kh, kw, sh, sw, oh, ow, filters) < 1 or min(top, left) < 0:
            raise ValueError(f"ConvGeometry: sizes must be positive and pads non-negative, "
                             f"got {self!r}")
        if (oh - 1) * sh - top >= h or (ow - 1) * sw - left >= w or top >= kh or left >= kw:
            raise ValueError(f"ConvGeometry: a window lies wholly in the padding: {self!r}")
        if <long long>kh * kw * max(c, filters) > _INT_MAX:
            raise ValueError(f"ConvGeometry: the GEMM of this convolution has more than "
                             f"2**31 - 1 columns: {self!r}")
        self.forward = _conv_struct((h, w, c), (oh, ow), (kh, kw), (sh, sw), (1, 1),
                                    (top, left))
        self.grad_input = _conv_struct((oh, ow, filters), (h, w), (kh, kw), (1, 1), (sh, sw),
                                       (kh - 1 - top, kw - 1 - left))

    def __repr__(self):
        return (f"ConvGeometry(input_size={self.input_size}, kernel_size={self.kernel_size}, "
                f"filters={self.filters}, strides={self.strides}, pads={self.pads}, "
                f"output_size={self.output_size})")

    def __reduce__(self):                    # pickled with its layer (Dask ships models)
        return ConvGeometry, (self.input_size, self.kernel_size, self.filters, self.strides,
                              self.pads, self.output_size)

    def __eq__(self, other):
        return isinstance(other, ConvGeometry) and self.__reduce__() == other.__reduce__()

    def __hash__(self):
        return hash(self.__reduce__()[1])


cdef cnnx_conv_geometry _conv_struct(tuple source_size, tuple out_size, tuple kernel,
                                     tuple strides, tuple dilation, tuple pads):
    cdef cnnx_conv_geometry g
    g.batch = 0                                  # each call sets its batch
    g.in_h, g.in_w, g.channels = source_size
    g.out_h, g.out_w = out_size
    g.kernel_h, g.kernel_w = kernel
    g.stride_h, g.stride_w = strides
    g.dilation_h, g.dilation_w = dilation
    g.pad_top, g.pad_left = pads
    return g


cdef int _batch_rows(who, cnnx_conv_geometry *g, int batch) except -1:
    """Set the call's batch; the GEMM's rows (N*OH*OW) must fit an int."""
    if <long long>batch * g.out_h * g.out_w > _INT_MAX:
        raise ValueError(f"{who}: {batch} x {g.out_h} x {g.out_w} output pixels, more than "
                         f"2**31 - 1 GEMM rows; use smaller batches")
    g.batch = batch
    return 0


def conv2d_forward(ConvGeometry geometry, x, kernel, bias, y, bint relu=False, n_threads=1):
    """y = conv(x, kernel) + bias (relu).  x (N,H,W,C), kernel (KH,KW,C,F) -> y (N,OH,OW,F),
    all as the geometry says; bias (F,) or None."""
    who = "conv2d_forward"
    (h, w, c), (kh, kw), f = geometry.input_size, geometry.kernel_size, geometry.filters
    _check(who, "x", x, (-1, h, w, c))
    _check(who, "kernel", kernel, (kh, kw, c, f))
    _check_output(who, "y", y, (x.shape[0], *geometry.output_size, f))
    if bias is not None:
        _check(who, "bias", bias, (f,))
    cdef int threads = _threads(who, n_threads)
    cdef cnnx_conv_geometry g = geometry.forward
    _batch_rows(who, &g, x.shape[0])
    cdef const float *x_data = _data(x)
    cdef const float *kernel_data = _data(kernel)
    cdef float *y_data = _data(y)
    cdef const float *bias_pointer = NULL if bias is None else _data(bias)
    cdef float *workspace = _data(_workspace(cnnx_conv2d_forward_workspace_floats(&g, f,
                                                                                  threads)))
    cdef int use_relu = relu, filters = f
    with nogil:
        cnnx_conv2d_forward(&g, x_data, kernel_data, filters, bias_pointer, use_relu, y_data,
                            threads, workspace)
    return y


def conv2d_grad_input(ConvGeometry geometry, grad_output, kernel, grad_input, n_threads=1):
    """grad_input (N,H,W,C) of the convolution: grad_output (N,OH,OW,F), dilated by the
    strides, convolved with the kernel flipped in space and transposed to (KH,KW,F,C)."""
    who = "conv2d_grad_input"
    (h, w, c), (kh, kw), f = geometry.input_size, geometry.kernel_size, geometry.filters
    _check(who, "grad_output", grad_output, (-1, *geometry.output_size, f))
    _check(who, "kernel", kernel, (kh, kw, c, f))
    _check_output(who, "grad_input", grad_input, (grad_output.shape[0], h, w, c))
    cdef int threads = _threads(who, n_threads)
    cdef cnnx_conv_geometry g = geometry.grad_input
    _batch_rows(who, &g, grad_output.shape[0])
    flipped = np.empty((kh, kw, f, c), np.float32)
    cdef const float *kernel_data = _data(kernel)
    cdef float *flipped_data = _data(flipped)
    cdef const float *grad_output_data = _data(grad_output)
    cdef float *grad_input_data = _data(grad_input)
    cdef float *workspace = _data(_workspace(cnnx_conv2d_forward_workspace_floats(&g, c,
                                                                                  threads)))
    cdef int channels = c, filters = f, kernel_h = kh, kernel_w = kw
    with nogil:
        cnnx_conv2d_flip_kernel(kernel_h, kernel_w, channels, filters, kernel_data,
                                flipped_data)
        cnnx_conv2d_forward(&g, grad_output_data, flipped_data, channels, NULL, 0,
                            grad_input_data, threads, workspace)
    return grad_input


def conv2d_grad_kernel(ConvGeometry geometry, x, grad_output, grad_kernel, grad_bias,
                       n_threads=1):
    """grad_kernel = im2col(x)^T @ grad_output, grad_bias = sums of grad_output over pixels."""
    who = "conv2d_grad_kernel"
    (h, w, c), (kh, kw), f = geometry.input_size, geometry.kernel_size, geometry.filters
    _check(who, "x", x, (-1, h, w, c))
    _check(who, "grad_output", grad_output, (x.shape[0], *geometry.output_size, f))
    _check_output(who, "grad_kernel", grad_kernel, (kh, kw, c, f))
    _check_output(who, "grad_bias", grad_bias, (f,))
    cdef int threads = _threads(who, n_threads)
    cdef cnnx_conv_geometry g = geometry.forward
    _batch_rows(who, &g, x.shape[0])
    cdef const float *x_data = _data(x)
    cdef const float *grad_output_data = _data(grad_output)
    cdef float *grad_kernel_data = _data(grad_kernel)
    cdef float *grad_bias_data = _data(grad_bias)
    cdef float *workspace = _data(_workspace(
        cnnx_conv2d_grad_kernel_workspace_floats(&g, f, threads)))
    cdef int filters = f
    with nogil:
        cnnx_conv2d_grad_kernel(&g, x_data, grad_output_data, filters, grad_kernel_data,
                                grad_bias_data, threads, workspace)
    return grad_kernel, grad_bias


# ------------------------------------------------------------------------------ pooling

cdef cnnx_pool_geometry _pool_geometry(tuple input_shape, tuple out_size, tuple pool,
                                       tuple strides, tuple pads) except *:
    cdef cnnx_pool_geometry g
    g.batch, g.in_h, g.in_w, g.channels = input_shape
    g.out_h, g.out_w = out_size
    g.pool_h, g.pool_w = pool
    g.stride_h, g.stride_w = strides
    g.pad_top, g.pad_left = pads
    # every window must hold at least one input cell
    if (min(g.pool_h, g.pool_w, g.stride_h, g.stride_w) < 1 or min(g.pad_top, g.pad_left) < 0
            or g.pad_top >= g.pool_h or g.pad_left >= g.pool_w
            or (g.out_h - 1) * g.stride_h - g.pad_top >= g.in_h
            or (g.out_w - 1) * g.stride_w - g.pad_left >= g.in_w):
        raise ValueError(f"pooling: output {out_size} with pool {pool}, strides {strides}, "
                         f"pads {pads} has windows outside the input {input_shape[1:3]}")
    return g


cdef class PoolGeometry:
    """One pooling layer's geometry, worked out and checked once (MaxPool2D / AvgPool2D
    .build, through ops.pool_geometry) and handed to every call, which then checks only its
    arrays against it: input_size (H, W, C), pool_size, strides, pads (top, left) and
    output_size (OH, OW)."""
    cdef cnnx_pool_geometry geometry
    cdef readonly tuple input_size, pool_size, strides, pads, output_size

    def __init__(self, input_size, pool_size, strides, pads, output_size):
        self.input_size = tuple(int(v) for v in input_size)
        self.pool_size = tuple(int(v) for v in pool_size)
        self.strides = tuple(int(v) for v in strides)
        self.pads = tuple(int(v) for v in pads)
        self.output_size = tuple(int(v) for v in output_size)
        if (len(self.input_size) != 3 or len(self.pool_size) != 2 or len(self.strides) != 2
                or len(self.pads) != 2 or len(self.output_size) != 2
                or min(*self.input_size, *self.output_size) < 1):
            raise ValueError(f"PoolGeometry: expected a positive input_size (H, W, C) and "
                             f"pairs for pool_size, strides, pads and output_size, got {self!r}")
        self.geometry = _pool_geometry((0, *self.input_size), self.output_size, self.pool_size,
                                       self.strides, self.pads)

    def __repr__(self):
        return (f"PoolGeometry(input_size={self.input_size}, pool_size={self.pool_size}, "
                f"strides={self.strides}, pads={self.pads}, output_size={self.output_size})")

    def __reduce__(self):                    # pickled with its layer (Dask ships models)
        return PoolGeometry, (self.input_size, self.pool_size, self.strides, self.pads,
                              self.output_size)

    def __eq__(self, other):
        return isinstance(other, PoolGeometry) and self.__reduce__() == other.__reduce__()

    def __hash__(self):
        return hash(self.__reduce__()[1])


cdef cnnx_pool_geometry _pool_call(who, PoolGeometry geometry, input_name, input_array,
                                   output_name, output_array, bint input_is_pooled) except *:
    """The geometry of one call: the arrays checked against it, its batch set. The pooled
    side is (N, OH, OW, C), the other (N, H, W, C); input_array is read, output_array
    written."""
    cdef cnnx_pool_geometry g = geometry.geometry
    (h, w, c), (oh, ow) = geometry.input_size, geometry.output_size
    plane, pooled = (h, w, c), (oh, ow, c)
    _check(who, input_name, input_array, (-1, *(pooled if input_is_pooled else plane)))
    _check_output(who, output_name, output_array,
                  (input_array.shape[0], *(plane if input_is_pooled else pooled)))
    g.batch = input_array.shape[0]
    return g


cdef int _argmax_kind(who, argmax, shape, tuple pool) except -1:
    """CNNX_ARGMAX_CELL for int32 argmax, CNNX_ARGMAX_WINDOW for uint8 (window taps)."""
    if isinstance(argmax, np.ndarray) and argmax.dtype == np.uint8:
        _check(who, "argmax", argmax, shape, np.uint8)
        if pool is None:
            raise ValueError(f"{who}: a uint8 argmax holds taps inside each window; give "
                             f"the forward's pool_size, strides and pads")
        if pool[0] * pool[1] > 256:
            raise ValueError(f"{who}: a uint8 argmax holds at most 256 taps, the pool "
                             f"{pool} has {pool[0] * pool[1]}; use an int32 argmax")
        return CNNX_ARGMAX_WINDOW
    if isinstance(argmax, np.ndarray) and argmax.dtype not in (np.int32, np.uint8):
        raise TypeError(f"{who}: argmax must be int32 (cells) or uint8 (window taps), "
                        f"got {argmax.dtype}")
    _check(who, "argmax", argmax, shape, np.int32)
    return CNNX_ARGMAX_CELL


def max_pool2d_forward(x, y, argmax, pool_size=None, strides=None, pads=(0, 0), n_threads=1,
                       PoolGeometry geometry=None):
    """y = window max of x; argmax = where the first max was: int32 h*W + w in the input
    plane, or, for a uint8 argmax, the tap i*pool_w + j inside its window (a quarter of the
    bytes).  x (N,H,W,C) -> (N,OH,OW,C).  geometry: the layer's PoolGeometry (then
    pool_size, strides and pads are not read)."""
    who = "max_pool2d_forward"
    cdef cnnx_pool_geometry g
    if geometry is not None:
        g = _pool_call(who, geometry, "x", x, "y", y, False)
        pool_size = geometry.pool_size
    else:
        _check(who, "x", x, (-1, -1, -1, -1))
        _check_output(who, "y", y, (x.shape[0], -1, -1, x.shape[3]))
    cdef int kind = _argmax_kind(who, argmax, y.shape, tuple(pool_size))
    _check_output(who, "argmax", argmax, y.shape, argmax.dtype)
    cdef int threads = _threads(who, n_threads)
    if geometry is None:
        g = _pool_geometry(x.shape, y.shape[1:3], tuple(pool_size), tuple(strides), tuple(pads))
    cdef const float *x_data = _data(x)
    cdef float *y_data = _data(y)
    cdef void *argmax_pointer = _pointer(argmax)
    with nogil:
        cnnx_max_pool2d_forward(&g, x_data, y_data, argmax_pointer, kind, threads)
    return y, argmax


cdef inline void *_pointer(array):
    """The data of an array _check has accepted, of any dtype (an argmax's int32 cells or
    uint8 taps): no view is made on the way (a pool call makes several per step)."""
    return cnp.PyArray_DATA(<cnp.ndarray>array)


def _check_taps(who, argmax, cnnx_pool_geometry g):
    """Every uint8 tap must name a cell inside its clipped window (the scatter writes there)."""
    taps = argmax.astype(np.int64)
    rows = np.arange(g.out_h)[:, None, None] * g.stride_h - g.pad_top + taps // g.pool_w
    columns = np.arange(g.out_w)[:, None] * g.stride_w - g.pad_left + taps % g.pool_w
    if not ((taps < g.pool_h * g.pool_w) & (rows >= 0) & (rows < g.in_h)
            & (columns >= 0) & (columns < g.in_w)).all():
        raise ValueError(f"{who}: argmax holds window taps outside their windows inside "
                         f"the input plane {(g.in_h, g.in_w)}")


def max_pool2d_backward(grad_output, argmax, grad_input, pool_size=None, strides=None,
                        pads=(0, 0), n_threads=1, relu_y=None, PoolGeometry geometry=None):
    """grad_input[n, argmax, c] += grad_output (grad_input is overwritten).

    pool_size, strides and pads, when given, are those of the forward that made argmax
    (required for a uint8 argmax of window taps): windows that tile the input
    (strides == pool_size) then take one write pass.
    relu_y: the forward's output y when the pool's input is a ReLU's output; each routed
    gradient is then multiplied by (y > 0), ReLU's backward folded in (relu_backward's bits).
    geometry: the layer's PoolGeometry (then pool_size, strides and pads are not read)."""
    who = "max_pool2d_backward"
    cdef cnnx_pool_geometry g
    if geometry is not None:
        g = _pool_call(who, geometry, "grad_output", grad_output, "grad_input", grad_input,
                       True)
        pool_size = geometry.pool_size
    else:
        _check(who, "grad_output", grad_output, (-1, -1, -1, -1))
    if relu_y is not None:
        _check(who, "relu_y", relu_y, grad_output.shape)
    cdef int kind = _argmax_kind(who, argmax, grad_output.shape,
                                 None if pool_size is None else tuple(pool_size))
    _check_output(who, "grad_input", grad_input,
                  (grad_output.shape[0], -1, -1, grad_output.shape[3]))
    cdef int threads = _threads(who, n_threads)
    if geometry is None and pool_size is not None:
        g = _pool_geometry(grad_input.shape, grad_output.shape[1:3], tuple(pool_size),
                           tuple(strides if strides is not None else pool_size), tuple(pads))
    elif geometry is None:
        g.batch, g.in_h, g.in_w, g.channels = grad_input.shape
        g.out_h, g.out_w = grad_output.shape[1:3]
        g.pool_h = g.pool_w = 1
        g.stride_h = g.stride_w = 0              # geometry unknown: scatter by argmax
        g.pad_top = g.pad_left = 0
    if (g.stride_h != g.pool_h or g.stride_w != g.pool_w) and kind == CNNX_ARGMAX_WINDOW:
        _check_taps(who, argmax, g)
    elif g.stride_h != g.pool_h or g.stride_w != g.pool_w:
        # the scatter writes at argmax: it must lie inside the input plane
        cells = grad_input.shape[1] * grad_input.shape[2]
        low, high = int(argmax.min()), int(argmax.max())
        if low < 0 or high >= cells:
            raise ValueError(f"{who}: argmax holds {low}..{high}, outside the {cells} cells "
                             f"of the input plane {grad_input.shape[1:3]}")
    cdef const float *grad_output_data = _data(grad_output)
    cdef const void *argmax_pointer = _pointer(argmax)
    cdef float *grad_input_data = _data(grad_input)
    cdef const float *relu_y_pointer = NULL if relu_y is None else _data(relu_y)
    with nogil:
        cnnx_max_pool2d_backward(&g, grad_output_data, argmax_pointer, kind, relu_y_pointer,
                                 grad_input_data, threads)
    return grad_input


# ------------------------------------------------------------- convolution + max-pool

cdef cnnx_pool_geometry _conv_pool_struct(ConvGeometry geometry, int batch, tuple pool_size,
                                          tuple pool_out) except *:
    """The pool over the convolution's output: windows pool_size, strides pool_size (they
    tile it), no padding before."""
    return _pool_geometry((batch, *geometry.output_size, geometry.filters), pool_out,
                          pool_size, pool_size, (0, 0))


def can_fuse_max_pool(ConvGeometry geometry, pool_size, pool_out):
    """True when conv2d_max_pool_forward takes this convolution and a max-pool of pool_size
    windows (strides = pool_size, no padding before) with output size pool_out (POH, POW)."""
    pool_size, pool_out = tuple(pool_size), tuple(pool_out)
    cdef cnnx_conv_geometry g = geometry.forward
    cdef cnnx_pool_geometry p = _conv_pool_struct(geometry, 1, pool_size, pool_out)
    g.batch = 1
    return bool(cnnx_conv2d_max_pool_fusable(&g, &p))


def conv2d_max_pool_forward(ConvGeometry geometry, x, kernel, bias, pooled, taps, pool_size,
                            bint relu=False, n_threads=1):
    """pooled = max-pool(conv(x, kernel) + bias (relu)), taps = each max's uint8 tap inside
    its window (max_pool2d_forward's bits for a uint8 argmax), without the convolution's
    output in memory.  x (N,H,W,C) -> pooled, taps (N,POH,POW,F); windows pool_size, strides
    pool_size, no padding before (can_fuse_max_pool says which)."""
    who = "conv2d_max_pool_forward"
    (h, w, c), (kh, kw), f = geometry.input_size, geometry.kernel_size, geometry.filters
    _check(who, "x", x, (-1, h, w, c))
    _check(who, "kernel", kernel, (kh, kw, c, f))
    _check_output(who, "pooled", pooled, (x.shape[0], -1, -1, f))
    _check_output(who, "taps", taps, pooled.shape, np.uint8)
    if bias is not None:
        _check(who, "bias", bias, (f,))
    cdef int threads = _threads(who, n_threads)
    cdef cnnx_conv_geometry g = geometry.forward
    _batch_rows(who, &g, x.shape[0])
    pool_size = tuple(pool_size)
    cdef cnnx_pool_geometry p = _conv_pool_struct(geometry, x.shape[0], pool_size,
                                                  tuple(pooled.shape[1:3]))
    if not cnnx_conv2d_max_pool_fusable(&g, &p):
        raise ValueError(f"{who}: a max-pool of {pool_size} windows (strides {pool_size}, "
                         f"output {pooled.shape[1:3]}) cannot be fused into {geometry!r}; "
                         f"it takes stride-1 convolutions and windows that tile the output "
                         f"from its top left, pool height dividing 16 (can_fuse_max_pool)")
    cdef const float *x_data = _data(x)
    cdef const float *kernel_data = _data(kernel)
    cdef float *pooled_data = _data(pooled)
    cdef unsigned char *taps_data = <unsigned char *>_pointer(taps)
    cdef const float *bias_pointer = NULL if bias is None else _data(bias)
    cdef float *workspace = _data(_workspace(cnnx_conv2d_max_pool_workspace_floats(&g, f,
                                                                                   threads)))
    cdef int use_relu = relu, filters = f
    with nogil:
        cnnx_conv2d_max_pool_forward(&g, x_data, kernel_data, filters, bias_pointer, use_relu,
                                     &p, pooled_data, taps_data, threads, workspace)
    return pooled, taps


def avg_pool2d_forward(x, y, pool_size=None, strides=None, pads=(0, 0), n_threads=1,
                       PoolGeometry geometry=None):
    """y = mean of each window's cells inside x.  x (N,H,W,C) -> y (N,OH,OW,C).
    geometry: the layer's PoolGeometry (then pool_size, strides and pads are not read)."""
    who = "avg_pool2d_forward"
    cdef cnnx_pool_geometry g
    if geometry is not None:
        g = _pool_call(who, geometry, "x", x, "y", y, False)
    else:
        _check(who, "x", x, (-1, -1, -1, -1))
        _check_output(who, "y", y, (x.shape[0], -1, -1, x.shape[3]))
        g = _pool_geometry(x.shape, y.shape[1:3], tuple(pool_size), tuple(strides),
                           tuple(pads))
    cdef int threads = _threads(who, n_threads)
    cdef const float[:, :, :, ::1] x_view = x
    cdef float[:, :, :, ::1] y_view = y
    with nogil:
        cnnx_avg_pool2d_forward(&g, &x_view[0, 0, 0, 0], &y_view[0, 0, 0, 0], threads)
    return y


def avg_pool2d_backward(grad_output, grad_input, pool_size=None, strides=None, pads=(0, 0),
                        n_threads=1, PoolGeometry geometry=None):
    """grad_input = each window's grad_output spread evenly over its cells (overwritten).
    geometry: the layer's PoolGeometry (then pool_size, strides and pads are not read)."""
    who = "avg_pool2d_backward"
    cdef cnnx_pool_geometry g
    if geometry is not None:
        g = _pool_call(who, geometry, "grad_output", grad_output, "grad_input", grad_input,
                       True)
    else:
        _check(who, "grad_output", grad_output, (-1, -1, -1, -1))
        _check_output(who, "grad_input", grad_input,
                      (grad_output.shape[0], -1, -1, grad_output.shape[3]))
        g = _pool_geometry(grad_input.shape, grad_output.shape[1:3], tuple(pool_size),
                           tuple(strides), tuple(pads))
    cdef int threads = _threads(who, n_threads)
    cdef const float[:, :, :, ::1] grad_output_view = grad_output
    cdef float[:, :, :, ::1] grad_input_view = grad_input
    with nogil:
        cnnx_avg_pool2d_backward(&g, &grad_output_view[0, 0, 0, 0],
                                 &grad_input_view[0, 0, 0, 0], threads)
    return grad_input


# ------------------------------------------------------------------------------ roofline

def fma_peak_seconds(long n_iterations, n_threads=1):
    """Seconds for n_iterations of 12 independent 8-wide FMA chains on each thread."""
    cdef int threads = _threads("fma_peak_seconds", n_threads)
    cdef float sink
    cdef double seconds
    with nogil:
        seconds = cnnx_fma_peak_seconds(n_iterations, threads, &sink)
    return seconds


def add_chain_seconds(long n_iterations):
    """Seconds for n_iterations of 64 dependent integer adds (one cycle each) on this thread."""
    cdef long sink = n_iterations
    cdef double seconds
    with nogil:
        seconds = cnnx_add_chain_seconds(n_iterations, &sink)
    return seconds


def copy(source, target, n_threads=1):
    """target[...] = source: the threaded copy the memory-bound kernels are measured against."""
    who = "copy"
    _check(who, "source", source)
    _check_output(who, "target", target, source.shape)
    cdef int threads = _threads(who, n_threads)
    cdef const float[::1] source_view = source.reshape(-1)
    cdef float[::1] target_view = target.reshape(-1)
    with nogil:
        cnnx_copy(source_view.shape[0], &source_view[0], &target_view[0], threads)
    return target


# ------------------------------------------------------------------------------ element-wise

cdef float[::1] _flat(array):
    return array.reshape(-1)


def relu_forward(x, y, n_threads=1):
    """y = max(x, 0) (a NaN kept); returns y."""
    who = "relu_forward"
    _check(who, "x", x)
    _check_output(who, "y", y, x.shape)
    cdef int threads = _threads(who, n_threads)
    cdef const float[::1] x_view = x.reshape(-1)
    cdef float[::1] y_view = _flat(y)
    with nogil:
        cnnx_relu_forward(x_view.shape[0], &x_view[0], &y_view[0], threads)
    return y


def relu_backward(y, grad, n_threads=1):
    """grad *= (y > 0) in place (ReLU's backward from its output); returns grad."""
    who = "relu_backward"
    _check(who, "y", y)
    _check_output(who, "grad", grad, y.shape)
    cdef int threads = _threads(who, n_threads)
    cdef const float[::1] y_view = y.reshape(-1)
    cdef float[::1] grad_view = _flat(grad)
    with nogil:
        cnnx_relu_backward(y_view.shape[0], &y_view[0], &grad_view[0], threads)
    return grad


# ------------------------------------------------------------------------------ optimizers
# Every update reads g = grad / divisor + l1 sign(param) + 2 l2 param (divisor: the sample
# count of a summed gradient, 1 for a mean; l1, l2: an L1L2 regularizer's, 0 without one),
# and updates param and its slots in place.

cdef cnnx_gradient_terms _gradient_terms(who, divisor, l1, l2) except *:
    if not divisor > 0:
        raise ValueError(f"{who}: divisor must be positive (the gradient's sample count), "
                         f"got {divisor!r}")
    if not (l1 >= 0 and l2 >= 0):
        raise ValueError(f"{who}: l1 and l2 must be non-negative, got l1={l1!r}, l2={l2!r}")
    cdef cnnx_gradient_terms terms
    terms.divisor, terms.l1, terms.two_l2 = divisor, l1, 2 * l2
    return terms


cdef _check_update(who, param, grad, slots):
    _check_output(who, "param", param, None)
    _check(who, "grad", grad, param.shape)
    for name, slot in slots.items():
        _check_output(who, name, slot, param.shape)


def adam_update(param, grad, m, v, float beta_1, float one_minus_beta_1, float beta_2,
                float one_minus_beta_2, float step, float epsilon, float m_scale=1,
                float grad_scale=0, divisor=1, l1=0, l2=0, n_threads=1):
    """One fused Adam pass: m, v and param updated in place (see cnnx_adam_update; Nadam
    passes its m_scale and grad_scale)."""
    who = "adam_update"
    _check_update(who, param, grad, {"m": m, "v": v})
    cdef cnnx_gradient_terms terms = _gradient_terms(who, divisor, l1, l2)
    cdef int threads = _threads(who, n_threads)
    cdef cnnx_adam_scalars scalars
    scalars.beta_1, scalars.one_minus_beta_1 = beta_1, one_minus_beta_1
    scalars.beta_2, scalars.one_minus_beta_2 = beta_2, one_minus_beta_2
    scalars.step, scalars.epsilon = step, epsilon
    scalars.m_scale, scalars.grad_scale = m_scale, grad_scale
    cdef float[::1] param_view = _flat(param)
    cdef const float[::1] grad_view = grad.reshape(-1)
    cdef float[::1] m_view = _flat(m)
    cdef float[::1] v_view = _flat(v)
    with nogil:
        cnnx_adam_update(param_view.shape[0], &param_view[0], &grad_view[0], &m_view[0],
                         &v_view[0], &scalars, &terms, threads)


def rmsprop_update(param, grad, square, float decay, float weight, float learning_rate,
                   float epsilon, divisor=1, l1=0, l2=0, n_threads=1):
    """One fused RMSprop (Adagrad: decay = weight = 1) pass, in place."""
    who = "rmsprop_update"
    _check_update(who, param, grad, {"square": square})
    cdef cnnx_gradient_terms terms = _gradient_terms(who, divisor, l1, l2)
    cdef int threads = _threads(who, n_threads)
    cdef float[::1] param_view = _flat(param)
    cdef const float[::1] grad_view = grad.reshape(-1)
    cdef float[::1] square_view = _flat(square)
    with nogil:
        cnnx_rmsprop_update(param_view.shape[0], &param_view[0], &grad_view[0],
                            &square_view[0], decay, weight, learning_rate, epsilon, &terms,
                            threads)


def adamax_update(param, grad, m, u, float beta_1, float one_minus_beta_1, float beta_2,
                  float step, float epsilon, divisor=1, l1=0, l2=0, n_threads=1):
    """One fused AdaMax pass, in place."""
    who = "adamax_update"
    _check_update(who, param, grad, {"m": m, "u": u})
    cdef cnnx_gradient_terms terms = _gradient_terms(who, divisor, l1, l2)
    cdef int threads = _threads(who, n_threads)
    cdef float[::1] param_view = _flat(param)
    cdef const float[::1] grad_view = grad.reshape(-1)
    cdef float[::1] m_view = _flat(m)
    cdef float[::1] u_view = _flat(u)
    with nogil:
        cnnx_adamax_update(param_view.shape[0], &param_view[0], &grad_view[0], &m_view[0],
                           &u_view[0], beta_1, one_minus_beta_1, beta_2, step, epsilon,
                           &terms, threads)


def adadelta_update(param, grad, mean_grad, mean_delta, float rho, float one_minus_rho,
                    float learning_rate, float epsilon, divisor=1, l1=0, l2=0, n_threads=1):
    """One fused Adadelta pass, in place."""
    who = "adadelta_update"
    _check_update(who, param, grad, {"mean_grad": mean_grad, "mean_delta": mean_delta})
    cdef cnnx_gradient_terms terms = _gradient_terms(who, divisor, l1, l2)
    cdef int threads = _threads(who, n_threads)
    cdef float[::1] param_view = _flat(param)
    cdef const float[::1] grad_view = grad.reshape(-1)
    cdef float[::1] mean_grad_view = _flat(mean_grad)
    cdef float[::1] mean_delta_view = _flat(mean_delta)
    with nogil:
        cnnx_adadelta_update(param_view.shape[0], &param_view[0], &grad_view[0],
                             &mean_grad_view[0], &mean_delta_view[0], rho, one_minus_rho,
                             learning_rate, epsilon, &terms, threads)


def sgd_update(param, grad, velocity, float learning_rate, float momentum, bint nesterov,
               divisor=1, l1=0, l2=0, n_threads=1):
    """One fused SGD pass (velocity None: plain SGD), in place."""
    who = "sgd_update"
    _check_output(who, "param", param, None)
    _check(who, "grad", grad, param.shape)
    if velocity is not None:
        _check_output(who, "velocity", velocity, param.shape)
    cdef cnnx_gradient_terms terms = _gradient_terms(who, divisor, l1, l2)
    cdef int threads = _threads(who, n_threads)
    cdef float[::1] param_view = _flat(param)
    cdef const float[::1] grad_view = grad.reshape(-1)
    cdef float[::1] velocity_view
    cdef float *velocity_pointer = NULL
    if velocity is not None:
        velocity_view = _flat(velocity)
        velocity_pointer = &velocity_view[0]
    cdef int use_nesterov = nesterov
    with nogil:
        cnnx_sgd_update(param_view.shape[0], &param_view[0], &grad_view[0], velocity_pointer,
                        learning_rate, momentum, use_nesterov, &terms, threads)


def lars_norms(param, grad, divisor=1, l1=0, l2=0, n_threads=1):
    """(||param||, ||g||) in double, block sums added in block order."""
    who = "lars_norms"
    _check(who, "param", param)
    _check(who, "grad", grad, param.shape)
    cdef cnnx_gradient_terms terms = _gradient_terms(who, divisor, l1, l2)
    cdef int threads = _threads(who, n_threads)
    cdef const float[::1] param_view = param.reshape(-1)
    cdef const float[::1] grad_view = grad.reshape(-1)
    cdef long n = param_view.shape[0]
    cdef double[::1] partials = np.empty(cnnx_lars_norms_partials(n))
    cdef double norms[2]
    with nogil:
        cnnx_lars_norms(n, &param_view[0], &grad_view[0], &terms, norms, &partials[0],
                        threads)
    return norms[0], norms[1]


def lars_update(param, grad, velocity, float momentum, float weight_decay, float step,
                divisor=1, l1=0, l2=0, n_threads=1):
    """One fused LARS pass (step = learning rate * local rate), in place."""
    who = "lars_update"
    _check_update(who, param, grad, {"velocity": velocity})
    cdef cnnx_gradient_terms terms = _gradient_terms(who, divisor, l1, l2)
    cdef int threads = _threads(who, n_threads)
    cdef float[::1] param_view = _flat(param)
    cdef const float[::1] grad_view = grad.reshape(-1)
    cdef float[::1] velocity_view = _flat(velocity)
    with nogil:
        cnnx_lars_update(param_view.shape[0], &param_view[0], &grad_view[0],
                         &velocity_view[0], momentum, weight_decay, step, &terms, threads)


# ------------------------------------------------------------------------------ loss

def softmax_cross_entropy(logits, labels, grad, n_threads=1):
    """Sum over rows of -log softmax(logits)[label] (float64); grad = softmax - onehot.
    logits, grad (N, K) float32; labels (N,) int64 in [0, K)."""
    who = "softmax_cross_entropy"
    _check(who, "logits", logits, (-1, -1))
    _check(who, "labels", labels, (logits.shape[0],), np.int64)
    _check_output(who, "grad", grad, logits.shape)
    cdef int threads = _threads(who, n_threads)
    cdef int rows = logits.shape[0], classes = logits.shape[1], r
    cdef const int64_t[::1] labels_view = labels
    for r in range(rows):
        if labels_view[r] < 0 or labels_view[r] >= classes:
            raise ValueError(f"{who}: labels must lie in [0, {classes}), got "
                             f"{labels_view[r]} at row {r}")
    cdef const float[:, ::1] logits_view = logits
    cdef float[:, ::1] grad_view = grad
    cdef double[::1] row_losses = np.empty(rows)
    cdef double total
    with nogil:
        total = cnnx_softmax_cross_entropy(rows, classes, &logits_view[0, 0],
                                           &labels_view[0], &grad_view[0, 0],
                                           &row_losses[0], threads)
    return total


# ------------------------------------------------------------------------------ per channel

cdef class _ReluMask:
    """A checked relu_mask=(shift, scale, offset) and the C struct pointing into it."""
    cdef cnnx_relu_mask mask
    cdef object vectors
    cdef const float[::1] shift_view, scale_view, offset_view

    def __init__(self, who, relu_mask, int channels):
        if len(relu_mask) != 3:
            raise ValueError(f"{who}: relu_mask must be (shift, scale, offset), got "
                             f"{len(relu_mask)} arrays")
        for name, vector in zip(("shift", "scale", "offset"), relu_mask):
            _check(who, f"relu_mask {name}", vector, (channels,))
        self.vectors = tuple(relu_mask)                  # kept alive while C reads them
        self.shift_view, self.scale_view, self.offset_view = relu_mask
        self.mask.shift = &self.shift_view[0]
        self.mask.scale = &self.scale_view[0]
        self.mask.offset = &self.offset_view[0]


def channel_sums(a, b=None, a_shift=None, b_shift=None, relu_mask=None, n_threads=1):
    """(sum over rows of a - a_shift, sum over rows of (a - a_shift) * (b - b_shift)), float64 per
    channel, for (rows, channels) float32 arrays (b None: a; a shift None: 0). A shift near
    the mean keeps E[x^2] - E[x]^2 free of cancellation. The same bits for any n_threads.
    relu_mask=(shift, scale, offset) (needs b): a * keep replaces a, keep = (b - shift) *
    scale > -offset, the mask of a ReLU fused after a BatchNorm of b."""
    who = "channel_sums"
    _check(who, "a", a, (-1, -1))
    if b is not None:
        _check(who, "b", b, a.shape)
    cdef long rows = a.shape[0]
    cdef int channels = a.shape[1]
    a_shift = np.zeros(channels, np.float32) if a_shift is None else a_shift
    b_shift = np.zeros(channels, np.float32) if b_shift is None else b_shift
    _check(who, "a_shift", a_shift, (channels,))
    _check(who, "b_shift", b_shift, (channels,))
    cdef _ReluMask mask = None
    cdef const cnnx_relu_mask *mask_pointer = NULL
    if relu_mask is not None:
        if b is None:
            raise ValueError(f"{who}: relu_mask is computed from b; give b")
        mask = _ReluMask(who, relu_mask, channels)
        mask_pointer = &mask.mask
    cdef int threads = _threads(who, n_threads)
    sums, product_sums = np.empty(channels), np.empty(channels)
    partials = np.empty(cnnx_channel_sums_partials(rows, channels))
    cdef const float[:, ::1] a_view = a
    cdef const float[:, ::1] b_view
    cdef const float *b_pointer = NULL
    if b is not None:
        b_view = b
        b_pointer = &b_view[0, 0]
    cdef const float[::1] a_shift_view = a_shift
    cdef const float[::1] b_shift_view = b_shift
    cdef double[::1] sums_view = sums
    cdef double[::1] product_view = product_sums
    cdef double[::1] partials_view = partials
    with nogil:
        cnnx_channel_sums(rows, channels, &a_view[0, 0], b_pointer, &a_shift_view[0],
                          &b_shift_view[0], mask_pointer, &sums_view[0], &product_view[0],
                          &partials_view[0], threads)
    return sums, product_sums


def channel_affine(a, a_scale, shift, out, b=None, b_scale=None, a_shift=None, b_shift=None,
                   bint relu=False, relu_mask=None, n_threads=1):
    """out = (a - a_shift) * a_scale (+ (b - b_shift) * b_scale) + shift, per channel of
    (rows, channels) float32 arrays (a missing shift is 0). relu (without b): max(out, 0),
    a NaN kept. relu_mask=(shift, scale, offset) (with b): a * keep replaces a, as in
    channel_sums."""
    who = "channel_affine"
    _check(who, "a", a, (-1, -1))
    cdef int channels = a.shape[1]
    _check_output(who, "out", out, a.shape)
    if (b is None) != (b_scale is None):
        raise ValueError(f"{who}: give both b and b_scale, or neither")
    if relu and b is not None:
        raise ValueError(f"{who}: relu applies to the one-input form; b must be None")
    if relu_mask is not None and b is None:
        raise ValueError(f"{who}: relu_mask is computed from b; give b")
    zeros = np.zeros(channels, np.float32)
    a_shift = zeros if a_shift is None else a_shift
    b_shift = zeros if b_shift is None else b_shift
    for name, vector in (("a_scale", a_scale), ("shift", shift), ("a_shift", a_shift),
                         ("b_shift", b_shift)):
        _check(who, name, vector, (channels,))
    cdef const float[:, ::1] b_view
    cdef const float[::1] b_scale_view
    cdef const float *b_pointer = NULL
    cdef const float *b_scale_pointer = NULL
    if b is not None:
        _check(who, "b", b, a.shape)
        _check(who, "b_scale", b_scale, (channels,))
        b_view, b_scale_view = b, b_scale
        b_pointer, b_scale_pointer = &b_view[0, 0], &b_scale_view[0]
    cdef _ReluMask mask = None
    cdef const cnnx_relu_mask *mask_pointer = NULL
    if relu_mask is not None:
        mask = _ReluMask(who, relu_mask, channels)
        mask_pointer = &mask.mask
    cdef int threads = _threads(who, n_threads)
    cdef const float[:, ::1] a_view = a
    cdef const float[::1] a_scale_view = a_scale
    cdef const float[::1] a_shift_view = a_shift
    cdef const float[::1] b_shift_view = b_shift
    cdef const float[::1] shift_view = shift
    cdef float[:, ::1] out_view = out
    cdef long rows = a.shape[0]
    cdef int use_relu = relu
    with nogil:
        cnnx_channel_affine(rows, channels, &a_view[0, 0], &a_shift_view[0], &a_scale_view[0],
                            b_pointer, &b_shift_view[0], b_scale_pointer, &shift_view[0],
                            mask_pointer, use_relu, &out_view[0, 0], threads)
    return out


# ------------------------------------------------------------------------------ dropout

def dropout_mask(keep, key, double rate, n_threads=1):
    """keep[i] = 1 with probability 1 - rate, from Philox4x64-10 keyed by key (two uint64):
    element i's 32 bits are those numpy.random.Philox(key=key) gives as its i-th 32-bit half
    word. keep: a C-contiguous uint8 array, overwritten; returned."""
    who = "dropout_mask"
    _check_output(who, "keep", keep, None, np.uint8)
    if not 0 <= rate < 1:
        raise ValueError(f"{who}: rate must be in [0, 1), got {rate}")
    key0, key1 = (int(k) for k in key)
    cdef int threads = _threads(who, n_threads)
    cdef unsigned char[::1] keep_view = keep.reshape(-1)
    cdef uint32_t threshold = <uint32_t>min(round(rate * 2.0**32), 2**32 - 1)
    cdef uint64_t k0 = key0, k1 = key1
    with nogil:
        cnnx_dropout_mask(keep_view.shape[0], k0, k1, threshold, &keep_view[0], threads)
    return keep


def dropout_apply(x, keep, float scale, out, n_threads=1):
    """out = x * (keep ? scale : 0), float32 (dropout forward, and backward on gradients)."""
    who = "dropout_apply"
    _check(who, "x", x)
    _check(who, "keep", keep, x.shape, np.uint8)
    _check_output(who, "out", out, x.shape)
    cdef int threads = _threads(who, n_threads)
    cdef const float[::1] x_view = x.reshape(-1)
    cdef const unsigned char[::1] keep_view = keep.reshape(-1)
    cdef float[::1] out_view = _flat(out)
    with nogil:
        cnnx_dropout_apply(x_view.shape[0], &x_view[0], &keep_view[0], scale, &out_view[0],
                           threads)
    return out
