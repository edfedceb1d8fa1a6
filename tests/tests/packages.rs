//! Issue 18: Debian packages of the controller, the agent and the conference client (cargo-deb):
//! lintian finds nothing (no error, no warning; the few overrides say why in the package), the
//! contents and permissions are what an operator expects (binary, manual page, conffile in
//! /etc/tiandi readable by the service only, the unit, the `tiandi` user made by postinst), and
//! each hardened unit passes `systemd-analyze verify` cleanly and scores at most its bound in
//! `systemd-analyze security`.
//!
//! The packages are made from the debug binaries the test command builds (`--profile dev
//! --no-build`): what is checked here is the packaging, which is the same for a release build
//! (`cargo deb -p tiandi-controller`, README).

use std::path::Path;
use std::process::Command;

use tiandi_tests::container::{Container, Network};

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (sudo scripts/test --install-only installs it)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

struct Package {
    krate: &'static str,
    name: &'static str,
    binary: &'static str,
    conffile: &'static str,
    unit: &'static str,
    /// The unit is enabled at install (the controller), or once the site is set up.
    enabled: bool,
    /// Highest `systemd-analyze security` exposure allowed (0 best, 10 worst; < 2: "OK").
    max_exposure: f64,
}

const PACKAGES: [Package; 3] = [
    Package {
        krate: "tiandi-controller",
        name: "tiandi-controller",
        binary: "tiandi-controller",
        conffile: "etc/tiandi/controller.toml",
        unit: "tiandi-controller.service",
        enabled: true,
        max_exposure: 1.5,
    },
    Package {
        krate: "tiandi-agent",
        name: "tiandi-agent",
        binary: "tiandi-agent",
        conffile: "etc/tiandi/agent.toml",
        unit: "tiandi-agent.service",
        enabled: false,
        max_exposure: 2.0,
    },
    Package {
        krate: "tiandi-media",
        name: "tiandi-video",
        binary: "tiandi-video",
        conffile: "etc/tiandi/relay.env",
        unit: "tiandi-relay.service",
        enabled: false,
        max_exposure: 1.5,
    },
];

fn build(p: &Package, out: &Path) -> std::path::PathBuf {
    tiandi_tests::container::deb(p.krate, out)
}

#[test]
fn the_packages_are_lintian_clean_and_their_units_verify_and_are_hardened() {
    let tmp = tempfile::tempdir().unwrap();
    // The binaries must exist: the test command builds them first.
    for p in &PACKAGES {
        tiandi_tests::bin(p.binary);
    }
    let mut scores = Vec::new();
    for p in &PACKAGES {
        let deb = build(p, tmp.path());
        let lint = run(Command::new("lintian")
            .args(["--fail-on", "error,warning", "--info"])
            .arg(&deb));
        assert!(
            !lint
                .lines()
                .any(|l| l.starts_with("E:") || l.starts_with("W:")),
            "{}: lintian:\n{lint}",
            p.name
        );

        // What is in it, with the owners and modes an operator expects.
        let list = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
        let entry = |path: &str| {
            list.lines()
                .find(|l| l.ends_with(&format!("./{path}")))
                .unwrap_or_else(|| panic!("{}: no {path} in\n{list}", p.name))
                .to_string()
        };
        assert!(entry(&format!("usr/bin/{}", p.binary)).starts_with("-rwxr-xr-x 0/0 "));
        assert!(
            entry(p.conffile).starts_with("-rw-r----- 0/0 "),
            "{}: {} must not be world-readable",
            p.name,
            p.conffile
        );
        entry(&format!("usr/lib/systemd/system/{}", p.unit));
        entry(&format!("usr/share/man/man1/{}.1.gz", p.binary));
        entry(&format!("usr/share/doc/{}/copyright", p.name));
        let conffiles = run(Command::new("dpkg-deb")
            .arg("-I")
            .arg(&deb)
            .arg("conffiles"));
        assert!(
            conffiles.contains(&format!("/{}", p.conffile)),
            "{conffiles}"
        );
        let depends = run(Command::new("dpkg-deb")
            .args(["-f"])
            .arg(&deb)
            .arg("Depends"));
        assert!(
            depends.contains("adduser") && depends.contains("libc6"),
            "{depends}"
        );
        if p.name == "tiandi-video" {
            assert!(
                depends.contains("libavcodec"),
                "FFmpeg's libraries: {depends}"
            );
        }

        // The maintainer scripts: the service user and directories, then systemd's part.
        let ctrl = tmp.path().join(format!("{}-control", p.name));
        run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&ctrl));
        let postinst = std::fs::read_to_string(ctrl.join("postinst")).unwrap();
        assert!(postinst.contains("adduser --system --group"), "{postinst}");
        assert!(postinst.contains("deb-systemd-helper"), "{postinst}");
        // Enabled and started at install (the controller), or left for the operator (the agent
        // needs enrolling first, the relay its flags) and only re-enabled on upgrade.
        assert_eq!(
            postinst.contains("new installations run enable")
                && postinst.contains("_dh_action=start"),
            p.enabled,
            "{}: enabled at install: {}",
            p.name,
            p.enabled
        );
        assert!(!postinst.contains("#DEBHELPER#"));
        let postrm = std::fs::read_to_string(ctrl.join("postrm")).unwrap();
        // Purging keeps the data: keys and history outlive a mistaken purge.
        assert!(!postrm.contains("rm -rf"), "{postrm}");

        // The unit, in a root with the package and the system's own units: verified without a
        // word from systemd, and hardened.
        let root = tmp.path().join(format!("{}-root", p.name));
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
        run(Command::new("cp")
            .args(["-rn", "/usr/lib/systemd/system/."])
            .arg(root.join("usr/lib/systemd/system")));
        let unit = root.join("usr/lib/systemd/system").join(p.unit);
        let verify = run(Command::new("systemd-analyze")
            .arg("verify")
            // (`man` does not run inside the extracted root; the page is checked above.)
            .arg("--man=no")
            .arg(format!("--root={}", root.display()))
            .arg(&unit));
        assert!(
            verify.trim().is_empty(),
            "{}: systemd-analyze verify:\n{verify}",
            p.unit
        );
        let security = run(Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(format!("--root={}", root.display()))
            .arg(p.unit));
        let exposure: f64 = security
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|l| l.split(": ").nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level in:\n{security}"));
        assert!(
            exposure <= p.max_exposure,
            "{}: exposure {exposure} > {}:\n{security}",
            p.unit,
            p.max_exposure
        );
        for must in [
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "PrivateTmp=yes",
            "User=tiandi",
        ] {
            assert!(
                std::fs::read_to_string(&unit).unwrap().contains(must),
                "{}: {must}",
                p.unit
            );
        }
        scores.push(format!("{}={exposure}", p.unit));
    }
    eprintln!("systemd-analyze security: {}", scores.join(" "));
}

