// Row-wise kernels (one block per row): RMSNorm forward/backward and the
// cross-entropy of one chunk of logit rows.

// y = w * (x * rstd), rstd = 1/sqrt(mean(x^2) + eps); the sum of squares in
// f64 as the CPU path computes it.
extern "C" __global__ void rmsnorm_fwd(const float* x, const float* w, float eps, int h, float* y,
                                       float* rstd) {
    i64 row = blockIdx.x;
    const float* xr = x + row * h;
    double ss = 0.0;
    for (int j = threadIdx.x; j < h; j += blockDim.x) {
        double v = xr[j];
        ss += v * v;
    }
    ss = block_sum_d(ss);
    float var = (float)(ss / h);
    float r = 1.0f / sqrtf(var + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    for (int j = threadIdx.x; j < h; j += blockDim.x) y[row * h + j] = w[j] * (xr[j] * r);
}

// dx += rstd * (dy*w - xhat * mean(dy*w*xhat)), xhat = x * rstd.
extern "C" __global__ void rmsnorm_bwd_add(const float* dy, const float* x, const float* w,
                                           const float* rstd, int h, float* dx) {
    i64 row = blockIdx.x;
    const float* dyr = dy + row * h;
    const float* xr = x + row * h;
    float r = rstd[row];
    double m = 0.0;
    for (int j = threadIdx.x; j < h; j += blockDim.x)
        m += (double)dyr[j] * (double)w[j] * (double)xr[j] * (double)r;
    m = block_sum_d(m);
    float mf = (float)(m / h);
    for (int j = threadIdx.x; j < h; j += blockDim.x)
        dx[row * h + j] += r * (dyr[j] * w[j] - xr[j] * r * mf);
}

// Cross-entropy of `rows` logit rows [rows, vocab] (one chunk of the batch):
// target[r] < 0 means not counted. loss[r] = logsumexp(row) - row[target]
// (log-sum-exp in f64 like the CPU path). With want_grad the row is replaced
// by d(loss / denominator)/d logits = (softmax - onehot) * inv_denom
// (zeros for uncounted rows).
extern "C" __global__ void cross_entropy_rows(float* logits, const int* target, int vocab,
                                              float inv_denom, int want_grad, double* loss) {
    i64 row = blockIdx.x;
    float* lr = logits + row * (i64)vocab;
    int t = target[row];
    if (t < 0) {
        if (threadIdx.x == 0) loss[row] = 0.0;
        if (want_grad)
            for (int j = threadIdx.x; j < vocab; j += blockDim.x) lr[j] = 0.0f;
        return;
    }
    float mx = NEG_INF;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) mx = fmaxf(mx, lr[j]);
    mx = block_max(mx);
    double s = 0.0;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) s += exp((double)lr[j] - (double)mx);
    s = block_sum_d(s);
    double lse = (double)mx + log(s);
    float tl = lr[t];
    __syncthreads();
    if (threadIdx.x == 0) loss[row] = lse - (double)tl;
    if (want_grad) {
        double inv = (double)inv_denom;
        for (int j = threadIdx.x; j < vocab; j += blockDim.x)
            lr[j] = (float)(exp((double)lr[j] - lse) * inv);
        __syncthreads();
        if (threadIdx.x == 0) lr[t] -= (float)inv;
    }
}
