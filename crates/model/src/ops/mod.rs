//! Hand-written forward/backward kernels of the decoder, each over contiguous
//! row-major `f32` slices, with a plain reference beside it in the tests.
//!
//! Why not candle's autograd: it would compute (and keep) gradients for the
//! frozen weights, the masks and the RoPE tables, and keep every activation.
//! Here each op's backward returns exactly what the LoRA gradients need.
//! Big products go through [`matmul`], the `gemm` crate candle itself uses on
//! CPU, called with explicit strides so that transposes cost nothing.

pub mod amx;
pub mod attention;
pub mod attention_amx;
pub mod cross_entropy;
pub mod dora;
pub mod fastmath;
pub mod ggml;
pub mod linear;
pub mod lora;
pub mod profile;
pub mod rmsnorm;
pub mod rope;
pub mod skinny;
pub mod swiglu;
pub mod transpose;

use gemm::Parallelism;

/// Keep freed memory in the process for the next step instead of returning
/// it to the kernel: glibc serves allocations above its (adaptive, at most 32
/// MiB) mmap threshold with fresh mappings, so every step's large activation
/// buffers were page-faulted and zeroed by the kernel again (~10% of a step
/// in a profile). Raising the mmap and trim thresholds makes them come from,
/// and go back to, the heap. The peak resident size is unchanged (the same
/// buffers exist at the peak either way). Called once by the training step.
pub fn keep_freed_memory() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            extern "C" {
                fn mallopt(param: i32, value: i32) -> i32;
            }
            const M_TRIM_THRESHOLD: i32 = -1;
            const M_MMAP_THRESHOLD: i32 = -3;
            // SAFETY: mallopt only changes glibc's allocation policy.
            unsafe {
                mallopt(M_MMAP_THRESHOLD, 32 << 20);
                mallopt(M_TRIM_THRESHOLD, 512 << 20);
            }
        }
    });
}

/// Work below this many multiply-adds runs single-threaded (thread start-up
/// costs more than it saves, and callers may already be inside a rayon task).
const PAR_THRESHOLD: usize = 1 << 18;

thread_local! {
    /// Set on the pool worker that drives a step ([`on_pool`]): it may split
    /// its own products across the pool although it is a pool thread.
    static DRIVER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// How many [`in_task`] bodies this thread is inside.
    static IN_TASK: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Whether an op called here may fork onto the pool: on a thread outside the
/// pool, or on the step's driver thread; never inside one of an op's parallel
/// tasks ([`in_task`]), which the driver thread also runs its share of.
pub fn may_parallelize() -> bool {
    IN_TASK.get() == 0 && (rayon::current_thread_index().is_none() || DRIVER.get())
}

/// Runs `f` with this thread's value of `key`, taken out while in use and
/// put back after: a nested call on the same thread (a task stolen while
/// `f` waits in a parallel region) starts from a default value instead of
/// finding it borrowed. For per-thread buffers kept from call to call.
pub(crate) fn with_thread_local<T: Default, R>(
    key: &'static std::thread::LocalKey<std::cell::RefCell<T>>,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    let mut v = key.with_borrow_mut(std::mem::take);
    let r = f(&mut v);
    key.with_borrow_mut(|s| *s = v);
    r
}

/// Runs the body of one parallel task of an op: products called inside it
/// stay on this thread ([`may_parallelize`] is false).
pub fn in_task<R>(f: impl FnOnce() -> R) -> R {
    struct Leave;
    impl Drop for Leave {
        fn drop(&mut self) {
            IN_TASK.set(IN_TASK.get() - 1);
        }
    }
    IN_TASK.set(IN_TASK.get() + 1);
    let _leave = Leave;
    f()
}

/// Makes the calling thread (a program's main thread, before any parallel
/// work) worker 0 of rayon's global pool and the step's driver: its ops fork
/// and join among the pool's threads directly, and it is always the same
/// thread, so the step's buffers always come from the same malloc arena (with
/// [`on_pool`] alone, a step driven by another worker than the last one
/// allocated its activations in a second arena while the first still held the
/// last step's: peak RSS 0.81 -> 1.39 GiB in some runs). Returns false (and
/// changes nothing) when the global pool already exists.
pub fn init_pool() -> bool {
    let built = rayon::ThreadPoolBuilder::new()
        .use_current_thread()
        .build_global()
        .is_ok();
    if built {
        DRIVER.set(true);
    }
    built
}

/// Runs `f` on a thread of the rayon pool (the calling thread waits), so that
/// the step's many parallel regions fork and join among the pool's threads
/// instead of each waking the pool from outside and sleeping until it is done.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return keep_pool_awake(f);
    }
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            DRIVER.set(false);
        }
    }
    rayon::scope(|_| {
        DRIVER.set(true);
        let _reset = Reset;
        keep_pool_awake(f)
    })
}

