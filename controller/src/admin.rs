//! Admin requests and their answers, defined once: the API's `/api/admin/*` routes take them,
//! the CLI ([`crate::cli`]) sends them, both with the same serde types. Each request knows its
//! route and runs through one dispatch ([`AdminCall::dispatch`]) that the API and the CLI's
//! offline path (no controller running: work on the data directory) both call.
//!
//! Nothing here speaks HTTP or opens the data directory: it gets the registry and the outbox.

use std::path::PathBuf;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tiandi_transfer::Outbox;

use crate::config::RecordingFormat;
use crate::registry::{Registry, RegistryError, SiteRecord, Token};
use crate::transfers::{self, SendError};

/// Why an admin request failed; the API maps the kind to its status code.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The request is wrong: say what to change (400).
    #[error("{0}")]
    Bad(String),
    /// It names something that does not exist (404).
    #[error("{0}")]
    NotFound(String),
    /// Only the running controller can do this (conferences live in it).
    #[error("{0}")]
    NeedsController(String),
    /// The controller's own failure (500).
    #[error("{0}")]
    Internal(String),
}

impl From<RegistryError> for AdminError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::UnknownSite(_) => AdminError::NotFound(e.to_string()),
            RegistryError::Db(_) | RegistryError::Corrupt(_) => AdminError::Internal(e.to_string()),
            other => AdminError::Bad(other.to_string()),
        }
    }
}

impl From<SendError> for AdminError {
    fn from(e: SendError) -> Self {
        match e {
            SendError::UnknownDestination(_) => AdminError::NotFound(e.to_string()),
            other => AdminError::Bad(other.to_string()),
        }
    }
}

/// What an admin request may use: the registry, the outbox and the configuration. The running
/// controller hands in its own; the CLI's offline path opens them from the data directory.
pub struct Admin<'a> {
    pub registry: &'a Registry,
    pub outbox: &'a Outbox,
    pub config: &'a crate::Config,
    pub users: &'a crate::users::Users,
    pub backups: &'a crate::backups::Backups,
}

impl Admin<'_> {
    fn ttl(&self, hours: Option<u32>) -> Duration {
        Duration::from_secs(u64::from(hours.unwrap_or(self.config.token_hours)) * 3600)
    }
}

/// An admin request: its route, its answer, and what it does.
pub trait AdminCall: Serialize + DeserializeOwned + Send + 'static {
    /// The route under the API (`/api/admin/...` or `/api/...`).
    const PATH: &'static str;
    /// `GET` requests carry no body.
    const GET: bool = false;
    type Answer: Serialize + DeserializeOwned + Send + 'static;
    /// Runs the request against the registry and outbox (blocking: sled).
    fn dispatch(&self, admin: &Admin<'_>) -> Result<Self::Answer, AdminError>;
    /// What the audit log says it did: the action and what it acted on (`None`: a read).
    fn audit(&self) -> Option<(String, String)> {
        None
    }
}

/// A one-time enrollment token for a site.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollRequest {
    pub site_id: String,
    pub province: String,
    /// Token lifetime (default: `token_hours`).
    #[serde(default)]
    pub ttl_hours: Option<u32>,
    /// The role its certificate will carry (`relay`: a conference relay that may cascade).
    #[serde(default)]
    pub role: tiandi_link::pki::CertRole,
}

impl AdminCall for EnrollRequest {
    const PATH: &'static str = "/api/admin/enroll";
    type Answer = Token;
    fn audit(&self) -> Option<(String, String)> {
        Some((
            "enroll".into(),
            format!("{} ({}, {})", self.site_id, self.province, self.role),
        ))
    }
    fn dispatch(&self, a: &Admin<'_>) -> Result<Token, AdminError> {
        Ok(a.registry.create_token_as(
            &self.site_id,
            &self.province,
            a.ttl(self.ttl_hours),
            self.role,
        )?)
    }
}

/// A site and its province, as a batch enrollment names them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SiteRef {
    pub site_id: String,
    pub province: String,
}

/// The most sites one batch may enroll.
pub const MAX_BATCH: usize = 100_000;

/// Tokens for many sites at once.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollBatchRequest {
    pub sites: Vec<SiteRef>,
    #[serde(default)]
    pub ttl_hours: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollBatchAnswer {
    pub tokens: Vec<Token>,
}

