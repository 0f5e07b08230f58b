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
 * Packed layout, float32 (bits 32; plugins/cpu_experts.py writes it), per expert e and slice s of S (slice s
 * owns the intermediate channels [s*W, (s+1)*W), W = I / S):
 *   gate_up[e, s]: the 2W rows gate_c, up_c (c in the slice, interleaved), in groups of NW = 4 rows, each
 *                  group stored as [H / 8][4][8] (eight columns of each of the four rows in turn);
 *   down[e, s]:    the H rows down_proj[e, h, sW:(s+1)W], in groups of 4 rows stored as [W / 8][4][8].
 * Requires H % 8 == 0 and W % 8 == 0 (the lowering checks).
 *
 * Packed layout, quantized (bits 8 or 4, group size g; plugins/cpu_experts.py pack_quantized): the same rows
 * and slices, in groups of G rows (int8: G = NW = 4; int4: G = NW4 = 8), each row group of K inputs (K = H for
 * gate_up, W for down) stored as K / g blocks, one after the other, each block holding the G rows' g inputs and
 * their scales:
 *   [G x float16 scale d, rows in order] [g / 32 chunks of 32 inputs of the G rows]
 * int8: one signed byte per value (q in [-127, 127]; 8 + 4g bytes per block), a chunk stored as
 * [a 0-15, b 0-15] [a 16-31, b 16-31] [c 0-15, d 0-15] [c 16-31, d 16-31] (16 values each), so one 32-byte load
 * holds the same inputs of two rows. int4: values stored as q + 8 (q in [-8, 7]; 16 + 4g bytes per block), a
 * chunk as four 32-byte pieces j = 0..3, byte 4a + i of piece j holding row a's input 4j + i in its low nibble
 * and input 16 + 4j + i in its high nibble: masking one piece gives four inputs of each of the eight rows, which
 * one broadcast of four x values meets. The weight is q * d (moetrt/quantization.py). Requires g a power of two
 * >= 32, H % g == 0 and W % g == 0. A thread reads each expert slice as one sequential stream.
 *
 * Quantized compute (llama.cpp's Q8_0 x Q8_0 and Q4_0 x Q8_0 scheme): each token row entering a matrix (x, and
 * SwiGLU's output before down) is quantized to int8 per block of g inputs, d_x = max|x| / 127 (with the block's
 * sum of x_q); a block's dot product is summed in int32 (AVX2: _mm256_maddubs_epi16 on |w| and x signed by w for
 * int8, on the unsigned nibbles as they are for int4, then _mm256_madd_epi16; AVX-VNNI and AVX-512 VNNI with VL:
 * _mm256_dpbusd_epi32) and added in float as int_sum * d_w * d_x. int4 nibbles hold q + 8, so 8 * sum(x_q) is
 * taken off each block's sum. Without AVX2 (x86-64-v2, aarch64) the same arithmetic runs as plain C loops.
 * Chosen over dequantizing the weights to float in registers and multiplying float x (exact, no activation
 * rounding) because it measured faster on AVX2 (Zen 3, ds-mini's experts; the variant, not kept, through
 * bench/quant_kernel.py --library): one expert cached, one row, 1.3x (int8) and 2.7x (int4) the rate; seven
 * layers from memory, median ms per call, 1.3x and 3.6x at batch 1, 1.5x and 2.0x at batch 8. At eight rows per
 * expert (prefill) int8 ties and int4 stays 2x. int4's eight-row groups replaced groups of four whose two row
 * pairs shared each 32-byte load and needed horizontal adds per block: one cached expert, one row, 1.35x the
 * rate (bench/NOTES.md "Quantized experts").
 *
 * A slice is a unit of work: thread t of n runs slices t, t + n, ... of every chosen expert, accumulating into
 * its own [T, H] buffer; the buffers are summed at the end. Sums run in a fixed order, so results do not depend
 * on timing (only on S and the thread count).
 *
 * y[t] = sum_j w[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])),  e = ids[t, j]
 *
 * An id of -1 is a pair another process computes (expert parallelism, runtime/parallel): it is skipped, so a rank
 * reads only its own experts' weights and a token none of whose experts are local gets a zero row.
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
/* How far ahead (floats) a float32 row group's stream is prefetched: 1024 (4 KB) against the 256 before, ds-mini's
 * experts from memory, one run: batch 1 1.58 -> 1.38 ms per layer call, batch 8 9.9 -> 8.7 ms (2048 alike). Each
 * step reads 128 bytes, two cache lines, and both are prefetched: one prefetch a step left every other line to the
 * hardware, and both lines at 2048 floats (8 KB) ahead measured, against one at 1024, batch 1 1.93 -> 1.76 and
 * 2.02 -> 1.87 ms per layer call, batch 8 11.1 -> 10.2 and 11.2 -> 10.1 ms, in two runs of bench/quant_kernel.py
 * (Emerald Rapids VM, 2 threads; both lines at 1024, 3072 and 4096 floats ahead fell between). */