/// Runs `f` (on a pool worker) while the pool's other workers stay awake:
/// each runs a job that takes whatever work appears ([`rayon::yield_now`])
/// and spins in between, until `f` returns. An idle rayon worker otherwise
/// falls asleep within microseconds, and on this project's VMs waking it
/// took 130-165 us (22-32 us after a 10-50 us gap; a micro-benchmark of
/// `join`), paid by every parallel region that follows a sequential stretch
/// of the step; hundreds of them per step.
///
/// One such call at a time in the process (others, concurrent or nested,
/// just run their `f`): two drivers each with helpers could deadlock, each
/// driver, waiting in a join, having picked up the other's helper, which
/// spins until the other driver's `f` (underneath the first's helper)
/// returns (argued from rayon's stealing order; the concurrent-driver test
/// below did not hit it without this guard either). A single driver's helper is the oldest job in its queue, so a
/// thread takes it before any of `f`'s jobs and never holds one under it.
pub(crate) fn keep_pool_awake<R>(f: impl FnOnce() -> R) -> R {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    static ACTIVE: AtomicBool = AtomicBool::new(false);
    let me = rayon::current_thread_index();
    let helpers = rayon::current_num_threads().saturating_sub(1);
    if me.is_none() || helpers == 0 || ACTIVE.swap(true, Ordering::AcqRel) {
        return f();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let live = Arc::new(AtomicUsize::new(helpers));
    for _ in 0..helpers {
        let (stop, live) = (stop.clone(), live.clone());
        rayon::spawn(move || {
            // A helper job that this very thread picks up (from its own
            // queue, while it waits in a join) must not spin: only this
            // thread can end the spinning.
            if rayon::current_thread_index() != me {
                while !stop.load(Ordering::Acquire) {
                    if rayon::yield_now() != Some(rayon::Yield::Executed) {
                        std::hint::spin_loop();
                    }
                }
            }
            live.fetch_sub(1, Ordering::Release);
        });
    }
    /// Ends the helpers (also when `f` panics) and waits until none runs,
    /// running any that is still queued here (it returns at once).
    struct Stop(Arc<AtomicBool>, Arc<AtomicUsize>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
            while self.1.load(Ordering::Acquire) > 0 {
                if rayon::yield_now() != Some(rayon::Yield::Executed) {
                    std::hint::spin_loop();
                }
            }
            ACTIVE.store(false, Ordering::Release);
        }
    }
    let _stop = Stop(stop, live);
    f()
}

/// A new vector of `n` floats built by `f(chunk index, chunk)` over chunks
/// of `chunk` elements, in parallel: each chunk is zeroed by its own task,
/// right before `f` fills it, so the zeroing is an L1-resident write on every
/// core instead of one thread's memset of the whole buffer through memory
/// (zeroed allocations were ~4% of a training step's time). `f` sees zeros.
pub fn par_new(n: usize, chunk: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) -> Vec<f32> {
    use rayon::prelude::*;
    let mut v: Vec<f32> = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(c, s)| {
            zero_uninit(s);
            // SAFETY: every element of `s` was just initialized, and
            // MaybeUninit<f32> has f32's layout.
            let s = unsafe { &mut *(s as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) };
            f(c, s);
        });
    // SAFETY: the chunks cover 0..n, each initialized above.
    unsafe { v.set_len(n) };
    v
}

