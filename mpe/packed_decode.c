/* Decode rows of a bit-packed MPE export: the inner loop of mpe.packed.PackedEmbedding.lookup.
 *
 * Built at first use by mpe/native.py (cc -O2 -shared -fPIC) and called through ctypes; the
 * numpy path in mpe/packed.py computes exactly the same values and is used when no C
 * compiler is available. Plain IEEE float arithmetic (no -ffast-math): the result of
 * scaled[code] + offset[j] is bit-identical to the numpy path.
 *
 * For every i < n, with id = ids[i] and b = bucket_of[id]:
 *   rank = block_base[(id / block) * k + b] + in_block[id]      (row within bucket b)
 *   code j of that row sits at bit (rank * dim + j) * bits[b] of bufs[b], little-endian,
 *   and out[i * dim + j] = scaled[b][code] + offset[j]; a bucket without buffer (0 bits,
 *   pruned) gives zeros. Every buffer has one padding byte after its codes.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define AHEAD 16 /* ids prefetched ahead: the lookups are random accesses into large arrays */

void mpe_decode_rows(const int64_t *ids, int64_t n, const uint8_t *bucket_of, const uint8_t *in_block,
                     const int32_t *block_base, int64_t block, int64_t k, const uint8_t *const *bufs,
                     const int32_t *bits, const float *const *scaled, const float *offset, int64_t dim,
                     float *out) {
    /* pass 1: bucket and bit position of every row (the locator arrays, prefetched ahead) */
    int64_t *where = (int64_t *)malloc((size_t)(n > 0 ? n : 1) * sizeof(int64_t));
    uint8_t *which = (uint8_t *)malloc((size_t)(n > 0 ? n : 1));
    if (where == NULL || which == NULL) { /* no memory for the plan: decode without it */
        free(where);
        free(which);
        where = NULL;
    }
    for (int64_t i = 0; where != NULL && i < n; i++) {
        if (i + AHEAD < n) {
            __builtin_prefetch(bucket_of + ids[i + AHEAD]);
            __builtin_prefetch(in_block + ids[i + AHEAD]);
        }
        const int64_t id = ids[i];
        const int b = bucket_of[id];
        which[i] = (uint8_t)b;
        where[i] = ((int64_t)block_base[(id / block) * k + b] + in_block[id]) * dim * bits[b];
    }
    /* pass 2: decode (each row's bytes prefetched ahead) */
    for (int64_t i = 0; i < n; i++) {
        int b;
        int64_t pos;
        if (where != NULL) {
            b = which[i];
            pos = where[i];
            if (i + AHEAD < n && bufs[which[i + AHEAD]] != NULL) {
                __builtin_prefetch(bufs[which[i + AHEAD]] + (where[i + AHEAD] >> 3));
            }
        } else {
            const int64_t id = ids[i];
            b = bucket_of[id];
            pos = ((int64_t)block_base[(id / block) * k + b] + in_block[id]) * dim * bits[b];
        }
        float *row = out + i * dim;
        const uint8_t *buf = bufs[b];
        if (buf == NULL) {
            memset(row, 0, (size_t)dim * sizeof(float));
            continue;
        }
        const int nb = bits[b];
        const uint16_t mask = (uint16_t)((1u << nb) - 1u);
        const float *lut = scaled[b];
        for (int64_t j = 0; j < dim; j++, pos += nb) {
            const uint16_t word = (uint16_t)(buf[pos >> 3] | ((uint16_t)buf[(pos >> 3) + 1] << 8));
            row[j] = lut[(word >> (pos & 7)) & mask] + offset[j];
        }
    }
    if (where != NULL) {
        free(where);
        free(which);
    }
}
