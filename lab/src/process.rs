//! A `portcullis run` child process inside a lab's gateway namespace: start it, wait until it is
//! ready, read its endpoints, signal and stop it. The demo, the tests and the bench drive the
//! real binary through this.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};

use gateway::metrics::Status;

use crate::netns::{in_netns, Lab, LabError};

/// A command that runs `program` inside network namespace `ns`, after mounting bpffs in the
/// namespace's private mount namespace (so libxdp can track the programs it attaches). Add the
/// program's arguments to the returned command.
pub fn netns_command(ns: &str, program: &Path) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        ns,
        "sh",
        "-c",
        "mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf; exec \"$0\" \"$@\"",
    ])
    .arg(program);
    cmd
}

/// A `portcullis run` child process inside a lab's gateway namespace.
pub struct GatewayProcess {
    child: std::process::Child,
    ns: String,
    metrics: std::net::SocketAddr,
    /// The admin socket the lab's config gave it.
    admin: std::path::PathBuf,
    log_path: std::path::PathBuf,
}

impl GatewayProcess {
    /// Starts `exe run --config config` in the lab's gateway namespace, mounting bpffs in that
    /// namespace's private mount namespace first (so libxdp can track its program), with stdout
    /// and stderr going to `log`.
    pub fn spawn(
        lab: &Lab,
        exe: &Path,
        config: &Path,
        metrics: std::net::SocketAddr,
        log: &Path,
    ) -> Result<GatewayProcess, LabError> {
        Self::spawn_with(lab, exe, config, metrics, log, &[])
    }

    /// [`GatewayProcess::spawn`] with global options before `run` (e.g. `--log-format json`).
    pub fn spawn_with(
        lab: &Lab,
        exe: &Path,
        config: &Path,
        metrics: std::net::SocketAddr,
        log: &Path,
        global: &[&str],
    ) -> Result<GatewayProcess, LabError> {
        let out = File::create(log).map_err(|source| LabError::Spawn {
            cmd: format!("create {}", log.display()),
            source,
        })?;
        let err = out.try_clone().map_err(|source| LabError::Spawn {
            cmd: "dup log".into(),
            source,
        })?;
        let gw = lab.gw_ns();
        let mut cmd = netns_command(&gw, exe);
        cmd.args(global);
        cmd.args([Path::new("run"), Path::new("--config"), config]);
        let child = cmd
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|source| LabError::Spawn {
                cmd: format!("{cmd:?}"),
                source,
            })?;
        Ok(GatewayProcess {
            child,
            ns: gw,
            metrics,
            admin: crate::netns::admin_socket_for(config),
            log_path: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The gateway's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// GETs `path`: `/metrics` and `/healthz` from the metrics listener, inside the gateway's
    /// namespace; the rest from the admin socket (a file: reachable from anywhere).
    pub fn get(&self, path: &str) -> Result<(u16, String), LabError> {
        let p = path.split('?').next().unwrap_or(path);
        if p == "/metrics" || p == "/healthz" {
            return self.request_metrics("GET", path);
        }
        self.request_admin("GET", path)
    }

    /// `method path` on the metrics listener (read-only), from inside the gateway's namespace.
    pub fn request_metrics(&self, method: &str, path: &str) -> Result<(u16, String), LabError> {
        let addr = self.metrics;
        in_netns(&self.ns, || {
            crate::http::request(method, addr, path, std::time::Duration::from_secs(3))
        })?
        .map_err(|source| LabError::Http {
            path: path.to_string(),
            source,
        })
    }

    /// `method path` on the admin socket.
    pub fn request_admin(&self, method: &str, path: &str) -> Result<(u16, String), LabError> {
        crate::http::request_unix(method, &self.admin, path, std::time::Duration::from_secs(3))
            .map_err(|source| LabError::Http {
                path: path.to_string(),
                source,
            })
    }

    /// The admin socket's path.
    pub fn admin_socket(&self) -> &std::path::Path {
        &self.admin
    }

    /// The `/status` document.
    pub fn status(&self) -> Result<Status, LabError> {
        let (code, body) = self.get("/status")?;
        if code != 200 {
            return Err(LabError::Answered {
                path: "/status".into(),
                code,
                body,
            });
        }
        serde_json::from_str(&body).map_err(LabError::StatusDocument)
    }

    /// Waits until `/healthz` answers, or fails with the log if the process exits first.
    pub fn wait_ready(&mut self, timeout: std::time::Duration) -> Result<(), LabError> {
        let started = std::time::Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(LabError::Exited {
                    status,
                    log: self.log(),
                });
            }
            if matches!(self.get("/healthz"), Ok((200, _))) {
                return Ok(());
            }
            if started.elapsed() > timeout {
                return Err(LabError::NotReady {
                    timeout,
                    log: self.log(),
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Sends a signal to the gateway.
    pub fn signal(&self, sig: nix::sys::signal::Signal) -> Result<(), LabError> {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig)
            .map_err(LabError::Signal)
    }

    /// SIGTERM, then waits up to `timeout` for the exit status (SIGKILL after that).
    pub fn stop(
        &mut self,
        timeout: std::time::Duration,
    ) -> Result<std::process::ExitStatus, LabError> {
        if let Ok(Some(s)) = self.child.try_wait() {
            return Ok(s);
        }
        self.signal(nix::sys::signal::Signal::SIGTERM)?;
        let started = std::time::Instant::now();
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Ok(s);
            }
            if started.elapsed() > timeout {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(LabError::Killed {
                    timeout,
                    log: self.log(),
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.stop(std::time::Duration::from_secs(5));
        }
    }
}
