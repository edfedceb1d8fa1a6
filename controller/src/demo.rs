//! `tiandi-controller demo`: the controller plus simulated sites in one process, on embedded
//! defaults. Site identities are issued directly by the controller's CA (no tokens) and kept in
//! the data dir, so a second run reuses them.

use std::time::Duration;

use anyhow::Context;
use tiandi_link::LinkProfile;
use tiandi_sim as sim;
use tiandi_uplink::identity;
use tokio_util::sync::CancellationToken;

use crate::{Config, Controller};

/// Province codes of the 31 provincial-level divisions.
pub const PROVINCES: [&str; 31] = [
    "BJ", "TJ", "HE", "SX", "NM", "LN", "JL", "HL", "SH", "JS", "ZJ", "AH", "FJ", "JX", "SD", "HA",
    "HB", "HN", "GD", "GX", "HI", "CQ", "SC", "GZ", "YN", "XZ", "SN", "GS", "QH", "NX", "XJ",
];

/// The demo's site IDs: `<province>-<county>`.
pub fn site_name(i: usize) -> (String, &'static str) {
    let p = PROVINCES[i % PROVINCES.len()];
    (
        format!("{}-{:03}", p.to_lowercase(), i / PROVINCES.len() + 1),
        p,
    )
}

/// The demo's mutual backup (省部互备): the first two provinces' offices back up their records
/// to the ministry, and the ministry backs up its own to the first, each on a schedule, with a
/// pre-hook that "dumps" (stamps the time), retention, verify and a restore drill. The data
/// and passphrases are made in `data_dir/demo-data/` on the first run. Returns the sites that
/// run jobs.
fn mutual_backup(cfg: &mut Config) -> anyhow::Result<Vec<String>> {
    use std::os::unix::fs::PermissionsExt;
    let base = std::path::absolute(cfg.data_dir.join("demo-data"))?;
    let (a, _) = site_name(0);
    let (b, _) = site_name(1);
    let mut jobs = Vec::new();
    for who in [a.as_str(), b.as_str(), "ministry"] {
        let data = base.join(who);
        std::fs::create_dir_all(data.join("records"))?;
        let pw = base.join(format!("{who}.pass"));
        if !pw.exists() {
            std::fs::write(&pw, format!("{:032x}\n", rand::random::<u128>()))?;
            std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600))?;
        }
        let records = data.join("records").join("registry.csv");
        if !records.exists() {
            let mut text = String::from("id,name,county,updated\n");
            for i in 0..20_000 {
                text.push_str(&format!(
                    "{i},household {i},{who}-{:03},2026-{:02}-{:02}\n",
                    i % 97,
                    i % 12 + 1,
                    i % 28 + 1
                ));
            }
            std::fs::write(&records, text)?;
        }
        let (site, repo, to) = if who == "ministry" {
            (
                "controller".to_string(),
                "ministry-records".to_string(),
                a.clone(),
            )
        } else {
            (
                who.to_string(),
                format!("{who}-records"),
                "controller".to_string(),
            )
        };
        let toml = format!(
            r#"name = "{repo}"
site = "{site}"
repo = "{repo}"
paths = [{data:?}]
password_file = {pw:?}
schedule = "every 10m"
pre_hook = ["/bin/sh", "-c", "date -u > {stamp}"]
keep_last = 6
keep_daily = 7
rpo_hours = 1
quota_gb = 1
verify = "every 1h"
verify_read_pct = 20
drill = "every 1h"
drill_sample_pct = 50
to = "{to}"
"#,
            stamp = data.join("dumped-at.txt").display()
        );
        jobs.push(
            toml::from_str::<tiandi_backup::job::JobSpec>(&toml)
                .with_context(|| format!("the demo's job {repo}"))?,
        );
    }
    cfg.backup_jobs = jobs;
    Ok(vec![a, b])
}

/// Every tenth demo site from the fourth (`sx-001`, `ah-001`, `hi-001`, …) is dual-homed
/// (issue 20): a ground line beside its satellite link.
pub fn dual_homed(index: usize) -> bool {
    index % 10 == 3
}

