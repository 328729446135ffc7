// Plays livepop's player page in headless Chromium (Debian's /usr/bin/chromium, driven by
// playwright-core) and prints what happened as one JSON object on stdout:
//   node web/e2e/play.mjs URL SECONDS SCREENSHOT.png
// Used by tests/browser.rs (assertions live there) and bench/latency.sh. Samples the page's
// window.livepopStats every 250 ms once the video plays, then takes its whole record (stalls,
// errors, recoveries, events); console errors and uncaught exceptions from page load on.
import { chromium } from 'playwright-core';

const [url, seconds = '20', screenshot = ''] = process.argv.slice(2);
if (!url) {
  console.error('usage: node play.mjs URL [SECONDS] [SCREENSHOT.png]');
  process.exit(2);
}
const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
const browser = await chromium.launch({
  executablePath,
  // No sandbox (tests run as root in CI), no network beyond the page's own (closed network).
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
    '--autoplay-policy=no-user-gesture-required',
  ],
});
const out = { url, startup_s: null, samples: [], stalls: [], levels: [], errors: [], recoveries: [], console: [] };
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const t0 = Date.now();
  // Seconds since the page was opened (the samples' clock); url: what a failed load was for.
  const since = () => (Date.now() - t0) / 1000;
  page.on('console', (m) => {
    if (m.type() === 'error') out.console.push({ t: since(), text: m.text(), url: m.location().url });
  });
  page.on('pageerror', (e) => out.console.push({ t: since(), text: String(e) }));
  await page.goto(url);
  // Start-up: until the video plays (bounded).
  await page.waitForFunction(() => window.livepopStats && window.livepopStats.playing, null, { timeout: 30000, polling: 100 });
  out.startup_s = (Date.now() - t0) / 1000;
  const end = Date.now() + Number(seconds) * 1000;
  while (Date.now() < end) {
    const s = await page.evaluate(() => {
      const s = window.livepopStats;
      return { currentTime: s.currentTime, latency: s.latency, buffer: s.buffer, level: s.level };
    });
    out.samples.push({ t: (Date.now() - t0) / 1000, ...s });
    await page.waitForTimeout(250);
  }
  // A stall still going on at the end counts with its length so far.
  const final = await page.evaluate(() => {
    const s = window.livepopStats;
    const now = performance.now() / 1000;
    return { ...s, stalls: s.stalls.map((x) => ({ ...x, duration: x.duration ?? now - x.start })) };
  });
  out.stalls = final.stalls;
  out.playing_since = final.playingSince;
  out.recoveries = final.recoveries;
  out.levels = final.levels;
  out.errors = final.errors;
  out.events = final.events;
  if (screenshot) await page.screenshot({ path: screenshot });
} catch (e) {
  out.failure = String(e);
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
