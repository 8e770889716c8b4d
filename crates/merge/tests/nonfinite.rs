//! Merging never writes inf/NaN: a delta that overflows, or a non-finite base
//! weight under an adapted module, is an error instead of a NaN model.

use qlora_lora::{LoraWeights, Matrix};
use qlora_merge::add_delta;

fn lora(a: Vec<f32>, b: Vec<f32>) -> LoraWeights {
    LoraWeights {
        a: Matrix::new(1, 2, a).unwrap(),
        b: Matrix::new(2, 1, b).unwrap(),
        magnitude: None,
    }
}

#[test]
fn non_finite_merges_are_refused() {
    let mut w = vec![1.0f32, 2.0, 3.0, 4.0];
    let d = add_delta(&mut w, &lora(vec![1.0, 0.5], vec![2.0, -1.0]), 0.5).unwrap();
    assert_eq!(w, [2.0, 2.5, 2.5, 3.75]);
    assert_eq!(d, 1.0);
    // overflow to inf
    let mut w = vec![1.0f32; 4];
    let e = add_delta(&mut w, &lora(vec![3e38, 1.0], vec![10.0, 1.0]), 1.0).unwrap_err();
    assert!(e.to_string().contains("non-finite"), "{e}");
    // a NaN in the base weight
    let mut w = vec![1.0, f32::NAN, 1.0, 1.0];
    let e = add_delta(&mut w, &lora(vec![0.0, 0.0], vec![0.0, 0.0]), 1.0).unwrap_err();
    assert!(e.to_string().contains("non-finite"), "{e}");
}
