/* STLQ's words and squared errors for one scale, every weight in one pass (the inner loop of the scale fit).
 *
 * Oh, Sim, Lee, Lee, "Automated Log-Scale Quantization for Low-Cost Deep Neural Networks" (CVPR 2021,
 * supplement), as described in SQ (Oh, Sim, Kim, Lee, ECCV 2022) sec. 2.1 and eqs. 5-6. Called by
 * lowbit/alq/stlq_kernel.py for lowbit/alq/quantizers.py (fit_stlq_scale): for each weight w of row c
 * (scale s = s[c]), the same operations with the same rounding as the torch path (_stlq):
 *
 *   thr_j  = s * mids[j]                      (the scaled mid-points of the log set, as point_index)
 *   q1     = (sgn(w) * s) * p[#{j : thr_j < |w|}]    (sgn(0) = +1; a tie goes to the smaller point)
 *   e      = w - q1,  scaled = |e| / s        (the error indication the selection ranks)
 *   q2     = (sgn(e) * s) * p[#{j : thr_j < |e|}]    (the second word, used where selected)
 *   sq0    = (q1 - w)^2,  sq1 = ((q1 + q2) - w)^2     (squared error without / with the second word)
 *
 * q1, q2 (the words, for stlq_quantize and STLQWeight) and sq0, sq1 (for the scale fit) are written where their
 * output pointers are not NULL. The selection (top-k of scaled) and the MSE's mean stay in torch.
 * Plain C99, no FMA contraction (built by lowbit.core.ckernel); one function per floating type.
 */
#include <stdint.h>
#include <math.h>

/* Rows are walked in chunks of CHUNK weights; each word's point index is the count of thresholds strictly
 * below |x| (= torch.searchsorted(thr, |x|, right=False) on the ascending thresholds), counted threshold
 * by threshold over the chunk, a loop the compiler vectorises. */
#define CHUNK 512

#define STLQ_WORDS(T, NAME, ABS)                                                         \
    int64_t NAME(int64_t n_rows, int64_t n_cols, const T *w, const T *s, int64_t n_points, \
                 const T *p, const T *mids, T *thr, T *q1_out, T *q2_out, T *scaled, T *sq0, T *sq1) { \
        int64_t n_mids = n_points - 1;                                                   \
        T a[CHUNK], q1[CHUNK], e[CHUNK];                                                 \
        int32_t cnt[CHUNK];                                                              \
        for (int64_t c = 0; c < n_rows; c++) {                                           \
            T sc = s[c];                                                                 \
            for (int64_t j = 0; j < n_mids; j++) thr[j] = sc * mids[j];                  \
            for (int64_t k0 = 0; k0 < n_cols; k0 += CHUNK) {                             \
                int64_t n = (n_cols - k0 < CHUNK) ? n_cols - k0 : CHUNK, at = c * n_cols + k0; \
                const T *x = w + at;                                                     \
                for (int64_t k = 0; k < n; k++) { a[k] = ABS(x[k]); cnt[k] = 0; }        \
                for (int64_t j = 0; j < n_mids; j++) {                                   \
                    T t = thr[j];                                                        \
                    for (int64_t k = 0; k < n; k++) cnt[k] += (t < a[k]);                \
                }                                                                        \
                for (int64_t k = 0; k < n; k++) {                                        \
                    q1[k] = ((x[k] < (T)0) ? -sc : sc) * p[cnt[k]];                      \
                    e[k] = x[k] - q1[k];                                                 \
                    a[k] = ABS(e[k]);                                                    \
                    cnt[k] = 0;                                                          \
                }                                                                        \
                for (int64_t j = 0; j < n_mids; j++) {                                   \
                    T t = thr[j];                                                        \
                    for (int64_t k = 0; k < n; k++) cnt[k] += (t < a[k]);                \
                }                                                                        \
                for (int64_t k = 0; k < n; k++) {                                        \
                    T q2 = ((e[k] < (T)0) ? -sc : sc) * p[cnt[k]];                       \
                    scaled[at + k] = a[k] / sc;                                          \
                    if (q1_out) q1_out[at + k] = q1[k];                                  \
                    if (q2_out) q2_out[at + k] = q2;                                     \
                    if (sq0) { T d0 = q1[k] - x[k], d1 = (q1[k] + q2) - x[k];            \
                               sq0[at + k] = d0 * d0; sq1[at + k] = d1 * d1; }           \
                }                                                                        \
            }                                                                            \
        }                                                                                \
        return 0;                                                                        \
    }

STLQ_WORDS(float, stlq_words_f32, fabsf)
STLQ_WORDS(double, stlq_words_f64, fabs)

/* The select tensor's exact top-k (lowbit.alq.select_second_words): the k-th largest of u by quickselect
 * (Wirth's partition, median-of-three pivot) on a copy, every unit above it, then the first units equal to
 * it by index until k are chosen (ties to the lower index). 0 < k < n; chosen: n zero bytes in, the mask out. */
#define STLQ_TOP_K(T, NAME)                                                              \
    int64_t NAME(int64_t n, const T *u, int64_t k, T *work, uint8_t *chosen) {           \
        for (int64_t i = 0; i < n; i++) work[i] = u[i];                                  \
        int64_t target = n - k, l = 0, m = n - 1;                                        \
        while (l < m) {                                                                  \
            T lo = work[l], mid = work[l + (m - l) / 2], hi = work[m], x;                \
            if (lo < mid) x = (mid < hi) ? mid : ((lo < hi) ? hi : lo);                  \
            else x = (lo < hi) ? lo : ((mid < hi) ? hi : mid);                           \
            int64_t i = l, j = m;                                                        \
            do {                                                                         \
                while (work[i] < x) i++;                                                 \
                while (x < work[j]) j--;                                                 \
                if (i <= j) { T t = work[i]; work[i] = work[j]; work[j] = t; i++; j--; } \
            } while (i <= j);                                                            \
            if (j < target) l = i;                                                       \
            if (target < i) m = j;                                                       \
        }                                                                                \
        T thr = work[target];                                                            \
        int64_t taken = 0;                                                               \
        for (int64_t i = 0; i < n; i++) { chosen[i] = u[i] > thr; taken += chosen[i]; }  \
        for (int64_t i = 0; i < n && taken < k; i++)                                     \
            if (u[i] == thr) { chosen[i] = 1; taken++; }                                 \
        return taken;                                                                    \
    }

STLQ_TOP_K(float, stlq_top_k_f32)
STLQ_TOP_K(double, stlq_top_k_f64)
