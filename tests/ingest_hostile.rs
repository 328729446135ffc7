//! Hostile and broken RTMP input (issue 2, point 4). Each test runs while a good ffmpeg stream
//! publishes to the same edge; that stream must arrive at the core frame for frame, and the bad
//! connection must be closed with a clear log line, never a panic.

mod common;
use common::*;
use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

struct Rig {
    env: Env,
    _core: Proc,
    edge: Proc,
    ff: std::process::Child,
    sent: std::path::PathBuf,
}

fn rig(extra_rtmp: &str) -> Rig {
    let env = Env::new();
    let core = start_core(&env, "core-1", "127.0.0.1:0");
    let mut opts = EdgeOpts::new(vec![("core-1".into(), core.addr("relay"))]);
    opts.stall_ms = 1500;
    opts.extra_rtmp = extra_rtmp.into();
    let edge = start_edge(&env, &opts);
    let sent = env.path().join("sent.flv");
    let url = format!("rtmp://{}/live/demo-key", edge.addr("rtmp"));
    let ff = ffmpeg_publish(&url, 7, "640x360", Some(&sent));
    edge.wait_log(Duration::from_secs(10), |v| {
        message_is(v, "publish started")
    });
    Rig {
        env,
        _core: core,
        edge,
        ff,
        sent,
    }
}

impl Rig {
    /// The good stream finished and arrived intact; the edge never panicked.
    fn check_good_stream(mut self) {
        assert!(
            wait_child(&mut self.ff, Duration::from_secs(40)),
            "good publisher failed"
        );
        let rec = stream_recording(&self.env, "core-1", "demo");
        assert_same_frames(&self.sent, &rec);
        assert!(self.edge.is_running());
        assert!(!self.edge.log_text().contains("panicked"));
    }

    fn expect_log(&self, text: &str) {
        self.edge.wait_log(Duration::from_secs(10), |v| {
            v["level"] == "WARN" && v.to_string().contains(text)
        });
    }
}

#[test]
fn garbage_bytes() {
    let r = rig("");
    let mut s = TcpStream::connect(r.edge.addr("rtmp")).unwrap();
    let garbage: Vec<u8> = (0..8192u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8 | 0x80)
        .collect();
    let _ = s.write_all(&garbage);
    assert!(closed_by_peer(&mut s, Duration::from_secs(5)));
    r.expect_log("handshake failed");
    r.check_good_stream();
}

#[test]
fn truncated_handshake() {
    let r = rig("");
    let mut s = TcpStream::connect(r.edge.addr("rtmp")).unwrap();
    s.write_all(&[3]).unwrap();
    s.write_all(&[0u8; 700]).unwrap(); // C1 is 1536 bytes: stop halfway
    assert!(closed_by_peer(&mut s, Duration::from_secs(6)));
    r.expect_log("handshake not completed within 2000 ms");
    r.check_good_stream();
}

#[test]
fn set_chunk_size_of_2_pow_31_minus_1() {
    let r = rig("");
    let mut p = RawPublisher::publish(r.edge.addr("rtmp"), "other-key");
    let msg = livepop::ingest::chunk::write::message(
        2,
        0,
        1,
        0,
        &0x7FFF_FFFFu32.to_be_bytes(),
        RAW_CHUNK,
    );
    p.send(&msg);
    assert!(closed_by_peer(&mut p.s, Duration::from_secs(5)));
    r.expect_log("peer set chunk size 2147483647");
    r.check_good_stream();
}

#[test]
fn sixteen_megabyte_message() {
    let r = rig("");
    let mut p = RawPublisher::publish(r.edge.addr("rtmp"), "other-key");
    let header = livepop::ingest::chunk::write::type0(6, 0, 0xFF_FFFF, 9, 1);
    p.send(&header);
    // Keep sending the body: the edge must refuse before buffering it.
    let chunk = vec![0x17u8; RAW_CHUNK];
    for _ in 0..64 {
        if !p.send(&chunk) {
            break;
        }
    }
    assert!(closed_by_peer(&mut p.s, Duration::from_secs(5)));
    r.expect_log("message of 16777215 bytes exceeds the limit");
    r.check_good_stream();
}

#[test]
fn stalled_publisher() {
    let r = rig("");
    let mut p = RawPublisher::publish(r.edge.addr("rtmp"), "other-key");
    assert!(closed_by_peer(&mut p.s, Duration::from_secs(6)));
    r.expect_log("no data for 1500 ms");
    r.check_good_stream();
}

#[test]
fn partial_messages_over_the_buffer_limit() {
    let r = rig("max_message_bytes = 1048576\nmax_buffered_bytes = 2097152");
    let mut p = RawPublisher::publish(r.edge.addr("rtmp"), "other-key");
    // Three 1 MiB messages on three chunk streams, each 800 KiB in: 2.4 MiB held.
    let body = vec![0x27u8; RAW_CHUNK];
    'outer: for csid in [10u32, 11, 12] {
        if !p.send(&livepop::ingest::chunk::write::type0(
            csid,
            0,
            1 << 20,
            9,
            1,
        )) {
            break;
        }
        for i in 0..200 {
            if i > 0 && !p.send(&livepop::ingest::chunk::write::basic_header(3, csid)) {
                break 'outer;
            }
            if !p.send(&body) {
                break 'outer;
            }
        }
    }
    assert!(closed_by_peer(&mut p.s, Duration::from_secs(5)));
    r.expect_log("buffered in partial messages");
    r.check_good_stream();
}

