//! Version negotiation and HELLO checks, shared by both ends.

use crate::error::ConnectionError;
use crate::error_code::ErrorCode;
use crate::frame::{Hello, Limits};

/// Picks the highest version both sides speak.
pub(crate) fn negotiate(min: u16, max: u16, peer: &Hello) -> Result<u16, ConnectionError> {
    let version = max.min(peer.max_version);
    if version < min.max(peer.min_version) {
        return Err(ConnectionError::VersionMismatch {
            ours_min: min,
            ours_max: max,
            peer_min: peer.min_version,
            peer_max: peer.max_version,
        });
    }
    Ok(version)
}

/// A peer must accept at least the baseline, or frames we pipelined before its HELLO would
/// already be in breach.
pub(crate) fn check_peer_limits(limits: &Limits) -> Result<(), ConnectionError> {
    let b = Limits::BASELINE;
    if limits.max_frame_payload < b.max_frame_payload || limits.max_jobs < b.max_jobs {
        return Err(ConnectionError::Protocol {
            code: ErrorCode::PROTOCOL,
            reason: format!(
                "peer limits below the protocol baseline (frame payload {} < {} or jobs {} < {})",
                limits.max_frame_payload, b.max_frame_payload, limits.max_jobs, b.max_jobs
            ),
        });
    }
    Ok(())
}

/// Clamps our own configured limits into what the protocol allows us to announce.
pub(crate) fn clamp_own_limits(limits: Limits) -> Limits {
    let b = Limits::BASELINE;
    Limits {
        max_frame_payload: limits
            .max_frame_payload
            .clamp(b.max_frame_payload, Limits::MAX_FRAME_PAYLOAD),
        max_source_len: limits.max_source_len,
        max_jobs: limits.max_jobs.max(b.max_jobs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn hello(min: u16, max: u16) -> Hello {
        Hello {
            min_version: min,
            max_version: max,
            limits: Limits::default(),
            features: 0,
            extensions: Bytes::new(),
        }
    }

    #[test]
    fn picks_highest_common_version() {
        assert_eq!(negotiate(1, 3, &hello(2, 5)), Ok(3));
        assert_eq!(negotiate(1, 1, &hello(1, 9)), Ok(1));
    }

    #[test]
    fn disjoint_ranges_fail() {
        assert!(matches!(
            negotiate(1, 1, &hello(2, 3)),
            Err(ConnectionError::VersionMismatch { peer_min: 2, .. })
        ));
    }
}
