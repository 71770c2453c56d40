//! The disk model: what the kernel shows (the current state) and what a power cut leaves (the
//! durable state).
//!
//! A file's bytes become durable when it is `fsync`ed or `fdatasync`ed; until then the pages
//! it wrote are dirty, as in a page cache (which holds the latest bytes of each page), and a
//! changed length is pending. A name (create, unlink, rename, mkdir,
//! rmdir) becomes durable when its directory is `fsync`ed; until then it waits in one journal
//! of namespace changes, in the order they were made. Nothing else makes anything durable:
//! not `close`, not `sync_file_range` (which a FUSE filesystem never even hears of), not time.
//!
//! A [`Cut`] turns every node back into its durable state. [`Cut::DropUnsynced`] loses every
//! unsynced change, as LazyFS's "clear cache" does. [`Cut::Torn`] is a machine that had
//! written some of them back on its own before the power went: each dirty page (4 KiB,
//! aligned to the file) survives with even odds, so does a changed length (bytes past the
//! surviving length are gone, a longer one shows zeros where no page survived), and the
//! namespace journal survives up to a random point (a journaling filesystem commits names in
//! order).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::time::SystemTime;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The root directory's inode.
pub const ROOT: u64 = 1;
/// The unit a torn write survives in.
pub const PAGE: u64 = 4096;

/// Why an operation failed; the filesystem answers with the matching errno.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskError {
    /// No such file or directory.
    NotFound,
    /// The name exists.
    Exists,
    /// A directory was expected.
    NotDir,
    /// A file was expected.
    IsDir,
    /// The directory is not empty.
    NotEmpty,
    /// The capacity would be exceeded.
    NoSpace,
}

/// How a power cut treats what was not made durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// Every write, truncation and name change since the last sync that covered it is lost.
    DropUnsynced,
    /// Each unsynced page write and truncation survives with even odds; the namespace journal
    /// survives up to a random point. Seeded, so a failure can be replayed.
    Torn {
        /// The seed of the choices.
        seed: u64,
    },
}

/// What a cut took back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Bytes of dirty pages that did not survive.
    pub bytes_lost: u64,
    /// Bytes of dirty pages that survived (torn cuts only).
    pub bytes_kept: u64,
    /// Name changes that did not survive.
    pub names_lost: usize,
    /// Name changes that survived without a directory sync (torn cuts only).
    pub names_kept: usize,
}

/// Syncs the filesystem has seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncCounts {
    /// `fsync`/`fdatasync` of files.
    pub files: u64,
    /// `fsync` of directories.
    pub dirs: u64,
}

/// A node's attributes, as `stat` shows them.
#[derive(Clone, Copy, Debug)]
pub struct Attr {
    /// Inode number.
    pub ino: u64,
    /// Bytes (0 for a directory).
    pub size: u64,
    /// Whether it is a directory.
    pub dir: bool,
    /// Permission bits.
    pub perm: u16,
    /// Last change of content (for a directory: of its entries).
    pub mtime: SystemTime,
    /// Last change of content or attributes.
    pub ctime: SystemTime,
}

#[derive(Default)]
struct File {
    data: Vec<u8>,
    durable: Vec<u8>,
    /// Pages written since the last sync.
    dirty: BTreeSet<u64>,
}

impl File {
    /// Bytes of page `page` as they are now, clipped to `len`, into `into`.
    fn copy_page(&self, page: u64, into: &mut Vec<u8>, len: usize) {
        let start = usize::try_from(page * PAGE).unwrap_or(usize::MAX);
        let end = start
            .saturating_add(PAGE as usize)
            .min(self.data.len())
            .min(len);
        if start < end {
            apply(into, start as u64, &self.data[start..end]);
        }
    }

    fn sync(&mut self) {
        let len = self.data.len();
        let mut durable = std::mem::take(&mut self.durable);
        for page in std::mem::take(&mut self.dirty) {
            self.copy_page(page, &mut durable, len);
        }
        durable.resize(len, 0);
        self.durable = durable;
    }

    fn mark(&mut self, offset: u64, len: usize) {
        if len == 0 {
            return;
        }
        let last = (offset + len as u64 - 1) / PAGE;
        self.dirty.extend(offset / PAGE..=last);
    }
}

#[derive(Default)]
struct Dir {
    entries: BTreeMap<OsString, u64>,
    durable: BTreeMap<OsString, u64>,
}

