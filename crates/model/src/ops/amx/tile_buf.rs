//! The aligned buffer every packed AMX operand lives in.

/// A u16 buffer whose first element sits on a 64-byte boundary. Every tile
/// row the kernel loads is 64 bytes: unaligned, it straddles two cache lines,
/// and `TILELOADD` took 7x as long on this project's Sapphire Rapids machine
/// (four 1 KiB loads: 9 ns aligned, 60-64 ns at a 16- or 32-byte offset; the
/// 2x2 kernel on L1 data 3.0 vs 1.2 TFLOP/s on one core). `Vec` storage from
/// malloc is only 16-byte aligned, hence this type for every packed operand.
#[derive(Debug, Default)]
pub(crate) struct TileBuf {
    pub(super) raw: Vec<u16>,
    off: usize,
    len: usize,
}

impl TileBuf {
    pub(crate) const fn new() -> Self {
        TileBuf {
            raw: Vec::new(),
            off: 0,
            len: 0,
        }
    }

    /// Makes the buffer `n` elements long, its first one 64-byte aligned.
    /// The contents are kept while the storage does not grow; after growing
    /// they are unspecified (callers rewrite what they use).
    pub(crate) fn resize(&mut self, n: usize) {
        if self.raw.len() < n + 32 {
            self.raw.resize(n + 32, 0);
        }
        let addr = self.raw.as_ptr() as usize;
        // u16 storage is 2-byte aligned, so the distance is a whole element count
        self.off = (64 - addr % 64) % 64 / 2;
        self.len = n;
    }
}

impl std::ops::Deref for TileBuf {
    type Target = [u16];
    fn deref(&self) -> &[u16] {
        &self.raw[self.off..self.off + self.len]
    }
}

impl std::ops::DerefMut for TileBuf {
    fn deref_mut(&mut self) -> &mut [u16] {
        &mut self.raw[self.off..self.off + self.len]
    }
}
