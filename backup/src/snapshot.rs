//! What a snapshot holds: when, of what, from where, and its files, directories and links
//! with their metadata and chunks (`FORMAT.md`, "A repository").

use serde::{Deserialize, Serialize};

/// What a node of a snapshot is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Dir,
    File,
    Symlink,
}

/// One file, directory or symbolic link of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Relative, `/`-separated, starting with the backed-up path's own name.
    pub path: String,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_s: i64,
    pub mtime_ns: u32,
    pub size: u64,
    /// Chunk IDs (hex), in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// A snapshot: when, of what, from where, and its nodes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Snapshot {
    pub time_ms: i64,
    pub host: String,
    pub paths: Vec<String>,
    pub tags: Vec<String>,
    pub nodes: Vec<Node>,
}
