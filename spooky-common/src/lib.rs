//! Types shared between spooky's userspace and its XDP program: the QUIC-LB
//! connection ID codec and the BPF map layouts. `no_std` so that nothing here
//! can depend on anything the kernel side could not mirror.
#![no_std]

pub mod cid;
pub mod maps;

pub use cid::{CidLayout, Decoded, LayoutError, initial_dcid_hash};
