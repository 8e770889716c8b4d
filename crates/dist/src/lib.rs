//! Communicators for data-parallel and sharded training.
//!
//! A [`Communicator`] is a group of `size()` ranks that call the same
//! collectives in the same order. Implementations provide a few byte-level
//! primitives (all-gather, all-to-all, broadcast, barrier); the typed
//! reductions ([`Collectives::all_reduce_sum`], [`Collectives::reduce_scatter_sum`])
//! are built on them here, once, so that they are **deterministic**: element `i`
//! of a sum is always `((x₀ + x₁) + x₂) + …` in rank order, on every rank and in
//! every implementation, whatever algorithm the transport uses. Every rank
//! therefore ends a step with bit-identical gradients and parameters.
//!
//! Implementations:
//! - [`SingleProcess`]: one rank, no transport (what a plain `qlora train` uses).
//! - [`ThreadGroup`]: N ranks as threads of one process (tests of the
//!   distributed logic without MPI).
//! - `MpiComm` (cargo feature `mpi`): MPI through the `mpi` crate (rsmpi), CPU
//!   buffers, multi-process and multi-node; launched by `mpirun -n N qlora …`.
//!
//! - `NcclComm` (cargo feature `nccl`, on with `qlora-cli`'s `cuda`): NCCL
//!   through cudarc, the unique id broadcast from rank 0 by a bootstrap
//!   communicator (MPI), as llm.c does. **Written and compiled, never run**: the
//!   session that wrote it had no GPU, and the trainer does not use it yet.

use anyhow::{bail, ensure, Result};
use bytemuck::Pod;

mod thread;
pub use thread::ThreadGroup;

#[cfg(feature = "mpi")]
mod mpi_comm;
#[cfg(feature = "mpi")]
pub use mpi_comm::MpiComm;

#[cfg(feature = "nccl")]
mod nccl_comm;
#[cfg(feature = "nccl")]
pub use nccl_comm::NcclComm;

/// Largest single message of the typed collectives, in bytes (they split larger
/// buffers into segments; this also bounds their temporary memory).
pub const SEGMENT_BYTES: usize = 64 << 20;

/// The transport primitives. All ranks must call the same methods in the same
/// order with compatible sizes.
pub trait Communicator {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Short name of the transport (`single`, `threads`, `mpi`).
    fn backend(&self) -> &'static str;
    /// `out[r·n .. (r+1)·n] = rank r's mine` with `n = mine.len()` equal on every rank.
    fn all_gather_bytes(&self, mine: &[u8], out: &mut [u8]) -> Result<()>;
    /// Every rank's `mine` (lengths may differ), in rank order.
    fn all_gather_var_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// `send` is `size` equal blocks; `recv` block `r` becomes block `rank()` of rank r's `send`.
    fn all_to_all_bytes(&self, send: &[u8], recv: &mut [u8]) -> Result<()>;
    /// Rank `root`'s `buf` copied into every rank's `buf` (same length everywhere).
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    /// Stop every rank of the group (MPI_Abort); used when one rank fails so
    /// that the others do not wait forever in a collective.
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// Element types of the typed collectives.
pub trait Element: Pod + Copy + Default + std::ops::AddAssign {}
impl Element for f32 {}
impl Element for f64 {}
impl Element for u64 {}
impl Element for i64 {}
impl Element for u32 {}

/// Typed collectives on top of [`Communicator`], for every implementation.
pub trait Collectives: Communicator {
    /// In-place sum over ranks, deterministic (rank-order sums, see the crate docs).
    fn all_reduce_sum<T: Element>(&self, buf: &mut [T]) -> Result<()> {
        all_reduce_segmented(self, buf, SEGMENT_BYTES / std::mem::size_of::<T>())
    }

    /// `input` is `size` blocks of `out.len()`; `out` = the sum over ranks of
    /// their block `rank()`, added in rank order.
    fn reduce_scatter_sum<T: Element>(&self, input: &[T], out: &mut [T]) -> Result<()> {
        let n = self.size();
        let block = out.len();
        ensure!(
            input.len() == n * block,
            "reduce_scatter: input of {} elements is not {n} blocks of {block}",
            input.len()
        );
        if n == 1 {
            out.copy_from_slice(input);
            return Ok(());
        }
        let mut recv = vec![T::default(); n * block];
        self.all_to_all_bytes(
            bytemuck::cast_slice(input),
            bytemuck::cast_slice_mut(&mut recv),
        )?;
        out.copy_from_slice(&recv[..block]);
        for r in 1..n {
            out.iter_mut()
                .zip(&recv[r * block..(r + 1) * block])
                .for_each(|(o, &v)| *o += v);
        }
        Ok(())
    }

    /// `out[r·n..(r+1)·n]` = rank r's `mine`.
    fn all_gather<T: Element>(&self, mine: &[T], out: &mut [T]) -> Result<()> {
        ensure!(
            out.len() == mine.len() * self.size(),
            "all_gather: output of {} elements for {} ranks of {}",
            out.len(),
            self.size(),
            mine.len()
        );
        if self.size() == 1 {
            out.copy_from_slice(mine);
            return Ok(());
        }
        self.all_gather_bytes(bytemuck::cast_slice(mine), bytemuck::cast_slice_mut(out))
    }

