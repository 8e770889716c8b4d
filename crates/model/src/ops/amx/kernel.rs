//! The AMX kernel and its drivers (x86_64 only): AMX detection and the
//! OS permission, the tile configuration, the 2 × 2 `TDPBF16PS` block, the
//! loops over blocks with their prefetches; on CPUs without AMX the same
//! drivers run the [`super::emulated`] block.

use std::arch::asm;

pub fn detect() -> bool {
    #[allow(unused_unsafe)]
    // SAFETY: CPUID is always available on x86_64.
    let (max, l7) = unsafe {
        (
            core::arch::x86_64::__cpuid_count(0, 0).eax,
            core::arch::x86_64::__cpuid_count(7, 0),
        )
    };
    if max < 7 {
        return false;
    }
    let amx_bf16 = (l7.edx >> 22) & 1 == 1;
    let amx_tile = (l7.edx >> 24) & 1 == 1;
    if !(amx_bf16 && amx_tile) {
        return false;
    }
    request_permission()
}

#[cfg(target_os = "linux")]
fn request_permission() -> bool {
    const SYS_ARCH_PRCTL: isize = 158;
    const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
    const XFEATURE_XTILEDATA: usize = 18;
    let ret: isize;
    // SAFETY: a plain syscall; it only changes this process's permitted
    // xstate components (or fails with an error code).
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

#[cfg(not(target_os = "linux"))]
fn request_permission() -> bool {
    false
}

#[repr(C, align(64))]
struct TileCfg([u8; 64]);

/// Palette 1; tmm0-7 all 16 rows × 64 bytes.
const CFG: TileCfg = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64;
        c[48 + t] = 16;
        t += 1;
    }
    TileCfg(c)
};

/// Lines `from..to` of a region of two tile streams (`s0`, `s1`, `half`
/// lines each) to prefetch into L2 over a kernel's k-steps.
#[derive(Clone, Copy)]
pub struct PfLines {
    s0: *const u8,
    s1: *const u8,
    half: usize,
    pub(in crate::ops::amx) from: usize,
    pub(in crate::ops::amx) to: usize,
}

impl PfLines {
    pub const NONE: PfLines = PfLines {
        s0: std::ptr::null(),
        s1: std::ptr::null(),
        half: 0,
        from: 0,
        to: 0,
    };

    pub(in crate::ops::amx) fn at(&self, l: usize) -> *const u8 {
        if l < self.half {
            self.s0.wrapping_add(l * 64)
        } else {
            self.s1.wrapping_add((l - self.half) * 64)
        }
    }
}

/// C (32×32 f32 at `c`, row stride `ldc` bytes) (+)= A (two tile streams:
/// rows 0..16 from `a`, rows 16..32 from `a + group` bf16, one 1024-byte
/// tile per k-step each, as [`super::pack_a`] lays them out) · B (two tile
/// streams `b0`, `b1`, likewise). Tile config must be loaded. `next_c`
/// (or null): the next block's C (same `ldc`), whose 64 lines are
/// prefetched for writing over the k-steps: a block's tile stores (and
/// loads) otherwise wait on memory line by line, 16 lines a row stride
/// apart, which no hardware prefetcher follows. Measured here: the
/// products over 30 layers' inputs and fresh outputs 626 -> 786 GFLOP/s
/// (q/o), 782 -> 1171-1216 (gate/up); a SmolLM2 step +3.7%. Off AMX
/// the [`super::emulated`] block makes the same prefetches in its first
/// pass (Zen 4, the products over 30 layers' inputs +3-7.5%).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn kernel(
    a: *const u16,
    group: usize,
    b0: *const u16,
    b1: *const u16,
    ksteps: usize,
    c: *mut f32,
    ldc: usize,
    acc: bool,
    next_c: *const f32,
    pf: PfLines,
) {
    if super::on_amx() {
        kernel_amx(a, group, b0, b1, ksteps, c, ldc, acc, next_c, pf)
    } else {
        let c10 = c.byte_add(16 * ldc);
        super::emulated::run(&super::emulated::Block {
            a0: a,
            a1: a.add(group),
            a_step: super::TILE_U16,
            b0,
            b1,
            b_step: super::TILE_U16,
            ksteps,
            c: [c, c.add(16), c10, c10.add(16)],
            ldc,
            acc,
            next_c,
            pf,
        })
    }
}

