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

void sq_bucket_table(const double *a_sorted, int64_t n_rows, int64_t n, int64_t nb, int32_t *table) {
    /* table[r, b] = #{a < (b / nb) * max a} for each padded sorted row (a merge: what numpy's
       searchsorted(side="left") of the same edges gives, in one pass) */
    for (int64_t r = 0; r < n_rows; r++) {
        const double *a = a_sorted + r * (n + 1);
        double amax = a[n - 1];
        int32_t *t = table + r * (nb + 1);
        int64_t c = 0;
        for (int64_t b = 0; b <= nb; b++) {
            double x = ((double)b / (double)nb) * amax;
            while (c < n && a[c] < x) c++;
            t[b] = (int32_t)c;
        }
    }
}

void sq_row_losses(const double *a_sorted, const double *prefix, const int32_t *table, const double *inv, int64_t nb,
                   const double *energy, int64_t n_rows, int64_t n, const double *p, int64_t n_pts, double tol,
                   int64_t max_iter, double *out) {
    /* the fixed-point loss of one QPS on every channel */
    for (int64_t r = 0; r < n_rows; r++) {
        double scale; int64_t it; int conv;
        out[r] = pair_loss(a_sorted + r * (n + 1), prefix + r * (n + 1), table + r * (nb + 1), inv[r], nb, energy[r], n,
                           p, n_pts, tol, max_iter, &scale, &it, &conv);
    }
}

/* ---- A lower bound of a channel's loss over every QPS and every scale (the DP bound). ----
   For scales s in [s1, s2] the point s u of S_U lies in the interval [s1 u, s2 u], so a weight's
   distance to the nearest point of s P (P any N-subset of S_U) is at least its distance to the
   nearest of the N intervals of P. Because lo = s1 u and hi = s2 u both grow with u, the intervals
   are sorted at both ends, and the distance sum of a chosen chain i_1 < ... < i_N splits into the
   weights below lo[i_1] (to lo[i_1]), between two consecutive chosen intervals (to the nearer end;
   none when they overlap), above hi[i_N] (to hi[i_N]), and inside one (0). Its least value over
   N-subsets is a dynamic program over the chain (costs from prefix sums of a and a^2): a lower
   bound of min_P min_{s in [s1, s2]} L_P(s). The fixed-point loss of a QPS is its loss at some
   scale with some assignment, so it is >= the bound of the interval holding that scale; covering
   s >= 0 by intervals ([0, s], a geometric grid, [s, inf]) and splitting the lowest leaf first, the
   lowest leaf is a lower bound of every fixed-point loss on the channel. Counts start from the
   per-channel bucket table and step to the exact count (as in pair_loss). */
static inline int64_t tab_guess(const int32_t *tab, double inv, int64_t nb, double x) {
    double tb = x * inv;
    return tab[(tb >= (double)nb) ? nb : (int64_t)tb];
}
static int64_t cnt_le(const double *a, int64_t n, const int32_t *tab, double inv, int64_t nb, double x) {
    int64_t c = tab_guess(tab, inv, nb, x);  /* #{a <= x}, a sorted */
    while (c > 0 && a[c - 1] > x) c--;
    while (c < n && a[c] <= x) c++;
    return c;
}
static int64_t cnt_lt(const double *a, int64_t n, const int32_t *tab, double inv, int64_t nb, double x) {
    int64_t c = tab_guess(tab, inv, nb, x);  /* #{a < x} */
    while (c > 0 && a[c - 1] >= x) c--;
    while (c < n && a[c] < x) c++;
    return c;
}
static double sq_range(const double *p1, const double *p2, int64_t i0, int64_t i1, double x) {
    /* sum over a[i0:i1] of (a - x)^2 */
    if (i1 <= i0) return 0.0;
    double v = (p2[i1] - p2[i0]) - 2.0 * x * (p1[i1] - p1[i0]) + x * x * (double)(i1 - i0);
    return v > 0.0 ? v : 0.0;
}
#define SQ_MAXU 64
static double interval_bound(const double *a, const double *p1, const double *p2, const int32_t *tab, double inv,
                             int64_t nb, int64_t n, const double *u, int64_t m, int64_t n_pts, double s1, double s2) {
    /* a chain of N of the m intervals skips at most sk = m - N of them: position c (1..N) ends at an
       interval in [c - 1, c - 1 + sk], consecutive chosen ones are at most sk + 1 apart */
    double lo[SQ_MAXU], hi[SQ_MAXU], f[SQ_MAXU], g[SQ_MAXU], pair[SQ_MAXU * SQ_MAXU];
    int64_t A[SQ_MAXU], B[SQ_MAXU], sk = m - n_pts, w = sk + 1;
    for (int64_t k = 0; k < m; k++) {
        lo[k] = s1 * u[k];
        hi[k] = (u[k] == 0.0) ? 0.0 : s2 * u[k];  /* s2 may be +inf */
        A[k] = cnt_lt(a, n, tab, inv, nb, lo[k]);
        int64_t c = A[k];  /* #{a <= hi} >= #{a < lo}; usually equal or close for narrow intervals */
        while (c < n && a[c] <= hi[k]) c++;
        B[k] = c;
    }
    for (int64_t k = 0; k <= sk; k++) f[k] = sq_range(p1, p2, 0, A[k], lo[k]);  /* chains of one interval */
    /* pair(i, j): the weights strictly between interval i and interval j, each to the nearer end */
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = i + 1; j < m && j <= i + w; j++) {
            double cost = 0.0;
            if (hi[i] < lo[j] && B[i] < A[j]) {
                double mid = 0.5 * (hi[i] + lo[j]);
                int64_t im = cnt_le(a, n, tab, inv, nb, mid);
                if (im < B[i]) im = B[i];
                if (im > A[j]) im = A[j];
                cost = sq_range(p1, p2, B[i], im, hi[i]) + sq_range(p1, p2, im, A[j], lo[j]);
            }
            pair[i * w + (j - i - 1)] = cost;
        }
    for (int64_t c = 2; c <= n_pts; c++) {  /* f[j]: the least cost of a chain of c intervals ending at j */
        for (int64_t j = c - 1; j <= c - 1 + sk; j++) {
            double gj = INFINITY;
            for (int64_t i = c - 2; i < j; i++) {
                double v = f[i] + pair[i * w + (j - i - 1)];
                if (v < gj) gj = v;
            }
            g[j] = gj;
        }
        for (int64_t j = c - 1; j <= c - 1 + sk; j++) f[j] = g[j];
    }
    double best = INFINITY;
    for (int64_t j = n_pts - 1; j < m; j++) {
        double right = (hi[j] == INFINITY) ? 0.0 : sq_range(p1, p2, B[j], n, hi[j]);
        if (f[j] + right < best) best = f[j] + right;
    }
    return best;
}