impl AdminCall for EnrollBatchRequest {
    const PATH: &'static str = "/api/admin/enroll-batch";
    type Answer = EnrollBatchAnswer;
    fn audit(&self) -> Option<(String, String)> {
        Some(("enroll".into(), format!("{} sites", self.sites.len())))
    }
    fn dispatch(&self, a: &Admin<'_>) -> Result<EnrollBatchAnswer, AdminError> {
        if self.sites.len() > MAX_BATCH {
            return Err(AdminError::Bad(format!(
                "at most {MAX_BATCH} sites per batch"
            )));
        }
        let list: Vec<(String, String)> = self
            .sites
            .iter()
            .map(|s| (s.site_id.clone(), s.province.clone()))
            .collect();
        let tokens = a.registry.create_tokens(&list, a.ttl(self.ttl_hours))?;
        Ok(EnrollBatchAnswer { tokens })
    }
}

/// Revoke a site's certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RevokeRequest {
    pub site_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RevokeAnswer {
    pub revoked: SiteRecord,
    /// Its live connection was closed (only the running controller has one to close).
    pub disconnected: bool,
}

impl AdminCall for RevokeRequest {
    const PATH: &'static str = "/api/admin/revoke";
    type Answer = RevokeAnswer;
    fn audit(&self) -> Option<(String, String)> {
        Some(("revoke".into(), self.site_id.clone()))
    }
    fn dispatch(&self, a: &Admin<'_>) -> Result<RevokeAnswer, AdminError> {
        Ok(RevokeAnswer {
            revoked: a.registry.revoke(&self.site_id)?,
            disconnected: false,
        })
    }
}

pub use crate::transfers::{SendAnswer, SendRequest};

impl AdminCall for SendRequest {
    const PATH: &'static str = "/api/admin/send";
    type Answer = SendAnswer;
    fn audit(&self) -> Option<(String, String)> {
        Some(("send".into(), format!("{} to {}", self.path, self.to)))
    }
    fn dispatch(&self, a: &Admin<'_>) -> Result<SendAnswer, AdminError> {
        let path = outgoing_file(a.config, &self.path)?;
        let req = SendRequest {
            path: path.display().to_string(),
            to: self.to.clone(),
            priority: self.priority,
            window: self.window,
            rate_limit_mbit: self.rate_limit_mbit,
        };
        Ok(transfers::queue(
            a.registry,
            a.outbox,
            &a.config.relays,
            &req,
        )?)
    }
}

/// The file a send names, resolved (symlinks followed): it must lie under one of
/// `outgoing_dirs` and never among the data directory's own files (its keys, tokens,
/// database), whatever links point there.
pub fn outgoing_file(config: &crate::Config, path: &str) -> Result<PathBuf, AdminError> {
    let real = std::path::Path::new(path)
        .canonicalize()
        .map_err(|e| AdminError::Bad(format!("{path}: {e}")))?;
    let canon = |p: &std::path::Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    let data = canon(&config.data_dir);
    let dirs = config.outgoing_dirs();
    let allowed = dirs
        .iter()
        .map(|d| canon(d))
        .any(|d| real.starts_with(&d) && (!real.starts_with(&data) || d == data.join("outgoing")));
    if allowed && real.is_file() {
        return Ok(real);
    }
    let list: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    Err(AdminError::Bad(if real.starts_with(&data) {
        format!(
            "{path}: the controller's data directory is never sent (its keys and tokens live \
             there); send files from an outgoing directory ({})",
            list.join(", ")
        )
    } else if !allowed {
        format!(
            "{path}: not in an outgoing directory ({}): copy it there, or add its directory \
             to `outgoing_dirs` in the controller's configuration",
            list.join(", ")
        )
    } else {
        format!("{path}: not a regular file")
    }))
}

/// Every transfer and its state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TransfersRequest {}

/// Transfers queued by the controller, and (from the running controller) files sites sent it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TransfersAnswer {
    pub transfers: Vec<tiandi_transfer::JobStatus>,
    #[serde(default)]
    pub received: Vec<transfers::Received>,
    /// How many transfers there are (the API returns the newest `limit`).
    #[serde(default)]
    pub total_transfers: usize,
    /// How many files sites sent there are.
    #[serde(default)]
    pub total_received: usize,
}

impl AdminCall for TransfersRequest {
    const PATH: &'static str = "/api/transfers";
    const GET: bool = true;
    type Answer = TransfersAnswer;
    fn dispatch(&self, a: &Admin<'_>) -> Result<TransfersAnswer, AdminError> {
        Ok(TransfersAnswer {
            transfers: transfers::status(a.outbox)?,
            received: Vec::new(),
            total_transfers: 0,
            total_received: 0,
        })
    }
}

/// Every backup job and where it stands.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BackupsRequest {}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupsAnswer {
    pub jobs: Vec<crate::backups::BackupStatus>,
}

