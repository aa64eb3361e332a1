/* pdserve CPU paged attention: one fused pass over the paged KV cache.
 *
 * Built at first use by pdserve/kernels/cpu_kernels.py (gcc -O3 -march=native
 * -fopenmp) and called through ctypes with raw pointers and strides; no torch headers.
 *
 * One call covers a whole step: every sequence's new tokens (decode rows and prefill
 * chunks alike) attend to their context in the paged cache, causally. Work items are
 * (sequence, kv head, a few query rows); each reads its context's K / V rows once, tile by
 * tile, converts them to fp32 in a small buffer, and runs an online softmax (exp2, the
 * query prescaled by scale * log2 e) over the tile for every query head of the GQA group
 * and every row of the item. There is no gathered copy of the context and no padding.
 *
 * Layouts (strides in elements, the last dimension contiguous):
 *   q, out:  [T, Hq, D]                          (token stride, head stride)
 *   k, v:    [num_blocks, block_size, Hkv, D]    (block, token and head strides: any order)
 *   block_tables [num_seqs, bt_stride] int32; query_start_loc [num_seqs + 1] int32;
 *   seq_lens [num_seqs] int32. New token j of sequence i (0-based among its query_len
 *   tokens) sees context positions [0, seq_len - query_len + j].
 * dtypes: 0 float32, 1 bfloat16, 2 float16. A sequence of length 0 gets zeros.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define TILE 16          /* context positions per softmax step (one 16-lane vector) */
#define MAX_VECS 32      /* query vectors (rows x group heads) per work item */
#define MAX_D 256
#define LANE_MIN_ROWS 2  /* sequences with this many new tokens run query vectors as lanes */

enum { F32 = 0, BF16 = 1, F16 = 2 };

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u);   /* round to nearest even */
    return (uint16_t)(u >> 16);
}

/* Load n (a multiple of 16) elements of dtype dt into fp32 dst. */
static inline void load_row(float *dst, const void *src, int n, int dt) {
    if (dt == F32) {
        memcpy(dst, src, (size_t)n * 4);
    } else if (dt == BF16) {
        const uint16_t *s = (const uint16_t *)src;
#if defined(__AVX512F__)
        for (int i = 0; i < n; i += 16) {
            __m256i h = _mm256_loadu_si256((const __m256i *)(s + i));
            __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
            _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(w));
        }
#else
        for (int i = 0; i < n; i++) dst[i] = bf16_to_f32(s[i]);
#endif
    } else {
        const _Float16 *s = (const _Float16 *)src;
#if defined(__AVX512F__)
        for (int i = 0; i < n; i += 16)
            _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + i))));
#else
        for (int i = 0; i < n; i++) dst[i] = (float)s[i];
#endif
    }
}

static inline void store_row(void *dst, const float *src, int n, int dt) {
    if (dt == F32) {
        memcpy(dst, src, (size_t)n * 4);
    } else if (dt == BF16) {
        uint16_t *d = (uint16_t *)dst;
        for (int i = 0; i < n; i++) d[i] = f32_to_bf16(src[i]);
    } else {
        _Float16 *d = (_Float16 *)dst;
        for (int i = 0; i < n; i++) d[i] = (_Float16)src[i];
    }
}

static inline float dot(const float *a, const float *b, int n) {
#if defined(__AVX512F__)
    __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(b));
    for (int i = 16; i < n; i += 16)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    return _mm512_reduce_add_ps(acc);
#else
    float s = 0.f;
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
#endif
}

