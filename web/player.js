// livepop's player page: lists the live streams (/live/streams.json), plays one with hls.js in
// low-latency mode (automatic ABR and a quality menu) and shows latency, buffer, rendition and
// stalls. window.livepopStats carries the same figures for the browser test and the benchmark.
'use strict';

const $ = (id) => document.getElementById(id);
const video = $('video');
const stats = {
  stream: null,
  playing: false,
  currentTime: 0,
  latency: null, // seconds: now minus PROGRAM-DATE-TIME of the frame on screen
  buffer: 0,
  level: -1,
  levels: [],
  // { start, duration, cause } in seconds of page time; duration null while stalled. Kept across
  // the page's own reloads of the stream (see reload()): a viewer sees those stalls too.
  stalls: [],
  playingSince: null, // page time (s) playback first began
  // Every time the page had to rescue playback: { t, kind: 'jump' (watchdog), 'media'
  // (hls.recoverMediaError) or 'reload' (new hls.js instance), … }. For the page's whole life.
  recoveries: [],
  // Every error: { t, source: 'hls.js' (fatal or not, with its type and details), 'play' (a
  // rejected video.play()) or 'video' (the media element's own), … }. For the page's whole life.
  errors: [],
  // The last events (part/segment loads, level switches, errors, stalls), for diagnosing a stall.
  events: [],
};
window.livepopStats = stats;
let hls = null;
let stallStart = null;
// From a reload until the video plays again: the watchdog leaves the new instance's start alone.
let reloading = false;

// Seconds buffered ahead of the playhead.
function ahead() {
  const b = video.buffered;
  return b.length ? Math.max(0, b.end(b.length - 1) - video.currentTime) : 0;
}

// Seconds rounded to the millisecond, for the event log.
const secs = (x) => Number(x.toFixed(3));

// A TimeRanges object as [[start, end], …] in ms-rounded seconds.
function ranges(tr) {
  return tr ? Array.from({ length: tr.length }, (_, i) => [secs(tr.start(i)), secs(tr.end(i))]) : null;
}

// Page time in seconds, the clock of every record in stats.
const now = () => performance.now() / 1000;

function note(what, detail) {
  stats.events.push({ t: secs(now()), what, ...detail });
  if (stats.events.length > 2000) stats.events.splice(0, 500);
}

function recordError(source, detail) {
  const e = { t: secs(now()), source, ...detail };
  stats.errors.push(e);
  note('error', e);
}

function recordRecovery(kind, detail) {
  const r = { t: secs(now()), kind, ...detail };
  stats.recoveries.push(r);
  note('recovery', r);
}

// The picture stops: a stall begins unless one is already under way.
function stallBegins(cause) {
  if (!stats.playing || stallStart !== null) return;
  stallStart = performance.now();
  stats.stalls.push({ start: stallStart / 1000, duration: null, cause });
  note('waiting', { cause, currentTime: video.currentTime, ranges: ranges(video.buffered) });
}

function message(text) {
  $('message').hidden = !text;
  $('message').textContent = text || '';
}

// A signed playback URL (`/t/<token>/live/<name>/master.m3u8`, from `livepop sign-url`) given as
// `?url=`: played as is; the player resolves every other object under the same token.
function signedUrl() {
  const given = new URLSearchParams(location.search).get('url');
  if (!given) return null;
  const u = new URL(given, location.href);
  const m = u.pathname.match(/^\/t\/[^/]+\/live\/([^/]+)\/master\.m3u8$/);
  return m && u.origin === location.origin ? { name: decodeURIComponent(m[1]), url: u.pathname } : null;
}

function play(name, signed) {
  if (stats.stream === name) return;
  // Another stream: its figures start afresh (errors and recoveries are the page's).
  Object.assign(stats, { stream: name, playing: false, level: -1, levels: [], stalls: [], playingSince: null });
  stallStart = null;
  reloading = false;
  const url = signed || `/live/${encodeURIComponent(name)}/master.m3u8`;
  $('url').textContent = url;
  history.replaceState(null, '', signed ? `?url=${encodeURIComponent(signed)}` : `?stream=${encodeURIComponent(name)}`);
  markCurrent();
  start(url);
}

