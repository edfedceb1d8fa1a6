//! Tiandi's wire protocol between site agents and the controller. No I/O here: messages,
//! frame encoding with a size limit, version negotiation, per-connection name tables, and
//! downsampling. Everything that reads untrusted bytes returns [`ProtoError`].
//!
//! Framing: every message is an [`Envelope`] prefixed by its length as a 4-byte big-endian
//! integer (the same layout as `tokio_util::codec::LengthDelimitedCodec`, which the link layer
//! uses). Frames above [`MAX_FRAME`] are refused before their body is read.

pub mod delta;
mod merge;
mod messages;
pub mod names;
pub mod series;

pub use merge::merge;
pub use messages::*;
pub use prost::Message;

/// Protocol major version: peers with different majors refuse each other.
pub const MAJOR: u32 = 1;
/// Protocol minor version: peers within one minor of each other are supported (protobuf skips
/// the fields the older side does not know). 4: a province controller's [`Federation`] in its
/// reports to the ministry's; 3: delta reports ([`delta`]); 2: device profiles' objects,
/// events, reachability; 1: a dual-homed site's `Paths`.
pub const MINOR: u32 = 4;
/// The largest frame either side accepts (a report is ~200 bytes; a downsampled one too).
pub const MAX_FRAME: usize = 64 * 1024;

/// Stable codes carried in [`Refused`] and in QUIC close frames.
pub mod codes {
    pub const OK: u32 = 0;
    pub const PROTOCOL: u32 = 1;
    pub const VERSION: u32 = 2;
    pub const IDENTITY: u32 = 3;
    pub const REVOKED: u32 = 4;
    pub const SHUTDOWN: u32 = 5;
    pub const OVERLOAD: u32 = 6;
    pub const INTERNAL: u32 = 7;
    /// This controller stands down: another was promoted at a higher fencing epoch (the site
    /// tries its other controller addresses at once).
    pub const SUPERSEDED: u32 = 8;
}

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("malformed message: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    Oversized(usize),
    #[error("empty envelope (no message body)")]
    Empty,
    #[error("unexpected {got} (expected {expected})")]
    Unexpected {
        got: &'static str,
        expected: &'static str,
    },
    #[error("{what} of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("name reference {0} is not in this connection's table")]
    UnknownName(u32),
    #[error("{0}")]
    Delta(&'static str),
    #[error(
        "protocol version {peer_major}.{peer_minor} is not supported (this side speaks {MAJOR}.{MINOR}, majors must match)"
    )]
    Version { peer_major: u32, peer_minor: u32 },
}

impl ProtoError {
    pub fn code(&self) -> u32 {
        match self {
            ProtoError::Version { .. } => codes::VERSION,
            _ => codes::PROTOCOL,
        }
    }
}

impl Body {
    pub fn kind(&self) -> &'static str {
        match self {
            Body::Hello(_) => "Hello",
            Body::Welcome(_) => "Welcome",
            Body::Report(_) => "Report",
            Body::Ack(_) => "Ack",
            Body::Refused(_) => "Refused",
            Body::Paths(_) => "Paths",
        }
    }
}

/// Encodes one message body (without the length prefix, which the framing layer adds).
pub fn encode(body: Body) -> bytes::Bytes {
    Envelope { body: Some(body) }.encode_to_vec().into()
}

/// Decodes one frame body.
pub fn decode(frame: &[u8]) -> Result<Body, ProtoError> {
    if frame.len() > MAX_FRAME {
        return Err(ProtoError::Oversized(frame.len()));
    }
    Envelope::decode(frame)?.body.ok_or(ProtoError::Empty)
}

