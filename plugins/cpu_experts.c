/* moetrt's CPU expert kernel: the routed SwiGLU experts of one MoE layer, each expert's weights streamed
 * from memory once, in one sequential pass per thread, for all the token rows routed to it.
 *
 * Decode is bound by reading weights. ONNX Runtime's CPU MoE op runs each expert as two GEMMs over the
 * checkpoint's row-major weights: one row is MLAS's matrix-vector path, two or more take its packing GEMM
 * path and cost about twice as much per expert (bench/moe_rows.py), and either way a thread reads several
 * weight rows 4 KB apart at once, which streams slower than one sequential read on the machines we measured
 * (bench/NOTES.md). Here the engine stores the experts pre-packed so that each thread reads one contiguous
 * block per expert, and all the rows routed to an expert are computed from registers in that one pass.
 *
 * Packed layout (plugins/cpu_experts.py writes it), per expert e and slice s of S (slice s owns the
 * intermediate channels [s*W, (s+1)*W), W = I / S):
 *   gate_up[e, s]: the 2W rows gate_c, up_c (c in the slice, interleaved), in groups of NW = 4 rows, each
 *                  group stored as [H / 8][4][8] (eight columns of each of the four rows in turn);
 *   down[e, s]:    the H rows down_proj[e, h, sW:(s+1)W], in groups of 4 rows stored as [W / 8][4][8].
 * Requires H % 8 == 0 and W % 8 == 0 (the lowering checks). A slice is a unit of work: thread t of n runs
 * slices t, t + n, ... of every chosen expert, accumulating into its own [T, H] buffer; the buffers are summed
 * at the end. Sums run in a fixed order, so results do not depend on timing (only on S and the thread count).
 *
 * y[t] = sum_j w[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])),  e = ids[t, j]
 */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MAX_THREADS 64
#define NW 4        /* weight rows per packed group */
/* token rows per pass over a group: 4 x 4 accumulators need AVX-512's 32 vector registers, 4 x 3 fit AVX2's 16 */
#ifdef __AVX512F__
#define ROW_BLOCK 4
#else
#define ROW_BLOCK 3
#endif

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));

static inline v8 load8(const float *p) { return *(const v8u *)p; }

/* Keep a loaded vector in a register (see group_dot). Only where a v8 is one register (x86 with AVX): without
 * AVX (x86-64-v2) or on aarch64 it spans two, no constraint can hold it, and GCC then keeps what it likes. */
#ifdef __AVX__
#define PIN(v) __asm__("" : "+x"(v))
#else
#define PIN(v) ((void)0)
#endif

static inline float hsum(v8 v) {
    float s = 0.0f;
    for (int i = 0; i < 8; i++) s += v[i];
    return s;
}

/* One packed group of NW weight rows ([len / 8][NW][8]) against R token rows: out[r * ld_out + a] =
 * dot(row a, x[r]). R is a compile-time constant at each call site (always_inline), so the accumulators
 * live in registers. The empty asm statements pin each loaded vector in a register: GCC otherwise folds the
 * loads into every multiply-add and reads the same data R or NW times. */
static inline __attribute__((always_inline)) void group_dot(const float *p, long len, const float *x, long ld_x,
                                                            float *out, long ld_out, const int R) {
    v8 acc[NW][ROW_BLOCK];
    for (int a = 0; a < NW; a++)
        for (int r = 0; r < R; r++) acc[a][r] = (v8){0};
    for (long l = 0; l < len; l += 8, p += 8 * NW) {
        __builtin_prefetch(p + 256);
        v8 xv[ROW_BLOCK];
        for (int r = 0; r < R; r++) {
            xv[r] = load8(x + r * ld_x + l);
            PIN(xv[r]);
        }
        for (int a = 0; a < NW; a++) {
            v8 wv = load8(p + 8 * a);
            PIN(wv);
            for (int r = 0; r < R; r++) acc[a][r] += wv * xv[r];
        }
    }
    for (int a = 0; a < NW; a++)
        for (int r = 0; r < R; r++) out[r * ld_out + a] = hsum(acc[a][r]);
}

