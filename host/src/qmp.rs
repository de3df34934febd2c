//! A QMP client: JSON commands to a running QEMU over its Unix socket.
//!
//! Used to hot-plug the pool and exports into running VMs. Every error QEMU
//! reports is passed on with QEMU's own words.

use serde_json::{json, Value};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {}: {source} (start QEMU with -qmp unix:{},server=on,wait=off)", path.display(), path.display())]
    Connect { path: PathBuf, source: io::Error },
    #[error("QMP connection failed: {0}")]
    Io(#[from] io::Error),
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    #[error("QEMU refused {command}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
}

pub struct Qmp {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    /// Asynchronous events that arrived while waiting for replies.
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities-negotiation mode.
    pub fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path).map_err(|source| QmpError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let reader = BufReader::new(stream.try_clone()?);
        let mut qmp = Qmp {
            writer: stream,
            reader,
            events: Vec::new(),
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "expected the QMP greeting, got {greeting}"
            )));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(QmpError::Protocol("QEMU closed the QMP connection".into()));
        }
        serde_json::from_str(&line)
            .map_err(|e| QmpError::Protocol(format!("bad JSON from QEMU ({e}): {line}")))
    }

    /// Runs one command; returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if arguments.as_object().is_some_and(|a| !a.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut bytes = serde_json::to_vec(&msg).map_err(|e| QmpError::Protocol(e.to_string()))?;
        bytes.push(b'\n');
        self.writer.write_all(&bytes)?;
        loop {
            let reply = self.read_message()?;
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: err["class"].as_str().unwrap_or("").to_string(),
                    desc: err["desc"].as_str().unwrap_or("").to_string(),
                });
            }
            if reply.get("event").is_some() {
                self.events.push(reply);
                continue;
            }
            return Err(QmpError::Protocol(format!("unexpected reply {reply}")));
        }
    }

    /// Waits up to `timeout` for an event named `name` (or returns one that
    /// already arrived), e.g. DEVICE_DELETED after device_del.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value, QmpError> {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return Ok(self.events.remove(i));
        }
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(QmpError::Protocol(format!(
                    "no {name} event from QEMU within {timeout:?}"
                )));
            }
            self.reader.get_ref().set_read_timeout(Some(left))?;
            let msg = match self.read_message() {
                Ok(m) => m,
                Err(QmpError::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(e),
            };
            if msg["event"] == name {
                self.reader
                    .get_ref()
                    .set_read_timeout(Some(Duration::from_secs(30)))?;
                return Ok(msg);
            }
            if msg.get("event").is_some() {
                self.events.push(msg);
            }
        }
    }
}

/// The integration tests' skip record (`scripts/test.sh` lists skips).
#[cfg(test)]
#[path = "../tests/common/skip.rs"]
mod skip;

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn qemu_available() -> bool {
        Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// A paused QEMU with nothing to boot: enough to talk QMP to.
    struct Qemu {
        child: std::process::Child,
        // Holds the directory of the QMP socket for as long as QEMU runs.
        _dir: tempfile::TempDir,
    }
    impl Qemu {
        fn start() -> (Qemu, PathBuf) {
            let dir = tempfile::tempdir().unwrap();
            let sock = dir.path().join("qmp.sock");
            let child = Command::new("qemu-system-x86_64")
                .args([
                    "-machine",
                    "pc",
                    "-accel",
                    "tcg",
                    "-nodefaults",
                    "-display",
                    "none",
                    "-S",
                    "-m",
                    "64M",
                ])
                .arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", sock.display()))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while !sock.exists() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "QEMU did not create its QMP socket"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            (Qemu { child, _dir: dir }, sock)
        }
    }
    impl Drop for Qemu {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    #[test]
    fn commands_return_values_and_qemu_errors_keep_qemus_words() {
        if !qemu_available() {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must provide qemu-system-x86_64"
            );
            super::skip::skipped("needs qemu-system-x86_64");
            return;
        }
        let (_q, sock) = Qemu::start();
        let mut qmp = Qmp::connect(&sock).unwrap();
        let status = qmp.execute("query-status", json!({})).unwrap();
        assert_eq!(status["status"], "prelaunch");
        let e = qmp
            .execute(
                "object-add",
                json!({"qom-type": "memory-backend-file", "id": "p", "mem-path": "/nonexistent/zc/pool", "size": 2097152, "share": true}),
            )
            .unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with("QEMU refused object-add: "), "{text}");
        assert!(
            text.contains("/nonexistent/zc/pool"),
            "QEMU's own message: {text}"
        );
        let e = qmp
            .execute("device_del", json!({"id": "nope"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope"), "{e}");
    }

    #[test]
    fn a_missing_socket_says_how_to_start_qemu() {
        let e = Qmp::connect(Path::new("/nonexistent/qmp.sock"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("-qmp unix:/nonexistent/qmp.sock,server=on,wait=off"),
            "{e}"
        );
    }
}
