//! Every WebSocket close code the gateway sends, in one enum, and the rules
//! for the codes a client may send (RFC 6455 §7.4).
//!
//! A close code reaches the wire only through [`CloseCode`], so the codes
//! RFC 6455 reserves for "no frame was seen" (1005, 1006, 1015) cannot be
//! sent by construction, and a client's code is echoed only once
//! [`CloseCode::from_client`] has found it valid.

/// A close code the gateway puts in a close frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    /// 1000: the client closed; we answer.
    Normal,
    /// 1001: the node is shutting down; reconnect.
    GoingAway,
    /// 1002: a protocol error, including a close code a client may not send.
    Protocol,
    /// 1007: a text frame or close reason that is not UTF-8.
    InvalidPayload,
    /// 1008: policy (token expired, too many client frames).
    Policy,
    /// 1009: a client frame or message above the limit.
    TooBig,
    /// 1011: the feed could not be read for `?since=`; reconnect later.
    Internal,
    /// 4001: the user moved to another node (reason: its URL).
    Moved,
    /// 4008: the device fell behind (its send queue overflowed).
    SlowConsumer,
    /// 4029: the user already holds the most devices allowed.
    TooManyDevices,
    /// A valid code the client sent, echoed back (RFC 6455 §5.5.1). Only
    /// [`CloseCode::from_client`] makes one.
    Echo(ClientCode),
}

/// A close code a client sent that it was allowed to send. Private field:
/// built only by [`CloseCode::from_client`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientCode(u16);

impl CloseCode {
    /// The number on the wire.
    pub const fn code(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::GoingAway => 1001,
            CloseCode::Protocol => 1002,
            CloseCode::InvalidPayload => 1007,
            CloseCode::Policy => 1008,
            CloseCode::TooBig => 1009,
            CloseCode::Internal => 1011,
            CloseCode::Moved => 4001,
            CloseCode::SlowConsumer => 4008,
            CloseCode::TooManyDevices => 4029,
            CloseCode::Echo(ClientCode(c)) => c,
        }
    }

    /// The code a client's close frame carried, if a client may send it:
    /// the codes RFC 6455 defines for endpoints (1000-1003, 1007-1011), the
    /// IANA-registered 1012-1014, and the ranges for libraries (3000-3999)
    /// and applications (4000-4999). Everything else is answered with 1002:
    /// 0-999 (unused), 1004 (reserved), 1005/1006/1015 (never on the wire),
    /// 1016-2999 (reserved for the protocol), 5000 and up (undefined).
    pub fn from_client(code: u16) -> Option<CloseCode> {
        let valid = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
        valid.then_some(CloseCode::Echo(ClientCode(code)))
    }
}

/// What to answer a client's close frame with: its own code (or 1000 when
/// it sent none), or 1002 / 1007 for a code or reason it may not send.
pub fn answer_to_client_close(payload: &[u8]) -> Result<CloseCode, (CloseCode, &'static str)> {
    match payload {
        [] => Ok(CloseCode::Normal),
        [_] => Err((CloseCode::Protocol, "close frame of one byte")),
        [hi, lo, reason @ ..] => {
            let code = CloseCode::from_client(u16::from_be_bytes([*hi, *lo]))
                .ok_or((CloseCode::Protocol, "close code a client may not send"))?;
            if std::str::from_utf8(reason).is_err() {
                return Err((CloseCode::InvalidPayload, "close reason is not UTF-8"));
            }
            Ok(code)
        }
    }
}

/// Why the node ended a device: the `reason` label of
/// `gateway_connections_closed_total`, one per way a device can end, so
/// devices cut off by anything (a node's shutdown, a fence, a dead peer)
/// show up. A fixed set: the label stays bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent a close frame; its code was echoed.
    ClientClosed,
    /// The client's socket ended (EOF or reset) without a close frame.
    ClientGone,
    /// The client answered no ping for too long (no close frame).
    PingTimeout,
    /// 1008: the token expired.
    TokenExpired,
    /// 1008: too many client frames per second.
    RateLimited,
    /// 1009.
    FrameTooBig,
    /// 1002.
    ProtocolError,
    /// 1007.
    InvalidUtf8,
    /// 1011: `?since=` could not be served.
    RecoveryFailed,
    /// 4001: the user moved to another node.
    Moved,
    /// 4008.
    SlowConsumer,
    /// 4029.
    TooManyDevices,
    /// 1001: the node is shutting down.
    Shutdown,
    /// 1001: the node was fenced and rejoins the ring.
    Fenced,
    /// Writing to the socket failed (no close frame).
    WriteFailed,
}

