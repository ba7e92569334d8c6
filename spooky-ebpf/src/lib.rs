//! spooky's XDP program (`src/spooky.bpf.c`), compiled by clang-19 into the
//! committed `spooky.bpf.o` and embedded here, so that building spooky needs
//! cargo alone. `cargo xtask build-ebpf` regenerates the object and
//! `cargo xtask check-ebpf` fails when it is stale.

/// Forces the alignment of the bytes it wraps: ELF parsers read the headers
/// in place, which needs the 8-byte alignment of an `Elf64_Ehdr`, while
/// `include_bytes!` only promises 1.
#[repr(C)]
struct Aligned<Bytes: ?Sized> {
    _align: [u64; 0],
    bytes: Bytes,
}

static ALIGNED: &Aligned<[u8]> = &Aligned {
    _align: [],
    bytes: *include_bytes!("../spooky.bpf.o"),
};

/// The ELF object holding the `spooky_xdp` program and its BTF maps, aligned
/// to 8 bytes.
pub static OBJECT: &[u8] = &ALIGNED.bytes;

#[cfg(test)]
mod tests {
    use super::OBJECT;

    #[test]
    fn is_a_64_bit_bpf_elf_object() {
        assert_eq!(&OBJECT[..4], b"\x7fELF", "ELF magic");
        assert_eq!(OBJECT[4], 2, "ELFCLASS64");
        assert_eq!(OBJECT[5], 1, "little endian (bpfel)");
        let e_machine = u16::from_le_bytes([OBJECT[18], OBJECT[19]]);
        assert_eq!(e_machine, 247, "EM_BPF");
    }

    #[test]
    fn is_aligned_for_elf_parsers() {
        assert_eq!(OBJECT.as_ptr() as usize % 8, 0);
    }
}
