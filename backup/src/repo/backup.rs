//! Backing up: walk the paths, cut files into chunks, store what the repository lacks.
//!
//! One thread walks, reads, cuts and names chunks (keyed BLAKE3) and decides what is new;
//! `threads` workers compress and seal the new chunks and fill packs. The queue between them
//! holds at most `2 × threads` chunks (the walker waits when it is full), so memory stays
//! near `threads × (chunk + pack)` whatever the size of the data.
//!
//! A file the parent snapshot has with the same size, modification and change times and inode,
//! whose chunks are all still stored, is taken from the parent without being read. A directory
//! becomes a tree blob; an unchanged directory's tree has the same ID and is stored once.
//! Every 32 packs an index file is written, so a backup killed half-way leaves at most 32 packs
//! for the next one to index from their trailers.
//!
//! A file that cannot be opened or read is left out (the summary lists it) and the backup goes
//! on. An error writing to the repository (a pack, an index) ends the backup with that error —
//! the first worker's, naming the file — after the packs already written whole get an index.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{Kind, Node, Repo, Snapshot, Totals, Tree};
use crate::BackupError;
use crate::chunker::Chunker;
use crate::crypto::{ChunkId, Keys};
use crate::pack::{self, PackWriter};

/// Packs per index file written during a backup.
const INDEX_EVERY: usize = 32;
/// Paths left out that a summary lists by name (the rest are counted).
const SKIPPED_LISTED: usize = 1000;
/// The most extended attributes kept per file, in bytes of names and values.
const XATTR_MAX: usize = 1 << 20;

/// How to back up.
#[derive(Clone, Debug)]
pub struct BackupOptions {
    pub host: String,
    pub tags: Vec<String>,
    /// The snapshot to compare with; `None`: the newest of the same host and paths.
    pub parent: Option<String>,
    /// Read every file, whatever the parent says.
    pub force: bool,
    /// Compress-and-seal workers (at least 1).
    pub threads: usize,
    pub now_ms: i64,
}

impl BackupOptions {
    pub fn new(host: &str, now_ms: i64) -> BackupOptions {
        BackupOptions {
            host: host.to_string(),
            tags: Vec::new(),
            parent: None,
            force: false,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            now_ms,
        }
    }
}

/// Where a running backup is (for a progress line with rate and ETA).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Progress {
    pub files: u64,
    pub bytes: u64,
    /// What the paths hold, once a scan beside the backup has counted them (0 until then).
    pub total_files: u64,
    pub total_bytes: u64,
    pub new_bytes: u64,
    pub elapsed_ms: u64,
}

impl Progress {
    /// Seconds left at the rate so far, once the total is known.
    pub fn eta_s(&self) -> Option<u64> {
        (self.total_bytes > 0 && self.bytes > 0 && self.elapsed_ms > 0).then(|| {
            let left = self.total_bytes.saturating_sub(self.bytes) as f64;
            (left / (self.bytes as f64 / self.elapsed_ms as f64) / 1000.0) as u64
        })
    }
}

/// What a backup did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BackupSummary {
    pub snapshot: String,
    pub parent: Option<String>,
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    /// Files taken from the parent snapshot without being read.
    pub unchanged_files: u64,
    /// Chunks (and their plaintext bytes) not already in the repository.
    pub new_chunks: u64,
    pub new_bytes: u64,
    /// What the new chunks and trees take in the repository.
    pub stored_bytes: u64,
    pub packs_written: u64,
    pub duration_ms: u64,
    /// Paths left out, with why (unreadable, not UTF-8, a socket or device).
    pub skipped: Vec<String>,
    pub skipped_count: u64,
}

/// A chunk (or tree) for the workers to seal: its ID and plaintext.
type Job = (ChunkId, Vec<u8>);
/// Packs written and not yet in an index: name and entries.
type Written = Vec<([u8; 32], Vec<pack::Entry>)>;

/// What the workers share: the pack being filled and the packs written since the last index.
struct Sink {
    writer: PackWriter,
    written: Written,
    packs: u64,
    stored: u64,
    /// The first error of a worker (the backup's error; the walker sees only that one failed).
    error: Option<BackupError>,
}

/// What the pipeline did, once its workers are done.
struct Finished {
    /// Packs written whole and not yet in an index.
    written: Written,
    packs: u64,
    stored: u64,
    /// Why it stopped, if it did: the first worker's error, or the last pack's write.
    error: Option<BackupError>,
}

