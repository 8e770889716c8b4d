//! Crash safety: kill -9 at random moments during `train --save-every 1` and
//! `quantize`: no partial output is ever visible, resuming gives the same adapter
//! bit for bit, and the next run removes the temporary files.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{
    dir_names as names, fixtures as fx, metrics, qlora_cmd as qlora, run_combined as run,
    tiny_train as train, write_tiny_rows as write_rows,
};

/// Deterministic pseudo-random kill delays (no clock in the seed).
struct Lcg(u64);
impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n.max(1)
    }
}

/// Everything visible under `dir` is complete: no temporary names, every
/// checkpoint loadable (state, optimizer, adapter), the adapter complete.
fn assert_no_partial_output(dir: &Path) {
    for n in names(dir) {
        let p = dir.join(&n);
        if let Some(step) = n.strip_prefix("checkpoint-") {
            assert_eq!(
                names(&p),
                ["adapter", "optimizer.safetensors", "trainer_state.json"],
                "{n}"
            );
            let st: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(p.join("trainer_state.json")).unwrap(),
            )
            .unwrap();
            assert_eq!(st["step"].as_u64().unwrap().to_string(), step);
            safetensors::SafeTensors::deserialize(
                &std::fs::read(p.join("optimizer.safetensors")).unwrap(),
            )
            .unwrap();
            assert_adapter_complete(&p.join("adapter"));
        } else if n == "adapter" {
            assert_adapter_complete(&p);
        }
    }
}

fn assert_adapter_complete(p: &Path) {
    assert_eq!(
        names(p),
        ["adapter_config.json", "adapter_model.safetensors"],
        "{}",
        p.display()
    );
    serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(p.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    safetensors::SafeTensors::deserialize(
        &std::fs::read(p.join("adapter_model.safetensors")).unwrap(),
    )
    .unwrap();
}

fn last_checkpoint(dir: &Path) -> Option<PathBuf> {
    names(dir)
        .iter()
        .filter_map(|n| n.strip_prefix("checkpoint-")?.parse::<u64>().ok())
        .max()
        .map(|s| dir.join(format!("checkpoint-{s}")))
}

fn temp_names(dir: &Path) -> Vec<String> {
    names(dir)
        .into_iter()
        .filter(|n| n.contains(".tmp-"))
        .collect()
}

/// The moment a kill aims at, by the progress visible in the output folder
/// (never by wall-clock time, so the test aims the same on a loaded machine).
#[derive(Debug, Clone, Copy)]
enum Aim {
    /// As soon as the process exists.
    Start,
    /// Once `checkpoint-N` is visible (between optimizer steps).
    Checkpoint(u64),
    /// Once a temporary entry of this process (`….tmp-PID`) is visible:
    /// mid-write (stale ones of killed runs do not count).
    Writing,
}

impl Aim {
    fn reached(self, dir: &Path, pid: u32) -> bool {
        match self {
            Aim::Start => true,
            Aim::Checkpoint(n) => dir.join(format!("checkpoint-{n}")).exists(),
            Aim::Writing => {
                let mine = format!(".tmp-{pid}");
                temp_names(dir).iter().any(|n| n.ends_with(&mine))
            }
        }
    }
}

/// A process making no visible progress for this long is hung: the test
/// fails rather than waiting forever. Progress is any change of the output
/// folder's listing, so a slow (loaded) machine only makes the test slower.
const NO_PROGRESS_LIMIT: Duration = Duration::from_secs(300);

/// Start `c`, watch `dir` and SIGKILL the process `jitter_us` microseconds
/// after `aim` is reached; whether it was still running when killed.
fn kill_at(mut c: Command, dir: &Path, aim: Aim, jitter_us: u64) -> bool {
    let mut child = c
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = names(dir);
    let mut changed = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return false; // finished before the aim: nothing to kill
        }
        if aim.reached(dir, child.id()) {
            break;
        }
        let now = names(dir);
        if now != seen {
            seen = now;
            changed = Instant::now();
        }
        assert!(
            changed.elapsed() < NO_PROGRESS_LIMIT,
            "{aim:?}: no progress in {} for {NO_PROGRESS_LIMIT:?}",
            dir.display()
        );
        std::thread::sleep(Duration::from_micros(200));
    }
    std::thread::sleep(Duration::from_micros(jitter_us));
    let running = child.try_wait().unwrap().is_none();
    let _ = child.kill(); // SIGKILL on unix
    let _ = child.wait();
    running
}

/// Runs of the crash test: at most this many, until enough kills landed.
const MAX_RUNS: usize = 8;
/// Kills that must land in a running process after it made progress.
const WANTED_KILLS: usize = 3;

