// Element-wise kernels: dtype conversion, 4-bit dequantization, residual adds,
// bias, SwiGLU, RoPE, embedding gather, LoRA dropout, AdamW, squared norm.

// bnb 4-bit (NF4/FP4) dequantization of elements start..start+n of a row-major
// weight into bf16: element j is table[nibble(j)] * absmax(j / blocksize),
// nibble(j) the high nibble of byte j/2 for even j. absmax is either plain f32
// (absmax != 0) or double-quantized: nested_map[codes[b]] * nested_absmax[b / nbs] + offset.
// The products and the sum are rounded separately (__fmul_rn/__fadd_rn, no FMA
// contraction) exactly as the CPU path and bitsandbytes compute them; the value
// is rounded to the recorded dtype (1 = f16, 2 = bf16, 0 = f32) and then to bf16
// for the tensor-core GEMM.
extern "C" __global__ void dequant4_bf16(const u8* packed, const float* absmax, const u8* codes,
                                         const float* nested_absmax, const float* nested_map,
                                         float offset, int nested_bs, const float* table,
                                         int blocksize, int dtype, i64 start, i64 n, bf16_t* out) {
    GRID_STRIDE(i, n) {
        i64 j = start + i;
        u8 byte = packed[j >> 1];
        int nib = (j & 1) ? (byte & 15) : (byte >> 4);
        i64 blk = j / blocksize;
        float s = absmax ? absmax[blk]
                         : __fadd_rn(__fmul_rn(nested_map[codes[blk]], nested_absmax[blk / nested_bs]), offset);
        float v = __fmul_rn(table[nib], s);
        if (dtype == 1) v = round_f16(v);
        out[i] = f2bf(v);
    }
}

extern "C" __global__ void f32_to_bf16(const float* x, bf16_t* y, i64 n) {
    GRID_STRIDE(i, n) { y[i] = f2bf(x[i]); }
}

extern "C" __global__ void bf16_to_f32(const bf16_t* x, float* y, i64 n) {
    GRID_STRIDE(i, n) { y[i] = bf2f(x[i]); }
}

// a += b
extern "C" __global__ void add_inplace(float* a, const float* b, i64 n) {
    GRID_STRIDE(i, n) { a[i] += b[i]; }
}

// a *= s
extern "C" __global__ void scale_inplace(float* a, float s, i64 n) {
    GRID_STRIDE(i, n) { a[i] *= s; }
}

// y[r, c] += bias[c]
extern "C" __global__ void add_bias(float* y, const float* bias, i64 rows, int cols) {
    GRID_STRIDE(i, rows * cols) { y[i] += bias[i % cols]; }
}

// m = silu(g) * u, silu(z) = z / (1 + e^-z) (torch's formula).
extern "C" __global__ void swiglu_fwd(const float* g, const float* u, float* m, i64 n) {
    GRID_STRIDE(i, n) {
        float gv = g[i];
        m[i] = gv / (1.0f + expf(-gv)) * u[i];
    }
}

extern "C" __global__ void swiglu_bwd(const float* dm, const float* g, const float* u, float* dg,
                                      float* du, i64 n) {
    GRID_STRIDE(i, n) {
        float gv = g[i];
        float s = 1.0f / (1.0f + expf(-gv));
        float silu = gv * s;
        du[i] = dm[i] * silu;
        dg[i] = dm[i] * u[i] * s * (1.0f + gv * (1.0f - s));
    }
}

// HF rotate_half RoPE on x [rows, heads*d] with tables [rows, d/2]; inverse
// rotates back (the backward: the rotation is orthogonal).
extern "C" __global__ void rope(float* x, int heads, int d, const float* cos_t, const float* sin_t,
                                int inverse, i64 rows) {
    int half = d / 2;
    GRID_STRIDE(i, rows * heads * half) {
        i64 row = i / ((i64)heads * half);
        int rem = (int)(i % ((i64)heads * half));
        int h = rem / half, j = rem % half;
        float* hd = x + row * heads * d + (i64)h * d;
        float c = cos_t[row * half + j], s = sin_t[row * half + j];
        float x1 = hd[j], x2 = hd[j + half];
        if (inverse) {
            hd[j] = x1 * c + x2 * s;
            hd[j + half] = x2 * c - x1 * s;
        } else {
            hd[j] = x1 * c - x2 * s;
            hd[j + half] = x2 * c + x1 * s;
        }
    }
}

// out[t, :] = table[ids[t], :] (f32 or bf16 table).
extern "C" __global__ void embed_f32(const float* table, const unsigned int* ids, int h, float* out, i64 t) {
    GRID_STRIDE(i, t * h) { out[i] = table[(i64)ids[i / h] * h + i % h]; }
}

extern "C" __global__ void embed_bf16(const bf16_t* table, const unsigned int* ids, int h, float* out, i64 t) {
    GRID_STRIDE(i, t * h) { out[i] = bf2f(table[(i64)ids[i / h] * h + i % h]); }
}

// The CPU path's counter-based dropout hash (ops::lora::dropout_factor), bit for bit.
__device__ __forceinline__ u64 splitmix64(u64 z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ float dropout_factor(u64 key, u64 i, float p) {
    float u = (float)(splitmix64(key ^ (i * 0xD1B54A32D192ED03ull)) >> 40) / 16777216.0f;
    return u < p ? 0.0f : 1.0f / (1.0f - p);
}

// y = dropout(x) (accumulate: y += dropout(x)) on x [t, in]. mask_rows (optional, [t]) gives
// each row's mask position (a data-parallel rank's rows in the global batch): element i uses
// mask index mask_rows[i / in] * in + i % in, else i (ops::lora::LoraRef::mask_index).
extern "C" __global__ void dropout(const float* x, float* y, u64 key, float p, const unsigned int* mask_rows,
                                   int in_features, int accumulate, i64 n) {
    GRID_STRIDE(i, n) {
        u64 mi = mask_rows ? (u64)mask_rows[i / in_features] * (u64)in_features + (u64)(i % in_features) : (u64)i;
        float v = x[i] * dropout_factor(key, mi, p);
        if (accumulate) y[i] += v; else y[i] = v;
    }
}

// torch.optim.AdamW (single tensor, foreach=False), the scalars derived in f64
// on the host exactly as qlora-train's CPU optimizer does.
__device__ __forceinline__ float lerp_t(float a, float b, float w) {
    return fabsf(w) < 0.5f ? a + w * (b - a) : b - (b - a) * (1.0f - w);
}

extern "C" __global__ void adamw(float* p, const float* g, float* m, float* v, float decay, float w1,
                                 float b2, float w2, float step_size, float bc2_sqrt, float eps, i64 n) {
    GRID_STRIDE(i, n) {
        float x = p[i];
        if (decay != 1.0f) x *= decay;
        float gi = g[i];
        float mi = lerp_t(m[i], gi, w1);
        float vi = v[i] * b2 + w2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        float denom = sqrtf(vi) / bc2_sqrt + eps;
        p[i] = x + step_size * mi / denom;
    }
}

// out[0] += sum(x^2) in f64 (one block-level atomic per block).
extern "C" __global__ void sq_sum(const float* x, i64 n, double* out) {
    double s = 0.0;
    GRID_STRIDE(i, n) { double v = x[i]; s += v * v; }
    s = block_sum_d(s);
    if (threadIdx.x == 0) atomicAdd(out, s);
}
