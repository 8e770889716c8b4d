//! Number formatting shared by the commands' printed reports.

/// `1234567` → `1,234,567`.
pub fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Bytes with thousands separators and a decimal-unit hint: `1,500,000 B (1.5 MB)`.
pub fn human(b: u64) -> String {
    let unit = if b >= 1_000_000_000 {
        format!(" ({:.2} GB)", b as f64 / 1e9)
    } else if b >= 1_000_000 {
        format!(" ({:.1} MB)", b as f64 / 1e6)
    } else {
        String::new()
    };
    format!("{} B{unit}", group(b))
}