enum Kind {
    File(File),
    Dir(Dir),
}

struct Node {
    kind: Kind,
    perm: u16,
    mtime: SystemTime,
    ctime: SystemTime,
    /// Names pointing at it in the current namespace: its bytes count against the capacity
    /// while it has one.
    links: u32,
    /// Durable names pointing at it.
    durable_links: u32,
    /// Journaled name changes pointing at it.
    journaled: u32,
}

impl Node {
    fn new(kind: Kind, perm: u16) -> Self {
        let now = SystemTime::now();
        Self {
            kind,
            perm,
            mtime: now,
            ctime: now,
            links: 1,
            durable_links: 0,
            journaled: 0,
        }
    }

    /// Whether no name, current, durable or journaled, reaches it: what it holds can go.
    fn forgotten(&self) -> bool {
        self.links == 0 && self.durable_links == 0 && self.journaled == 0
    }

    fn touch(&mut self) {
        let now = SystemTime::now();
        self.mtime = now;
        self.ctime = now;
    }
}

/// One change of the namespace: entries set or removed together (a rename is two).
struct NsOp {
    changes: Vec<(u64, OsString, Option<u64>)>,
}

/// The whole disk.
pub struct Disk {
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    journal: Vec<NsOp>,
    capacity: Option<u64>,
    used: u64,
    syncs: SyncCounts,
}

impl Default for Disk {
    fn default() -> Self {
        Self::new()
    }
}

fn apply(data: &mut Vec<u8>, offset: u64, bytes: &[u8]) {
    let start = usize::try_from(offset).unwrap_or(usize::MAX);
    let end = start.saturating_add(bytes.len());
    if data.len() < end {
        data.resize(end, 0);
    }
    data[start..end].copy_from_slice(bytes);
}

fn truncate(data: &mut Vec<u8>, len: u64) {
    data.resize(usize::try_from(len).unwrap_or(usize::MAX), 0);
}