static double tangent_bound(const double *a, const double *p1, const double *p2, const int32_t *tab, double inv,
                            int64_t nb, int64_t n, const double *u, int64_t m, int64_t n_pts, double er, double s1,
                            double s2) {
    /* A second-order bound for 0 < s1 < s2 < 3 s1. Each (|w| - s p)^2 is convex in s, so it is >= its
       tangent at c = (s1 + s2) / 2; a sum over weights of minima over points of lines in s is concave,
       so over [s1, s2] it is least at s1 or s2. At an end e (d = e - c):
           (a - e p)^2 - d^2 p^2 = g (a - e' p)^2 - (g - 1) a^2,  e' = e (1 - d^2 / e^2),  g = e / e',
       so the least over N-subsets P at e is g M(e') - (g - 1) sum w^2, with M(e') = min_P L_P(e')
       the exact point DP (a zero-width interval). It trails M by about d^2 sum w^2 / e^2 (second
       order in the width), where the interval bound trails it by a first-order amount. */
    double c = 0.5 * (s1 + s2), best = INFINITY;
    for (int e_i = 0; e_i < 2; e_i++) {
        double e = e_i ? s2 : s1, t = (e - c) / e, t2 = t * t, one_m = 1.0 - t2;
        double e2 = e * one_m, gm1 = t2 / one_m;  /* e' and g - 1 */
        double v = (1.0 + gm1) * interval_bound(a, p1, p2, tab, inv, nb, n, u, m, n_pts, e2, e2) - gm1 * er;
        if (v < best) best = v;
    }
    return best;
}

#define SQ_TANGENT_ONLY 1.1  /* leaves narrower than this ratio use the tangent bound, */
#define SQ_TANGENT_MAX 1.5   /* up to this one the larger of both, wider ones the interval bound */
static double leaf_bound(const double *a, const double *p1, const double *p2, const int32_t *tab, double inv,
                         int64_t nb, int64_t n, const double *u, int64_t m, int64_t n_pts, double er, double s1,
                         double s2) {
    double b = -INFINITY;
    if (s1 > 0.0 && s2 < INFINITY && s2 <= SQ_TANGENT_MAX * s1) {
        b = tangent_bound(a, p1, p2, tab, inv, nb, n, u, m, n_pts, er, s1, s2);
        if (s2 <= SQ_TANGENT_ONLY * s1) return b;
    }
    double c = interval_bound(a, p1, p2, tab, inv, nb, n, u, m, n_pts, s1, s2);
    return c > b ? c : b;
}

void sq_interval_bounds(const double *a, const double *p1, const double *p2, const int32_t *tab, double inv, int64_t nb,
                        int64_t n, const double *u, int64_t m, int64_t n_pts, double er, const double *s1,
                        const double *s2, int64_t count, int64_t mode, double *out) {
    /* one channel's bound on each of count intervals [s1[i], s2[i]] (for the tests): mode 0 the
       interval bound, 1 the tangent bound (needs 0 < s1 < s2 < 3 s1), 2 what the refinement uses */
    for (int64_t i = 0; i < count; i++)
        out[i] = mode == 0 ? interval_bound(a, p1, p2, tab, inv, nb, n, u, m, n_pts, s1[i], s2[i])
               : mode == 1 ? tangent_bound(a, p1, p2, tab, inv, nb, n, u, m, n_pts, er, s1[i], s2[i])
               : leaf_bound(a, p1, p2, tab, inv, nb, n, u, m, n_pts, er, s1[i], s2[i]);
}

