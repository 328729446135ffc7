//! livepop: a live-streaming edge PoP and regional core in one program.
//!
//! The edge ingests RTMP(S) and relays it over QUIC to a core; the core transcodes and packages
//! LL-HLS, and the edge caches it for viewers. `demo` runs both in one process. See
//! docs/architecture.md for the module map.

pub mod admin;
pub mod certs;
pub mod cmaf;
pub mod config;
pub mod demo;
pub mod edge;
pub mod fleet;
pub mod hls;
pub mod httpd;
pub mod ingest;
pub mod limits;
pub mod media;
pub mod origin;
pub mod packager;
pub mod record;
pub mod relay;
pub mod roles;
pub mod shutdown;
pub mod telemetry;
pub mod transcode;
