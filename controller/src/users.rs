//! Operator accounts of the console and the API: names, roles, Argon2id password hashes and
//! per-user API tokens, in the controller's sled database (trees `users` and `user_tokens`).
//!
//! Roles: a ministry administrator (`admin`, everything), a province operator (`province`, the
//! sites of one province only), a `viewer` (reads everything, changes nothing) and the `kiosk`
//! (the NOC's wall screen: reads, long sessions). A role is read from the store on every
//! request, so a change or a disabled account takes effect at once.
//!
//! Nothing here speaks HTTP: [`crate::auth`] turns a request into a [`Principal`] with it.

use std::fmt;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use serde::{Deserialize, Serialize};

use crate::now_ms;

/// Shortest password accepted.
pub const MIN_PASSWORD_CHARS: usize = 10;
/// Longest password accepted (Argon2 takes any length; a bound keeps a request's cost bounded).
pub const MAX_PASSWORD_CHARS: usize = 256;
/// Accounts at most.
pub const MAX_USERS: usize = 10_000;
/// API tokens per user at most.
pub const MAX_TOKENS_PER_USER: usize = 16;
/// What a user API token starts with (so a leaked one is recognisable in a scan).
pub const TOKEN_PREFIX: &str = "tdu_";

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("{0}")]
    Bad(String),
    #[error("no user {0:?}")]
    Unknown(String),
    #[error("user database: {0}")]
    Db(#[from] sled::Error),
    #[error("user record {0:?} is corrupt: {1}")]
    Corrupt(String, String),
}

/// What an account may do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "role", content = "province", rename_all = "lowercase")]
pub enum Role {
    Admin,
    /// The sites of this province only.
    Province(String),
    Viewer,
    Kiosk,
}

impl Role {
    /// `admin`, `viewer`, `kiosk`, or `province` with its code.
    pub fn parse(role: &str, province: Option<&str>) -> Result<Role, UserError> {
        let r = match role {
            "admin" => Role::Admin,
            "viewer" => Role::Viewer,
            "kiosk" => Role::Kiosk,
            "province" => {
                let p = province.filter(|p| !p.is_empty()).ok_or_else(|| {
                    UserError::Bad("a province operator needs a province (--province GD)".into())
                })?;
                tiandi_link::names::validate_name("province", p)
                    .map_err(|e| UserError::Bad(e.to_string()))?;
                return Ok(Role::Province(p.to_string()));
            }
            other => {
                return Err(UserError::Bad(format!(
                    "unknown role {other:?} (admin, province, viewer, kiosk)"
                )));
            }
        };
        if province.is_some_and(|p| !p.is_empty()) {
            return Err(UserError::Bad(format!(
                "only a province operator has a province, not {role}"
            )));
        }
        Ok(r)
    }

    pub fn name(&self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Province(_) => "province",
            Role::Viewer => "viewer",
            Role::Kiosk => "kiosk",
        }
    }

    pub fn province(&self) -> Option<&str> {
        match self {
            Role::Province(p) => Some(p),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Province(p) => write!(f, "province:{p}"),
            r => f.write_str(r.name()),
        }
    }
}

/// One account as stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct User {
    pub name: String,
    #[serde(flatten)]
    pub role: Role,
    /// Argon2id PHC string.
    pub hash: String,
    pub disabled: bool,
    /// The password was set by someone else (the first start, an administrator's reset): it
    /// must be changed before anything else.
    pub must_change: bool,
    pub created_ms: i64,
    pub last_login_ms: Option<i64>,
    pub password_changed_ms: i64,
}

/// What the API shows of an account (never its hash).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UserView {
    pub name: String,
    pub role: String,
    pub province: Option<String>,
    pub disabled: bool,
    pub must_change: bool,
    pub created_ms: i64,
    pub last_login_ms: Option<i64>,
    pub tokens: Vec<TokenView>,
}

/// An API token as stored (under the BLAKE3 hash of the token, never the token).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub user: String,
    pub label: String,
    pub created_ms: i64,
    pub last_used_ms: Option<i64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenView {
    pub id: String,
    pub label: String,
    pub created_ms: i64,
    pub last_used_ms: Option<i64>,
}

/// The accounts.
pub struct Users {
    users: sled::Tree,
    tokens: sled::Tree,
    /// A hash to verify against when the user does not exist, so the time a failed login takes
    /// does not say whether the account exists.
    dummy_hash: String,
}

