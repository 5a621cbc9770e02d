/* tierstore.io._hostcopy: the host (CPU) side of a block copy, rows of bytes between two
 * strided buffers, on several threads, with streaming (non-temporal) stores for large copies.
 *
 * Why: a KV copy between a paged cache and the slot slab is a gather of many rows (one per
 * layer and K/V, 32 KiB for a Llama-3-8B block of 16 tokens) into one contiguous slot. torch's
 * copy_ moves them with ordinary stores, so every destination cache line is first read into the
 * cache (read-for-ownership): three memory transfers per byte copied. Streaming stores skip the
 * read: two transfers. For copies far larger than the last-level cache (a batch of 2 MiB blocks)
 * that is what bounds the copy. Measured on the 2-core dev VM (AMD EPYC, docs/benchmarks.md):
 * torch copy_ 14.6-16.2 GB/s, this copy 21.2 GB/s.
 *
 * The Python side (tierstore/io/hostcopy.py) checks the tensors and reduces them to this call:
 *
 *   copy_rows(dst, src, sizes, dst_strides, src_strides, row_bytes, threads, nontemporal)
 *
 * dst, src: addresses (int). sizes / *_strides: tuples of equal length (<= 8): the outer index
 * space, strides in bytes (>= 0). The row at index (i_0, ..., i_k) copies row_bytes bytes from
 * src + sum(i_j * src_strides[j]) to dst + sum(i_j * dst_strides[j]). threads: how many threads
 * share the rows (the caller's thread is one of them; a thread that cannot be started leaves
 * its rows to the caller's thread). nontemporal: streaming stores (x86-64; elsewhere ignored,
 * memcpy). The GIL is released for the whole copy. Raises ValueError for malformed arguments
 * (OverflowError for an int outside its C type: a negative address, row_bytes >= 2**63);
 * addresses are trusted (the Python side takes them from live tensors and checks the bounds).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#define HAVE_STREAM 1
#else
#define HAVE_STREAM 0
#endif

#define MAX_DIMS 8
#define MAX_THREADS 64

typedef struct {
    char *dst;
    const char *src;
    int ndim;
    Py_ssize_t sizes[MAX_DIMS];
    Py_ssize_t dst_strides[MAX_DIMS];
    Py_ssize_t src_strides[MAX_DIMS];
    size_t row_bytes;
    int nontemporal;
} plan_t;

typedef struct {
    const plan_t *plan;
    Py_ssize_t first, last;   /* rows [first, last) */
} part_t;

#if HAVE_STREAM
/* n bytes, streaming stores to 16-byte aligned destination lines; head and tail by memcpy */
static void stream_copy(char *dst, const char *src, size_t n) {
    size_t head = (size_t)(-(uintptr_t)dst) & 15u;
    if (head > n) head = n;
    if (head) {
        memcpy(dst, src, head);
        dst += head; src += head; n -= head;
    }
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(src + i + 48));
        _mm_stream_si128((__m128i *)(dst + i), a);
        _mm_stream_si128((__m128i *)(dst + i + 16), b);
        _mm_stream_si128((__m128i *)(dst + i + 32), c);
        _mm_stream_si128((__m128i *)(dst + i + 48), d);
    }
    if (i < n) memcpy(dst + i, src + i, n - i);
}
#endif

static void copy_part(const part_t *p) {
    const plan_t *pl = p->plan;
    Py_ssize_t idx[MAX_DIMS];
    Py_ssize_t r = p->first;
    /* the index of row `first` in the outer space (C order: last dim fastest) */
    for (int k = pl->ndim - 1; k >= 0; k--) {
        idx[k] = r % pl->sizes[k];
        r /= pl->sizes[k];
    }
    Py_ssize_t doff = 0, soff = 0;
    for (int k = 0; k < pl->ndim; k++) {
        doff += idx[k] * pl->dst_strides[k];
        soff += idx[k] * pl->src_strides[k];
    }
    for (Py_ssize_t row = p->first; row < p->last; row++) {
#if HAVE_STREAM
        if (pl->nontemporal)
            stream_copy(pl->dst + doff, pl->src + soff, pl->row_bytes);
        else
#endif
            memcpy(pl->dst + doff, pl->src + soff, pl->row_bytes);
        /* next index: odometer, last dim fastest */
        for (int k = pl->ndim - 1; k >= 0; k--) {
            if (++idx[k] < pl->sizes[k]) {
                doff += pl->dst_strides[k];
                soff += pl->src_strides[k];
                break;
            }
            doff -= (pl->sizes[k] - 1) * pl->dst_strides[k];
            soff -= (pl->sizes[k] - 1) * pl->src_strides[k];
            idx[k] = 0;
        }
    }
#if HAVE_STREAM
    if (pl->nontemporal) _mm_sfence();   /* streaming stores are weakly ordered */
#endif
}

