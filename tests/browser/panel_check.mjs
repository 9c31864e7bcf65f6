// Browser check of the notebook toolkit: the example notebook served by Voila on 127.0.0.1,
// opened in headless Debian chromium through playwright-core. In the page: untick "live", move the
// first strength slider (the panel must turn "stale"), click Merge (it must turn "up to date"),
// then screenshot the panel. Usage: node panel_check.mjs URL OUT.png   (see run_browser_check.sh)
import { createRequire } from "module";
const require = createRequire(process.env.DOMERGE_BROWSER_DIR + "/");  // holds node_modules/playwright-core
const { chromium } = require("playwright-core");

const [url, out] = process.argv.slice(2);
const step = (msg) => console.log(`[browser] ${msg}`);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"],
});
let failed = false;
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 3000 } });
  page.on("pageerror", (e) => console.log(`[page error] ${e.message}`));
  step(`open ${url}`);
  await page.goto(url, { timeout: 120000 });
  // Voila executes the whole notebook before the last widgets appear; the save cell is last.
  const panel = page.locator(".domerge-panel").first();
  await panel.waitFor({ timeout: 300000 });
  await page.getByText("modules in the saved file").waitFor({ timeout: 300000 });
  step("notebook executed, panel rendered");

  const live = panel.getByText("live (re-merge on slider moves)");
  await live.click();   // live off: the slider move must only mark the result stale
  const handle = panel.locator(".noUi-handle").first();
  const box = await handle.boundingBox();
  await page.mouse.move(box.x + box.width / 2, box.y + box.height / 2);
  await page.mouse.down();
  await page.mouse.move(box.x + box.width / 2 - 60, box.y + box.height / 2, { steps: 8 });
  await page.mouse.up();
  await panel.getByText("stale: controls changed").waitFor({ timeout: 30000 });
  step("slider moved -> result marked stale");

  // the accessible name also holds the icon glyph, so match the button by its text
  await panel.locator("button.widget-button", { hasText: "Merge" }).first().click();
  await panel.getByText("up to date").waitFor({ timeout: 120000 });
  await panel.getByText(/merged 3 LoRA.*diagnostics and plots/).waitFor({ timeout: 60000 });
  step("Merge clicked -> merged, up to date");
  const nImages = await panel.locator("img").count();
  step(`plots in the panel: ${nImages}`);
  if (nImages < 2) throw new Error("expected the plots in the panel after the merge");
  // wait until every plot image is decoded, then shoot
  await page.waitForFunction(() => [...document.querySelectorAll(".domerge-panel img")]
    .every((im) => im.complete && im.naturalWidth > 0), null, { timeout: 30000 });
  await page.waitForTimeout(500);
  await panel.screenshot({ path: out });
  step(`screenshot -> ${out}`);
} catch (e) {
  failed = true;
  console.log(`[browser] FAILED: ${e.message}`);
  try { await (await browser.contexts()[0]?.pages()[0])?.screenshot({ path: out.replace(/\.png$/, "_failed.png"), fullPage: true }); } catch {}
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
