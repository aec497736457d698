//! Requests that could not be sent, kept on disk (one file each) until they can be, are too
//! old for the backend, or make way for newer ones.

use std::path::PathBuf;
use std::time::Duration;

use crate::Error;

/// Where and how much to keep.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpoolOptions {
    /// The spool's directory; each backend kind has a folder in it.
    pub dir: PathBuf,
    /// Most bytes kept per backend; the oldest requests make way for newer ones.
    pub max_bytes: u64,
    /// Requests whose profile started longer ago than this are dropped (Pyroscope refuses
    /// profiles older than an hour).
    pub max_age: Duration,
}

impl SpoolOptions {
    /// 64 MiB per backend, 55 minutes.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        SpoolOptions { dir: dir.into(), max_bytes: 64 << 20, max_age: Duration::from_secs(55 * 60) }
    }
}

/// One request to a backend, ready to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Payload {
    pub path_and_query: String,
    pub content_type: String,
    pub body: Vec<u8>,
    /// When its profile started (ns since the epoch): what the backend judges its age by.
    pub profile_unix_ns: i64,
}

const MAGIC: &str = "unwound-spool 1";

impl Payload {
    fn to_bytes(&self) -> Vec<u8> {
        let mut out =
            format!("{MAGIC}\n{}\n{}\n{}\n", self.path_and_query, self.content_type, self.profile_unix_ns)
                .into_bytes();
        out.extend_from_slice(&self.body);
        out
    }

    fn from_bytes(bytes: &[u8]) -> Option<Payload> {
        let mut rest = bytes;
        let mut line = || {
            let end = rest.iter().position(|&b| b == b'\n')?;
            let l = std::str::from_utf8(&rest[..end]).ok()?.to_string();
            rest = &rest[end + 1..];
            Some(l)
        };
        if line()? != MAGIC {
            return None;
        }
        let path_and_query = line()?;
        let content_type = line()?;
        let profile_unix_ns = line()?.parse().ok()?;
        Some(Payload { path_and_query, content_type, body: rest.to_vec(), profile_unix_ns })
    }
}

/// The spool of one backend.
#[derive(Debug)]
pub(crate) struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    pub(crate) max_age: Duration,
    seq: u64,
    /// (file, size), oldest profile first.
    entries: Vec<(PathBuf, u64)>,
}

impl Spool {
    /// Opens (creating it) the spool of backend `name`, with what an earlier run left.
    pub(crate) fn open(options: &SpoolOptions, name: &str) -> Result<Spool, Error> {
        let dir = options.dir.join(name);
        let io = |e: std::io::Error| Error::Spool { path: dir.clone(), reason: e.to_string() };
        std::fs::create_dir_all(&dir).map_err(io)?;
        let mut entries: Vec<(PathBuf, u64)> = std::fs::read_dir(&dir)
            .map_err(io)?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".req"))
            .filter_map(|e| Some((e.path(), e.metadata().ok()?.len())))
            .collect();
        entries.sort();
        Ok(Spool { dir, max_bytes: options.max_bytes, max_age: options.max_age, seq: 0, entries })
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    fn bytes(&self) -> u64 {
        self.entries.iter().map(|(_, n)| n).sum()
    }

    /// Keeps `payload`; returns how many older requests were dropped to make room.
    pub(crate) fn put(&mut self, payload: &Payload) -> Result<u64, Error> {
        let bytes = payload.to_bytes();
        let size = bytes.len() as u64;
        if size > self.max_bytes {
            return Err(Error::Spool {
                path: self.dir.clone(),
                reason: "request larger than the spool".into(),
            });
        }
        let mut evicted = 0;
        while self.bytes() + size > self.max_bytes && !self.entries.is_empty() {
            let (path, _) = self.entries.remove(0);
            let _ = std::fs::remove_file(path);
            evicted += 1;
        }
        self.seq += 1;
        // Zero-padded so that names sort by the profile's time.
        let name = format!("{:020}-{}-{}.req", payload.profile_unix_ns.max(0), std::process::id(), self.seq);
        let path = self.dir.join(&name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let io = |e: std::io::Error| Error::Spool { path: path.clone(), reason: e.to_string() };
        std::fs::write(&tmp, &bytes).and_then(|()| std::fs::rename(&tmp, &path)).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io(e)
        })?;
        let at = self.entries.partition_point(|(p, _)| p < &path);
        self.entries.insert(at, (path, size));
        Ok(evicted)
    }

    /// The oldest request kept, read back; a file that cannot be read is removed and
    /// reported as `Err` with its path.
    pub(crate) fn oldest(&mut self) -> Option<Result<Payload, PathBuf>> {
        let (path, _) = self.entries.first()?.clone();
        match std::fs::read(&path).ok().as_deref().and_then(Payload::from_bytes) {
            Some(p) => Some(Ok(p)),
            None => {
                self.remove_oldest();
                Some(Err(path))
            }
        }
    }

    /// Forgets the oldest request (sent, rejected or too old).
    pub(crate) fn remove_oldest(&mut self) {
        if !self.entries.is_empty() {
            let (path, _) = self.entries.remove(0);
            let _ = std::fs::remove_file(path);
        }
    }

    #[cfg(test)]
    fn dir(&self) -> &std::path::Path {
        &self.dir
    }
}

/// Whether a profile that started at `profile_unix_ns` is older than `max_age` now.
pub(crate) fn too_old(profile_unix_ns: i64, max_age: Duration) -> bool {
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64);
    now.saturating_sub(profile_unix_ns) > max_age.as_nanos() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(t: i64, n: usize) -> Payload {
        Payload {
            path_and_query: "/p?q=1".into(),
            content_type: "application/proto".into(),
            body: vec![7; n],
            profile_unix_ns: t,
        }
    }

    #[test]
    fn kept_across_reopen_oldest_first_and_bounded() {
        let tmp = tempfile::tempdir().unwrap();
        let mut options = SpoolOptions::new(tmp.path());
        options.max_bytes = 3 * 150;
        let mut s = Spool::open(&options, "x").unwrap();
        assert_eq!(s.put(&payload(30, 100)).unwrap(), 0);
        assert_eq!(s.put(&payload(10, 100)).unwrap(), 0);
        drop(s);
        let mut s = Spool::open(&options, "x").unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s.oldest().unwrap().unwrap(), payload(10, 100));
        // A third and a fourth do not fit with both: the oldest makes way.
        assert_eq!(s.put(&payload(20, 100)).unwrap(), 0);
        assert_eq!(s.put(&payload(40, 100)).unwrap(), 1);
        assert_eq!(s.oldest().unwrap().unwrap().profile_unix_ns, 20);
        s.remove_oldest();
        assert_eq!(s.oldest().unwrap().unwrap().profile_unix_ns, 30);
        assert_eq!(std::fs::read_dir(s.dir()).unwrap().count(), 2);
        // A damaged file is removed, not sent.
        let first = std::fs::read_dir(s.dir()).unwrap().flatten().map(|e| e.path()).min().unwrap();
        std::fs::write(&first, b"garbage").unwrap();
        assert_eq!(s.oldest().unwrap(), Err(first));
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn age_is_judged_by_the_profile_start() {
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i64;
        assert!(!too_old(now - 60_000_000_000, Duration::from_secs(3600)));
        assert!(too_old(now - 3_700_000_000_000, Duration::from_secs(3600)));
    }
}