/// [`kernel`] on the AMX tiles.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn kernel_amx(
    a: *const u16,
    group: usize,
    b0: *const u16,
    b1: *const u16,
    ksteps: usize,
    c: *mut f32,
    ldc: usize,
    acc: bool,
    next_c: *const f32,
    pf: PfLines,
) {
    const TILE: usize = super::TILE_U16;
    let a1 = a.add(group);
    let c01 = c.add(16);
    let c10 = c.byte_add(16 * ldc);
    let c11 = c10.add(16);
    if acc {
        asm!(
            "tileloadd tmm0, [{c00} + {ldc}*1]",
            "tileloadd tmm1, [{c01} + {ldc}*1]",
            "tileloadd tmm2, [{c10} + {ldc}*1]",
            "tileloadd tmm3, [{c11} + {ldc}*1]",
            c00 = in(reg) c, c01 = in(reg) c01, c10 = in(reg) c10, c11 = in(reg) c11,
            ldc = in(reg) ldc,
            options(nostack, readonly),
        );
    } else {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem),
        );
    }
    // Spread over the k-steps: prefetch-for-write the next block's C
    // lines (32 rows x 2 lines), so its stores (and loads) do not wait
    // on memory one line at a time.
    let per_step = if next_c.is_null() {
        0
    } else {
        64usize.div_ceil(ksteps)
    };
    let pf_step = (pf.to - pf.from).div_ceil(ksteps);
    let mut pf_line = pf.from;
    let (mut a0, mut a1, mut b0, mut b1) = (a, a1, b0, b1);
    let mut line = 0usize;
    for _ in 0..ksteps {
        asm!(
            "tileloadd tmm4, [{a0} + {s64}*1]",
            "tileloadd tmm6, [{b0} + {s64}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{b1} + {s64}*1]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{a1} + {s64}*1]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a0 = in(reg) a0,
            a1 = in(reg) a1,
            b0 = in(reg) b0,
            b1 = in(reg) b1,
            s64 = in(reg) 64usize,
            options(nostack, readonly),
        );
        a0 = a0.add(TILE);
        a1 = a1.add(TILE);
        b0 = b0.add(TILE);
        b1 = b1.add(TILE);
        let pf_end = (pf_line + pf_step).min(pf.to);
        while pf_line < pf_end {
            asm!("prefetcht1 [{}]", in(reg) pf.at(pf_line), options(nostack, readonly, preserves_flags));
            pf_line += 1;
        }
        let end = (line + per_step).min(64);
        while line < end {
            let p = next_c.byte_add((line / 2) * ldc + (line % 2) * 64);
            asm!("prefetchw [{}]", in(reg) p, options(nostack, readonly, preserves_flags));
            line += 1;
        }
    }
    asm!(
        "tilestored [{c00} + {ldc}*1], tmm0",
        "tilestored [{c01} + {ldc}*1], tmm1",
        "tilestored [{c10} + {ldc}*1], tmm2",
        "tilestored [{c11} + {ldc}*1], tmm3",
        c00 = in(reg) c, c01 = in(reg) c01, c10 = in(reg) c10, c11 = in(reg) c11,
        ldc = in(reg) ldc,
        options(nostack),
    );
}

/// For every 32-row block of A (`mp` padded rows, `m` real ones, packed
/// by [`super::pack_a`] with `kp` padded columns; `a` may point at a later
/// k-step's tile of the first row group): C[rows, 0..nn] (+)= A · B, C at
/// `c` with row stride `ldc` floats; B's second tile stream starts
/// `bstride` tiles after its first. Partial blocks go through a 32×32
/// scratch.
#[allow(clippy::too_many_arguments)]
pub unsafe fn run_blocks(
    a: *const u16,
    kp: usize,
    mp: usize,
    m: usize,
    b: *const u16,
    ksteps: usize,
    bstride: usize,
    c: *mut f32,
    ldc: usize,
    nn: usize,
    acc: bool,
) {
    run_blocks_pf(a, kp, mp, m, b, ksteps, bstride, c, ldc, nn, acc, None)
}

/// [`run_blocks`], prefetching into L2 over its k-steps the `ksteps`
/// tiles of each stream of another B (`next`: its two streams' first
/// tiles): the next panel a row-split product multiplies, which the
/// other core may have packed (its lines then come from that core's
/// cache, one tile load at a time, when the kernel first reads them).
#[allow(clippy::too_many_arguments)]
pub unsafe fn run_blocks_pf(
    a: *const u16,
    kp: usize,
    mp: usize,
    m: usize,
    b: *const u16,
    ksteps: usize,
    bstride: usize,
    c: *mut f32,
    ldc: usize,
    nn: usize,
    acc: bool,
    next: Option<(*const u16, *const u16)>,
) {
    let _tiles = Tiles::configure();
    let b1 = b.add(bstride * super::TILE_U16);
    // C tiles straight from / to the output only when its rows are
    // 64-byte aligned (see `TileBuf`); else every block goes through the
    // aligned scratch below (a 4 KiB copy per block against the
    // ~2·ksteps KiB of operand tiles it loads).
    let c_aligned = (c as usize).is_multiple_of(64) && (ldc * 4).is_multiple_of(64);
    let full = if nn == 32 && c_aligned { m / 32 } else { 0 };
    let half = ksteps * super::TILE_U16 * 2 / 64;
    let per_block = if full > 0 {
        (2 * half).div_ceil(full)
    } else {
        0
    };
    for mb in 0..full {
        let r0 = mb * 32;
        let pf = match next {
            Some((s0, s1)) => PfLines {
                s0: s0 as *const u8,
                s1: s1 as *const u8,
                half,
                from: (mb * per_block).min(2 * half),
                to: ((mb + 1) * per_block).min(2 * half),
            },
            None => PfLines::NONE,
        };
        kernel(
            a.add(r0 * kp),
            16 * kp,
            b,
            b1,
            ksteps,
            c.add(r0 * ldc),
            ldc * 4,
            acc,
            if mb + 1 < full {
                c.add((r0 + 32) * ldc)
            } else {
                std::ptr::null()
            },
            pf,
        );
    }
    if full < mp / 32 {
        partial_blocks(a, kp, mp, m, b, b1, ksteps, c, ldc, nn, acc, full);
    }
}