/// A dual-homed demo site's ground line, in its 5-minute cycle (each site at its own phase):
/// suspect for 5 s, down for a minute, then up again; the classes it carried come back after
/// the agent's 10 s hold (`Held`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ground {
    Up,
    Suspect,
    Down,
    Held,
}

const CYCLE_S: i64 = 300;

/// The ground line of demo site `index` at `unix_s`, and the start of its cycle (Unix s).
fn ground_at(index: usize, unix_s: i64) -> (Ground, i64) {
    let o = (unix_s + 37 * index as i64).rem_euclid(CYCLE_S);
    let g = match o {
        0..5 => Ground::Suspect,
        5..65 => Ground::Down,
        65..75 => Ground::Held,
        _ => Ground::Up,
    };
    (g, unix_s - o)
}

/// Where a class goes in each state of the ground line, as the agent's default policy has it:
/// reports, alarms, conferences and normal files take the first path up (ground, then sky) and
/// come back after the hold; bulk files and backups use ground paths only (the demo's sky path
/// has no window), and come back as soon as the line is up.
fn class_path(class: &str, g: Ground) -> Option<&'static str> {
    let ground_only = matches!(class, "bulk" | "backup");
    match (g, ground_only) {
        (Ground::Up | Ground::Suspect, _) => Some("ground"),
        (Ground::Down, true) => None,
        (Ground::Down | Ground::Held, false) => Some("sky"),
        (Ground::Held, true) => Some("ground"),
    }
}

/// The switches between two states of the ground line seen at `now_s` (`cycle`: the start of
/// the cycle the new state is in), with the reasons the agent's selector gives; each at the
/// latest time it could have happened (a site seen again after a long outage may have crossed
/// into a new cycle).
fn switches_between(
    before: Ground,
    after: Ground,
    cycle: i64,
    now_s: i64,
) -> Vec<tiandi_proto::PathSwitch> {
    tiandi_link::paths::Class::ALL
        .iter()
        .map(|c| c.as_str())
        .filter_map(|class| {
            let (from, to) = (class_path(class, before), class_path(class, after));
            if from == to {
                return None;
            }
            let (at_s, reason) = match (from, to) {
                (_, None) => (cycle + 5, "no path usable"),
                (None, Some(_)) => (cycle + 65, "path up"),
                (_, Some("sky")) => (cycle + 5, "path down"),
                _ => (cycle + 75, "preferred path back"),
            };
            let at_s = if at_s > now_s { at_s - CYCLE_S } else { at_s };
            Some(tiandi_proto::PathSwitch {
                at_ms: at_s * 1000,
                class: class.into(),
                from: from.unwrap_or_default().into(),
                to: to.unwrap_or_default().into(),
                reason: reason.into(),
            })
        })
        .collect()
}

/// The `Paths` frame a dual-homed demo site sends at `now_ms` (made-up figures: a ground line
/// of ~30 ms, a GEO link of ~600 ms with a 512 kbit/s budget).
fn paths_frame(
    index: usize,
    g: Ground,
    cycle: i64,
    started_ms: i64,
    now_ms: i64,
    switches: Vec<tiandi_proto::PathSwitch>,
) -> tiandi_proto::Paths {
    let jitter = |n: u32| ((now_ms / 1000 * 7919 + index as i64 * 104_729) % i64::from(n)) as u32;
    let (ground_state, ground_since) = match g {
        Ground::Up | Ground::Held => ("up", cycle + 65),
        Ground::Suspect => ("suspect", cycle),
        Ground::Down => ("down", cycle + 5),
    };
    let reports_on_ground = class_path("reports", g) == Some("ground");
    let (carrying, idle) = (3 + jitter(3), 0);
    let paths = vec![
        tiandi_proto::PathStatus {
            name: "ground".into(),
            kind: "ground".into(),
            state: ground_state.into(),
            rtt_ms: if g == Ground::Down {
                0
            } else {
                25 + jitter(15)
            },
            loss_permille: if g == Ground::Up {
                jitter(5)
            } else {
                50 + jitter(100)
            },
            tx_kbps: if reports_on_ground { carrying } else { idle },
            rx_kbps: if reports_on_ground { 1 } else { idle },
            budget_kbps: 0,
            since_ms: ground_since * 1000,
        },
        tiandi_proto::PathStatus {
            name: "sky".into(),
            kind: "sky".into(),
            state: "up".into(),
            rtt_ms: 600 + jitter(60),
            loss_permille: 3 + jitter(12),
            tx_kbps: if reports_on_ground { 1 } else { carrying },
            rx_kbps: 1,
            budget_kbps: 512,
            since_ms: started_ms,
        },
    ];
    let uses = tiandi_link::paths::Class::ALL
        .iter()
        .filter_map(|c| {
            class_path(c.as_str(), g).map(|p| tiandi_proto::ClassUse {
                class: c.as_str().into(),
                path: p.into(),
            })
        })
        .collect();
    tiandi_proto::Paths {
        paths,
        uses,
        switches,
        ..Default::default()
    }
}

