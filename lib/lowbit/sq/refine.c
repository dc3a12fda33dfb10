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
