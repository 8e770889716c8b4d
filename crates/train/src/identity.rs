//! What a run trains on ([`Identity`]) and the stable hashes that pin it, so
//! that a checkpoint only resumes onto the same model, quantization and data.

use anyhow::{bail, Result};
use qlora_data::rows::Row;
use serde::{Deserialize, Serialize};

/// What the run trains on; a checkpoint only resumes onto the same identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Identity {
    /// How the user named the base model (informational).
    pub model_ref: String,
    /// Hash of the parsed model configuration (architecture and every shape).
    pub model_config_hash: String,
    /// Base weight format (`none`, `nf4`, …).
    pub quant: String,
    /// Hash of the tokenized training rows.
    pub data_hash: String,
}

impl Identity {
    pub fn check(&self, ck: &Identity) -> Result<()> {
        if self.model_config_hash != ck.model_config_hash {
            bail!(
                "the checkpoint was trained on a different base model ({} , config hash {}) than {} (config hash {})",
                ck.model_ref, ck.model_config_hash, self.model_ref, self.model_config_hash
            );
        }
        if self.quant != ck.quant {
            bail!(
                "the checkpoint was trained on a {} base but this run uses {}",
                ck.quant,
                self.quant
            );
        }
        if self.data_hash != ck.data_hash {
            bail!("the checkpoint was trained on different data (after tokenization); resume with the same data and settings");
        }
        Ok(())
    }
}

/// 64-bit FNV-1a, hex: stable across runs and platforms (unlike `DefaultHasher`).
pub fn fnv_hex(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

pub(crate) fn fnv_u64(bytes: &[u8]) -> u64 {
    u64::from_str_radix(&fnv_hex(bytes), 16).expect("hex")
}

/// Hash of tokenized rows (ids and labels).
pub fn rows_hash(rows: &[Row]) -> String {
    let mut buf = Vec::new();
    for r in rows {
        for p in &r.parts {
            for &t in &p.input_ids {
                buf.extend_from_slice(&t.to_le_bytes());
            }
            for &l in &p.labels {
                buf.extend_from_slice(&l.to_le_bytes());
            }
            buf.push(0xFE);
        }
        buf.push(0xFF);
    }
    fnv_hex(&buf)
}
