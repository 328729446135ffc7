//! RTMP and RTMPS ingest on the edge.
//!
//! `chunk` (sans-IO chunk reassembly with limits), `amf0` (bounded AMF0 structure check), `flv` (tag bodies into `media`), `session`
//! (one connection's protocol state, wrapping rml_rtmp) and `auth` are pure or nearly so;
//! `server` is the thin socket layer that drives them and hands frames to the relay.

pub mod amf0;
pub mod auth;
pub mod chunk;
pub mod flv;
pub mod server;
pub mod session;
