//! Printed reports shared by `quantize`, `dequantize` and `merge`.

use std::collections::BTreeMap;

use qlora_formats::convert::ConvertReport;

use crate::text::human;

fn by_dtype(m: &BTreeMap<String, u64>) -> String {
    m.iter()
        .map(|(d, b)| format!("{d} {}", human(*b)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Input/output bytes per dtype and the ratio.
pub fn print_sizes(r: &ConvertReport) {
    println!(
        "input  tensor data: {} [{}]",
        human(r.input_total()),
        by_dtype(&r.input_bytes)
    );
    println!(
        "output tensor data: {} [{}]",
        human(r.output_total()),
        by_dtype(&r.output_bytes)
    );
    if r.input_total() > 0 {
        println!(
            "output / input: {:.3}",
            r.output_total() as f64 / r.input_total() as f64
        );
    }
}

pub fn print_files(r: &ConvertReport) {
    for f in &r.files {
        println!("wrote {}", f.display());
    }
}
