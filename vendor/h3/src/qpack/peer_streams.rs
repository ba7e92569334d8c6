//! spooky patch: reads the peer's QPACK encoder and decoder streams
//! instead of leaving them unread, and holds them to what this endpoint
//! advertised. h3 decodes field sections statelessly: it advertises a
//! dynamic table capacity of 0 (SETTINGS_QPACK_MAX_TABLE_CAPACITY absent)
//! and its encoder never inserts. So on the encoder stream only "Set
//! Dynamic Table Capacity" up to 0 is valid (RFC 9204 §4.3.1: above the
//! maximum is a QPACK_ENCODER_STREAM_ERROR; any insert overflows a table of
//! capacity 0, §3.2.2), and on the decoder stream only Stream Cancellation
//! (a Section Acknowledgment or Insert Count Increment refers to dynamic
//! table state that does not exist: QPACK_DECODER_STREAM_ERROR, §4.4).
//! Complete instructions are consumed; an incomplete one waits, and is at
//! most the 11 bytes of a prefixed integer.

use bytes::Buf;

use super::stream::{DecoderInstruction, DynamicTableSizeUpdate, EncoderInstruction, StreamCancel};
use crate::buf::BufList;

/// A peer's instruction this endpoint cannot accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InstructionError(pub(crate) String);

/// Consumes the complete encoder instructions in `buf`.
pub(crate) fn read_encoder_instructions(
    buf: &mut BufList<bytes::Bytes>,
    max_capacity: u64,
) -> Result<(), InstructionError> {
    while let Some(&first) = buf.chunk().first() {
        match EncoderInstruction::decode(first) {
            EncoderInstruction::DynamicTableSizeUpdate => {
                let mut cur = buf.cursor();
                match DynamicTableSizeUpdate::decode(&mut cur) {
                    Ok(Some(DynamicTableSizeUpdate(capacity))) => {
                        if capacity as u64 > max_capacity {
                            return Err(InstructionError(format!(
                                "dynamic table capacity {} above the advertised maximum {}",
                                capacity, max_capacity
                            )));
                        }
                        let used = cur.position();
                        buf.advance(used);
                    }
                    Ok(None) => return Ok(()),
                    Err(e) => {
                        return Err(InstructionError(format!(
                            "bad Set Dynamic Table Capacity: {:?}",
                            e
                        )))
                    }
                }
            }
            _ => {
                return Err(InstructionError(
                    "insert or duplicate instruction into a dynamic table of capacity 0"
                        .to_string(),
                ))
            }
        }
    }
    Ok(())
}

/// Consumes the complete decoder instructions in `buf`.
pub(crate) fn read_decoder_instructions(
    buf: &mut BufList<bytes::Bytes>,
) -> Result<(), InstructionError> {
    while let Some(&first) = buf.chunk().first() {
        match DecoderInstruction::decode(first) {
            DecoderInstruction::StreamCancel => {
                let mut cur = buf.cursor();
                match StreamCancel::decode(&mut cur) {
                    Ok(Some(_)) => {
                        let used = cur.position();
                        buf.advance(used);
                    }
                    Ok(None) => return Ok(()),
                    Err(e) => {
                        return Err(InstructionError(format!(
                            "bad Stream Cancellation: {:?}",
                            e
                        )))
                    }
                }
            }
            DecoderInstruction::HeaderAck => {
                return Err(InstructionError(
                    "Section Acknowledgment, but no field section used the dynamic table"
                        .to_string(),
                ))
            }
            _ => {
                return Err(InstructionError(
                    "Insert Count Increment, but nothing was ever inserted".to_string(),
                ))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn list(bytes: &'static [u8]) -> BufList<Bytes> {
        let mut b = BufList::new();
        b.push(Bytes::from_static(bytes));
        b
    }

    #[test]
    fn capacity_zero_is_accepted_and_consumed() {
        let mut b = list(&[0b0010_0000, 0b0010_0000]);
        assert_eq!(read_encoder_instructions(&mut b, 0), Ok(()));
        assert!(!b.has_remaining());
    }

    #[test]
    fn capacity_above_the_maximum_is_an_error() {
        // Set Dynamic Table Capacity 4096: 0x3f then 4096 - 31 as a varint.
        let mut b = list(&[0x3f, 0xe1, 0x1f]);
        assert!(read_encoder_instructions(&mut b, 0).is_err());
        let mut b = list(&[0b0010_0001]);
        assert!(read_encoder_instructions(&mut b, 0).is_err());
    }

    #[test]
    fn an_incomplete_instruction_waits() {
        let mut b = list(&[0x3f]);
        assert_eq!(read_encoder_instructions(&mut b, 1 << 20), Ok(()));
        assert_eq!(b.remaining(), 1);
    }

    #[test]
    fn inserts_are_errors() {
        for first in [0b1000_0000u8, 0b0100_0000, 0b0000_0001] {
            let mut b = BufList::new();
            b.push(Bytes::copy_from_slice(&[first, 0, 0]));
            assert!(read_encoder_instructions(&mut b, 0).is_err(), "{first:#b}");
        }
    }

    #[test]
    fn decoder_stream_accepts_only_stream_cancellations() {
        let mut b = list(&[0b0100_0000, 0b0100_0100]);
        assert_eq!(read_decoder_instructions(&mut b), Ok(()));
        assert!(!b.has_remaining());
        assert!(read_decoder_instructions(&mut list(&[0b1000_0000])).is_err());
        assert!(read_decoder_instructions(&mut list(&[0b0000_0001])).is_err());
    }
}
