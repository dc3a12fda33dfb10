/* nuLSQ's unsigned quantization rule and LSQ's quantizer on CPU float32, one pass per direction.
 *
 * Gongyo, Liang, Ambai, Kawakami, Sato, "Learning Non-Uniform Step Sizes for Neural Network
 * Quantization", ACCV 2024. The same operations, in the same order and precision, as the torch path
 * of lowbit.lsq.quantizers (_half_forward / _half_backward), so both give bit-identical results:
 *
 *   forward:  k = #{thresholds strictly below z}   (torch.bucketize, right=False)
 *             y = levels[k]
 *   backward: dz  = g * (z >= 0 && z <= c_N),  g_above = g * (z > c_N)  (torch sums g_above)
 *             seg = k + (z > y)                    (0: z <= 0, 1..N: segments, N+1: above c_N)
 *             sums[seg] += g * (y - z)             (float32, in element order, as torch.bincount)
 *
 * Plain C99, compiled without fast-math or FMA contraction (lowbit.core.ckernel).
 */
#include <math.h>
#include <stdint.h>

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

/* the per-segment sums, in element order (one thread) */
void nulsq_segment_sums(const float *restrict g, const float *restrict z, const float *restrict y,
                        const uint8_t *restrict k, int64_t len, int64_t n, float *restrict sums)
{
    (void)n;
    for (int64_t i = 0; i < len; i++)
        sums[k[i] + (z[i] > y[i])] += g[i] * (y[i] - z[i]);
}

/* dz = g * (z >= 0 && z <= c_N) and g * (z > c_N), whose torch sum is the +1 every step receives */
void nulsq_input_grad(const float *restrict g, const float *restrict z, int64_t len, float c_n, float *restrict dz,
                      float *restrict g_above)
{
    for (int64_t i = 0; i < len; i++) {
        const float zi = z[i], gi = g[i];
        dz[i] = gi * (zi >= 0.0f && !(zi > c_n) ? 1.0f : 0.0f);
        g_above[i] = gi * (zi > c_n ? 1.0f : 0.0f);
    }
}
