/* L1 (cityblock) distance matrix, the inner loop of Intra-Fusion's transport costs.
 *
 * Why hand-written C instead of a library (torchvision ResNet-50 at 0.5, 1e10 element
 * operations, this machine): SciPy's cdist("cityblock") runs a scalar loop (2.6 CPU s for
 * one 1024 x 1024 x 4608 block, 0.63 s here); numba compiles the same loop as fast but
 * costs ~115 MB of memory (LLVM) and ~0.3 s to load, more than the 3x-the-model budget
 * allows.  This file is the same loop numba ran (plans._numba_kernel): the feature axis is
 * vectorised, each row of x is reused for four rows of y and a block of 32 rows of y stays
 * in cache.  The sums are float64; only their order differs from SciPy's (relative
 * differences ~1e-15).  The build is optional (setup.py): without a C compiler the package
 * falls back to numba or SciPy.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>

/* One copy per instruction set, picked when the module loads (GCC's function multi-versioning:
 * a wheel built on one x86-64 runs everywhere and still uses AVX-512/AVX2 where present). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) && __GNUC__ >= 8
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

CLONES static void cityblock(const double *x, const double *y, double *out,
                             Py_ssize_t n, Py_ssize_t m, Py_ssize_t f)
{
    for (Py_ssize_t j0 = 0; j0 < m; j0 += 32) {
        Py_ssize_t j1 = j0 + 32 < m ? j0 + 32 : m;
        for (Py_ssize_t i = 0; i < n; i++) {
            const double *xi = x + i * f;
            double *row = out + i * m;
            Py_ssize_t j = j0;
            for (; j + 4 <= j1; j += 4) {
                const double *y0 = y + j * f, *y1 = y0 + f, *y2 = y1 + f, *y3 = y2 + f;
                double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
                for (Py_ssize_t t = 0; t < f; t++) {
                    double v = xi[t];
                    s0 += fabs(v - y0[t]);
                    s1 += fabs(v - y1[t]);
                    s2 += fabs(v - y2[t]);
                    s3 += fabs(v - y3[t]);
                }
                row[j] = s0;
                row[j + 1] = s1;
                row[j + 2] = s2;
                row[j + 3] = s3;
            }
            for (; j < j1; j++) {
                const double *yj = y + j * f;
                double s = 0.0;
                for (Py_ssize_t t = 0; t < f; t++)
                    s += fabs(xi[t] - yj[t]);
                row[j] = s;
            }
        }
    }
}

static PyObject *l1(PyObject *self, PyObject *args)
{
    Py_buffer x, y, out;
    Py_ssize_t n, m, f;
    (void)self;
    /* C-contiguous float64 buffers (the caller passes NumPy arrays it checked) and their shape. */
    if (!PyArg_ParseTuple(args, "y*y*w*nnn", &x, &y, &out, &n, &m, &f))
        return NULL;
    if (n < 0 || m < 0 || f < 0 || x.len < n * f * (Py_ssize_t)sizeof(double) ||
        y.len < m * f * (Py_ssize_t)sizeof(double) || out.len < n * m * (Py_ssize_t)sizeof(double)) {
        PyBuffer_Release(&x);
        PyBuffer_Release(&y);
        PyBuffer_Release(&out);
        PyErr_SetString(PyExc_ValueError, "l1: buffers smaller than the given shape");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS  /* the caller spreads row blocks over threads */
    cityblock((const double *)x.buf, (const double *)y.buf, (double *)out.buf, n, m, f);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&x);
    PyBuffer_Release(&y);
    PyBuffer_Release(&out);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"l1", l1, METH_VARARGS,
     "l1(x, y, out, n, m, f): out[i, j] = sum_t |x[i, t] - y[j, t]| for C-contiguous float64 buffers."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_l1", "Compiled L1 distance matrix.", -1, methods};

PyMODINIT_FUNC PyInit__l1(void) { return PyModule_Create(&module); }
