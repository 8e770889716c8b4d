//! What the CUDA test files share: seeded random vectors, relative L2 distance, and
//! the GPU (or the reason there is none).
#![allow(dead_code)]

use qlora_model::backend::cuda::{self, CudaBackend};

pub fn rand_vec(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * scale
        })
        .collect()
}

/// `||a - b|| / ||b||`.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        num += (*x as f64 - *y as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

pub fn gpu() -> Option<CudaBackend> {
    if let Some(why) = cuda::cuda_unavailable() {
        if std::env::var("QLORA_REQUIRE_GPU").as_deref() == Ok("1") {
            panic!("QLORA_REQUIRE_GPU=1 but {why}");
        }
        eprintln!("SKIP (no GPU): {why}");
        return None;
    }
    Some(CudaBackend::new(0).expect("cuda:0"))
}