#[test]
fn the_packaged_controller_and_agent_run_hardened_under_systemd_and_the_site_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let debs = tmp.path().join("debs");
    std::fs::create_dir_all(&debs).unwrap();
    for p in &PACKAGES[..2] {
        tiandi_tests::bin(p.binary);
        build(p, &debs);
    }
    let c = Container::boot("sc-001", Network::Private, &[(&debs, "/debs")]);
    c.sh("dpkg -i /debs/tiandi-controller_*.deb /debs/tiandi-agent_*.deb");
    // The controller is enabled and started by its package; the agent waits for enrollment.
    let health = "python3 -c 'import urllib.request; urllib.request.urlopen(\"http://127.0.0.1:9440/health\")'";
    tiandi_tests::wait_for(
        "the packaged controller to answer",
        std::time::Duration::from_secs(30),
        || c.sh_any(health).1.then_some(()),
    );
    assert_eq!(
        c.sh("systemctl is-enabled tiandi-agent || true").trim(),
        "disabled"
    );
    let out = c.sh(
        "runuser -u tiandi -- tiandi-controller --config /etc/tiandi/controller.toml \
         enroll --site sc-001 --province SC",
    );
    let token = out
        .split_whitespace()
        .find(|w| w.starts_with("T1."))
        .unwrap_or_else(|| panic!("no token in: {out}"))
        .to_string();
    c.sh(&format!(
        "cd / && runuser -u tiandi -- tiandi-agent --config /etc/tiandi/agent.toml enroll \
         --controller 127.0.0.1:4433 --token {token}"
    ));
    c.sh("systemctl enable --now tiandi-agent");
    // The site reports, with the package's version, to the controller.
    let site = "python3 -c '
import json, urllib.request
t = open(\"/var/lib/tiandi/controller/read.token\").read().strip()
r = urllib.request.Request(\"http://127.0.0.1:8440/api/sites/sc-001\", headers={\"Authorization\": \"Bearer \" + t})
d = json.load(urllib.request.urlopen(r))
print(d[\"connected\"], d[\"agent_version\"], d[\"reports\"])'";
    tiandi_tests::wait_for(
        "the packaged agent's reports at the packaged controller",
        std::time::Duration::from_secs(60),
        || {
            let (out, ok) = c.sh_any(site);
            let want = format!("True {} ", env!("CARGO_PKG_VERSION"));
            (ok && out.starts_with(&want) && !out.trim().ends_with(" 0")).then_some(())
        },
    );
    // The hardening is in force in the running processes: no new privileges, a seccomp filter,
    // no capability but the agent's CAP_DAC_READ_SEARCH (bit 2) and CAP_NET_BIND_SERVICE (bit
    // 10, for the trap listener on port 162).
    for (unit, cap) in [
        ("tiandi-controller", "0000000000000000"),
        ("tiandi-agent", "0000000000000404"),
    ] {
        let status = c.sh(&format!(
            "grep -E '^(NoNewPrivs|Seccomp|CapEff):' /proc/$(systemctl show -p MainPID --value {unit})/status"
        ));
        assert!(status.contains("NoNewPrivs:\t1"), "{unit}: {status}");
        assert!(status.contains("Seccomp:\t2"), "{unit}: {status}");
        assert!(
            status.contains(&format!("CapEff:\t{cap}")),
            "{unit}: {status}"
        );
        assert_eq!(
            c.sh(&format!("systemctl is-active {unit}")).trim(),
            "active"
        );
    }
    // The data directories and the site's key are the service's alone.
    assert_eq!(
        c.sh("stat -c '%a %U' /var/lib/tiandi/controller /var/lib/tiandi/agent /var/lib/tiandi/agent/identity/site.key"),
        "700 tiandi\n700 tiandi\n600 tiandi\n"
    );
    // Purging the agent keeps the site's identity and spool.
    c.sh("systemctl stop tiandi-agent && dpkg --purge tiandi-agent");
    c.sh("test -f /var/lib/tiandi/agent/identity/site.key && test ! -e /etc/tiandi/agent.toml");
}
