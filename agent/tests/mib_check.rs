//! Every profile the agent ships (the built-ins and the vendor profiles, as
//! `Profiles::built_in()` has them) checked against its MIB's text by a real peer: net-snmp's
//! `snmptranslate` over `agent/profiles/mibs` (`-M agent/profiles/mibs -m ALL`), no other MIB
//! directory.
//!
//! For each object with `mib = "MODULE::name"`: `-On` gives the object's OID, which the profile's
//! `oid` must extend by an instance (`.0` when the object is a scalar, a row's index when its
//! parent is a conceptual row); `-Td` must show an OBJECT-TYPE of that module whose SYNTAX fits
//! the object's `type` (an enumeration's labels equal to the MIB's named numbers). For each trap
//! rule with `mib`: `-On` gives its `oid` exactly, and the node is a NOTIFICATION-TYPE or an
//! SMIv1 TRAP-TYPE. A vendor profile names the MIB object of every object and trap rule.
//!
//! Without `snmptranslate` (Debian's `snmp` package, which CI installs) the test fails: it does
//! not skip.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use tiandi_agent::profile::{self, ObjType, Profile, Profiles};

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn mibs_dir() -> PathBuf {
    crate_dir().join("profiles/mibs")
}

/// `snmptranslate -M profiles/mibs -m ALL ARGS`: (success, stdout, stderr). No snmp.conf or
/// MIBS/MIBDIRS of the machine takes part.
fn translate(args: &[&str]) -> (bool, String, String) {
    let mibs = mibs_dir();
    // Its own persistent directory: net-snmp caches MIB indexes there (/var/lib/snmp by
    // default), and two runs at once read each other's half-written index.
    let persist = tempfile::tempdir().expect("a temporary directory");
    for d in ["mib_indexes", "cert_indexes"] {
        std::fs::create_dir(persist.path().join(d)).expect("a temporary directory");
    }
    let out = Command::new("snmptranslate")
        .arg("-M")
        .arg(&mibs)
        .args(["-m", "ALL"])
        .args(args)
        .env_remove("MIBS")
        .env_remove("MIBDIRS")
        .env("SNMPCONFPATH", &mibs)
        .env("SNMP_PERSISTENT_DIR", persist.path())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run snmptranslate ({e}): install net-snmp's tools (Debian package `snmp`); \
                 this test checks every profile against the MIB text and does not skip"
            )
        });
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

/// What `snmptranslate -Td` says of a node.
#[derive(Debug)]
struct Node {
    /// OBJECT-TYPE, NOTIFICATION-TYPE, … (net-snmp prints OBJECT-TYPE for an SMIv1 TRAP-TYPE).
    macro_name: String,
    /// The modules of its `-- FROM` line.
    from: Vec<String>,
    /// The SYNTAX clause as printed (`INTEGER {off(0), on(1)}`, `Integer32 (-1000..500)`).
    syntax: Option<String>,
    /// Its parent is a conceptual row (`INDEX` or `AUGMENTS`) — known only when asked.
    is_row: bool,
    /// The `::= { … }` line.
    registration: String,
}

fn describe(what: &str) -> Result<Node, String> {
    let (ok, out, err) = translate(&["-Td", what]);
    if !ok || out.is_empty() {
        return Err(format!("snmptranslate -Td {what}: {err}"));
    }
    let mut lines = out.lines();
    let _full_name = lines.next();
    let macro_name = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("")
        .to_string();
    let mut node = Node {
        macro_name,
        from: Vec::new(),
        syntax: None,
        is_row: false,
        registration: String::new(),
    };
    for l in lines {
        let t = l.trim();
        if let Some(f) = t.strip_prefix("-- FROM") {
            node.from = f.split(',').map(|m| m.trim().to_string()).collect();
        } else if let Some(s) = t.strip_prefix("SYNTAX") {
            node.syntax = Some(s.trim().to_string());
        } else if t.starts_with("INDEX") || t.starts_with("AUGMENTS") {
            node.is_row = true;
        } else if t.starts_with("::=") {
            node.registration = t.to_string();
        }
    }
    Ok(node)
}

/// `-On MODULE::name`: its numeric OID, without the leading dot.
fn numeric(what: &str) -> Result<String, String> {
    match translate(&["-On", what]) {
        (true, out, _) if out.starts_with('.') => Ok(out.trim_start_matches('.').to_string()),
        (_, out, err) => Err(format!("snmptranslate -On {what}: {out}{err}")),
    }
}

