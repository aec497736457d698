//! Reading member offsets from the kernel's BTF (`/sys/kernel/btf/vmlinux`): the walker's
//! BPF program is built without CO-RE relocations, so the offsets it needs into kernel
//! structures are found here at load and handed to it in a map.
//!
//! Only what that needs is read: struct and union members by name, through anonymous
//! members (`vm_area_struct.vm_start` sits in an anonymous struct inside an anonymous union
//! since 6.1), typedefs and qualifiers. Malformed data gives `None`, never a panic.

use unwound_stackwalk_abi::KernelOffsets;

const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

/// A parsed BTF blob: where each type starts.
pub(crate) struct Btf<'a> {
    data: &'a [u8],
    strings: &'a [u8],
    /// Byte position of type id `i + 1`.
    types: Vec<usize>,
}

impl<'a> Btf<'a> {
    /// Indexes the types of a little-endian BTF blob.
    pub(crate) fn parse(data: &'a [u8]) -> Option<Self> {
        let u16_at = |p: usize| Some(u16::from_le_bytes(data.get(p..p + 2)?.try_into().ok()?));
        let u32_at = |p: usize| Some(u32::from_le_bytes(data.get(p..p + 4)?.try_into().ok()?));
        if u16_at(0)? != 0xeb9f {
            return None; // not little-endian BTF
        }
        let hdr_len = u32_at(4)? as usize;
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
        let s = hdr_len.checked_add(str_off)?;
        let strings = data.get(s..s.checked_add(str_len)?)?;
        let mut pos = hdr_len.checked_add(type_off)?;
        let end = pos.checked_add(type_len)?.min(data.len());
        let mut types = Vec::new();
        while pos + 12 <= end {
            let info = u32_at(pos + 4)?;
            let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
            types.push(pos);
            // Bytes after the common header, by kind (include/uapi/linux/btf.h).
            let extra = match kind {
                1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
                3 => 12,                      // ARRAY
                4 | 5 | 15 | 19 => 12 * vlen, // STRUCT, UNION, DATASEC, ENUM64
                6 | 13 => 8 * vlen,           // ENUM, FUNC_PROTO
                2 | 7..=12 | 16 | 18 => 0,    // PTR, FWD, TYPEDEF, qualifiers, FUNC, FLOAT, TYPE_TAG
                _ => return None,             // a kind this reader does not know
            };
            pos = pos.checked_add(12 + extra)?;
        }
        Some(Btf { data, strings, types })
    }

    fn u32_at(&self, p: usize) -> Option<u32> {
        Some(u32::from_le_bytes(self.data.get(p..p + 4)?.try_into().ok()?))
    }

    fn name(&self, off: u32) -> Option<&'a [u8]> {
        let s = self.strings.get(off as usize..)?;
        Some(&s[..s.iter().position(|&b| b == 0)?])
    }

    /// (kind, name offset, vlen, kind_flag, size_or_type, position) of type `id`.
    fn ty(&self, id: u32) -> Option<(u32, u32, usize, bool, u32, usize)> {
        let pos = *self.types.get((id as usize).checked_sub(1)?)?;
        let info = self.u32_at(pos + 4)?;
        Some((
            (info >> 24) & 0x1f,
            self.u32_at(pos)?,
            (info & 0xffff) as usize,
            info >> 31 == 1,
            self.u32_at(pos + 8)?,
            pos,
        ))
    }

    /// Type `id` with typedefs and qualifiers peeled off.
    fn resolve(&self, mut id: u32) -> Option<u32> {
        for _ in 0..16 {
            let (kind, ..) = self.ty(id)?;
            match kind {
                8..=11 | 18 => id = self.ty(id)?.4, // TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG
                _ => return Some(id),
            }
        }
        None
    }

    /// The id of the struct named `name`.
    fn struct_id(&self, name: &str) -> Option<u32> {
        (1..=self.types.len() as u32).find(|&id| {
            self.ty(id).is_some_and(|(kind, n, vlen, ..)| {
                kind == KIND_STRUCT && vlen > 0 && self.name(n) == Some(name.as_bytes())
            })
        })
    }

    /// Byte offset and type of `member` in struct or union `id`, looking into anonymous
    /// members (depth-limited).
    fn member(&self, id: u32, member: &str, depth: u32) -> Option<(u32, u32)> {
        let (kind, _, vlen, kind_flag, _, pos) = self.ty(self.resolve(id)?)?;
        if (kind != KIND_STRUCT && kind != KIND_UNION) || depth > 8 {
            return None;
        }
        for m in 0..vlen {
            let at = pos + 12 + 12 * m;
            let (name_off, ty, bits) = (self.u32_at(at)?, self.u32_at(at + 4)?, self.u32_at(at + 8)?);
            // With kind_flag the low 24 bits are the bit offset (bitfield size above).
            let bits = if kind_flag { bits & 0xff_ffff } else { bits };
            if bits % 8 != 0 {
                continue;
            }
            let name = self.name(name_off)?;
            if name == member.as_bytes() {
                return Some((bits / 8, ty));
            }
            if name.is_empty() {
                if let Some((inner, t)) = self.member(ty, member, depth + 1) {
                    return Some((bits / 8 + inner, t));
                }
            }
        }
        None
    }

    /// Byte offset of the member at `path` (`["f_path", "dentry"]`: a member of a member)
    /// in struct `strukt`.
    pub(crate) fn offset(&self, strukt: &str, path: &[&str]) -> Option<u32> {
        let mut id = self.struct_id(strukt)?;
        let mut total = 0u32;
        for name in path {
            let (off, ty) = self.member(id, name, 0)?;
            total = total.checked_add(off)?;
            id = ty;
        }
        Some(total)
    }
}

