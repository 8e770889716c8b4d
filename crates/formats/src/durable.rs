//! Replacing a finished output folder in one step, and cleaning up the
//! temporary files and folders (`<name>.tmp-<pid>`, `.<name>.tmp-<pid>`) that a
//! killed process left behind.
//!
//! A folder is built under a temporary name beside its final place; then
//! [`replace_dir`] swaps it in. On Linux the swap is one `renameat2(…,
//! RENAME_EXCHANGE)`, so at every instant the final name holds either the
//! complete old folder or the complete new one (a crash right after the swap
//! leaves the old one under the temporary name, which [`remove_stale_temps`]
//! removes on the next run). Elsewhere it falls back to rename-aside.

use std::path::{Path, PathBuf};

/// fsync a folder so that renames inside it survive a power loss (no-op
/// where folders cannot be opened, e.g. Windows).
pub fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::fs::File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

fn parent_of(p: &Path) -> &Path {
    p.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let ca = CString::new(a.as_os_str().as_bytes())?;
    let cb = CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: two valid NUL-terminated paths; renameat2 does not retain them.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> std::io::Result<()> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

/// Put the finished folder `tmp` at `dest`, replacing whatever is there
/// (a folder or a file) without a moment where `dest` is missing (Linux), then
/// fsync the parent folder.
pub fn replace_dir(tmp: &Path, dest: &Path) -> std::io::Result<()> {
    let parent = parent_of(dest);
    match std::fs::symlink_metadata(dest) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::rename(tmp, dest)?;
        }
        Err(e) => return Err(e),
        Ok(_) => match exchange(tmp, dest) {
            Ok(()) => {
                // `tmp` now holds the old output.
                let meta = std::fs::symlink_metadata(tmp)?;
                if meta.is_dir() {
                    std::fs::remove_dir_all(tmp)?;
                } else {
                    std::fs::remove_file(tmp)?;
                }
            }
            Err(_) => {
                // Rename-aside: the old output stays complete under a temporary
                // name until the new one is in place.
                let name = dest
                    .file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_default();
                let old = parent.join(format!(".{name}.old.tmp-{}", std::process::id()));
                std::fs::rename(dest, &old)?;
                if let Err(e) = std::fs::rename(tmp, dest) {
                    let _ = std::fs::rename(&old, dest);
                    return Err(e);
                }
                if std::fs::symlink_metadata(&old)?.is_dir() {
                    std::fs::remove_dir_all(&old)?;
                } else {
                    std::fs::remove_file(&old)?;
                }
            }
        },
    }
    fsync_dir(parent)
}

/// The process id in a temporary name `…​.tmp-<pid>`, if it is one.
pub fn temp_owner(name: &str) -> Option<u32> {
    let (_, pid) = name.rsplit_once(".tmp-")?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Whether process `pid` is running (unknown platforms: assume it is, so
/// nothing of a live process is ever removed).
pub fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    #[cfg(target_os = "linux")]
    {
        Path::new("/proc").join(pid.to_string()).exists()
    }
    #[cfg(not(target_os = "linux"))]
    {
        true
    }
}

/// Remove the temporary files and folders in `dir` (not recursive) whose
/// owning process is gone; returns what was removed. Errors reading `dir`
/// are ignored (nothing to clean).
pub fn remove_stale_temps(dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return removed;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = temp_owner(&name) else {
            continue;
        };
        if process_alive(pid) {
            continue;
        }
        let p = e.path();
        let ok = match e.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&p).is_ok(),
            Ok(_) => std::fs::remove_file(&p).is_ok(),
            Err(_) => false,
        };
        if ok {
            removed.push(p);
        }
    }
    removed.sort();
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_dir_swaps_folders_and_files() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("out");
        let tmp = root.path().join(".out.tmp-1");
        std::fs::create_dir(&tmp).unwrap();
        std::fs::write(tmp.join("a"), b"new").unwrap();
        replace_dir(&tmp, &dest).unwrap();
        assert_eq!(std::fs::read(dest.join("a")).unwrap(), b"new");
        assert!(!tmp.exists());
        // replace an existing folder with different content
        std::fs::create_dir(&tmp).unwrap();
        std::fs::write(tmp.join("b"), b"newer").unwrap();
        replace_dir(&tmp, &dest).unwrap();
        assert!(!dest.join("a").exists());
        assert_eq!(std::fs::read(dest.join("b")).unwrap(), b"newer");
        assert!(!tmp.exists());
        // replace a file by a folder
        let f = root.path().join("file");
        std::fs::write(&f, b"x").unwrap();
        std::fs::create_dir(&tmp).unwrap();
        replace_dir(&tmp, &f).unwrap();
        assert!(f.is_dir());
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 2);
    }

    #[test]
    fn stale_temps_of_dead_processes_are_removed() {
        assert_eq!(temp_owner("model.safetensors.tmp-123"), Some(123));
        assert_eq!(temp_owner(".checkpoint-2.tmp-77"), Some(77));
        assert_eq!(temp_owner("a.tmp-"), None);
        assert_eq!(temp_owner("a.tmp-12x"), None);
        assert_eq!(temp_owner("checkpoint-2"), None);
        let root = tempfile::tempdir().unwrap();
        let me = std::process::id();
        // a pid that cannot be running (above the Linux pid_max ceiling)
        let dead = 4_194_304 + 17;
        std::fs::write(root.path().join(format!("x.tmp-{me}")), b"").unwrap();
        std::fs::write(root.path().join(format!("y.tmp-{dead}")), b"").unwrap();
        std::fs::create_dir(root.path().join(format!(".checkpoint-3.tmp-{dead}"))).unwrap();
        std::fs::write(root.path().join("keep.json"), b"").unwrap();
        let removed = remove_stale_temps(root.path());
        if cfg!(target_os = "linux") {
            assert_eq!(removed.len(), 2, "{removed:?}");
        }
        let mut left: Vec<String> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        left.sort();
        assert!(left.contains(&"keep.json".to_string()));
        assert!(left.contains(&format!("x.tmp-{me}")), "own temp kept");
    }
}
