// Measures, in the browser, how long the map page takes to show a large mesh: from the start
// of navigation to the end of its first full render (performance.now() at that moment), over
// several loads; then how long a search takes to redraw. Checks the counts it shows.
//
// usage: node map-load.mjs URL LOADS PEERS ENDPOINTS [SCREENSHOT.png]
// stdout: one JSON object {"loads_ms": [...], "search_ms": ..., "status_bytes": ...}
import { openBrowser, fail } from "./browser.mjs";

const [url, loadsArg, peersArg, endpointsArg, screenshot] = process.argv.slice(2);
const loads = Number(loadsArg || 5), peers = Number(peersArg), endpoints = Number(endpointsArg);
const browser = await openBrowser();
const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
const errors = [];
page.on("pageerror", (e) => errors.push(String(e)));
let statusBytes = 0;
page.on("response", async (r) => {
  if (r.url().endsWith("/status")) statusBytes = (await r.body()).length;
});
const loadsMs = [];
for (let i = 0; i < loads; i++) {
  await page.goto(url, { waitUntil: "commit" });
  await page.waitForFunction(() => window.weftMap && window.weftMap.firstRenderMs !== null, null, { timeout: 60000, polling: 10 });
  loadsMs.push(await page.evaluate(() => window.weftMap.firstRenderMs));
}
const fmt = (n) => n.toLocaleString("en");
const peersNote = await page.textContent("#peers-note");
const endpointsNote = await page.textContent("#endpoints-note");
if (!peersNote.startsWith(fmt(peers) + " in the mesh")) fail("peers: " + peersNote);
if (!endpointsNote.startsWith(fmt(endpoints) + " on")) fail("endpoints: " + endpointsNote);
// A search redraws every table: time it from the keystroke to the render.
const before = await page.evaluate(() => window.weftMap.renders);
const typed = await page.evaluate(() => performance.now());
await page.fill("#search", "p777");
await page.waitForFunction((n) => window.weftMap.renders > n, before, { timeout: 10000, polling: 5 });
const searchMs = (await page.evaluate(() => window.weftMap.lastRenderMs)) - typed;
const found = await page.$$eval("#peers-body tr", (rows) => rows.map((r) => r.dataset.nickname));
if (peers > 777 && !found.includes("p777")) fail("search for p777 found " + found.slice(0, 5).join(","));
if (screenshot) await page.screenshot({ path: screenshot });
if (errors.length) fail("page errors: " + errors.join("; "));
console.log(JSON.stringify({ loads_ms: loadsMs, search_ms: searchMs, search_debounce_ms: 120, status_bytes: statusBytes }));
await browser.close();