/// Writes 0.0 to every element: one `memset` (the element loop over a
/// chained iterator compiled to 4-byte stores, ~1.5% of a TinyLlama step
/// in the SwiGLU backward's buffers).
fn zero_uninit(s: &mut [std::mem::MaybeUninit<f32>]) {
    // SAFETY: all-zero bits are 0.0f32; `s` is valid for `s.len()` writes.
    unsafe { std::ptr::write_bytes(s.as_mut_ptr(), 0, s.len()) };
}

/// [`par_new`] for two vectors filled together: `f(chunk index, a, b)`.
pub fn par_new2(
    n: usize,
    chunk: usize,
    f: impl Fn(usize, &mut [f32], &mut [f32]) + Sync + Send,
) -> (Vec<f32>, Vec<f32>) {
    use rayon::prelude::*;
    let (mut a, mut b): (Vec<f32>, Vec<f32>) = (Vec::with_capacity(n), Vec::with_capacity(n));
    a.spare_capacity_mut()[..n]
        .par_chunks_mut(chunk.max(1))
        .zip(b.spare_capacity_mut()[..n].par_chunks_mut(chunk.max(1)))
        .enumerate()
        .for_each(|(c, (sa, sb))| {
            zero_uninit(sa);
            zero_uninit(sb);
            // SAFETY: as in `par_new`.
            let (sa, sb) = unsafe {
                (
                    &mut *(sa as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]),
                    &mut *(sb as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]),
                )
            };
            f(c, sa, sb);
        });
    // SAFETY: as in `par_new`.
    unsafe {
        a.set_len(n);
        b.set_len(n);
    }
    (a, b)
}

/// `n` zeros, zeroed in parallel chunks ([`par_new`]).
pub fn par_zeros(n: usize) -> Vec<f32> {
    par_new(n, 1 << 14, |_, _| {})
}

/// A read-only strided view into a row-major buffer: element `(i, j)` is
/// `data[off + i*rs + j*cs]`.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub off: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    /// Row-major `[rows, cols]` matrix, or its transpose when `t` (stored `[cols, rows]`).
    pub fn mat(data: &'a [f32], rows: usize, cols: usize, t: bool) -> Self {
        if t {
            View {
                data,
                off: 0,
                rs: 1,
                cs: rows,
            }
        } else {
            View {
                data,
                off: 0,
                rs: cols,
                cs: 1,
            }
        }
    }
    fn check(&self, rows: usize, cols: usize, what: &str) {
        if rows > 0 && cols > 0 {
            let last = self.off + (rows - 1) * self.rs + (cols - 1) * self.cs;
            assert!(last < self.data.len(), "gemm: {what} view out of bounds");
        }
    }
}

/// `C = beta·C + alpha · A[m,k] · B[k,n]` with `C` element `(i,j)` at
/// `c[c_off + i*ldc + j]`; beta is 1 when `accumulate`, else 0.
#[allow(clippy::too_many_arguments)]
pub fn gemm_view(
    m: usize,
    n: usize,
    k: usize,
    a: View,
    b: View,
    c: &mut [f32],
    c_off: usize,
    ldc: usize,
    accumulate: bool,
    alpha: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        c_off + (m - 1) * ldc + n <= c.len(),
        "gemm: dst out of bounds"
    );
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                c[c_off + i * ldc..c_off + i * ldc + n].fill(0.0);
            }
        }
        return;
    }
    a.check(m, k, "lhs");
    b.check(k, n, "rhs");
    let par = if m * n * k >= PAR_THRESHOLD && may_parallelize() {
        Parallelism::Rayon(rayon::current_num_threads())
    } else {
        Parallelism::None
    };
    // SAFETY: the checks above keep every index the strides reach inside the
    // slices; `c` is uniquely borrowed so it cannot alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr().add(c_off),
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr().add(a.off),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr().add(b.off),
            b.cs as isize,
            b.rs as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            par,
        );
    }
}