/* 2^x for 16 lanes; lanes below -126 (masked scores are -inf) give exactly 0. */
static inline void exp2_16(float *x) {
#if defined(__AVX512F__)
    __m512 v = _mm512_loadu_ps(x);
    __mmask16 live = _mm512_cmp_ps_mask(v, _mm512_set1_ps(-126.f), _CMP_GE_OQ);
    v = _mm512_max_ps(v, _mm512_set1_ps(-126.f));
    __m512 n = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_mul_ps(_mm512_sub_ps(v, n), _mm512_set1_ps(0.69314718056f)); /* |f| <= ln2/2 */
    /* e^f, Taylor to degree 7: relative error < 1e-8 on |f| <= 0.347 */
    __m512 p = _mm512_set1_ps(1.f / 5040.f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 720.f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120.f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24.f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6.f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    _mm512_storeu_ps(x, _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n)));
#else
    for (int i = 0; i < 16; i++) x[i] = x[i] < -126.f ? 0.f : exp2f(x[i]);
#endif
}

static inline void axpy(float *y, float a, const float *x, int n) {
#if defined(__AVX512F__)
    __m512 va = _mm512_set1_ps(a);
    for (int i = 0; i < n; i += 16)
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
#else
    for (int i = 0; i < n; i++) y[i] += a * x[i];
#endif
}

static inline void scale_row(float *y, float a, int n) {
    for (int i = 0; i < n; i++) y[i] *= a;
}

typedef struct {
    int seq, head, row0, nrows;
    int lanes;            /* run by run_item_lanes */
    int64_t cost;
} Item;

static int by_cost_desc(const void *a, const void *b) {
    int64_t x = ((const Item *)a)->cost, y = ((const Item *)b)->cost;
    return (x < y) - (x > y);
}

typedef struct {
    const char *q; int64_t q_ts, q_hs; int q_dt;
    char *out; int64_t o_ts, o_hs;
    const char *k, *v; int64_t kv_bs, kv_ts, kv_hs; int kv_dt;
    const int32_t *bt; int64_t bt_stride;
    const int32_t *qsl, *slen;
    int hq, hkv, d, block_size;
    float qscale;
} Args;

/* An item's query vectors x = r * g + j (row r, head j of the group): loaded in fp32 and
 * prescaled into qv, accumulators zeroed, and lim[x], the positions [0, lim) it sees. */
static inline void init_rows(const Args *a, const Item *it, float (*qv)[MAX_D],
                             float (*acc)[MAX_D], float *m, float *l, int *lim) {
    const int g = a->hq / a->hkv, d = a->d, qsz = a->q_dt == F32 ? 4 : 2;
    const int qlen = a->qsl[it->seq + 1] - a->qsl[it->seq], ctx = a->slen[it->seq];
    for (int r = 0; r < it->nrows; r++) {
        const int tok = a->qsl[it->seq] + it->row0 + r;
        for (int j = 0; j < g; j++) {
            const int h = it->head * g + j, x = r * g + j;
            load_row(qv[x], a->q + (tok * a->q_ts + h * a->q_hs) * qsz, d, a->q_dt);
            scale_row(qv[x], a->qscale, d);
            if (acc) memset(acc[x], 0, (size_t)d * 4);
            if (m) m[x] = -INFINITY;
            if (l) l[x] = 0.f;
            lim[x] = ctx - qlen + it->row0 + r + 1;
        }
    }
}

/* Row x of the output: acc[x] / l[x] (zeros where nothing was visible). */
static inline void store_out(const Args *a, const Item *it, int x, float *acc, float l) {
    const int g = a->hq / a->hkv, d = a->d, qsz = a->q_dt == F32 ? 4 : 2;
    const int tok = a->qsl[it->seq] + it->row0 + x / g, h = it->head * g + x % g;
    if (l > 0.f) scale_row(acc, 1.f / l, d);
    else memset(acc, 0, (size_t)d * 4);
    store_row(a->out + (tok * a->o_ts + h * a->o_hs) * qsz, acc, d, a->q_dt);
}

/* Positions [t0, t0 + n) of the item's kv head into kb / vb in fp32; rows n..TILE-1 zeroed
 * (finite padding, weighted 0) when pad is set. */
