//! Reading and checking profile files: the built-ins (embedded) and an operator's directory.
//! Every error names the file and the key.

use std::collections::BTreeMap;
use std::path::Path;

use super::{MAX_OBJECTS, MAX_PROFILES, MAX_RULES, ObjType, Profile, Role, parse_oid};

/// The built-in profiles, in the operator's form.
const BUILT_IN: [(&str, &str); 3] = [
    ("if-mib.toml", include_str!("../../profiles/if-mib.toml")),
    ("ups-mib.toml", include_str!("../../profiles/ups-mib.toml")),
    (
        "vsat-modem.toml",
        include_str!("../../profiles/vsat-modem.toml"),
    ),
];

/// Vendor profiles shipped with the agent (public MIBs; each checked against its MIB's text
/// by `tests/mib_check.rs`).
const VENDOR: [(&str, &str); 5] = [
    (
        "vendor/apc-ups.toml",
        include_str!("../../profiles/vendor/apc-ups.toml"),
    ),
    (
        "vendor/dvb-rcs-terminal.toml",
        include_str!("../../profiles/vendor/dvb-rcs-terminal.toml"),
    ),
    (
        "vendor/eaton-xups.toml",
        include_str!("../../profiles/vendor/eaton-xups.toml"),
    ),
    (
        "vendor/idirect-nms.toml",
        include_str!("../../profiles/vendor/idirect-nms.toml"),
    ),
    (
        "vendor/newtec-mdm6000.toml",
        include_str!("../../profiles/vendor/newtec-mdm6000.toml"),
    ),
];

/// Every profile an agent knows, by name.
#[derive(Clone, Debug)]
pub struct Profiles {
    by_name: BTreeMap<String, Profile>,
}

impl Profiles {
    /// The built-in and vendor profiles.
    pub fn built_in() -> Profiles {
        let mut by_name = BTreeMap::new();
        for (file, text) in BUILT_IN.iter().chain(VENDOR.iter()) {
            let p = parse(&format!("(built-in) {file}"), text)
                .unwrap_or_else(|e| panic!("built-in profile {file}: {e}"));
            by_name.insert(p.name.clone(), p);
        }
        Profiles { by_name }
    }

    /// The built-ins and every `*.toml` in `dir` (an operator's). A name used twice, in the
    /// directory or by a built-in, is an error: which one a device means must be plain.
    pub fn with_dir(dir: &Path) -> Result<Profiles, String> {
        let mut all = Profiles::built_in();
        for (file, p) in load_dir(dir)? {
            if all.by_name.contains_key(&p.name) {
                return Err(format!(
                    "{file}: key `name`: {:?} is already a profile (built in, or another file): \
                     give yours its own name",
                    p.name
                ));
            }
            all.by_name.insert(p.name.clone(), p);
        }
        Ok(all)
    }

    pub fn get(&self, name: &str) -> Option<&Profile> {
        self.by_name.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Profile> {
        self.by_name.values()
    }
}

/// Reads every `*.toml` of `dir` (sorted by name), at most [`MAX_PROFILES`].
pub fn load_dir(dir: &Path) -> Result<Vec<(String, Profile)>, String> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: cannot read the profiles directory: {e}", dir.display()))?;
    let mut files: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    files.sort();
    if files.len() > MAX_PROFILES {
        return Err(format!(
            "{}: {} profiles, more than the {MAX_PROFILES} an agent loads",
            dir.display(),
            files.len()
        ));
    }
    let mut out = Vec::new();
    for f in files {
        let file = f.display().to_string();
        let text = std::fs::read_to_string(&f).map_err(|e| format!("{file}: cannot read: {e}"))?;
        if text.len() > 256 * 1024 {
            return Err(format!("{file}: larger than 256 KiB: not a profile"));
        }
        out.push((file.clone(), parse(&file, &text)?));
    }
    Ok(out)
}

/// Parses and checks one profile file.
pub fn parse(file: &str, text: &str) -> Result<Profile, String> {
    let p: Profile = tiandi_link::config::parse_toml(file, text).map_err(|e| e.to_string())?;
    check(&p).map_err(|(key, msg)| format!("{file}: key `{key}`: {msg}"))?;
    Ok(p)
}

fn ident(s: &str, underscore: bool) -> bool {
    let sep = if underscore { b'_' } else { b'-' };
    s.as_bytes().first().is_some_and(u8::is_ascii_lowercase)
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == sep)
}