/// Plays the `Paths` frames of the demo's dual-homed sites (the simulated sites hold one
/// connection each, on no path of their own), through the same checks and bookkeeping as a
/// real site's frames: the console's paths panel, the `paths` metrics, `path` events and
/// `path-redundancy-lost` show what they would for such a site. A site sends only while it is
/// connected; switches made meanwhile arrive when it is back. The paths it shows connected are
/// those not down while its one connection is open.
async fn dual_homed_paths(
    core: std::sync::Arc<crate::Core>,
    sites: Vec<(String, String, usize)>,
    cancel: CancellationToken,
) {
    let started_ms = tiandi_link::clock::now_ms();
    let mut before: std::collections::HashMap<String, Ground> = Default::default();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = tiandi_link::clock::now_ms();
        for (site, province, index) in &sites {
            if core.sites.with_site(site, |s| s.connected) != Some(true) {
                continue;
            }
            let (g, cycle) = ground_at(*index, now / 1000);
            let switches = match before.insert(site.clone(), g) {
                Some(b) if b != g => switches_between(b, g, cycle, now / 1000),
                _ => Vec::new(),
            };
            let frame = paths_frame(*index, g, cycle, started_ms, now, switches);
            if let Err(error) = crate::server::apply_paths(&core, site, province, &frame) {
                tracing::warn!(%site, %error, "The demo's paths frame was refused.");
            }
            let connected: Vec<String> = frame
                .paths
                .iter()
                .filter(|p| p.state != "down")
                .map(|p| p.name.clone())
                .collect();
            core.sites.set_path_connections(site, &connected);
        }
    }
}

/// The room the demo opens on its conference relay.
pub const DEMO_ROOM: &str = "demo";

/// The conference relay of a running demo: its address and name, for the join commands.
struct Relay {
    addr: std::net::SocketAddr,
    name: String,
}