static void *thread_main(void *arg) {
    copy_part((const part_t *)arg);
    return NULL;
}

static int read_tuple(PyObject *t, Py_ssize_t *out, int n, const char *what) {
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != n) {
        PyErr_Format(PyExc_ValueError, "%s: a tuple of %d ints", what, n);
        return -1;
    }
    for (int k = 0; k < n; k++) {
        Py_ssize_t v = PyLong_AsSsize_t(PyTuple_GET_ITEM(t, k));
        if (v == -1 && PyErr_Occurred()) return -1;
        if (v < 0) {
            PyErr_Format(PyExc_ValueError, "%s[%d] = %zd < 0", what, k, v);
            return -1;
        }
        out[k] = v;
    }
    return 0;
}

static PyObject *copy_rows(PyObject *self, PyObject *args) {
    PyObject *dst_o, *src_o, *sizes, *dstr, *sstr;
    Py_ssize_t row_bytes;
    int threads, nontemporal;
    /* not 'K': it takes any int modulo 2**64 (-1 bytes would be a 2**64 - 1 byte memcpy) */
    if (!PyArg_ParseTuple(args, "OOO!O!O!nip", &dst_o, &src_o, &PyTuple_Type, &sizes,
                          &PyTuple_Type, &dstr, &PyTuple_Type, &sstr, &row_bytes, &threads,
                          &nontemporal))
        return NULL;
    unsigned long long dst = PyLong_AsUnsignedLongLong(dst_o);   /* OverflowError if < 0 */
    if (dst == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    unsigned long long src = PyLong_AsUnsignedLongLong(src_o);
    if (src == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    if (row_bytes < 0) {
        PyErr_Format(PyExc_ValueError, "row_bytes = %zd < 0", row_bytes);
        return NULL;
    }
    plan_t plan;
    Py_ssize_t nd = PyTuple_GET_SIZE(sizes);
    if (nd > MAX_DIMS) {
        PyErr_Format(PyExc_ValueError, "at most %d outer dims, got %zd", MAX_DIMS, nd);
        return NULL;
    }
    plan.ndim = (int)nd;
    if (read_tuple(sizes, plan.sizes, plan.ndim, "sizes") ||
        read_tuple(dstr, plan.dst_strides, plan.ndim, "dst_strides") ||
        read_tuple(sstr, plan.src_strides, plan.ndim, "src_strides"))
        return NULL;
    if (dst == 0 || src == 0) {
        PyErr_SetString(PyExc_ValueError, "null address");
        return NULL;
    }
    for (int k = 0; k < plan.ndim; k++)
        if (plan.sizes[k] == 0) Py_RETURN_NONE;
    /* rows * MAX_THREADS must fit (the parts' bounds below): checked before each product */
    Py_ssize_t rows = 1;
    for (int k = 0; k < plan.ndim; k++) {
        if (plan.sizes[k] > PY_SSIZE_T_MAX / MAX_THREADS / rows) {
            PyErr_SetString(PyExc_ValueError, "prod(sizes) too large");
            return NULL;
        }
        rows *= plan.sizes[k];
    }
    if (row_bytes == 0) Py_RETURN_NONE;
    plan.dst = (char *)(uintptr_t)dst;
    plan.src = (const char *)(uintptr_t)src;
    plan.row_bytes = (size_t)row_bytes;
    plan.nontemporal = nontemporal;
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > rows) threads = (int)rows;

    part_t parts[MAX_THREADS];
    pthread_t tids[MAX_THREADS];
    int started = 0;
    for (int t = 0; t < threads; t++) {
        parts[t].plan = &plan;
        parts[t].first = rows * t / threads;
        parts[t].last = rows * (t + 1) / threads;
    }
    Py_BEGIN_ALLOW_THREADS
    for (int t = 1; t < threads; t++) {
        if (pthread_create(&tids[t], NULL, thread_main, &parts[t]) != 0) break;
        started = t;
    }
    copy_part(&parts[0]);
    for (int t = started + 1; t < threads; t++) copy_part(&parts[t]);   /* not started */
    for (int t = 1; t <= started; t++) pthread_join(tids[t], NULL);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"copy_rows", copy_rows, METH_VARARGS,
     "copy_rows(dst, src, sizes, dst_strides, src_strides, row_bytes, threads, nontemporal)\n"
     "Copy prod(sizes) rows of row_bytes bytes between strided addresses (see the module's C "
     "source for the contract). Releases the GIL."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_hostcopy",
    "Host block copies: strided rows, several threads, streaming stores (tierstore/io/hostcopy.py).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__hostcopy(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddIntConstant(m, "STREAMING", HAVE_STREAM) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
