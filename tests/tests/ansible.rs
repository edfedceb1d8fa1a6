//! Issue 18: the Ansible roles and playbooks in `ansible/` pass `ansible-lint` (production
//! profile) and `ansible-playbook --syntax-check`, with the pinned tools scripts/test installs
//! (/opt/tiandi-tools, ansible/requirements.txt); and the agent role's configuration template,
//! rendered by Ansible itself for an inventory site, is a configuration the agent accepts.

use std::path::PathBuf;
use std::process::Command;

fn tools() -> PathBuf {
    let dir = std::env::var_os("TIANDI_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/tiandi-tools"));
    assert!(
        dir.join("bin/ansible-lint").exists(),
        "{}/bin/ansible-lint is missing: sudo scripts/test --install-only installs it",
        dir.display()
    );
    dir.join("bin")
}

fn ansible_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../ansible"))
}

fn run(program: &str, args: &[&str]) -> String {
    let bin = tools();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(bin.join(program))
        .args(args)
        .current_dir(ansible_dir())
        .env("PATH", path)
        .env(
            "ANSIBLE_LOCAL_TEMP",
            std::env::temp_dir().join("tiandi-ansible-tmp"),
        )
        .env(
            "ANSIBLE_HOME",
            std::env::temp_dir().join("tiandi-ansible-home"),
        )
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{program} {args:?} failed:\n{text}");
    text
}

#[test]
fn the_roles_and_playbooks_pass_ansible_lint_production_and_the_syntax_check() {
    let lint = run("ansible-lint", &["--profile", "production", "--nocolor"]);
    assert!(
        lint.contains("Profile 'production' was required, and it passed"),
        "{lint}"
    );
    run(
        "ansible-playbook",
        &[
            "--syntax-check",
            "playbooks/site.yml",
            "playbooks/rollout.yml",
        ],
    );
    // The inventory is laid out by province, with a canary.
    let inv = run("ansible-inventory", &["--list"]);
    let inv: serde_json::Value = serde_json::from_str(&inv).unwrap();
    for group in ["province_sc", "province_gd", "canary", "tiandi_relays"] {
        assert!(inv[group]["hosts"].as_array().is_some(), "no group {group}");
    }
}

