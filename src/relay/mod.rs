//! The edge↔core relay over QUIC with mutual TLS (protocol: docs/relay-protocol.md).
//!
//! `wire` is the sans-IO codec; `publication` is the edge's bounded buffer of recent groups;
//! `sender` keeps connections to cores and relays publications; `receiver` accepts edges on a
//! core, drops duplicates after a resume, and hands frames to the core's consumers.

pub mod order;
pub mod publication;
pub mod receiver;
pub mod sender;
pub mod wire;
