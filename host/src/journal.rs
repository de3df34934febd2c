//! Log lines in the form journald expects when stderr is the journal
//! (systemd sets `JOURNAL_STREAM` to that stream's device and inode): a
//! `<N>` syslog priority in front of each line and no timestamp (the
//! journal stamps each line itself). On a terminal or in a file, lines
//! stay as they are.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

static JOURNAL: AtomicBool = AtomicBool::new(false);

/// True when this process's stderr is the stream `JOURNAL_STREAM` names.
pub fn stderr_is_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    // SAFETY: fstat fills the stat struct we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on stderr, which lives as long as the process.
    if unsafe { libc::fstat(std::io::stderr().as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    dev.parse() == Ok(st.st_dev) && ino.parse() == Ok(st.st_ino)
}

/// The syslog priority of a log level (sd-daemon(3)).
pub fn priority(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    }
}

/// Sets up `log` for `program`: `<N>`-prefixed lines when stderr is the
/// journal, the plain env_logger lines otherwise (no timestamps either way).
pub fn init(program: &'static str, default_filter: &str) {
    let journal = stderr_is_journal();
    JOURNAL.store(journal, Ordering::Relaxed);
    let mut b =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_filter));
    b.format_target(false).format_timestamp(None);
    if journal {
        b.format(move |f, r| {
            use std::io::Write;
            writeln!(f, "<{}>{program}: {}", priority(r.level()), r.args())
        });
    }
    b.init();
}

/// A line for stderr at `level`: with its `<N>` prefix under the journal.
pub fn line(level: log::Level, text: &str) -> String {
    if JOURNAL.load(Ordering::Relaxed) {
        format!("<{}>{text}", priority(level))
    } else {
        text.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_are_syslog_ones() {
        assert_eq!(priority(log::Level::Error), 3);
        assert_eq!(priority(log::Level::Warn), 4);
        assert_eq!(priority(log::Level::Info), 6);
        assert_eq!(priority(log::Level::Debug), 7);
    }
}
