// Causal grouped-query attention, flash-style: no [q_len, k_len] matrix is
// stored; the forward keeps only the per-row log-sum-exp (f32), the backward
// recomputes the probabilities from it.
//
// Layouts as the CPU path: q [b*q_len, heads*d], k/v [b*k_len, kv_heads*d],
// out like q, lse [b, heads, q_len]. Query i sits at key position q_offset+i;
// key j is visible iff j <= qi, qi - j < window (window > 0), and both share a
// segment id (seg != 0, seg [b*k_len]).
//
// One block per (query row, head, batch row); the block walks the keys in tiles
// of blockDim.x (one key per thread), online softmax across tiles. d <= 256.
// This is the straightforward correct version (CUDA cores, f32); a tensor-core
// tiled kernel is the planned replacement once GPU time allows profiling.

#define MAX_D 256

__device__ __forceinline__ bool visible(int j, int qi, int window, const unsigned int* seg, i64 seg_base) {
    return j <= qi && (window <= 0 || qi - j < window) && (!seg || seg[seg_base + j] == seg[seg_base + qi]);
}

extern "C" __global__ void attn_fwd(const float* q, const float* k, const float* v, const unsigned int* seg,
                                    int q_len, int k_len, int q_offset, int heads, int kv_heads, int d,
                                    int window, float scale, float* out, float* lse) {
    __shared__ float qs[MAX_D];
    __shared__ float acc[MAX_D];
    extern __shared__ float ps[];  // blockDim.x probabilities of the current tile
    int i = blockIdx.x, h = blockIdx.y, bi = blockIdx.z;
    int kvh = h / (heads / kv_heads);
    int qi = q_offset + i;
    const float* qr = q + ((i64)bi * q_len + i) * heads * d + (i64)h * d;
    for (int e = threadIdx.x; e < d; e += blockDim.x) {
        qs[e] = qr[e];
        acc[e] = 0.0f;
    }
    __syncthreads();
    float m = NEG_INF, l = 0.0f;
    i64 kvd = (i64)kv_heads * d;
    i64 seg_base = (i64)bi * k_len;
    int last = qi < k_len - 1 ? qi : k_len - 1;
    for (int j0 = 0; j0 <= last; j0 += blockDim.x) {
        int j = j0 + threadIdx.x;
        float sc = NEG_INF;
        if (j <= last && visible(j, qi, window, seg, seg_base)) {
            const float* kr = k + ((i64)bi * k_len + j) * kvd + (i64)kvh * d;
            float s = 0.0f;
            for (int e = 0; e < d; e++) s += qs[e] * kr[e];
            sc = s * scale;
        }
        float tm = block_max(sc);
        float m_new = fmaxf(m, tm);
        float p = (sc == NEG_INF) ? 0.0f : expf(sc - m_new);
        ps[threadIdx.x] = p;
        float tsum = block_sum(p);
        float corr = (m == NEG_INF) ? 0.0f : expf(m - m_new);
        l = l * corr + tsum;
        int n = min((int)blockDim.x, last + 1 - j0);
        for (int e = threadIdx.x; e < d; e += blockDim.x) {
            float a = acc[e] * corr;
            for (int jj = 0; jj < n; jj++) {
                float pj = ps[jj];
                if (pj != 0.0f) a += pj * v[((i64)bi * k_len + j0 + jj) * kvd + (i64)kvh * d + e];
            }
            acc[e] = a;
        }
        m = m_new;
        __syncthreads();
    }
    float inv = l > 0.0f ? 1.0f / l : 0.0f;
    float* orow = out + ((i64)bi * q_len + i) * heads * d + (i64)h * d;
    for (int e = threadIdx.x; e < d; e += blockDim.x) orow[e] = acc[e] * inv;
    if (threadIdx.x == 0) lse[((i64)bi * heads + h) * q_len + i] = m + logf(l);
}