#[test]
fn connection_limit() {
    // The good publisher holds one of the two connections.
    let r = rig("max_connections = 2");
    let addr = r.edge.addr("rtmp");
    let _idle = TcpStream::connect(addr).unwrap();
    let edge_admin = r.edge.addr("admin");
    wait_for("two open connections", Duration::from_secs(5), || {
        (metric(edge_admin, "livepop_ingest_connections") == 2.0).then_some(())
    });
    let mut third = TcpStream::connect(addr).unwrap();
    assert!(closed_by_peer(&mut third, Duration::from_secs(5)));
    r.expect_log("connection limit reached");
    assert_eq!(
        metric(
            edge_admin,
            "livepop_ingest_rejected_total{reason=\"connection_limit\"}"
        ),
        1.0
    );
    r.check_good_stream();
}

/// Audio and video chunks interleaved mid-message on different chunk streams (allowed by the
/// RTMP spec; rml_rtmp alone mis-assembles them): the core must receive exactly the file's frames.
#[test]
fn interleaved_chunk_streams_arrive_intact() {
    let env = Env::new();
    let core = start_core(&env, "core-1", "127.0.0.1:0");
    let edge = start_edge(
        &env,
        &EdgeOpts::new(vec![("core-1".into(), core.addr("relay"))]),
    );
    let src = env.path().join("src.flv");
    encode_flv(&src, 4);
    let tags = flv_tags(&src);
    let mut p = RawPublisher::publish(edge.addr("rtmp"), "demo-key");
    use livepop::ingest::chunk::write::{basic_header, type0};
    // Pair each video tag with the next audio tag and interleave their chunks.
    let video: Vec<_> = tags.iter().filter(|t| t.0 == 9).collect();
    let audio: Vec<_> = tags.iter().filter(|t| t.0 == 8).collect();
    let chunks = |csid: u32, t: &(u8, u32, Vec<u8>)| -> Vec<Vec<u8>> {
        let mut v = vec![];
        for (i, c) in t.2.chunks(RAW_CHUNK).enumerate() {
            let mut b = if i == 0 {
                type0(csid, t.1, t.2.len(), t.0, 1)
            } else {
                basic_header(3, csid)
            };
            b.extend_from_slice(c);
            v.push(b);
        }
        v
    };
    let mut interleaved_messages = 0;
    let mut paced = vec![];
    for i in 0..video.len().max(audio.len()) {
        let vc = video.get(i).map(|t| chunks(6, t)).unwrap_or_default();
        let ac = audio.get(i).map(|t| chunks(4, t)).unwrap_or_default();
        if vc.len() > 1 && !ac.is_empty() {
            interleaved_messages += 1;
        }
        // Video's first chunk, then audio's chunks, then the rest of the video.
        let mut wire = vec![];
        let mut vi = vc.into_iter();
        if let Some(first) = vi.next() {
            wire.extend(first);
        }
        for c in ac {
            wire.extend(c);
        }
        for c in vi {
            wire.extend(c);
        }
        paced.push((video.get(i).map_or(0, |t| t.1), wire));
    }
    send_paced(&mut p, &paced, 4);
    assert!(interleaved_messages > 5, "test input did not interleave");
    drop(p); // publisher disconnects: the stream ends
    let rec = wait_for("recording", Duration::from_secs(20), || {
        recordings(&env, "core-1").into_iter().next()
    });
    assert_same_frames(&src, &rec);
}

#[test]
fn a_publisher_over_the_bitrate_cap_is_disconnected() {
    let r = rig("max_bitrate_kbps = 4000");
    let mut p = RawPublisher::publish(r.edge.addr("rtmp"), "other-key");
    // Keyframes of 64 KiB as fast as the socket takes them: 8 MiB, past 4 Mbit/s × 10 s.
    let mut key = vec![0x17u8, 1, 0, 0, 0];
    key.extend_from_slice(&((64 * 1024 - 4) as u32).to_be_bytes());
    key.resize(5 + 64 * 1024, 0x65);
    let mut closed = false;
    for i in 0..128u32 {
        let m = livepop::ingest::chunk::write::message(6, i * 33, 9, 1, &key, RAW_CHUNK);
        if !p.send(&m) {
            closed = true;
            break;
        }
    }
    assert!(closed || closed_by_peer(&mut p.s, Duration::from_secs(5)));
    r.expect_log("max_bitrate_kbps = 4000");
    assert_eq!(
        metric(
            r.edge.addr("admin"),
            "livepop_ingest_rejected_total{reason=\"bitrate\"}"
        ),
        1.0
    );
    r.check_good_stream();
}
