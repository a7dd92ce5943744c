//! Memory as duet sees it: what the machine or its cgroup has available (the budget,
//! `memory.max_bytes`, is a size or a share of it: `config::MemoryBudget`), the process's
//! resident size, keep_alive, and the allocator settings and trimming that make resident
//! memory equal what duet actually uses.

/// Reads this process's resident set size (`VmRSS`) in bytes.
pub fn rss_bytes() -> u64 {
    proc_status_kib("VmRSS:") * 1024
}

/// This process's peak resident set size (`VmHWM`) in bytes.
pub fn peak_rss_bytes() -> u64 {
    proc_status_kib("VmHWM:") * 1024
}

fn proc_status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Memory this process could still use: the machine's `MemAvailable` plus what it holds
/// now, or the cgroup's limit when that is lower.
pub fn available_bytes() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let machine = meminfo
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|kib| kib * 1024 + rss_bytes())
        .unwrap_or(u64::MAX);
    let cgroup = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .filter_map(|p| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok())
    .min()
    .unwrap_or(u64::MAX);
    machine.min(cgroup)
}

/// `"1.5 GiB"` -> `(1.5, "GiB")`: a leading number and the (trimmed) unit after it.
pub(crate) fn number_and_unit(text: &str) -> Option<(f64, &str)> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    Some((number.parse().ok()?, unit.trim()))
}

/// Writes bytes the way people read them: `1.25 GiB`, `96.6 MiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// How long an idle model stays loaded. In settings (`memory.keep_alive`) it is the text
/// [`KeepAlive::parse`] reads and `Display` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum KeepAlive {
    /// Unload this long after the last request (zero: right after it).
    For(std::time::Duration),
    Never,
}

impl KeepAlive {
    /// `5m`, `30s`, `1h`, `250ms`, plain seconds; `0` unloads at once; `-1` (any negative) never.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        if t.starts_with('-') {
            return Ok(Self::Never);
        }
        let (n, unit) = number_and_unit(t)
            .ok_or_else(|| format!("`{text}` is not a duration such as 5m, 30s or -1"))?;
        let seconds = match unit.trim() {
            "" | "s" => n,
            "ms" => n / 1000.0,
            "m" => n * 60.0,
            "h" => n * 3600.0,
            other => {
                return Err(format!(
                    "unknown unit `{other}` in `{text}` (use ms, s, m or h)"
                ));
            }
        };
        Self::seconds(seconds)
    }

    /// A keep-alive of `seconds` (finite, at most about a century: anything longer means
    /// never in practice, and would not fit a duration).
    fn seconds(seconds: f64) -> Result<Self, String> {
        const CENTURY: f64 = 100.0 * 365.0 * 24.0 * 3600.0;
        if !seconds.is_finite() || seconds > CENTURY {
            return Err(format!(
                "a keep_alive of {seconds} seconds is too long; use -1 to never unload"
            ));
        }
        Ok(Self::For(std::time::Duration::from_secs_f64(seconds)))
    }

    /// From a request's `keep_alive` field: seconds as a number, or a duration string.
    pub fn from_json(value: &serde_json::Value) -> Result<Self, String> {
        match value {
            serde_json::Value::Number(n) => match n.as_f64() {
                Some(s) if s < 0.0 => Ok(Self::Never),
                Some(s) => Self::seconds(s),
                None => Err("keep_alive is not a number".into()),
            },
            serde_json::Value::String(s) => Self::parse(s),
            _ => Err("keep_alive must be seconds or a duration such as \"5m\"".into()),
        }
    }
}

impl TryFrom<String> for KeepAlive {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        Self::parse(&text)
    }
}

/// Text that [`KeepAlive::parse`] reads back to the same value: `-1`, `5m`, `2.5s`.
impl std::fmt::Display for KeepAlive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Never => f.write_str("-1"),
            Self::For(d) if d.subsec_nanos() == 0 => match d.as_secs() {
                s if s > 0 && s % 3600 == 0 => write!(f, "{}h", s / 3600),
                s if s > 0 && s % 60 == 0 => write!(f, "{}m", s / 60),
                s => write!(f, "{s}s"),
            },
            Self::For(d) => write!(f, "{}s", d.as_secs_f64()),
        }
    }
}

impl From<KeepAlive> for String {
    fn from(keep_alive: KeepAlive) -> Self {
        keep_alive.to_string()
    }
}

/// Large buffers (weights, key/value caches, logits) always get their own mappings, which
/// go back to the system when freed; glibc would otherwise raise this threshold after the
/// first large free and serve later ones from a heap that fragments and never shrinks.
/// Two arenas are enough for an engine thread and a few HTTP workers.
pub fn configure_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's tuning knobs; called before heavy allocation.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Returns freed heap pages to the operating system (glibc keeps them otherwise).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Drops this program's machine-code pages from its resident set. Code for loading and
/// running a model (candle's kernels, the tokenizer) is paged in on first use and would
/// otherwise stay resident after the model is unloaded. Only executable mappings of the
/// program's own file are touched: they are never written, so the kernel simply reads them
/// back from the file (usually the page cache) when they run again.
pub fn release_code_pages() {
    #[cfg(target_os = "linux")]
    {
        let Ok(exe) = std::env::current_exe() else {
            return;
        };
        let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
            return;
        };
        for line in maps.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [range, perms, _, _, _, path, ..] = fields[..] else {
                continue;
            };
            if perms != "r-xp" || std::path::Path::new(path) != exe {
                continue;
            }
            let Some((start, end)) = range.split_once('-') else {
                continue;
            };
            let (Ok(start), Ok(end)) = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            ) else {
                continue;
            };
            // SAFETY: a private, never-written, executable file mapping of this program:
            // MADV_DONTNEED makes later accesses re-read identical bytes from the file.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_durations() {
        use std::time::Duration;
        assert_eq!(
            KeepAlive::parse("5m"),
            Ok(KeepAlive::For(Duration::from_secs(300)))
        );
        assert_eq!(KeepAlive::parse("0"), Ok(KeepAlive::For(Duration::ZERO)));
        assert_eq!(KeepAlive::parse("-1"), Ok(KeepAlive::Never));
        assert_eq!(
            KeepAlive::parse("250ms"),
            Ok(KeepAlive::For(Duration::from_millis(250)))
        );
        assert!(KeepAlive::parse("soon").is_err());
        // Too long for a duration: refused, never a panic on an HTTP worker.
        assert!(KeepAlive::from_json(&serde_json::json!(1e300)).is_err());
        assert!(KeepAlive::parse("1e300h").is_err());
        assert_eq!(
            KeepAlive::from_json(&serde_json::json!(0)),
            Ok(KeepAlive::For(Duration::ZERO))
        );
        assert_eq!(
            KeepAlive::from_json(&serde_json::json!(-1)),
            Ok(KeepAlive::Never)
        );
    }

    #[test]
    fn process_memory_is_readable() {
        // The peak is read second: other tests' threads may grow the process in between.
        let rss = rss_bytes();
        assert!(rss > 0 && peak_rss_bytes() >= rss);
        assert!(available_bytes() > rss_bytes());
        assert_eq!(human(96_600_000), "92.1 MiB");
    }
}