/// Checks a new password: length only (a NOC's password rules are its own; length is what
/// makes guessing slow).
pub fn check_password(pw: &str) -> Result<(), UserError> {
    let n = pw.chars().count();
    if n < MIN_PASSWORD_CHARS {
        return Err(UserError::Bad(format!(
            "a password needs at least {MIN_PASSWORD_CHARS} characters"
        )));
    }
    if n > MAX_PASSWORD_CHARS {
        return Err(UserError::Bad(format!(
            "a password may have at most {MAX_PASSWORD_CHARS} characters"
        )));
    }
    Ok(())
}

/// Argon2id with the crate's defaults (19 MiB, 2 passes, 1 lane: OWASP's recommendation).
pub fn hash_password(pw: &str) -> Result<String, UserError> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
        .map_err(|e| UserError::Bad(format!("making a salt: {e}")))?;
    Argon2::default()
        .hash_password(pw.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| UserError::Bad(format!("hashing the password: {e}")))
}

fn verify(hash: &str, pw: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| Argon2::default().verify_password(pw.as_bytes(), &h).is_ok())
        .unwrap_or(false)
}

/// A random password for the first administrator or a reset: 20 characters from an alphabet
/// without look-alikes (about 115 bits).
pub fn random_password() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyzABCDEFGHJKMNPQRSTUVWXYZ23456789";
    let mut rng = rand::rng();
    (0..20)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn token_key(token: &str) -> [u8; 32] {
    *blake3::hash(token.as_bytes()).as_bytes()
}

impl Users {
    pub fn open(db: &sled::Db) -> Result<Users, UserError> {
        Ok(Users {
            users: db.open_tree("users")?,
            tokens: db.open_tree("user_tokens")?,
            dummy_hash: hash_password("not a password of anyone")?,
        })
    }

    fn decode(key: &[u8], v: &[u8]) -> Result<User, UserError> {
        serde_json::from_slice(v).map_err(|e| {
            UserError::Corrupt(String::from_utf8_lossy(key).into_owned(), e.to_string())
        })
    }

    pub fn get(&self, name: &str) -> Result<Option<User>, UserError> {
        match self.users.get(name.as_bytes())? {
            None => Ok(None),
            Some(v) => Self::decode(name.as_bytes(), &v).map(Some),
        }
    }