// After a fatal network error: a new hls.js instance on the same stream. The stream's figures
// (stalls, playingSince) carry on, and the picture counts as stalled from here until the video
// plays again, so what a viewer lived through stays in the record.
function reload(url, details) {
  recordRecovery('reload', { details });
  stallBegins('reload');
  reloading = true;
  start(url);
}

// Plays url with a new hls.js instance (in place of the current one).
function start(url) {
  if (hls) hls.destroy();
  hls = null;
  if (typeof Hls === 'undefined') {
    message('hls.js is not installed on this edge: run `npm ci --prefix web` and rebuild livepop.');
    return;
  }
  if (!Hls.isSupported()) {
    message('This browser has no Media Source Extensions; open the playlist URL in Safari or ffplay.');
    return;
  }
  message('');
  // Start from a broadband-like bandwidth estimate (hls.js assumes 0.5 Mbit/s): an up-switch
  // seconds into low-latency playback can leave a hole in the buffer and stall.
  hls = new Hls({ lowLatencyMode: true, backBufferLength: 30, abrEwmaDefaultEstimate: 5e6 });
  // Catch up (at up to 1.25× speed) to the target latency the playlist asks for (PART-HOLD-BACK)
  // after a slow start or a stall, as LL-HLS players should; but not in the first seconds,
  // when faster playback would drain the small start-up buffer into a stall.
  const catchUp = hls;
  video.addEventListener('playing', () => setTimeout(() => {
    if (hls === catchUp) hls.config.maxLiveSyncPlaybackRate = 1.25;
  }, 4000), { once: true });
  hls.on(Hls.Events.MANIFEST_PARSED, (_e, data) => {
    stats.levels = data.levels.map((l) => ({ height: l.height, width: l.width, bitrate: l.bitrate, name: l.name || `${l.height}p` }));
    const q = $('quality');
    q.replaceChildren(new Option('Auto', '-1'));
    data.levels.forEach((l, i) => q.add(new Option(`${l.height}p (${Math.round(l.bitrate / 1000)} kbit/s)`, String(i))));
    video.play().catch((e) => recordError('play', { details: e.name, message: e.message }));
  });
  hls.on(Hls.Events.LEVEL_SWITCHED, (_e, data) => { stats.level = data.level; note('level', { level: data.level }); });
  hls.on(Hls.Events.FRAG_BUFFERED, (_e, { frag, part, stats: s }) => {
    const ms = (x) => Math.round(x - s.loading.start);
    note(part ? 'part' : 'segment', {
      level: frag.level, sn: frag.sn, part: part ? part.index : null, start: secs((part || frag).start),
      ttfb_ms: ms(s.loading.first), load_ms: ms(s.loading.end), buffered_ms: ms(s.buffering.end),
      buffer: secs(ahead()),
    });
  });
  hls.on(Hls.Events.FRAG_LOADING, (_e, { frag, part }) => {
    note('load', { level: frag.level, sn: frag.sn, part: part ? part.index : null, ct: secs(video.currentTime) });
  });
  hls.on(Hls.Events.LEVEL_UPDATED, (_e, { details: d }) => {
    const last = d.fragments[d.fragments.length - 1];
    note('playlist', { end_sn: last && last.sn, parts: d.partList ? d.partList.length : 0, edge: secs(d.edge), delta: !!d.deltaUpdateFailed, age: secs(d.age) });
  });
  hls.on(Hls.Events.BUFFER_APPENDED, (_e, { type, timeRanges }) => {
    note('appended', { type, ranges: ranges(timeRanges && timeRanges[type]) });
  });
  const mine = hls;
  hls.on(Hls.Events.ERROR, (_e, data) => {
    const frag = data.part || data.frag;
    recordError('hls.js', {
      type: data.type, details: data.details, fatal: !!data.fatal,
      message: data.error ? data.error.message : data.reason,
      code: data.response ? data.response.code : undefined,
      frag: frag ? { level: frag.level, sn: frag.sn, part: data.part ? data.part.index : null } : undefined,
    });
    if (!data.fatal) return;
    if (data.response && data.response.code === 403) {
      // A signed stream without a valid token: retrying cannot help.
      message('This stream needs a valid signed URL (livepop sign-url); open it as ?url=<signed URL>.');
      return;
    }
    if (data.type === Hls.ErrorTypes.MEDIA_ERROR) {
      recordRecovery('media', { details: data.details });
      mine.recoverMediaError();
    } else {
      // Unless another stream or reload has replaced this instance meanwhile.
      setTimeout(() => { if (hls === mine) reload(url, data.details); }, 2000);
    }
  });
  hls.loadSource(url);
  hls.attachMedia(video);
}