/// `C[m,n] = beta·C + alpha · op(A)[m,k] · op(B)[k,n]` on row-major slices.
///
/// `a` is stored `[m,k]`, or `[k,m]` when `a_t`; `b` is stored `[k,n]`, or
/// `[n,k]` when `b_t`. With `accumulate == false` the old content of `c` is
/// ignored (beta = 0).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_t: bool,
    b: &[f32],
    b_t: bool,
    c: &mut [f32],
    accumulate: bool,
    alpha: f32,
) {
    assert!(a.len() >= m * k, "matmul: lhs has {} < {m}x{k}", a.len());
    assert!(b.len() >= k * n, "matmul: rhs has {} < {k}x{n}", b.len());
    assert!(c.len() >= m * n, "matmul: dst has {} < {m}x{n}", c.len());
    gemm_view(
        m,
        n,
        k,
        View::mat(a, m, k, a_t),
        View::mat(b, k, n, b_t),
        c,
        0,
        n,
        accumulate,
        alpha,
    );
}

/// Plain triple-loop reference of [`matmul`] (f64 accumulation), for tests.
#[allow(clippy::too_many_arguments)]
pub fn matmul_ref(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    a_t: bool,
    b: &[f32],
    b_t: bool,
    c: &mut [f32],
    accumulate: bool,
    alpha: f32,
) {
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f64;
            for l in 0..k {
                let av = if a_t { a[l * m + i] } else { a[i * k + l] };
                let bv = if b_t { b[j * k + l] } else { b[l * n + j] };
                s += av as f64 * bv as f64;
            }
            let v = alpha as f64 * s;
            c[i * n + j] = if accumulate {
                (c[i * n + j] as f64 + v) as f32
            } else {
                v as f32
            };
        }
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    use rand::{Rng, SeedableRng};

    pub fn rand_vec(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| r.random_range(-1.0f32..1.0) * scale)
            .collect()
    }

    pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// Central finite difference of `f` along a random direction `dir`
    /// (f64 arithmetic in `f`), compared with `<grad, dir>`.
    pub fn directional_fd(x: &[f32], dir: &[f32], eps: f64, f: impl Fn(&[f64]) -> f64) -> f64 {
        let xp: Vec<f64> = x
            .iter()
            .zip(dir)
            .map(|(a, d)| *a as f64 + eps * *d as f64)
            .collect();
        let xm: Vec<f64> = x
            .iter()
            .zip(dir)
            .map(|(a, d)| *a as f64 - eps * *d as f64)
            .collect();
        (f(&xp) - f(&xm)) / (2.0 * eps)
    }

    pub fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }
}

#[cfg(test)]
mod tests {

    /// `par_new` / `par_new2` hand every chunk (the last one short) to `f`
    /// once, zeroed, with its index, and keep what `f` wrote.
    #[test]
    fn par_new_fills_every_chunk_once_from_zeros() {
        for (n, chunk) in [
            (0usize, 4usize),
            (1, 4),
            (10, 4),
            (12, 4),
            (5, 100),
            (70_000, 1 << 14),
        ] {
            let v = super::par_new(n, chunk, |c, s| {
                assert!(s.iter().all(|x| *x == 0.0));
                assert_eq!(s.len(), chunk.min(n - c * chunk));
                for (k, x) in s.iter_mut().enumerate() {
                    *x = (c * chunk + k) as f32 + 0.5;
                }
            });
            assert_eq!(v, (0..n).map(|k| k as f32 + 0.5).collect::<Vec<_>>());
            let (a, b) = super::par_new2(n, chunk, |c, sa, sb| {
                assert!(sa.iter().chain(sb.iter()).all(|x| *x == 0.0));
                assert_eq!((sa.len(), sb.len()), (chunk.min(n - c * chunk), sa.len()));
                for (k, (x, y)) in sa.iter_mut().zip(sb.iter_mut()).enumerate() {
                    (*x, *y) = ((c * chunk + k) as f32, -((c * chunk + k) as f32));
                }
            });
            assert_eq!(a, (0..n).map(|k| k as f32).collect::<Vec<_>>());
            assert_eq!(b, (0..n).map(|k| -(k as f32)).collect::<Vec<_>>());
            assert_eq!(super::par_zeros(n), vec![0.0; n]);
        }
    }