#[test]
fn the_agent_template_renders_a_configuration_the_agent_accepts() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("agent.toml");
    // Ansible renders the role's configuration task with the inventory's variables for sc-002
    // (a site of Sichuan behind its relay) and a device list.
    let devices = r#"[{"name": "modem", "profile": "vsat-modem",
        "address": "192.168.1.1:161", "community": "public", "tcp_ports": [80],
        "oids": {"esno": {"oid": "1.3.6.1.4.1.99999.1.1.0", "scale": 0.1},
                 "modcod": "1.3.6.1.4.1.99999.1.3.0"}},
        {"name": "ups", "profile": "ups-mib", "address": "192.168.1.2", "version": "v3",
         "v3": {"user": "tiandi", "auth_protocol": "sha1", "auth_password": "a\"uth-pass",
                "priv_protocol": "aes128", "priv_password": "priv-pass"}},
        {"name": "switch", "profile": "county-switch", "address": "192.168.1.3",
         "max_interfaces": 64, "ping": false, "traps": true}]"#;
    // An operator's profile, installed beside the configuration and checked by the agent.
    let profile = tmp.path().join("county-switch.toml");
    std::fs::write(
        &profile,
        "name = \"county-switch\"\nkind = \"router\"\ninterfaces = true\n[[objects]]\n\
         name = \"uptime\"\noid = \"1.3.6.1.2.1.1.3.0\"\ntype = \"timeticks\"\n",
    )
    .unwrap();
    let play = tmp.path().join("render.yml");
    std::fs::write(
        &play,
        "- name: Render the agent's configuration\n  hosts: sc-002\n  connection: local\n  \
         gather_facts: false\n  tasks:\n    - name: The role's configuration task\n      \
         ansible.builtin.include_role:\n        name: tiandi_agent\n        tasks_from: config.yml\n",
    )
    .unwrap();
    let vars = serde_json::json!({
        "tiandi_agent_config_path": out,
        "tiandi_agent_config_group": "root",
        "tiandi_agent_data_dir": tmp.path().join("data"),
        "tiandi_agent_devices": serde_json::from_str::<serde_json::Value>(devices).unwrap(),
        "tiandi_agent_profiles": [profile],
        "tiandi_agent_profiles_dir": tmp.path().join("profiles"),
        "tiandi_agent_binary": tiandi_tests::bin("tiandi-agent"),
        "tiandi_agent_traps_listen": "0.0.0.0:162",
        "tiandi_agent_reach_targets": [{"name": "province-hub", "address": "10.10.0.1", "tcp_port": 443}],
    });
    run(
        "ansible-playbook",
        &[play.to_str().unwrap(), "-e", &vars.to_string()],
    );
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.contains("controller = \"10.10.0.10:4433\""), "{text}");
    assert!(
        text.contains("[via_relay]") && text.contains("site = \"sc-relay\""),
        "{text}"
    );
    assert!(
        tmp.path().join("profiles/county-switch.toml").exists(),
        "the profile was not installed"
    );
    for want in [
        "[traps]\nlisten = \"0.0.0.0:162\"",
        "auth_password = \"a\\\"uth-pass\"",
        "[[reachability.targets]]\nname = \"province-hub\"",
        "modcod = \"1.3.6.1.4.1.99999.1.3.0\"",
        "tcp_ports = [80]",
    ] {
        assert!(text.contains(want), "no {want:?} in:\n{text}");
    }
    // The agent reads it: `transfers` loads the configuration before anything else, and names
    // the file and key of anything wrong.
    let agent = tiandi_tests::bin("tiandi-agent");
    let check = Command::new(&agent)
        .arg("--config")
        .arg(&out)
        .args(["transfers", "--json"])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "the agent refused the rendered configuration:\n{}\n{text}",
        String::from_utf8_lossy(&check.stderr)
    );
    // A key the agent does not know is refused, so the check above means something.
    std::fs::write(&out, format!("{text}\nnot_a_key = 1\n")).unwrap();
    let bad = Command::new(&agent)
        .arg("--config")
        .arg(&out)
        .args(["transfers", "--json"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not_a_key"));
}

/// Counters of what the ministry's side sends on its uplink (nftables in the controller's
/// namespace, where the controller and the Ansible control node both are): QUIC from the
/// controller, SSH from the control node, everything.
struct Uplink {
    ns: String,
}

impl Uplink {
    fn count(ns: &str) -> Uplink {
        let rules = "table inet tiandi_uplink {\n chain out {\n  type filter hook output priority 0; policy accept;\n  \
                     oifname \"eth0\" udp sport 4433 counter\n  oifname \"eth0\" tcp dport 22 counter\n  \
                     oifname \"eth0\" counter\n }\n}\n";
        let mut nft = tiandi_satlink::Topology::command(ns, "nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("nft (apt-get install nftables)");
        use std::io::Write;
        nft.stdin
            .take()
            .unwrap()
            .write_all(rules.as_bytes())
            .unwrap();
        assert!(nft.wait().unwrap().success(), "nft refused the counters");
        Uplink { ns: ns.into() }
    }

    /// (QUIC, SSH, all) bytes sent so far.
    fn read(&self) -> (u64, u64, u64) {
        let out = tiandi_satlink::Topology::command(&self.ns, "nft")
            .args(["-j", "list", "table", "inet", "tiandi_uplink"])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nft -j");
        let bytes: Vec<u64> = v["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|o| o["rule"]["expr"].as_array())
            .filter_map(|e| e.iter().find_map(|x| x["counter"]["bytes"].as_u64()))
            .collect();
        assert_eq!(bytes.len(), 3, "{v}");
        (bytes[0], bytes[1], bytes[2])
    }
}

const PROVINCES: [&str; 3] = ["sc", "gd", "hb"];

/// The playbooks against real hosts: a Debian 12 controller and, per province, a relay and
/// three sites, each a container booted with systemd and reached over SSH, the sites behind
/// emulated GEO links (8 Mbit/s, 600 ms round trip, 0.5 % loss; the province relays behind a
/// 20 Mbit/s terrestrial line). `site.yml` installs the controller and every agent from the
/// packages, enrolls each site with a one-time token it fetches from the controller, and
/// waits until each reports its version; `rollout.yml` stages the agent package once per
/// province over the ministry's uplink (the relays forward it to their sites), upgrades the
/// canary and then the provinces in batches from the sites' own copies; a rollout whose canary
/// fails stops before any other site is touched.
#[test]
fn site_yml_and_a_staged_rollout_run_over_geo_links_and_the_package_crosses_the_uplink_once_per_province()
 {
    use tiandi_satlink::{Shape, Spec, Topology};
    use tiandi_tests::container::{Container, Network, deb};
    assert!(
        tiandi_tests::can_emulate_links(),
        "this test needs root and /dev/net/tun (CI runs it as root)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let inv = tmp.path().join("inventory");
    let files = inv.join("files");
    std::fs::create_dir_all(inv.join("group_vars")).unwrap();
    std::fs::create_dir_all(&files).unwrap();
    for (krate, binary) in [
        ("tiandi-controller", "tiandi-controller"),
        ("tiandi-agent", "tiandi-agent"),
    ] {
        tiandi_tests::bin(binary);
        deb(krate, &files);
    }
    let version = env!("CARGO_PKG_VERSION");
    let package = std::fs::metadata(files.join(format!("tiandi-agent_{version}-1_amd64.deb")))
        .expect("the agent's package")
        .len();

    // Sites 1-3 of the topology are the province relays, 4-12 the sites (three a province).
    let ground = Shape {
        rate_kbit: 20_000,
        delay_ms: 10.0,
        ..Shape::default()
    };
    let geo = Shape::geo(8_000, 0.5);
    let mut links = vec![(ground.clone(), ground); 3];
    links.extend(std::iter::repeat_n((geo.clone(), geo), 9));
    let spec = Spec {
        prefix: "tdans".into(),
        net: [10, 204, 0],
        sites: links,
        seed: Some(18),
        second: Vec::new(),
        second_net: None,
    };
    let topo = Topology::up(&spec).expect("topology up");
    let mut hosts: Vec<(String, String, String)> = Vec::new(); // (name, netns, address)
    for (p, code) in PROVINCES.iter().enumerate() {
        hosts.push((
            format!("{code}-relay"),
            topo.site_ns(p + 1),
            topo.site_addr(p + 1).to_string(),
        ));
    }
    for (p, code) in PROVINCES.iter().enumerate() {
        for n in 1..=3 {
            let i = 4 + p * 3 + (n - 1);
            hosts.push((
                format!("{code}-00{n}"),
                topo.site_ns(i),
                topo.site_addr(i).to_string(),
            ));
        }
    }
    let ctl_ns = topo.ctl_ns();
    let uplink = Uplink::count(&ctl_ns);

    // Boot everything at once; the control node's key is the root's authorized key.
    let key = tmp.path().join("id");
    let kg = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "tiandi-test", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(kg.success());
    let pubkey = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let boot = |name: &str, ns: &str| {
        let c = Container::boot(name, Network::Netns(ns), &[]);
        c.sh(&format!(
            "mkdir -p -m 700 /root/.ssh && echo '{}' > /root/.ssh/authorized_keys && systemctl is-active ssh",
            pubkey.trim()
        ));
        c
    };
    let (ctl, sites): (Container, Vec<Container>) = std::thread::scope(|s| {
        let ctl = s.spawn(|| boot("ministry-ctl", &ctl_ns));
        let sites: Vec<_> = hosts
            .iter()
            .map(|(name, ns, _)| s.spawn(move || boot(name, ns)))
            .collect();
        (
            ctl.join().unwrap(),
            sites.into_iter().map(|h| h.join().unwrap()).collect(),
        )
    });

    // The inventory, laid out as ansible/inventory is (YAML's JSON form).
    let token_file = |name: &str| ctl.path(&format!("/var/lib/tiandi/controller/{name}"));
    let mut sites_groups = serde_json::Map::new();
    let mut relays = serde_json::Map::new();
    for (p, code) in PROVINCES.iter().enumerate() {
        let (relay, _, relay_addr) = &hosts[p];
        relays.insert(
            relay.clone(),
            serde_json::json!({"ansible_host": relay_addr, "tiandi_province": code.to_uppercase()}),
        );
        let members: serde_json::Map<_, _> = hosts[3 + p * 3..6 + p * 3]
            .iter()
            .map(|(n, _, a)| (n.clone(), serde_json::json!({ "ansible_host": a })))
            .collect();
        sites_groups.insert(
            format!("province_{code}"),
            serde_json::json!({ "hosts": members }),
        );
        let vars = serde_json::json!({
            "tiandi_province": code.to_uppercase(),
            "tiandi_agent_via_relay_address": format!("{relay_addr}:4434"),
            "tiandi_agent_via_relay_site": relay,
        });
        std::fs::write(
            inv.join(format!("group_vars/province_{code}.yml")),
            vars.to_string(),
        )
        .unwrap();
    }
    let inventory = serde_json::json!({"all": {"children": {
        "tiandi_controllers": {"hosts": {"ministry-ctl": {"ansible_host": topo.ctl_addr().to_string()}}},
        "tiandi_relays": {"hosts": relays},
        "tiandi_sites": {"children": sites_groups},
        "canary": {"hosts": {"sc-001": null}},
    }}});
    std::fs::write(inv.join("hosts.yml"), inventory.to_string()).unwrap();
    let all = serde_json::json!({
        "ansible_user": "root",
        "ansible_ssh_private_key_file": key,
        "ansible_ssh_extra_args": "-o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=no",
        "tiandi_controller_quic": format!("{}:4433", topo.ctl_addr()),
        // The API on the controller's loopback, where the control node is too.
        "tiandi_controller_api": "http://127.0.0.1:8440",
        "tiandi_package_dir": files,
        "tiandi_version": version,
        // The secrets a NOC keeps in ansible-vault: here read from the controller as made.
        "tiandi_admin_token": format!("{{{{ lookup('ansible.builtin.file', '{}') }}}}", token_file("admin.token").display()),
        "tiandi_read_token": format!("{{{{ lookup('ansible.builtin.file', '{}') }}}}", token_file("read.token").display()),
        "tiandi_agent_health_retries": 40,
        "tiandi_agent_health_delay": 3,
        "tiandi_stage_poll_s": 3,
        "tiandi_stage_timeout_s": 900,
    });
    std::fs::write(inv.join("group_vars/all.yml"), all.to_string()).unwrap();
    let relays_map: serde_json::Map<_, _> = PROVINCES
        .iter()
        .map(|c| (c.to_uppercase(), serde_json::json!(format!("{c}-relay"))))
        .collect();
    let rates: serde_json::Map<_, _> = PROVINCES
        .iter()
        .map(|c| (format!("{c}-relay"), serde_json::json!(20.0)))
        .collect();
    std::fs::write(
        inv.join("group_vars/tiandi_controllers.yml"),
        // The relays' lines' committed rate: what the controller paces the staged package at.
        serde_json::json!({
            "tiandi_controller_relays": relays_map,
            "tiandi_controller_link_rates": rates,
        })
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        inv.join("group_vars/tiandi_relays.yml"),
        serde_json::json!({"tiandi_agent_relay_listen": "0.0.0.0:4434", "tiandi_agent_install_from": "copy"}).to_string(),
    )
    .unwrap();
    std::fs::write(
        inv.join("group_vars/tiandi_sites.yml"),
        serde_json::json!({"tiandi_agent_install_from": "staged", "tiandi_agent_profile": "geo", "tiandi_agent_interval_s": 5}).to_string(),
    )
    .unwrap();

    let playbook = |args: &[&str]| -> (bool, String, f64) {
        let bin = tools();
        let started = std::time::Instant::now();
        let out = tiandi_satlink::Topology::command(&ctl_ns, bin.join("ansible-playbook"))
            .arg("-i")
            .arg(inv.join("hosts.yml"))
            .args(args)
            .current_dir(ansible_dir())
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    bin.display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .env("ANSIBLE_CONFIG", ansible_dir().join("ansible.cfg"))
            .env("ANSIBLE_ROLES_PATH", ansible_dir().join("roles"))
            .env("ANSIBLE_SSH_CONTROL_PATH_DIR", tmp.path().join("cp"))
            .env("ANSIBLE_CACHE_PLUGIN_CONNECTION", tmp.path().join("facts"))
            .env("ANSIBLE_LOCAL_TEMP", tmp.path().join("ansible-tmp"))
            .env("ANSIBLE_HOME", tmp.path().join("ansible-home"))
            .env("ANSIBLE_NOCOLOR", "1")
            .output()
            .expect("ansible-playbook");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text, started.elapsed().as_secs_f64())
    };

    // 1. site.yml: the controller, the relays' and the sites' agents (the relays' conference
    // relay, tiandi-video, needs FFmpeg's libraries, which the container's root has not).
    let (ok, out, site_s) = playbook(&["playbooks/site.yml", "--skip-tags", "tiandi_relay"]);
    assert!(ok, "site.yml failed:\n{out}");
    let read_token = std::fs::read_to_string(token_file("read.token")).unwrap();
    let read_token = read_token.trim().to_string();
    for (name, _, _) in &hosts {
        let url = format!("http://127.0.0.1:8440/api/sites/{name}");
        let t = read_token.clone();
        let site = tiandi_tests::run_in(Some(&ctl_ns), move || {
            tiandi_tests::get_json_as(&url, Some(&t))
        })
        .unwrap_or_else(|| panic!("no site {name} at the controller"));
        assert_eq!(site["connected"], true, "{name}: {site}");
        assert_eq!(site["agent_version"], version, "{name}: {site}");
    }
    // Every site's identity was made by its own enrollment, and the agent runs hardened.
    for c in &sites {
        assert_eq!(
            c.sh("stat -c '%a %U' /var/lib/tiandi/agent/identity/site.key; systemctl is-enabled tiandi-agent"),
            "600 tiandi\nenabled\n"
        );
    }

    // 2. The staged rollout, measured on the ministry's uplink.
    let before = uplink.read();
    let (ok, out, rollout_s) = playbook(&["playbooks/rollout.yml"]);
    assert!(ok, "rollout.yml failed:\n{out}");
    let after = uplink.read();
    let (quic, ssh, all) = (after.0 - before.0, after.1 - before.1, after.2 - before.2);
    for play in [
        "PLAY [Canary sites]",
        "PLAY [The other sites, province by province",
    ] {
        assert!(out.contains(play), "{play} did not run:\n{out}");
    }
    // Each site installed the copy its relay delivered, checked by its SHA-256.
    for (c, (name, _, _)) in sites[3..].iter().zip(&hosts[3..]) {
        let found = c.sh(
            "ls /var/lib/tiandi/agent/inbox/*/ 2>/dev/null || ls -R /var/lib/tiandi/agent/inbox",
        );
        assert!(
            found.contains(&format!("tiandi-agent_{version}-1_amd64.deb")),
            "{name}: {found}"
        );
    }
    let per_package = quic as f64 / package as f64;
    eprintln!(
        "ansible: site.yml {site_s:.0} s for a controller and 12 agents; rollout.yml {rollout_s:.0} s for 9 sites in 3 provinces; \
         package {} kB, ministry uplink during the rollout: QUIC {} kB ({per_package:.2} packages), SSH {} kB, all {} kB",
        package / 1000,
        quic / 1000,
        ssh / 1000,
        all / 1000
    );
    // Once per province (3), not once per site (9): the relays forward it.
    assert!(
        (3.0..4.5).contains(&per_package),
        "the rollout sent {per_package:.2} packages' worth of QUIC over the ministry's uplink for 3 provinces"
    );

    // 3. A canary that fails stops the rollout before any other site: its agent's unit is
    // masked (as a broken package would leave it), so it cannot be enabled and started; the
    // running agent still takes the staged copy.
    sites[3].sh("systemctl mask tiandi-agent");
    let (ok, out, _) = playbook(&[
        "playbooks/rollout.yml",
        "-e",
        "tiandi_rollout_sites=province_sc",
    ]);
    assert!(!ok, "a rollout with a failed canary succeeded:\n{out}");
    assert!(out.contains("PLAY [Canary sites]"), "{out}");
    assert!(
        !out.contains("PLAY [The other sites"),
        "the rollout went on past its failed canary:\n{out}"
    );
    drop(sites);
    drop(ctl);
    let _ = Command::new("pkill")
        .arg("-f")
        .arg(tmp.path().join("cp"))
        .status();
    topo.down();
}
