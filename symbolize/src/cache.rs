//! Byte format of index blocks and of the on-disk index file.
//!
//! File: `magic (8) | version u32 | block count u32 | meta length u32 | meta (UTF-8: where the
//! DWARF came from) | directory | crc32 of all before | blocks`.
//! Directory entry (40 bytes): `start u64 | end u64 | offset u64 | compressed len u32 |
//! raw len u32 | crc32 of the compressed bytes u32 | reserved u32`. Each block is one zstd
//! frame of the encoding below. Every length read back is checked against the file's size
//! and the caps in [`crate::index`]; any mismatch is an error and the caller rebuilds.
//!
//! Block encoding (little-endian): `start u64 | end u64 | strings u32 | lines u32 |
//! levels u32 | (len u32, bytes)* | (off, file, line, discriminator: u32)* |
//! (count u32, (lo, hi, name, call_file, call_line: u32)*)*`.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::index::{BFunc, BLine, Block, BlockSpan, MAX_BLOCKS, MAX_BLOCK_ITEMS};

/// File magic; the last byte is bumped with every change to the format.
pub(crate) const MAGIC: &[u8; 8] = b"UNWSYM\x00\x01";
/// Format version, also part of the cache file name.
pub(crate) const VERSION: u32 = 4;
const DIR_ENTRY: usize = 40;
const MAX_META: usize = 4096;
/// Largest decompressed block accepted.
const MAX_RAW_BLOCK: u32 = 256 << 20;
const ZSTD_LEVEL: i32 = 3;

/// Why a stored index was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Corrupt(pub &'static str);

/// Where to find one compressed block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DirEntry {
    pub span: BlockSpan,
    pub offset: u64,
    pub compressed_len: u32,
    pub raw_len: u32,
    pub crc: u32,
}