/// The named numbers of `INTEGER {a(1), b(2)}`, by value.
fn named_numbers(syntax: &str) -> Option<BTreeMap<String, String>> {
    let inner = syntax.split_once('{')?.1.split_once('}')?.0;
    let mut out = BTreeMap::new();
    for item in inner.split(',') {
        let (name, rest) = item.trim().split_once('(')?;
        let value = rest.strip_suffix(')')?.trim().parse::<i64>().ok()?;
        out.insert(value.to_string(), name.trim().to_string());
    }
    Some(out)
}

/// The base type of a SYNTAX clause: `INTEGER`, `Integer32`, `OCTET STRING`, …
fn base_type(syntax: &str) -> &str {
    syntax.split(['(', '{']).next().unwrap_or("").trim()
}

/// Whether a MIB SYNTAX fits a profile object's type; the error says how it does not.
fn fits(typ: ObjType, syntax: &str, labels: &BTreeMap<String, String>) -> Result<(), String> {
    let base = base_type(syntax);
    let names = named_numbers(syntax);
    let integer = matches!(base, "INTEGER" | "Integer32" | "Gauge32" | "Unsigned32");
    if names.is_some() && typ != ObjType::Enum {
        return Err(format!(
            "the MIB's SYNTAX is `{syntax}`, an enumeration: the type is enum, with its labels"
        ));
    }
    let ok = match typ {
        ObjType::Enum => {
            let Some(names) = names else {
                return Err(format!(
                    "type enum, but the MIB's SYNTAX `{syntax}` names no values"
                ));
            };
            if &names != labels {
                let missing: Vec<String> = names
                    .iter()
                    .filter(|(k, v)| labels.get(*k) != Some(*v))
                    .map(|(k, v)| format!("{k} = {v:?}"))
                    .collect();
                let extra: Vec<String> = labels
                    .iter()
                    .filter(|(k, v)| names.get(*k) != Some(*v))
                    .map(|(k, v)| format!("{k} = {v:?}"))
                    .collect();
                return Err(format!(
                    "labels differ from the MIB's named numbers: the MIB has [{}] that the \
                     profile lacks; the profile has [{}] that the MIB does not",
                    missing.join(", "),
                    extra.join(", ")
                ));
            }
            true
        }
        ObjType::Integer => integer,
        ObjType::Gauge => matches!(base, "Gauge32" | "Unsigned32"),
        ObjType::Counter => matches!(base, "Counter32" | "Counter64"),
        ObjType::Timeticks => base == "TimeTicks",
        ObjType::Text => base == "OCTET STRING",
        ObjType::Number => base == "OCTET STRING" || integer,
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "type {typ:?} does not fit the MIB's SYNTAX `{syntax}`"
        ))
    }
}

/// Module name → the file of `profiles/mibs` that defines it (`NAME DEFINITIONS ::= BEGIN`).
fn module_files() -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(mibs_dir()).expect("agent/profiles/mibs") {
        let p = e.unwrap().path();
        let Ok(text) = std::fs::read_to_string(&p) else {
            continue;
        };
        let text = strip_comments(&text);
        let mut words = text.split_whitespace();
        let mut prev = "";
        for w in words.by_ref() {
            if w == "DEFINITIONS" && !prev.is_empty() {
                out.insert(prev.to_string(), p.clone());
                break;
            }
            prev = w;
        }
    }
    out
}

fn strip_comments(text: &str) -> String {
    text.lines()
        .map(|l| l.split("--").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Profile name → its file (relative to the crate), from the files themselves.
fn profile_files() -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for dir in ["profiles", "profiles/vendor"] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(crate_dir().join(dir))
            .unwrap_or_else(|e| panic!("agent/{dir}: {e}"))
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        files.sort();
        for f in files {
            let rel = format!("agent/{dir}/{}", f.file_name().unwrap().to_string_lossy());
            let text = std::fs::read_to_string(&f).unwrap();
            let p = profile::parse(&rel, &text).unwrap_or_else(|e| panic!("{e}"));
            out.insert(p.name, rel);
        }
    }
    out
}

