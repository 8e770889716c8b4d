//! Rows -> model batches: padding, packed-row position/segment ids, and the
//! count of loss targets (which normalises gradient accumulation).

use qlora_data::rows::Row;
use qlora_model::Batch;

/// Build a model batch from rows: right padding with labels −100; packed rows
/// (several parts) get position ids restarting per part and segment ids
/// (padding gets its own segment).
pub fn collate(rows: &[&Row], pad_id: u32) -> Batch {
    let s = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let packed = rows.iter().any(|r| r.parts.len() > 1);
    let mut b = Batch::default();
    let (mut pos_rows, mut seg_rows) = (Vec::new(), Vec::new());
    for r in rows {
        let (mut ids, mut labels, mut pos, mut seg) = r.flatten();
        let n = ids.len();
        let pad_seg = r.parts.len() as u32;
        ids.resize(s, pad_id);
        labels.resize(s, qlora_data::IGNORE_INDEX);
        pos.extend(0..(s - n) as u32);
        seg.resize(s, pad_seg);
        b.input_ids.push(ids);
        b.labels.push(labels);
        pos_rows.push(pos);
        seg_rows.push(seg);
    }
    if packed {
        b.position_ids = Some(pos_rows);
        b.segment_ids = Some(seg_rows);
    }
    b
}

/// Loss targets of one row after the shift (label ≠ −100 at t ≥ 1).
pub fn row_targets(r: &Row) -> usize {
    let (_, labels, _, _) = r.flatten();
    labels
        .iter()
        .skip(1)
        .filter(|&&l| l != qlora_data::IGNORE_INDEX)
        .count()
}

/// Loss targets of a batch after the shift (label ≠ −100 at t ≥ 1).
pub fn batch_targets(b: &Batch) -> usize {
    b.labels
        .iter()
        .map(|r| {
            r.iter()
                .skip(1)
                .filter(|&&l| l != qlora_data::IGNORE_INDEX)
                .count()
        })
        .sum()
}