/// Checks what serde cannot; the error is (key, message).
fn check(p: &Profile) -> Result<(), (String, String)> {
    let err = |k: String, m: String| Err((k, m));
    if !ident(&p.name, false) {
        return err(
            "name".into(),
            format!(
                "{:?}: use 1-64 of a-z, 0-9 and '-', starting with a letter",
                p.name
            ),
        );
    }
    if p.objects.len() > MAX_OBJECTS {
        return err(
            "objects".into(),
            format!("{} objects, at most {MAX_OBJECTS}", p.objects.len()),
        );
    }
    if p.alarms.len() > MAX_RULES || p.traps.len() > MAX_RULES {
        return err(
            "alarms".into(),
            format!("at most {MAX_RULES} alarms and {MAX_RULES} traps"),
        );
    }
    if p.objects.is_empty() && !p.interfaces {
        return err(
            "objects".into(),
            "a profile reads at least one object or the interface table".into(),
        );
    }
    let mut roles: BTreeMap<Role, &str> = BTreeMap::new();
    for (i, o) in p.objects.iter().enumerate() {
        let k = |f: &str| format!("objects[{i}].{f}");
        if !ident(&o.name, true) {
            return err(
                k("name"),
                format!(
                    "{:?}: use 1-64 of a-z, 0-9 and '_', starting with a letter",
                    o.name
                ),
            );
        }
        if p.objects[..i].iter().any(|x| x.name == o.name) {
            return err(k("name"), format!("{:?} twice", o.name));
        }
        if let Some(oid) = &o.oid {
            parse_oid(oid).map_err(|e| (k("oid"), e))?;
        }
        if let Some(m) = &o.mib
            && !m.contains("::")
        {
            return err(
                k("mib"),
                format!("{m:?}: write it MODULE::object (UPS-MIB::upsOutputSource)"),
            );
        }
        if !(o.scale.is_finite() && o.scale != 0.0) {
            return err(k("scale"), format!("{} is not a usable factor", o.scale));
        }
        if o.unit.len() > 16 || o.unit.chars().any(char::is_control) {
            return err(k("unit"), "at most 16 printable characters".into());
        }
        if let Some([lo, hi]) = o.range
            && !(lo.is_finite() && hi.is_finite() && lo <= hi)
        {
            return err(k("range"), format!("[{lo}, {hi}] is not a range"));
        }
        if (o.typ == ObjType::Enum) == o.labels.is_empty() {
            return err(
                k("labels"),
                "an enum has labels, and only an enum has them".into(),
            );
        }
        for (v, l) in &o.labels {
            if v.parse::<i64>().is_err() {
                return err(k("labels"), format!("{v:?} is not an integer"));
            }
            if l.is_empty() || l.len() > 32 || l.chars().any(char::is_control) {
                return err(
                    k("labels"),
                    format!("{l:?}: a label is 1-32 printable characters"),
                );
            }
        }
        if let Some(r) = o.role {
            if let Some(other) = roles.insert(r, &o.name) {
                return err(k("role"), format!("{r:?} is already filled by {other:?}"));
            }
            let text_role = r == Role::ModemModcod;
            let numeric = !matches!(o.typ, ObjType::Text);
            if text_role == numeric && !(text_role && o.typ == ObjType::Number) {
                return err(
                    k("role"),
                    format!("{r:?} does not take a {:?} object", o.typ),
                );
            }
        }
    }
    for (i, a) in p.alarms.iter().enumerate() {
        let k = |f: &str| format!("alarms[{i}].{f}");
        if !ident(&a.name, false) {
            return err(
                k("name"),
                format!("{:?}: use 1-64 of a-z, 0-9 and '-'", a.name),
            );
        }
        let Some(o) = p.object(&a.object) else {
            return err(
                k("object"),
                format!("{:?} is not an object of the profile", a.object),
            );
        };
        let tests = usize::from(!a.is.is_empty())
            + usize::from(a.below.is_some())
            + usize::from(a.above.is_some());
        if tests != 1 {
            return err(
                k("is"),
                "give exactly one of `is`, `below` and `above`".into(),
            );
        }
        if o.typ == ObjType::Enum {
            for v in &a.is {
                if !o.labels.values().any(|l| l == v) && v.parse::<i64>().is_err() {
                    return err(k("is"), format!("{v:?} is not a label of {:?}", o.name));
                }
            }
        }
        if tiandi_proto::Severity::parse(&a.severity).is_none() {
            return err(
                k("severity"),
                format!("{:?}: info, warning, minor, major or critical", a.severity),
            );
        }
    }
    for (i, t) in p.traps.iter().enumerate() {
        let k = |f: &str| format!("traps[{i}].{f}");
        if !ident(&t.name, false) {
            return err(
                k("name"),
                format!("{:?}: use 1-64 of a-z, 0-9 and '-'", t.name),
            );
        }
        parse_oid(&t.oid).map_err(|e| (k("oid"), e))?;
        if let Some(v) = &t.varbind {
            parse_oid(v).map_err(|e| (k("varbind"), e))?;
        }
        if t.varbind.is_some() != t.equals.is_some() {
            return err(k("equals"), "`varbind` and `equals` go together".into());
        }
        if tiandi_proto::Severity::parse(&t.severity).is_none() {
            return err(
                k("severity"),
                format!("{:?}: info, warning, minor, major or critical", t.severity),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_ins_parse_and_are_complete() {
        let all = Profiles::built_in();
        for n in ["if-mib", "ups-mib", "vsat-modem"] {
            assert!(all.get(n).is_some(), "{n}");
        }
        let ups = all.get("ups-mib").unwrap();
        assert!(ups.objects.iter().any(|o| o.essential));
        assert!(ups.alarms.iter().any(|a| a.name == "on-battery"));
        assert!(ups.alarms.iter().any(|a| a.name == "battery-low"));
        assert!(ups.traps.iter().any(|t| t.name == "on-battery"));
        assert!(all.get("if-mib").unwrap().interfaces);
        assert!(
            all.get("if-mib")
                .unwrap()
                .traps
                .iter()
                .any(|t| t.name == "link-down")
        );
    }

    fn bad(text: &str, key: &str) {
        let e = parse("/etc/tiandi/profiles/x.toml", text).unwrap_err();
        assert!(
            e.contains("/etc/tiandi/profiles/x.toml") && e.contains(key),
            "{key}: {e}"
        );
    }

    #[test]
    fn mistakes_name_the_file_and_key() {
        let head = "name = \"acme-ups\"\nkind = \"ups\"\n";
        bad(
            "name = \"Acme UPS\"\nkind = \"ups\"\ninterfaces = true\n",
            "name",
        );
        bad(
            &format!("{head}[[objects]]\nname = \"x\"\noid = \"1.3.x\"\ntype = \"gauge\"\n"),
            "objects[0].oid",
        );
        bad(
            &format!("{head}[[objects]]\nname = \"x\"\noid = \"1.3.6\"\ntype = \"enum\"\n"),
            "objects[0].labels",
        );
        bad(
            &format!(
                "{head}[[objects]]\nname = \"x\"\noid = \"1.3.6\"\ntype = \"gauge\"\nrange = [5, 1]\n"
            ),
            "objects[0].range",
        );
        bad(
            &format!(
                "{head}[[objects]]\nname = \"x\"\noid = \"1.3.6\"\ntype = \"gauge\"\ncolour = 1\n"
            ),
            "colour",
        );
        bad(
            &format!(
                "{head}[[objects]]\nname = \"x\"\noid = \"1.3.6\"\ntype = \"gauge\"\n[[alarms]]\nname = \"hot\"\nobject = \"y\"\nabove = 3\n"
            ),
            "alarms[0].object",
        );
        bad(
            &format!(
                "{head}[[objects]]\nname = \"x\"\noid = \"1.3.6\"\ntype = \"gauge\"\n[[alarms]]\nname = \"hot\"\nobject = \"x\"\nabove = 3\nseverity = \"dire\"\n"
            ),
            "alarms[0].severity",
        );
        bad(
            &format!(
                "{head}[[objects]]\nname = \"x\"\noid = \"1.3.6\"\ntype = \"text\"\nrole = \"ups.charge_pct\"\n"
            ),
            "objects[0].role",
        );
        bad(
            &format!(
                "{head}[[objects]]\nname = \"x\"\noid = \"1.3.6\"\ntype = \"gauge\"\n[[traps]]\nname = \"t\"\noid = \"1.3.6.1\"\nvarbind = \"1.3.6\"\n"
            ),
            "traps[0].equals",
        );
        bad(head, "objects");
    }

    #[test]
    fn a_directory_adds_profiles_and_refuses_a_second_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("acme.toml"),
            "name = \"acme-ups\"\nkind = \"ups\"\n[[objects]]\nname = \"load\"\noid = \"1.3.6.1.4.1.1.1.0\"\ntype = \"gauge\"\nunit = \"%\"\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("README"), "not a profile").unwrap();
        let all = Profiles::with_dir(dir.path()).unwrap();
        assert!(all.get("acme-ups").is_some() && all.get("ups-mib").is_some());
        std::fs::write(
            dir.path().join("b.toml"),
            "name = \"ups-mib\"\nkind = \"ups\"\ninterfaces = true\n",
        )
        .unwrap();
        let e = Profiles::with_dir(dir.path()).unwrap_err();
        assert!(e.contains("b.toml") && e.contains("already"), "{e}");
    }
}