/// What a newcomer can do next with the running demo: commands that work as printed.
fn next_steps(
    data_dir: &std::path::Path,
    api: std::net::SocketAddr,
    sites: usize,
    relay: Option<Relay>,
) -> String {
    // The binary as it was started, relative to the working directory when it lies below it.
    let exe = std::env::current_exe()
        .ok()
        .map(|e| {
            std::env::current_dir()
                .ok()
                .and_then(|d| e.strip_prefix(d).ok().map(|r| r.to_path_buf()))
                .unwrap_or(e)
        })
        .map(|e| e.display().to_string())
        .unwrap_or_else(|| "tiandi-controller".into());
    let ctl = format!("{exe} --data-dir {} --api-listen {api}", data_dir.display());
    let dir = data_dir.display();
    let mut s = format!(
        "  data dir:   {dir} (history, registry, CA; demo-sites/: each site's identity and inbox)\n"
    );
    if sites > 0 {
        let (site, _) = site_name(0);
        s += &format!(
            "Next, in another shell:\n\
             \x20 sites:      curl -s -H \"Authorization: Bearer $(cat {dir}/read.token)\" http://{api}/api/sites | head -c 600; echo\n\
             \x20 send a file to site {site}:\n\
             \x20             {ctl} send README.md --to site:{site}\n\
             \x20 follow it:  {ctl} transfers\n\
             \x20 received:   ls {dir}/demo-sites/{site}/inbox/\n"
        );
    }
    if sites >= 2 {
        let (a, _) = site_name(0);
        let (b, _) = site_name(1);
        s += &format!(
            "Mutual backup (省部互备: {a} and {b} to the ministry, the ministry to {a}; every 10 \
             minutes, verify and drill hourly):\n\
             \x20 the jobs:   {ctl} backups\n\
             \x20 at the ministry: ls {dir}/backups/{a}/{a}-records/snapshots/\n\
             \x20 at {a}: ls {dir}/demo-sites/{a}/backups/controller/ministry-records/\n"
        );
    }
    if let (Some(r), true) = (relay, sites >= 2) {
        // The client encodes and plays with FFmpeg: the media crate, outside the core build.
        let join = |i: usize| {
            let (site, _) = site_name(i);
            let id = format!("{dir}/demo-sites/{site}/identity");
            format!(
                "cargo run --release -p tiandi-media --bin tiandi-video -- join \\\n\
                 \x20               --relay {} --relay-name {} --room {DEMO_ROOM} \\\n\
                 \x20               --ca {id}/ca.crt --cert {id}/site.crt --key {id}/site.key",
                r.addr, r.name
            )
        };
        let (chair, _) = site_name(0);
        s += &format!(
            "Join the demo conference (room `{DEMO_ROOM}`, chaired by {chair}; the client needs \
             FFmpeg's libraries: sudo scripts/test --install-only):\n\
             \x20 as the chair, a test picture:\n\
             \x20             {} \\\n\
             \x20               --publish pattern\n\
             \x20 as a county, to VLC (vlc udp://@:5000):\n\
             \x20             {} \\\n\
             \x20               --play udp://127.0.0.1:5000\n\
             \x20 the room:   {ctl} conference show {DEMO_ROOM}\n",
            join(0),
            join(1)
        );
    }
    s += &format!(
        "Stop: Ctrl-C (the next run reuses the sites and their history). Wipe: rm -rf {dir}\n"
    );
    s
}

/// The demo's console accounts besides `admin`: one of each role.
pub const DEMO_USERS: [(&str, &str, Option<&str>); 4] = [
    ("ops", "admin", None),
    ("gd-ops", "province", Some("GD")),
    ("viewer", "viewer", None),
    ("wall", "kiosk", None),
];

/// Makes the demo's accounts on its first run (random passwords, kept in
/// `data_dir/demo-logins.txt`, mode 0600) and returns that file's text.
pub fn demo_logins(core: &crate::Core) -> anyhow::Result<String> {
    let file = core.config.data_dir.join("demo-logins.txt");
    if let Some(text) = tiandi_link::secrets::read_private(&file)? {
        return Ok(text);
    }
    let mut text = String::new();
    for (name, role, province) in DEMO_USERS {
        let pw = crate::users::random_password();
        let role = crate::users::Role::parse(role, province)?;
        if core.users.get(name)?.is_none() {
            core.users.add(name, role.clone(), &pw, false)?;
        } else {
            core.users.set_password(name, &pw, false)?;
        }
        text += &format!("{name:<8} {pw}  ({role})\n");
    }
    tiandi_link::pki::write_private(&file, &text)?;
    Ok(text)
}