    fn put(&self, u: &User) -> Result<(), UserError> {
        let v = serde_json::to_vec(u).expect("a user serialises");
        self.users.insert(u.name.as_bytes(), v)?;
        self.users.flush()?;
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    pub fn list(&self) -> Result<Vec<UserView>, UserError> {
        let mut tokens: std::collections::HashMap<String, Vec<TokenView>> = Default::default();
        for kv in self.tokens.iter() {
            let (_, v) = kv?;
            if let Ok(t) = serde_json::from_slice::<TokenRecord>(&v) {
                tokens.entry(t.user.clone()).or_default().push(TokenView {
                    id: t.id,
                    label: t.label,
                    created_ms: t.created_ms,
                    last_used_ms: t.last_used_ms,
                });
            }
        }
        let mut out = Vec::new();
        for kv in self.users.iter() {
            let (k, v) = kv?;
            let u = Self::decode(&k, &v)?;
            out.push(UserView {
                tokens: tokens.remove(&u.name).unwrap_or_default(),
                role: u.role.name().into(),
                province: u.role.province().map(str::to_string),
                name: u.name,
                disabled: u.disabled,
                must_change: u.must_change,
                created_ms: u.created_ms,
                last_login_ms: u.last_login_ms,
            });
        }
        Ok(out)
    }

    /// A new account. `must_change`: the password was chosen by someone else.
    pub fn add(
        &self,
        name: &str,
        role: Role,
        password: &str,
        must_change: bool,
    ) -> Result<User, UserError> {
        tiandi_link::names::validate_name("user name", name)
            .map_err(|e| UserError::Bad(e.to_string()))?;
        check_password(password)?;
        if self.get(name)?.is_some() {
            return Err(UserError::Bad(format!("user {name:?} already exists")));
        }
        if self.users.len() >= MAX_USERS {
            return Err(UserError::Bad(format!("at most {MAX_USERS} users")));
        }
        let now = now_ms();
        let u = User {
            name: name.into(),
            role,
            hash: hash_password(password)?,
            disabled: false,
            must_change,
            created_ms: now,
            last_login_ms: None,
            password_changed_ms: now,
        };
        self.put(&u)?;
        Ok(u)
    }

    fn update(&self, name: &str, f: impl FnOnce(&mut User)) -> Result<User, UserError> {
        let mut u = self
            .get(name)?
            .ok_or_else(|| UserError::Unknown(name.into()))?;
        f(&mut u);
        self.put(&u)?;
        Ok(u)
    }

    /// Sets a password. `must_change`: set by an administrator for someone else.
    pub fn set_password(
        &self,
        name: &str,
        password: &str,
        must_change: bool,
    ) -> Result<User, UserError> {
        check_password(password)?;
        let hash = hash_password(password)?;
        self.update(name, |u| {
            u.hash = hash;
            u.must_change = must_change;
            u.password_changed_ms = now_ms();
        })
    }

    pub fn set_role(&self, name: &str, role: Role) -> Result<User, UserError> {
        self.update(name, |u| u.role = role)
    }

    /// Disables (or enables) an account; a disabled account's sessions and tokens stop working
    /// at their next request.
    pub fn set_disabled(&self, name: &str, disabled: bool) -> Result<User, UserError> {
        if disabled {
            let u = self
                .get(name)?
                .ok_or_else(|| UserError::Unknown(name.into()))?;
            if u.role == Role::Admin && !u.disabled && self.enabled_admins()? <= 1 {
                return Err(UserError::Bad(
                    "this is the last enabled administrator: add or enable another first".into(),
                ));
            }
        }
        self.update(name, |u| u.disabled = disabled)
    }

    fn enabled_admins(&self) -> Result<usize, UserError> {
        let mut n = 0;
        for kv in self.users.iter() {
            let (k, v) = kv?;
            let u = Self::decode(&k, &v)?;
            n += usize::from(u.role == Role::Admin && !u.disabled);
        }
        Ok(n)
    }

    /// A role change that would leave no enabled administrator is refused.
    pub fn change_role(&self, name: &str, role: Role) -> Result<User, UserError> {
        let u = self
            .get(name)?
            .ok_or_else(|| UserError::Unknown(name.into()))?;
        if u.role == Role::Admin
            && role != Role::Admin
            && !u.disabled
            && self.enabled_admins()? <= 1
        {
            return Err(UserError::Bad(
                "this is the last enabled administrator: make another one first".into(),
            ));
        }
        self.set_role(name, role)
    }

    /// The account if `password` is its password and it is enabled; `None` otherwise, after
    /// the same work whether or not the account exists.
    pub fn verify_login(&self, name: &str, password: &str) -> Result<Option<User>, UserError> {
        let u = if tiandi_link::names::validate_name("user name", name).is_ok() {
            self.get(name)?
        } else {
            None
        };
        let hash = u.as_ref().map_or(self.dummy_hash.as_str(), |u| &u.hash);
        let ok = password.chars().count() <= MAX_PASSWORD_CHARS && verify(hash, password);
        match u {
            Some(u) if ok && !u.disabled => Ok(Some(u)),
            _ => Ok(None),
        }
    }

    pub fn note_login(&self, name: &str) -> Result<(), UserError> {
        self.update(name, |u| u.last_login_ms = Some(now_ms()))
            .map(|_| ())
    }

    /// A new API token for `user`, returned once (only its hash is kept).
    pub fn create_token(
        &self,
        user: &str,
        label: &str,
    ) -> Result<(String, TokenRecord), UserError> {
        if label.chars().count() > 100 || label.chars().any(char::is_control) {
            return Err(UserError::Bad(
                "a token label has at most 100 characters, no control characters".into(),
            ));
        }
        if self.get(user)?.is_none() {
            return Err(UserError::Unknown(user.into()));
        }
        let mine = self.tokens_of(user)?;
        if mine.len() >= MAX_TOKENS_PER_USER {
            return Err(UserError::Bad(format!(
                "at most {MAX_TOKENS_PER_USER} tokens per user: revoke one first"
            )));
        }
        let token = format!("{TOKEN_PREFIX}{}", hex::encode(rand::random::<[u8; 32]>()));
        let rec = TokenRecord {
            id: hex::encode(rand::random::<[u8; 6]>()),
            user: user.into(),
            label: label.into(),
            created_ms: now_ms(),
            last_used_ms: None,
        };
        self.tokens.insert(
            token_key(&token),
            serde_json::to_vec(&rec).expect("serialises"),
        )?;
        self.tokens.flush()?;
        Ok((token, rec))
    }

    fn tokens_of(&self, user: &str) -> Result<Vec<(sled::IVec, TokenRecord)>, UserError> {
        let mut out = Vec::new();
        for kv in self.tokens.iter() {
            let (k, v) = kv?;
            if let Ok(t) = serde_json::from_slice::<TokenRecord>(&v)
                && t.user == user
            {
                out.push((k, t));
            }
        }
        Ok(out)
    }

    /// Revokes one of `user`'s tokens by its ID; `false` if it has none with that ID.
    pub fn revoke_token(&self, user: &str, id: &str) -> Result<bool, UserError> {
        for (k, t) in self.tokens_of(user)? {
            if t.id == id {
                self.tokens.remove(k)?;
                self.tokens.flush()?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The token's record, if it is a live token of an enabled user. Marks it used (at most
    /// once a minute, so a busy script does not write on every request).
    pub fn token_user(&self, token: &str) -> Result<Option<(TokenRecord, User)>, UserError> {
        if !token.starts_with(TOKEN_PREFIX) {
            return Ok(None);
        }
        let key = token_key(token);
        let Some(v) = self.tokens.get(key)? else {
            return Ok(None);
        };
        let mut rec: TokenRecord = serde_json::from_slice(&v)
            .map_err(|e| UserError::Corrupt("token".into(), e.to_string()))?;
        let Some(user) = self.get(&rec.user)? else {
            return Ok(None);
        };
        if user.disabled {
            return Ok(None);
        }
        let now = now_ms();
        if rec.last_used_ms.is_none_or(|t| now - t > 60_000) {
            rec.last_used_ms = Some(now);
            self.tokens
                .insert(key, serde_json::to_vec(&rec).expect("serialises"))?;
        }
        Ok(Some((rec, user)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users() -> (tempfile::TempDir, Users) {
        let d = tempfile::tempdir().unwrap();
        let db = sled::open(d.path().join("db")).unwrap();
        (d, Users::open(&db).unwrap())
    }

    #[test]
    fn roles_parse_and_refuse() {
        assert_eq!(Role::parse("admin", None).unwrap(), Role::Admin);
        assert_eq!(
            Role::parse("province", Some("GD")).unwrap(),
            Role::Province("GD".into())
        );
        assert!(Role::parse("province", None).is_err());
        assert!(Role::parse("province", Some("../x")).is_err());
        assert!(Role::parse("viewer", Some("GD")).is_err());
        assert!(Role::parse("root", None).is_err());
        assert_eq!(Role::Province("GD".into()).to_string(), "province:GD");
    }

    #[test]
    fn login_tokens_and_last_admin() {
        let (_d, u) = users();
        assert!(u.add("a", Role::Admin, "short", false).is_err());
        assert!(u.add("../a", Role::Admin, "long enough pw", false).is_err());
        u.add("alice", Role::Admin, "long enough pw", false)
            .unwrap();
        assert!(
            u.add("alice", Role::Viewer, "long enough pw", false)
                .is_err()
        );
        assert!(u.verify_login("alice", "long enough pw").unwrap().is_some());
        assert!(u.verify_login("alice", "wrong password").unwrap().is_none());
        assert!(
            u.verify_login("nobody", "long enough pw")
                .unwrap()
                .is_none()
        );
        // The only administrator cannot be disabled or demoted.
        assert!(u.set_disabled("alice", true).is_err());
        assert!(u.change_role("alice", Role::Viewer).is_err());
        u.add("gd", Role::Province("GD".into()), "another long pw", true)
            .unwrap();
        let (token, rec) = u.create_token("gd", "script").unwrap();
        assert!(token.starts_with(TOKEN_PREFIX));
        let (r, user) = u.token_user(&token).unwrap().unwrap();
        assert_eq!((r.id.as_str(), user.name.as_str()), (rec.id.as_str(), "gd"));
        assert!(u.token_user("tdu_00").unwrap().is_none());
        u.set_disabled("gd", true).unwrap();
        assert!(u.token_user(&token).unwrap().is_none());
        assert!(u.verify_login("gd", "another long pw").unwrap().is_none());
        u.set_disabled("gd", false).unwrap();
        assert!(u.revoke_token("gd", &rec.id).unwrap());
        assert!(u.token_user(&token).unwrap().is_none());
        let list = u.list().unwrap();
        assert_eq!(list.len(), 2);
        assert!(
            serde_json::to_string(&list)
                .unwrap()
                .find("argon2")
                .is_none()
        );
    }
}