impl AdminCall for BackupsRequest {
    const PATH: &'static str = "/api/backups";
    const GET: bool = true;
    type Answer = BackupsAnswer;
    fn dispatch(&self, a: &Admin<'_>) -> Result<BackupsAnswer, AdminError> {
        let province = |site: &str| a.registry.get(site).map(|r| r.province).unwrap_or_default();
        Ok(BackupsAnswer {
            jobs: a.backups.status(tiandi_transfer::now_ms(), &province),
        })
    }
}

fn thirty() -> u64 {
    30
}

/// A conference operation on the controller's relay. The CLI's `conference` subcommands are
/// this type, so the two cannot drift apart.
#[derive(Debug, Clone, Serialize, Deserialize, clap::Subcommand)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum ConferenceRequest {
    /// Open a conference room (sites can join it from now on).
    Create {
        room: String,
        /// The chairing site (default: `conference.chair`).
        #[arg(long)]
        #[serde(default)]
        chair: Option<String>,
    },
    /// The relay's address and every conference.
    List,
    /// One conference: chair, floor, tracks, the roster with each site's reception.
    Show { room: String },
    /// End a conference: every participant is disconnected.
    End { room: String },
    /// Give the floor to a site (without SITE: take it back).
    Floor {
        room: String,
        #[serde(default)]
        site: Option<String>,
    },
    /// Record the conference on the relay: whoever speaks (the floor holder, else the chair),
    /// or `--site` alone, to `data_dir/recordings/ROOM-WHO-TIME.ts` (MPEG-TS; `tiandi-video
    /// remux FILE.ts FILE.mkv` makes Matroska or MP4 of it); `--stop` ends it and lists who was
    /// recorded from when.
    Record {
        room: String,
        #[arg(long)]
        #[serde(default)]
        site: Option<String>,
        #[arg(long)]
        #[serde(default)]
        stop: bool,
        /// ts (the only format the relay records; `[conference] recording_format`).
        #[arg(long, value_enum)]
        #[serde(default)]
        format: Option<RecordingFormat>,
    },
    /// Ask every participant to confirm presence; `show` lists the answers.
    Rollcall {
        room: String,
        #[arg(long, default_value_t = 30)]
        #[serde(default = "thirty")]
        seconds: u64,
    },
}

impl AdminCall for ConferenceRequest {
    const PATH: &'static str = "/api/admin/conference";
    /// Each operation answers with its own shape (a room, a list, a recording); the CLI
    /// prints it as it comes.
    type Answer = serde_json::Value;
    fn audit(&self) -> Option<(String, String)> {
        let (op, room) = match self {
            ConferenceRequest::List => return None,
            ConferenceRequest::Show { .. } => return None,
            ConferenceRequest::Create { room, .. } => ("create", room),
            ConferenceRequest::End { room } => ("end", room),
            ConferenceRequest::Floor { room, .. } => ("floor", room),
            ConferenceRequest::Record { room, .. } => ("record", room),
            ConferenceRequest::Rollcall { room, .. } => ("rollcall", room),
        };
        Some((format!("conference.{op}"), room.clone()))
    }
    fn dispatch(&self, a: &Admin<'_>) -> Result<serde_json::Value, AdminError> {
        Err(AdminError::NeedsController(format!(
            "conferences live in the running controller: start it (its API at {} did not answer)",
            a.config.api_listen
        )))
    }
}

/// Sites in the registry, with their certificates.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RegistryRequest {}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegistryAnswer {
    pub sites: Vec<SiteRecord>,
}

impl AdminCall for RegistryRequest {
    const PATH: &'static str = "/api/admin/registry";
    const GET: bool = true;
    type Answer = RegistryAnswer;
    fn dispatch(&self, a: &Admin<'_>) -> Result<RegistryAnswer, AdminError> {
        Ok(RegistryAnswer {
            sites: a.registry.list(),
        })
    }
}

