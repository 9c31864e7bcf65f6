// Opens ComfyUI's page in headless Chromium, loads a workflow, saves a screenshot and the workflow
// as the front-end serialises it (UI format). Driven by tests/comfy_support/screenshot.py.
// usage: node screenshot.cjs <url> <graph.json> <out.png> <out_workflow.json>
// <graph.json>: a UI-format workflow ("nodes": loaded as is, its positions kept, shown at 100 % zoom)
// or an API-format graph (laid out left to right, fitted into the view).
// needs playwright-core (NODE_PATH=<dir>/node_modules) and Debian's /usr/bin/chromium.
const { chromium } = require("playwright-core");
const fs = require("fs");

(async () => {
  const [url, apiPath, pngPath, wfPath] = process.argv.slice(2);
  const api = JSON.parse(fs.readFileSync(apiPath, "utf8"));
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--use-gl=swiftshader"],
  });
  const ui = Array.isArray(api.nodes);
  const vw = Number(process.env.SHOT_WIDTH || 2000), vh = Number(process.env.SHOT_HEIGHT || 1000);
  const page = await browser.newPage({ viewport: { width: vw, height: vh }, deviceScaleFactor: ui ? 1 : 1.5 });
  await page.addInitScript(() => localStorage.setItem("vueNodesBannerDismissed", "true"));
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(url, { waitUntil: "networkidle", timeout: 120000 });
  await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph, null, { timeout: 120000 });
  await page.waitForTimeout(1500);
  const result = await page.evaluate(async ([api, ui]) => {
    const app = window.app;
    if (ui) {
      await app.loadGraphData(api, true, true, "domerge_example.json");
      const missing = app.graph._nodes.filter((n) => n.has_errors || (n.constructor && n.constructor.nodeData === undefined && !["Note"].includes(n.type)));
      await new Promise((r) => setTimeout(r, 1000));
      const ds = app.canvas.ds;
      ds.scale = 1;
      ds.offset = [70, 100];
      app.canvas.setDirty(true, true);
      return { wf: app.graph.serialize(), count: app.graph._nodes.length, missing: missing.map((n) => n.type) };
    }
    await app.loadApiJson(api, "domerge_example.json");
    // lay the nodes out left to right by dependency depth
    const g = app.graph;
    const depth = {};
    const nodes = g._nodes.slice();
    const byId = Object.fromEntries(nodes.map((n) => [n.id, n]));
    const d = (n) => {
      if (depth[n.id] !== undefined) return depth[n.id];
      depth[n.id] = 0;
      let best = 0;
      for (const inp of n.inputs || []) {
        if (inp.link == null) continue;
        const link = g.links[inp.link] || (g.links.get && g.links.get(inp.link));
        if (link) best = Math.max(best, d(byId[link.origin_id]) + 1);
      }
      return (depth[n.id] = best);
    };
    nodes.forEach(d);
    const cols = {};
    for (const n of nodes) (cols[depth[n.id]] = cols[depth[n.id]] || []).push(n);
    let x = 20;
    for (const k of Object.keys(cols).map(Number).sort((a, b) => a - b)) {
      let y = 40, w = 0;
      for (const n of cols[k]) {
        n.pos = [x, y];
        y += n.size[1] + 50;
        w = Math.max(w, n.size[0]);
      }
      x += w + 40;
    }
    g.setDirtyCanvas(true, true);
    const wf = g.serialize();
    return { wf, count: nodes.length };
  }, [api, ui]);
  await page.keyboard.press("Escape");
  if (!ui) {    // fit everything into view with the front end's own command
    await page.evaluate(async () => {
      await window.app.extensionManager.command.execute("Comfy.Canvas.FitView");
    });
  }
  await page.waitForTimeout(1500);
  await page.screenshot({ path: pngPath });
  fs.writeFileSync(wfPath, JSON.stringify(result.wf, null, 2));
  console.log(JSON.stringify({ nodes: result.count, missing: result.missing || [], errors }));
  await browser.close();
})().catch((e) => { console.error(e); process.exit(1); });
