/* Compiled kernel of the exact fast QPS search (lowbit.sq.kernel loads it through ctypes).

   Oh, Sim, Kim, Lee, "Non-Uniform Step Size Quantization for Accurate Post-Training Quantization"
   (Subset Quantization, ECCV 2022, doi:10.1007/978-3-031-20083-0_39), section 3.3 and Algorithm 1
   FINDBESTQPS: for every (QPS, output channel) pair, iterate eqs. 8-10 (nearest points, then the
   least-squares scale) from s0 = max|w| / max(points) until |s_new - s| / s0 <= tol, and return the
   eq. 9 loss at the final scale.

   Plain C99, compiled with -ffp-contract=off -fno-fast-math, so every operation rounds as numpy's
   does and the result is the one lowbit.sq.search._fast (torch) and the reference compute. Each
   threshold count starts from a per-channel bucket table and steps to the exact count in a few
   comparisons; the elements next to each threshold are then checked with the reference's own
   distance comparison, so floating-point ties resolve identically.

   Inputs per channel (row) r, built by lowbit.sq.kernel.prepare: the sorted magnitudes a (n of them
   plus a +inf sentinel), their prefix sums pre (n + 1), a bucket table tab (nb + 1 entries: the
   number of magnitudes below b * max|w| / nb) with inv = nb / max|w|, and the energy er = sum w^2.
   Zero weights are ordinary magnitudes: they fall in the first segment, on the smallest point p[0]
   (eq. 3's nearest level; 0 when 0 is in the QPS). An all-zero channel gets scale 0 and loss 0.
*/
#include <math.h>
#include <stdint.h>

static double pair_loss(const double *a, const double *pre, const int32_t *tab, double inv, int64_t nb,
                        double er, int64_t n, const double *p, int64_t n_pts, double tol,
                        int64_t max_iter, double *scale_out, int64_t *it_out, int *conv_out) {
    /* eqs. 8-10 for one (subset, channel) pair; returns the eq. 9 loss at the final scale */
    double amax = a[n - 1], pmax = p[n_pts - 1], s, s0, S = 0.0, Q = 0.0;
    if (amax == 0.0) { *scale_out = 0.0; *it_out = 0; *conv_out = 1; return 0.0; }  /* scale 0: exact */
    if (pmax == 0.0) { *scale_out = 1.0; *it_out = 0; *conv_out = 1; return er; }
    s0 = amax / pmax; s = s0;
    int converged = 0; int64_t it = 0;
    for (;;) {
        int64_t prev = 0;
        S = 0.0; Q = 0.0;
        for (int64_t j = 0; j < n_pts; j++) {  /* eq. 8 via thresholds, eq. 10 sums */
            int64_t c = n;
            if (j + 1 < n_pts) {
                double lo = s * p[j], hi = s * p[j + 1], t = s * ((p[j + 1] + p[j]) / 2);
                double eps = 1e-13 * hi;  /* >> the rounding of t, lo, hi and the distances */
                /* #{a <= t}: start from the bucket table (a guess: every bucket holds ~1/2
                   magnitude on average), then step to the exact count */
                double tb = t * inv;
                c = tab[(tb >= (double)nb) ? nb : (int64_t)tb];
                while (c > 0 && a[c - 1] > t) c--;  /* only if rounding put t a bucket too high */
                c += a[c] <= t;  /* a[n] = +inf is a sentinel: no bound checks, no branches */
                c += a[c] <= t;
                while (a[c] <= t) c++;
                /* the reference's argmin decides at the boundary: |a - s p_j| <= |a - s p_j+1|
                   means point j (ties to the smaller point), whatever rounding did to s m_j.
                   Magnitudes farther than eps from t cannot be affected by rounding: only
                   the near ones get the exact test. */
                if ((c > 0 && a[c - 1] >= t - eps) || a[c] <= t + eps) {
                    while (c > 0 && !(fabs(a[c - 1] - lo) <= fabs(hi - a[c - 1]))) c--;
                    while (c < n && fabs(a[c] - lo) <= fabs(hi - a[c])) c++;
                }
            }
            int64_t cnt = c - prev;
            S += p[j] * (pre[c] - pre[prev]);
            Q += p[j] * p[j] * (double)cnt;
            prev = c;
        }
        if (converged || it >= max_iter) break;
        if (Q == 0.0) { converged = 1; break; }
        double s_new = S / Q;
        it++;
        double change = fabs(s_new - s) / s0;
        s = s_new;
        converged = change <= tol;
    }
    double loss = er - 2.0 * s * S + s * s * Q;
    *scale_out = s; *it_out = it; *conv_out = converged;
    return loss > 0.0 ? loss : 0.0;
}

