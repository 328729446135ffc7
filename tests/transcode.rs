//! The ABR ladder (issue 5), end to end: ffmpeg publishes 720p to an edge, the core transcodes
//! 480p and 360p next to the source, and every rendition is checked with ffmpeg/ffprobe.

mod common;
use common::*;
use std::net::SocketAddr;
use std::time::Duration;

const LADDER: &str = r#"
[transcode]
preset = "ultrafast"
[[transcode.renditions]]
name = "480p"
height = 480
video_kbps = 1000
[[transcode.renditions]]
name = "360p"
height = 360
video_kbps = 600
[[transcode.renditions]]
name = "1080p"
height = 1080
video_kbps = 5000
"#;

fn text(addr: SocketAddr, path: &str) -> (u16, String) {
    let (s, _, b) = http_get_full(addr, path).unwrap_or_else(|| panic!("GET {path} failed"));
    (s, String::from_utf8_lossy(&b).to_string())
}

/// The first tfdt of the video track (track 1) in a fragment, in seconds.
fn first_tfdt(b: &[u8]) -> Option<f64> {
    fn walk(b: &[u8], track: &mut u32) -> Option<u64> {
        let mut off = 0;
        while off + 8 <= b.len() {
            let size = u32::from_be_bytes(b[off..off + 4].try_into().ok()?) as usize;
            if size < 8 || off + size > b.len() {
                return None;
            }
            let body = &b[off + 8..off + size];
            match &b[off + 4..off + 8] {
                b"moof" | b"traf" => {
                    if let Some(t) = walk(body, track) {
                        return Some(t);
                    }
                }
                b"tfhd" => *track = u32::from_be_bytes(body[4..8].try_into().ok()?),
                b"tfdt" if *track == 1 => {
                    return Some(if body[0] == 1 {
                        u64::from_be_bytes(body[4..12].try_into().ok()?)
                    } else {
                        u64::from(u32::from_be_bytes(body[4..8].try_into().ok()?))
                    })
                }
                _ => {}
            }
            off += size;
        }
        None
    }
    walk(b, &mut 0).map(|t| t as f64 / 90_000.0)
}