$('quality').addEventListener('change', (e) => {
  if (hls) hls.currentLevel = Number(e.target.value); // -1 is automatic
});

// A stall: the video waits for data after it has started playing.
video.addEventListener('waiting', () => stallBegins('waiting'));
video.addEventListener('playing', () => {
  if (!stats.playing) stats.playingSince = now();
  stats.playing = true;
  reloading = false;
  if (stallStart !== null) {
    stats.stalls[stats.stalls.length - 1].duration = (performance.now() - stallStart) / 1000;
    stallStart = null;
    note('playing', { currentTime: video.currentTime });
  }
});
// The media element's own errors (decode, unsupported media): hls.js may not see them all.
video.addEventListener('error', () => {
  const e = video.error;
  if (e) recordError('video', { details: e.code, message: e.message });
});

function update() {
  // Watchdog: hls.js sometimes stops loading after skipping a buffer hole (seen at start-up);
  // a stall longer than 1 s jumps to the live edge, which restarts loading there.
  if (stallStart !== null && hls && !reloading && performance.now() - stallStart > 1000 && !update.jumped) {
    const edge = hls.liveSyncPosition;
    if (edge && edge > video.currentTime) {
      update.jumped = true;
      const stalled = secs(now() - stallStart / 1000);
      recordRecovery('jump', { from: secs(video.currentTime), to: secs(edge), stalled_s: stalled });
      video.currentTime = edge;
    }
  }
  if (stallStart === null) update.jumped = false;
  stats.currentTime = video.currentTime;
  stats.buffer = ahead();
  const date = hls && hls.playingDate;
  stats.latency = date && stats.playing ? (Date.now() - date.getTime()) / 1000 : null;
  $('latency').textContent = stats.latency === null ? '–' : `${stats.latency.toFixed(2)} s`;
  $('buffer').textContent = `${stats.buffer.toFixed(2)} s`;
  const l = stats.levels[stats.level];
  const auto = hls && hls.autoLevelEnabled ? ' (auto)' : '';
  $('rendition').textContent = l ? `${l.height}p${auto}` : '–';
  $('stalls').textContent = String(stats.stalls.length);
}
setInterval(update, 250);

function markCurrent() {
  for (const li of $('streams').querySelectorAll('li[data-name]')) {
    li.classList.toggle('current', li.dataset.name === stats.stream);
  }
}

async function refreshStreams() {
  let list = [];
  try {
    const r = await fetch('/live/streams.json', { cache: 'no-store' });
    list = (await r.json()).streams.filter((s) => s.live);
  } catch (e) {
    return;
  }
  const ul = $('streams');
  ul.replaceChildren();
  if (!list.length) {
    const li = document.createElement('li');
    li.className = 'empty';
    li.textContent = 'none yet';
    ul.append(li);
  }
  for (const s of list) {
    const li = document.createElement('li');
    li.dataset.name = s.name;
    const a = document.createElement('a');
    a.href = `?stream=${encodeURIComponent(s.name)}`;
    a.textContent = s.name;
    a.addEventListener('click', (e) => { e.preventDefault(); play(s.name); });
    const info = document.createElement('span');
    info.className = 'note';
    info.textContent = ` ${s.renditions.length} rendition${s.renditions.length === 1 ? '' : 's'}`;
    li.append(a, info);
    ul.append(li);
  }
  markCurrent();
  // Start on the stream named in the URL, else the first live one.
  if (!stats.stream) {
    const signed = signedUrl();
    if (signed) return play(signed.name, signed.url);
    const wanted = new URLSearchParams(location.search).get('stream');
    const pick = list.find((s) => s.name === wanted) || (wanted ? null : list[0]);
    if (pick) play(pick.name);
  }
}
refreshStreams();
setInterval(refreshStreams, 2000);