/* out[r, j] = dot(row j, x[r]) for the n_out rows of a packed block, r < rows. */
static void packed_dot(const float *packed, long n_out, long len, const float *x, long ld_x, int rows, float *out,
                       long ld_out) {
    for (long g = 0; g < n_out / NW; g++) {
        const float *p = packed + g * NW * len;
        for (int r0 = 0; r0 < rows; r0 += ROW_BLOCK) { /* later row blocks re-read the group from cache */
            const float *xr = x + r0 * ld_x;
            float *o = out + r0 * ld_out + g * NW;
            switch (rows - r0) {
            case 1: group_dot(p, len, xr, ld_x, o, ld_out, 1); break;
            case 2: group_dot(p, len, xr, ld_x, o, ld_out, 2); break;
#if ROW_BLOCK == 4
            case 3: group_dot(p, len, xr, ld_x, o, ld_out, 3); break;
#endif
            default: group_dot(p, len, xr, ld_x, o, ld_out, ROW_BLOCK);
            }
        }
    }
}

typedef struct {
    const float *x, *gate_up, *down;
    long tokens, hidden, inter, slices;
    int threads;
    /* routing grouped by expert: experts[i] owns pairs [start[i], start[i+1]) */
    int n_active;
    const int32_t *experts, *start, *pair_token;
    const float *pair_weight;
    float *partial; /* [threads, tokens, hidden] */
    float *scratch; /* per thread: gathered rows, gate/up, activations, expert output */
    long scratch_per_thread, max_rows;
} job_t;

static void run_slices(const job_t *job, int thread) {
    const long H = job->hidden, S = job->slices, W = job->inter / S;
    float *out = job->partial + (long)thread * job->tokens * H;
    memset(out, 0, sizeof(float) * job->tokens * H);
    float *xs = job->scratch + thread * job->scratch_per_thread; /* [R, H] */
    float *gu = xs + job->max_rows * H;                          /* [R, 2W] */
    float *act = gu + job->max_rows * 2 * W;                     /* [R, W] */
    float *y = act + job->max_rows * W;                          /* [R, H] */
    for (int i = 0; i < job->n_active; i++) {
        const long e = job->experts[i];
        const int p0 = job->start[i], rows = job->start[i + 1] - p0;
        for (int r = 0; r < rows; r++)
            memcpy(xs + r * H, job->x + (long)job->pair_token[p0 + r] * H, sizeof(float) * H);
        for (long s = thread; s < S; s += job->threads) {
            packed_dot(job->gate_up + (e * S + s) * 2 * W * H, 2 * W, H, xs, H, rows, gu, 2 * W);
            for (int r = 0; r < rows; r++) {
                const float w = job->pair_weight[p0 + r];
                for (long c = 0; c < W; c++) {
                    const float g = gu[r * 2 * W + 2 * c], u = gu[r * 2 * W + 2 * c + 1];
                    act[r * W + c] = w * (g / (1.0f + expf(-g))) * u;
                }
            }
            packed_dot(job->down + (e * S + s) * H * W, H, W, act, W, rows, y, H);
            for (int r = 0; r < rows; r++) {
                float *dst = out + (long)job->pair_token[p0 + r] * H;
                for (long h = 0; h < H; h++) dst[h] += y[r * H + h];
            }
        }
    }
}

/* ---- a small persistent thread pool. Workers sleep between calls, so they do not compete with the
 * inference engine's own threads while it runs the rest of the model. ---- */

static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake;
    unsigned generation;
    atomic_int pending;
    int workers;
    pid_t pid;
    const job_t *job;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, NULL};
static pthread_mutex_t call_lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned first_generation[MAX_THREADS]; /* the pool's generation when each worker was started */

static void *worker(void *arg) {
    const int index = (int)(intptr_t)arg;
    unsigned seen = first_generation[index]; /* not 0: a worker added later must not rerun an old job */
    for (;;) {
        pthread_mutex_lock(&pool.lock);
        while (pool.generation == seen) pthread_cond_wait(&pool.wake, &pool.lock);
        seen = pool.generation;
        const job_t *job = pool.job;
        pthread_mutex_unlock(&pool.lock);
        if (index < job->threads) run_slices(job, index);
        atomic_fetch_sub_explicit(&pool.pending, 1, memory_order_release);
    }
    return NULL;
}

static int ensure_workers(int count) {
    if (pool.pid != getpid()) { /* first call, or a forked child: the parent's threads are not here */
        pool.workers = 0;
        pool.generation = 0;
        pool.pid = getpid();
    }
    while (pool.workers < count) {
        pthread_t id;
        first_generation[pool.workers + 1] = pool.generation; /* set before the thread can read it */
        if (pthread_create(&id, NULL, worker, (void *)(intptr_t)(pool.workers + 1)) != 0) return -1;
        pthread_detach(id);
        pool.workers++;
    }
    return 0;
}