#[test]
fn the_ladder_is_keyframe_aligned_and_complete() {
    let env = Env::new();
    let core = start_core_with_origin(&env, "core-1", LADDER);
    let origin = core.addr("origin");
    let edge = start_edge(
        &env,
        &EdgeOpts::new(vec![("core-1".into(), core.addr("relay"))]),
    );
    let url = format!("rtmp://{}/live/demo-key", edge.addr("rtmp"));
    // A source with B-frames (2 s GOP): the renditions have none, yet line up with it.
    let mut ff = std::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-re"])
        .args(["-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=30"])
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100"])
        .args(["-t", "20", "-map", "0:v", "-map", "1:a"])
        .args([
            "-c:v",
            "libx264",
            "-preset",
            "superfast",
            "-bf",
            "2",
            "-g",
            "60",
        ])
        .args(["-c:a", "aac", "-f", "flv", &url])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("ffmpeg");

    // The multivariant playlist offers the source and the two lower rungs (1080p would be an
    // upscale: not offered).
    let master = wait_for("all three variants", Duration::from_secs(30), || {
        let (s, m) = text(origin, "/live/demo/master.m3u8");
        (s == 200 && m.matches("#EXT-X-STREAM-INF").count() == 3).then_some(m)
    });
    for (uri, res) in [
        ("src/index.m3u8", "1280x720"),
        ("480p/index.m3u8", "854x480"),
        ("360p/index.m3u8", "640x360"),
    ] {
        let inf = master
            .lines()
            .zip(master.lines().skip(1))
            .find(|(_, u)| *u == uri)
            .map(|(i, _)| i)
            .unwrap_or_else(|| panic!("{uri} missing:\n{master}"));
        assert!(inf.contains(&format!("RESOLUTION={res}")), "{inf}");
        assert!(
            inf.contains("CODECS=\"avc1.") && inf.contains("mp4a.40.2"),
            "{inf}"
        );
        assert!(inf.contains("FRAME-RATE=30.000"), "{inf}");
    }
    assert!(!master.contains("1080p"));

    // While live: rendition reports cross-reference the others (§4.4.5.4).
    let (_, live) = text(origin, "/live/demo/480p/index.m3u8");
    assert!(
        live.contains("#EXT-X-RENDITION-REPORT:URI=\"../src/index.m3u8\""),
        "{live}"
    );
    assert!(
        live.contains("#EXT-X-RENDITION-REPORT:URI=\"../360p/index.m3u8\""),
        "{live}"
    );

    // §6.2.1: all renditions advance together: the same part completes in each within one
    // PART-TARGET of the source (blocking reloads held on all three at once).
    let pt = 0.2 + 0.02;
    for _ in 0..5 {
        let (_, pl) = text(origin, "/live/demo/src/index.m3u8");
        let (m, p) = hint(&pl);
        let path = format!("index.m3u8?_HLS_msn={m}&_HLS_part={p}");
        let waits: Vec<_> = ["src", "480p", "360p"]
            .iter()
            .map(|r| {
                let path = format!("/live/demo/{r}/{path}");
                std::thread::spawn(move || {
                    let (s, head, _) = http_get_full(origin, &path).unwrap();
                    assert_eq!(s, 200);
                    header_num(&head, "livepop-changed-us").unwrap()
                })
            })
            .collect();
        let stamps: Vec<u64> = waits.into_iter().map(|h| h.join().unwrap()).collect();
        let spread = (stamps.iter().max().unwrap() - stamps.iter().min().unwrap()) as f64 / 1e6;
        assert!(spread <= pt, "renditions {stamps:?} apart by {spread} s");
    }

    assert!(wait_child(&mut ff, Duration::from_secs(60)));
    let ended = |r: &str| {
        wait_for("EXT-X-ENDLIST", Duration::from_secs(15), || {
            let (_, pl) = text(origin, &format!("/live/demo/{r}/index.m3u8"));
            pl.contains("#EXT-X-ENDLIST").then_some(pl)
        })
    };
    let renditions = ["src", "480p", "360p"];
    let playlists: Vec<String> = renditions.iter().map(|r| ended(r)).collect();

    // Same segments (MSN) in every rendition, each starting at the same media time (±1 ms).
    let segs: Vec<Vec<(f64, String)>> = playlists.iter().map(|p| complete_segments(p)).collect();
    assert!(segs[0].len() >= 8, "{}", playlists[0]);
    for (r, s) in renditions.iter().zip(&segs).skip(1) {
        let uris: Vec<&String> = s.iter().map(|x| &x.1).collect();
        let src: Vec<&String> = segs[0].iter().map(|x| &x.1).collect();
        assert_eq!(uris, src, "{r}: segment list differs from the source's");
    }
    let mut files = vec![];
    for (r, pl) in renditions.iter().zip(&playlists) {
        let map = pl
            .lines()
            .find_map(|l| l.strip_prefix("#EXT-X-MAP:URI=\""))
            .unwrap()
            .trim_end_matches('"');
        let (s, _, init) = http_get_full(origin, &format!("/live/demo/{r}/{map}")).unwrap();
        assert_eq!(s, 200);
        let mut all = init;
        let mut starts = vec![];
        for (_, uri) in complete_segments(pl) {
            let (s, _, seg) = http_get_full(origin, &format!("/live/demo/{r}/{uri}")).unwrap();
            assert_eq!(s, 200, "{r}/{uri}");
            starts.push(first_tfdt(&seg).expect("tfdt"));
            all.extend_from_slice(&seg);
        }
        let f = env.path().join(format!("{r}.mp4"));
        std::fs::write(&f, all).unwrap();
        files.push((r.to_string(), f, starts));
    }
    for (r, _, starts) in &files[1..] {
        for (i, (a, b)) in files[0].2.iter().zip(starts).enumerate() {
            assert!(
                (a - b).abs() <= 0.001,
                "{r}: segment {i} starts at {b}, source at {a}"
            );
        }
    }

    // Each rendition decodes cleanly; declared sizes; no B-frames; keyframes at identical PTS.
    let mut keyframes = vec![];
    let mut counts = vec![];
    for ((r, f, _), size) in files.iter().zip(["1280,720", "854,480", "640,360"]) {
        let out = std::process::Command::new("ffmpeg")
            .args(["-hide_banner", "-v", "error", "-nostdin", "-i"])
            .arg(f)
            .args(["-f", "null", "-"])
            .output()
            .unwrap();
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "{r} does not decode cleanly: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let s = ffprobe(f, "stream=codec_type,width,height,has_b_frames");
        assert!(s.contains(&format!("video,{size},")), "{r}: {s}");
        // The source passes through untouched (this one has B-frames); renditions have none.
        let transcoded = r != "src";
        if transcoded {
            assert!(s.contains(&format!("video,{size},0")), "{r}: {s}");
        }
        // ffprobe prints media_type, key_frame, pts, pict_type in that order.
        let frames = ffprobe(f, "frame=media_type,key_frame,pts,pict_type");
        let video: Vec<&str> = frames.lines().filter(|l| l.starts_with("video")).collect();
        if transcoded {
            assert!(video.iter().all(|l| !l.ends_with(",B")), "{r} has B-frames");
        } else {
            assert!(
                video.iter().any(|l| l.ends_with(",B")),
                "the source lost its B-frames"
            );
        }
        let keys: Vec<String> = video
            .iter()
            .filter(|l| l.split(',').nth(1) == Some("1"))
            .filter_map(|l| l.split(',').nth(2).map(str::to_string))
            .collect();
        assert!(keys.len() >= 8, "{r}: {} keyframes", keys.len());
        keyframes.push(keys);
        counts.push(video.len());
    }
    assert_eq!(
        keyframes[1], keyframes[0],
        "480p keyframes differ from the source's"
    );
    assert_eq!(
        keyframes[2], keyframes[0],
        "360p keyframes differ from the source's"
    );
    // Every source frame came out of every rendition.
    assert_eq!(counts[1], counts[0], "480p frames");
    assert_eq!(counts[2], counts[0], "360p frames");

    // The transcoder's own counts: frames in = frames out for every rendition, none dropped.
    let admin = core.addr("admin");
    let fin = metric(admin, "livepop_transcode_frames_in_total{stream=\"demo\"}");
    for r in ["480p", "360p"] {
        let out = metric(
            admin,
            &format!("livepop_transcode_frames_out_total{{rendition=\"{r}\",stream=\"demo\"}}"),
        );
        assert_eq!(out, fin, "{r}: frames out vs in");
    }
    assert!(fin >= 590.0, "only {fin} frames in 20 s at 30 fps");
}