    /// Work inside [`keep_pool_awake`] runs to the same results on pools of
    /// 2 and 3 threads: nested joins and parallel iterators (whose halves the
    /// spinning helpers take), 200 calls in a row (every helper ends before
    /// the next call's start), and a panicking body, which propagates while
    /// the helpers still stop (the next call completes).
    #[test]
    fn the_pool_kept_awake_runs_nested_work_and_stops_after_a_panic() {
        use rayon::prelude::*;
        for n in [2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .expect("pool");
            pool.install(|| {
                for k in 0..200u64 {
                    let (a, b) = super::keep_pool_awake(|| {
                        rayon::join(
                            || (0..1000u64).into_par_iter().map(|x| x * k).sum::<u64>(),
                            || (0..100u64).into_par_iter().map(|x| x + k).sum::<u64>(),
                        )
                    });
                    assert_eq!((a, b), (k * 499_500, 4950 + 100 * k));
                }
                let caught = std::panic::catch_unwind(|| {
                    super::keep_pool_awake(|| {
                        (0..64)
                            .into_par_iter()
                            .for_each(|x| assert_ne!(x, 63, "boom"));
                    })
                });
                assert!(caught.is_err());
                let after = super::keep_pool_awake(|| (0..10u32).into_par_iter().sum::<u32>());
                assert_eq!(after, 45);
            });
            // Drivers on four OS threads at once in one pool (as parallel
            // tests run training steps), with nested calls: all complete.
            std::thread::scope(|s| {
                for d in 0..4u64 {
                    let pool = &pool;
                    s.spawn(move || {
                        for k in 0..100u64 {
                            let got = pool.install(|| {
                                super::keep_pool_awake(|| {
                                    let inner = super::keep_pool_awake(|| {
                                        (0..300u64).into_par_iter().map(|x| x ^ d).sum::<u64>()
                                    });
                                    inner + (0..500u64).into_par_iter().map(|x| x * k).sum::<u64>()
                                })
                            });
                            let want = (0..300u64).map(|x| x ^ d).sum::<u64>() + 124_750 * k;
                            assert_eq!(got, want);
                        }
                    });
                }
            });
        }
    }
    use super::testutil::*;
    use super::*;

    #[test]
    fn matmul_matches_reference_all_transposes() {
        for &(m, n, k) in &[(3, 5, 7), (64, 48, 80), (130, 70, 90)] {
            for a_t in [false, true] {
                for b_t in [false, true] {
                    let a = rand_vec(m * k, 1, 1.0);
                    let b = rand_vec(k * n, 2, 1.0);
                    let init = rand_vec(m * n, 3, 1.0);
                    for acc in [false, true] {
                        let mut c1 = init.clone();
                        let mut c2 = init.clone();
                        matmul(m, n, k, &a, a_t, &b, b_t, &mut c1, acc, 0.5);
                        matmul_ref(m, n, k, &a, a_t, &b, b_t, &mut c2, acc, 0.5);
                        assert!(max_abs_diff(&c1, &c2) < 1e-4, "{m}x{n}x{k} {a_t} {b_t}");
                    }
                }
            }
        }
    }

    #[test]
    fn matmul_matches_candle() {
        use candle_core::{Device, Tensor};
        let (m, n, k) = (33, 17, 45);
        let a = rand_vec(m * k, 4, 1.0);
        let b = rand_vec(n * k, 5, 1.0);
        let mut c = vec![0.0; m * n];
        matmul(m, n, k, &a, false, &b, true, &mut c, false, 1.0);
        let ta = Tensor::from_slice(&a, (m, k), &Device::Cpu).unwrap();
        let tb = Tensor::from_slice(&b, (n, k), &Device::Cpu).unwrap();
        let tc = ta.matmul(&tb.t().unwrap()).unwrap();
        let tc: Vec<f32> = tc.flatten_all().unwrap().to_vec1().unwrap();
        assert!(max_abs_diff(&c, &tc) < 1e-5);
    }
}
