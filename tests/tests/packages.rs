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
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let text = run(Command::new(cargo)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .args([
            "deb",
            "-q",
            "-p",
            p.krate,
            "--profile",
            "dev",
            "--no-build",
            "-o",
        ])
        .arg(out));
    let deb = text
        .lines()
        .find(|l| l.ends_with(".deb"))
        .unwrap_or_else(|| panic!("cargo deb printed no package: {text}"));
    std::path::PathBuf::from(deb.trim())
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