/// Checks a peer's version against ours.
pub fn check_version(peer_major: u32, peer_minor: u32) -> Result<(), ProtoError> {
    if peer_major != MAJOR {
        return Err(ProtoError::Version {
            peer_major,
            peer_minor,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Report {
        Report {
            seq: 123_456,
            taken_ms: 1_790_000_000_000,
            host: Some(Host {
                cpu_permille: 231,
                load1_c: 42,
                load5_c: 38,
                load15_c: 35,
                mem_used_mib: 2900,
                mem_total_mib: 7900,
                uptime_s: 8_640_000,
                filesystems: vec![
                    Filesystem {
                        mount: "/".into(),
                        used_mib: 21_000,
                        total_mib: 60_000,
                        ..Default::default()
                    },
                    Filesystem {
                        mount: "/var".into(),
                        used_mib: 150_000,
                        total_mib: 400_000,
                        ..Default::default()
                    },
                ],
                interfaces: vec![Interface {
                    name: "eth0".into(),
                    rx_bytes: 81_234_567_890,
                    tx_bytes: 12_345_678_901,
                    rx_errors: 3,
                    tx_errors: 0,
                    ..Default::default()
                }],
            }),
            link: Some(LinkStats {
                rtt_ms: 612,
                lost_packets: 1234,
                cwnd_bytes: 1_500_000,
                tx_bytes: 900_000_000,
                rx_bytes: 120_000_000,
                sent_packets: 1_000_000,
            }),
            devices: vec![
                Device {
                    name: "modem".into(),
                    profile: Profile::VsatModem as i32,
                    status: DeviceStatus::Ok as i32,
                    modem: Some(Modem {
                        esno_db_x10: 92,
                        rx_level_dbm_x10: -452,
                        modcod: "QPSK 3/4".into(),
                        tx_power_dbm_x10: -123,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                Device {
                    name: "ups".into(),
                    profile: Profile::UpsMib as i32,
                    status: DeviceStatus::Ok as i32,
                    ups: Some(Ups {
                        on_battery: false,
                        charge_pct: 100,
                        runtime_s: 2400,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn report_roundtrips_and_names_compress() {
        let mut enc = names::NameEncoder::default();
        let mut dec = names::NameDecoder::default();
        for i in 0..3 {
            let original = Report {
                seq: 10 + i,
                ..sample()
            };
            let mut wire = original.clone();
            enc.compress(&mut wire);
            let bytes = encode(Body::Report(wire));
            if i > 0 {
                // After the first report, names travel as references.
                assert!(bytes.len() < 170, "report is {} bytes", bytes.len());
            }
            let Body::Report(mut back) = decode(&bytes).unwrap() else {
                panic!("not a report")
            };
            dec.expand(&mut back).unwrap();
            assert_eq!(back, original);
        }
    }

    #[test]
    fn unknown_name_reference_is_an_error() {
        let mut r = sample();
        r.host.as_mut().unwrap().filesystems[0].mount.clear();
        r.host.as_mut().unwrap().filesystems[0].mount_ref = 7;
        let err = names::NameDecoder::default().expand(&mut r).unwrap_err();
        assert!(matches!(err, ProtoError::UnknownName(7)), "{err}");
    }

    /// A message from a newer minor version: the same report with fields this version does not
    /// know. The decoder skips them.
    #[derive(Clone, PartialEq, prost::Message)]
    struct FutureReport {
        #[prost(uint64, tag = "1")]
        seq: u64,
        #[prost(int64, tag = "3")]
        taken_ms: i64,
        #[prost(string, tag = "90")]
        new_text: String,
        #[prost(message, optional, tag = "91")]
        new_nested: Option<SeqRange>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct FutureEnvelope {
        #[prost(message, optional, tag = "3")]
        report: Option<FutureReport>,
        #[prost(message, optional, tag = "40")]
        new_message: Option<SeqRange>,
    }

    #[test]
    fn unknown_fields_from_a_newer_minor_are_skipped() {
        let bytes = FutureEnvelope {
            report: Some(FutureReport {
                seq: 5,
                taken_ms: 99,
                new_text: "added in 1.1".into(),
                new_nested: Some(SeqRange { first: 1, last: 2 }),
            }),
            new_message: Some(SeqRange { first: 3, last: 4 }),
        }
        .encode_to_vec();
        let Body::Report(r) = decode(&bytes).unwrap() else {
            panic!("not a report")
        };
        assert_eq!((r.seq, r.taken_ms), (5, 99));
    }

    #[test]
    fn garbage_and_versions_give_clear_errors() {
        assert!(matches!(decode(&[0xff; 10]), Err(ProtoError::Decode(_))));
        assert!(matches!(decode(&[]), Err(ProtoError::Empty)));
        assert!(matches!(
            decode(&vec![0u8; MAX_FRAME + 1]),
            Err(ProtoError::Oversized(_))
        ));
        assert!(check_version(MAJOR, MINOR + 1).is_ok());
        assert!(check_version(MAJOR, MINOR.saturating_sub(1)).is_ok());
        let e = check_version(MAJOR + 1, 0).unwrap_err();
        assert_eq!(e.code(), codes::VERSION);
        assert!(e.to_string().contains("2.0"), "{e}");
    }

    #[test]
    fn report_serializes_to_json_with_names() {
        let v = serde_json::to_value(sample()).unwrap();
        assert_eq!(v["devices"][0]["profile"], "vsat-modem");
        assert_eq!(v["host"]["filesystems"][1]["mount"], "/var");
        assert!(v["host"]["filesystems"][1].get("mount_ref").is_none());
    }
}