impl Disk {
    /// An empty disk with a durable root directory and no capacity limit.
    pub fn new() -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(ROOT, Node::new(Kind::Dir(Dir::default()), 0o755));
        Self {
            nodes,
            next_ino: ROOT + 1,
            journal: Vec::new(),
            capacity: None,
            used: 0,
            syncs: SyncCounts::default(),
        }
    }

    /// Limits the bytes files may hold (`None`: no limit). Writes that would go past it fail
    /// with [`DiskError::NoSpace`]; what is already written stays.
    pub fn set_capacity(&mut self, bytes: Option<u64>) {
        self.capacity = bytes;
    }

    /// `(capacity, free)` in bytes, as `statfs` reports them.
    pub fn space(&self) -> (u64, u64) {
        let capacity = self.capacity.unwrap_or(1 << 40);
        (capacity, capacity.saturating_sub(self.used))
    }

    /// Syncs seen so far.
    pub fn syncs(&self) -> SyncCounts {
        self.syncs
    }

    /// A node's attributes.
    pub fn attr(&self, ino: u64) -> Result<Attr, DiskError> {
        let node = self.nodes.get(&ino).ok_or(DiskError::NotFound)?;
        let (size, dir) = match &node.kind {
            Kind::File(f) => (f.data.len() as u64, false),
            Kind::Dir(_) => (0, true),
        };
        Ok(Attr {
            ino,
            size,
            dir,
            perm: node.perm,
            mtime: node.mtime,
            ctime: node.ctime,
        })
    }

    fn dir(&self, ino: u64) -> Result<&Dir, DiskError> {
        match &self.nodes.get(&ino).ok_or(DiskError::NotFound)?.kind {
            Kind::Dir(d) => Ok(d),
            Kind::File(_) => Err(DiskError::NotDir),
        }
    }

    fn dir_mut(&mut self, ino: u64) -> Result<&mut Dir, DiskError> {
        match &mut self.nodes.get_mut(&ino).ok_or(DiskError::NotFound)?.kind {
            Kind::Dir(d) => Ok(d),
            Kind::File(_) => Err(DiskError::NotDir),
        }
    }

    fn file_mut(&mut self, ino: u64) -> Result<&mut File, DiskError> {
        match &mut self.nodes.get_mut(&ino).ok_or(DiskError::NotFound)?.kind {
            Kind::File(f) => Ok(f),
            Kind::Dir(_) => Err(DiskError::IsDir),
        }
    }

    /// The inode `name` in `parent` points at.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<u64, DiskError> {
        self.dir(parent)?
            .entries
            .get(name)
            .copied()
            .ok_or(DiskError::NotFound)
    }

    /// The entries of a directory: inode, whether it is a directory, name.
    pub fn entries(&self, ino: u64) -> Result<Vec<(u64, bool, OsString)>, DiskError> {
        Ok(self
            .dir(ino)?
            .entries
            .iter()
            .map(|(name, &child)| {
                let dir = matches!(self.nodes.get(&child).map(|n| &n.kind), Some(Kind::Dir(_)));
                (child, dir, name.clone())
            })
            .collect())
    }

    /// Sets entries of the namespace as one change, and journals it.
    fn change(&mut self, changes: Vec<(u64, OsString, Option<u64>)>) -> Result<(), DiskError> {
        for (dir, name, target) in &changes {
            let d = self.dir_mut(*dir)?;
            let old = match target {
                Some(ino) => d.entries.insert(name.clone(), *ino),
                None => d.entries.remove(name),
            };
            if let Some(node) = self.nodes.get_mut(dir) {
                node.touch();
            }
            if let Some(old) = old {
                self.unlinked(old);
            }
            if let Some(ino) = target {
                self.linked(*ino);
                if let Some(node) = self.nodes.get_mut(ino) {
                    node.journaled += 1;
                }
            }
        }
        self.journal.push(NsOp { changes });
        Ok(())
    }

    fn linked(&mut self, ino: u64) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.links += 1;
            if node.links == 1
                && let Kind::File(f) = &node.kind
            {
                self.used += f.data.len() as u64;
            }
        }
    }

    fn unlinked(&mut self, ino: u64) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.links = node.links.saturating_sub(1);
            if node.links == 0
                && let Kind::File(f) = &node.kind
            {
                self.used = self.used.saturating_sub(f.data.len() as u64);
            }
        }
        self.release_if_forgotten(ino);
    }

    /// Frees the bytes of a file nothing can reach any more (long test runs make and delete
    /// many files). The node stays, empty, for handles still open on it.
    fn release_if_forgotten(&mut self, ino: u64) {
        if let Some(node) = self.nodes.get_mut(&ino)
            && node.forgotten()
            && let Kind::File(f) = &mut node.kind
        {
            *f = File::default();
        }
    }

    /// Makes a file or directory `name` in `parent`.
    pub fn create(
        &mut self,
        parent: u64,
        name: &OsStr,
        dir: bool,
        perm: u16,
    ) -> Result<u64, DiskError> {
        if self.dir(parent)?.entries.contains_key(name) {
            return Err(DiskError::Exists);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let kind = if dir {
            Kind::Dir(Dir::default())
        } else {
            Kind::File(File::default())
        };
        let mut node = Node::new(kind, perm);
        // `change` counts the new name.
        node.links = 0;
        self.nodes.insert(ino, node);
        self.change(vec![(parent, name.to_owned(), Some(ino))])?;
        Ok(ino)
    }

    /// Removes `name` from `parent`: a file, or an empty directory.
    pub fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> Result<(), DiskError> {
        let ino = self.lookup(parent, name)?;
        match (&self.nodes.get(&ino).ok_or(DiskError::NotFound)?.kind, dir) {
            (Kind::Dir(d), true) if !d.entries.is_empty() => return Err(DiskError::NotEmpty),
            (Kind::Dir(_), false) => return Err(DiskError::IsDir),
            (Kind::File(_), true) => return Err(DiskError::NotDir),
            _ => {}
        }
        self.change(vec![(parent, name.to_owned(), None)])
    }

    /// Renames `name` in `parent` to `new_name` in `new_parent`, replacing a file there unless
    /// `no_replace`.
    pub fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        no_replace: bool,
    ) -> Result<(), DiskError> {
        let ino = self.lookup(parent, name)?;
        if let Ok(existing) = self.lookup(new_parent, new_name) {
            if no_replace {
                return Err(DiskError::Exists);
            }
            if let Some(Kind::Dir(d)) = self.nodes.get(&existing).map(|n| &n.kind)
                && !d.entries.is_empty()
            {
                return Err(DiskError::NotEmpty);
            }
        }
        self.dir(new_parent)?;
        self.change(vec![
            (parent, name.to_owned(), None),
            (new_parent, new_name.to_owned(), Some(ino)),
        ])
    }

    /// Up to `size` bytes of a file from `offset`.
    pub fn read(&self, ino: u64, offset: u64, size: u32) -> Result<&[u8], DiskError> {
        match &self.nodes.get(&ino).ok_or(DiskError::NotFound)?.kind {
            Kind::File(f) => {
                let start = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(f.data.len());
                let end = start.saturating_add(size as usize).min(f.data.len());
                Ok(&f.data[start..end])
            }
            Kind::Dir(_) => Err(DiskError::IsDir),
        }
    }

    /// Growth of a file to `len` bytes, checked against the capacity.
    fn grow(&mut self, ino: u64, len: u64) -> Result<(), DiskError> {
        let node = self.nodes.get(&ino).ok_or(DiskError::NotFound)?;
        let Kind::File(f) = &node.kind else {
            return Err(DiskError::IsDir);
        };
        let old = f.data.len() as u64;
        if node.links == 0 {
            return Ok(());
        }
        if len > old {
            let used = self.used + (len - old);
            if self.capacity.is_some_and(|c| used > c) {
                return Err(DiskError::NoSpace);
            }
            self.used = used;
        } else {
            self.used = self.used.saturating_sub(old - len);
        }
        Ok(())
    }

    /// Writes `bytes` at `offset`. Not durable until the file is synced.
    pub fn write(&mut self, ino: u64, offset: u64, bytes: &[u8]) -> Result<(), DiskError> {
        let len = {
            let f = self.file_mut(ino)?;
            (f.data.len() as u64).max(offset + bytes.len() as u64)
        };
        self.grow(ino, len)?;
        let f = self.file_mut(ino)?;
        apply(&mut f.data, offset, bytes);
        f.mark(offset, bytes.len());
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.touch();
        }
        Ok(())
    }

    /// Sets a file's length. Not durable until the file is synced.
    pub fn truncate(&mut self, ino: u64, len: u64) -> Result<(), DiskError> {
        self.file_mut(ino)?;
        self.grow(ino, len)?;
        let f = self.file_mut(ino)?;
        let old = f.data.len() as u64;
        truncate(&mut f.data, len);
        // A longer file has new (zero) pages; a shorter one has its last page changed.
        f.mark(
            old.min(len),
            usize::try_from(old.abs_diff(len))
                .unwrap_or(usize::MAX)
                .max(1),
        );
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.touch();
        }
        Ok(())
    }

    /// Sets permission bits.
    pub fn set_perm(&mut self, ino: u64, perm: u16) -> Result<(), DiskError> {
        let node = self.nodes.get_mut(&ino).ok_or(DiskError::NotFound)?;
        node.perm = perm;
        node.ctime = SystemTime::now();
        Ok(())
    }

    /// `fsync`/`fdatasync` of a file: its bytes and length are durable.
    pub fn sync_file(&mut self, ino: u64) -> Result<(), DiskError> {
        self.file_mut(ino)?.sync();
        self.syncs.files += 1;
        Ok(())
    }

    /// `fsync` of a directory: every name change made in it is durable.
    pub fn sync_dir(&mut self, ino: u64) -> Result<(), DiskError> {
        self.dir(ino)?;
        let journal = std::mem::take(&mut self.journal);
        for op in journal {
            if op.changes.iter().any(|(dir, _, _)| *dir == ino) {
                self.unjournal(&op);
                self.make_durable(op);
            } else {
                self.journal.push(op);
            }
        }
        self.syncs.dirs += 1;
        Ok(())
    }

    fn make_durable(&mut self, op: NsOp) {
        for (dir, name, target) in op.changes {
            let old = match self.nodes.get_mut(&dir) {
                Some(Node {
                    kind: Kind::Dir(d), ..
                }) => match target {
                    Some(ino) => d.durable.insert(name, ino),
                    None => d.durable.remove(&name),
                },
                _ => None,
            };
            if let Some(node) = target.and_then(|ino| self.nodes.get_mut(&ino)) {
                node.durable_links += 1;
            }
            if let Some(old) = old {
                if let Some(node) = self.nodes.get_mut(&old) {
                    node.durable_links = node.durable_links.saturating_sub(1);
                }
                self.release_if_forgotten(old);
            }
        }
    }

    /// A journaled change leaves the journal (made durable or lost).
    fn unjournal(&mut self, op: &NsOp) {
        for ino in op.changes.iter().filter_map(|(_, _, target)| *target) {
            if let Some(node) = self.nodes.get_mut(&ino) {
                node.journaled = node.journaled.saturating_sub(1);
            }
            self.release_if_forgotten(ino);
        }
    }

    /// The power goes: every node returns to its durable state (with what a torn cut lets
    /// survive), and nodes no durable name reaches are gone.
    pub fn cut(&mut self, how: Cut) -> CutReport {
        let mut rng = match how {
            Cut::DropUnsynced => None,
            Cut::Torn { seed } => Some(StdRng::seed_from_u64(seed)),
        };
        let mut report = CutReport::default();
        let journal = std::mem::take(&mut self.journal);
        let survive = rng
            .as_mut()
            .map_or(0, |rng| rng.random_range(0..=journal.len()));
        report.names_kept = survive;
        report.names_lost = journal.len() - survive;
        for op in journal.into_iter().take(survive) {
            self.unjournal(&op);
            self.make_durable(op);
        }
        for node in self.nodes.values_mut() {
            match &mut node.kind {
                Kind::File(f) => {
                    let len = if rng.as_mut().is_some_and(|r| r.random_bool(0.5)) {
                        f.data.len()
                    } else {
                        f.durable.len()
                    };
                    let mut survived = std::mem::take(&mut f.durable);
                    truncate(&mut survived, len as u64);
                    for page in std::mem::take(&mut f.dirty) {
                        let start = usize::try_from(page * PAGE).unwrap_or(usize::MAX);
                        let size = f.data.len().saturating_sub(start).min(PAGE as usize);
                        if rng.as_mut().is_some_and(|r| r.random_bool(0.5)) {
                            f.copy_page(page, &mut survived, len);
                            report.bytes_kept += size as u64;
                        } else {
                            report.bytes_lost += size as u64;
                        }
                    }
                    f.data = survived;
                    f.durable.clone_from(&f.data);
                }
                Kind::Dir(d) => d.entries.clone_from(&d.durable),
            }
        }
        self.collect();
        report
    }

    /// Drops nodes no name reaches from the root; recounts links and space.
    fn collect(&mut self) {
        let mut links: HashMap<u64, u32> = HashMap::from([(ROOT, 1)]);
        let mut stack = vec![ROOT];
        while let Some(ino) = stack.pop() {
            if let Some(Node {
                kind: Kind::Dir(d), ..
            }) = self.nodes.get(&ino)
            {
                for &child in d.entries.values() {
                    let n = links.entry(child).or_insert(0);
                    *n += 1;
                    if *n == 1 {
                        stack.push(child);
                    }
                }
            }
        }
        self.nodes.retain(|ino, _| links.contains_key(ino));
        self.used = 0;
        for (ino, node) in &mut self.nodes {
            node.links = links.get(ino).copied().unwrap_or(0);
            // After a cut the current names are the durable ones, and none is journaled.
            node.durable_links = node.links;
            node.journaled = 0;
            if let Kind::File(f) = &node.kind {
                self.used += f.data.len() as u64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    // In tests a panic is the failure report.
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn name(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    /// A durable file `f` holding `bytes`.
    fn synced_file(disk: &mut Disk, bytes: &[u8]) -> u64 {
        let f = disk.create(ROOT, name("f"), false, 0o644).unwrap();
        disk.write(f, 0, bytes).unwrap();
        disk.sync_file(f).unwrap();
        disk.sync_dir(ROOT).unwrap();
        f
    }

    #[test]
    fn a_cut_loses_every_unsynced_write_and_keeps_synced_ones() {
        let mut disk = Disk::new();
        let f = synced_file(&mut disk, b"durable");
        disk.write(f, 7, b" and not").unwrap();
        disk.write(f, 0, b"D").unwrap();
        assert_eq!(disk.read(f, 0, 100).unwrap(), b"Durable and not");
        let report = disk.cut(Cut::DropUnsynced);
        assert_eq!(report.bytes_lost, 15, "the dirty page, as it was");
        assert_eq!(disk.read(f, 0, 100).unwrap(), b"durable");
        assert_eq!(disk.lookup(ROOT, name("f")).unwrap(), f);
    }

    #[test]
    fn a_synced_file_whose_directory_was_not_synced_is_gone() {
        let mut disk = Disk::new();
        let f = disk.create(ROOT, name("new"), false, 0o644).unwrap();
        disk.write(f, 0, b"synced bytes").unwrap();
        disk.sync_file(f).unwrap();
        let report = disk.cut(Cut::DropUnsynced);
        assert_eq!(report.names_lost, 1);
        assert_eq!(disk.lookup(ROOT, name("new")), Err(DiskError::NotFound));
        assert!(disk.attr(f).is_err(), "nothing reaches it: collected");
    }

    #[test]
    fn renames_and_unlinks_are_durable_only_with_the_directory() {
        let mut disk = Disk::new();
        let f = synced_file(&mut disk, b"x");
        disk.rename(ROOT, name("f"), ROOT, name("g"), false)
            .unwrap();
        disk.cut(Cut::DropUnsynced);
        assert_eq!(disk.lookup(ROOT, name("f")).unwrap(), f, "rename undone");
        disk.rename(ROOT, name("f"), ROOT, name("g"), false)
            .unwrap();
        disk.sync_dir(ROOT).unwrap();
        disk.remove(ROOT, name("g"), false).unwrap();
        disk.cut(Cut::DropUnsynced);
        assert_eq!(disk.lookup(ROOT, name("g")).unwrap(), f, "unlink undone");
        assert_eq!(disk.read(f, 0, 10).unwrap(), b"x");
    }

    #[test]
    fn a_directory_sync_covers_only_its_own_names() {
        let mut disk = Disk::new();
        let sub = disk.create(ROOT, name("blobs"), true, 0o755).unwrap();
        disk.sync_dir(ROOT).unwrap();
        disk.create(sub, name("1"), false, 0o644).unwrap();
        disk.create(ROOT, name("snap"), false, 0o644).unwrap();
        disk.sync_dir(sub).unwrap();
        disk.cut(Cut::DropUnsynced);
        assert!(disk.lookup(sub, name("1")).is_ok());
        assert!(disk.lookup(ROOT, name("snap")).is_err());
    }

    #[test]
    fn a_torn_cut_keeps_some_pages_and_a_prefix_of_the_names() {
        let mut kept_some = false;
        let mut lost_some = false;
        for seed in 0..16 {
            let mut disk = Disk::new();
            let f = synced_file(&mut disk, &[]);
            // Five pages of 1s, unsynced, starting mid-page.
            disk.write(f, 100, &[1u8; 5 * 4096]).unwrap();
            disk.create(ROOT, name("a"), false, 0o644).unwrap();
            disk.create(ROOT, name("b"), false, 0o644).unwrap();
            let report = disk.cut(Cut::Torn { seed });
            assert_eq!(
                report.bytes_kept + report.bytes_lost,
                100 + 5 * 4096,
                "six dirty pages"
            );
            let data = disk.read(f, 0, u32::MAX).unwrap().to_vec();
            // Surviving pieces are whole pieces between page boundaries.
            for piece in [100usize, 4096, 8192, 12288, 16384, 20480] {
                let end = (piece / 4096 + 1) * 4096;
                let end = end.min(100 + 5 * 4096);
                if let Some(slice) = data.get(piece..end.min(data.len())) {
                    assert!(
                        slice.iter().all(|&b| b == 1) || slice.iter().all(|&b| b == 0),
                        "page at {piece} is whole or absent"
                    );
                }
            }
            kept_some |= report.bytes_kept > 0;
            lost_some |= report.bytes_lost > 0;
            // Names survive in order: never b without a.
            let b = disk.lookup(ROOT, name("b")).is_ok();
            let a = disk.lookup(ROOT, name("a")).is_ok();
            assert!(!b || a, "seed {seed}: b survived without a");
        }
        assert!(kept_some && lost_some);
    }

    #[test]
    fn writes_past_the_capacity_fail_and_space_comes_back_on_unlink() {
        let mut disk = Disk::new();
        disk.set_capacity(Some(10));
        let f = disk.create(ROOT, name("f"), false, 0o644).unwrap();
        disk.write(f, 0, &[0; 8]).unwrap();
        assert_eq!(disk.write(f, 8, &[0; 3]), Err(DiskError::NoSpace));
        assert_eq!(disk.space(), (10, 2));
        disk.write(f, 0, &[1; 8]).unwrap();
        disk.remove(ROOT, name("f"), false).unwrap();
        assert_eq!(disk.space(), (10, 10));
        let g = disk.create(ROOT, name("g"), false, 0o644).unwrap();
        disk.write(g, 0, &[0; 10]).unwrap();
    }
}