#ifndef FPREFETCH
#define FPREFETCH 2048
#endif
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
        __builtin_prefetch(p + FPREFETCH);
        __builtin_prefetch(p + FPREFETCH + 16); /* the step's second cache line */
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

/* ---- quantized weights (bits 8 and 4) ---- */

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define QUANT_AVX2 1
#endif
/* How far ahead (bytes) a quantized row group's stream is prefetched, and into which cache (-D overrides them to
 * compare builds through bench/quant_kernel.py --library). A thread reads each expert slice as one stream at a few
 * GB/s per core: at 768 bytes (12 cache lines) the loads still waited on memory, and the int4 kernel read 13 GB/s
 * of weights with 2 threads where the copy bandwidth was 39 GB/s. 6144 bytes, ds-mini's experts from memory,
 * same run: batch 1 0.367 -> 0.282 ms per layer call (1.30x), batch 8 2.19 -> 1.52 ms (1.44x); 3072 to 12288 and
 * the L2 hint measured alike (bench/NOTES.md). Prefetches past a slice's end are harmless (they never fault). */
#ifndef QHINT
#define QHINT _MM_HINT_T0
#endif
#ifndef QPREFETCH
#define QPREFETCH 6144
#endif
/* token rows per pass over a quantized row group: 4 x R int32 and R float accumulators (a test builds the AVX2
 * path with -DQROW_BLOCK=4 to run the AVX-512 build's row blocking on CPUs without AVX-512) */
#ifndef QROW_BLOCK
#ifdef __AVX512F__
#define QROW_BLOCK 4
#else
#define QROW_BLOCK 2
#endif
#endif

/* Token rows quantized per block of g inputs: q [rows, K] int8 (row stride ld_q), d [rows, K / g] float scales,
 * sum [rows, K / g] int32 sums of each block's q (int4 weights subtract 8 * sum). */
typedef struct {
    const int8_t *q;
    const float *d;
    const int32_t *sum;
    long ld_q, ld_d;
} qrows_t;

/* q = rint(x / d), d = max|x| / 127 per block of g (a zero block gets d = 0, q = 0). */
static void quantize_rows(const float *x, long rows, long ld_x, long K, long g, int8_t *q, float *d, int32_t *sum,
                          long ld_q, long ld_d) {
    for (long r = 0; r < rows; r++)
        for (long b = 0; b < K / g; b++) {
            const float *xb = x + r * ld_x + b * g;
            int8_t *qb = q + r * ld_q + b * g;
            float amax = 0.0f;
            for (long j = 0; j < g; j++) amax = fabsf(xb[j]) > amax ? fabsf(xb[j]) : amax;
            const float scale = amax / 127.0f, inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
            int32_t total = 0;
            for (long j = 0; j < g; j++) {
                const int v = (int)rintf(xb[j] * inverse);
                qb[j] = (int8_t)(v > 127 ? 127 : v < -127 ? -127 : v);
                total += qb[j];
            }
            d[r * ld_d + b] = scale;
            sum[r * ld_d + b] = total;
        }
}

