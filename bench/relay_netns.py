#!/usr/bin/env python3
"""The relay on an impaired path, against nginx-rtmp in the same run (issue 13).

Two network namespaces, edge (10.201.0.1) and core (10.201.0.2), joined through the root
namespace by bench/netdelay.py (a user-space delay line: netem is unavailable here), with random
loss in both directions from an `iptables -m statistic --mode random` DROP rule in the core's
namespace. The same path carries livepop's QUIC relay (UDP) and nginx-rtmp's push (TCP).

Per RTT and loss: one 4 Mbit/s 1280x720 30 fps stream, published with ffmpeg -re in the edge
namespace.
- livepop: `livepop edge` (edge ns) relays to `livepop core` (core ns); 20 LL-HLS viewers
  (livepop-loadtest) on the edge. Video frames delivered (core metric), GAP parts, groups
  skipped, relay frame delay p50/p99 above the one-way delay (core histogram), viewers' part
  latency p50/p99.
- nginx-rtmp: an edge nginx `push`es to a core nginx; an RTMP subscriber on the core (ffmpeg
  into bench/flvtimes.py) times every video frame. Frames delivered, frame delay p50/p99 above
  the least delayed frame (the one-way delay).

Run as root: bash bench/relay-netns.sh (installs iptables, ethtool, nginx-rtmp; builds).
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIVEPOP = os.path.join(ROOT, "target/release/livepop")
LOADTEST = os.path.join(ROOT, "target/release/livepop-loadtest")
EDGE_NS, CORE_NS = "lpbench-edge", "lpbench-core"
EDGE_IP, CORE_IP = "10.201.0.1", "10.201.0.2"


def sh(*args, check=True, **kw):
    return subprocess.run(list(args), check=check, **kw)


def ns(name, *args):
    return ["ip", "netns", "exec", name, *args]


def setup_netns():
    teardown_netns()
    for n, inner, outer, ip in [(EDGE_NS, "lpb-e0", "lpb-e1", EDGE_IP), (CORE_NS, "lpb-c0", "lpb-c1", CORE_IP)]:
        sh("ip", "netns", "add", n)
        sh("ip", "link", "add", inner, "type", "veth", "peer", "name", outer)
        sh("ip", "link", "set", inner, "netns", n)
        sh("ip", "-n", n, "addr", "add", f"{ip}/24", "dev", inner)
        sh("ip", "-n", n, "link", "set", inner, "up")
        sh("ip", "-n", n, "link", "set", "lo", "up")
        sh("ip", "link", "set", outer, "up")
        sh("sysctl", "-q", "-w", f"net.ipv6.conf.{outer}.disable_ipv6=1")
        # Frames must be MTU-sized with complete checksums for the delay line to forward them.
        sh(*ns(n, "ethtool", "-K", inner, "tso", "off", "gso", "off", "gro", "off", "tx", "off", "rx", "off"), stdout=subprocess.DEVNULL)
        sh("ethtool", "-K", outer, "tso", "off", "gso", "off", "gro", "off", "tx", "off", "rx", "off", stdout=subprocess.DEVNULL)


def teardown_netns():
    for n in (EDGE_NS, CORE_NS):
        sh("ip", "netns", "del", n, check=False, stderr=subprocess.DEVNULL)
    for i in ("lpb-e1", "lpb-c1"):
        sh("ip", "link", "del", i, check=False, stderr=subprocess.DEVNULL)


def set_loss(p):
    for chain in ("INPUT", "OUTPUT"):
        sh(*ns(CORE_NS, "iptables", "-F", chain))
    if p > 0:
        sh(*ns(CORE_NS, "iptables", "-A", "INPUT", "-i", "lpb-c0", "-m", "statistic", "--mode", "random", "--probability", str(p), "-j", "DROP"))
        sh(*ns(CORE_NS, "iptables", "-A", "OUTPUT", "-o", "lpb-c0", "-m", "statistic", "--mode", "random", "--probability", str(p), "-j", "DROP"))


def curl(n, url):
    r = subprocess.run(ns(n, "curl", "-s", "--max-time", "5", url), capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else None


def wait(what, timeout, f):
    end = time.time() + timeout
    while time.time() < end:
        v = f()
        if v:
            return v
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def samples(body, prefix):
    return sum(float(l.rsplit(" ", 1)[1]) for l in body.splitlines() if l.startswith(prefix))


def hist_quantile(body, metric, label, q):
    buckets = []
    for l in body.splitlines():
        if l.startswith(metric + "_bucket{") and label in l:
            le = re.search(r'le="([^"]+)"', l).group(1)
            buckets.append((float("inf") if le == "+Inf" else float(le), float(l.rsplit(" ", 1)[1])))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0
    if total == 0:
        return float("nan")
    rank, prev_le, prev_c = q * total, 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_c) / max(c - prev_c, 1e-9)
        prev_le, prev_c = le, c
    return prev_le


def pct(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")


def start(argv, log):
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, preexec_fn=os.setsid)


def stop(p):
    if p and p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def livepop_run(d, flv, secs, sent_video, rtt):
    certs = os.path.join(d, "certs")
    core_toml = os.path.join(d, "core.toml")
    edge_toml = os.path.join(d, "edge.toml")
    with open(core_toml, "w") as f:
        f.write(f"""node_id = "core-1"
