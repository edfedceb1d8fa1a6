//! What a snapshot holds (`FORMAT.md`, "Snapshots and trees"): when, of what, from where, and
//! a root tree. A tree is one directory's entries, stored as a blob like a chunk of data (so an
//! unchanged directory is stored once across snapshots); a directory's node names its tree.

use serde::{Deserialize, Serialize};

/// What a node of a tree is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Dir,
    File,
    Symlink,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// One file, directory or symbolic link in a tree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// The name in its directory (one path component, UTF-8).
    pub name: String,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_s: i64,
    pub mtime_ns: u32,
    /// Change time, device and inode: only to tell, at the next backup, that a file is
    /// unchanged without reading it.
    #[serde(default)]
    pub ctime_s: i64,
    #[serde(default)]
    pub ctime_ns: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub device: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub inode: u64,
    /// Hard links to this file (more than 1: the restore links the others to the first).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub links: u64,
    pub size: u64,
    /// Chunks in order: ID (hex) and plaintext length.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<(String, u32)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// A directory's tree (hex ID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subtree: Option<String>,
    /// Extended attributes: name, value (hex).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub xattrs: Vec<(String, String)>,
}

impl Node {
    /// A node with this name and kind and nothing else set.
    pub fn new(name: &str, kind: Kind) -> Node {
        Node {
            name: name.to_string(),
            kind,
            mode: 0,
            uid: 0,
            gid: 0,
            mtime_s: 0,
            mtime_ns: 0,
            ctime_s: 0,
            ctime_ns: 0,
            device: 0,
            inode: 0,
            links: 0,
            size: 0,
            chunks: Vec::new(),
            target: None,
            subtree: None,
            xattrs: Vec::new(),
        }
    }
}

/// One directory's entries, sorted by name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tree {
    pub nodes: Vec<Node>,
}

/// Totals recorded with a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    /// Plaintext bytes of the chunks this snapshot added to the repository.
    pub new_bytes: u64,
    /// What those new chunks (and trees) take in the repository, compressed and sealed.
    pub stored_bytes: u64,
    pub duration_ms: u64,
}

/// A snapshot: when, of what, from where, and its root tree (one node per path backed up).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Snapshot {
    pub time_ms: i64,
    pub host: String,
    pub paths: Vec<String>,
    pub tags: Vec<String>,
    /// The root tree (hex ID).
    pub tree: String,
    /// The snapshot whose unchanged files were taken without reading them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    #[serde(default)]
    pub totals: Totals,
}
