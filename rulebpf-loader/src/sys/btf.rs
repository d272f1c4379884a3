//! The kernel's own type information (`/sys/kernel/btf/vmlinux`), read for
//! one fact the hook needs and no helper gives: where `tw_substate` lies in
//! a timewait socket. A connect that meets a busy tuple whose connection
//! became a timewait socket must tell an ordinary TIME_WAIT (the peer
//! closed too: reusable) from one of substate FIN_WAIT2 (the peer may still
//! hold the connection: busy). `bpf_sock.state` reads `TCP_TIME_WAIT` for
//! both; the hook reads the byte at this offset through
//! `bpf_skc_to_tcp_timewait_sock()`, which the verifier checks against the
//! same type information.
//!
//! Only the parts of the format needed to walk the types are read.
//! https://docs.kernel.org/bpf/btf.html
//! https://github.com/torvalds/linux/blob/v6.12/include/net/inet_timewait_sock.h

use std::path::Path;

/// `BTF_MAGIC`.
const MAGIC: u16 = 0xeb9f;
/// Kinds (`BTF_KIND_*`) this reader needs to tell apart.
const KIND_STRUCT: u32 = 4;

/// [`tw_substate_offset`] as the hook's global wants it (0: unknown), read
/// once per process.
pub fn tw_substate() -> u32 {
    static OFFSET: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *OFFSET.get_or_init(|| tw_substate_offset().unwrap_or(0))
}

/// The byte offset of `tw_substate` in `struct tcp_timewait_sock` (whose
/// first member is `struct inet_timewait_sock tw_sk`), or `None` when the
/// kernel has no BTF or another layout.
pub fn tw_substate_offset() -> Option<u32> {
    let data = std::fs::read(Path::new("/sys/kernel/btf/vmlinux")).ok()?;
    let types = Types::parse(&data)?;
    let tw_sk = types.member_offset("tcp_timewait_sock", "tw_sk")?;
    let substate = types.member_offset("inet_timewait_sock", "tw_substate")?;
    Some(tw_sk + substate).filter(|&offset| offset > 0)
}

/// The type and string sections of a BTF blob.
struct Types<'a> {
    types: &'a [u8],
    strings: &'a [u8],
}

impl<'a> Types<'a> {
    fn parse(data: &'a [u8]) -> Option<Self> {
        let u32_at = |at: usize| Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?));
        if u16::from_le_bytes(data.get(0..2)?.try_into().ok()?) != MAGIC {
            return None;
        }
        let header = u32_at(4)? as usize;
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
        let section = |off: usize, len: usize| data.get(header + off..header + off + len);
        Some(Self {
            types: section(type_off, type_len)?,
            strings: section(str_off, str_len)?,
        })
    }

    fn name(&self, offset: u32) -> Option<&'a [u8]> {
        let rest = self.strings.get(offset as usize..)?;
        Some(&rest[..rest.iter().position(|&b| b == 0)?])
    }

    /// The byte offset of member `member` of the struct named `name`.
    fn member_offset(&self, name: &str, member: &str) -> Option<u32> {
        let u32_at = |at: usize| {
            Some(u32::from_le_bytes(
                self.types.get(at..at + 4)?.try_into().ok()?,
            ))
        };
        let mut at = 0;
        while at < self.types.len() {
            let (name_off, info) = (u32_at(at)?, u32_at(at + 4)?);
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            let members = at + 12;
            if kind == KIND_STRUCT && self.name(name_off)? == name.as_bytes() {
                for i in 0..vlen {
                    let m = members + i * 12;
                    if self.name(u32_at(m)?)? == member.as_bytes() {
                        // With kind_flag the low 24 bits are the bit offset.
                        let bits = u32_at(m + 8)?;
                        let bits = if kind_flag { bits & 0xff_ffff } else { bits };
                        return (bits % 8 == 0).then_some(bits / 8);
                    }
                }
                return None;
            }
            at = members + extra_len(kind, vlen)?;
        }
        None
    }
}

/// The bytes that follow a type's 12-byte header, by kind.
fn extra_len(kind: u32, vlen: usize) -> Option<usize> {
    Some(match kind {
        // INT, VAR, DECL_TAG: one u32.
        1 | 14 | 17 => 4,
        // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG.
        2 | 7 | 8 | 9 | 10 | 11 | 12 | 16 | 18 => 0,
        // ARRAY.
        3 => 12,
        // STRUCT, UNION, DATASEC, ENUM64: 12 bytes a member.
        4 | 5 | 15 | 19 => vlen * 12,
        // ENUM, FUNC_PROTO: 8 bytes a member.
        6 | 13 => vlen * 8,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob with `struct s { u32 a; u8 b; }` (b at byte 4) behind an
    /// INT and an ENUM, to walk past other kinds.
    fn blob() -> Vec<u8> {
        let strings = b"\0s\0a\0b\0e\0x\0";
        let mut types = Vec::new();
        let mut push = |words: &[u32]| words.iter().for_each(|w| types.extend(w.to_le_bytes()));
        push(&[0, 1 << 24, 4, 32]); // INT
        push(&[7, (6 << 24) | 1, 4, 9, 0]); // ENUM e { x }
        push(&[1, (4 << 24) | 2, 8, 3, 1, 0, 5, 1, 32]); // STRUCT s { a, b }
        let mut data = Vec::new();
        data.extend(MAGIC.to_le_bytes());
        data.extend([1, 0]);
        for w in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            data.extend(w.to_le_bytes());
        }
        data.extend(&types);
        data.extend(strings);
        data
    }

    #[test]
    fn a_member_offset_is_found_past_other_kinds() {
        let data = blob();
        let types = Types::parse(&data).unwrap();
        assert_eq!(types.member_offset("s", "b"), Some(4));
        assert_eq!(types.member_offset("s", "a"), Some(0));
        assert_eq!(types.member_offset("s", "c"), None);
        assert_eq!(types.member_offset("t", "a"), None);
    }

    #[test]
    fn this_kernel_places_tw_substate_inside_the_timewait_socket() {
        // Every kernel this project runs on has BTF (socket storage needs it).
        let offset = tw_substate_offset().expect("tw_substate in /sys/kernel/btf/vmlinux");
        assert!((8..256).contains(&offset), "{offset}");
    }
}
