//! A Debian 12 system booted with its own systemd (systemd-nspawn on an overlay of the root
//! scripts/test makes with debootstrap: the root itself stays as made, so any number of
//! containers boot from it at once). Tests install Tiandi's packages there and run them under
//! the real systemd, with their hardening; and Ansible manages them over SSH as it would a
//! site.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Makes the Debian package of `krate` (cargo-deb, from the debug binaries the test command
/// built: `--profile dev --no-build`) in `out`; returns its path.
pub fn deb(krate: &str, out: &Path) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let o = Command::new(cargo)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .args([
            "deb",
            "-q",
            "-p",
            krate,
            "--profile",
            "dev",
            "--no-build",
            "-o",
        ])
        .arg(out)
        .output()
        .unwrap_or_else(|e| {
            panic!("cargo deb: {e} (sudo scripts/test --install-only installs it)")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "cargo deb -p {krate} failed:\n{text}");
    let deb = text
        .lines()
        .find(|l| l.ends_with(".deb"))
        .unwrap_or_else(|| panic!("cargo deb printed no package: {text}"));
    PathBuf::from(deb.trim())
}

/// The root scripts/test makes (`TIANDI_SITE_ROOT` to use another).
pub fn site_root() -> PathBuf {
    let root = std::env::var_os("TIANDI_SITE_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/tmp/tiandi-site-root".into());
    assert!(
        root.join(".tiandi-root").exists(),
        "{} is missing: sudo scripts/test --install-only makes it (debootstrap)",
        root.display()
    );
    root
}

/// Where a container's network comes from.
pub enum Network<'a> {
    /// Its own namespace with only loopback.
    Private,
    /// A network namespace made beforehand (`ip netns`, for example a satlink site's).
    Netns(&'a str),
}

pub struct Container {
    nspawn: std::process::Child,
    leader: u32,
}

impl Container {
    /// Boots a container from [`site_root`] with the directories `binds` (host path, path
    /// inside) mounted read-only, and waits until its systemd has started everything.
    pub fn boot(hostname: &str, network: Network, binds: &[(&Path, &str)]) -> Container {
        let root = site_root();
        let mut cmd = Command::new("systemd-nspawn");
        cmd.arg("-D")
            .arg(&root)
            .args(["--volatile=overlay", "-b", "--register=no", "--keep-unit"])
            .args(["--console=passive", "--hostname", hostname]);
        match network {
            Network::Private => cmd.arg("--private-network"),
            Network::Netns(ns) => cmd.arg(format!("--network-namespace-path=/run/netns/{ns}")),
        };
        for (host, inside) in binds {
            cmd.arg(format!("--bind-ro={}:{inside}", host.display()));
        }
        let nspawn = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("systemd-nspawn (apt-get install systemd-container)");
        let pid = nspawn.id();
        // Its child is the container's systemd.
        let found = crate::wait_for("the container's systemd", Duration::from_secs(60), || {
            let children =
                std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
            children.split_whitespace().find_map(|c| {
                let comm = std::fs::read_to_string(format!("/proc/{c}/comm")).ok()?;
                (comm.trim() == "systemd").then(|| c.parse().ok())?
            })
        });
        let c = Container {
            nspawn,
            leader: found,
        };
        crate::wait_for(
            &format!("container {hostname} to boot"),
            Duration::from_secs(120),
            || {
                let s = c.sh_any("systemctl is-system-running").0;
                (s.trim() == "running" || s.trim() == "degraded").then_some(())
            },
        );
        c
    }

    /// Runs `script` in the container: (output, success).
    pub fn sh_any(&self, script: &str) -> (String, bool) {
        let out = Command::new("nsenter")
            .args(["-t", &self.leader.to_string(), "-a", "sh", "-c", script])
            .output()
            .expect("nsenter");
        (
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            out.status.success(),
        )
    }

    /// Runs `script` in the container; panics with its output if it fails.
    pub fn sh(&self, script: &str) -> String {
        let (out, ok) = self.sh_any(script);
        assert!(ok, "in the container: {script}\n{out}");
        out
    }

    /// A path inside the container, as the host sees it.
    pub fn path(&self, inside: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{inside}", self.leader))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // SIGTERM asks the container to halt; a second one ends it at once.
        let pid = self.nspawn.id().to_string();
        let _ = Command::new("kill").arg(&pid).status();
        for _ in 0..50 {
            if self.nspawn.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}