/// The offsets the walker's kernel view of processes needs, from the running kernel's
/// BTF; `None` when any is missing (that view is then off).
pub(crate) fn kernel_offsets(btf: &[u8]) -> Option<KernelOffsets> {
    let b = Btf::parse(btf)?;
    Some(KernelOffsets {
        enabled: 1,
        task_mm: b.offset("task_struct", &["mm"])?,
        task_tgid: b.offset("task_struct", &["tgid"])?,
        task_pid: b.offset("task_struct", &["pid"])?,
        task_fsbase: b.offset("task_struct", &["thread", "fsbase"])?,
        pad: 0,
        mm_start_code: b.offset("mm_struct", &["start_code"])?,
        vma_start: b.offset("vm_area_struct", &["vm_start"])?,
        vma_end: b.offset("vm_area_struct", &["vm_end"])?,
        vma_flags: b.offset("vm_area_struct", &["vm_flags"])?,
        vma_pgoff: b.offset("vm_area_struct", &["vm_pgoff"])?,
        vma_file: b.offset("vm_area_struct", &["vm_file"])?,
        file_inode: b.offset("file", &["f_inode"])?,
        file_dentry: b.offset("file", &["f_path", "dentry"])?,
        dentry_name: b.offset("dentry", &["d_name", "name"])?,
        inode_ino: b.offset("inode", &["i_ino"])?,
        inode_sb: b.offset("inode", &["i_sb"])?,
        sb_dev: b.offset("super_block", &["s_dev"])?,
        binprm_file: b.offset("linux_binprm", &["file"])?,
        binprm_filename: b.offset("linux_binprm", &["filename"])?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Facts from the kernel's own headers that have held since 6.1 on x86-64:
    /// `vm_start`/`vm_end` open `vm_area_struct` (in an anonymous struct in an anonymous
    /// union since 6.1), `path.dentry` follows `path.mnt`, `qstr.name` follows the 8-byte
    /// hash/len union.
    #[test]
    fn reads_the_running_kernels_offsets() {
        let Ok(btf) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            eprintln!("skipped: no /sys/kernel/btf/vmlinux");
            return;
        };
        let b = Btf::parse(&btf).expect("kernel BTF parses");
        assert_eq!(b.offset("vm_area_struct", &["vm_start"]), Some(0));
        assert_eq!(b.offset("vm_area_struct", &["vm_end"]), Some(8));
        assert_eq!(b.offset("path", &["dentry"]), Some(8));
        assert_eq!(b.offset("qstr", &["name"]), Some(8));
        let f_path = b.offset("file", &["f_path"]).unwrap();
        assert_eq!(b.offset("file", &["f_path", "dentry"]), Some(f_path + 8));
        assert_eq!(b.offset("vm_area_struct", &["no_such_member"]), None);
        let o = kernel_offsets(&btf).expect("every offset the kernel view needs");
        assert!(o.task_tgid == o.task_pid + 4, "pid and tgid are neighbours in task_struct: {o:?}");
    }

    #[test]
    fn truncated_btf_is_none_not_a_panic() {
        let Ok(btf) = std::fs::read("/sys/kernel/btf/vmlinux") else { return };
        for len in [0, 1, 23, 24, 100, 4096, btf.len() / 2] {
            if let Some(b) = Btf::parse(&btf[..len]) {
                let _ = b.offset("vm_area_struct", &["vm_start"]);
            }
        }
    }
}
