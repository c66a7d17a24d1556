//! Logging: env_logger's filter and format on stderr, switchable to
//! syslog/journald (`log=syslog`, or by default for background mounts when
//! `/dev/log` exists).

use std::sync::OnceLock;

use log::{Log, Metadata, Record};

struct Dispatch {
    env: env_logger::Logger,
    syslog: OnceLock<syslog::BasicLogger>,
}

impl Log for Dispatch {
    fn enabled(&self, m: &Metadata) -> bool {
        self.env.enabled(m)
    }

    fn log(&self, r: &Record) {
        if !self.env.matches(r) {
            return;
        }
        match self.syslog.get() {
            Some(s) => s.log(r),
            None => self.env.log(r),
        }
    }

    fn flush(&self) {
        self.env.flush();
        if let Some(s) = self.syslog.get() {
            s.flush();
        }
    }
}

static LOGGER: OnceLock<Dispatch> = OnceLock::new();

/// Install the logger with a default level ("warn", "info", "debug");
/// `RUST_LOG` overrides it.
pub fn init(default_level: &str) {
    let env =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_level))
            .format_timestamp_millis()
            .build();
    let max = env.filter();
    let d = LOGGER.get_or_init(|| Dispatch {
        env,
        syslog: OnceLock::new(),
    });
    if log::set_logger(d).is_ok() {
        log::set_max_level(max);
    }
}

/// Send every further record to the local syslog daemon (journald listens
/// on the same socket). Fails if no syslog socket accepts the connection.
pub fn to_syslog() -> Result<(), String> {
    let f = syslog::Formatter3164 {
        facility: syslog::Facility::LOG_DAEMON,
        hostname: None,
        process: "sealfs".into(),
        pid: std::process::id(),
    };
    let logger = match std::env::var_os(SYSLOG_SOCKET_ENV) {
        Some(p) => syslog::unix_custom(f, &p)
            .map_err(|e| format!("cannot connect to syslog ({}): {e}", p.to_string_lossy()))?,
        None => syslog::unix(f).map_err(|e| format!("cannot connect to syslog (/dev/log): {e}"))?,
    };
    let d = LOGGER.get().ok_or("logging is not initialised")?;
    let _ = d.syslog.set(syslog::BasicLogger::new(logger));
    Ok(())
}

/// Environment variable naming another syslog socket than `/dev/log`
/// (a syslog daemon in a container, or a test's listener).
pub const SYSLOG_SOCKET_ENV: &str = "SEALFS_SYSLOG_SOCKET";

/// Whether a syslog socket is present (where the syslog crate looks, or
/// `$SEALFS_SYSLOG_SOCKET`).
pub fn syslog_available() -> bool {
    use std::os::unix::fs::FileTypeExt;
    let is_socket =
        |p: &std::path::Path| std::fs::metadata(p).is_ok_and(|m| m.file_type().is_socket());
    if let Some(p) = std::env::var_os(SYSLOG_SOCKET_ENV) {
        return is_socket(std::path::Path::new(&p));
    }
    ["/dev/log", "/var/run/syslog", "/var/run/log"]
        .iter()
        .any(|p| is_socket(std::path::Path::new(p)))
}