#[test]
fn kill_9_during_training_and_quantize_leaves_no_partial_output() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("rows.jsonl");
    write_rows(&data);
    let flags = ["--save-every", "1"];
    // the uninterrupted reference
    let reference = tmp.path().join("ref");
    let (ok, err) = run(train(&data, &reference, &flags));
    assert!(ok, "{err}");
    let want = std::fs::read(reference.join("adapter/adapter_model.safetensors")).unwrap();
    let mut rng = Lcg(13);
    // kills that hit a running training after it had made progress
    // (a checkpoint or a temporary entry visible), and of those mid-write
    let (mut landed, mut mid_write) = (0, 0);
    let mut runs = 0;
    while runs < MAX_RUNS && landed < WANTED_KILLS {
        let i = runs;
        runs += 1;
        let out = tmp.path().join(format!("run{i}"));
        // up to two kills per run, then finish by resuming
        for _ in 0..2 {
            let resume = last_checkpoint(&out);
            let mut extra: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
            match &resume {
                Some(ck) => extra.extend(["--resume".into(), ck.display().to_string()]),
                None if out.exists() => extra.push("--force".into()),
                None => {}
            }
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            // 6 steps, a checkpoint after each: aim at a later checkpoint
            // than the one resumed from, at a write, or at the start.
            let from = resume
                .as_ref()
                .and_then(|p| {
                    p.file_name()?
                        .to_str()?
                        .strip_prefix("checkpoint-")?
                        .parse()
                        .ok()
                })
                .unwrap_or(0u64);
            let aim = match rng.below(4) {
                0 => Aim::Start,
                1 => Aim::Writing,
                _ if from >= 5 => Aim::Writing,
                _ => Aim::Checkpoint((from + 1 + rng.below(3)).min(5)),
            };
            let hit = kill_at(train(&data, &out, &extra), &out, aim, rng.below(3000));
            if hit && !matches!(aim, Aim::Start) {
                landed += 1;
                mid_write += usize::from(matches!(aim, Aim::Writing));
            }
            if out.exists() {
                assert_no_partial_output(&out);
            }
        }
        // the adapter is written last: without it the run is not finished
        if !out.join("adapter").exists() {
            let mut extra: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
            match last_checkpoint(&out) {
                Some(ck) => extra.extend(["--resume".into(), ck.display().to_string()]),
                None if out.exists() => extra.push("--force".into()),
                None => {}
            }
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            let (ok, err) = run(train(&data, &out, &extra));
            assert!(ok, "{err}");
        }
        assert_eq!(
            std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap(),
            want,
            "run {i}: the resumed adapter differs from the uninterrupted one"
        );
        assert_no_partial_output(&out);
        assert!(temp_names(&out).is_empty(), "{:?}", temp_names(&out));
        // identical runs report identical numbers, to the last bit
        let (a, b) = (metrics(&reference), metrics(&out));
        assert_eq!(a.len(), 6);
        assert_eq!(b.len(), 6, "run {i}");
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x["loss"], y["loss"], "run {i}");
            assert_eq!(x["grad_norm"], y["grad_norm"], "run {i}");
        }
    }
    assert!(
        landed > 0,
        "no kill hit a running training after progress in {runs} runs"
    );
    eprintln!("{landed} kills landed in running trainings ({mid_write} mid-write) in {runs} runs");

    // quantize: the output folder is absent or complete, never partial
    let model = fx().join("tiny_llama/model");
    let q = |out: &Path, force: bool| {
        let mut c = qlora();
        c.arg("quantize").arg(&model).arg("--out").arg(out);
        if force {
            c.arg("--force");
        }
        c
    };
    let qref = tmp.path().join("qref");
    let (ok, err) = run(q(&qref, false));
    assert!(ok, "{err}");
    let qwant = std::fs::read(qref.join("model.safetensors")).unwrap();
    let qroot = tmp.path().join("q");
    std::fs::create_dir_all(&qroot).unwrap();
    let qout = qroot.join("out");
    let mut landed = 0;
    for attempt in 0..4 * MAX_RUNS {
        if attempt >= 4 && landed >= WANTED_KILLS {
            break;
        }
        // the temporary output folder appears in `qroot` while quantize writes
        let aim = if rng.below(4) == 0 {
            Aim::Start
        } else {
            Aim::Writing
        };
        let hit = kill_at(q(&qout, true), &qroot, aim, rng.below(2000));
        landed += usize::from(hit && matches!(aim, Aim::Writing));
        if qout.exists() {
            assert_eq!(names(&qout), names(&qref));
            assert_eq!(
                std::fs::read(qout.join("model.safetensors")).unwrap(),
                qwant
            );
        }
    }
    assert!(landed > 0, "no kill hit a quantize while it was writing");
    let (ok, err) = run(q(&qout, true));
    assert!(ok, "{err}");
    assert_eq!(
        std::fs::read(qout.join("model.safetensors")).unwrap(),
        qwant
    );
    assert_eq!(names(&qroot), ["out"], "temporary files left");
}