/* Weight rows per packed group: int8 NW, int4 NW4. */
#define NW4 8
static inline long qgroup_rows(int bits) { return bits == 4 ? NW4 : NW; }

/* Bytes of `rows` packed rows of K inputs: per row and block of g, a float16 scale and g * bits / 8 bytes. */
static inline long qmatrix_bytes(long rows, long K, long g, int bits) { return rows * (K / g) * (2 + g * bits / 8); }

#ifdef QUANT_AVX2
/* acc + the sums of four adjacent u8 * s8 products per int32 lane (u unsigned, s signed); without VNNI, for
 * operands whose adjacent pair sums fit int16 (|w| <= 128 and |x| <= 127: 2 * 128 * 127 < 2^15). */
static inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

/* acc + one chunk of a pair of int8 rows (lo = inputs 0-15 of rows a | b, hi = inputs 16-31) against a token
 * row's chunk (x_lo = its inputs 0-15 in both halves, x_hi = 16-31): int32 lanes [a a a a | b b b b]. maddubs
 * takes one unsigned operand: |w| against x carrying w's sign (llama.cpp's trick). */
static inline __m256i pair_dot(__m256i acc, __m256i lo, __m256i hi, __m256i x_lo, __m256i x_hi) {
    return dot_u8s8(dot_u8s8(acc, _mm256_sign_epi8(lo, lo), _mm256_sign_epi8(x_lo, lo)), _mm256_sign_epi8(hi, hi),
                    _mm256_sign_epi8(x_hi, hi));
}

/* One int8 row group (NW rows, K inputs, layout above) against R token rows: out[r * ld_out + a] =
 * dot(row a, x[r]). Each pair of rows is summed in int32 lanes over a block, the two pairs folded into
 * [a a c c | b b d d] and added in float with d_w * d_x; the lane pairs are added at the end. */
static inline __attribute__((always_inline)) void qgroup_dot(const uint8_t *p, long K, long g, const qrows_t *x,
                                                             float *out, long ld_out, const int R) {
    const int bits = 8;
    const __m256i lane_scales = _mm256_setr_epi32(0, 0, 2, 2, 1, 1, 3, 3);
    __m256 acc[QROW_BLOCK];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (long b = 0; b < K / g; b++) {
        const __m256 dw = _mm256_permutevar8x32_ps(
            _mm256_castps128_ps256(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)p))), lane_scales);
        p += 8;
        __m256i sums[2][QROW_BLOCK];
        for (int r = 0; r < R; r++) sums[0][r] = sums[1][r] = _mm256_setzero_si256();
        for (long c = 0; c < g; c += 32, p += 16 * bits) {
            _mm_prefetch((const char *)p + QPREFETCH, QHINT);
            _mm_prefetch((const char *)p + QPREFETCH + 64, QHINT);
            __m256i lo[2], hi[2];
            for (int pair = 0; pair < 2; pair++) {
                lo[pair] = _mm256_loadu_si256((const __m256i *)(p + 64 * pair));
                hi[pair] = _mm256_loadu_si256((const __m256i *)(p + 64 * pair + 32));
            }
            for (int r = 0; r < R; r++) {
                const int8_t *xc = x->q + r * x->ld_q + b * g + c;
                const __m256i x_lo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)xc));
                const __m256i x_hi = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(xc + 16)));
                for (int pair = 0; pair < 2; pair++)
                    sums[pair][r] = pair_dot(sums[pair][r], lo[pair], hi[pair], x_lo, x_hi);
            }
        }
        for (int r = 0; r < R; r++) {
            const __m256i v = _mm256_hadd_epi32(sums[0][r], sums[1][r]); /* [a a c c | b b d d] */
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_mul_ps(dw, _mm256_set1_ps(x->d[r * x->ld_d + b])),
                                     acc[r]);
        }
    }
    for (int r = 0; r < R; r++) { /* [a a c c] + [b b d d] pairwise: [a c b d] */
        const __m128 acbd = _mm_hadd_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
        _mm_storeu_ps(out + r * ld_out, _mm_shuffle_ps(acbd, acbd, _MM_SHUFFLE(3, 1, 2, 0)));
    }
}