[admin]
listen = "127.0.0.1:9091"
[relay]
listen = "{CORE_IP}:4433"
cert = "{certs}/core.pem"
key = "{certs}/core.key"
client_ca = "{certs}/ca.pem"
[origin]
listen = "{CORE_IP}:8090"
[transcode]
renditions = [{{ name = "1080p", height = 1080, video_kbps = 5000 }}]
""")
    with open(edge_toml, "w") as f:
        f.write(f"""node_id = "edge-1"
[admin]
listen = "127.0.0.1:9090"
[rtmp]
listen = "127.0.0.1:1935"
[[auth.streams]]
name = "demo"
key = "demo-key"
[playback]
listen = "127.0.0.1:8080"
max_connections_per_ip = 0
[relay]
cert = "{certs}/edge.pem"
key = "{certs}/edge.key"
ca = "{certs}/ca.pem"
[[relay.cores]]
id = "core-1"
addr = "{CORE_IP}:4433"
origin = "{CORE_IP}:8090"
""")
    log = open(os.path.join(d, "livepop.log"), "a")
    procs = []
    try:
        procs.append(start(ns(CORE_NS, LIVEPOP, "core", "--config", core_toml), log))
        wait("core admin", 20, lambda: curl(CORE_NS, "http://127.0.0.1:9091/metrics"))
        procs.append(start(ns(EDGE_NS, LIVEPOP, "edge", "--config", edge_toml), log))
        wait("edge ready", 30, lambda: curl(EDGE_NS, "http://127.0.0.1:9090/readyz") is not None and
             "200" in subprocess.run(ns(EDGE_NS, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:9090/readyz"), capture_output=True, text=True).stdout)
        ff = start(ns(EDGE_NS, "ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-re", "-i", flv, "-c", "copy", "-f", "flv", "rtmp://127.0.0.1:1935/live/demo-key"), log)
        procs.append(ff)
        wait("stream at the edge", 30, lambda: "#EXTM3U" in (curl(EDGE_NS, "http://127.0.0.1:8080/live/demo/master.m3u8") or ""))
        vj = os.path.join(d, "viewers.json")
        viewers = start(ns(EDGE_NS, LOADTEST, "viewers", "--url", "http://127.0.0.1:8080/live/demo/master.m3u8", "--count", "20", "--duration", str(secs - 6), "--quiet", "--json", vj), log)
        procs.append(viewers)
        viewers.wait(secs + 60)
        ff.wait(secs + 60)
        last, stable, body = None, 0, ""
        while stable < 10:
            body = curl(CORE_NS, "http://127.0.0.1:9091/metrics") or ""
            v = samples(body, 'livepop_relay_frames_received_total{stream="demo",track="video"}')
            stable = stable + 1 if v == last else 0
            last = v
            if v >= sent_video:
                break
            time.sleep(0.5)
        edge_body = curl(EDGE_NS, "http://127.0.0.1:9090/metrics") or ""
        vr = json.load(open(vj))
        media = samples(body, 'livepop_core_parts_total{gap="no",rendition="src",stream="demo"}')
        gap = samples(body, 'livepop_core_parts_total{gap="yes",rendition="src",stream="demo"}')
        one_way = rtt / 2000.0
        return {
            "delivered": samples(body, 'livepop_relay_frames_received_total{stream="demo",track="video"}') / sent_video,
            "gap": gap / max(media + gap, 1),
            "skipped": samples(edge_body, "livepop_relay_groups_skipped_total"),
            "delay_p50": (hist_quantile(body, "livepop_relay_delay_seconds", 'track="video"', 0.5) - one_way) * 1000,
            "delay_p99": (hist_quantile(body, "livepop_relay_delay_seconds", 'track="video"', 0.99) - one_way) * 1000,
            "part_p50": (vr.get("latency") or {}).get("p50_ms", float("nan")),
            "part_p99": (vr.get("latency") or {}).get("p99_ms", float("nan")),
        }
    finally:
        for p in reversed(procs):
            stop(p)


def nginx_conf(prefix, listen, extra):
    os.makedirs(os.path.join(prefix, "logs"), exist_ok=True)
    os.makedirs(os.path.join(prefix, "rec"), exist_ok=True)
    conf = os.path.join(prefix, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""load_module /usr/lib/nginx/modules/ngx_rtmp_module.so;
daemon off; master_process off; worker_processes 1;
error_log {prefix}/logs/error.log warn; pid {prefix}/logs/nginx.pid;
events {{ worker_connections 1024; }}
rtmp {{ server {{ listen {listen}; chunk_size 4096;
  application live {{ live on; {extra} }} }} }}
""")
    return conf


