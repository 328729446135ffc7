//! The latency-over-time plot: part latency p50 and p99 per second, viewers running, and the
//! seconds with errors or stalls marked. Plain SVG, no dependency.

use crate::stats::TimelinePoint;
use std::fmt::Write;

const W: f64 = 900.0;
const H: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 70.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The SVG document for `timeline`.
pub fn svg(timeline: &[TimelinePoint], title: &str) -> String {
    let t_max = timeline.last().map_or(1, |p| p.t).max(1) as f64;
    let lat_max = timeline
        .iter()
        .filter_map(|p| p.latency_p99_ms)
        .fold(100.0_f64, f64::max)
        * 1.1;
    let v_max = timeline.iter().map(|p| p.viewers).max().unwrap_or(1).max(1) as f64 * 1.1;
    let x = |t: f64| LEFT + (W - LEFT - RIGHT) * t / t_max;
    let y = |v: f64, max: f64| H - BOTTOM - (H - TOP - BOTTOM) * v / max;
    let mut o = String::new();
    let _ = write!(
        o,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{LEFT}" y="22" font-size="14">Part latency over time: {}</text>
"##,
        esc(title)
    );
    // Axes and grid.
    for i in 0..=5 {
        let v = lat_max * i as f64 / 5.0;
        let yy = y(v, lat_max);
        let _ = writeln!(
            o,
            r##"<line x1="{LEFT}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{v:.0} ms</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            yy + 4.0
        );
        let vv = v_max * i as f64 / 5.0;
        let _ = writeln!(
            o,
            r##"<text x="{}" y="{:.1}" fill="#888">{vv:.0}</text>"##,
            W - RIGHT + 6.0,
            yy + 4.0
        );
    }
    for i in 0..=5 {
        let t = t_max * i as f64 / 5.0;
        let _ = writeln!(
            o,
            r##"<text x="{:.1}" y="{}" text-anchor="middle">{t:.0} s</text>"##,
            x(t),
            H - BOTTOM + 18.0
        );
    }
    // Seconds with errors (red) or stalls (orange).
    for p in timeline {
        let (color, on) = if p.errors > 0 {
            ("#f99", true)
        } else {
            ("#fc6", p.stalls > 0)
        };
        if on {
            let _ = writeln!(
                o,
                r##"<rect x="{:.1}" y="{TOP}" width="{:.1}" height="{}" fill="{color}" opacity="0.4"/>"##,
                x(p.t as f64 - 1.0),
                x(1.0) - LEFT,
                H - TOP - BOTTOM
            );
        }
    }
    let line = |pts: Vec<(f64, f64)>, color: &str, dash: &str| {
        let d: Vec<String> = pts.iter().map(|(a, b)| format!("{a:.1},{b:.1}")).collect();
        format!(
            r##"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2" {dash}/>"##,
            d.join(" ")
        )
    };
    let series = |f: &dyn Fn(&TimelinePoint) -> Option<f64>, max: f64| -> Vec<(f64, f64)> {
        timeline
            .iter()
            .filter_map(|p| f(p).map(|v| (x(p.t as f64), y(v, max))))
            .collect()
    };
    let _ = writeln!(
        o,
        "{}",
        line(
            series(&|p| Some(p.viewers as f64), v_max),
            "#888",
            r#"stroke-dasharray="4 3""#
        )
    );
    let _ = writeln!(
        o,
        "{}",
        line(series(&|p| p.latency_p50_ms, lat_max), "#1f77b4", "")
    );
    let _ = writeln!(
        o,
        "{}",
        line(series(&|p| p.latency_p99_ms, lat_max), "#d62728", "")
    );
    let _ = write!(
        o,
        r##"<text x="{LEFT}" y="{}" fill="#1f77b4">p50 latency</text>
<text x="{}" y="{}" fill="#d62728">p99 latency</text>
<text x="{}" y="{}" fill="#888">viewers (right axis)</text>
<text x="{}" y="{}" fill="#c66">shaded: errors (red) or stalls (orange) that second</text>
</svg>
"##,
        H - 10.0,
        LEFT + 110.0,
        H - 10.0,
        LEFT + 220.0,
        H - 10.0,
        LEFT + 380.0,
        H - 10.0
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_points_and_marks() {
        let tl: Vec<TimelinePoint> = (1..=10)
            .map(|t| TimelinePoint {
                t,
                viewers: 5,
                requests: 10,
                errors: u64::from(t == 3),
                latency_p50_ms: Some(500.0),
                latency_p99_ms: (t != 4).then_some(900.0),
                stalls: u64::from(t == 6),
            })
            .collect();
        let s = svg(&tl, "http://127.0.0.1/<x>");
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(s.contains("&lt;x&gt;"));
        assert_eq!(s.matches("<polyline").count(), 3);
        assert_eq!(s.matches(r##"fill="#f99""##).count(), 1);
        assert_eq!(s.matches(r##"fill="#fc6""##).count(), 1);
    }
}
