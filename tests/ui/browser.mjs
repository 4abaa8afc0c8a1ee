// Starts Debian's chromium headless through playwright-core (no browser download: the
// executable is the system's). Shared by the map page's test and benchmark.
import { chromium } from "playwright-core";

export async function openBrowser() {
  const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
  // --no-sandbox: the tests run as root inside network namespaces, where chromium's own
  // sandbox cannot start.
  return chromium.launch({ executablePath, args: ["--no-sandbox", "--disable-gpu"] });
}

export function fail(message) {
  console.error("FAIL: " + message);
  process.exit(1);
}