/// A new sequence header mid-stream (the publisher switches from 720p to 540p) restarts the
/// ladder: every rendition continues after EXT-X-DISCONTINUITY with a new init segment, and the
/// multivariant playlist describes the new source.
#[test]
fn a_new_sequence_header_restarts_the_ladder_with_a_discontinuity() {
    let env = Env::new();
    let ladder = "[transcode]\npreset = \"ultrafast\"\n[[transcode.renditions]]\nname = \"360p\"\nheight = 360\nvideo_kbps = 600\n";
    let core = start_core_with_origin(&env, "core-1", ladder);
    let origin = core.addr("origin");
    let edge = start_edge(
        &env,
        &EdgeOpts::new(vec![("core-1".into(), core.addr("relay"))]),
    );
    let (a, b) = (env.path().join("a.flv"), env.path().join("b.flv"));
    encode_flv_sized(&a, "1280x720", 6);
    encode_flv_sized(&b, "960x540", 6);
    let mut p = RawPublisher::publish(edge.addr("rtmp"), "demo-key");
    let mut paced = vec![];
    for (file, offset) in [(&a, 0u32), (&b, 6000u32)] {
        for (kind, ts, body) in flv_tags(file) {
            let ts = ts + offset;
            let csid = if kind == 9 { 6 } else { 4 };
            paced.push((
                ts,
                livepop::ingest::chunk::write::message(csid, ts, kind, 1, &body, RAW_CHUNK),
            ));
        }
    }
    send_paced(&mut p, &paced, 2);
    drop(p);
    let ended = |r: &str| {
        wait_for("EXT-X-ENDLIST", Duration::from_secs(20), || {
            let (_, pl) = text(origin, &format!("/live/demo/{r}/index.m3u8"));
            pl.contains("#EXT-X-ENDLIST").then_some(pl)
        })
    };
    for r in ["src", "360p"] {
        let pl = ended(r);
        assert_eq!(
            pl.matches("#EXT-X-DISCONTINUITY\n").count(),
            1,
            "{r}:\n{pl}"
        );
        let maps: std::collections::HashSet<&str> = pl
            .lines()
            .filter_map(|l| l.strip_prefix("#EXT-X-MAP:URI="))
            .collect();
        assert_eq!(
            maps.len(),
            2,
            "{r}: a new init segment after the change:\n{pl}"
        );
        let after = pl.split("#EXT-X-DISCONTINUITY\n").nth(1).unwrap();
        assert!(
            after.matches("#EXTINF").count() >= 2,
            "{r}: media after the change:\n{pl}"
        );
    }
    let (_, master) = text(origin, "/live/demo/master.m3u8");
    assert!(master.contains("RESOLUTION=960x540"), "{master}");
    assert!(master.contains("RESOLUTION=640x360"), "{master}");
    // The 360p init after the change decodes with its segments.
    let pl = ended("360p");
    let after = pl.split("#EXT-X-DISCONTINUITY\n").nth(1).unwrap();
    let map = after
        .lines()
        .find_map(|l| l.strip_prefix("#EXT-X-MAP:URI=\""))
        .unwrap()
        .trim_end_matches('"');
    let (_, _, mut all) = http_get_full(origin, &format!("/live/demo/360p/{map}")).unwrap();
    for (_, uri) in complete_segments(after) {
        all.extend(
            http_get_full(origin, &format!("/live/demo/360p/{uri}"))
                .unwrap()
                .2,
        );
    }
    let f = env.path().join("after.mp4");
    std::fs::write(&f, all).unwrap();
    assert!(ffprobe(&f, "stream=width,height").contains("640,360"));
}