struct Pipeline {
    tx: Option<SyncSender<Job>>,
    sink: Arc<Mutex<Sink>>,
    failed: Arc<AtomicBool>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

fn worker(
    keys: Keys,
    be: Arc<dyn crate::backend::Backend>,
    rx: Arc<Mutex<Receiver<Job>>>,
    sink: Arc<Mutex<Sink>>,
    failed: Arc<AtomicBool>,
) {
    // The error goes in before the flag is raised: whoever sees the flag finds the error.
    let fail = |e: BackupError| {
        let mut s = sink.lock().expect("sink lock");
        s.error.get_or_insert(e);
        failed.store(true, Ordering::SeqCst);
    };
    loop {
        let next = rx.lock().expect("queue lock").recv();
        // Another worker failed: the backup is over, nothing more is written.
        if failed.load(Ordering::SeqCst) {
            return;
        }
        let Ok((id, plain)) = next else { return };
        let sealed = match keys.seal_chunk(&id, &plain) {
            Ok(s) => s,
            Err(e) => return fail(e),
        };
        drop(plain);
        let full = {
            let mut s = sink.lock().expect("sink lock");
            s.writer.add(id, &sealed);
            s.stored += sealed.len() as u64;
            s.writer.full().then(|| std::mem::take(&mut s.writer))
        };
        if let Some(w) = full {
            let (name, bytes, entries) = w.finish();
            let file = super::pack_file(name.to_hex().as_str());
            if let Err(e) = be.write(&file, &bytes) {
                return fail(writing(&file, e));
            }
            let mut s = sink.lock().expect("sink lock");
            s.written.push((*name.as_bytes(), entries));
            s.packs += 1;
        }
    }
}

/// A repository write's error, naming the file.
fn writing(file: &str, e: BackupError) -> BackupError {
    match e {
        BackupError::Io(e) => BackupError::Io(std::io::Error::new(
            e.kind(),
            format!("writing {file}: {e}"),
        )),
        other => other,
    }
}

impl Pipeline {
    fn start(repo: &Repo, threads: usize) -> Pipeline {
        let threads = threads.max(1);
        let (tx, rx) = sync_channel(2 * threads);
        let rx = Arc::new(Mutex::new(rx));
        let sink = Arc::new(Mutex::new(Sink {
            writer: PackWriter::new(),
            written: Vec::new(),
            packs: 0,
            stored: 0,
            error: None,
        }));
        let failed = Arc::new(AtomicBool::new(false));
        let workers = (0..threads)
            .map(|i| {
                let (keys, be, rx, sink, failed) = (
                    repo.keys.clone(),
                    repo.be.clone(),
                    rx.clone(),
                    sink.clone(),
                    failed.clone(),
                );
                std::thread::Builder::new()
                    .name(format!("seal-{i}"))
                    .spawn(move || worker(keys, be, rx, sink, failed))
                    .expect("a thread starts")
            })
            .collect();
        Pipeline {
            tx: Some(tx),
            sink,
            failed,
            workers,
        }
    }

    /// Queues a blob. An error means the workers stopped: the walker stops too, and
    /// [`Pipeline::finish`] returns the worker's error, which is the backup's.
    fn send(&self, id: ChunkId, plain: Vec<u8>) -> Result<(), BackupError> {
        let sent = self
            .tx
            .as_ref()
            .expect("open until finish")
            .send((id, plain));
        if sent.is_err() || self.failed.load(Ordering::SeqCst) {
            return Err(BackupError::Io(std::io::Error::other(
                "the backup workers stopped",
            )));
        }
        Ok(())
    }

    /// The packs written since the last call, once there are `at_least`.
    fn take_written(&self, at_least: usize) -> Written {
        let mut s = self.sink.lock().expect("sink lock");
        if s.written.len() >= at_least.max(1) {
            std::mem::take(&mut s.written)
        } else {
            Vec::new()
        }
    }

