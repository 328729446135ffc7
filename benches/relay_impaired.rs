//! The relay on impaired paths (issue 13): one 4 Mbit/s 720p stream published to a `livepop
//! edge` whose only way to its `livepop core` is the test kit's user-space UDP impairment proxy,
//! for each RTT (20 / 50 / 150 ms) and random loss in both directions (0 / 0.5 / 1 / 2 / 5 %),
//! with 20 LL-HLS viewers on the edge. Reports the share of video frames delivered to the core,
//! the share of GAP parts, groups skipped, and the viewers' part latency p50/p99 with what the
//! loss added to the loss-free run at the same RTT. `--congestion cubic` runs the same matrix
//! with the loss-based controller, for comparison.
//!
//! Run: `bash bench/relay-impaired.sh` (or `cargo bench --bench relay_impaired -- --secs 20`).

#[path = "../tests/common/mod.rs"]
mod common;

use common::impair::Link;
use common::relay_path::{run_with, stream_file};
use std::fmt::Write as _;

struct Row {
    rtt: u64,
    loss: f64,
    delivered: f64,
    audio: f64,
    gap: f64,
    skipped: f64,
    stalls: u64,
    p50: f64,
    p99: f64,
}

fn list(name: &str, default: &str) -> Vec<f64> {
    common::arg(name, default)
        .split(',')
        .map(|v| v.trim().parse().expect("a number"))
        .collect()
}

fn main() {
    let secs: u32 = common::arg("--secs", "20").parse().unwrap();
    let losses = list("--losses", "0,0.5,1,2,5");
    let rtts = list("--rtts", "20,50,150");
    let cc = common::arg("--congestion", "bbr");
    let out = common::arg("--svg", "");
    let env = common::Env::new();
    let flv = stream_file(env.path(), secs);
    let mut rows = vec![];
    for &rtt in &rtts {
        for &loss in &losses {
            let link = Link::delay_ms(rtt as u64 / 2).loss(loss / 100.0);
            let o = run_with(
                &format!("{rtt} ms RTT, {loss}% loss, {cc}"),
                &flv,
                secs,
                link,
                link,
                &format!("congestion = \"{cc}\""),
            );
            rows.push(Row {
                rtt: rtt as u64,
                loss,
                delivered: o.received.0 / o.sent.0 as f64,
                audio: o.received.1 / o.sent.1 as f64,
                gap: o.parts.1 / (o.parts.0 + o.parts.1).max(1.0),
                skipped: o.skipped.0 + o.skipped.1,
                stalls: o.stalls,
                p50: o.latency_p50,
                p99: o.latency_p99,
            });
        }
    }
    println!(
        "\nrelay on impaired paths, {cc}, one 4 Mbit/s 1280x720 30 fps stream, {secs} s, \
         20 LL-HLS viewers\n"
    );
    println!("| RTT | loss | video frames delivered | audio delivered | GAP parts | groups skipped | viewer stalls | part latency p50 / p99 (ms) | added p50 / p99 (ms) |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in &rows {
        let base = rows
            .iter()
            .find(|b| b.rtt == r.rtt && b.loss == 0.0)
            .unwrap_or(r);
        println!(
            "| {} ms | {}% | {:.1}% | {:.1}% | {:.1}% | {} | {} | {:.0} / {:.0} | {:+.0} / {:+.0} |",
            r.rtt,
            r.loss,
            r.delivered * 100.0,
            r.audio * 100.0,
            r.gap * 100.0,
            r.skipped,
            r.stalls,
            r.p50,
            r.p99,
            r.p50 - base.p50,
            r.p99 - base.p99,
        );
    }
    if !out.is_empty() {
        std::fs::write(&out, svg(&rows, &cc)).unwrap();
        println!("\nplot: {out}");
    }
}

/// Two panels against loss: video frames delivered (%) and part latency p99 (ms), a line per RTT.
fn svg(rows: &[Row], cc: &str) -> String {
    let (w, h, pad) = (900.0, 360.0, 60.0);
    let panel_w = (w - 3.0 * pad) / 2.0;
    let panel_h = h - 2.0 * pad;
    let max_loss = rows.iter().map(|r| r.loss).fold(1.0, f64::max);
    let max_lat = rows.iter().map(|r| r.p99).fold(500.0, f64::max) * 1.1;
    let colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
    let mut rtts: Vec<u64> = rows.iter().map(|r| r.rtt).collect();
    rtts.dedup();
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\
         <text x=\"{}\" y=\"20\" text-anchor=\"middle\" font-size=\"14\">livepop relay on impaired paths ({cc}): one 4 Mbit/s stream</text>",
        w / 2.0
    );
    for (panel, (title, max, unit)) in [
        ("video frames delivered", 100.0, "%"),
        ("viewer part latency p99", max_lat, "ms"),
    ]
    .into_iter()
    .enumerate()
    {
        let x0 = pad + panel as f64 * (panel_w + pad);
        let y0 = pad;
        let _ = write!(
            s,
            "<rect x=\"{x0}\" y=\"{y0}\" width=\"{panel_w}\" height=\"{panel_h}\" fill=\"none\" stroke=\"#888\"/>\
             <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{title} ({unit})</text>\
             <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">random loss each way (%)</text>",
            x0 + panel_w / 2.0,
            y0 - 8.0,
            x0 + panel_w / 2.0,
            y0 + panel_h + 35.0
        );
        for i in 0..=4 {
            let v = max * i as f64 / 4.0;
            let y = y0 + panel_h - panel_h * i as f64 / 4.0;
            let _ = write!(
                s,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{v:.0}</text><line x1=\"{x0}\" x2=\"{}\" y1=\"{y}\" y2=\"{y}\" stroke=\"#eee\"/>",
                x0 - 4.0,
                y + 4.0,
                x0 + panel_w
            );
        }
        let mut losses: Vec<f64> = rows.iter().map(|r| r.loss).collect();
        losses.sort_by(f64::total_cmp);
        losses.dedup();
        for l in &losses {
            let x = x0 + panel_w * l / max_loss;
            let _ = write!(
                s,
                "<text x=\"{x}\" y=\"{}\" text-anchor=\"middle\">{l}</text>",
                y0 + panel_h + 16.0
            );
        }
        for (k, rtt) in rtts.iter().enumerate() {
            let pts: Vec<String> = rows
                .iter()
                .filter(|r| r.rtt == *rtt)
                .map(|r| {
                    let v = if panel == 0 {
                        r.delivered * 100.0
                    } else {
                        r.p99
                    };
                    format!(
                        "{:.1},{:.1}",
                        x0 + panel_w * r.loss / max_loss,
                        y0 + panel_h - panel_h * (v / max).min(1.0)
                    )
                })
                .collect();
            let c = colors[k % colors.len()];
            let _ = write!(
                s,
                "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\" points=\"{}\"/>",
                pts.join(" ")
            );
            if panel == 1 {
                let _ = write!(
                    s,
                    "<text x=\"{}\" y=\"{}\" fill=\"{c}\">RTT {rtt} ms</text>",
                    x0 + 10.0,
                    y0 + 16.0 + 14.0 * k as f64
                );
            }
        }
    }
    s.push_str("</svg>\n");
    s
}
