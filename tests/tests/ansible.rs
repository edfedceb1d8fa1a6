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
        "address": "192.168.1.1:161", "community": "public",
        "oids": {"esno": {"oid": "1.3.6.1.4.1.99999.1.1.0", "scale": 0.1}}}]"#;
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