def nginx_run(d, flv, secs, sent_video):
    log = open(os.path.join(d, "nginx.log"), "a")
    procs = []
    times = os.path.join(d, "times.txt")
    if os.path.exists(times):
        os.remove(times)
    try:
        # The core records what reached it (the count of delivered frames); the subscriber
        # times each frame.
        rec = os.path.join(d, "ngx-core", "rec")
        for f in os.listdir(rec) if os.path.isdir(rec) else []:
            os.remove(os.path.join(rec, f))
        core = nginx_conf(os.path.join(d, "ngx-core"), f"{CORE_IP}:1935", f"record all; record_path {rec};")
        edge = nginx_conf(os.path.join(d, "ngx-edge"), "127.0.0.1:1936", f"push rtmp://{CORE_IP}:1935/live;")
        procs.append(start(ns(CORE_NS, "/usr/sbin/nginx", "-p", os.path.join(d, "ngx-core"), "-c", core), log))
        procs.append(start(ns(EDGE_NS, "/usr/sbin/nginx", "-p", os.path.join(d, "ngx-edge"), "-c", edge), log))
        time.sleep(1)  # nginx reports no readiness; the subscriber below retries anyway
        sub = start(ns(CORE_NS, "sh", "-c",
                       f"ffmpeg -hide_banner -loglevel error -nostdin -fflags nobuffer -i rtmp://{CORE_IP}:1935/live/s "
                       f"-c copy -flush_packets 1 -f flv pipe:1 | python3 {ROOT}/bench/flvtimes.py {times}"), log)
        procs.append(sub)
        time.sleep(1)
        ff = start(ns(EDGE_NS, "ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-re", "-i", flv, "-c", "copy", "-f", "flv", "rtmp://127.0.0.1:1936/live/s"), log)
        procs.append(ff)
        ff.wait(secs + 60)
        # Let the push drain what it still holds.
        last, stable = -1, 0
        while stable < 10:
            n = sum(1 for _ in open(times)) if os.path.exists(times) else 0
            stable = stable + 1 if n == last else 0
            last = n
            time.sleep(0.5)
    finally:
        for p in reversed(procs):
            stop(p)
    rows = [tuple(map(float, l.split())) for l in open(times)] if os.path.exists(times) else []
    lat = [arr - pts for pts, arr in rows]
    base = min(lat) if lat else 0
    rel = [x - base for x in lat]
    recorded = 0
    for f in os.listdir(rec):
        recorded += video_packets(os.path.join(rec, f))
    return {"delivered": recorded / sent_video, "delay_p50": pct(rel, 0.5), "delay_p99": pct(rel, 0.99)}


def video_packets(path):
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v", "-count_packets", "-show_entries",
                          "stream=nb_read_packets", "-of", "csv=p=0", path], capture_output=True, text=True).stdout.strip()
    return int(out) if out.isdigit() else 0