/* leaves of the scale cover: a binary min-heap on the bound, 3 doubles per leaf (bound, s1, s2) */
static void leaf_push(double *h, int64_t *size, double b, double s1, double s2) {
    int64_t i = (*size)++;
    while (i > 0) {
        int64_t p = (i - 1) / 2;
        if (h[3 * p] <= b) break;
        h[3 * i] = h[3 * p]; h[3 * i + 1] = h[3 * p + 1]; h[3 * i + 2] = h[3 * p + 2];
        i = p;
    }
    h[3 * i] = b; h[3 * i + 1] = s1; h[3 * i + 2] = s2;
}
static void leaf_pop(double *h, int64_t *size) {  /* drop the root */
    int64_t n = --(*size), i = 0;
    double b = h[3 * n], s1 = h[3 * n + 1], s2 = h[3 * n + 2];
    for (;;) {
        int64_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && h[3 * (c + 1)] < h[3 * c]) c++;
        if (h[3 * c] >= b) break;
        h[3 * i] = h[3 * c]; h[3 * i + 1] = h[3 * c + 1]; h[3 * i + 2] = h[3 * c + 2];
        i = c;
    }
    h[3 * i] = b; h[3 * i + 1] = s1; h[3 * i + 2] = s2;
}

void sq_channel_bounds(const double *a_sorted, const double *prefix, const double *prefix2, const int32_t *table,
                       const double *inv, int64_t nb, int64_t r_begin, int64_t r_end, int64_t n, const double *u,
                       int64_t m, int64_t n_pts, double ratio0, double ratio_min, int64_t budget,
                       const double *target, double *out, int64_t *evals_out, double *heap) {
    /* out[r] = a lower bound, over every N-subset of S_U (u: m sorted distinct values, m >= N) and
       every scale, of channel r's loss: the lowest leaf once it reaches target[r] (no bound can
       pass the channel's least loss, which target approximates from above), is too narrow
       (s2 <= s1 * ratio_min) or unbounded, or budget evaluations are spent. heap: scratch of
       3 * (budget + 2) doubles. */
    double umax = u[m - 1], umin = INFINITY;
    for (int64_t k = 0; k < m; k++) if (u[k] > 0.0 && u[k] < umin) umin = u[k];
    for (int64_t r = r_begin; r < r_end; r++) {
        const double *a = a_sorted + r * (n + 1), *p1 = prefix + r * (n + 1), *p2 = prefix2 + r * (n + 1);
        const int32_t *tab = table + r * (nb + 1);
        double amax = a[n - 1], iv = inv[r], er = p2[n];
        if (!(amax > 1e-150 && amax < 1e150) || umax == 0.0) { out[r] = 0.0; evals_out[r] = 0; continue; }  /* 0 is a
           bound; far from 1, squares and scales could leave the normal floating-point range */
        double s_a = 0.25 * amax / umax, s_b = 4.0 * amax / umin, s = s_a;
        int64_t size = 0, evals = 0;
        leaf_push(heap, &size, leaf_bound(a, p1, p2, tab, iv, nb, n, u, m, n_pts, er, 0.0, s_a), 0.0, s_a); evals++;
        while (s < s_b && evals < budget / 2) {
            double t = s * ratio0; if (t > s_b) t = s_b;
            leaf_push(heap, &size, leaf_bound(a, p1, p2, tab, iv, nb, n, u, m, n_pts, er, s, t), s, t); evals++;
            s = t;
        }
        leaf_push(heap, &size, leaf_bound(a, p1, p2, tab, iv, nb, n, u, m, n_pts, er, s, INFINITY), s, INFINITY);
        evals++;
        for (;;) {  /* the root is the lowest leaf: a bound for every scale */
            double b = heap[0], s1 = heap[1], s2 = heap[2];
            if (b >= target[r] || evals + 2 > budget || !(s2 < INFINITY) || s1 == 0.0 || s2 <= s1 * ratio_min) break;
            double mid = s1 * sqrt(s2 / s1);
            if (!(mid > s1 && mid < s2)) break;
            leaf_pop(heap, &size);
            leaf_push(heap, &size, leaf_bound(a, p1, p2, tab, iv, nb, n, u, m, n_pts, er, s1, mid), s1, mid);
            leaf_push(heap, &size, leaf_bound(a, p1, p2, tab, iv, nb, n, u, m, n_pts, er, mid, s2), mid, s2);
            evals += 2;
        }
        out[r] = heap[0];
        evals_out[r] = evals;
    }
}