/// The first `sites` demo sites' credentials, issued directly by the controller's CA and kept
/// under `ids_dir/<site>/identity` (reused while the registry still holds the site).
pub fn site_creds(
    core: &crate::Core,
    sites: usize,
    ids_dir: &std::path::Path,
) -> anyhow::Result<Vec<sim::SimCreds>> {
    let mut creds = Vec::with_capacity(sites);
    for i in 0..sites {
        let (site_id, province) = site_name(i);
        let dir = ids_dir.join(&site_id);
        let known = core
            .registry
            .get(&site_id)
            .is_some_and(|r| r.revoked_at.is_none());
        if !(known && identity::exists(&dir)) {
            let (key_pem, csr) = tiandi_link::pki::site_key_and_csr(&site_id)?;
            let issued = core.issue_direct(&site_id, province, &csr)?;
            identity::save(
                &dir,
                &tiandi_link::enroll::Enrolled {
                    site_id: site_id.clone(),
                    province: province.into(),
                    key_pem,
                    cert_pem: issued.cert_pem,
                    ca_pem: core.ca.cert_pem().to_string(),
                },
            )?;
        }
        let id = identity::load(&dir).with_context(|| format!("demo site {site_id}"))?;
        creds.push(sim::SimCreds {
            index: i as u64,
            site_id,
            province: province.into(),
            key_pem: id.key_pem,
            cert_pem: id.cert_pem,
            ca_pem: id.ca_pem,
        });
    }
    Ok(creds)
}

