/* nuLSQ's unsigned quantization rule and LSQ's quantizer on CPU float32, one pass per direction.
 *
 * Gongyo, Liang, Ambai, Kawakami, Sato, "Learning Non-Uniform Step Sizes for Neural Network
 * Quantization", ACCV 2024. The same operations, in the same precision, as the torch path of
 * lowbit.lsq.quantizers (_half_forward / _half_backward) and lowbit.lsq.segments, so both give
 * bit-identical results:
 *
 *   forward:  k = #{thresholds strictly below z}   (torch.bucketize, right=False)
 *             y = levels[k]
 *   backward: dz  = g * (z >= 0 && z <= c_N)
 *             seg = k + (z > y)                    (0: z <= 0, 1..N: segments, N+1: above c_N)
 *             v   = g (seg N+1), else g * (y - max(z, 0)) (0 in seg 0), in float32
 *             sums[seg] += rint((double)v * 2^S)   (integers below 2^52 in double: exact, so the order
 *                                                   of the additions does not matter)
 *
 * S is chosen by the caller from max |g|, c_N and the element count so that no sum can reach 2^52.
 * Plain C99, compiled without fast-math or FMA contraction (lowbit.core.ckernel).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* number of thresholds strictly below v: a branch-free count for few thresholds, else a branch-free
 * lower bound (the same integer either way) */
static inline int64_t count_below(const float *thr, int64_t n, float v)
{
    if (n <= 16) {
        int64_t c = 0;
        for (int64_t j = 0; j < n; j++)
            c += thr[j] < v;
        return c;
    }
    const float *base = thr;
    int64_t len = n;
    while (len > 1) {
        const int64_t half = len / 2;
        base += (base[half - 1] < v) ? half : 0;
        len -= half;
    }
    return (base - thr) + (*base < v);
}

#define BLOCK 256

void nulsq_forward(const float *restrict z, int64_t len, const float *restrict thr, const float *restrict levels,
                   int64_t n, float *restrict y, uint8_t *restrict k)
{
    if (n > 32) { /* many thresholds (7-8 bits): a lower bound per element */
        for (int64_t i = 0; i < len; i++) {
            const int64_t c = count_below(thr, n, z[i]);
            y[i] = levels[c];
            k[i] = (uint8_t)c;
        }
        return;
    }
    int32_t c[BLOCK]; /* few thresholds: count them over a block of elements at a time (vectorised) */
    for (int64_t start = 0; start < len; start += BLOCK) {
        const int64_t m = len - start < BLOCK ? len - start : BLOCK;
        const float *zb = z + start;
        for (int64_t e = 0; e < m; e++)
            c[e] = 0;
        for (int64_t j = 0; j < n; j++) {
            const float t = thr[j];
            for (int64_t e = 0; e < m; e++)
                c[e] += t < zb[e];
        }
        for (int64_t e = 0; e < m; e++) {
            y[start + e] = levels[c[e]];
            k[start + e] = (uint8_t)c[e];
        }
    }
}

/* LSQ (Esser et al., ICLR 2020) with round half toward zero, as lowbit.lsq.quantizers._LSQFunction:
 * v = x / s, q = sign(c) * ceil(|c| - 0.5) with c = clamp(v, -qn, qp), y = q * s
 * (branch-free selects, so the loops vectorise) */
static inline float lsq_code(float v, float qn, float qp)
{
    const float c = v < -qn ? -qn : (v > qp ? qp : v);
    const float sg = c > 0.0f ? 1.0f : (c < 0.0f ? -1.0f : 0.0f);
    return sg * ceilf(fabsf(c) - 0.5f);
}

void lsq_forward(const float *restrict x, int64_t len, float s, float qn, float qp, float *restrict y)
{
    for (int64_t i = 0; i < len; i++)
        y[i] = lsq_code(x[i] / s, qn, qp) * s;
}

/* dx = g * inside; prod = g * (inside ? q - v : (below ? -qn : qp)); torch sums prod */
void lsq_backward(const float *restrict g, const float *restrict x, int64_t len, float s, float qn, float qp,
                  float *restrict dx, float *restrict prod)
{
    for (int64_t i = 0; i < len; i++) {
        const float v = x[i] / s, gi = g[i];
        const float q = lsq_code(v, qn, qp);
        const float ds = v < -qn ? -qn : (v > qp ? qp : q - v);
        dx[i] = gi * (v < -qn || v > qp ? 0.0f : 1.0f);
        prod[i] = gi * ds;
    }
}

/* |f| as its IEEE bits: every pattern at or above 0x7f800000 is inf or NaN (an integer maximum
 * vectorises, a float one does not) */
static inline uint32_t abs_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u & 0x7fffffffu;
}

/* dz = g * (z >= 0 && z <= c_N) and sums[0..n+1] = the per-segment sums of rint((double)v * scale),
 * v = g above c_N, else g * (y - max(z, 0)) (0 at or below zero). The caller's scale keeps every
 * partial sum an integer below 2^52, so the double additions are exact and their order (blocks,
 * eight interleaved accumulators) does not matter. Returns 1 when some g or z is inf or NaN (the sums
 * are then not used: the caller takes the float fallback), else 0. */
#define LANES 8
#define MAX_SEGMENTS 258 /* n + 2 for n <= 256 */
#define ROUNDER 6755399441055744.0 /* 1.5 * 2^52: (x + R) - R is x rounded half to even, |x| <= 2^51 */
int64_t nulsq_backward(const float *restrict g, const float *restrict z, const float *restrict y,
                       const uint8_t *restrict k, int64_t len, int64_t n, float c_n, double scale,
                       float *restrict dz, double *restrict sums)
{
    double acc[LANES][MAX_SEGMENTS];
    double term[BLOCK];
    int32_t seg[BLOCK];
    uint32_t bits = 0;
    for (int64_t l = 0; l < LANES; l++)
        for (int64_t j = 0; j < n + 2; j++)
            acc[l][j] = 0.0;
    const int32_t top = (int32_t)n + 1;
    for (int64_t start = 0; start < len; start += BLOCK) {
        const int64_t m = len - start < BLOCK ? len - start : BLOCK;
        const float *gb = g + start, *zb = z + start, *yb = y + start;
        const uint8_t *kb = k + start;
        float *db = dz + start;
        for (int64_t e = 0; e < m; e++) { /* elementwise, vectorised */
            const float zi = zb[e], yi = yb[e], gi = gb[e];
            db[e] = gi * (zi >= 0.0f && !(zi > c_n) ? 1.0f : 0.0f);
            const uint32_t ag = abs_bits(gi), az = abs_bits(zi), a = ag > az ? ag : az;
            bits = a > bits ? a : bits;
            const int32_t sg = (int32_t)kb[e] + (zi > yi);
            const float zc = zi > 0.0f ? zi : 0.0f;
            const float d = gi * (yi - zc);
            const float v = sg == top ? gi : d;
            seg[e] = sg;
            term[e] = ((double)v * scale + ROUNDER) - ROUNDER;
        }
        int64_t e = 0;
        for (; e + LANES <= m; e += LANES)
            for (int64_t l = 0; l < LANES; l++)
                acc[l][seg[e + l]] += term[e + l];
        for (; e < m; e++)
            acc[0][seg[e]] += term[e];
    }
    for (int64_t j = 0; j < n + 2; j++) {
        double t = 0.0;
        for (int64_t l = 0; l < LANES; l++)
            t += acc[l][j];
        sums[j] = t;
    }
    return bits >= 0x7f800000u;
}
