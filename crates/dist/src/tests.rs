use super::*;

/// Run `f(rank comm)` on `n` threads; results in rank order.
fn on_threads<R: Send + 'static>(
    n: usize,
    f: impl Fn(ThreadGroup) -> R + Send + Sync + 'static,
) -> Vec<R> {
    let f = std::sync::Arc::new(f);
    let hs: Vec<_> = ThreadGroup::new(n)
        .into_iter()
        .map(|c| {
            let f = f.clone();
            std::thread::spawn(move || f(c))
        })
        .collect();
    hs.into_iter().map(|h| h.join().unwrap()).collect()
}

fn vals(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7 + rank * 13) % 97) as f32 * 0.37 - 11.0 + 1e-3 * rank as f32)
        .collect()
}

/// The reference: element-wise sum in rank order.
fn rank_order_sum(n: usize, len: usize) -> Vec<f32> {
    let mut s = vals(0, len);
    for r in 1..n {
        s.iter_mut().zip(vals(r, len)).for_each(|(a, b)| *a += b);
    }
    s
}

#[test]
fn all_reduce_is_the_rank_order_sum_bitwise_on_every_rank() {
    for n in 1..=4 {
        for len in [0usize, 1, 3, 10, 1000] {
            for seg in [1usize, 7, 1 << 20] {
                let got = on_threads(n, move |c| {
                    let mut v = vals(c.rank(), len);
                    all_reduce_segmented(&c, &mut v, seg).unwrap();
                    v
                });
                let want = rank_order_sum(n, len);
                for g in &got {
                    assert_eq!(
                        g.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                        want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                        "n={n} len={len} seg={seg}"
                    );
                }
            }
        }
    }
}

#[test]
fn f64_and_integer_all_reduce() {
    let got = on_threads(3, |c| {
        let mut a = [c.rank() as f64 + 0.5, 1.0];
        c.all_reduce_sum(&mut a).unwrap();
        let mut b = [c.rank() as u64 * 10, 1];
        c.all_reduce_sum(&mut b).unwrap();
        (a, b)
    });
    for (a, b) in got {
        assert_eq!(a, [4.5, 3.0]);
        assert_eq!(b, [30, 3]);
    }
}

#[test]
fn reduce_scatter_gather_broadcast_barrier() {
    let got = on_threads(3, |c| {
        let r = c.rank();
        // reduce-scatter: block k of rank r holds (r+1)*(k+1)
        let input: Vec<f32> = (0..3)
            .flat_map(|k| vec![((r + 1) * (k + 1)) as f32; 2])
            .collect();
        let mut out = vec![0f32; 2];
        c.reduce_scatter_sum(&input, &mut out).unwrap();
        let mut all = vec![0u32; 6];
        c.all_gather(&[r as u32, 100 + r as u32], &mut all).unwrap();
        let var = c.all_gather_var_bytes(&vec![r as u8; r]).unwrap();
        let mut b = if r == 2 {
            vec![9f64, 8.0]
        } else {
            vec![0.0; 2]
        };
        c.broadcast(&mut b, 2).unwrap();
        c.barrier().unwrap();
        (out, all, var, b)
    });
    for (r, (out, all, var, b)) in got.into_iter().enumerate() {
        // sum over ranks of (rank+1)*(r+1) = 6*(r+1)
        assert_eq!(out, vec![6.0 * (r + 1) as f32; 2]);
        assert_eq!(all, vec![0, 100, 1, 101, 2, 102]);
        assert_eq!(var, vec![vec![], vec![1u8], vec![2u8, 2]]);
        assert_eq!(b, vec![9.0, 8.0]);
    }
}

#[test]
fn check_same_names_the_disagreeing_rank() {
    let got = on_threads(3, |c| {
        let a = c.check_same("x", 5).is_ok();
        let e = c
            .check_same("the data", if c.rank() == 1 { 6 } else { 5 })
            .unwrap_err()
            .to_string();
        (a, e)
    });
    for (a, e) in got {
        assert!(a);
        assert!(
            e.contains("ranks disagree on the data") && e.contains("rank 1"),
            "{e}"
        );
    }
}

#[test]
fn size_mismatches_are_errors() {
    let s = SingleProcess;
    assert!(s.all_gather(&[1f32, 2.0], &mut [0f32; 3]).is_err());
    assert!(s.reduce_scatter_sum(&[1f32, 2.0], &mut [0f32; 1]).is_err());
    assert!(s.broadcast(&mut [1f32], 1).is_err());
    let mut v = [1f32, 2.0];
    s.all_reduce_sum(&mut v).unwrap();
    assert_eq!(v, [1.0, 2.0]);
}

#[test]
fn launcher_detection_without_a_launcher_is_single_process() {
    if launcher_world_size().is_none() {
        let c = from_env().unwrap();
        assert_eq!((c.rank(), c.size(), c.backend()), (0, 1, "single"));
    }
}
