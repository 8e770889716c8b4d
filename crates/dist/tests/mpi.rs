//! Two real MPI processes (needs the `mpi` feature and `mpirun` on the PATH;
//! skipped with a printed reason otherwise).
#![cfg(feature = "mpi")]

use qlora_dist::{Collectives, Communicator, MpiComm};

const CHILD: &str = "QLORA_DIST_MPI_CHILD";

#[test]
fn two_mpi_processes_run_every_collective() {
    let Some(mut cmd) = qlora_dist::mpirun(2) else {
        eprintln!("SKIPPED two_mpi_processes_run_every_collective: no `mpirun` on the PATH");
        return;
    };
    let exe = std::env::current_exe().unwrap();
    let out = cmd
        .arg(exe)
        .args([
            "--exact",
            "mpi_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "mpirun failed:\n{text}");
    for r in 0..2 {
        assert!(text.contains(&format!("mpi rank {r} of 2 ok")), "{text}");
    }
}

/// The body each MPI rank runs (only under the launcher above).
#[test]
#[ignore = "runs inside `mpirun`, started by two_mpi_processes_run_every_collective"]
fn mpi_child() {
    if std::env::var(CHILD).is_err() {
        return;
    }
    let c = MpiComm::init().unwrap();
    let (r, n) = (c.rank(), c.size());
    assert_eq!(n, 2);
    // all-reduce: bitwise the rank-order sum, on both ranks
    let vals = |rank: usize| -> Vec<f32> {
        (0..1001)
            .map(|i| ((i * 7 + rank * 13) % 97) as f32 * 0.37 - 11.0 + 1e-3 * rank as f32)
            .collect()
    };
    let mut v = vals(r);
    c.all_reduce_sum(&mut v).unwrap();
    let want: Vec<f32> = vals(0).iter().zip(vals(1)).map(|(a, b)| a + b).collect();
    assert_eq!(v, want);
    let mut d = [r as f64 + 0.25];
    c.all_reduce_sum(&mut d).unwrap();
    assert_eq!(d, [1.5]);
    // reduce-scatter
    let input = [r as f32 + 1.0, 10.0 * (r as f32 + 1.0)];
    let mut out = [0f32];
    c.reduce_scatter_sum(&input, &mut out).unwrap();
    assert_eq!(out[0], if r == 0 { 3.0 } else { 30.0 });
    // gathers, broadcast, barrier
    let mut all = [0u64; 4];
    c.all_gather(&[r as u64, 7], &mut all).unwrap();
    assert_eq!(all, [0, 7, 1, 7]);
    let var = c.all_gather_var_bytes(&vec![5u8; 3 * r + 1]).unwrap();
    assert_eq!(var, vec![vec![5u8; 1], vec![5u8; 4]]);
    let mut b = if r == 1 { [4f32, 2.0] } else { [0.0; 2] };
    c.broadcast(&mut b, 1).unwrap();
    assert_eq!(b, [4.0, 2.0]);
    assert!(c.check_same("a value", 9).is_ok());
    assert!(c.check_same("a value", r as u64).is_err());
    c.barrier().unwrap();
    println!("mpi rank {r} of {n} ok");
}
