/* y = x @ deq(W).T for a 4-bit weight in bitsandbytes' stored layout, without a dense weight.
 *
 * Built by cpm_live/quant/native.py with -mavx2 -mfma (-fopenmp when the compiler has it), loaded
 * with ctypes, called by cpm_live/quant/gemv.py for inference on few rows (decoding).
 *
 * Layout (the checkpoint's own): value i of the row-major [dim_out, dim_in] weight is nibble i of
 * `packed` (even i: the high nibble), a 16-entry level table `code` gives its value, and block
 * i / blocksize scales it by its absmax. Blocks run over the flattened weight; the caller only
 * sends weights whose rows are whole blocks (dim_in % blocksize == 0, blocksize % 16 == 0), so row n
 * owns blocks n * dim_in / blocksize and on. With double quantization the absmax of block b is
 * nested_code[qabsmax[b]] * nested_absmax[b / nested_blocksize] + offset, in fp32, two roundings
 * (no fused multiply-add: -ffp-contract=off), exactly as the dequantization computes it.
 *
 * Decoding 8 values: the 4 bytes that hold them are broadcast to 8 lanes and shifted so each
 * lane's nibble sits in its low bits; vpermps looks the low 3 bits up in levels 0-7 and in 8-15,
 * and the nibble's bit 3 (moved to the sign bit) picks one. Per block, x . levels is accumulated
 * and multiplied by the block's absmax once, so the result differs from "dequantize, then
 * matmul" only by rounding order (checked against the exact product in tests/test_gemv.py).
 *
 * Rows of x go in tiles of up to 4, so each 8 decoded levels serve up to 4 rows; output rows n are
 * split over `threads` OpenMP threads (each writes only its own outputs).
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

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

/* Levels of the 8 values whose nibbles are the 4 bytes at p (value order: high nibble first). */
static inline __m256 decode8(const uint8_t *p, __m256 levels_lo, __m256 levels_hi, __m256i shifts) {
    uint32_t word;
    memcpy(&word, p, 4);
    __m256i index = _mm256_srlv_epi32(_mm256_set1_epi32((int)word), shifts);
    __m256 lo = _mm256_permutevar8x32_ps(levels_lo, index);
    __m256 hi = _mm256_permutevar8x32_ps(levels_hi, index);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(index, 28)));
}

static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* One output n for MR rows of x. One row keeps two accumulators per block (two chains of FMAs);
 * several rows are independent chains already. */
#define DEFINE_TILE(MR, NACC)                                                                          \
    static void tile##MR(const float *x, long long x_stride, const uint8_t *w, long long first_block,  \
                         long long blocks, long long blocksize, const Scales *scales, __m256 levels_lo,  \
                         __m256 levels_hi, __m256i shifts, float *out, long long out_stride) {          \
        __m256 total[MR];                                                                              \
        for (int m = 0; m < MR; ++m) total[m] = _mm256_setzero_ps();                                   \
        for (long long b = 0; b < blocks; ++b) {                                                       \
            const uint8_t *wb = w + b * blocksize / 2;                                                 \
            const float *xb = x + b * blocksize;                                                       \
            __m256 acc[MR][NACC];                                                                      \
            for (int m = 0; m < MR; ++m)                                                               \
                for (int a = 0; a < NACC; ++a) acc[m][a] = _mm256_setzero_ps();                        \
            for (long long k = 0; k < blocksize; k += 8 * NACC) {                                      \
                for (int a = 0; a < NACC; ++a) {                                                       \
                    __m256 levels = decode8(wb + k / 2 + 4 * a, levels_lo, levels_hi, shifts);        \
                    for (int m = 0; m < MR; ++m)                                                       \
                        acc[m][a] = _mm256_fmadd_ps(_mm256_loadu_ps(xb + m * x_stride + k + 8 * a),   \
                                                    levels, acc[m][a]);                                \
                }                                                                                      \
            }                                                                                          \
            __m256 scale = _mm256_set1_ps(block_scale(scales, first_block + b));                       \
            for (int m = 0; m < MR; ++m) {                                                             \
                __m256 dot = acc[m][0];                                                                \
                for (int a = 1; a < NACC; ++a) dot = _mm256_add_ps(dot, acc[m][a]);                    \
                total[m] = _mm256_fmadd_ps(dot, scale, total[m]);                                      \
            }                                                                                          \
        }                                                                                              \
        for (int m = 0; m < MR; ++m) out[m * out_stride] = sum8(total[m]);                             \
    }

DEFINE_TILE(1, 2)
DEFINE_TILE(2, 1)
DEFINE_TILE(3, 1)
DEFINE_TILE(4, 1)

/* out[m, n] = sum_k x[m, k] * deq(W)[n, k] for m < rows, n < dim_out (fp32 in, fp32 out). */
void cpm_gemv_4bit(const float *x, long long rows, long long x_stride, const uint8_t *packed, long long dim_out,
                   long long dim_in, const float *code, const float *absmax, const uint8_t *qabsmax,
                   const float *nested_code, const float *nested_absmax, long long nested_blocksize, float offset,
                   long long blocksize, float *out, long long out_stride, int threads) {
    const Scales scales = {absmax, qabsmax, nested_code, nested_absmax, nested_blocksize, offset};
    const __m256 levels_lo = _mm256_loadu_ps(code), levels_hi = _mm256_loadu_ps(code + 8);
    const __m256i shifts = _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24);
    const long long blocks = dim_in / blocksize;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long long n = 0; n < dim_out; ++n) {
        const uint8_t *w = packed + n * (dim_in / 2);
        for (long long m = 0; m < rows; m += 4) {
            const float *xm = x + m * x_stride;
            float *om = out + m * out_stride + n;
            switch (rows - m < 4 ? rows - m : 4) {
            case 1: tile1(xm, x_stride, w, n * blocks, blocks, blocksize, &scales, levels_lo, levels_hi, shifts,
                          om, out_stride); break;
            case 2: tile2(xm, x_stride, w, n * blocks, blocks, blocksize, &scales, levels_lo, levels_hi, shifts,
                          om, out_stride); break;
            case 3: tile3(xm, x_stride, w, n * blocks, blocks, blocksize, &scales, levels_lo, levels_hi, shifts,
                          om, out_stride); break;
            default: tile4(xm, x_stride, w, n * blocks, blocks, blocksize, &scales, levels_lo, levels_hi, shifts,
                           om, out_stride); break;
            }
        }
    }
}
