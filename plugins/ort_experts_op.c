/* ONNX Runtime custom op `moetrt.ort::Experts`: moetrt's CPU expert kernel (cpu_experts.c) as a node of an ONNX
 * Runtime graph, so that a step of an engine whose routed experts run in that kernel is one session run instead of
 * one run per segment with the kernel called from Python in between (runtime/ort/fused.py, bench/NOTES.md).
 *
 * Node: inputs hidden [T, H] float32, ids [T, k] int32, weights [T, k] float32, kernel [10] int64; output
 * [T, H] float32. `kernel` is what the runtime loaded for the layer, by address: the kernel library's
 * moetrt_experts_on, the packed gate_up and down weights, then num_experts, hidden, inter, slices, bits,
 * group size and the number of ways to split the slices. The op runs moetrt_experts_on with ONNX Runtime's own
 * intra-op threads (KernelContext_ParallelFor), so no second thread pool competes with them for the cores.
 *
 * The library is loaded by OrtSessionOptions' RegisterCustomOpsLibrary, which calls RegisterCustomOps below. It
 * is compiled without onnxruntime's headers (no onnxruntime package ships them): the few declarations below
 * follow onnxruntime's C API header, onnxruntime_c_api.h. That API is versioned and append-only: a function keeps
 * its index in the OrtApi table for good, and a custom op declares which version of the OrtCustomOp struct it
 * fills (here 16, the first with KernelComputeV2, which reports errors). The library asks for the API of version
 * 17, the first with KernelContext_ParallelFor; an older onnxruntime returns no table and nothing is registered.
 * Indices from onnxruntime 1.21's header (ORT_API_VERSION 21); onnxruntime 1.32 serves both versions.
 */
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

typedef struct OrtStatus OrtStatus;
typedef struct OrtApi OrtApi;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtValue OrtValue;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtSessionOptions OrtSessionOptions;

typedef struct OrtApiBase {
    const OrtApi *(*GetApi)(uint32_t version);
    const char *(*GetVersionString)(void);
} OrtApiBase;

/* onnxruntime_c_api.h enums: ONNXTensorElementDataType, OrtErrorCode, OrtCustomOpInputOutputCharacteristic,
 * OrtMemType */
enum { TYPE_FLOAT = 1, TYPE_INT32 = 6, TYPE_INT64 = 7 };
enum { ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2 };
enum { INPUT_OUTPUT_REQUIRED = 0 };
enum { MEM_TYPE_DEFAULT = 0 };

/* Indices of the functions used, in struct OrtApi (pointers in declaration order). */
enum {
    API_CreateStatus = 0,
    API_CreateCustomOpDomain = 26,
    API_CustomOpDomain_Add = 27,
    API_AddCustomOpDomain = 28,
    API_GetTensorMutableData = 51,
    API_GetDimensionsCount = 61,
    API_GetDimensions = 62,
    API_GetTensorTypeAndShape = 65,
    API_KernelContext_GetInput = 90,
    API_KernelContext_GetOutput = 91,
    API_ReleaseStatus = 93,
    API_ReleaseTensorTypeAndShapeInfo = 99,
    API_KernelContext_ParallelFor = 274,
};
#define API(api, index, type) ((type)((void *const *)(api))[index])

#define CUSTOM_OP_VERSION 16 /* the OrtCustomOp fields filled: through KernelComputeV2 */
#define API_VERSION 17       /* the OrtApi asked for: KernelContext_ParallelFor is there since version 17 */

typedef struct CustomOp {
    uint32_t version;
    void *(*CreateKernel)(const struct CustomOp *op, const OrtApi *api, const OrtKernelInfo *info);
    const char *(*GetName)(const struct CustomOp *op);
    const char *(*GetExecutionProviderType)(const struct CustomOp *op);
    int (*GetInputType)(const struct CustomOp *op, size_t index);
    size_t (*GetInputTypeCount)(const struct CustomOp *op);
    int (*GetOutputType)(const struct CustomOp *op, size_t index);
    size_t (*GetOutputTypeCount)(const struct CustomOp *op);
    void (*KernelCompute)(void *kernel, OrtKernelContext *context);
    void (*KernelDestroy)(void *kernel);
    int (*GetInputCharacteristic)(const struct CustomOp *op, size_t index);
    int (*GetOutputCharacteristic)(const struct CustomOp *op, size_t index);
    int (*GetInputMemoryType)(const struct CustomOp *op, size_t index);
    int (*GetVariadicInputMinArity)(const struct CustomOp *op);
    int (*GetVariadicInputHomogeneity)(const struct CustomOp *op);
    int (*GetVariadicOutputMinArity)(const struct CustomOp *op);
    int (*GetVariadicOutputHomogeneity)(const struct CustomOp *op);
    OrtStatus *(*CreateKernelV2)(const struct CustomOp *op, const OrtApi *api, const OrtKernelInfo *info,
                                 void **kernel);
    OrtStatus *(*KernelComputeV2)(void *kernel, OrtKernelContext *context);
    void *InferOutputShapeFn, *GetStartVersion, *GetEndVersion, *GetMayInplace, *ReleaseMayInplace, *GetAliasMap,
        *ReleaseAliasMap; /* read only by versions above 16 */
} CustomOp;

