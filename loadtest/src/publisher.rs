//! Simulated streamers: each publishes an FLV file (H.264/AAC) over RTMP with rml_rtmp's client
//! session, at real-time pace, looping with continuous timestamps, under its own stream key.
//! Reported: connect failures, publishes refused, frames and bytes sent, and the backlog (how
//! far behind real time the sending fell, because the server or the network did not take the
//! bytes in time).

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
use rml_rtmp::sessions::{
    ClientSession, ClientSessionConfig, ClientSessionEvent, ClientSessionResult, PublishRequestType,
};
use rml_rtmp::time::RtmpTimestamp;
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// One FLV tag.
#[derive(Debug, Clone)]
pub struct Tag {
    /// 8 audio, 9 video.
    pub kind: u8,
    /// Milliseconds.
    pub ts: u32,
    /// Tag body.
    pub data: Bytes,
    /// An AVC or AAC sequence header (sent once, not on every loop).
    pub header: bool,
}

/// Reads the audio and video tags of an FLV file.
pub fn read_flv(bytes: &[u8]) -> Result<Vec<Tag>> {
    if bytes.len() < 13 || &bytes[..3] != b"FLV" {
        bail!("not an FLV file");
    }
    let mut pos = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) as usize + 4;
    let mut out = vec![];
    while pos + 11 <= bytes.len() {
        let h = &bytes[pos..pos + 11];
        let size = u32::from_be_bytes([0, h[1], h[2], h[3]]) as usize;
        let ts = u32::from_be_bytes([h[7], h[4], h[5], h[6]]);
        let end = pos + 11 + size;
        if end > bytes.len() {
            break; // a truncated last tag
        }
        let data = Bytes::copy_from_slice(&bytes[pos + 11..end]);
        let header = match h[0] {
            9 => data.len() > 1 && data[0] & 0x0f == 7 && data[1] == 0,
            8 => data.len() > 1 && data[0] >> 4 == 10 && data[1] == 0,
            _ => false,
        };
        if matches!(h[0], 8 | 9) && !data.is_empty() {
            out.push(Tag {
                kind: h[0],
                ts,
                data,
                header,
            });
        }
        pos = end + 4;
    }
    if !out.iter().any(|t| t.kind == 9) {
        bail!("the FLV file has no video");
    }
    Ok(out)
}

/// One publisher's outcome.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PublisherReport {
    /// Its stream key's position in the keys file (keys are secrets: not reported).
    pub index: usize,
    /// Connection attempts that failed (TCP, handshake, or refused publish).
    pub connect_failures: u64,
    /// Sessions that were accepted and publishing.
    pub sessions: u64,
    /// Accepted sessions that ended before the run did (connection lost).
    pub disconnects: u64,
    /// Audio and video messages sent.
    pub frames: u64,
    /// Tag bytes sent.
    pub bytes: u64,
    /// Largest lag behind real time (ms): the server or the network did not take the bytes.
    pub max_backlog_ms: u64,
    /// Lag at the end (ms).
    pub final_backlog_ms: u64,
    /// The last error, if any.
    pub last_error: Option<String>,
}

/// Publishes `tags` in a loop to `url`/`key` until `deadline`, reconnecting after failures.
pub async fn run(
    index: usize,
    url: String,
    key: String,
    tags: Arc<Vec<Tag>>,
    deadline: Instant,
    report: Arc<Mutex<PublisherReport>>,
) {
    let sessions = || report.lock().unwrap_or_else(|p| p.into_inner()).sessions;
    report.lock().unwrap_or_else(|p| p.into_inner()).index = index;
    while Instant::now() < deadline {
        let before = sessions();
        let r = tokio::time::timeout_at(deadline, session(&url, &key, &tags, &report)).await;
        match r {
            Err(_) | Ok(Ok(())) => break,
            Ok(Err(e)) => {
                let accepted = sessions() > before;
                let mut g = report.lock().unwrap_or_else(|p| p.into_inner());
                g.last_error = Some(format!("{e:#}"));
                if accepted {
                    g.disconnects += 1;
                } else {
                    g.connect_failures += 1;
                }
            }
        }
        // Reconnect after a pause, like an encoder.
        let _ = tokio::time::timeout_at(deadline, tokio::time::sleep(Duration::from_secs(1))).await;
    }
}

