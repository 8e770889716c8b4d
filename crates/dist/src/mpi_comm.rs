//! MPI through rsmpi (`mpi` crate): `MPI_COMM_WORLD`, CPU buffers.

use anyhow::{bail, ensure, Result};
use mpi::datatype::PartitionMut;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator as _, CommunicatorCollectives as _, Root as _};
use mpi::Count;

use crate::{Collectives, Communicator};

/// `MPI_COMM_WORLD` of this process; MPI is finalized when it is dropped.
pub struct MpiComm {
    // Field order matters: the communicator goes before the universe (MPI_Finalize).
    world: SimpleCommunicator,
    _universe: Universe,
}

fn count(n: usize, what: &str) -> Result<Count> {
    match Count::try_from(n) {
        Ok(c) => Ok(c),
        Err(_) => bail!("{what}: {n} bytes is more than one MPI message can carry"),
    }
}

impl MpiComm {
    /// Initialize MPI (once per process).
    pub fn init() -> Result<MpiComm> {
        let Some(universe) = mpi::initialize() else {
            bail!("MPI was already initialized in this process");
        };
        let world = universe.world();
        Ok(MpiComm {
            world,
            _universe: universe,
        })
    }
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }
    fn size(&self) -> usize {
        self.world.size() as usize
    }
    fn backend(&self) -> &'static str {
        "mpi"
    }
    fn all_gather_bytes(&self, mine: &[u8], out: &mut [u8]) -> Result<()> {
        ensure!(
            out.len() == mine.len() * self.size(),
            "all_gather: size mismatch"
        );
        count(out.len(), "all_gather")?;
        self.world.all_gather_into(mine, out);
        Ok(())
    }
    fn all_gather_var_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let n = self.size();
        let mut lens = vec![0u64; n];
        self.all_gather(&[mine.len() as u64], &mut lens)?;
        let total: u64 = lens.iter().sum();
        count(total as usize, "all_gather (variable sizes)")?;
        let counts: Vec<Count> = lens.iter().map(|&l| l as Count).collect();
        let displs: Vec<Count> = counts
            .iter()
            .scan(0, |acc, &c| {
                let d = *acc;
                *acc += c;
                Some(d)
            })
            .collect();
        let mut buf = vec![0u8; total as usize];
        {
            let mut part = PartitionMut::new(&mut buf[..], &counts[..], &displs[..]);
            self.world.all_gather_varcount_into(mine, &mut part);
        }
        Ok(counts
            .iter()
            .zip(&displs)
            .map(|(&c, &d)| buf[d as usize..(d + c) as usize].to_vec())
            .collect())
    }
    fn all_to_all_bytes(&self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        ensure!(
            send.len() == recv.len() && send.len().is_multiple_of(self.size()),
            "all_to_all: {} bytes do not make {} equal blocks",
            send.len(),
            self.size()
        );
        count(send.len(), "all_to_all")?;
        self.world.all_to_all_into(send, recv);
        Ok(())
    }
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        ensure!(
            root < self.size(),
            "broadcast from rank {root} of {}",
            self.size()
        );
        count(buf.len(), "broadcast")?;
        self.world.process_at_rank(root as i32).broadcast_into(buf);
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