    /// Waits for the workers and, unless one failed, writes the last pack. The packs written
    /// whole are returned even after an error, for an index.
    fn finish(mut self, be: &dyn crate::backend::Backend) -> Finished {
        drop(self.tx.take());
        let mut panicked = false;
        for w in self.workers.drain(..) {
            panicked |= w.join().is_err();
        }
        let mut s = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        let mut error = s.error.take();
        if error.is_none() && panicked {
            error = Some(BackupError::Io(std::io::Error::other(
                "a backup worker panicked",
            )));
        }
        if error.is_none() && !s.writer.is_empty() {
            let (name, bytes, entries) = std::mem::take(&mut s.writer).finish();
            let file = super::pack_file(name.to_hex().as_str());
            match be.write(&file, &bytes) {
                Ok(()) => {
                    s.written.push((*name.as_bytes(), entries));
                    s.packs += 1;
                }
                Err(e) => error = Some(writing(&file, e)),
            }
        }
        Finished {
            written: std::mem::take(&mut s.written),
            packs: s.packs,
            stored: s.stored,
            error,
        }
    }
}

/// The state of one backup run.
struct Run<'a, 'p> {
    repo: &'a mut Repo,
    pipe: Pipeline,
    /// Lent out while a file is cut.
    chunker: Option<Chunker>,
    /// Blobs sent to the workers in this run.
    pending: HashSet<ChunkId>,
    /// Hard-linked files seen in this run: (device, inode) → chunks.
    links: HashMap<(u64, u64), Vec<(String, u32)>>,
    sum: BackupSummary,
    progress: Progress,
    scan: Arc<(AtomicU64, AtomicU64, AtomicBool)>,
    started: Instant,
    last_report: Instant,
    report: &'p mut dyn FnMut(&Progress),
    force: bool,
}

fn skip(sum: &mut BackupSummary, what: String) {
    sum.skipped_count += 1;
    if sum.skipped.len() < SKIPPED_LISTED {
        sum.skipped.push(what);
    }
}

fn xattrs(path: &Path, sum: &mut BackupSummary) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Ok(names) = xattr::list(path) else {
        return out;
    };
    let mut total = 0;
    for n in names {
        let Some(name) = n.to_str() else {
            skip(
                sum,
                format!("{}: an attribute name is not UTF-8", path.display()),
            );
            continue;
        };
        if let Ok(Some(v)) = xattr::get(path, &n) {
            total += name.len() + v.len();
            if total > XATTR_MAX {
                skip(sum, format!("{}: attributes over 1 MiB", path.display()));
                break;
            }
            out.push((name.to_string(), hex::encode(v)));
        }
    }
    out.sort();
    out
}