static inline void load_tile(const Args *a, const Item *it, int t0, int n,
                             float (*kb)[MAX_D], float (*vb)[MAX_D], int pad) {
    const int d = a->d, kvsz = a->kv_dt == F32 ? 4 : 2;
    const int32_t *table = a->bt + (int64_t)it->seq * a->bt_stride;
    const int64_t hoff = (int64_t)it->head * a->kv_hs;
    for (int t = 0; t < n; t++) {
        const int pos = t0 + t;
        const int64_t off = (int64_t)table[pos / a->block_size] * a->kv_bs
                            + (int64_t)(pos % a->block_size) * a->kv_ts + hoff;
        load_row(kb[t], a->k + off * kvsz, d, a->kv_dt);
        load_row(vb[t], a->v + off * kvsz, d, a->kv_dt);
    }
    for (int t = n; pad && t < TILE; t++) {
        memset(kb[t], 0, (size_t)d * 4);
        memset(vb[t], 0, (size_t)d * 4);
    }
}

static void run_item(const Args *a, const Item *it) {
    const int d = a->d, nv = it->nrows * (a->hq / a->hkv);
    float qv[MAX_VECS][MAX_D], acc[MAX_VECS][MAX_D];
    float m[MAX_VECS], l[MAX_VECS], s[MAX_VECS][TILE];
    float kb[TILE][MAX_D], vb[TILE][MAX_D];
    int lim[MAX_VECS];   /* positions [0, lim) visible to each query vector */
    init_rows(a, it, qv, acc, m, l, lim);
    const int end = lim[nv - 1];
    for (int t0 = 0; t0 < end; t0 += TILE) {
        const int n = end - t0 < TILE ? end - t0 : TILE;
        load_tile(a, it, t0, n, kb, vb, 0);
        for (int x = 0; x < nv; x++) {
            const int visible = lim[x] - t0 < n ? lim[x] - t0 : n;
            if (visible <= 0) continue;
            float mt = -INFINITY;
            for (int t = 0; t < TILE; t++) {
                s[x][t] = t < visible ? dot(qv[x], kb[t], d) : -INFINITY;
                if (s[x][t] > mt) mt = s[x][t];
            }
            const float mn = mt > m[x] ? mt : m[x];
            for (int t = 0; t < TILE; t++) s[x][t] -= mn;
            exp2_16(s[x]);
            float sum = 0.f;
            for (int t = 0; t < TILE; t++) sum += s[x][t];
            if (mn != m[x]) {
                float alpha = m[x] == -INFINITY ? 0.f : exp2f(m[x] - mn);
                scale_row(acc[x], alpha, d);
                l[x] *= alpha;
                m[x] = mn;
            }
            l[x] += sum;
            for (int t = 0; t < visible; t++) axpy(acc[x], s[x][t], vb[t], d);
        }
    }
    for (int x = 0; x < nv; x++) store_out(a, it, x, acc[x], l[x]);
}


#if defined(__AVX512F__)
static inline __m512 exp2_v(__m512 v) {
    float buf[16] __attribute__((aligned(64)));
    _mm512_store_ps(buf, v);
    exp2_16(buf);
    return _mm512_load_ps(buf);
}

/* Lanes 0-7: pairwise sums of a's lanes; 8-15: of b's. Applied as a tree, 16 vectors
 * become one whose lane t is the sum of vector t (15 combines, no horizontal sums). */
static inline __m512 combine(__m512 a, __m512 b) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    return _mm512_add_ps(_mm512_permutex2var_ps(a, even, b), _mm512_permutex2var_ps(a, odd, b));
}

static inline __m512 sums16(__m512 *v) {
    for (int i = 0; i < 8; i++) v[i] = combine(v[2 * i], v[2 * i + 1]);
    for (int i = 0; i < 4; i++) v[i] = combine(v[2 * i], v[2 * i + 1]);
    for (int i = 0; i < 2; i++) v[i] = combine(v[2 * i], v[2 * i + 1]);
    return combine(v[0], v[1]);
}