void sq_search(const double *a_sorted, const double *prefix, const int32_t *table, const double *inv,
               int64_t nb, const double *energy, int64_t n_rows, int64_t n, const double *pts, int64_t k_begin, int64_t k_end, int64_t n_pts,
               double tol, int64_t max_iter, double *losses, double *scales, int64_t *iters, int64_t *not_conv) {
    /* every pair of subsets [k_begin, k_end) x all channels; losses summed in channel order */
    for (int64_t k = k_begin; k < k_end; k++) { losses[k] = 0.0; iters[k] = 0; not_conv[k] = 0; }
    for (int64_t r = 0; r < n_rows; r++) {  /* channel outer: its magnitudes stay in cache */
        const double *a = a_sorted + r * (n + 1), *pre = prefix + r * (n + 1);
        for (int64_t k = k_begin; k < k_end; k++) {
            int64_t it; int conv;
            losses[k] += pair_loss(a, pre, table + r * (nb + 1), inv[r], nb, energy[r], n, pts + k * n_pts, n_pts, tol, max_iter,
                                   &scales[k * n_rows + r], &it, &conv);
            iters[k] += it; not_conv[k] += !conv;
        }
    }
}

#define SQ_BLOCK 64
double sq_search_pruned(const double *a_sorted, const double *prefix, const int32_t *table, const double *inv,
                        int64_t nb, const double *energy, const double *rest_lb, int64_t n_rows, int64_t n, const double *pts, int64_t n_pts, const int64_t *ks, int64_t n_ks,
                        int64_t row_begin, double tol, int64_t max_iter, double limit, double rel, double slack,
                        double *partial, int8_t *done, int64_t *iters, int64_t *not_conv, int64_t *pairs) {
    /* Branch and bound over channels: partial[k] (in: the loss over rows [0, row_begin)) grows by
       one channel's eq. 9 loss at a time; rest_lb[r] is a lower bound of the loss of rows [r, n_rows)
       that holds for every subset (0, or superset bounds), so once partial[k] + rest_lb[r] > limit
       the subset cannot be the argmin (nor tie with it) and is dropped. A subset that completes all rows
       lowers limit to total * (1 + rel) + slack. Subsets go in blocks so each channel's
       magnitudes are reused from cache across the block. Returns the final limit. */
    double scale;
    for (int64_t b = 0; b < n_ks; b += SQ_BLOCK) {
        int64_t m = (n_ks - b < SQ_BLOCK) ? n_ks - b : SQ_BLOCK, n_alive = 0;
        int alive[SQ_BLOCK];
        for (int64_t i = 0; i < m; i++) {
            alive[i] = partial[ks[b + i]] + rest_lb[row_begin] <= limit; n_alive += alive[i];
            if (!alive[i]) partial[ks[b + i]] += rest_lb[row_begin];  /* keep a lower bound of the total */
        }
        for (int64_t r = row_begin; r < n_rows && n_alive > 0; r++) {
            const double *a = a_sorted + r * (n + 1), *pre = prefix + r * (n + 1);
            for (int64_t i = 0; i < m; i++) {
                if (!alive[i]) continue;
                int64_t k = ks[b + i], it; int conv;
                partial[k] += pair_loss(a, pre, table + r * (nb + 1), inv[r], nb, energy[r], n, pts + k * n_pts, n_pts, tol, max_iter,
                                        &scale, &it, &conv);
                iters[k] += it; not_conv[k] += !conv; pairs[k] += 1;
                if (partial[k] + rest_lb[r + 1] > limit) { alive[i] = 0; n_alive--; partial[k] += rest_lb[r + 1]; }
            }
        }
        for (int64_t i = 0; i < m; i++) {
            if (!alive[i]) continue;
            int64_t k = ks[b + i];
            double bound = partial[k] * (1.0 + rel) + slack;
            done[k] = 1;
            if (bound < limit) limit = bound;
        }
    }
    return limit;
}