    /// Rank `root`'s values into every rank's `buf`.
    fn broadcast<T: Element>(&self, buf: &mut [T], root: usize) -> Result<()> {
        ensure!(
            root < self.size(),
            "broadcast from rank {root} of {}",
            self.size()
        );
        if self.size() == 1 {
            return Ok(());
        }
        self.broadcast_bytes(bytemuck::cast_slice_mut(buf), root)
    }

    /// Fail on every rank unless all ranks pass the same value (a cheap guard
    /// that the ranks agree on settings, data and step).
    fn check_same(&self, what: &str, value: u64) -> Result<()> {
        let n = self.size();
        if n == 1 {
            return Ok(());
        }
        let mut all = vec![0u64; n];
        self.all_gather(&[value], &mut all)?;
        if let Some(r) = all.iter().position(|&v| v != all[0]) {
            bail!(
                "ranks disagree on {what}: rank 0 has {:#x}, rank {r} has {:#x}",
                all[0],
                all[r]
            );
        }
        Ok(())
    }
}

impl<C: Communicator + ?Sized> Collectives for C {}

/// All-reduce in segments of at most `seg` elements: reduce-scatter (each rank
/// sums one block in rank order) then all-gather of the sums.
fn all_reduce_segmented<C: Communicator + ?Sized, T: Element>(
    comm: &C,
    buf: &mut [T],
    seg: usize,
) -> Result<()> {
    let n = comm.size();
    if n == 1 || buf.is_empty() {
        return Ok(());
    }
    for part in buf.chunks_mut(seg.max(n)) {
        let block = part.len().div_ceil(n);
        let mut send = vec![T::default(); block * n];
        send[..part.len()].copy_from_slice(part);
        let mut mine = vec![T::default(); block];
        comm.reduce_scatter_sum(&send, &mut mine)?;
        drop(send);
        let mut all = vec![T::default(); block * n];
        comm.all_gather(&mine, &mut all)?;
        part.copy_from_slice(&all[..part.len()]);
    }
    Ok(())
}

/// The one-rank communicator of a plain (non-MPI) run: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn backend(&self) -> &'static str {
        "single"
    }
    fn all_gather_bytes(&self, mine: &[u8], out: &mut [u8]) -> Result<()> {
        ensure!(out.len() == mine.len(), "all_gather: size mismatch");
        out.copy_from_slice(mine);
        Ok(())
    }
    fn all_gather_var_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![mine.to_vec()])
    }
    fn all_to_all_bytes(&self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        ensure!(send.len() == recv.len(), "all_to_all: size mismatch");
        recv.copy_from_slice(send);
        Ok(())
    }
    fn broadcast_bytes(&self, _buf: &mut [u8], root: usize) -> Result<()> {
        ensure!(root == 0, "broadcast from rank {root} of 1");
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// The launcher's world size from the environment, if this process was started
/// by an MPI launcher (Open MPI, MPICH/Hydra, PMIx or Slurm's PMI).
pub fn launcher_world_size() -> Option<usize> {
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_SIZE",
        "MPI_LOCALNRANKS",
    ]
    .iter()
    .find_map(|k| std::env::var(k).ok()?.trim().parse().ok())
}

/// The communicator of this process: MPI when started by an MPI launcher (and
/// built with the `mpi` feature), else [`SingleProcess`]. A launcher without
/// the feature is an error rather than N independent runs writing the same files.
pub fn from_env() -> Result<Box<dyn Communicator>> {
    match launcher_world_size() {
        None => Ok(Box::new(SingleProcess)),
        Some(n) => from_launcher(n),
    }
}

/// Run `f` on this process's communicator ([`from_env`]). When `f` fails on one of
/// several ranks, the error is printed with the rank and every rank is aborted: the
/// others may be waiting in a collective for this one and would hang forever.
pub fn run_on_env<T>(f: impl FnOnce(&dyn Communicator) -> Result<T>) -> Result<T> {
    let comm = from_env()?;
    let res = f(&*comm);
    if let Err(e) = &res {
        if comm.size() > 1 {
            eprintln!("error (rank {} of {}): {e:#}", comm.rank(), comm.size());
            comm.abort(1);
        }
    }
    res
}

#[cfg(feature = "mpi")]
fn from_launcher(_n: usize) -> Result<Box<dyn Communicator>> {
    Ok(Box::new(MpiComm::init()?))
}

#[cfg(not(feature = "mpi"))]
fn from_launcher(n: usize) -> Result<Box<dyn Communicator>> {
    if n <= 1 {
        return Ok(Box::new(SingleProcess));
    }
    bail!(
        "started by an MPI launcher with {n} processes, but this qlora was built without MPI; \
         rebuild with `cargo build --release -p qlora-cli --features mpi` (needs libopenmpi-dev and libclang-dev)"
    )
}

/// `mpirun -n <n>` ready for tests and scripts, or why it cannot run: `None`
/// when no `mpirun` is on the PATH. Open MPI is told (through its environment
/// variables, which MPICH ignores) to allow root and more ranks than cores.
pub fn mpirun(n: usize) -> Option<std::process::Command> {
    let found = std::process::Command::new("mpirun")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        return None;
    }
    let mut c = std::process::Command::new("mpirun");
    c.arg("-n")
        .arg(n.to_string())
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        // no InfiniBand/verbs probing warnings on machines without it
        .env("OMPI_MCA_btl", "self,vader,tcp")
        .env("OMPI_MCA_pml", "ob1");
    Some(c)
}

/// Whether this build can talk MPI.
pub const HAS_MPI: bool = cfg!(feature = "mpi");

#[cfg(test)]
mod tests;