/* Decode rows (few query vectors an item): positions are the lanes. For each query
 * vector, the 16 dot products of a tile come out of one sums16, then one vector exp2;
 * PV accumulates in registers, one 16-wide slice of D at a time. d is a compile-time
 * constant in each caller (run_item_vec_d64 / _d128), so the D loops unroll. */
static inline __attribute__((always_inline)) void vec_item(const Args *a, const Item *it,
                                                           const int d) {
    const int nv = it->nrows * (a->hq / a->hkv), nc = d / 16;
    float qv[MAX_VECS][MAX_D] __attribute__((aligned(64)));
    float acc[MAX_VECS][MAX_D] __attribute__((aligned(64)));
    float pb[MAX_VECS][TILE] __attribute__((aligned(64)));
    float kb[TILE][MAX_D] __attribute__((aligned(64)));
    float vb[TILE][MAX_D] __attribute__((aligned(64)));
    float m[MAX_VECS], l[MAX_VECS];
    int lim[MAX_VECS];
    init_rows(a, it, qv, acc, m, l, lim);
    const int end = lim[nv - 1];
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    for (int t0 = 0; t0 < end; t0 += TILE) {
        const int n = end - t0 < TILE ? end - t0 : TILE;
        load_tile(a, it, t0, n, kb, vb, 1);
        for (int x = 0; x < nv; x++) {
            const int visible = lim[x] - t0 < n ? lim[x] - t0 : n;
            if (visible <= 0) {
                memset(pb[x], 0, sizeof pb[x]);
                continue;
            }
            __m512 part[TILE];
            for (int t = 0; t < TILE; t++) {
                __m512 p = _mm512_mul_ps(_mm512_load_ps(qv[x]), _mm512_load_ps(kb[t]));
                for (int c = 1; c < nc; c++)
                    p = _mm512_fmadd_ps(_mm512_load_ps(qv[x] + 16 * c), _mm512_load_ps(kb[t] + 16 * c), p);
                part[t] = p;
            }
            __m512 sv = _mm512_mask_mov_ps(ninf, (__mmask16)((1u << visible) - 1u), sums16(part));
            const float mt = _mm512_reduce_max_ps(sv);
            const float mn = mt > m[x] ? mt : m[x];
            const __m512 p = exp2_v(_mm512_sub_ps(sv, _mm512_set1_ps(mn)));
            _mm512_store_ps(pb[x], p);
            if (mn != m[x]) {
                const float alpha = m[x] == -INFINITY ? 0.f : exp2f(m[x] - mn);
                scale_row(acc[x], alpha, d);
                l[x] *= alpha;
                m[x] = mn;
            }
            l[x] += _mm512_reduce_add_ps(p);
        }
        for (int x = 0; x < nv; x++) {
            for (int c = 0; c < nc; c++) {
                __m512 o = _mm512_load_ps(acc[x] + 16 * c);
                for (int t = 0; t < TILE; t++)
                    o = _mm512_fmadd_ps(_mm512_set1_ps(pb[x][t]), _mm512_load_ps(vb[t] + 16 * c), o);
                _mm512_store_ps(acc[x] + 16 * c, o);
            }
        }
    }
    for (int x = 0; x < nv; x++) store_out(a, it, x, acc[x], l[x]);
}

static void run_item_vec_d64(const Args *a, const Item *it) { vec_item(a, it, 64); }
static void run_item_vec_d128(const Args *a, const Item *it) { vec_item(a, it, 128); }
static void run_item_vec(const Args *a, const Item *it) { vec_item(a, it, a->d); }
#endif

#if defined(__AVX512F__)
#define LANES 16
/* Prefill rows: the item's query vectors (rows x group heads, at most 16) are the 16 lanes
 * of every vector, so QK^T, the online softmax and PV all run across query vectors with
 * no horizontal sums: for each tile of 16 positions, s[t] = sum_d K[t][d] * Qt[d] (one
 * broadcast FMA a position and dimension), p[t] = exp2(s[t] - m), accT[d] += p[t] * V[t][d].
 * Qt and accT are [D][16]: transposed once per item, not per tile. */