/* One int4 row group (NW4 rows, K inputs, layout above) against R token rows: out[r * ld_out + a] =
 * dot(row a, x[r]). Each 32-byte load holds four inputs of each of the eight rows, its nibbles maddubs's
 * unsigned operand as they are, against those four inputs of x broadcast: the products land in each row's own
 * lanes, so a chunk's eight loads add up lane by lane (in int16 without VNNI: 8 * 2 * 15 * 127 < 2^15) and one
 * madd widens them to int32 [a b c d e f g h]; no horizontal sums. A block's sum loses 8 * sum(x_q) (the nibbles
 * hold q + 8) and is added in float with d_w * d_x. */
static inline __attribute__((always_inline)) void qgroup_dot4(const uint8_t *p, long K, long g, const qrows_t *x,
                                                              float *out, long ld_out, const int R) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    __m256 acc[QROW_BLOCK];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (long b = 0; b < K / g; b++) {
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
        p += 2 * NW4;
        __m256i sums[QROW_BLOCK];
        for (int r = 0; r < R; r++) sums[r] = _mm256_setzero_si256();
        for (long c = 0; c < g; c += 32, p += 16 * NW4) {
            _mm_prefetch((const char *)p + QPREFETCH, QHINT);
            _mm_prefetch((const char *)p + QPREFETCH + 64, QHINT);
#if !defined(__AVX512VNNI__) && !defined(__AVXVNNI__)
            __m256i sum16[QROW_BLOCK];
            for (int r = 0; r < R; r++) sum16[r] = _mm256_setzero_si256();
#endif
            for (int j = 0; j < 4; j++) { /* inputs 4j..4j+3 in the low nibbles, 16+4j..16+4j+3 in the high */
                const __m256i packed = _mm256_loadu_si256((const __m256i *)(p + 32 * j));
                const __m256i lo = _mm256_and_si256(packed, low4);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low4);
                for (int r = 0; r < R; r++) {
                    const int8_t *xc = x->q + r * x->ld_q + b * g + c + 4 * j;
                    int32_t x_lo, x_hi;
                    memcpy(&x_lo, xc, 4);
                    memcpy(&x_hi, xc + 16, 4);
#if defined(__AVX512VNNI__) || defined(__AVXVNNI__)
                    sums[r] = dot_u8s8(dot_u8s8(sums[r], lo, _mm256_set1_epi32(x_lo)), hi, _mm256_set1_epi32(x_hi));
#else
                    sum16[r] = _mm256_add_epi16(sum16[r],
                                                _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(x_lo)),
                                                                 _mm256_maddubs_epi16(hi, _mm256_set1_epi32(x_hi))));
#endif
                }
            }
#if !defined(__AVX512VNNI__) && !defined(__AVXVNNI__)
            for (int r = 0; r < R; r++)
                sums[r] = _mm256_add_epi32(sums[r], _mm256_madd_epi16(sum16[r], _mm256_set1_epi16(1)));