fn check_profile(p: &Profile, file: &str, modules: &BTreeMap<String, PathBuf>) -> Vec<String> {
    let vendor = file.contains("/vendor/");
    let mut bad = Vec::new();
    for (i, o) in p.objects.iter().enumerate() {
        let key = |f: &str| format!("{file}: key `objects[{i}].{f}` ({})", o.name);
        let Some(mib) = &o.mib else {
            if vendor {
                bad.push(format!(
                    "{}: a vendor profile names the MIB object of every object (MODULE::name)",
                    key("mib")
                ));
            }
            continue;
        };
        let module = mib.split("::").next().unwrap_or("");
        if !modules.contains_key(module) {
            bad.push(format!(
                "{}: {mib:?}: no file of agent/profiles/mibs defines the module {module}",
                key("mib")
            ));
            continue;
        }
        let base = match numeric(mib) {
            Ok(b) => b,
            Err(e) => {
                bad.push(format!("{}: {mib:?} is not in the MIB: {e}", key("mib")));
                continue;
            }
        };
        let node = match describe(mib) {
            Ok(n) => n,
            Err(e) => {
                bad.push(format!("{}: {e}", key("mib")));
                continue;
            }
        };
        if !node.from.iter().any(|m| m == module) {
            bad.push(format!(
                "{}: {mib:?}: net-snmp has it from {:?}, not from {module}",
                key("mib"),
                node.from
            ));
        }
        let Some(syntax) = node
            .syntax
            .as_deref()
            .filter(|_| node.macro_name == "OBJECT-TYPE")
        else {
            bad.push(format!(
                "{}: {mib:?} is a {} without a SYNTAX, not an object one can read",
                key("mib"),
                node.macro_name
            ));
            continue;
        };
        if let Err(e) = fits(o.typ, syntax, &o.labels) {
            let k = if o.typ == ObjType::Enum && e.starts_with("labels") {
                "labels"
            } else {
                "type"
            };
            bad.push(format!("{}: {mib}: {e}", key(k)));
        }
        // The instance: `.0` under a scalar, a row's index under a conceptual row.
        let parent = base.rsplit_once('.').map(|(p, _)| p).unwrap_or("");
        let in_row = match describe(&format!(".{parent}")) {
            Ok(n) => n.is_row,
            Err(e) => {
                bad.push(format!("{}: {mib}: its parent: {e}", key("mib")));
                continue;
            }
        };
        let Some(oid) = &o.oid else {
            if vendor && !in_row {
                bad.push(format!(
                    "{}: {mib} is a scalar: give its OID ({base}.0)",
                    key("oid")
                ));
            }
            continue;
        };
        let oid = oid.trim_start_matches('.');
        match oid.strip_prefix(&base).and_then(|r| r.strip_prefix('.')) {
            None => bad.push(format!(
                "{}: {oid} is not under {mib}, which the MIB puts at {base}",
                key("oid")
            )),
            Some(instance) if !in_row && instance != "0" => bad.push(format!(
                "{}: {mib} ({base}) is a scalar: its instance is .0, not .{instance}",
                key("oid")
            )),
            Some(instance) if in_row && instance == "0" => bad.push(format!(
                "{}: {mib} ({base}) is a table column: .0 is no row of it",
                key("oid")
            )),
            Some(_) => {}
        }
    }
    for (i, t) in p.traps.iter().enumerate() {
        let key = |f: &str| format!("{file}: key `traps[{i}].{f}` ({})", t.name);
        let Some(mib) = &t.mib else {
            if vendor {
                bad.push(format!(
                    "{}: a vendor profile names the MIB notification of every trap rule",
                    key("mib")
                ));
            }
            continue;
        };
        let module = mib.split("::").next().unwrap_or("");
        let name = mib.split("::").nth(1).unwrap_or("");
        let oid = match numeric(mib) {
            Ok(o) => o,
            Err(e) => {
                bad.push(format!("{}: {mib:?} is not in the MIB: {e}", key("mib")));
                continue;
            }
        };
        if oid != t.oid.trim_start_matches('.') {
            bad.push(format!(
                "{}: the profile has {}, the MIB puts {mib} at {oid}",
                key("oid"),
                t.oid
            ));
        }
        let node = match describe(mib) {
            Ok(n) => n,
            Err(e) => {
                bad.push(format!("{}: {e}", key("mib")));
                continue;
            }
        };
        let notification = node.macro_name == "NOTIFICATION-TYPE";
        // net-snmp prints an SMIv1 TRAP-TYPE as an OBJECT-TYPE without SYNTAX under the
        // enterprise's synthesised `#(0)` node: confirm it in the module's text.
        let trap_type = node.macro_name == "OBJECT-TYPE"
            && node.syntax.is_none()
            && node.registration.contains("#(0)")
            && modules.get(module).is_some_and(|f| {
                strip_comments(&std::fs::read_to_string(f).unwrap_or_default())
                    .lines()
                    .any(|l| {
                        let mut w = l.split_whitespace();
                        w.next() == Some(name) && w.next() == Some("TRAP-TYPE")
                    })
            });
        if !(notification || trap_type) {
            bad.push(format!(
                "{}: {mib} is a {}, not a NOTIFICATION-TYPE or TRAP-TYPE",
                key("mib"),
                node.macro_name
            ));
        }
    }
    bad
}