def svg(results, secs):
    w, h, pad = 900, 380, 60
    pw, ph = (w - 3 * pad) / 2, h - 2 * pad - 20
    max_loss = max(r["loss"] for r in results) or 1
    max_delay = max([r[k]["delay_p99"] for r in results for k in ("livepop", "nginx") if r[k]["delay_p99"] == r[k]["delay_p99"]] + [100]) * 1.1
    colors = {20: "#1f77b4", 50: "#d62728", 150: "#2ca02c"}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{w/2}" y="20" text-anchor="middle" font-size="14">Relay on an impaired path: livepop (QUIC, solid) vs nginx-rtmp push (TCP, dashed), 4 Mbit/s, {secs} s</text>']
    for i, (title, key, top) in enumerate([("video frames delivered to the core (%)", "delivered", 100.0),
                                           ("frame delay p99 above the one-way delay (ms)", "delay_p99", max_delay)]):
        x0, y0 = pad + i * (pw + pad), pad
        out.append(f'<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
        out.append(f'<text x="{x0 + pw/2}" y="{y0 - 8}" text-anchor="middle">{title}</text>')
        out.append(f'<text x="{x0 + pw/2}" y="{y0 + ph + 32}" text-anchor="middle">random loss each way (%)</text>')
        for t in range(5):
            v = top * t / 4
            y = y0 + ph - ph * t / 4
            out.append(f'<text x="{x0 - 4}" y="{y + 4}" text-anchor="end">{v:.0f}</text><line x1="{x0}" x2="{x0 + pw}" y1="{y}" y2="{y}" stroke="#eee"/>')
        for l in sorted({r["loss"] for r in results}):
            out.append(f'<text x="{x0 + pw * l / max_loss}" y="{y0 + ph + 16}" text-anchor="middle">{l:g}</text>')
        for rtt in sorted({r["rtt"] for r in results}):
            for sysname, dash in (("livepop", ""), ("nginx", ' stroke-dasharray="6,4"')):
                pts = []
                for r in sorted((r for r in results if r["rtt"] == rtt), key=lambda r: r["loss"]):
                    v = r[sysname][key] * (100 if key == "delivered" else 1)
                    if v != v:
                        continue
                    pts.append(f"{x0 + pw * r['loss'] / max_loss:.1f},{y0 + ph - ph * min(v / top, 1):.1f}")
                c = colors.get(rtt, "#555")
                out.append(f'<polyline fill="none" stroke="{c}" stroke-width="2"{dash} points="{" ".join(pts)}"/>')
        if i == 0:
            for k, rtt in enumerate(sorted({r["rtt"] for r in results})):
                out.append(f'<text x="{x0 + 10}" y="{y0 + ph - 10 - 14 * k}" fill="{colors.get(rtt, "#555")}">RTT {rtt} ms</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    if os.geteuid() != 0:
        raise SystemExit("run as root (network namespaces, iptables)")
    secs = int(os.environ.get("SECS", "20"))
    rtts = [int(x) for x in os.environ.get("RTTS", "20,50,150").split(",")]
    losses = [float(x) for x in os.environ.get("LOSSES", "0,0.5,1,2,5").split(",")]
    d = tempfile.mkdtemp(prefix="lpbench-")
    flv = os.path.join(d, "in.flv")
    sh("ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y", "-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=30",
       "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100", "-t", str(secs), "-c:v", "libx264", "-preset", "ultrafast",
       "-g", "30", "-bf", "0", "-b:v", "4M", "-maxrate", "4M", "-bufsize", "2M", "-c:a", "aac", "-map", "0:v", "-map", "1:a", "-f", "flv", flv)
    sent_video = int(subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v", "-count_packets", "-show_entries",
                                     "stream=nb_read_packets", "-of", "csv=p=0", flv], capture_output=True, text=True, check=True).stdout.strip())
    sh(LIVEPOP, "dev-certs", os.path.join(d, "certs"), stdout=subprocess.DEVNULL)
    setup_netns()
    results = []
    delay = None
    try:
        for rtt in rtts:
            if delay:
                stop(delay)
            delay = start(["python3", os.path.join(ROOT, "bench/netdelay.py"), "lpb-e1", "lpb-c1", str(rtt / 2)], subprocess.DEVNULL)
            time.sleep(0.5)
            for loss in losses:
                set_loss(loss / 100)
                lp = livepop_run(d, flv, secs, sent_video, rtt)
                ng = nginx_run(d, flv, secs, sent_video)
                row = {"rtt": rtt, "loss": loss, "livepop": lp, "nginx": ng}
                print(json.dumps(row), flush=True)
                results.append(row)
    finally:
        stop(delay)
        teardown_netns()
    print(f"\nrelay on an impaired path (netns, iptables loss both ways, user-space delay line), one 4 Mbit/s 720p30 stream, {secs} s\n")
    print("| RTT | loss | livepop frames delivered | livepop GAP parts | livepop groups skipped | livepop frame delay p50 / p99 (ms) | livepop part latency p50 / p99 (ms) | nginx-rtmp frames delivered | nginx-rtmp frame delay p50 / p99 (ms) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        lp, ng = r["livepop"], r["nginx"]
        print(f"| {r['rtt']} ms | {r['loss']}% | {lp['delivered']*100:.1f}% | {lp['gap']*100:.1f}% | {lp['skipped']:.0f} | "
              f"{lp['delay_p50']:.0f} / {lp['delay_p99']:.0f} | {lp['part_p50']:.0f} / {lp['part_p99']:.0f} | "
              f"{ng['delivered']*100:.1f}% | {ng['delay_p50']:.0f} / {ng['delay_p99']:.0f} |")
    out = os.environ.get("JSON")
    if out:
        json.dump(results, open(out, "w"), indent=1)
    plot = os.environ.get("SVG")
    if plot:
        with open(plot, "w") as f:
            f.write(svg(results, secs))
        print(f"\nplot: {plot}")
    shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