static void run_item_lanes(const Args *a, const Item *it) {
    const int d = a->d, nv = it->nrows * (a->hq / a->hkv);
    float qv[LANES][MAX_D] __attribute__((aligned(64)));
    float qt[MAX_D][LANES] __attribute__((aligned(64)));
    float acct[MAX_D][LANES] __attribute__((aligned(64)));
    float kb[TILE][MAX_D] __attribute__((aligned(64)));
    float vb[TILE][MAX_D] __attribute__((aligned(64)));
    int32_t limv[LANES] __attribute__((aligned(64)));
    for (int x = 0; x < LANES; x++) limv[x] = 0;   /* unused lanes see nothing */
    init_rows(a, it, qv, NULL, NULL, NULL, limv);
    memset(qt, 0, sizeof(float) * LANES * d);
    memset(acct, 0, sizeof(float) * LANES * d);
    for (int x = 0; x < nv; x++)
        for (int c = 0; c < d; c++) qt[c][x] = qv[x][c];
    const int end = limv[nv - 1];
    const __m512i lim = _mm512_load_si512(limv);
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    __m512 m = ninf, l = _mm512_setzero_ps();
    for (int t0 = 0; t0 < end; t0 += TILE) {
        const int n = end - t0 < TILE ? end - t0 : TILE;
        load_tile(a, it, t0, n, kb, vb, 1);
        __m512 s[TILE];
        for (int t = 0; t < TILE; t++) s[t] = _mm512_setzero_ps();
        for (int c = 0; c < d; c++) {
            const __m512 qc = _mm512_load_ps(qt[c]);
            for (int t = 0; t < TILE; t++)
                s[t] = _mm512_fmadd_ps(_mm512_set1_ps(kb[t][c]), qc, s[t]);
        }
        __m512 mt = ninf;
        for (int t = 0; t < TILE; t++) {
            const __mmask16 vis = _mm512_cmpgt_epi32_mask(lim, _mm512_set1_epi32(t0 + t));
            s[t] = _mm512_mask_mov_ps(ninf, vis, s[t]);
            mt = _mm512_max_ps(mt, s[t]);
        }
        const __m512 mn = _mm512_max_ps(m, mt);
        /* lanes that see nothing yet keep m = -inf; exp2 against 0 gives them p = 0 */
        const __m512 base = _mm512_mask_mov_ps(mn, _mm512_cmp_ps_mask(mn, ninf, _CMP_EQ_OQ),
                                               _mm512_setzero_ps());
        float buf[LANES] __attribute__((aligned(64)));
        _mm512_store_ps(buf, _mm512_sub_ps(m, base));
        exp2_16(buf);
        const __m512 alpha = _mm512_load_ps(buf);
        __m512 sum = _mm512_setzero_ps();
        for (int t = 0; t < TILE; t++) {
            _mm512_store_ps(buf, _mm512_sub_ps(s[t], base));
            exp2_16(buf);
            s[t] = _mm512_load_ps(buf);
            sum = _mm512_add_ps(sum, s[t]);
        }
        l = _mm512_fmadd_ps(l, alpha, sum);
        m = mn;
        for (int c = 0; c < d; c++) {
            __m512 acc = _mm512_mul_ps(_mm512_load_ps(acct[c]), alpha);
            for (int t = 0; t < TILE; t++)
                acc = _mm512_fmadd_ps(_mm512_set1_ps(vb[t][c]), s[t], acc);
            _mm512_store_ps(acct[c], acc);
        }
    }
    float lv[LANES] __attribute__((aligned(64)));
    _mm512_store_ps(lv, l);
    for (int x = 0; x < nv; x++) {
        for (int c = 0; c < d; c++) qv[x][c] = acct[c][x];
        store_out(a, it, x, qv[x], lv[x]);
    }
}
#endif