#endif
        }
        for (int r = 0; r < R; r++) {
            const long at = r * x->ld_d + b;
            const __m256i v = _mm256_sub_epi32(sums[r], _mm256_set1_epi32(8 * x->sum[at]));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_mul_ps(dw, _mm256_set1_ps(x->d[at])), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) _mm256_storeu_ps(out + r * ld_out, acc[r]);
}
#else
static inline float half_to_float(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
    if (exponent == 0) { /* zero and subnormals */
        const float v = ldexpf((float)mantissa, -24);
        return sign ? -v : v;
    }
    const uint32_t bits = sign | ((exponent == 31 ? 255 : exponent + 112) << 23) | (mantissa << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* The portable versions of qgroup_dot and qgroup_dot4 above: the same integer sums, as plain loops the
 * compiler vectorizes. */
static inline __attribute__((always_inline)) void qgroup_dot(const uint8_t *p, long K, long g, const qrows_t *x,
                                                             float *out, long ld_out, const int R) {
    const int bits = 8;
    const long chunk = 32;
    float acc[NW][QROW_BLOCK] = {{0}};
    for (long b = 0; b < K / g; b++) {
        float dw[NW];
        for (int a = 0; a < NW; a++) dw[a] = half_to_float(p + 2 * a);
        p += 8;
        for (int r = 0; r < R; r++) {
            const int8_t *xb = x->q + r * x->ld_q + b * g;
            int32_t sums[NW] = {0};
            for (long c = 0; c < g; c += 32) {
                const uint8_t *w = p + (c / 32) * NW * chunk;
                for (int a = 0; a < NW; a++) { /* rows a, a ^ 1 share 32 bytes: [a 0-15, b 0-15] [a 16-31, b 16-31] */
                    const int8_t *lo = (const int8_t *)w + 64 * (a / 2) + 16 * (a % 2), *hi = lo + 32;
                    int32_t s = 0;
                    for (int j = 0; j < 16; j++) s += lo[j] * xb[c + j] + hi[j] * xb[c + 16 + j];
                    sums[a] += s;
                }
            }
            const float dx = x->d[r * x->ld_d + b];
            for (int a = 0; a < NW; a++) acc[a][r] += (float)sums[a] * (dw[a] * dx);
        }
        p += NW * g * bits / 8;
    }
    for (int r = 0; r < R; r++)
        for (int a = 0; a < NW; a++) out[r * ld_out + a] = acc[a][r];
}

static inline __attribute__((always_inline)) void qgroup_dot4(const uint8_t *p, long K, long g, const qrows_t *x,
                                                              float *out, long ld_out, const int R) {
    float acc[NW4][QROW_BLOCK] = {{0}};
    for (long b = 0; b < K / g; b++) {
        float dw[NW4];
        for (int a = 0; a < NW4; a++) dw[a] = half_to_float(p + 2 * a);
        p += 2 * NW4;
        for (int r = 0; r < R; r++) {
            const int8_t *xb = x->q + r * x->ld_q + b * g;
            int32_t sums[NW4] = {0};
            for (long c = 0; c < g; c += 32) {
                const uint8_t *w = p + (c / 32) * 16 * NW4;
                for (int j = 0; j < 4; j++) /* bytes [j][row a][i]: inputs 4j + i (low nibble), 16 + 4j + i (high) */
                    for (int a = 0; a < NW4; a++)
                        for (int i = 0; i < 4; i++) {
                            const uint8_t v = w[32 * j + 4 * a + i];
                            sums[a] += ((v & 15) - 8) * xb[c + 4 * j + i] + ((v >> 4) - 8) * xb[c + 16 + 4 * j + i];
                        }
            }
            const float dx = x->d[r * x->ld_d + b];
            for (int a = 0; a < NW4; a++) acc[a][r] += (float)sums[a] * (dw[a] * dx);
        }
        p += NW4 * g / 2;
    }
    for (int r = 0; r < R; r++)
        for (int a = 0; a < NW4; a++) out[r * ld_out + a] = acc[a][r];
}
#endif

/* out[r, j] = dot(row j, x[r]) for the n_out rows of a quantized packed block, r < rows. */
static void packed_qdot(const uint8_t *packed, long n_out, long K, long g, int bits, const qrows_t *x, int rows,
                        float *out, long ld_out) {
    const long rows_per_group = qgroup_rows(bits), group_bytes = qmatrix_bytes(rows_per_group, K, g, bits);
    for (long group = 0; group < n_out / rows_per_group; group++) {
        const uint8_t *p = packed + group * group_bytes;
        for (int r0 = 0; r0 < rows; r0 += QROW_BLOCK) { /* later row blocks re-read the group from cache */
            const qrows_t xr = {x->q + r0 * x->ld_q, x->d + r0 * x->ld_d, x->sum + r0 * x->ld_d, x->ld_q, x->ld_d};
            float *o = out + r0 * ld_out + group * rows_per_group;
            const int R = rows - r0 < QROW_BLOCK ? rows - r0 : QROW_BLOCK;
#define QDOT(N) qgroup_dot(p, K, g, &xr, o, ld_out, N)
#define QDOT4(N) qgroup_dot4(p, K, g, &xr, o, ld_out, N)
#if QROW_BLOCK == 4
#define QDOT_ROWS (R == 1 ? QDOT(1) : R == 2 ? QDOT(2) : R == 3 ? QDOT(3) : QDOT(4))
#define QDOT4_ROWS (R == 1 ? QDOT4(1) : R == 2 ? QDOT4(2) : R == 3 ? QDOT4(3) : QDOT4(4))
#else
#define QDOT_ROWS (R == 1 ? QDOT(1) : QDOT(2))
#define QDOT4_ROWS (R == 1 ? QDOT4(1) : QDOT4(2))
#endif
            if (bits == 8)
                QDOT_ROWS;
            else
                QDOT4_ROWS;
#undef QDOT4_ROWS
#undef QDOT_ROWS
#undef QDOT4
#undef QDOT
        }
    }
}

typedef struct {
    const float *x;
    const void *gate_up, *down;
    long tokens, hidden, inter, slices, bits, group;
    int threads;
    /* routing grouped by expert: experts[i] owns pairs [start[i], start[i+1]) */
    int n_active;
    const int32_t *experts, *start, *pair_token;
    const float *pair_weight;
    qrows_t xq;     /* bits 8/4: every token row of x quantized, [T, H] */
    float *partial; /* [threads, tokens, hidden] */
    char *scratch;  /* per thread: gathered rows, gate/up, activations, expert output */
    long scratch_per_thread, max_rows;
} job_t;

static inline float swiglu(float g, float u, float w) { return w * (g / (1.0f + expf(-g))) * u; }

static void add_rows(float *out, const int32_t *tokens, const float *y, int rows, long H) {
    for (int r = 0; r < rows; r++) {
        float *dst = out + (long)tokens[r] * H;
        for (long h = 0; h < H; h++) dst[h] += y[r * H + h];
    }
}

static void run_slices_float(const job_t *job, int thread) {
    const long H = job->hidden, S = job->slices, W = job->inter / S;
    float *out = job->partial + (long)thread * job->tokens * H;
    float *xs = (float *)(job->scratch + thread * job->scratch_per_thread); /* [R, H] */
    float *gu = xs + job->max_rows * H;                                     /* [R, 2W] */
    float *act = gu + job->max_rows * 2 * W;                                /* [R, W] */
    float *y = act + job->max_rows * W;                                     /* [R, H] */
    const float *gate_up = job->gate_up, *down = job->down;
    for (int i = 0; i < job->n_active; i++) {
        const long e = job->experts[i];
        const int p0 = job->start[i], rows = job->start[i + 1] - p0;
        for (int r = 0; r < rows; r++)
            memcpy(xs + r * H, job->x + (long)job->pair_token[p0 + r] * H, sizeof(float) * H);
        for (long s = thread; s < S; s += job->threads) {
            packed_dot(gate_up + (e * S + s) * 2 * W * H, 2 * W, H, xs, H, rows, gu, 2 * W);
            for (int r = 0; r < rows; r++)
                for (long c = 0; c < W; c++)
                    act[r * W + c] = swiglu(gu[r * 2 * W + 2 * c], gu[r * 2 * W + 2 * c + 1], job->pair_weight[p0 + r]);
            packed_dot(down + (e * S + s) * H * W, H, W, act, W, rows, y, H);
            add_rows(out, job->pair_token + p0, y, rows, H);
        }
    }
}

/* Bytes of scratch per row: 64-byte aligned pieces, as run_slices_quantized cuts them. */
static long align64(long n) { return (n + 63) & ~63L; }

static void run_slices_quantized(const job_t *job, int thread) {
    const long H = job->hidden, S = job->slices, W = job->inter / S, g = job->group, R = job->max_rows;
    const int bits = (int)job->bits;
    const long gate_up_bytes = qmatrix_bytes(2 * W, H, g, bits), down_bytes = qmatrix_bytes(H, W, g, bits);
    float *out = job->partial + (long)thread * job->tokens * H;
    char *at = job->scratch + thread * job->scratch_per_thread;
    int8_t *xq = (int8_t *)at;                    /* [R, H] */
    float *xd = (float *)(at += align64(R * H));  /* [R, H / g] */
    int32_t *xs = (int32_t *)(at += align64(4 * R * (H / g)));
    float *gu = (float *)(at += align64(4 * R * (H / g))); /* [R, 2W] */
    float *act = (float *)(at += align64(4 * R * 2 * W));  /* [R, W] */
    int8_t *aq = (int8_t *)(at += align64(4 * R * W));    /* [R, W] */
    float *ad = (float *)(at += align64(R * W));          /* [R, W / g] */
    int32_t *as = (int32_t *)(at += align64(4 * R * (W / g)));
    float *y = (float *)(at += align64(4 * R * (W / g))); /* [R, H] */
    const qrows_t x_rows = {xq, xd, xs, H, H / g}, act_rows = {aq, ad, as, W, W / g};
    for (int i = 0; i < job->n_active; i++) {
        const long e = job->experts[i];
        const int p0 = job->start[i], rows = job->start[i + 1] - p0;
        for (int r = 0; r < rows; r++) {
            const long t = job->pair_token[p0 + r];
            memcpy(xq + r * H, job->xq.q + t * H, H);
            memcpy(xd + r * (H / g), job->xq.d + t * (H / g), sizeof(float) * (H / g));
            memcpy(xs + r * (H / g), job->xq.sum + t * (H / g), sizeof(int32_t) * (H / g));
        }
        for (long s = thread; s < S; s += job->threads) {
            packed_qdot((const uint8_t *)job->gate_up + (e * S + s) * gate_up_bytes, 2 * W, H, g, bits, &x_rows, rows,
                        gu, 2 * W);
            for (int r = 0; r < rows; r++)
                for (long c = 0; c < W; c++)
                    act[r * W + c] = swiglu(gu[r * 2 * W + 2 * c], gu[r * 2 * W + 2 * c + 1], job->pair_weight[p0 + r]);
            quantize_rows(act, rows, W, W, g, aq, ad, as, W, W / g);
            packed_qdot((const uint8_t *)job->down + (e * S + s) * down_bytes, H, W, g, bits, &act_rows, rows, y, H);
            add_rows(out, job->pair_token + p0, y, rows, H);
        }
    }
}

static long scratch_bytes(long rows, long H, long W, long bits, long g) {
    if (bits == 32) return sizeof(float) * (rows * (2 * H + 3 * W) + 16);
    return align64(rows * H) + 2 * align64(4 * rows * (H / g)) + align64(4 * rows * 2 * W) + align64(4 * rows * W) +
           align64(rows * W) + 2 * align64(4 * rows * (W / g)) + align64(4 * rows * H);
}

static void run_slices(const job_t *job, int thread) {
    memset(job->partial + (long)thread * job->tokens * job->hidden, 0, sizeof(float) * job->tokens * job->hidden);
    if (job->bits == 32)
        run_slices_float(job, thread);
    else
        run_slices_quantized(job, thread);
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

int moetrt_experts_abi(void) { return 5; }

/* A caller's parallel loop (moetrt_experts_on): run fn(arg, i) for every i in [0, n), on any threads, and return
 * when all have run. ONNX Runtime's KernelContext_ParallelFor has this shape (plugins/ort_experts_op.c). */
typedef void (*moetrt_parallel_for)(void *context, void (*fn)(void *, size_t), void *arg, size_t n);

static void run_slices_thunk(void *job, size_t thread) { run_slices((const job_t *)job, (int)thread); }

static int layout_holds(long hidden, long inter, long slices, long bits, long group) {
    if (hidden < 8 || slices < 1 || inter % slices) return 0;
    const long width = inter / slices;
    if (bits == 32) return hidden % 8 == 0 && width % 8 == 0;
    if (bits != 8 && bits != 4) return 0;
    return group >= 32 && (group & (group - 1)) == 0 && hidden % group == 0 && width % group == 0;
}

/* y[T, H] = the routed experts of x[T, H] (ids/weights [T, k]; packed weights as above: float32 for bits 32,
 * bytes for bits 8 and 4 with group size `group`). Returns 0, or -1 for bad arguments (an id out of range other than -1, which skips the pair,
 * sizes the layout cannot hold), -2 out of memory, -3 when the worker threads could not start. */
int moetrt_experts_on(const float *x, const int32_t *ids, const float *weights, const void *gate_up, const void *down,
                      float *y, long tokens, long top_k, long num_experts, long hidden, long inter, long slices,
                      long bits, long group, int threads, moetrt_parallel_for parallel_for, void *context);

int moetrt_experts(const float *x, const int32_t *ids, const float *weights, const void *gate_up, const void *down,
                   float *y, long tokens, long top_k, long num_experts, long hidden, long inter, long slices,
                   long bits, long group, int threads) {
    return moetrt_experts_on(x, ids, weights, gate_up, down, y, tokens, top_k, num_experts, hidden, inter, slices,
                             bits, group, threads, NULL, NULL);
}

/* moetrt_experts with the slices run by the caller's `parallel_for` (with `context`), `threads` ways, instead of
 * this library's pool: inside an inference engine's graph, the engine's own threads run them and no second pool
 * competes with its threads for the cores. NULL: the pool, as moetrt_experts. */
int moetrt_experts_on(const float *x, const int32_t *ids, const float *weights, const void *gate_up, const void *down,
                      float *y, long tokens, long top_k, long num_experts, long hidden, long inter, long slices,
                      long bits, long group, int threads, moetrt_parallel_for parallel_for, void *context) {
    if (tokens < 0 || top_k < 1 || num_experts < 1 || !layout_holds(hidden, inter, slices, bits, group) ||
        threads < 1 || threads > MAX_THREADS)
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
    float *partial = NULL;
    char *scratch = NULL;
    int8_t *x_q = NULL;
    float *x_d = NULL;
    int32_t *x_sum = NULL;
    if (!count || !slot || !experts || !start || !pair_token || !pair_weight) {
        status = -2;
        goto done;
    }
    for (long p = 0; p < pairs; p++) {
        if (ids[p] == -1) continue;
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
        if (ids[p] == -1) continue;
        const int32_t at = slot[ids[p]]++;
        pair_token[at] = (int32_t)(p / top_k);
        pair_weight[at] = weights[p];
    }
    const long per_thread = align64(scratch_bytes(max_rows, hidden, inter / slices, bits, group));
    partial = malloc(sizeof(float) * threads * tokens * hidden);
    scratch = malloc(threads * per_thread);
    if (!partial || !scratch) {
        status = -2;
        goto done;
    }
    qrows_t xq = {NULL, NULL, NULL, hidden, 0};
    if (bits != 32) { /* each token row quantized once, whichever experts it goes to */
        const long blocks = hidden / group;
        x_q = malloc(tokens * hidden);
        x_d = malloc(sizeof(float) * tokens * blocks);
        x_sum = malloc(sizeof(int32_t) * tokens * blocks);
        if (!x_q || !x_d || !x_sum) {
            status = -2;
            goto done;
        }
        quantize_rows(x, tokens, hidden, hidden, group, x_q, x_d, x_sum, hidden, blocks);
        xq = (qrows_t){x_q, x_d, x_sum, hidden, blocks};
    }
    job_t job = {x, gate_up, down, tokens, hidden, inter, slices, bits, group, threads, n_active, experts, start,
                 pair_token, pair_weight, xq, partial, scratch, per_thread, max_rows};
    if (parallel_for != NULL) {
        parallel_for(context, run_slices_thunk, &job, (size_t)threads);
    } else {
        pthread_mutex_lock(&call_lock); /* one call at a time through the pool */
        if (ensure_workers(threads - 1) != 0) {
            pthread_mutex_unlock(&call_lock);
            status = -3;
            goto done;
        }
        run_parallel(&job);
        pthread_mutex_unlock(&call_lock);
    }
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
    free(x_q);
    free(x_d);
    free(x_sum);
    return status;
}