/// Splits `rtmp://host:port/app` into the address and the app.
pub fn parse_url(url: &str) -> Result<(String, String)> {
    let rest = url
        .strip_prefix("rtmp://")
        .ok_or_else(|| anyhow!("{url}: only rtmp:// URLs are supported"))?;
    let (host, app) = rest
        .split_once('/')
        .ok_or_else(|| anyhow!("{url}: no application (rtmp://HOST/live)"))?;
    let host = if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:1935")
    };
    let app = app.trim_end_matches('/');
    if app.is_empty() {
        bail!("{url}: no application (rtmp://HOST/live)");
    }
    Ok((host, app.to_string()))
}

async fn write_results(
    s: &mut TcpStream,
    results: Vec<ClientSessionResult>,
) -> Result<Vec<ClientSessionEvent>> {
    let mut events = vec![];
    for r in results {
        match r {
            ClientSessionResult::OutboundResponse(p) => s.write_all(&p.bytes).await?,
            ClientSessionResult::RaisedEvent(e) => events.push(e),
            _ => {}
        }
    }
    Ok(events)
}

async fn session(
    url: &str,
    key: &str,
    tags: &[Tag],
    report: &Mutex<PublisherReport>,
) -> Result<()> {
    let (addr, app) = parse_url(url)?;
    let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&addr))
        .await
        .map_err(|_| anyhow!("connect to {addr} timed out"))?
        .with_context(|| format!("connect to {addr}"))?;
    s.set_nodelay(true)?;
    // Handshake.
    let mut hs = Handshake::new(PeerType::Client);
    s.write_all(
        &hs.generate_outbound_p0_and_p1()
            .map_err(|e| anyhow!("{e:?}"))?,
    )
    .await?;
    let mut buf = vec![0u8; 64 * 1024];
    let leftover = loop {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .map_err(|_| anyhow!("handshake timed out"))??;
        if n == 0 {
            bail!("server closed during the handshake");
        }
        match hs
            .process_bytes(&buf[..n])
            .map_err(|e| anyhow!("handshake: {e:?}"))?
        {
            HandshakeProcessResult::InProgress { response_bytes } => {
                s.write_all(&response_bytes).await?
            }
            HandshakeProcessResult::Completed {
                response_bytes,
                remaining_bytes,
            } => {
                s.write_all(&response_bytes).await?;
                break remaining_bytes;
            }
        }
    };
    // connect + publish.
    let (mut sess, initial) =
        ClientSession::new(ClientSessionConfig::new()).map_err(|e| anyhow!("{e:?}"))?;
    write_results(&mut s, initial).await?;
    let r = sess.request_connection(app).map_err(|e| anyhow!("{e:?}"))?;
    write_results(&mut s, vec![r]).await?;
    let mut pending = leftover;
    let mut connected = false;
    'accept: loop {
        let results = sess.handle_input(&pending).map_err(|e| anyhow!("{e:?}"))?;
        pending.clear();
        for e in write_results(&mut s, results).await? {
            match e {
                ClientSessionEvent::ConnectionRequestAccepted if !connected => {
                    connected = true;
                    let r = sess
                        .request_publishing(key.to_string(), PublishRequestType::Live)
                        .map_err(|e| anyhow!("{e:?}"))?;
                    write_results(&mut s, vec![r]).await?;
                }
                ClientSessionEvent::PublishRequestAccepted => break 'accept,
                ClientSessionEvent::ConnectionRequestRejected { description } => {
                    bail!("connect rejected: {description}")
                }
                // e.g. NetStream.Publish.BadName for an unknown key.
                ClientSessionEvent::UnhandleableOnStatusCode { code }
                    if code.contains("Publish") =>
                {
                    bail!("publish refused: {code}")
                }
                _ => {}
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .map_err(|_| anyhow!("no answer to connect/publish within 5 s (key refused?)"))??;
        if n == 0 {
            bail!("server closed before accepting the publish (key refused?)");
        }
        pending.extend_from_slice(&buf[..n]);
    }
    report.lock().unwrap_or_else(|p| p.into_inner()).sessions += 1;

    // Media at real-time pace, looping with continuous timestamps.
    let (rd, mut wr) = s.into_split();
    let sess = Arc::new(Mutex::new(sess));
    // The server's messages (acks, pings) are read and handled; replies queue behind media.
    let (ctl_tx, mut ctl_rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let s2 = sess.clone();
    let reader = tokio::spawn(async move {
        let mut rd = rd;
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let results = match s2
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .handle_input(&buf[..n])
            {
                Ok(r) => r,
                Err(_) => return,
            };
            for r in results {
                if let ClientSessionResult::OutboundResponse(p) = r {
                    if ctl_tx.send(Bytes::from(p.bytes)).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let first = tags.first().map_or(0, |t| t.ts);
    let span = tags.last().map_or(0, |t| t.ts.saturating_sub(first)) + 33;
    let start = Instant::now();
    let mut loop_n: u32 = 0;
    let result: Result<()> = async {
        loop {
            for t in tags.iter().filter(|t| loop_n == 0 || !t.header) {
                let ts = loop_n
                    .wrapping_mul(span)
                    .wrapping_add(t.ts.saturating_sub(first));
                let due = start + Duration::from_millis(u64::from(ts));
                tokio::time::sleep_until(due).await;
                while let Ok(c) = ctl_rx.try_recv() {
                    wr.write_all(&c).await?;
                }
                let packet = {
                    let mut g = sess.lock().unwrap_or_else(|p| p.into_inner());
                    let r = if t.kind == 9 {
                        g.publish_video_data(t.data.clone(), RtmpTimestamp::new(ts), false)
                    } else {
                        g.publish_audio_data(t.data.clone(), RtmpTimestamp::new(ts), false)
                    };
                    r.map_err(|e| anyhow!("{e:?}"))?
                };
                if let ClientSessionResult::OutboundResponse(p) = packet {
                    wr.write_all(&p.bytes)
                        .await
                        .map_err(|e| anyhow!("connection lost: {e}"))?;
                }
                let lag = Instant::now().saturating_duration_since(due).as_millis() as u64;
                let mut g = report.lock().unwrap_or_else(|p| p.into_inner());
                g.frames += 1;
                g.bytes += t.data.len() as u64;
                g.max_backlog_ms = g.max_backlog_ms.max(lag);
                g.final_backlog_ms = lag;
            }
            loop_n += 1;
        }
    }
    .await;
    reader.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(kind: u8, ts: u32, body: &[u8]) -> Vec<u8> {
        let mut t = vec![kind];
        t.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        t.extend_from_slice(&ts.to_be_bytes()[1..]);
        t.push((ts >> 24) as u8);
        t.extend_from_slice(&[0, 0, 0]);
        t.extend_from_slice(body);
        t.extend_from_slice(&((11 + body.len()) as u32).to_be_bytes());
        t
    }

    #[test]
    fn reads_flv_tags_and_marks_sequence_headers() {
        let mut f = b"FLV\x01\x05\x00\x00\x00\x09\x00\x00\x00\x00".to_vec();
        f.extend(tag(9, 0, &[0x17, 0, 0, 0, 0, 1]));
        f.extend(tag(8, 0, &[0xaf, 0, 0x12, 0x10]));
        f.extend(tag(18, 0, b"meta"));
        f.extend(tag(9, 33, &[0x27, 1, 0, 0, 0, 9]));
        f.extend(tag(8, 0x0100_0000 + 5, &[0xaf, 1, 7]));
        let t = read_flv(&f).unwrap();
        assert_eq!(t.len(), 4);
        assert!(t[0].header && t[1].header && !t[2].header && !t[3].header);
        assert_eq!(t[2].ts, 33);
        assert_eq!(t[3].ts, 0x0100_0005, "extended timestamp byte");
        // Truncated and junk input: an error or fewer tags, never a panic.
        assert!(read_flv(b"FLX").is_err());
        let _ = read_flv(&f[..f.len() - 3]);
    }

    #[test]
    fn rtmp_urls() {
        assert_eq!(
            parse_url("rtmp://127.0.0.1:1935/live").unwrap(),
            ("127.0.0.1:1935".into(), "live".into())
        );
        assert_eq!(
            parse_url("rtmp://localhost/live/").unwrap(),
            ("localhost:1935".into(), "live".into())
        );
        assert!(parse_url("http://x/live").is_err());
        assert!(parse_url("rtmp://x/").is_err());
    }
}