pub async fn run(
    mut cfg: Config,
    sites: usize,
    interval: Duration,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    cfg.profile = LinkProfile::Terrestrial;
    // The demo sends files from where it was started (`send README.md`); never from its data
    // directory, which the controller refuses whatever `outgoing_dirs` says.
    if cfg.outgoing_dirs.is_empty()
        && let Ok(here) = std::env::current_dir()
    {
        cfg.outgoing_dirs = vec![here];
    }
    let backup_sites = if cfg.backup_jobs.is_empty() && sites >= 2 {
        mutual_backup(&mut cfg).context("setting up the demo's mutual backup")?
    } else {
        Vec::new()
    };
    let ctl = Controller::start(cfg).await?;
    let core = ctl.core.clone();
    let ids_dir = core.config.data_dir.join("demo-sites");
    let creds = site_creds(&core, sites, &ids_dir)?;
    let sim_cancel = CancellationToken::new();
    sim::start(
        creds,
        sim::SimOptions {
            // Listening on every address (a config's `0.0.0.0`): the sites dial the host itself.
            controller: if ctl.quic_addr.ip().is_unspecified() {
                std::net::SocketAddr::new(
                    std::net::Ipv4Addr::LOCALHOST.into(),
                    ctl.quic_addr.port(),
                )
                .to_string()
            } else {
                ctl.quic_addr.to_string()
            },
            interval,
            outages: true,
            profile: LinkProfile::Terrestrial,
            inboxes: Some(ids_dir.clone()),
            backup_sites: backup_sites.clone(),
        },
        &core.config.data_dir.join("demo-spool"),
        sim_cancel.clone(),
        sim_cancel.clone(),
    )
    .await?;
    let dual: Vec<(String, String, usize)> = (0..sites)
        .filter(|&i| dual_homed(i))
        .map(|i| {
            let (site, province) = site_name(i);
            (site, province.to_string(), i)
        })
        .collect();
    let duals = dual.len();
    tokio::spawn(dual_homed_paths(core.clone(), dual, sim_cancel.clone()));
    println!(
        "Tiandi demo: controller with {sites} simulated sites (reports every {:?}; {duals} of \
         them dual-homed, their ground lines down for a minute every five).",
        interval
    );
    println!(
        "  console:    http://{}/  log in as one of (also in {}):",
        ctl.api_addr,
        core.config.data_dir.join("demo-logins.txt").display()
    );
    for line in demo_logins(&core)?.lines() {
        println!("              {line}");
    }
    println!(
        "  API:        http://{}/api/sites (Authorization: Bearer <{}/read.token>)",
        ctl.api_addr,
        core.config.data_dir.display()
    );
    println!("  alarms:     http://{}/api/alarms", ctl.api_addr);
    println!("  live:       http://{}/api/stream", ctl.api_addr);
    println!("  metrics:    http://{}/metrics", ctl.ops_addr);
    println!("  agents:     quic://{}", ctl.quic_addr);
    if let Some(addr) = ctl.conference_addr() {
        println!("  conference: quic://{addr} (room `{DEMO_ROOM}`)");
    }
    let relay = match &core.conference {
        Some((relay, addr)) if sites >= 1 => {
            let (chair, _) = site_name(0);
            if relay.find_room(DEMO_ROOM).is_none() {
                relay.create_room(DEMO_ROOM, &chair);
            }
            Some(Relay {
                addr: *addr,
                name: relay.name.clone(),
            })
        }
        _ => None,
    };
    print!(
        "{}",
        next_steps(&core.config.data_dir, ctl.api_addr, sites, relay)
    );
    cancel.cancelled().await;
    sim_cancel.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    ctl.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dual_homed_demo_site_fails_over_and_comes_back_as_an_agent_would() {
        let i = 3;
        assert!(dual_homed(i) && !dual_homed(0) && !dual_homed(18) && !dual_homed(30));
        // The start of a cycle of site 3.
        let t0 = 1_800_000_000 - (1_800_000_000 + 37 * 3) % CYCLE_S;
        assert_eq!(ground_at(i, t0), (Ground::Suspect, t0));
        assert_eq!(ground_at(i, t0 + 5).0, Ground::Down);
        assert_eq!(ground_at(i, t0 + 70).0, Ground::Held);
        assert_eq!(ground_at(i, t0 + 299), (Ground::Up, t0));

        let down = switches_between(Ground::Up, Ground::Down, t0, t0 + 30);
        assert_eq!(down.len(), 6, "every class leaves the ground line");
        let reports = down.iter().find(|s| s.class == "reports").unwrap();
        assert_eq!(
            (
                reports.from.as_str(),
                reports.to.as_str(),
                reports.reason.as_str()
            ),
            ("ground", "sky", "path down")
        );
        let bulk = down.iter().find(|s| s.class == "bulk").unwrap();
        assert_eq!(
            (bulk.to.as_str(), bulk.reason.as_str()),
            ("", "no path usable")
        );
        assert_eq!(bulk.at_ms, (t0 + 5) * 1000);
        let held = switches_between(Ground::Down, Ground::Held, t0, t0 + 66);
        assert_eq!(held.len(), 2, "bulk and backup come back at once");
        let back = switches_between(Ground::Held, Ground::Up, t0, t0 + 80);
        assert!(
            back.iter()
                .all(|s| s.reason == "preferred path back" && s.to == "ground")
        );
        assert_eq!(back.len(), 4);
        assert!(back.iter().all(|s| s.at_ms == (t0 + 75) * 1000));
        assert!(switches_between(Ground::Up, Ground::Suspect, t0, t0 + 1).is_empty());
        // Seen last while held, again in the next cycle's first seconds: back in the last one.
        let late = switches_between(
            Ground::Held,
            Ground::Suspect,
            t0 + CYCLE_S,
            t0 + CYCLE_S + 2,
        );
        assert!(late.iter().all(|s| s.at_ms == (t0 + 75) * 1000), "{late:?}");

        // The frame passes the controller's checks and shows the lost redundancy.
        let frame = paths_frame(i, Ground::Down, t0, 0, (t0 + 30) * 1000, down);
        let (paths, uses, switches) = crate::paths::check(&frame).unwrap();
        assert_eq!(switches.len(), 6);
        assert_eq!(uses.get("bulk"), None);
        assert_eq!(uses["reports"], "sky");
        let view = crate::paths::SitePaths {
            paths,
            uses,
            ..Default::default()
        };
        assert_eq!(
            view.redundancy_lost().as_deref(),
            Some("only sky is up (ground down)")
        );
        let up = paths_frame(i, Ground::Up, t0, 0, (t0 + 100) * 1000, Vec::new());
        let (paths, uses, _) = crate::paths::check(&up).unwrap();
        assert_eq!(uses.len(), 6);
        assert!(paths.iter().all(|p| p.state == "up"));
    }
}
