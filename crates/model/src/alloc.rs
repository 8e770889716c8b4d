//! A global allocator for programs that train on AMX: allocations of 4 KiB
//! and more start on a 64-byte boundary, so that the products' output rows
//! (the activations) are cache-line aligned and the AMX kernel loads and
//! stores its result tiles in place (a tile row off a cache line costs two
//! lines; see `ops::amx::TileBuf`). Everything else is the system allocator.
//!
//! Install it in a binary: `#[global_allocator] static A: qlora_model::alloc::LineAligned = qlora_model::alloc::LineAligned;`

use std::alloc::{GlobalAlloc, Layout, System};

/// See the module docs.
pub struct LineAligned;

/// Allocations at least this big are aligned to [`LINE`].
const BIG: usize = 4096;
const LINE: usize = 64;

fn adjusted(l: Layout) -> Layout {
    if l.size() >= BIG && l.align() < LINE {
        // SAFETY: LINE is a power of two; size >= BIG cannot overflow when rounded to LINE
        // (Layout's own size limit is isize::MAX - (align - 1)).
        unsafe { Layout::from_size_align_unchecked(l.size(), LINE) }
    } else {
        l
    }
}

// SAFETY: every block is allocated and freed by `System` with the same
// adjusted layout (a pure function of the caller's layout), so System's
// contract holds; `realloc` moves a block between alignment classes by hand.
unsafe impl GlobalAlloc for LineAligned {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        System.alloc(adjusted(l))
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        System.alloc_zeroed(adjusted(l))
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, adjusted(l))
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        let old = adjusted(l);
        let new = adjusted(Layout::from_size_align_unchecked(new_size, l.align()));
        if old.align() == new.align() {
            return System.realloc(p, old, new_size);
        }
        let q = System.alloc(new);
        if !q.is_null() {
            std::ptr::copy_nonoverlapping(p, q, l.size().min(new_size));
            System.dealloc(p, old);
        }
        q
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_blocks_are_line_aligned_and_survive_reallocation_across_the_threshold() {
        let a = LineAligned;
        unsafe {
            for size in [1usize, 100, 4095, 4096, 10_000, 1 << 20] {
                let l = Layout::from_size_align(size, 4).unwrap();
                let p = a.alloc(l);
                assert!(!p.is_null());
                if size >= BIG {
                    assert_eq!(p as usize % LINE, 0, "size {size}");
                }
                for k in 0..size {
                    *p.add(k) = (k % 251) as u8;
                }
                // grow across the class boundary and back, contents kept
                let q = a.realloc(p, l, size * 3 + 5000);
                assert_eq!(q as usize % LINE, 0);
                assert!((0..size).all(|k| *q.add(k) == (k % 251) as u8));
                let l2 = Layout::from_size_align(size * 3 + 5000, 4).unwrap();
                let r = a.realloc(q, l2, 10);
                assert!((0..size.min(10)).all(|k| *r.add(k) == (k % 251) as u8));
                a.dealloc(r, Layout::from_size_align(10, 4).unwrap());
                let z = a.alloc_zeroed(l);
                assert!((0..size).all(|k| *z.add(k) == 0));
                a.dealloc(z, l);
            }
        }
    }
}
