/* y = x @ deq(W).T for a 4-bit weight in bitsandbytes' stored layout, without a dense weight.
 *
 * Built by cpm_live/quant/native.py with -mavx2 -mfma (-fopenmp when the compiler has it), loaded
 * with ctypes, called by cpm_live/quant/gemv.py for inference on few rows (decoding).
 *
 * Layout (the checkpoint's own): value i of the row-major [dim_out, dim_in] weight is nibble i of
 * `packed` (even i: the high nibble), a 16-entry level table `code` gives its value, and block
 * i / blocksize scales it by its absmax. Blocks run over the flattened weight; the caller only
 * sends weights whose rows are whole blocks (dim_in % blocksize == 0, blocksize % 32 == 0), so row n
 * owns blocks n * dim_in / blocksize and on. With double quantization the absmax of block b is
 * nested_code[qabsmax[b]] * nested_absmax[b / nested_blocksize] + offset, in fp32, two roundings
 * (no fused multiply-add: -ffp-contract=off), exactly as the dequantization computes it.
 *
 * Decoding 32 values (16 bytes): the bytes go to both 128-bit lanes, lane 0 keeps the low nibbles
 * and lane 1 the high ones, and vpshufb looks each nibble up in four 16-byte tables, one per byte
 * of the fp32 levels; byte and word unpacks put the four bytes of each level together. vpshufb and
 * the unpacks are single-cycle in-lane shuffles, cheaper than the two cross-lane vpermps and a
 * blend per 8 values of an 8-entry lookup. The levels come out in a fixed order within each
 * 32 values (see x_order), so x is copied into that order once per call rather than the levels
 * being reordered for every weight.
 *
 * Per block, x . levels is accumulated and multiplied by the block's absmax once, so the result
 * differs from "dequantize, then matmul" only by rounding order (checked against the exact product
 * in tests/unit/quant/test_gemv.py). Rows of x go in tiles of up to 4, so each decoded level serves
 * up to 4 rows; output rows n go to `threads` OpenMP threads 32 at a time, as each thread becomes free
 * (each writes only its own outputs), so a thread that the machine's other work delays holds up
 * the call by one chunk, not by its fixed share.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef struct {
    const float *absmax;         /* [blocks] fp32, or NULL when double-quantized */
    const uint8_t *qabsmax;      /* [blocks] 8-bit codes of the absmax (double quant) */
    const float *nested_code;    /* [256] */
    const float *nested_absmax;  /* [ceil(blocks / nested_blocksize)] */
    long long nested_blocksize;
    float offset;
} Scales;

static inline float block_scale(const Scales *s, long long b) {
    if (s->absmax) return s->absmax[b];
    float scaled = s->nested_code[s->qabsmax[b]] * s->nested_absmax[b / s->nested_blocksize];
    return scaled + s->offset;
}

typedef struct {
    __m256i byte[4];     /* byte c of level j at position j, in both lanes */
    __m256i low4;        /* 0x0F in every byte */
    __m256i lane_shift;  /* 0 in lane 0 (low nibbles), 4 in lane 1 (high nibbles) */
} Lookup;

/* The 32 levels of the nibbles in the 16 bytes at p, as 4 x 8 floats: f[i] holds, for e < 4, the
 * level of value 2 * (4i + e) + 1 at lane position e and of value 2 * (4i + e) at position 4 + e. */
static inline void decode32(const uint8_t *p, const Lookup *t, __m256 f[4]) {
    __m256i raw = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
    __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(raw, t->lane_shift), t->low4);
    __m256i b0 = _mm256_shuffle_epi8(t->byte[0], idx), b1 = _mm256_shuffle_epi8(t->byte[1], idx);
    __m256i b2 = _mm256_shuffle_epi8(t->byte[2], idx), b3 = _mm256_shuffle_epi8(t->byte[3], idx);
    __m256i lo01 = _mm256_unpacklo_epi8(b0, b1), hi01 = _mm256_unpackhi_epi8(b0, b1);
    __m256i lo23 = _mm256_unpacklo_epi8(b2, b3), hi23 = _mm256_unpackhi_epi8(b2, b3);
    f[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(lo01, lo23));
    f[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(lo01, lo23));
    f[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(hi01, hi23));
    f[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(hi01, hi23));
}

/* Copies `rows` rows of x into the order decode32 yields the levels in, 32 values at a time. */
static void x_order(const float *x, long long rows, long long x_stride, long long dim_in, float *dst) {
    for (long long m = 0; m < rows; ++m)
        for (long long g = 0; g < dim_in; g += 32) {
            const float *src = x + m * x_stride + g;
            float *out = dst + m * dim_in + g;
            for (int i = 0; i < 4; ++i)
                for (int e = 0; e < 4; ++e) {
                    out[8 * i + e] = src[2 * (4 * i + e) + 1];
                    out[8 * i + 4 + e] = src[2 * (4 * i + e)];
                }
        }
}

