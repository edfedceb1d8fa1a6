//! Looking into snapshots without restoring them: `ls` (the nodes under a path), `diff` (what
//! changed between two snapshots; a subtree with the same ID is the same and is not opened),
//! `dump` (one file's contents to a writer).

use std::io::Write;

use serde::Serialize;

use super::{Kind, Node, Repo, Tree, parse_id};
use crate::BackupError;
use crate::chunker;

/// One node as `ls` lists it.
#[derive(Clone, Debug, Serialize)]
pub struct LsEntry {
    pub path: String,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime_s: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// One difference between two snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Change {
    /// `+` added, `-` removed, `M` contents changed, `T` kind changed, `U` metadata only.
    pub what: char,
    pub path: String,
    pub size: u64,
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

fn entry(path: String, n: &Node) -> LsEntry {
    LsEntry {
        path,
        kind: n.kind,
        mode: n.mode,
        uid: n.uid,
        gid: n.gid,
        size: n.size,
        mtime_s: n.mtime_s,
        target: n.target.clone(),
    }
}

impl Repo {
    /// The node at `path` (`name/inside/it`) of snapshot `id`, or the root tree's nodes.
    fn find(&self, id: &str, path: &str) -> Result<(String, Vec<Node>), BackupError> {
        let (_, snap) = self.resolve(id)?;
        let mut tree = self.tree(&snap.tree)?;
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let mut at = String::new();
        for (i, p) in parts.iter().enumerate() {
            let Some(n) = tree.nodes.iter().find(|n| n.name == *p).cloned() else {
                return Err(BackupError::BadPack(format!("the snapshot has no {path}")));
            };
            at = join(&at, p);
            if i + 1 == parts.len() {
                return Ok((at, vec![n]));
            }
            tree = match (&n.kind, &n.subtree) {
                (Kind::Dir, Some(t)) => self.tree(t)?,
                _ => return Err(BackupError::BadPack(format!("{at} is not a directory"))),
            };
        }
        Ok((String::new(), tree.nodes))
    }

    /// Every node under `path` of snapshot `id` (all of it for an empty path), parents first.
    pub fn ls(
        &self,
        id: &str,
        path: &str,
        each: &mut dyn FnMut(LsEntry),
    ) -> Result<(), BackupError> {
        let (at, nodes) = self.find(id, path)?;
        let dir = at.rsplit_once('/').map_or("", |(d, _)| d).to_string();
        let mut stack: Vec<(String, Node)> =
            nodes.into_iter().rev().map(|n| (dir.clone(), n)).collect();
        while let Some((dir, n)) = stack.pop() {
            let p = join(&dir, &n.name);
            if let (Kind::Dir, Some(t)) = (&n.kind, &n.subtree) {
                for c in self.tree(t)?.nodes.into_iter().rev() {
                    stack.push((p.clone(), c));
                }
            }
            each(entry(p, &n));
        }
        Ok(())
    }

    /// What changed from snapshot `a` to snapshot `b`.
    pub fn diff(&self, a: &str, b: &str, each: &mut dyn FnMut(Change)) -> Result<(), BackupError> {
        let (_, sa) = self.resolve(a)?;
        let (_, sb) = self.resolve(b)?;
        self.diff_trees(Some(&sa.tree), Some(&sb.tree), "", each)
    }

    fn subtree(&self, id: Option<&String>) -> Result<Tree, BackupError> {
        match id {
            Some(t) => self.tree(t),
            None => Ok(Tree::default()),
        }
    }

    fn diff_trees(
        &self,
        a: Option<&String>,
        b: Option<&String>,
        dir: &str,
        each: &mut dyn FnMut(Change),
    ) -> Result<(), BackupError> {
        if a.is_some() && a == b {
            return Ok(());
        }
        let (ta, tb) = (self.subtree(a)?, self.subtree(b)?);
        let (mut i, mut j) = (0, 0);
        while i < ta.nodes.len() || j < tb.nodes.len() {
            let (na, nb) = (ta.nodes.get(i), tb.nodes.get(j));
            let order = match (na, nb) {
                (Some(x), Some(y)) => x.name.cmp(&y.name),
                (Some(_), None) => std::cmp::Ordering::Less,
                _ => std::cmp::Ordering::Greater,
            };
            match order {
                std::cmp::Ordering::Less => {
                    let x = na.expect("some");
                    self.all(x, dir, '-', each)?;
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    let y = nb.expect("some");
                    self.all(y, dir, '+', each)?;
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    let (x, y) = (na.expect("some"), nb.expect("some"));
                    let p = join(dir, &x.name);
                    if x.kind != y.kind {
                        each(Change {
                            what: 'T',
                            path: p,
                            size: y.size,
                        });
                    } else if x.kind == Kind::Dir {
                        self.diff_trees(x.subtree.as_ref(), y.subtree.as_ref(), &p, each)?;
                    } else if x.chunks != y.chunks || x.target != y.target {
                        each(Change {
                            what: 'M',
                            path: p,
                            size: y.size,
                        });
                    } else if (x.mode, x.uid, x.gid, x.mtime_s, x.mtime_ns, &x.xattrs)
                        != (y.mode, y.uid, y.gid, y.mtime_s, y.mtime_ns, &y.xattrs)
                    {
                        each(Change {
                            what: 'U',
                            path: p,
                            size: y.size,
                        });
                    }
                    i += 1;
                    j += 1;
                }
            }
        }
        Ok(())
    }

    /// `n` and everything under it, as added or removed.
    fn all(
        &self,
        n: &Node,
        dir: &str,
        what: char,
        each: &mut dyn FnMut(Change),
    ) -> Result<(), BackupError> {
        let p = join(dir, &n.name);
        each(Change {
            what,
            path: p.clone(),
            size: n.size,
        });
        if let (Kind::Dir, Some(t)) = (&n.kind, &n.subtree) {
            for c in self.tree(t)?.nodes {
                self.all(&c, &p, what, each)?;
            }
        }
        Ok(())
    }

    /// Writes the file at `path` of snapshot `id` to `out`, chunk by chunk (a file of any
    /// size, in the memory of one chunk); its size.
    pub fn dump(&self, id: &str, path: &str, out: &mut dyn Write) -> Result<u64, BackupError> {
        let (at, nodes) = self.find(id, path)?;
        let n = match nodes.as_slice() {
            [n] if n.kind == Kind::File && !at.is_empty() => n,
            _ => return Err(BackupError::BadPack(format!("{path} is not a file"))),
        };
        let mut total = 0;
        for (c, _) in &n.chunks {
            let id = parse_id(c)?;
            let plain = self
                .keys
                .open_chunk(&id, &self.sealed_blob(&id)?, chunker::MAX)?;
            out.write_all(&plain)?;
            total += plain.len() as u64;
        }
        Ok(total)
    }
}
