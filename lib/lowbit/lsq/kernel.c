/* nuLSQ's unsigned quantization rule on CPU float32, one pass per direction.
 *
 * Gongyo, Liang, Ambai, Kawakami, Sato, "Learning Non-Uniform Step Sizes for Neural Network
 * Quantization", ACCV 2024. The same operations, in the same order and precision, as the torch path
 * of lowbit.lsq.quantizers (_half_forward / _half_backward), so both give bit-identical results:
 *
 *   forward:  k = #{thresholds strictly below z}   (torch.bucketize, right=False)
 *             y = levels[k]
 *   backward: dz  = g * (z >= 0 && z <= c_N)
 *             seg = k + (z > y)                    (0: z <= 0, 1..N: segments, N+1: above c_N)
 *             sums[seg] += g * (y - z)             (float32, in element order, as torch.bincount)
 *
 * Plain C99, compiled without fast-math or FMA contraction (lowbit.core.ckernel).
 */
#include <stdint.h>

void nulsq_forward(const float *z, int64_t len, const float *thr, const float *levels, int64_t n,
                   float *y, uint8_t *k)
{
    for (int64_t i = 0; i < len; i++) {
        const float v = z[i];
        int64_t lo = 0, hi = n; /* first index with thr[idx] >= v: the count of thresholds below v */
        while (lo < hi) {
            const int64_t mid = (lo + hi) >> 1;
            if (thr[mid] < v)
                lo = mid + 1;
            else
                hi = mid;
        }
        y[i] = levels[lo];
        k[i] = (uint8_t)lo;
    }
}

void nulsq_backward(const float *g, const float *z, const float *y, const uint8_t *k, int64_t len, float c_n,
                    float *dz, float *sums)
{
    for (int64_t i = 0; i < len; i++) {
        const float zi = z[i], gi = g[i], yi = y[i];
        const int above = zi > c_n;
        dz[i] = gi * (float)(zi >= 0.0f && !above);
        sums[k[i] + (zi > yi)] += gi * (yi - zi);
    }
}