/* Returns 0, or -1 for shapes this kernel does not take (the caller falls back). */
int pd_paged_attention(const void *q, int64_t q_ts, int64_t q_hs, int q_dt,
                       void *out, int64_t o_ts, int64_t o_hs,
                       const void *k, const void *v, int64_t kv_bs, int64_t kv_ts, int64_t kv_hs,
                       int kv_dt, const int32_t *block_tables, int64_t bt_stride,
                       const int32_t *query_start_loc, const int32_t *seq_lens, int num_seqs,
                       int hq, int hkv, int d, int block_size, float scale, int nthreads) {
    if (d % 16 || d > MAX_D || hkv <= 0 || hq % hkv || hq / hkv > MAX_VECS || block_size <= 0)
        return -1;
    const int g = hq / hkv;
#if defined(__AVX512F__)
    const int lane_rows = g <= LANES ? LANES / g : 0;
#else
    const int lane_rows = 0;
#endif
    int64_t count = 0;
    for (int i = 0; i < num_seqs; i++) {
        const int n = query_start_loc[i + 1] - query_start_loc[i];
        const int per = n >= LANE_MIN_ROWS && lane_rows ? lane_rows : MAX_VECS / g;
        count += (int64_t)hkv * ((n + per - 1) / per);
    }
    Item *items = (Item *)malloc((size_t)(count ? count : 1) * sizeof(Item));
    if (!items) return -2;
    int64_t c = 0;
    for (int i = 0; i < num_seqs; i++) {
        const int n = query_start_loc[i + 1] - query_start_loc[i];
        const int lanes = n >= LANE_MIN_ROWS && lane_rows;
        const int per = lanes ? lane_rows : MAX_VECS / g;
        for (int r0 = 0; r0 < n; r0 += per) {
            const int nr = n - r0 < per ? n - r0 : per;
            const int64_t cost = (int64_t)(lanes ? 1 : nr) * (seq_lens[i] - n + r0 + nr) + 64;
            for (int h = 0; h < hkv; h++) items[c++] = (Item){i, h, r0, nr, lanes, cost};
        }
    }
    qsort(items, (size_t)count, sizeof(Item), by_cost_desc);
    const Args a = {(const char *)q, q_ts, q_hs, q_dt, (char *)out, o_ts, o_hs,
                    (const char *)k, (const char *)v, kv_bs, kv_ts, kv_hs, kv_dt,
                    block_tables, bt_stride, query_start_loc, seq_lens,
                    hq, hkv, d, block_size, scale * 1.4426950408889634f};
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if(count > 1)
    for (int64_t i = 0; i < count; i++) {
#if defined(__AVX512F__)
        if (items[i].lanes) run_item_lanes(&a, &items[i]);
        else if (d == 64) run_item_vec_d64(&a, &items[i]);
        else if (d == 128) run_item_vec_d128(&a, &items[i]);
        else run_item_vec(&a, &items[i]);
        continue;
#endif
        run_item(&a, &items[i]);
    }
    free(items);
    return 0;
}

/* ---- Elementwise ops of the decoder layer, rounding where Hugging Face's ops round ----
 * Activations are dtype dt (0 / 1 / 2 as above); every op computes in fp32 and rounds to
 * dt after each step that is a separate torch op in HF's code, so bf16 results match the
 * unfused ops bit for bit (RMSNorm up to the fp32 summation order of its mean). Widths are
 * multiples of 16 (the caller checks). Rows are spread over threads when there are enough. */

#define PAR_ROWS 64         /* fewer rows run on the calling thread */