#[test]
fn every_profile_matches_its_mib_text() {
    // The MIB directory loads whole: every IMPORT found, nothing reported.
    let (ok, out, err) = translate(&["-On", "SNMPv2-MIB::sysUpTime"]);
    assert!(
        ok && out == ".1.3.6.1.2.1.1.3" && err.is_empty(),
        "agent/profiles/mibs does not load cleanly in net-snmp: {out} {err}"
    );
    let modules = module_files();
    let files = profile_files();
    let all = Profiles::built_in();
    let mut bad = Vec::new();
    for (name, file) in &files {
        if all.get(name).is_none() {
            bad.push(format!(
                "{file}: profile {name:?} is not built in: add it to `VENDOR` in \
                 agent/src/profile/load.rs"
            ));
        }
    }
    let mut checked = 0;
    for p in all.iter() {
        let Some(file) = files.get(&p.name) else {
            bad.push(format!(
                "built-in profile {:?}: no file under agent/profiles declares it",
                p.name
            ));
            continue;
        };
        for m in &p.mibs {
            if !modules.contains_key(m) {
                bad.push(format!(
                    "{file}: key `mibs`: no file of agent/profiles/mibs defines {m}"
                ));
            }
        }
        bad.extend(check_profile(p, file, &modules));
        checked += 1;
    }
    assert!(checked >= 8, "only {checked} profiles checked");
    assert!(
        bad.is_empty(),
        "{} problems:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

#[test]
fn the_check_catches_what_differs() {
    // The checker itself, on profiles that are wrong in known ways.
    let modules = module_files();
    let text = r#"
name = "wrong-ups"
kind = "ups"
[[objects]]
name = "source"
oid = "1.3.6.1.2.1.33.1.4.1.1"
mib = "UPS-MIB::upsOutputSource"
type = "enum"
labels = { "1" = "other", "5" = "onBattery" }
[[objects]]
name = "charge"
oid = "1.3.6.1.2.1.33.1.2.4.0"
mib = "UPS-MIB::upsEstimatedChargeRemaining"
type = "counter"
[[objects]]
name = "load"
oid = "1.3.6.1.2.1.33.1.4.4.1.5.0"
mib = "UPS-MIB::upsOutputPercentLoad"
type = "integer"
[[objects]]
name = "nowhere"
oid = "1.3.6.1.2.1.33.1.2.4.0"
mib = "UPS-MIB::upsNoSuchObject"
type = "integer"
[[objects]]
name = "unnamed"
oid = "1.3.6.1.2.1.33.1.2.3.0"
type = "integer"
[[traps]]
name = "on-battery"
oid = "1.3.6.1.2.1.33.2.2"
mib = "UPS-MIB::upsTrapOnBattery"
[[traps]]
name = "not-a-trap"
oid = "1.3.6.1.2.1.33.1.4.1"
mib = "UPS-MIB::upsOutputSource"
"#;
    let p = profile::parse("wrong.toml", text).unwrap();
    let bad = check_profile(&p, "agent/profiles/vendor/wrong-ups.toml", &modules).join("\n");
    for want in [
        "`objects[0].labels` (source)",
        "the profile has [5 = \"onBattery\"] that the MIB does not",
        "`objects[0].oid` (source): UPS-MIB::upsOutputSource (1.3.6.1.2.1.33.1.4.1) is a scalar: its instance is .0, not .1",
        "`objects[1].type` (charge)",
        "`objects[2].oid` (load)",
        "`objects[3].mib` (nowhere)",
        "`objects[4].mib` (unnamed): a vendor profile names",
        "`traps[0].oid` (on-battery): the profile has 1.3.6.1.2.1.33.2.2, the MIB puts UPS-MIB::upsTrapOnBattery at 1.3.6.1.2.1.33.2.1",
        "`traps[1].mib` (not-a-trap): UPS-MIB::upsOutputSource is a OBJECT-TYPE, not a NOTIFICATION-TYPE",
    ] {
        assert!(bad.contains(want), "expected {want:?} among:\n{bad}");
    }
    assert!(
        bad.lines()
            .all(|l| l.starts_with("agent/profiles/vendor/wrong-ups.toml: key `"))
    );
}