// delta[b, h, i] = sum_e dout[i, h, e] * out[i, h, e]
extern "C" __global__ void attn_bwd_delta(const float* out, const float* dout, int q_len, int heads, int d,
                                          float* delta) {
    int i = blockIdx.x, h = blockIdx.y, bi = blockIdx.z;
    i64 off = ((i64)bi * q_len + i) * heads * d + (i64)h * d;
    float s = 0.0f;
    for (int e = threadIdx.x; e < d; e += blockDim.x) s += out[off + e] * dout[off + e];
    s = block_sum(s);
    if (threadIdx.x == 0) delta[((i64)bi * heads + h) * q_len + i] = s;
}

// dq (written), dk and dv (accumulated with atomics: the kv heads are shared by
// n_rep query heads and every query row) from p = exp(s - lse),
// ds = p * (dout.v - delta).
extern "C" __global__ void attn_bwd(const float* q, const float* k, const float* v, const unsigned int* seg,
                                    const float* dout, const float* lse, const float* delta, int q_len,
                                    int k_len, int q_offset, int heads, int kv_heads, int d, int window,
                                    float scale, float* dq, float* dk, float* dv) {
    __shared__ float qs[MAX_D];
    __shared__ float dos[MAX_D];
    __shared__ float dqs[MAX_D];
    extern __shared__ float sh[];  // ds then p of the tile: 2 * blockDim.x
    float* dss = sh;
    float* pss = sh + blockDim.x;
    int i = blockIdx.x, h = blockIdx.y, bi = blockIdx.z;
    int kvh = h / (heads / kv_heads);
    int qi = q_offset + i;
    i64 qoff = ((i64)bi * q_len + i) * heads * d + (i64)h * d;
    for (int e = threadIdx.x; e < d; e += blockDim.x) {
        qs[e] = q[qoff + e];
        dos[e] = dout[qoff + e];
        dqs[e] = 0.0f;
    }
    __syncthreads();
    i64 ri = ((i64)bi * heads + h) * q_len + i;
    float L = lse[ri], D = delta[ri];
    i64 kvd = (i64)kv_heads * d;
    i64 seg_base = (i64)bi * k_len;
    int last = qi < k_len - 1 ? qi : k_len - 1;
    for (int j0 = 0; j0 <= last; j0 += blockDim.x) {
        int j = j0 + threadIdx.x;
        float p = 0.0f, ds = 0.0f;
        if (j <= last && visible(j, qi, window, seg, seg_base)) {
            const float* kr = k + ((i64)bi * k_len + j) * kvd + (i64)kvh * d;
            const float* vr = v + ((i64)bi * k_len + j) * kvd + (i64)kvh * d;
            float s = 0.0f, dp = 0.0f;
            for (int e = 0; e < d; e++) {
                s += qs[e] * kr[e];
                dp += dos[e] * vr[e];
            }
            p = expf(s * scale - L);
            ds = p * (dp - D);
        }
        dss[threadIdx.x] = ds;
        pss[threadIdx.x] = p;
        __syncthreads();
        int n = min((int)blockDim.x, last + 1 - j0);
        for (int e = threadIdx.x; e < d; e += blockDim.x) {
            float a = 0.0f;
            for (int jj = 0; jj < n; jj++) {
                float dsj = dss[jj];
                if (dsj != 0.0f) a += dsj * k[((i64)bi * k_len + j0 + jj) * kvd + (i64)kvh * d + e];
            }
            dqs[e] += a * scale;
        }
        // dk[j] += scale * ds_j * q_i ; dv[j] += p_j * dout_i
        for (int idx = threadIdx.x; idx < n * d; idx += blockDim.x) {
            int jj = idx / d, e = idx % d;
            i64 o = ((i64)bi * k_len + j0 + jj) * kvd + (i64)kvh * d + e;
            float dsj = dss[jj], pj = pss[jj];
            if (dsj != 0.0f) atomicAdd(dk + o, scale * dsj * qs[e]);
            if (pj != 0.0f) atomicAdd(dv + o, pj * dos[e]);
        }
        __syncthreads();
    }
    for (int e = threadIdx.x; e < d; e += blockDim.x) dq[qoff + e] = dqs[e];
}
