//! The fixed 12-byte frame header, read and validated before any payload byte is buffered.

use crate::error::FrameError;
use crate::frame_type::FrameType;

/// Length of every frame header in bytes.
pub const HEADER_LEN: usize = 12;

/// A decoded frame header: `type u8 | flags u8 | reserved u16 | job u32 | length u32`, all
/// big-endian.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// What the payload is.
    pub ty: FrameType,
    /// Type-specific flag bits.
    pub flags: u8,
    /// The job this frame belongs to, 0 for connection-level frames.
    pub job: u32,
    /// Payload length in bytes.
    pub len: u32,
}

impl FrameHeader {
    /// Parses and validates a header, so a bad frame is refused before its body is
    /// buffered. The checks run in PROTOCOL.md §3's order — type, length, flags, reserved
    /// bytes, job id — so a header with several faults gets the error of the first.
    pub fn parse(bytes: &[u8; HEADER_LEN], max_payload: u32) -> Result<Self, FrameError> {
        let header = Self {
            ty: FrameType(bytes[0]),
            flags: bytes[1],
            job: u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
            len: u32::from_be_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]),
        };
        header.check_type_len_flags(max_payload)?;
        if bytes[2] != 0 || bytes[3] != 0 {
            return Err(FrameError::ReservedBits);
        }
        header.check_job()?;
        Ok(header)
    }

    /// Checks everything the header alone can tell (the reserved bytes are not kept, so
    /// [`parse`](Self::parse) checks those).
    pub fn validate(&self, max_payload: u32) -> Result<(), FrameError> {
        self.check_type_len_flags(max_payload)?;
        self.check_job()
    }

    /// §3 rules 1–3: a defined or ignorable type, a length within the limit, only the
    /// type's flags.
    fn check_type_len_flags(&self, max_payload: u32) -> Result<(), FrameError> {
        if !self.ty.is_known() && !self.ty.is_ignorable() {
            return Err(FrameError::UnknownType(self.ty.0));
        }
        if self.len > max_payload {
            return Err(FrameError::TooLarge {
                len: u64::from(self.len),
                max: max_payload,
            });
        }
        if self.flags & !self.ty.allowed_flags() != 0 {
            return Err(FrameError::BadFlags {
                ty: self.ty,
                flags: self.flags,
            });
        }
        Ok(())
    }

    /// §3 rule 5: job 0 exactly for connection-level types.
    fn check_job(&self) -> Result<(), FrameError> {
        if self.ty.is_known() && self.ty.is_connection_level() != (self.job == 0) {
            return Err(FrameError::BadJobId {
                ty: self.ty,
                job: self.job,
            });
        }
        Ok(())
    }

    /// The header's wire bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0] = self.ty.0;
        out[1] = self.flags;
        out[4..8].copy_from_slice(&self.job.to_be_bytes());
        out[8..12].copy_from_slice(&self.len.to_be_bytes());
        out
    }
}