#if defined(__AVX512F__)
typedef __m512 V;
static inline V vload(const void *p, int dt) {
    if (dt == F32) return _mm512_loadu_ps(p);
    const __m256i h = _mm256_loadu_si256((const __m256i *)p);
    if (dt == BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}
static inline __m256i to16(V x, int dt) {
    if (dt == F16) return _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#if defined(__AVX512BF16__)
    return (__m256i)_mm512_cvtneps_pbh(x);
#else
    __m512i u = _mm512_castps_si512(x);   /* round to nearest even (NaN inputs not kept) */
    u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                             _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
#endif
}
static inline void vstore(void *p, V x, int dt) {
    if (dt == F32) _mm512_storeu_ps(p, x);
    else _mm256_storeu_si256((__m256i *)p, to16(x, dt));
}
static inline V vrnd(V x, int dt) {   /* x as stored in dt, back in fp32 */
    if (dt == F32) return x;
    const __m256i h = to16(x, dt);
    if (dt == BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}
static inline V vexp_neg(V g) {   /* e^-g */
    float b[16] __attribute__((aligned(64)));
    _mm512_store_ps(b, _mm512_mul_ps(g, _mm512_set1_ps(-1.4426950408889634f)));
    exp2_16(b);
    return _mm512_load_ps(b);
}
#define VADD _mm512_add_ps
#define VMUL _mm512_mul_ps
#define VDIV _mm512_div_ps
#define VSET _mm512_set1_ps
#define VSUB _mm512_sub_ps
#define LW 16
#else
typedef float V;   /* one lane: the same code, scalar */
static inline V vload(const void *p, int dt) {
    return dt == F32 ? *(const float *)p : dt == BF16 ? bf16_to_f32(*(const uint16_t *)p)
                                                      : (float)*(const _Float16 *)p;
}
static inline void vstore(void *p, V x, int dt) {
    if (dt == F32) *(float *)p = x;
    else if (dt == BF16) *(uint16_t *)p = f32_to_bf16(x);
    else *(_Float16 *)p = (_Float16)x;
}
static inline V vrnd(V x, int dt) {
    return dt == BF16 ? bf16_to_f32(f32_to_bf16(x)) : dt == F16 ? (float)(_Float16)x : x;
}
static inline V vexp_neg(V g) { return expf(-g); }
#define VADD(a, b) ((a) + (b))
#define VMUL(a, b) ((a) * (b))
#define VDIV(a, b) ((a) / (b))
#define VSET(a) (a)
#define VSUB(a, b) ((a) - (b))
#define LW 1
#endif

static inline float vsum(V x) {
#if defined(__AVX512F__)
    return _mm512_reduce_add_ps(x);
#else
    return x;
#endif
}

/* s = residual + x (or x when residual is NULL), stored to res_out;
 * out = w * round(s * rsqrt(mean(s^2) + eps))  (HF's RMSNorm order). */
void pd_add_rms_norm(const void *x, const void *residual, void *res_out, void *out,
                     const void *w, int rows, int hidden, float eps, int dt, int nthreads) {
    const int sz = dt == F32 ? 4 : 2;
#pragma omp parallel for num_threads(nthreads) if(rows >= PAR_ROWS) schedule(static)
    for (int r = 0; r < rows; r++) {
        const int64_t off = (int64_t)r * hidden * sz;
        const char *xr = (const char *)x + off, *rr = (const char *)residual + off;
        char *sr = (char *)res_out + off, *orow = (char *)out + off;
        V ss = VSET(0.f);
        for (int i = 0; i < hidden; i += LW) {
            V v = vload(xr + i * sz, dt);
            if (residual) v = vrnd(VADD(v, vload(rr + i * sz, dt)), dt);
            vstore(sr + i * sz, v, dt);
            ss = VADD(ss, VMUL(v, v));
        }
        const V inv = VSET(1.f / sqrtf(vsum(ss) / hidden + eps));
        for (int i = 0; i < hidden; i += LW)
            vstore(orow + i * sz, VMUL(vload((const char *)w + i * sz, dt),
                                       vrnd(VMUL(vload(sr + i * sz, dt), inv), dt)), dt);
    }
}

/* out[r] = round(silu(gate)) * up, x[r] = gate | up (each `inter` wide). */
void pd_silu_mul(const void *x, void *out, int rows, int inter, int dt, int nthreads) {
    const int sz = dt == F32 ? 4 : 2;
#pragma omp parallel for num_threads(nthreads) if((int64_t)rows * inter >= PAR_ROWS * 1024) schedule(static)
    for (int r = 0; r < rows; r++) {
        const char *row = (const char *)x + (int64_t)r * 2 * inter * sz;
        char *o = (char *)out + (int64_t)r * inter * sz;
        for (int i = 0; i < inter; i += LW) {
            const V g = vload(row + i * sz, dt), u = vload(row + (int64_t)(inter + i) * sz, dt);
            const V silu = vrnd(VDIV(g, VADD(VSET(1.f), vexp_neg(g))), dt);
            vstore(o + i * sz, VMUL(silu, u), dt);
        }
    }
}

/* Rotary (HF rotate_half: out = round(round(x * cos) + round(rotate_half(x) * sin))) of
 * q and k from the fused projection's rows qkv [T, (hq + 2 hkv) D] (row stride qkv_rs),
 * q into q_out [T, hq, D]; rotated k and v into the paged caches at slot_mapping (a
 * negative slot is padding: skipped). cos, sin: [T, D]. D / 2 is a multiple of 16. */
void pd_rotary_write_kv(const void *qkv, int64_t qkv_rs, const void *cos, const void *sin,
                        void *q_out, void *k_cache, void *v_cache, int64_t kv_bs,
                        int64_t kv_ts, int64_t kv_hs, const int64_t *slots, int tokens,
                        int hq, int hkv, int d, int block_size, int dt, int nthreads) {
    const int sz = dt == F32 ? 4 : 2, half = d / 2;
#pragma omp parallel for num_threads(nthreads) if(tokens >= PAR_ROWS) schedule(static)
    for (int t = 0; t < tokens; t++) {
        const char *row = (const char *)qkv + (int64_t)t * qkv_rs * sz;
        const char *cr = (const char *)cos + (int64_t)t * d * sz, *sr = (const char *)sin + (int64_t)t * d * sz;
        const int64_t slot = slots[t];
        const int64_t base = slot < 0 ? -1 : (slot / block_size) * kv_bs + (slot % block_size) * kv_ts;
        for (int h = 0; h < hq + hkv; h++) {
            const char *xr = row + (int64_t)h * d * sz;
            char *dst = h < hq ? (char *)q_out + ((int64_t)t * hq + h) * d * sz
                      : base >= 0 ? (char *)k_cache + (base + (int64_t)(h - hq) * kv_hs) * sz : NULL;
            if (!dst) continue;
            for (int i = 0; i < half; i += LW) {
                const V x1 = vload(xr + i * sz, dt), x2 = vload(xr + (i + half) * sz, dt);
                const V c1 = vload(cr + i * sz, dt), c2 = vload(cr + (i + half) * sz, dt);
                const V s1 = vload(sr + i * sz, dt), s2 = vload(sr + (i + half) * sz, dt);
                const V y1 = VADD(vrnd(VMUL(x1, c1), dt), vrnd(VMUL(VSUB(VSET(0.f), x2), s1), dt));
                const V y2 = VADD(vrnd(VMUL(x2, c2), dt), vrnd(VMUL(x1, s2), dt));
                vstore(dst + i * sz, y1, dt);
                vstore(dst + (i + half) * sz, y2, dt);
            }
        }
        if (base >= 0)
            for (int h = 0; h < hkv; h++)
                memcpy((char *)v_cache + (base + (int64_t)h * kv_hs) * sz,
                       row + (int64_t)(hq + hkv + h) * d * sz, (size_t)d * sz);
    }
}
