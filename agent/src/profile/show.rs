//! Profiles and poll answers as text for a person at a terminal (`tiandi-agent profiles`,
//! `tiandi-agent check-devices`).

use std::fmt::Write;

use tiandi_proto::{Device, DeviceStatus, Probe, ProbeKind, ProblemKind, Severity};

use super::{Profile, Profiles};

/// One line per profile: name, kind, objects (essential), alarms, traps, description.
pub fn table(profiles: &Profiles) -> String {
    let mut out = format!(
        "{:<20} {:<8} {:>8} {:>6} {:>5}  {}\n",
        "PROFILE", "KIND", "OBJECTS", "ALARMS", "TRAPS", "DESCRIPTION"
    );
    for p in profiles.iter() {
        let essential = p.objects.iter().filter(|o| o.essential).count();
        let _ = writeln!(
            out,
            "{:<20} {:<8} {:>8} {:>6} {:>5}  {}",
            p.name,
            kind(p),
            format!("{} ({essential})", p.objects.len()),
            p.alarms.len(),
            p.traps.len(),
            p.description.lines().next().unwrap_or_default()
        );
    }
    out.push_str("OBJECTS: how many, (essential). `tiandi-agent profiles NAME` shows one.\n");
    out
}

fn kind(p: &Profile) -> String {
    serde_json::to_value(p.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// One profile in full.
pub fn describe(p: &Profile) -> String {
    let mut out = format!("{} ({})\n", p.name, kind(p));
    if !p.description.is_empty() {
        let _ = writeln!(out, "  {}", p.description.trim());
    }
    if !p.mibs.is_empty() {
        let _ = writeln!(out, "  MIBs: {}", p.mibs.join(", "));
    }
    if p.interfaces {
        out.push_str("  interfaces: ifTable + ifXTable (names, aliases, speeds, counters)\n");
    }
    out.push_str("objects:\n");
    for o in &p.objects {
        let mut notes = Vec::new();
        if o.essential {
            notes.push("essential".to_string());
        }
        if o.scale != 1.0 {
            notes.push(format!("×{}", o.scale));
        }
        if !o.unit.is_empty() {
            notes.push(o.unit.clone());
        }
        if let Some([lo, hi]) = o.range {
            notes.push(format!("range {lo}..{hi}"));
        }
        if let Some(r) = o.role {
            notes.push(format!("role {r:?}"));
        }
        if !o.labels.is_empty() {
            notes.push(format!("{} labels", o.labels.len()));
        }
        let _ = writeln!(
            out,
            "  {:<24} {:<30} {:?} {}",
            o.name,
            o.oid.as_deref().unwrap_or("(the device's oids)"),
            o.typ,
            notes.join(", ")
        );
    }
    if !p.alarms.is_empty() {
        out.push_str("alarms:\n");
        for a in &p.alarms {
            let mut when = Vec::new();
            if !a.is.is_empty() {
                when.push(format!("is {}", a.is.join(" or ")));
            }
            if let Some(b) = a.below {
                when.push(format!("below {b}"));
            }
            if let Some(b) = a.above {
                when.push(format!("above {b}"));
            }
            let _ = writeln!(
                out,
                "  {:<24} {} {} ({})",
                a.name,
                a.object,
                when.join(", "),
                a.severity
            );
        }
    }
    if !p.traps.is_empty() {
        out.push_str("traps:\n");
        for t in &p.traps {
            let cond = match (&t.varbind, &t.equals) {
                (Some(v), Some(e)) => format!(" when {v} = {e}"),
                _ => String::new(),
            };
            let _ = writeln!(out, "  {:<24} {}{cond} ({})", t.name, t.oid, t.severity);
        }
    }
    out
}

/// A check's result: `ok icmp 0.4 ms`, `FAILED tcp: refused`.
pub fn probe_text(p: &Probe) -> String {
    let kind = match ProbeKind::try_from(p.kind) {
        Ok(ProbeKind::Icmp) => "icmp",
        Ok(ProbeKind::Tcp) => "tcp",
        _ => "check",
    };
    if p.ok {
        format!("ok {kind} {:.1} ms", f64::from(p.rtt_us) / 1000.0)
    } else {
        format!("FAILED {kind}: {}", p.error)
    }
}

/// What each device answered, and the site's checks.
pub fn answers_text(devices: &[Device], probes: &[Probe]) -> String {
    let mut out = String::new();
    for d in devices {
        let _ = write!(
            out,
            "{} ({}): {}",
            d.name,
            d.profile_name,
            DeviceStatus::try_from(d.status)
                .unwrap_or(DeviceStatus::Unknown)
                .as_str()
        );
        if !d.error.is_empty() {
            let _ = write!(out, " — {}", d.error);
        }
        if let Some(r) = &d.reach {
            let _ = write!(out, "; reachability {}", probe_text(r));
        }
        out.push('\n');
        for v in &d.values {
            let value = match v.number() {
                Some(n) => format!("{n} {}", v.unit).trim_end().to_string(),
                None => String::new(),
            };
            let sep = if value.is_empty() || v.text.is_empty() {
                ""
            } else {
                " "
            };
            let _ = writeln!(out, "  {:<24} {value}{sep}{}", v.name, v.text);
        }
        if let Some(u) = &d.ups {
            let _ = writeln!(
                out,
                "  ups: {}, charge {}, runtime {}",
                if u.on_battery { "ON BATTERY" } else { "mains" },
                if u.missing & tiandi_proto::UPS_CHARGE != 0 {
                    "unknown".to_string()
                } else {
                    format!("{} %", u.charge_pct)
                },
                if u.missing & tiandi_proto::UPS_RUNTIME != 0 {
                    "unknown".to_string()
                } else {
                    format!("{} min", u.runtime_s / 60)
                }
            );
        }
        if let Some(m) = &d.modem {
            let _ = writeln!(
                out,
                "  modem: Es/No {:.1} dB, {}",
                f64::from(m.esno_db_x10) / 10.0,
                if m.modcod.is_empty() {
                    "—"
                } else {
                    &m.modcod
                }
            );
        }
        if !d.interfaces.is_empty() {
            let up = d.interfaces.iter().filter(|i| i.oper_up).count();
            let _ = writeln!(out, "  interfaces: {} ({up} up)", d.interfaces.len());
            for i in &d.interfaces {
                let _ = writeln!(
                    out,
                    "    {:>5} {:<16} {:<4} {:>8} in {} out {} errors {}{}",
                    i.index,
                    i.name,
                    if i.oper_up { "up" } else { "down" },
                    if i.speed_mbps > 0 {
                        format!("{} Mb/s", i.speed_mbps)
                    } else {
                        String::new()
                    },
                    i.in_octets,
                    i.out_octets,
                    i.in_errors + i.out_errors,
                    if i.alias.is_empty() {
                        String::new()
                    } else {
                        format!("  \"{}\"", i.alias)
                    }
                );
            }
        }
        for p in &d.problems {
            let kind = ProblemKind::try_from(p.kind)
                .unwrap_or(ProblemKind::Unknown)
                .as_str();
            let _ = writeln!(
                out,
                "  problem: {} {kind}{}{}",
                p.name,
                if p.detail.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", p.detail)
                },
                if p.essential { " — ESSENTIAL" } else { "" }
            );
        }
        for a in &d.alarms {
            let sev = Severity::try_from(a.severity)
                .unwrap_or(Severity::Unknown)
                .as_str();
            let _ = writeln!(out, "  ALARM {} [{sev}] {}", a.name, a.detail);
        }
    }
    if !probes.is_empty() {
        out.push_str("checks:\n");
        for p in probes {
            let _ = writeln!(out, "  {:<24} {}", p.target, probe_text(p));
        }
    }
    out
}