/// Operator accounts: list, add, set a password, change a role, disable, enable. A password
/// left out is made here (20 random characters) and returned once; a password set by someone
/// other than its user must be changed at its next login.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum UserRequest {
    List,
    Add {
        name: String,
        role: String,
        #[serde(default)]
        province: Option<String>,
        #[serde(default)]
        password: Option<String>,
    },
    Passwd {
        name: String,
        #[serde(default)]
        password: Option<String>,
    },
    Role {
        name: String,
        role: String,
        #[serde(default)]
        province: Option<String>,
    },
    Disable {
        name: String,
    },
    Enable {
        name: String,
    },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UserAnswer {
    pub users: Vec<crate::users::UserView>,
    /// A password made by the controller, shown this once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

impl From<crate::users::UserError> for AdminError {
    fn from(e: crate::users::UserError) -> Self {
        use crate::users::UserError as E;
        match e {
            E::Unknown(_) => AdminError::NotFound(e.to_string()),
            E::Bad(_) => AdminError::Bad(e.to_string()),
            E::Db(_) | E::Corrupt(..) => AdminError::Internal(e.to_string()),
        }
    }
}

impl AdminCall for UserRequest {
    const PATH: &'static str = "/api/admin/users";
    type Answer = UserAnswer;
    fn audit(&self) -> Option<(String, String)> {
        let (op, name, detail) = match self {
            UserRequest::List => return None,
            UserRequest::Add {
                name,
                role,
                province,
                ..
            }
            | UserRequest::Role {
                name,
                role,
                province,
            } => (
                if matches!(self, UserRequest::Add { .. }) {
                    "add"
                } else {
                    "role"
                },
                name,
                format!(
                    " as {role}{}",
                    province
                        .as_deref()
                        .map(|p| format!(":{p}"))
                        .unwrap_or_default()
                ),
            ),
            UserRequest::Passwd { name, .. } => ("passwd", name, String::new()),
            UserRequest::Disable { name } => ("disable", name, String::new()),
            UserRequest::Enable { name } => ("enable", name, String::new()),
        };
        Some((format!("user.{op}"), format!("{name}{detail}")))
    }
    fn dispatch(&self, a: &Admin<'_>) -> Result<UserAnswer, AdminError> {
        use crate::users::{Role, random_password};
        let mut made = None;
        let mut pw = |given: &Option<String>| match given {
            Some(p) => p.clone(),
            None => {
                let p = random_password();
                made = Some(p.clone());
                p
            }
        };
        match self {
            UserRequest::List => {}
            UserRequest::Add {
                name,
                role,
                province,
                password,
            } => {
                let role = Role::parse(role, province.as_deref())?;
                a.users.add(name, role, &pw(password), true)?;
            }
            UserRequest::Passwd { name, password } => {
                a.users.set_password(name, &pw(password), true)?;
            }
            UserRequest::Role {
                name,
                role,
                province,
            } => {
                a.users
                    .change_role(name, Role::parse(role, province.as_deref())?)?;
            }
            UserRequest::Disable { name } => {
                a.users.set_disabled(name, true)?;
            }
            UserRequest::Enable { name } => {
                a.users.set_disabled(name, false)?;
            }
        }
        Ok(UserAnswer {
            users: a.users.list()?,
            password: made,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conference_requests_read_what_the_cli_and_scripts_send() {
        let r: ConferenceRequest =
            serde_json::from_str(r#"{"op":"list","room":""}"#).expect("list with a room");
        assert!(matches!(r, ConferenceRequest::List));
        let r: ConferenceRequest =
            serde_json::from_str(r#"{"op":"rollcall","room":"drill"}"#).expect("rollcall");
        assert!(matches!(r, ConferenceRequest::Rollcall { seconds: 30, .. }));
        let r: ConferenceRequest =
            serde_json::from_str(r#"{"op":"record","room":"drill","format":"ts"}"#)
                .expect("record");
        assert!(matches!(
            r,
            ConferenceRequest::Record {
                stop: false,
                format: Some(RecordingFormat::Ts),
                ..
            }
        ));
        let e = serde_json::from_str::<ConferenceRequest>(
            r#"{"op":"record","room":"d","format":"mkv"}"#,
        )
        .expect_err("mkv is refused");
        assert!(e.to_string().contains("remux"), "{e}");
        assert!(serde_json::from_str::<ConferenceRequest>(r#"{"op":"dance","room":"d"}"#).is_err());
        // What the CLI sends is what the API reads.
        let sent = ConferenceRequest::Floor {
            room: "drill".into(),
            site: Some("gd-0001".into()),
        };
        let back: ConferenceRequest =
            serde_json::from_value(serde_json::to_value(&sent).expect("to json")).expect("back");
        assert!(matches!(back, ConferenceRequest::Floor { site: Some(s), .. } if s == "gd-0001"));
    }

    #[test]
    fn admin_errors_map_registry_and_send_errors_by_kind() {
        assert!(matches!(
            AdminError::from(RegistryError::UnknownSite("x".into())),
            AdminError::NotFound(_)
        ));
        assert!(matches!(
            AdminError::from(RegistryError::BadToken),
            AdminError::Bad(_)
        ));
        assert!(matches!(
            AdminError::from(SendError::UnknownDestination("site:x".into())),
            AdminError::NotFound(_)
        ));
    }
}
