/* SQ's final optimisation, rounding step: exact coordinate descent over one block of inputs.
 *
 * Oh, Sim, Kim, Lee, "Non-Uniform Step Size Quantization for Accurate Post-Training Quantization"
 * (SQ, ECCV 2022), sec. 4.1 "final optimization"; the up/down choice of AdaRound (Nagel et al., ICML 2020).
 * Called by lowbit/sq/refine.py (refine_rounding): the same operations, in the same order and with the same
 * rounding, as its torch loop over the block's columns (rows are independent, so each row is walked on its
 * own). Plain C99, no FMA contraction (built by lowbit.core.ckernel).
 *
 * q, lo, hi, cw: (C, K) row-major; diag: (K,); s2: (C,) squared scales; g_blk: (B, B) the block of G;
 * gq_blk: (C, B) the block's columns of q @ G, kept current; d_blk: (C, B) zeros in, the changes out.
 * Returns the number of weights moved.
 */
#include <stdint.h>
#include <stdlib.h>

int64_t sq_round_block(int64_t n_rows, int64_t n_in, int64_t k0, int64_t width, double *q, const double *lo,
                       const double *hi, const double *cw, const double *diag, const double *s2,
                       const double *g_blk, double *gq_blk, double *d_blk) {
    int64_t changed = 0;
    for (int64_t c = 0; c < n_rows; c++) {
        double *qr = q + c * n_in, *gq = gq_blk + c * width, *dr = d_blk + c * width;
        const double *lr = lo + c * n_in, *hr = hi + c * n_in, *cr = cw + c * n_in;
        for (int64_t j = 0; j < width; j++) {
            int64_t k = k0 + j;
            double cur = qr[k];
            double alt = (cur == lr[k]) ? hr[k] : lr[k];
            double d = alt - cur;
            double delta = d * d * diag[k] + 2.0 * d * (gq[j] - cr[k]);
            double thr = (-1e-12 * diag[k]) * s2[c];
            if (delta < thr && d != 0.0) {
                qr[k] = cur + d;
                dr[j] = d;
                const double *gj = g_blk + j * width;
                for (int64_t l = 0; l < width; l++) gq[l] += d * gj[l];
                changed++;
            }
        }
    }
    return changed;
}

/* SQ's final optimisation, scale step: the walk of refine_scales over the scale multipliers, for a chunk of rows.
 *
 * absw, sign, cw: (R, K) row-major (|w|, sgn(w) with sgn(0) = 1, w C^T); p: the n_points sorted QPS points;
 * mids: their n_points - 1 mid-points; s: (R,) scales; mult: the n_steps multipliers in walk order (ascending);
 * g: (K, K) symmetric; idx: (R, K) the point indices at mult[0] in, gz: (R, K) = z @ G at mult[0] in (both
 * updated in place); losses: row r of step t at losses[t * loss_stride + r]. At each step a weight's index is the number of mid-points strictly below |w| / (s m) (0 when
 * s m = 0), as torch.bucketize(right=False) in _point_index; z @ G is updated by the changed codes only, bucketed
 * by column (one read of a block of G's row c serves every row whose code changed at input c), by blocks of
 * `block` columns; each element of z @ G receives the changes in the same order as the torch loop; the loss is
 * (s m)^2 z.(z G) - 2 (s m) z.(w C^T). Returns -1 if mult[0] gives other indices than those passed in, -2 if
 * out of memory, else 0.
 */
