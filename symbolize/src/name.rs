//! [`Name`]: a function name or file path shared with the index block it came from.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

/// A string that shares its storage with the other names of the index block it came
/// from: cloning or dropping it touches one counter per block rather than one per
/// string, which keeps batch lookups out of scattered cache misses. Derefs to `str`.
///
/// ```
/// use unwound_symbolize::Name;
/// let n = Name::from("main");
/// assert_eq!(&*n, "main");
/// assert_eq!(n, Name::from(String::from("main")));
/// ```
#[derive(Clone)]
pub struct Name {
    arena: Arc<str>,
    start: u32,
    len: u32,
}

impl Name {
    /// The part `start..start + len` of `arena` (which must be on character boundaries).
    pub(crate) fn slice(arena: &Arc<str>, start: u32, len: u32) -> Name {
        assert!(start as usize + len as usize <= arena.len(), "name outside its arena");
        debug_assert!(arena.get(start as usize..(start + len) as usize).is_some());
        Name { arena: arena.clone(), start, len }
    }

    /// The string.
    pub fn as_str(&self) -> &str {
        let range = self.start as usize..(self.start + self.len) as usize;
        debug_assert!(self.arena.get(range.clone()).is_some());
        // SAFETY: a `Name` is only made by `Name::slice` from an `Arena`, whose spans are
        // the bounds of whole strings pushed into its text, or over a whole `str`; so
        // `range` lies in `arena` on character boundaries. Checking it here would read the
        // string's bytes, a cache miss for a caller that only wants its length.
        unsafe { self.arena.get_unchecked(range) }
    }
}

impl Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl From<&str> for Name {
    fn from(s: &str) -> Self {
        let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
        let s = &s[..s.floor_char_boundary_compat(len as usize)];
        Name { arena: Arc::from(s), start: 0, len: s.len() as u32 }
    }
}

impl From<String> for Name {
    fn from(s: String) -> Self {
        Name::from(s.as_str())
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Name {}

impl std::hash::Hash for Name {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl PartialOrd for Name {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Name {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

trait FloorBoundary {
    fn floor_char_boundary_compat(&self, i: usize) -> usize;
}

impl FloorBoundary for str {
    fn floor_char_boundary_compat(&self, i: usize) -> usize {
        let mut i = i.min(self.len());
        while !self.is_char_boundary(i) {
            i -= 1;
        }
        i
    }
}

/// Strings of one block packed into one allocation.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Arena {
    text: Option<Arc<str>>,
    spans: Vec<(u32, u32)>,
}

impl Arena {
    pub fn new<S: AsRef<str>>(strings: &[S]) -> Self {
        let total: usize = strings.iter().map(|s| s.as_ref().len()).sum();
        let mut text = String::with_capacity(total);
        let mut spans = Vec::with_capacity(strings.len());
        for s in strings {
            let s = s.as_ref();
            if text.len() + s.len() > u32::MAX as usize {
                // Spans are 32-bit: a string past 4 GiB of text reads as empty.
                spans.push((0, 0));
                continue;
            }
            spans.push((text.len() as u32, s.len() as u32));
            text.push_str(s);
        }
        Arena { text: Some(Arc::from(text)), spans }
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// Byte offset and length of string `i` in [`Arena::text`].
    pub fn span(&self, i: u32) -> Option<(u32, u32)> {
        self.spans.get(i as usize).copied()
    }

    /// All strings, one after the other.
    pub fn text(&self) -> Option<&Arc<str>> {
        self.text.as_ref()
    }

    pub fn str(&self, i: usize) -> &str {
        let (start, len) = self.spans[i];
        self.text.as_deref().and_then(|t| t.get(start as usize..(start + len) as usize)).unwrap_or("")
    }
}