pub(crate) fn encode_block(b: &Block) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + b.lines.len() * 16);
    out.extend_from_slice(&b.start.to_le_bytes());
    out.extend_from_slice(&b.end.to_le_bytes());
    for n in [b.strings.len(), b.lines.len(), b.levels.len()] {
        out.extend_from_slice(&(n as u32).to_le_bytes());
    }
    for i in 0..b.strings.len() {
        let s = b.strings.str(i);
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    for l in &b.lines {
        for v in [l.off, l.file, l.line, l.discriminator] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    for level in &b.levels {
        out.extend_from_slice(&(level.len() as u32).to_le_bytes());
        for f in level {
            for v in [f.lo, f.hi, f.name, f.call_file, f.call_line] {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    out
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], Corrupt> {
        let end =
            self.pos.checked_add(n).filter(|&e| e <= self.data.len()).ok_or(Corrupt("block truncated"))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, Corrupt> {
        Ok(u32::from_le_bytes(self.bytes(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, Corrupt> {
        Ok(u64::from_le_bytes(self.bytes(8)?.try_into().expect("8 bytes")))
    }
    fn count(&mut self, item: usize) -> Result<usize, Corrupt> {
        let n = self.u32()? as usize;
        if n > MAX_BLOCK_ITEMS || n.saturating_mul(item) > self.data.len() - self.pos {
            return Err(Corrupt("block count out of range"));
        }
        Ok(n)
    }
}

/// Decodes a block, checking every count and index.
pub(crate) fn decode_block(data: &[u8]) -> Result<Block, Corrupt> {
    let mut r = Reader { data, pos: 0 };
    let start = r.u64()?;
    let end = r.u64()?;
    if end < start || end - start > u64::from(u32::MAX) + 1 {
        return Err(Corrupt("block span out of range"));
    }
    let nstrings = r.count(4)?;
    let nlines = r.u32()? as usize;
    let nlevels = r.u32()? as usize;
    if nlevels > crate::dwarf::MAX_INLINE_DEPTH + 1 {
        return Err(Corrupt("too many inline levels"));
    }
    let mut strings = Vec::with_capacity(nstrings);
    for _ in 0..nstrings {
        let len = r.u32()? as usize;
        let s = std::str::from_utf8(r.bytes(len)?).map_err(|_| Corrupt("string not UTF-8"))?;
        strings.push(s);
    }
    let str_ok = |i: u32| i == crate::dwarf::END || (i as usize) < nstrings;
    if nlines > MAX_BLOCK_ITEMS || nlines.saturating_mul(16) > data.len() - r.pos {
        return Err(Corrupt("line count out of range"));
    }
    let mut lines = Vec::with_capacity(nlines);
    for _ in 0..nlines {
        let l = BLine { off: r.u32()?, file: r.u32()?, line: r.u32()?, discriminator: r.u32()? };
        if !str_ok(l.file) || lines.last().is_some_and(|p: &BLine| p.off > l.off) {
            return Err(Corrupt("bad line row"));
        }
        lines.push(l);
    }
    let mut levels = Vec::with_capacity(nlevels);
    for _ in 0..nlevels {
        let n = r.count(20)?;
        let mut level = Vec::with_capacity(n);
        for _ in 0..n {
            let f = BFunc {
                lo: r.u32()?,
                hi: r.u32()?,
                name: r.u32()?,
                call_file: r.u32()?,
                call_line: r.u32()?,
            };
            if !str_ok(f.name) || !str_ok(f.call_file) || f.lo > f.hi {
                return Err(Corrupt("bad function range"));
            }
            level.push(f);
        }
        levels.push(level);
    }
    if r.pos != data.len() {
        return Err(Corrupt("trailing bytes in block"));
    }
    Ok(Block::new(start, end, crate::name::Arena::new(&strings), lines, levels))
}

/// One block encoded and compressed, ready for memory or disk.
pub(crate) struct Packed {
    pub span: BlockSpan,
    pub raw_len: u32,
    pub crc: u32,
    pub bytes: Vec<u8>,
}

pub(crate) fn pack(b: &Block) -> Packed {
    let mut raw = encode_block(b);
    let too_many = b.strings.len() > MAX_BLOCK_ITEMS
        || b.lines.len() > MAX_BLOCK_ITEMS
        || b.levels.len() > crate::dwarf::MAX_INLINE_DEPTH + 1
        || b.levels.iter().any(|l| l.len() > MAX_BLOCK_ITEMS);
    if too_many || raw.len() > MAX_RAW_BLOCK as usize {
        // Larger than a reader accepts (only crafted DWARF gets here): the block is kept
        // empty rather than written and refused forever.
        raw = encode_block(&Block::new(b.start, b.end, Default::default(), Vec::new(), Vec::new()));
    }
    let mut bytes = zstd::bulk::compress(&raw, ZSTD_LEVEL).expect("compressing into a growable buffer");
    // The buffer comes sized for zstd's worst case (about the input's size).
    bytes.shrink_to_fit();
    Packed {
        span: BlockSpan { start: b.start, end: b.end },
        raw_len: raw.len() as u32,
        crc: crc32fast::hash(&bytes),
        bytes,
    }
}

pub(crate) fn unpack(bytes: &[u8], raw_len: u32, crc: u32) -> Result<Block, Corrupt> {
    if crc32fast::hash(bytes) != crc {
        return Err(Corrupt("block checksum mismatch"));
    }
    if raw_len > MAX_RAW_BLOCK {
        return Err(Corrupt("block too large"));
    }
    let raw =
        zstd::bulk::decompress(bytes, raw_len as usize).map_err(|_| Corrupt("block does not decompress"))?;
    if raw.len() != raw_len as usize {
        return Err(Corrupt("block length mismatch"));
    }
    decode_block(&raw)
}

/// Writes an index file atomically (temporary file, then rename).
pub(crate) fn write_file(path: &Path, meta: &str, blocks: &[Packed]) -> std::io::Result<()> {
    let mut cut = meta.len().min(MAX_META);
    while !meta.is_char_boundary(cut) {
        cut -= 1;
    }
    let meta = &meta.as_bytes()[..cut];
    let fixed = 20 + meta.len();
    let mut head = Vec::with_capacity(fixed + blocks.len() * DIR_ENTRY + 4);
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&VERSION.to_le_bytes());
    head.extend_from_slice(&(blocks.len() as u32).to_le_bytes());
    head.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    head.extend_from_slice(meta);
    let mut offset = (fixed + blocks.len() * DIR_ENTRY + 4) as u64;
    for b in blocks {
        head.extend_from_slice(&b.span.start.to_le_bytes());
        head.extend_from_slice(&b.span.end.to_le_bytes());
        head.extend_from_slice(&offset.to_le_bytes());
        head.extend_from_slice(&(b.bytes.len() as u32).to_le_bytes());
        head.extend_from_slice(&b.raw_len.to_le_bytes());
        head.extend_from_slice(&b.crc.to_le_bytes());
        head.extend_from_slice(&0u32.to_le_bytes());
        offset += b.bytes.len() as u64;
    }
    let crc = crc32fast::hash(&head);
    head.extend_from_slice(&crc.to_le_bytes());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A fresh, exclusively created temporary file (removed on error), renamed into place:
    // concurrent writers of one index never mix their bytes, and nothing follows a link.
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new().prefix(".symidx-").tempfile_in(dir)?;
    let mut f = std::io::BufWriter::new(tmp);
    f.write_all(&head)?;
    for b in blocks {
        f.write_all(&b.bytes)?;
    }
    let tmp = f.into_inner().map_err(|e| e.into_error())?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Reads an index file's directory (not its blocks).
pub(crate) fn read_directory(file: &File) -> Result<(String, Vec<DirEntry>), Corrupt> {
    let size = file.metadata().map_err(|_| Corrupt("cannot stat"))?.len();
    let mut fixed = [0u8; 20];
    file.read_exact_at(&mut fixed, 0).map_err(|_| Corrupt("file truncated"))?;
    if &fixed[..8] != MAGIC {
        return Err(Corrupt("not an index file of this version"));
    }
    if u32::from_le_bytes(fixed[8..12].try_into().expect("4")) != VERSION {
        return Err(Corrupt("old format version"));
    }
    let n = u32::from_le_bytes(fixed[12..16].try_into().expect("4")) as usize;
    let meta_len = u32::from_le_bytes(fixed[16..20].try_into().expect("4")) as usize;
    let fixed = 20 + meta_len;
    if n > MAX_BLOCKS || meta_len > MAX_META || (fixed + n * DIR_ENTRY + 4) as u64 > size {
        return Err(Corrupt("directory out of range"));
    }
    let mut head = vec![0u8; fixed + n * DIR_ENTRY + 4];
    file.read_exact_at(&mut head, 0).map_err(|_| Corrupt("file truncated"))?;
    let (body, crc) = head.split_at(fixed + n * DIR_ENTRY);
    if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().expect("4")) {
        return Err(Corrupt("directory checksum mismatch"));
    }
    let meta = std::str::from_utf8(&body[20..fixed]).map_err(|_| Corrupt("meta not UTF-8"))?.to_string();
    let mut dir = Vec::with_capacity(n);
    for e in body[fixed..].chunks_exact(DIR_ENTRY) {
        let u64_at = |i: usize| u64::from_le_bytes(e[i..i + 8].try_into().expect("8"));
        let u32_at = |i: usize| u32::from_le_bytes(e[i..i + 4].try_into().expect("4"));
        let d = DirEntry {
            span: BlockSpan { start: u64_at(0), end: u64_at(8) },
            offset: u64_at(16),
            compressed_len: u32_at(24),
            raw_len: u32_at(28),
            crc: u32_at(32),
        };
        if d.offset.saturating_add(u64::from(d.compressed_len)) > size || d.span.end < d.span.start {
            return Err(Corrupt("block out of range"));
        }
        if dir.last().is_some_and(|p: &DirEntry| p.span.end > d.span.start) {
            return Err(Corrupt("blocks out of order"));
        }
        dir.push(d);
    }
    Ok((meta, dir))
}

/// Reads and decodes one block of an index file.
pub(crate) fn read_block(file: &File, d: &DirEntry) -> Result<Block, Corrupt> {
    let mut bytes = vec![0u8; d.compressed_len as usize];
    file.read_exact_at(&mut bytes, d.offset).map_err(|_| Corrupt("file truncated"))?;
    let b = unpack(&bytes, d.raw_len, d.crc)?;
    if b.start != d.span.start || b.end != d.span.end {
        return Err(Corrupt("block does not match its directory entry"));
    }
    Ok(b)
}