typedef void (*parallel_for_t)(void *context, void (*fn)(void *, size_t), void *arg, size_t n);
typedef int (*experts_on_t)(const float *x, const int32_t *ids, const float *weights, const void *gate_up,
                            const void *down, float *y, long tokens, long top_k, long num_experts, long hidden,
                            long inter, long slices, long bits, long group, int threads, parallel_for_t parallel_for,
                            void *context);

enum { PARAM_RUN, PARAM_GATE_UP, PARAM_DOWN, PARAM_EXPERTS, PARAM_HIDDEN, PARAM_INTER, PARAM_SLICES, PARAM_BITS,
       PARAM_GROUP, PARAM_THREADS, PARAMS };

typedef struct {
    const OrtApi *api;
} Kernel;

static const OrtApi *api_asked; /* the API_VERSION table, from RegisterCustomOps (kernels are created after it) */

static OrtStatus *error(const OrtApi *api, int code, const char *message) {
    return API(api, API_CreateStatus, OrtStatus *(*)(int, const char *))(code, message);
}

/* The dims of a tensor value, up to `most`; returns the rank, or -1 when it cannot be read. */
static int dims_of(const OrtApi *api, const OrtValue *value, int64_t *dims, size_t most) {
    OrtTensorTypeAndShapeInfo *info = NULL;
    size_t rank = 0;
    OrtStatus *status = API(api, API_GetTensorTypeAndShape,
                            OrtStatus *(*)(const OrtValue *, OrtTensorTypeAndShapeInfo **))(value, &info);
    if (status == NULL)
        status = API(api, API_GetDimensionsCount, OrtStatus *(*)(const OrtTensorTypeAndShapeInfo *, size_t *))(info,
                                                                                                             &rank);
    if (status == NULL && rank <= most)
        status = API(api, API_GetDimensions,
                     OrtStatus *(*)(const OrtTensorTypeAndShapeInfo *, int64_t *, size_t))(info, dims, rank);
    if (info != NULL) API(api, API_ReleaseTensorTypeAndShapeInfo, void (*)(OrtTensorTypeAndShapeInfo *))(info);
    if (status != NULL) {
        API(api, API_ReleaseStatus, void (*)(OrtStatus *))(status);
        return -1;
    }
    return rank <= most ? (int)rank : -1;
}

typedef struct {
    const OrtApi *api;
    OrtKernelContext *context;
} Pool;

static void on_ort_threads(void *pool_arg, void (*fn)(void *, size_t), void *arg, size_t n) {
    const Pool *pool = pool_arg;
    OrtStatus *status = API(pool->api, API_KernelContext_ParallelFor,
                            OrtStatus *(*)(const OrtKernelContext *, void (*)(void *, size_t), size_t, size_t,
                                           void *))(pool->context, fn, n, 0, arg);
    if (status != NULL) { /* no thread pool to run on: run the parts here, in order */
        API(pool->api, API_ReleaseStatus, void (*)(OrtStatus *))(status);
        for (size_t i = 0; i < n; i++) fn(arg, i);
    }
}

static OrtStatus *compute(void *kernel_arg, OrtKernelContext *context) {
    const OrtApi *api = ((Kernel *)kernel_arg)->api;
    const OrtValue *in[4];
    void *data[4];
    for (size_t i = 0; i < 4; i++) {
        OrtStatus *status = API(api, API_KernelContext_GetInput,
                                OrtStatus *(*)(const OrtKernelContext *, size_t, const OrtValue **))(context, i,
                                                                                                    &in[i]);
        if (status != NULL) return status;
        if (in[i] == NULL) return error(api, ORT_INVALID_ARGUMENT, "moetrt.ort::Experts: an input is missing");
        status = API(api, API_GetTensorMutableData, OrtStatus *(*)(OrtValue *, void **))((OrtValue *)in[i], &data[i]);
        if (status != NULL) return status;
    }
    int64_t x_dims[2], id_dims[2], weight_dims[2], param_dims[1];
    if (dims_of(api, in[0], x_dims, 2) != 2 || dims_of(api, in[1], id_dims, 2) != 2 ||
        dims_of(api, in[2], weight_dims, 2) != 2 || dims_of(api, in[3], param_dims, 1) != 1)
        return error(api, ORT_INVALID_ARGUMENT,
                     "moetrt.ort::Experts: inputs must be hidden [T, H], ids [T, k], weights [T, k], kernel [10]");
    const int64_t *param = data[3];
    if (param_dims[0] != PARAMS || id_dims[0] != x_dims[0] || weight_dims[0] != x_dims[0] ||
        weight_dims[1] != id_dims[1] || x_dims[1] != param[PARAM_HIDDEN])
        return error(api, ORT_INVALID_ARGUMENT, "moetrt.ort::Experts: input shapes do not match the layer");
    OrtValue *out = NULL;
    OrtStatus *status = API(api, API_KernelContext_GetOutput,
                            OrtStatus *(*)(OrtKernelContext *, size_t, const int64_t *, size_t, OrtValue **))(
        context, 0, x_dims, 2, &out);
    if (status != NULL) return status;
    void *y = NULL;
    status = API(api, API_GetTensorMutableData, OrtStatus *(*)(OrtValue *, void **))(out, &y);
    if (status != NULL) return status;
    Pool pool = {api, context};
    const experts_on_t run = (experts_on_t)(intptr_t)param[PARAM_RUN];
    const int code = run(data[0], data[1], data[2], (const void *)(intptr_t)param[PARAM_GATE_UP],
                         (const void *)(intptr_t)param[PARAM_DOWN], y, (long)x_dims[0], (long)id_dims[1],
                         (long)param[PARAM_EXPERTS], (long)param[PARAM_HIDDEN], (long)param[PARAM_INTER],
                         (long)param[PARAM_SLICES], (long)param[PARAM_BITS], (long)param[PARAM_GROUP],
                         (int)param[PARAM_THREADS], on_ort_threads, &pool);
    if (code == -1)
        return error(api, ORT_INVALID_ARGUMENT,
                     "moetrt.ort::Experts: bad arguments (an expert id out of range, or a shape the packed layout "
                     "cannot hold)");
    if (code != 0) return error(api, ORT_FAIL, "moetrt.ort::Experts: out of memory");
    return NULL;
}

