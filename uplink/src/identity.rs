//! The site's identity on disk: `identity/site.key` (0600, generated here, never sent),
//! `site.crt`, `ca.crt`, `site.json` (site ID and province).

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tiandi_link::enroll::Enrolled;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SiteInfo {
    pub site_id: String,
    pub province: String,
}

#[derive(Clone, Debug)]
pub struct Identity {
    pub info: SiteInfo,
    pub key_pem: String,
    pub cert_pem: String,
    pub ca_pem: String,
}

pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("identity")
}

pub fn exists(data_dir: &Path) -> bool {
    dir(data_dir).join("site.json").exists()
}

pub fn save(data_dir: &Path, e: &Enrolled) -> anyhow::Result<()> {
    let d = dir(data_dir);
    // The data directory holds the site's key and its spool: owner-only.
    tiandi_link::secrets::private_dir(data_dir)?;
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    tiandi_link::pki::write_private(&d.join("site.key"), &e.key_pem)?;
    std::fs::write(d.join("site.crt"), &e.cert_pem)?;
    std::fs::write(d.join("ca.crt"), &e.ca_pem)?;
    let info = SiteInfo {
        site_id: e.site_id.clone(),
        province: e.province.clone(),
    };
    // site.json last: its presence marks a complete identity.
    std::fs::write(d.join("site.json"), serde_json::to_vec_pretty(&info)?)?;
    Ok(())
}

/// Loads the identity; refuses a site key others may read (and closes a data directory open
/// to others, saying so).
pub fn load(data_dir: &Path) -> anyhow::Result<Identity> {
    if tiandi_link::secrets::private_dir(data_dir)? {
        tracing::warn!(dir = %data_dir.display(), "The data directory was open to others; made it 0700.");
    }
    let d = dir(data_dir);
    tiandi_link::secrets::read_private(&d.join("site.key"))?;
    let read = |name: &str| -> anyhow::Result<String> {
        let p = d.join(name);
        std::fs::read_to_string(&p).with_context(|| {
            format!(
                "reading {} (is this site enrolled? run `tiandi-agent enroll --controller ADDR --token TOKEN`)",
                p.display()
            )
        })
    };
    let info: SiteInfo = serde_json::from_str(&read("site.json")?)
        .with_context(|| format!("parsing {}", d.join("site.json").display()))?;
    Ok(Identity {
        info,
        key_pem: read("site.key")?,
        cert_pem: read("site.crt")?,
        ca_pem: read("ca.crt")?,
    })
}
