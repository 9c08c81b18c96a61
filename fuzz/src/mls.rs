//! Targets `mls_framing` and `key_package`: what the server parses of an
//! enqueued payload and of a published key package.

use quicnprotochat_core::keypackage;
use quicnprotochat_core::mls_header::{self, FrameKind};

/// `mls_header::inspect` never fails; its answer must be self-consistent.
pub fn check_framing(data: &[u8]) {
    let info = mls_header::inspect(data);
    match info.kind {
        FrameKind::Application | FrameKind::Proposal | FrameKind::Commit => {
            assert!(info.group_id.is_some() && info.epoch.is_some(), "{info:?}");
        }
        FrameKind::Welcome | FrameKind::Other => {
            assert!(info.group_id.is_none() && info.epoch.is_none(), "{info:?}");
        }
    }
}

/// Key-package validation returns a typed answer.
pub fn check_key_package(data: &[u8]) {
    if let Ok(info) = keypackage::inspect(data) {
        assert!(info.identity.check().is_ok(), "a weak key passed: {info:?}");
    }
}