impl CloseReason {
    pub const ALL: [CloseReason; 15] = [
        CloseReason::ClientClosed,
        CloseReason::ClientGone,
        CloseReason::PingTimeout,
        CloseReason::TokenExpired,
        CloseReason::RateLimited,
        CloseReason::FrameTooBig,
        CloseReason::ProtocolError,
        CloseReason::InvalidUtf8,
        CloseReason::RecoveryFailed,
        CloseReason::Moved,
        CloseReason::SlowConsumer,
        CloseReason::TooManyDevices,
        CloseReason::Shutdown,
        CloseReason::Fenced,
        CloseReason::WriteFailed,
    ];

    /// The label value (names kept from before the family was complete).
    pub const fn label(self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::ClientGone => "client_gone",
            CloseReason::PingTimeout => "ping_timeout",
            CloseReason::TokenExpired => "token_expired",
            CloseReason::RateLimited => "rate_limited",
            CloseReason::FrameTooBig => "frame_too_big",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::InvalidUtf8 => "invalid_utf8",
            CloseReason::RecoveryFailed => "recovery_failed",
            CloseReason::Moved => "moved",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::TooManyDevices => "too_many_devices",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Fenced => "fenced",
            CloseReason::WriteFailed => "write_failed",
        }
    }

    /// The close code the node sends for it (`None`: no close frame, or
    /// the client's own code).
    pub const fn code(self) -> Option<CloseCode> {
        Some(match self {
            CloseReason::ClientClosed
            | CloseReason::ClientGone
            | CloseReason::PingTimeout
            | CloseReason::WriteFailed => return None,
            CloseReason::TokenExpired | CloseReason::RateLimited => CloseCode::Policy,
            CloseReason::FrameTooBig => CloseCode::TooBig,
            CloseReason::ProtocolError => CloseCode::Protocol,
            CloseReason::InvalidUtf8 => CloseCode::InvalidPayload,
            CloseReason::RecoveryFailed => CloseCode::Internal,
            CloseReason::Moved => CloseCode::Moved,
            CloseReason::SlowConsumer => CloseCode::SlowConsumer,
            CloseReason::TooManyDevices => CloseCode::TooManyDevices,
            CloseReason::Shutdown | CloseReason::Fenced => CloseCode::GoingAway,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_codes_follow_rfc_6455() {
        for c in [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999] {
            assert_eq!(CloseCode::from_client(c).map(CloseCode::code), Some(c), "{c} is valid");
        }
        for c in [0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535] {
            assert_eq!(CloseCode::from_client(c), None, "{c} is not valid from a client");
        }
    }

    #[test]
    fn no_named_code_is_reserved() {
        let named = [
            CloseCode::Normal,
            CloseCode::GoingAway,
            CloseCode::Protocol,
            CloseCode::InvalidPayload,
            CloseCode::Policy,
            CloseCode::TooBig,
            CloseCode::Internal,
            CloseCode::Moved,
            CloseCode::SlowConsumer,
            CloseCode::TooManyDevices,
        ];
        for c in named {
            assert!(![1004, 1005, 1006, 1015].contains(&c.code()), "{c:?}");
            assert!(CloseCode::from_client(c.code()).is_some(), "{c:?} is a code a peer could send too");
        }
    }

    #[test]
    fn close_reasons_are_listed_once_with_distinct_labels() {
        let labels: std::collections::HashSet<_> = CloseReason::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), CloseReason::ALL.len());
        for (i, r) in CloseReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "ALL is in declaration order: {r:?}");
        }
    }

    #[test]
    fn close_payloads_are_checked() {
        assert_eq!(answer_to_client_close(&[]), Ok(CloseCode::Normal));
        assert_eq!(answer_to_client_close(&[3]).unwrap_err().0, CloseCode::Protocol);
        assert_eq!(answer_to_client_close(&4000u16.to_be_bytes()).map(CloseCode::code), Ok(4000));
        assert_eq!(answer_to_client_close(&1005u16.to_be_bytes()).unwrap_err().0, CloseCode::Protocol);
        let mut bad_reason = 1000u16.to_be_bytes().to_vec();
        bad_reason.extend_from_slice(&[0xCE, 0xBA, 0xE1, 0xBD, 0xB9, 0xCF, 0x83, 0xFF]);
        assert_eq!(answer_to_client_close(&bad_reason).unwrap_err().0, CloseCode::InvalidPayload);
        let mut good_reason = 1000u16.to_be_bytes().to_vec();
        good_reason.extend_from_slice("κόσμε".as_bytes());
        assert_eq!(answer_to_client_close(&good_reason), Ok(CloseCode::from_client(1000).unwrap()));
    }
}
