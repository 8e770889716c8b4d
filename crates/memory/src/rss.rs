//! Resident-memory probes of the running process (Linux `/proc/self/status`),
//! used to check the CPU plan against what `qlora train` really holds.
//!
//! `QLORA_MEM_TRACE=1` makes [`trace`] print one line per phase boundary on
//! stderr; `QLORA_MEM_TRACE=reset` also resets the kernel's peak counter after
//! each line (`/proc/self/clear_refs` ← `5`), so each line's `hwm` is the peak
//! of the phase that just ended alone (note: the process' final `ru_maxrss`,
//! e.g. GNU time's `%M`, is then only the last phase's peak). Off by default:
//! without the variable [`trace`] does nothing.

/// Memory counters of this process, bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Status {
    /// Peak resident set (`VmHWM`).
    pub hwm: u64,
    /// Resident set now (`VmRSS`).
    pub rss: u64,
    /// Of `rss`: anonymous memory (heap, `mmap`ed buffers).
    pub anon: u64,
    /// Of `rss`: file-backed pages (the binary, memory-mapped checkpoints).
    pub file: u64,
}

/// Parse the text of `/proc/<pid>/status` (values are in kB).
pub fn parse_status(text: &str) -> Status {
    let mut s = Status::default();
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let kib: u64 = match rest.split_whitespace().next().and_then(|v| v.parse().ok()) {
            Some(v) => v,
            None => continue,
        };
        let slot = match key {
            "VmHWM" => &mut s.hwm,
            "VmRSS" => &mut s.rss,
            "RssAnon" => &mut s.anon,
            "RssFile" => &mut s.file,
            _ => continue,
        };
        *slot = kib * 1024;
    }
    s
}

/// This process' counters (`None` where `/proc` is unavailable).
pub fn status() -> Option<Status> {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .map(|t| parse_status(&t))
}

/// With `QLORA_MEM_TRACE` set, print `mem-trace <phase> hwm_kib=.. rss_kib=..
/// anon_kib=.. file_kib=..` on stderr (and reset the peak when it is `reset`).
pub fn trace(phase: &str) {
    let Ok(mode) = std::env::var("QLORA_MEM_TRACE") else {
        return;
    };
    if let Some(s) = status() {
        eprintln!(
            "mem-trace {phase} hwm_kib={} rss_kib={} anon_kib={} file_kib={}",
            s.hwm / 1024,
            s.rss / 1024,
            s.anon / 1024,
            s.file / 1024
        );
    }
    if mode == "reset" {
        // Best effort: an older kernel or a sandbox may refuse it.
        let _ = std::fs::write("/proc/self/clear_refs", "5");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernel_status_lines() {
        let t = "Name:\tqlora\nVmPeak:\t  999 kB\nVmHWM:\t   13612 kB\nVmRSS:\t   13000 kB\n\
                 RssAnon:\t    6876 kB\nRssFile:\t    6124 kB\nThreads:\t3\n";
        let s = parse_status(t);
        assert_eq!(s.hwm, 13612 * 1024);
        assert_eq!(s.rss, 13000 * 1024);
        assert_eq!(s.anon, 6876 * 1024);
        assert_eq!(s.file, 6124 * 1024);
    }

    #[test]
    fn own_status_sees_a_touched_allocation() {
        let Some(before) = status() else { return };
        let v = std::hint::black_box(vec![1u8; 64 << 20]);
        let after = status().unwrap();
        assert!(
            after.rss >= before.rss + (60 << 20),
            "{before:?} -> {after:?}"
        );
        assert!(after.hwm >= after.rss);
        drop(v);
    }
}