static void *create_kernel(const CustomOp *op, const OrtApi *api, const OrtKernelInfo *info) {
    static Kernel kernel;
    (void)op;
    (void)info;
    kernel.api = api_asked != NULL ? api_asked : api; /* onnxruntime passes the table of CUSTOM_OP_VERSION */
    return &kernel;
}
static OrtStatus *create_kernel_v2(const CustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **out) {
    *out = create_kernel(op, api, info);
    return NULL;
}
static void compute_v1(void *kernel, OrtKernelContext *context) { /* not called: version 16 uses V2 */
    OrtStatus *status = compute(kernel, context);
    if (status != NULL) API(((Kernel *)kernel)->api, API_ReleaseStatus, void (*)(OrtStatus *))(status);
}
static void destroy_kernel(void *kernel) { (void)kernel; }
static const char *name(const CustomOp *op) { (void)op; return "Experts"; }
static const char *provider(const CustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static int input_type(const CustomOp *op, size_t i) {
    (void)op;
    static const int types[4] = {TYPE_FLOAT, TYPE_INT32, TYPE_FLOAT, TYPE_INT64};
    return i < 4 ? types[i] : 0;
}
static size_t input_count(const CustomOp *op) { (void)op; return 4; }
static int output_type(const CustomOp *op, size_t i) { (void)op; (void)i; return TYPE_FLOAT; }
static size_t output_count(const CustomOp *op) { (void)op; return 1; }
static int required(const CustomOp *op, size_t i) { (void)op; (void)i; return INPUT_OUTPUT_REQUIRED; }
static int memory_type(const CustomOp *op, size_t i) { (void)op; (void)i; return MEM_TYPE_DEFAULT; }
static int one(const CustomOp *op) { (void)op; return 1; }

static const CustomOp experts_op = {
    CUSTOM_OP_VERSION, create_kernel, name, provider, input_type, input_count, output_type, output_count,
    compute_v1, destroy_kernel, required, required, memory_type, one, one, one, one, create_kernel_v2, compute,
    NULL, NULL, NULL, NULL, NULL, NULL, NULL,
};

/* ABI of this library, checked by plugins/ort_ops.py before registering it. */
int moetrt_ort_ops_abi(void) { return 1; }

/* Called by onnxruntime (RegisterCustomOpsLibrary): adds the domain `moetrt.ort` with its Experts op to `options`.
 * The domain is created once and lives as long as the process, as sessions created from `options` use it. */
OrtStatus *RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
    static OrtCustomOpDomain *domain;
    static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
    const OrtApi *api = base->GetApi(API_VERSION);
    if (api == NULL) return NULL; /* onnxruntime older than the version used here; it cannot report this either */
    OrtStatus *status = NULL;
    pthread_mutex_lock(&lock);
    api_asked = api;
    if (domain == NULL) {
        status = API(api, API_CreateCustomOpDomain, OrtStatus *(*)(const char *, OrtCustomOpDomain **))("moetrt.ort",
                                                                                                      &domain);
        if (status == NULL)
            status = API(api, API_CustomOpDomain_Add, OrtStatus *(*)(OrtCustomOpDomain *, const CustomOp *))(
                domain, &experts_op);
        if (status != NULL) domain = NULL;
    }
    pthread_mutex_unlock(&lock);
    if (status != NULL) return status;
    return API(api, API_AddCustomOpDomain, OrtStatus *(*)(OrtSessionOptions *, OrtCustomOpDomain *))(options, domain);
}