/// The tile configuration loaded on this thread for as long as it
/// lives (released when dropped): blocks run one after another under
/// one `ldtilecfg` / `tilerelease` pair instead of one per block. Off
/// AMX (the [`super::emulated`] blocks) there is nothing to configure.
pub struct Tiles(bool);

impl Tiles {
    /// Loads the configuration (on AMX).
    ///
    /// # Safety
    /// The tile products are available ([`super::available`]); nothing
    /// else on this thread uses the tiles while the value lives.
    pub unsafe fn configure() -> Tiles {
        let amx = super::on_amx();
        if amx {
            asm!("ldtilecfg [{}]", in(reg) CFG.0.as_ptr(), options(nostack, readonly));
        }
        Tiles(amx)
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        if self.0 {
            // SAFETY: the configuration was loaded by `configure`.
            unsafe { asm!("tilerelease", options(nostack, nomem)) };
        }
    }
}

/// One 32-row block of [`run_blocks`] (`m <= 32` real rows at `a`),
/// prefetching `next_c` (a 32 x 32 f32 block, row stride `ldc`, or
/// null) for writing over its k-steps, under `_tiles`' configuration.
#[allow(clippy::too_many_arguments)]
pub unsafe fn run_block(
    _tiles: &Tiles,
    a: *const u16,
    kp: usize,
    m: usize,
    b: *const u16,
    ksteps: usize,
    bstride: usize,
    c: *mut f32,
    ldc: usize,
    nn: usize,
    acc: bool,
    next_c: *const f32,
) {
    let b1 = b.add(bstride * super::TILE_U16);
    let c_aligned = (c as usize).is_multiple_of(64) && (ldc * 4).is_multiple_of(64);
    if nn == 32 && m == 32 && c_aligned {
        kernel(
            a,
            16 * kp,
            b,
            b1,
            ksteps,
            c,
            ldc * 4,
            acc,
            next_c,
            PfLines::NONE,
        );
    } else {
        partial_blocks(a, kp, 32, m, b, b1, ksteps, c, ldc, nn, acc, 0);
    }
}

/// The blocks of [`run_blocks`] from `first` on, through an aligned
/// scratch (partial rows or columns, or a C not on cache lines): kept
/// out of `run_blocks` so that its 4 KiB scratch is not zeroed on every
/// call that has no such block (most of them; they are ~20k a step).
#[allow(clippy::too_many_arguments)]
#[inline(never)]
unsafe fn partial_blocks(
    a: *const u16,
    kp: usize,
    mp: usize,
    m: usize,
    b: *const u16,
    b1: *const u16,
    ksteps: usize,
    c: *mut f32,
    ldc: usize,
    nn: usize,
    acc: bool,
    first: usize,
) {
    #[repr(C, align(64))]
    struct Scratch([f32; 32 * 32]);
    let mut scratch = Scratch([0f32; 32 * 32]);
    let scratch = &mut scratch.0;
    for mb in first..mp / 32 {
        let r0 = mb * 32;
        let ab = a.add(r0 * kp);
        let cb = c.add(r0 * ldc);
        let rows = 32.min(m - r0);
        if acc {
            if rows < 32 || nn < 32 {
                scratch.fill(0.0);
            }
            for r in 0..rows {
                std::ptr::copy_nonoverlapping(
                    cb.add(r * ldc),
                    scratch.as_mut_ptr().add(r * 32),
                    nn,
                );
            }
        }
        kernel(
            ab,
            16 * kp,
            b,
            b1,
            ksteps,
            scratch.as_mut_ptr(),
            128,
            acc,
            std::ptr::null(),
            PfLines::NONE,
        );
        for r in 0..rows {
            std::ptr::copy_nonoverlapping(scratch.as_ptr().add(r * 32), cb.add(r * ldc), nn);
        }
    }
}
