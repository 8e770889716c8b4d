//! The `--out` folder of a training run: refuse to mix two runs' outputs,
//! clear an earlier run's outputs with `force`, remove what killed runs left.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// Files and folders a training run writes into its output folder (besides
/// `checkpoint-<step>` folders); `force` removes these and nothing else.
pub const RUN_OUTPUTS: [&str; 4] = ["adapter", "metrics.jsonl", "loss.svg", "samples.md"];

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

fn is_checkpoint_name(name: &str) -> bool {
    name.strip_prefix("checkpoint-")
        .is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
}

/// Get `out` ready for a run:
///
/// * a non-empty `out` is refused unless the run resumes from one of its own
///   checkpoints (`--resume <out>/checkpoint-N`) or `force` is given — a run
///   resumed from elsewhere must not overwrite another run's adapter and metrics;
/// * with `force` (and not resuming from `out`), the earlier run's checkpoints,
///   adapter, metrics, loss curve and samples are removed first, so no stale
///   checkpoint sits beside the new ones;
/// * temporary files and folders of killed runs (`*.tmp-<pid>` whose process
///   is gone) are removed.
pub fn prepare_output_dir(out: &Path, resume: Option<&Path>, force: bool) -> Result<()> {
    check_output_dir(out, resume, force)?;
    clear_output_dir(out, resume, force)
}

/// Whether `resume` is a checkpoint folder directly inside `out`.
fn resuming_into(out: &Path, resume: Option<&Path>) -> bool {
    resume.is_some_and(|ck| {
        ck.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .is_some_and(|p| same_dir(p, out))
    })
}

/// The refusal part of [`prepare_output_dir`], without touching anything
/// (run it before the slow loading, then [`prepare_output_dir`]).
pub fn check_output_dir(out: &Path, resume: Option<&Path>, force: bool) -> Result<()> {
    if !out.exists() || resuming_into(out, resume) {
        return Ok(());
    }
    if !out.is_dir() {
        bail!("{} exists and is not a folder", out.display());
    }
    let live = std::fs::read_dir(out)
        .with_context(|| format!("reading {}", out.display()))?
        .filter_map(|e| e.ok())
        .any(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            qlora_formats::durable::temp_owner(&n).is_none_or(qlora_formats::durable::process_alive)
        });
    if live && !force {
        bail!(
            "{} exists and is not empty (use --force to replace the earlier run's outputs, \
             or --resume {}/checkpoint-<step> to continue that run)",
            out.display(),
            out.display()
        );
    }
    Ok(())
}

fn clear_output_dir(out: &Path, resume: Option<&Path>, force: bool) -> Result<()> {
    if out.exists() && !resuming_into(out, resume) && force {
        qlora_formats::durable::remove_stale_temps(out);
        let entries: Vec<_> = std::fs::read_dir(out)
            .with_context(|| format!("reading {}", out.display()))?
            .filter_map(|e| e.ok())
            .collect();
        {
            for e in entries {
                let name = e.file_name().to_string_lossy().to_string();
                if !(is_checkpoint_name(&name) || RUN_OUTPUTS.contains(&name.as_str())) {
                    continue;
                }
                let p = e.path();
                let r = if e.file_type().is_ok_and(|t| t.is_dir()) {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
                r.with_context(|| format!("--force: removing {}", p.display()))?;
            }
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    qlora_formats::durable::remove_stale_temps(out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_folder_rules() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("run");
        // absent or empty: fine
        prepare_output_dir(&out, None, false).unwrap();
        prepare_output_dir(&out, None, false).unwrap();
        std::fs::create_dir_all(out.join("checkpoint-2/adapter")).unwrap();
        std::fs::create_dir_all(out.join("checkpoint-10")).unwrap();
        std::fs::create_dir_all(out.join("adapter")).unwrap();
        std::fs::write(out.join("metrics.jsonl"), "{}\n").unwrap();
        std::fs::write(out.join("notes.txt"), "mine").unwrap();
        let dead = 4_194_304 + 5;
        std::fs::create_dir_all(out.join(format!(".checkpoint-3.tmp-{dead}"))).unwrap();
        // non-empty: refused, also when resuming from another folder
        let e = prepare_output_dir(&out, None, false).unwrap_err();
        assert!(format!("{e:#}").contains("--force"), "{e:#}");
        let other = root.path().join("other/checkpoint-1");
        std::fs::create_dir_all(&other).unwrap();
        let e = prepare_output_dir(&out, Some(&other), false).unwrap_err();
        assert!(format!("{e:#}").contains("not empty"), "{e:#}");
        // resuming from its own checkpoint: fine, nothing removed but stale temps
        prepare_output_dir(&out, Some(&out.join("checkpoint-2")), false).unwrap();
        assert!(out.join("checkpoint-10").is_dir());
        if cfg!(target_os = "linux") {
            assert!(!out.join(format!(".checkpoint-3.tmp-{dead}")).exists());
        }
        // --force: the earlier run's outputs go, other files stay
        prepare_output_dir(&out, None, true).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        left.sort();
        assert_eq!(left, ["notes.txt"]);
        // a file where the folder should be
        let f = root.path().join("file");
        std::fs::write(&f, "x").unwrap();
        assert!(prepare_output_dir(&f, None, true).is_err());
    }
}