/// MP3 audio from the publisher is served as AAC (what LL-HLS players decode in CMAF).
#[test]
fn mp3_audio_is_served_as_aac() {
    let env = Env::new();
    let core = start_core_with_origin(&env, "core-1", "");
    let origin = core.addr("origin");
    let edge = start_edge(
        &env,
        &EdgeOpts::new(vec![("core-1".into(), core.addr("relay"))]),
    );
    let url = format!("rtmp://{}/live/demo-key", edge.addr("rtmp"));
    let ok = std::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-re"])
        .args(["-f", "lavfi", "-i", "testsrc2=size=320x240:rate=30"])
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100"])
        .args(["-t", "8", "-map", "0:v", "-map", "1:a"])
        .args(["-c:v", "libx264", "-preset", "ultrafast", "-g", "60"])
        .args(["-c:a", "libmp3lame", "-b:a", "128k", "-f", "flv", &url])
        .status()
        .unwrap();
    assert!(ok.success());
    let pl = wait_for("EXT-X-ENDLIST", Duration::from_secs(20), || {
        let (_, pl) = text(origin, "/live/demo/src/index.m3u8");
        pl.contains("#EXT-X-ENDLIST").then_some(pl)
    });
    let (_, master) = text(origin, "/live/demo/master.m3u8");
    assert!(master.contains("mp4a.40.2"), "{master}");
    // The media after the last init segment (the stream's audio configuration may arrive just
    // after its video's, which starts a new init segment).
    let last = pl.rsplit("#EXT-X-MAP:URI=\"").next().unwrap();
    let map = last.split('"').next().unwrap();
    let (_, _, mut all) = http_get_full(origin, &format!("/live/demo/src/{map}")).unwrap();
    for (_, uri) in complete_segments(last) {
        all.extend(
            http_get_full(origin, &format!("/live/demo/src/{uri}"))
                .unwrap()
                .2,
        );
    }
    let f = env.path().join("mp3.mp4");
    std::fs::write(&f, all).unwrap();
    let streams = ffprobe(&f, "stream=codec_name");
    assert!(streams.contains("aac"), "{streams}");
    let packets = ffprobe(&f, "packet=codec_type");
    let audio = packets.lines().filter(|l| *l == "audio").count();
    // 8 s of 44.1 kHz audio in 1024-sample AAC frames is about 344.
    assert!(audio > 250, "{audio} audio packets:\n{pl}");
    let out = std::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-v", "error", "-nostdin", "-i"])
        .arg(&f)
        .args(["-f", "null", "-"])
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A ladder the core cannot run in real time (x264 veryslow): the most expensive rendition is
/// shed (counted, its playlist ended, left out of the multivariant playlist) while the source
/// stays live and real time.
#[test]
fn a_ladder_that_cannot_keep_up_sheds_its_most_expensive_rendition() {
    let env = Env::new();
    let ladder = "[transcode]\npreset = \"veryslow\"\n[[transcode.renditions]]\nname = \"540p\"\nheight = 540\nvideo_kbps = 2000\n[[transcode.renditions]]\nname = \"360p\"\nheight = 360\nvideo_kbps = 800\n";
    let core = start_core_with_origin(&env, "core-1", ladder);
    let origin = core.addr("origin");
    let edge = start_edge(
        &env,
        &EdgeOpts::new(vec![("core-1".into(), core.addr("relay"))]),
    );
    let url = format!("rtmp://{}/live/demo-key", edge.addr("rtmp"));
    let mut ff = ffmpeg_publish(&url, 40, "1280x720", None);
    let admin = core.addr("admin");
    wait_for("540p shed", Duration::from_secs(30), || {
        (metric_or_zero(
            admin,
            "livepop_transcode_shed_total{rendition=\"540p\",stream=\"demo\"}",
        ) >= 1.0)
            .then_some(())
    });
    let (_, pl) = text(origin, "/live/demo/540p/index.m3u8");
    assert!(pl.contains("#EXT-X-ENDLIST"), "{pl}");
    let (_, master) = text(origin, "/live/demo/master.m3u8");
    assert!(!master.contains("540p/index.m3u8"), "{master}");
    // The source keeps up: its next part is published within a second of being asked for.
    for _ in 0..3 {
        let (_, pl) = text(origin, "/live/demo/src/index.m3u8");
        let (m, p) = hint(&pl);
        let t = std::time::Instant::now();
        let (s, _) = text(
            origin,
            &format!("/live/demo/src/index.m3u8?_HLS_msn={m}&_HLS_part={p}"),
        );
        assert_eq!(s, 200);
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "source part took {:?}",
            t.elapsed()
        );
    }
    let _ = ff.kill();
    let _ = ff.wait();
}