static void run_parallel(const job_t *job) {
    if (job->threads == 1) {
        run_slices(job, 0);
        return;
    }
    atomic_store_explicit(&pool.pending, pool.workers, memory_order_relaxed);
    pthread_mutex_lock(&pool.lock);
    pool.job = job;
    pool.generation++;
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    run_slices(job, 0);
    while (atomic_load_explicit(&pool.pending, memory_order_acquire) > 0) __builtin_ia32_pause();
}

int moetrt_experts_abi(void) { return 2; }

/* y[T, H] = the routed experts of x[T, H] (ids/weights [T, k]; packed weights as above).
 * Returns 0, or -1 for bad arguments (an id out of range, sizes the layout cannot hold), -2 out of memory,
 * -3 when the worker threads could not start. */
int moetrt_experts(const float *x, const int32_t *ids, const float *weights, const float *gate_up,
                   const float *down, float *y, long tokens, long top_k, long num_experts, long hidden, long inter,
                   long slices, int threads) {
    if (tokens < 0 || top_k < 1 || num_experts < 1 || hidden < 8 || hidden % 8 || slices < 1 || inter % slices ||
        (inter / slices) % 8 || threads < 1 || threads > MAX_THREADS)
        return -1;
    if (tokens == 0) return 0;
    if (threads > slices) threads = (int)slices;
    const long pairs = tokens * top_k;
    int status = 0;
    int32_t *count = calloc(num_experts, sizeof(int32_t));
    int32_t *slot = calloc(num_experts, sizeof(int32_t));
    int32_t *experts = malloc(sizeof(int32_t) * num_experts);
    int32_t *start = malloc(sizeof(int32_t) * (num_experts + 1));
    int32_t *pair_token = malloc(sizeof(int32_t) * pairs);
    float *pair_weight = malloc(sizeof(float) * pairs);
    float *partial = NULL, *scratch = NULL;
    if (!count || !slot || !experts || !start || !pair_token || !pair_weight) {
        status = -2;
        goto done;
    }
    for (long p = 0; p < pairs; p++) {
        if (ids[p] < 0 || ids[p] >= num_experts) {
            status = -1;
            goto done;
        }
        count[ids[p]]++;
    }
    /* experts in ascending order, each expert's rows in token order */
    int n_active = 0;
    long max_rows = 0, offset = 0;
    for (long e = 0; e < num_experts; e++) {
        if (!count[e]) continue;
        experts[n_active] = (int32_t)e;
        start[n_active++] = (int32_t)offset;
        slot[e] = (int32_t)offset;
        offset += count[e];
        if (count[e] > max_rows) max_rows = count[e];
    }
    start[n_active] = (int32_t)offset;
    for (long p = 0; p < pairs; p++) {
        const int32_t at = slot[ids[p]]++;
        pair_token[at] = (int32_t)(p / top_k);
        pair_weight[at] = weights[p];
    }
    const long width = inter / slices;
    const long per_thread = max_rows * (2 * hidden + 3 * width) + 16;
    partial = malloc(sizeof(float) * threads * tokens * hidden);
    scratch = malloc(sizeof(float) * threads * per_thread);
    if (!partial || !scratch) {
        status = -2;
        goto done;
    }
    job_t job = {x, gate_up, down, tokens, hidden, inter, slices, threads, n_active, experts, start, pair_token,
                 pair_weight, partial, scratch, per_thread, max_rows};
    pthread_mutex_lock(&call_lock); /* one call at a time through the pool */
    if (ensure_workers(threads - 1) != 0) {
        pthread_mutex_unlock(&call_lock);
        status = -3;
        goto done;
    }
    run_parallel(&job);
    pthread_mutex_unlock(&call_lock);
    const long size = tokens * hidden;
    memcpy(y, partial, sizeof(float) * size);
    for (int t = 1; t < threads; t++)
        for (long i = 0; i < size; i++) y[i] += partial[t * size + i];
done:
    free(count);
    free(slot);
    free(experts);
    free(start);
    free(pair_token);
    free(pair_weight);
    free(partial);
    free(scratch);
    return status;
}