static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* One output n for MR rows of the reordered x (row stride dim_in); NACC accumulators per row and
 * block, so one row still has four independent chains of FMAs. */
#define DEFINE_TILE(MR, NACC)                                                                          \
    static void tile##MR(const float *x, long long dim_in, const uint8_t *w, long long blocks,         \
                         long long blocksize, const float *scale, const Lookup *t, float *out,          \
                         long long out_stride) {                                                        \
        __m256 total[MR];                                                                              \
        for (int m = 0; m < MR; ++m) total[m] = _mm256_setzero_ps();                                   \
        for (long long b = 0; b < blocks; ++b) {                                                       \
            const uint8_t *wb = w + b * blocksize / 2;                                                 \
            const float *xb = x + b * blocksize;                                                       \
            __m256 acc[MR][NACC];                                                                      \
            for (int m = 0; m < MR; ++m)                                                               \
                for (int a = 0; a < NACC; ++a) acc[m][a] = _mm256_setzero_ps();                        \
            for (long long k = 0; k < blocksize; k += 32) {                                            \
                __m256 f[4];                                                                           \
                decode32(wb + k / 2, t, f);                                                            \
                for (int i = 0; i < 4; ++i)                                                            \
                    for (int m = 0; m < MR; ++m)                                                       \
                        acc[m][i % NACC] = _mm256_fmadd_ps(_mm256_loadu_ps(xb + m * dim_in + k + 8 * i), \
                                                           f[i], acc[m][i % NACC]);                    \
            }                                                                                          \
            __m256 s = _mm256_set1_ps(scale[b]);                                                       \
            for (int m = 0; m < MR; ++m) {                                                             \
                __m256 dot = acc[m][0];                                                                \
                for (int a = 1; a < NACC; ++a) dot = _mm256_add_ps(dot, acc[m][a]);                    \
                total[m] = _mm256_fmadd_ps(dot, s, total[m]);                                          \
            }                                                                                          \
        }                                                                                              \
        for (int m = 0; m < MR; ++m) out[m * out_stride] = sum8(total[m]);                             \
    }

DEFINE_TILE(1, 4)
DEFINE_TILE(2, 2)
DEFINE_TILE(3, 2)
DEFINE_TILE(4, 2)

static __m256i level_bytes(const float *code, int c) {
    uint8_t bytes[16];
    for (int j = 0; j < 16; ++j) {
        uint32_t bits;
        memcpy(&bits, code + j, 4);
        bytes[j] = (uint8_t)(bits >> (8 * c));
    }
    return _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)bytes));
}

/* out[m, n] = sum_k x[m, k] * deq(W)[n, k] for m < rows, n < dim_out (fp32 in, fp32 out).
 * Returns 0, or -1 when its scratch (the reordered x, one row of absmax per thread) could not be
 * allocated; then `out` is not written. */
int cpm_gemv_4bit(const float *x, long long rows, long long x_stride, const uint8_t *packed, long long dim_out,
                  long long dim_in, const float *code, const float *absmax, const uint8_t *qabsmax,
                  const float *nested_code, const float *nested_absmax, long long nested_blocksize, float offset,
                  long long blocksize, float *out, long long out_stride, int threads) {
    const Scales scales = {absmax, qabsmax, nested_code, nested_absmax, nested_blocksize, offset};
    Lookup t;
    for (int c = 0; c < 4; ++c) t.byte[c] = level_bytes(code, c);
    t.low4 = _mm256_set1_epi8(0x0F);
    t.lane_shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
    if (threads < 1) threads = 1;
    const long long blocks = dim_in / blocksize;
    float *scratch = malloc(sizeof(float) * (rows * dim_in + threads * blocks));
    if (!scratch) return -1;
    float *xr = scratch;
    x_order(x, rows, x_stride, dim_in, xr);
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        float *scale = scratch + rows * dim_in + omp_get_thread_num() * blocks;
#else
        float *scale = scratch + rows * dim_in;
#endif
#pragma omp for schedule(dynamic, 32)
        for (long long n = 0; n < dim_out; ++n) {
            const uint8_t *w = packed + n * (dim_in / 2);
            for (long long b = 0; b < blocks; ++b) scale[b] = block_scale(&scales, n * blocks + b);
            for (long long m = 0; m < rows; m += 4) {
                const float *xm = xr + m * dim_in;
                float *om = out + m * out_stride + n;
                switch (rows - m < 4 ? rows - m : 4) {
                case 1: tile1(xm, dim_in, w, blocks, blocksize, scale, &t, om, out_stride); break;
                case 2: tile2(xm, dim_in, w, blocks, blocksize, scale, &t, om, out_stride); break;
                case 3: tile3(xm, dim_in, w, blocks, blocksize, scale, &t, om, out_stride); break;
                default: tile4(xm, dim_in, w, blocks, blocksize, scale, &t, om, out_stride); break;
                }
            }
        }
    }
    free(scratch);
    return 0;
}
