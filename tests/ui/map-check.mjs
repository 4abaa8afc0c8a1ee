// Loads the agent's map page and checks, on the DOM, that every peer (with the overlay this
// host reaches it by), endpoint and DNS name the test expects is shown; then waits for the
// endpoints the test adds afterwards (one JSON line each on stdin) to appear without a
// reload, and saves a screenshot.
//
// usage: node map-check.mjs URL EXPECTED.json SCREENSHOT.png
// stdout: "ready" once the first checks pass, then one JSON line per added endpoint:
//         {"address": ..., "appeared_ms": ...}
import { readFileSync } from "node:fs";
import { createInterface } from "node:readline";
import { openBrowser, fail } from "./browser.mjs";

const [url, expectedPath, screenshot] = process.argv.slice(2);
const expected = JSON.parse(readFileSync(expectedPath, "utf8"));
const browser = await openBrowser();
const page = await browser.newPage({ viewport: { width: 1400, height: 1300 } });
const errors = [];
page.on("pageerror", (e) => errors.push(String(e)));
page.on("requestfailed", (r) => errors.push("request failed: " + r.url()));
await page.goto(url);

// Everything in the DOM check runs in the page: one function, polled until it holds.
function missing(exp) {
  const out = [];
  const text = (el) => (el ? el.textContent : "");
  for (const p of exp.peers) {
    const row = document.querySelector('#peers-body tr[data-peer="' + p.name + '"]');
    if (!row) { out.push("peer " + p.nickname + " (" + p.name + ") not in the peers table"); continue; }
    if (!text(row).includes(p.nickname)) out.push("peer row of " + p.name + " lacks its nickname " + p.nickname);
    if (p.mode && row.dataset.mode !== p.mode) out.push("peer " + p.nickname + " shown as '" + row.dataset.mode + "', expected '" + p.mode + "'");
    if (p.mode_text && !text(row).includes(p.mode_text)) out.push("peer " + p.nickname + " does not say '" + p.mode_text + "'");
  }
  for (const e of exp.endpoints) {
    const rows = [...document.querySelectorAll("#endpoints-body tr")]
      .filter((r) => r.dataset.address.split(" ").includes(e.address));
    if (rows.length === 0) { out.push("endpoint " + e.address + " not in the endpoints table"); continue; }
    const t = text(rows[0]);
    if (e.host && !t.includes(e.host)) out.push("endpoint " + e.address + " not shown on host " + e.host);
    if (e.name && !t.includes(e.name)) out.push("endpoint " + e.address + " not shown with its name " + e.name);
    if (e.who && !t.includes(e.who)) out.push("endpoint " + e.address + " not shown with " + e.who);
  }
  for (const n of exp.names) {
    if (!document.querySelector('#dns-body tr[data-name="' + n + '"]')) out.push("DNS name " + n + " not in the DNS table");
  }
  return out;
}

// The page forbids eval (its Content-Security-Policy); the check is installed through the
// DevTools protocol instead, which the policy does not govern.
async function waitShown(exp, timeout) {
  await page.evaluate("window.__weftMissing = " + missing.toString());
  try {
    await page.waitForFunction((e) => document.body.dataset.renders && window.__weftMissing(e).length === 0,
      exp, { timeout, polling: 25 });
    return [];
  } catch (e) {
    if (!String(e).includes("Timeout")) console.error("waiting: " + e);
    return page.evaluate((e) => window.__weftMissing(e), exp);
  }
}

const first = await waitShown(expected, 15000);
if (first.length) {
  await page.screenshot({ path: screenshot, fullPage: true });
  fail("the map page does not show:\n  " + first.join("\n  "));
}
console.log("ready");

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  const add = JSON.parse(line);
  const started = Date.now();
  const left = await waitShown({ peers: [], endpoints: [add], names: add.name ? [add.name + "."] : [] }, add.within_ms * 5);
  const appeared = Date.now() - started;
  if (left.length) fail("the added endpoint did not appear: " + left.join("; "));
  console.log(JSON.stringify({ address: add.address, appeared_ms: appeared }));
}
await page.screenshot({ path: screenshot, fullPage: true });
const reloads = await page.evaluate(() => performance.getEntriesByType("navigation").length);
if (errors.length) fail("page errors: " + errors.join("; "));
console.log(JSON.stringify({ screenshot, navigations: reloads }));
await browser.close();