int64_t sq_scale_walk(int64_t n_rows, int64_t n_in, int64_t n_points, int64_t n_steps, int64_t block,
                      const double *absw, const double *sign, const double *p, const double *mids, const double *s,
                      const double *mult, const double *g, const double *cw, int32_t *idx, double *gz,
                      double *losses, int64_t loss_stride) {
    int64_t n_mids = n_points - 1;
    double *u = (double *)malloc((size_t)n_in * sizeof(double));
    int32_t *cnt = (int32_t *)malloc((size_t)n_in * sizeof(int32_t));
    int64_t *start = (int64_t *)malloc((size_t)(n_in + 1) * sizeof(int64_t));
    int64_t *fill = (int64_t *)malloc((size_t)n_in * sizeof(int64_t));
    size_t most = (size_t)(n_rows * n_in);  /* at most every weight changes code at one step */
    int32_t *ch_row = (int32_t *)malloc(most * sizeof(int32_t)), *ch_col = (int32_t *)malloc(most * sizeof(int32_t));
    double *ch_d = (double *)malloc(most * sizeof(double));
    int32_t *by_row = (int32_t *)malloc(most * sizeof(int32_t));
    double *by_d = (double *)malloc(most * sizeof(double));
    int64_t status = 0;
    if (!u || !cnt || !start || !fill || !ch_row || !ch_col || !ch_d || !by_row || !by_d) { status = -2; goto done; }
    for (int64_t t = 0; t < n_steps; t++) {
        int64_t n_ch = 0;
        for (int64_t r = 0; r < n_rows; r++) {
            double sm = s[r] * mult[t];
            const double *ar = absw + r * n_in, *sr = sign + r * n_in;
            int32_t *ir = idx + r * n_in;
            if (sm > 0.0) for (int64_t k = 0; k < n_in; k++) { u[k] = ar[k] / sm; cnt[k] = 0; }
            else for (int64_t k = 0; k < n_in; k++) { u[k] = 0.0; cnt[k] = 0; }
            for (int64_t j = 0; j < n_mids; j++) {  /* threshold by threshold: a loop the compiler vectorises */
                double mj = mids[j];
                for (int64_t k = 0; k < n_in; k++) cnt[k] += (mj < u[k]);
            }
            for (int64_t k = 0; k < n_in; k++) {
                int32_t i = cnt[k];
                if (i != ir[k]) {
                    if (t == 0) { status = -1; goto done; }
                    ch_row[n_ch] = (int32_t)r;
                    ch_col[n_ch] = (int32_t)k;
                    ch_d[n_ch] = sr[k] * (p[i] - p[ir[k]]);
                    n_ch++;
                    ir[k] = i;
                }
            }
        }
        /* the changes bucketed by column (a stable counting sort: each row's changes stay in column order), so a
         * block of G's row c is read once for every row whose code changed at input c */
        for (int64_t c = 0; c <= n_in; c++) start[c] = 0;
        for (int64_t e = 0; e < n_ch; e++) start[ch_col[e] + 1]++;
        for (int64_t c = 0; c < n_in; c++) start[c + 1] += start[c];
        for (int64_t c = 0; c < n_in; c++) fill[c] = start[c];
        for (int64_t e = 0; e < n_ch; e++) {
            int64_t at = fill[ch_col[e]]++;
            by_row[at] = ch_row[e];
            by_d[at] = ch_d[e];
        }
        for (int64_t k0 = 0; k0 < n_in && n_ch; k0 += block) {
            int64_t k1 = (k0 + block < n_in) ? k0 + block : n_in;
            for (int64_t c = 0; c < n_in; c++) {
                const double *gr = g + c * n_in;
                for (int64_t e = start[c]; e < start[c + 1]; e++) {
                    double d = by_d[e];
                    double *zr = gz + (int64_t)by_row[e] * n_in;
                    for (int64_t k = k0; k < k1; k++) zr[k] += d * gr[k];
                }
            }
        }
        for (int64_t r = 0; r < n_rows; r++) {
            double sm = s[r] * mult[t], a = 0.0, b = 0.0;
            const double *sr = sign + r * n_in, *zr = gz + r * n_in, *cr = cw + r * n_in;
            const int32_t *ir = idx + r * n_in;
            for (int64_t k = 0; k < n_in; k++) {
                double z = sr[k] * p[ir[k]];
                a += z * zr[k];
                b += z * cr[k];
            }
            losses[t * loss_stride + r] = (sm * sm) * a - (2.0 * sm) * b;
        }
    }
done:
    free(u);
    free(cnt);
    free(start);
    free(fill);
    free(ch_row);
    free(ch_col);
    free(ch_d);
    free(by_row);
    free(by_d);
    return status;
}
