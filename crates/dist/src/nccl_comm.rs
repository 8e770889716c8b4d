//! NCCL through cudarc (cargo feature `nccl` of this crate, which `qlora-cli`'s
//! `cuda` feature turns on): one rank per process, each on its own CUDA device,
//! the NCCL unique id created by rank 0 and carried to the other ranks by a
//! bootstrap communicator (MPI under `mpirun`), as llm.c does.
//!
//! **Never run.** This was written in a session without any GPU: it compiles
//! (and is clippy-clean) with `--features qlora-cli/cuda,qlora-cli/mpi`, and
//! that is all that is known about it. The trainer does not use it yet: the
//! sharded base is gathered in host memory over MPI (`--shard full` on the
//! CPU), and `--device cuda` refuses `--shard full`.
//!
//! [`NcclComm`] implements [`Communicator`] on host byte buffers (each call
//! copies up, runs the NCCL collective on the device, copies back), so the
//! deterministic typed reductions of [`crate::Collectives`] work on it as on
//! every other transport, and offers [`NcclComm::all_gather_device`] on
//! device buffers for a GPU trainer's layer gathers.

use std::ffi::c_char;
use std::sync::Arc;

use anyhow::{anyhow, bail, ensure, Result};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::{Comm, Id};

use crate::{Collectives, Communicator};

/// An NCCL communicator of `size` ranks, this process being `rank`, on one device.
pub struct NcclComm {
    comm: Comm,
    stream: Arc<CudaStream>,
    rank: usize,
    size: usize,
}

fn nccl<T>(what: &str, r: Result<T, cudarc::nccl::result::NcclError>) -> Result<T> {
    r.map_err(|e| anyhow!("NCCL {what}: {e:?}"))
}

impl NcclComm {
    /// Join the NCCL group of `bootstrap`'s ranks on CUDA device `ordinal`:
    /// rank 0 creates the unique id, `bootstrap` broadcasts its 128 bytes, and
    /// every rank calls `ncclCommInitRank` with the rank and size of `bootstrap`.
    /// Needs the NVIDIA driver and `libnccl.so.2` on the loader path (loaded at
    /// run time: building needs neither).
    pub fn init(bootstrap: &dyn Communicator, ordinal: usize) -> Result<NcclComm> {
        let (rank, size) = (bootstrap.rank(), bootstrap.size());
        let mut id = [0u8; 128];
        if rank == 0 {
            let made = nccl("ncclGetUniqueId", Id::new())?;
            for (b, c) in id.iter_mut().zip(made.internal()) {
                *b = *c as u8;
            }
        }
        bootstrap.broadcast_bytes(&mut id, 0)?;
        let mut internal = [0 as c_char; 128];
        for (c, b) in internal.iter_mut().zip(id) {
            *c = b as c_char;
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| anyhow!("cuda:{ordinal}: {e:?}"))?;
        let stream = ctx.default_stream();
        let comm = nccl(
            "ncclCommInitRank",
            Comm::from_rank(stream.clone(), rank, size, Id::uninit(internal)),
        )?;
        Ok(NcclComm {
            comm,
            stream,
            rank,
            size,
        })
    }

    /// The stream the collectives are queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// `out[r·n .. (r+1)·n] = rank r's mine` on the device (`n = mine.len()`, equal
    /// on every rank); queued on [`Self::stream`], not waited for.
    pub fn all_gather_device(&self, mine: &CudaSlice<u8>, out: &mut CudaSlice<u8>) -> Result<()> {
        ensure!(
            out.len() == mine.len() * self.size,
            "all_gather: output of {} bytes for {} ranks of {}",
            out.len(),
            self.size,
            mine.len()
        );
        nccl("ncclAllGather", self.comm.all_gather(mine, out))?;
        Ok(())
    }

    fn up(&self, x: &[u8]) -> Result<CudaSlice<u8>> {
        if x.is_empty() {
            bail!("NCCL collectives of 0 bytes are not sent");
        }
        self.stream
            .clone_htod(x)
            .map_err(|e| anyhow!("NCCL: upload: {e:?}"))
    }

    fn down(&self, x: &CudaSlice<u8>, out: &mut [u8]) -> Result<()> {
        let v = self
            .stream
            .clone_dtoh(x)
            .map_err(|e| anyhow!("NCCL: download: {e:?}"))?;
        out.copy_from_slice(&v);
        Ok(())
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn backend(&self) -> &'static str {
        "nccl"
    }
    fn all_gather_bytes(&self, mine: &[u8], out: &mut [u8]) -> Result<()> {
        ensure!(
            out.len() == mine.len() * self.size,
            "all_gather: size mismatch"
        );
        if mine.is_empty() {
            return Ok(());
        }
        let d_mine = self.up(mine)?;
        let mut d_out = self
            .stream
            .alloc_zeros::<u8>(out.len())
            .map_err(|e| anyhow!("NCCL: allocating {} bytes: {e:?}", out.len()))?;
        self.all_gather_device(&d_mine, &mut d_out)?;
        self.down(&d_out, out)
    }
    fn all_gather_var_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        // lengths first, then every rank's bytes padded to the longest
        let mut lens = vec![0u64; self.size];
        self.all_gather(&[mine.len() as u64], &mut lens)?;
        let max = lens.iter().copied().max().unwrap_or(0) as usize;
        let mut padded = mine.to_vec();
        padded.resize(max, 0);
        let mut all = vec![0u8; max * self.size];
        self.all_gather_bytes(&padded, &mut all)?;
        Ok(lens
            .iter()
            .enumerate()
            .map(|(r, &l)| all[r * max..r * max + l as usize].to_vec())
            .collect())
    }
    fn all_to_all_bytes(&self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        ensure!(
            send.len() == recv.len() && send.len().is_multiple_of(self.size),
            "all_to_all: {} bytes do not make {} equal blocks",
            send.len(),
            self.size
        );
        // NCCL has no all-to-all collective: every rank's whole buffer is
        // gathered and each takes its block (N times the traffic of a real
        // all-to-all; a grouped send/recv would avoid it).
        let b = send.len() / self.size;
        let mut all = vec![0u8; send.len() * self.size];
        self.all_gather_bytes(send, &mut all)?;
        let me = self.rank;
        for r in 0..self.size {
            let from = r * send.len() + me * b;
            recv[r * b..(r + 1) * b].copy_from_slice(&all[from..from + b]);
        }
        Ok(())
    }
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        ensure!(
            root < self.size,
            "broadcast from rank {root} of {}",
            self.size
        );
        if buf.is_empty() {
            return Ok(());
        }
        let mut d = self.up(buf)?;
        nccl(
            "ncclBroadcast",
            self.comm.broadcast_in_place(&mut d, root as i32),
        )?;
        self.down(&d, buf)
    }
    fn barrier(&self) -> Result<()> {
        let mut one = [0u8; 1];
        self.broadcast_bytes(&mut one, 0)?;
        self.stream
            .synchronize()
            .map_err(|e| anyhow!("NCCL barrier: {e:?}"))
    }
}