/// Counts what `paths` hold, beside the backup, for its ETA.
fn scan(paths: Vec<PathBuf>, out: Arc<(AtomicU64, AtomicU64, AtomicBool)>) {
    let mut stack = paths;
    while let Some(p) = stack.pop() {
        let Ok(md) = fs::symlink_metadata(&p) else {
            continue;
        };
        if md.is_dir() {
            if let Ok(rd) = fs::read_dir(&p) {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        } else if md.is_file() {
            out.0.fetch_add(1, Ordering::Relaxed);
            out.1.fetch_add(md.len(), Ordering::Relaxed);
        }
    }
    out.2.store(true, Ordering::Relaxed);
}

impl Run<'_, '_> {
    fn tick(&mut self) {
        if self.last_report.elapsed() < Duration::from_millis(250) {
            return;
        }
        self.last_report = Instant::now();
        self.progress.elapsed_ms = self.started.elapsed().as_millis() as u64;
        if self.scan.2.load(Ordering::Relaxed) {
            self.progress.total_files = self.scan.0.load(Ordering::Relaxed);
            self.progress.total_bytes = self.scan.1.load(Ordering::Relaxed);
        }
        (self.report)(&self.progress);
    }

    /// Sends a blob to the workers unless the repository has it (outside a doomed pack).
    fn store(&mut self, id: ChunkId, plain: &[u8]) -> Result<bool, BackupError> {
        let have = self
            .repo
            .index
            .blobs
            .get(&id)
            .is_some_and(|l| !self.repo.doomed.contains(&l.pack));
        if have || !self.pending.insert(id) {
            return Ok(false);
        }
        self.pipe.send(id, plain.to_vec())?;
        let written = self.pipe.take_written(INDEX_EVERY);
        if !written.is_empty() {
            self.repo.write_index(written)?;
        }
        Ok(true)
    }

    fn have_all(&self, chunks: &[(String, u32)]) -> bool {
        chunks.iter().all(|(c, _)| {
            super::parse_id(c).is_ok_and(|id| {
                self.repo
                    .index
                    .blobs
                    .get(&id)
                    .is_some_and(|l| !self.repo.doomed.contains(&l.pack))
            })
        })
    }

    /// One file, directory or link, and (for a directory) everything under it. `None`: left
    /// out (recorded in the summary).
    fn node(
        &mut self,
        path: &Path,
        name: &str,
        parent: Option<&Node>,
    ) -> Result<Option<Node>, BackupError> {
        self.tick();
        let md = match fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) => {
                skip(&mut self.sum, format!("{}: {e}", path.display()));
                return Ok(None);
            }
        };
        let mut node = Node::new(name, Kind::File);
        node.mode = md.mode() & 0o7777;
        node.uid = md.uid();
        node.gid = md.gid();
        node.mtime_s = md.mtime();
        node.mtime_ns = md.mtime_nsec() as u32;
        node.ctime_s = md.ctime();
        node.ctime_ns = md.ctime_nsec() as u32;
        node.xattrs = xattrs(path, &mut self.sum);
        let ft = md.file_type();
        if ft.is_dir() {
            node.kind = Kind::Dir;
            let old = match parent {
                Some(p) if p.kind == Kind::Dir => match &p.subtree {
                    Some(t) => self.repo.tree(t).ok(),
                    None => None,
                },
                _ => None,
            };
            node.subtree = Some(self.dir(path, old.as_ref())?);
            self.sum.dirs += 1;
        } else if ft.is_symlink() {
            node.kind = Kind::Symlink;
            match fs::read_link(path).map(|t| t.into_os_string().into_string()) {
                Ok(Ok(t)) => node.target = Some(t),
                _ => {
                    skip(
                        &mut self.sum,
                        format!("{}: unreadable or non-UTF-8 link", path.display()),
                    );
                    return Ok(None);
                }
            }
        } else if ft.is_file() {
            node.size = md.len();
            node.device = md.dev();
            node.inode = md.ino();
            node.links = md.nlink();
            if !self.file(path, &mut node, parent)? {
                return Ok(None);
            }
            self.sum.files += 1;
            self.sum.bytes += node.size;
            self.progress.files += 1;
        } else {
            skip(
                &mut self.sum,
                format!("{}: not a file, directory or link", path.display()),
            );
            return Ok(None);
        }
        Ok(Some(node))
    }

    /// A file's chunks: from the parent if unchanged, from a hard link seen already, or read.
    fn file(
        &mut self,
        path: &Path,
        node: &mut Node,
        parent: Option<&Node>,
    ) -> Result<bool, BackupError> {
        if let Some(p) = parent.filter(|_| !self.force) {
            let same = p.kind == Kind::File
                && p.size == node.size
                && (p.mtime_s, p.mtime_ns, p.ctime_s, p.ctime_ns)
                    == (node.mtime_s, node.mtime_ns, node.ctime_s, node.ctime_ns)
                && p.inode == node.inode;
            if same && self.have_all(&p.chunks) {
                node.chunks = p.chunks.clone();
                self.sum.unchanged_files += 1;
                self.progress.bytes += node.size;
                return Ok(true);
            }
        }
        if let Some(c) = self
            .links
            .get(&(node.device, node.inode))
            .filter(|_| node.links > 1)
        {
            node.chunks = c.clone();
            return Ok(true);
        }
        let f = match fs::File::open(path) {
            Ok(f) => f,
            Err(e) => {
                skip(&mut self.sum, format!("{}: {e}", path.display()));
                return Ok(false);
            }
        };
        let mut chunker = self.chunker.take().expect("one file at a time");
        let mut ids = Vec::new();
        // Whether the error (if any) came from storing, not from reading the file: a file
        // that cannot be read is left out, a repository that cannot be written ends the backup.
        let mut storing = false;
        let res = chunker.chunks(f, |c| {
            let id = self.repo.keys.chunk_id(c);
            ids.push((hex::encode(id), c.len() as u32));
            let stored = self.store(id, c);
            storing = stored.is_err();
            if stored? {
                self.sum.new_chunks += 1;
                self.sum.new_bytes += c.len() as u64;
                self.progress.new_bytes += c.len() as u64;
            }
            self.progress.bytes += c.len() as u64;
            self.tick();
            Ok(())
        });
        self.chunker = Some(chunker);
        match res {
            Ok(n) => node.size = n,
            Err(e) if storing => return Err(e),
            Err(BackupError::Io(e)) => {
                skip(&mut self.sum, format!("{}: {e}", path.display()));
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
        node.chunks = ids;
        if node.links > 1 {
            self.links
                .insert((node.device, node.inode), node.chunks.clone());
        }
        Ok(true)
    }

    /// A directory's entries as a stored tree; its ID.
    fn dir(&mut self, path: &Path, old: Option<&Tree>) -> Result<String, BackupError> {
        let mut names = Vec::new();
        match fs::read_dir(path) {
            Ok(rd) => {
                for e in rd {
                    match e.map(|e| e.file_name().into_string()) {
                        Ok(Ok(n)) => names.push(n),
                        Ok(Err(n)) => skip(
                            &mut self.sum,
                            format!("{}: not UTF-8", path.join(n).display()),
                        ),
                        Err(e) => skip(&mut self.sum, format!("{}: {e}", path.display())),
                    }
                }
            }
            Err(e) => skip(&mut self.sum, format!("{}: {e}", path.display())),
        }
        names.sort();
        let mut tree = Tree::default();
        for n in names {
            let before = old.and_then(|t| {
                t.nodes
                    .binary_search_by(|x| x.name.as_str().cmp(&n))
                    .ok()
                    .map(|i| &t.nodes[i])
            });
            if let Some(node) = self.node(&path.join(&n), &n, before)? {
                tree.nodes.push(node);
            }
        }
        self.put_tree(&tree)
    }

    fn put_tree(&mut self, tree: &Tree) -> Result<String, BackupError> {
        let json = serde_json::to_vec(tree).expect("a tree serialises");
        if json.len() > super::TREE_MAX {
            return Err(BackupError::BadPack(format!(
                "a directory with {} entries is larger than a tree may be",
                tree.nodes.len()
            )));
        }
        let id = self.repo.keys.chunk_id(&json);
        self.store(id, &json)?;
        Ok(hex::encode(id))
    }
}

impl Repo {
    /// Backs up `paths` (files or directories; their names must differ) into a new snapshot.
    /// `report` is called with the progress about four times a second.
    pub fn backup(
        &mut self,
        paths: &[PathBuf],
        opts: &BackupOptions,
        report: &mut dyn FnMut(&Progress),
    ) -> Result<BackupSummary, BackupError> {
        let started = Instant::now();
        let mut roots = Vec::new();
        for p in paths {
            let name = p
                .file_name()
                .and_then(|n| n.to_str())
                .map(str::to_string)
                .unwrap_or_else(|| "root".into());
            if roots.iter().any(|(n, _)| *n == name) {
                return Err(BackupError::BadPack(format!(
                    "two paths are named {name:?}: back them up in separate snapshots"
                )));
            }
            roots.push((name, p.clone()));
        }
        let path_names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        let parent = match &opts.parent {
            Some(id) => Some(self.resolve(id)?),
            None if opts.force => None,
            None => self
                .snapshots()?
                .into_iter()
                .rev()
                .find(|(_, s)| s.host == opts.host && s.paths == path_names),
        };
        let old_root = match &parent {
            Some((_, s)) => Some(self.tree(&s.tree)?),
            None => None,
        };
        let scanned = Arc::new((AtomicU64::new(0), AtomicU64::new(0), AtomicBool::new(false)));
        {
            let (paths, out) = (paths.to_vec(), scanned.clone());
            std::thread::spawn(move || scan(paths, out));
        }
        let pipe = Pipeline::start(self, opts.threads);
        let chunker = Some(Chunker::new(&self.keys));
        let mut run = Run {
            repo: self,
            pipe,
            chunker,
            pending: HashSet::new(),
            links: HashMap::new(),
            sum: BackupSummary {
                parent: parent.as_ref().map(|(id, _)| id.clone()),
                ..BackupSummary::default()
            },
            progress: Progress::default(),
            scan: scanned,
            started,
            last_report: Instant::now(),
            report,
            force: opts.force,
        };
        let mut root = Tree::default();
        let mut result = Ok(());
        for (name, path) in &roots {
            let before = old_root
                .as_ref()
                .and_then(|t| t.nodes.iter().find(|n| n.name == *name));
            match run.node(path, name, before) {
                Ok(Some(n)) => root.nodes.push(n),
                Ok(None) => {}
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        root.nodes.sort_by(|a, b| a.name.cmp(&b.name));
        let tree = match result {
            Ok(()) => run.put_tree(&root),
            Err(e) => Err(e),
        };
        let Run {
            repo,
            pipe,
            mut sum,
            ..
        } = run;
        // Whatever happened, the packs written whole so far get an index: a rerun reuses them.
        let Finished {
            written,
            packs,
            stored,
            error,
        } = pipe.finish(&*repo.be);
        let indexed = if written.is_empty() {
            Ok(())
        } else {
            repo.write_index(written)
        };
        // A worker's error first: what the walker saw of it says only that the workers stopped.
        if let Some(e) = error {
            return Err(e);
        }
        let tree = tree?;
        indexed?;
        sum.packs_written = packs;
        sum.stored_bytes = stored;
        sum.duration_ms = started.elapsed().as_millis() as u64;
        let snap = Snapshot {
            time_ms: opts.now_ms,
            host: opts.host.clone(),
            paths: path_names,
            tags: opts.tags.clone(),
            tree,
            parent: sum.parent.clone(),
            totals: Totals {
                files: sum.files,
                dirs: sum.dirs,
                bytes: sum.bytes,
                new_bytes: sum.new_bytes,
                stored_bytes: sum.stored_bytes,
                duration_ms: sum.duration_ms,
            },
        };
        sum.snapshot = repo.write_snapshot(&snap)?;
        Ok(sum)
    }
}
