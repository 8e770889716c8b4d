//! N ranks as threads of one process, exchanging through shared memory.
//! Exists so the distributed training logic can be tested by plain
//! `cargo test`, without MPI.

use std::sync::{Arc, Barrier, Mutex};

use anyhow::{ensure, Result};

use crate::Communicator;

struct Shared {
    barrier: Barrier,
    slots: Mutex<Vec<Vec<u8>>>,
}

/// One rank's handle of an in-process group (create them with [`ThreadGroup::new`]
/// and move each into its own thread).
pub struct ThreadGroup {
    rank: usize,
    size: usize,
    shared: Arc<Shared>,
}

impl ThreadGroup {
    /// Handles of ranks `0..n`.
    pub fn new(n: usize) -> Vec<ThreadGroup> {
        assert!(n > 0, "a group needs at least one rank");
        let shared = Arc::new(Shared {
            barrier: Barrier::new(n),
            slots: Mutex::new(vec![Vec::new(); n]),
        });
        (0..n)
            .map(|rank| ThreadGroup {
                rank,
                size: n,
                shared: shared.clone(),
            })
            .collect()
    }

    /// Publish `mine`, wait for everyone, let `read` look at all slots, wait again.
    fn exchange<R>(&self, mine: &[u8], read: impl FnOnce(&[Vec<u8>]) -> R) -> R {
        self.shared.slots.lock().unwrap()[self.rank] = mine.to_vec();
        self.shared.barrier.wait();
        let r = read(&self.shared.slots.lock().unwrap());
        self.shared.barrier.wait();
        r
    }
}

impl Communicator for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn backend(&self) -> &'static str {
        "threads"
    }
    fn all_gather_bytes(&self, mine: &[u8], out: &mut [u8]) -> Result<()> {
        let n = mine.len();
        ensure!(out.len() == n * self.size, "all_gather: size mismatch");
        let ok = self.exchange(mine, |slots| {
            if slots.iter().any(|s| s.len() != n) {
                return false;
            }
            for (r, s) in slots.iter().enumerate() {
                out[r * n..(r + 1) * n].copy_from_slice(s);
            }
            true
        });
        ensure!(ok, "all_gather: ranks passed different sizes");
        Ok(())
    }
    fn all_gather_var_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(self.exchange(mine, |slots| slots.to_vec()))
    }
    fn all_to_all_bytes(&self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        ensure!(
            send.len() == recv.len() && send.len().is_multiple_of(self.size),
            "all_to_all: {} bytes do not make {} equal blocks",
            send.len(),
            self.size
        );
        let b = send.len() / self.size;
        let me = self.rank;
        let ok = self.exchange(send, |slots| {
            if slots.iter().any(|s| s.len() != send.len()) {
                return false;
            }
            for (r, s) in slots.iter().enumerate() {
                recv[r * b..(r + 1) * b].copy_from_slice(&s[me * b..(me + 1) * b]);
            }
            true
        });
        ensure!(ok, "all_to_all: ranks passed different sizes");
        Ok(())
    }
    fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        ensure!(
            root < self.size,
            "broadcast from rank {root} of {}",
            self.size
        );
        let mine = buf.to_vec();
        let ok = self.exchange(&mine, |slots| {
            if slots[root].len() != buf.len() {
                return false;
            }
            buf.copy_from_slice(&slots[root]);
            true
        });
        ensure!(ok, "broadcast: ranks passed different sizes");
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.shared.barrier.wait();
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}
