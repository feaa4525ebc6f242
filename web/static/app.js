// vramcal's page: builds `vramcal estimate` arguments from the form, runs the estimator compiled
// to WebAssembly (pkg/, made by scripts/web-build.sh) and shows its JSON answer. Every number
// shown comes from that JSON; errors are shown next to the field of the option at fault.
import init, * as first from "./pkg/vramcal_web.js";

const GIB = 2 ** 30;
const $ = (id) => document.getElementById(id);
const PASTED = "pasted/config.json";
const COLORS = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1",
  "#ff9da7", "#9c755f", "#bab0ac", "#86bcb6", "#d37295"];
let cat = null;
// The estimator's module. A panic (a bug) traps the WebAssembly instance: the page then shows
// the message and loads a fresh instance for the next estimate.
let wasm = first;
let instances = 0;

async function freshInstance() {
  const m = await import(`./pkg/vramcal_web.js?instance=${++instances}`);
  await m.default();
  m.provide_config(PASTED, $("config").value);
  wasm = m;
}

// For scripts and the page check: `vramcal.estimate(args)` is the page's estimator.
window.vramcal = { estimate: (args) => wasm.estimate(args), lastPanic: () => wasm.last_panic() };

function gib(bytes) {
  return (bytes / GIB).toFixed(2);
}

function option(select, value, text) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = text ?? value;
  select.append(o);
}

function fillForm() {
  for (const p of cat.presets) option($("model"), p.name, `${p.name} (${p.hf_id}, ${(p.params / 1e9).toFixed(2)} B params)`);
  option($("model"), "paste", "paste a config.json…");
  for (const m of cat.methods) option($("method"), m);
  for (const p of cat.precisions) option($("precision"), p);
  for (const o of cat.optimizers) option($("optimizer"), o);
  option($("gpu"), "", "none (no verdict)");
  for (const g of cat.gpus) option($("gpu"), g.name, `${g.name} (${gib(g.memory_bytes)} GiB)`);
  for (const p of cat.profiles) option($("profile"), p, {
    "torch-sdpa": "PyTorch + transformers (SDPA attention)",
    "torch-eager": "PyTorch + transformers (eager attention)",
    "candle": "vramcal's own training step",
  }[p] ?? p);
  $("model").value = "mistral-7b-v0.1";
  $("method").value = "lora";
  $("precision").value = "bf16";
  $("gpu").value = "a100-80gb";
  $("targets-hint").textContent = `targets: ${cat.targets.join(", ")}, all-linear, lm_head, embed_tokens (comma-separated)`;
  $("version").textContent = `vramcal ${cat.version}.`;
  fillCalibrations();
}

// The tables of the chosen profile; the default, as on the command line, is none.
function fillCalibrations() {
  const sel = $("calibration");
  const keep = sel.value;
  sel.replaceChildren();
  option(sel, "", "none (uncalibrated coefficients)");
  for (const c of cat.calibrations.filter((c) => c.profile === $("profile").value)) {
    option(sel, c.path, `${c.path.split("/").pop()} (fitted on ${c.device})`);
  }
  sel.value = [...sel.options].some((o) => o.value === keep) ? keep : "";
}

// The form as `vramcal estimate` arguments (without --json, which the estimator adds).
export function formArgs() {
  const a = [];
  const model = $("model").value;
  a.push("--model", model === "paste" ? PASTED : model);
  const method = $("method").value;
  a.push("--method", method);
  if (method !== "full") {
    a.push("--lora", `r=${$("lora-r").value},alpha=${$("lora-alpha").value},targets=${$("lora-targets").value}`);
  }
  a.push("--precision", $("precision").value);
  a.push("--optimizer", $("optimizer").value);
  a.push("--checkpointing", $("checkpointing").value);
  a.push("--batch", $("batch").value);
  a.push("--seq", $("seq").value);
  if ($("allow-longer").checked) a.push("--allow-longer");
  if ($("gpu").value) a.push("--gpu", $("gpu").value);
  a.push("--profile", $("profile").value);
  if ($("calibration").value) a.push("--calibration", $("calibration").value);
  a.push("--measured", ...cat.measured);
  return a;
}

function clearErrors() {
  for (const e of document.querySelectorAll(".error")) e.textContent = "";
  for (const e of document.querySelectorAll(".invalid")) e.classList.remove("invalid");
}

// The message next to the field of the option at fault (the general line otherwise); no
// answer is shown while the form is refused.
function showError(message, opt) {
  const where = [...document.querySelectorAll(".error")].find((e) => e.dataset.for === (opt ?? "")) ?? $("general-error");
  where.textContent = message;
  const field = opt === "--lora" ? $("lora-fields") : opt === "--model" && $("model").value === "paste"
    ? $("config") : [...document.querySelectorAll("[data-option]")].find((e) => e.dataset.option === opt);
  field?.classList.add("invalid");
  $("result").hidden = true;
}

function render(text) {
  const x = JSON.parse(text);
  const e = x.estimate;
  $("json").textContent = text;
  const peak = e.peak_bytes;
  const b = x.budget;
  const verdict = $("verdict");
  if (b) {
    const what = e.reserved_bytes != null
      ? ` reserved (predicted; ${gib(peak)} GiB allocated)` : " allocated (predicted; the allocator's reserve is predicted with a GPU calibration table only)";
    verdict.textContent = `${b.fits ? "Fits" : "Does not fit"} on ${b.name}: needs ${gib(b.needed_bytes)} GiB${what} of ${gib(b.bytes)} GiB`;
    verdict.className = b.fits ? "fits" : "nofit";
  } else {
    verdict.textContent = `Peak ${gib(peak)} GiB allocated (in ${e.peak_phase.replaceAll("_", " ")})`;
    verdict.className = "";
  }
  // The stacked bar: the items at the peak, on a scale that also shows the GPU's memory.
  const scale = Math.max(peak, b ? b.bytes : 0, 1);
  const bar = $("bar");
  bar.replaceChildren();
  $("legend").replaceChildren();
  e.items.forEach((it, i) => {
    const seg = document.createElement("div");
    seg.className = "seg";
    seg.style.width = `${(100 * it.bytes) / scale}%`;
    seg.style.background = COLORS[i % COLORS.length];
    seg.title = `${it.name}: ${gib(it.bytes)} GiB`;
    bar.append(seg);
    const li = document.createElement("li");
    li.innerHTML = `<span class="swatch" style="background:${COLORS[i % COLORS.length]}"></span>`;
    li.append(`${it.name} ${gib(it.bytes)} GiB`);
    $("legend").append(li);
  });
  if (b) {
    const line = document.createElement("div");
    line.className = "budget";
    line.style.left = `${(100 * b.bytes) / scale}%`;
    line.title = `${b.name}: ${gib(b.bytes)} GiB`;
    bar.append(line);
    const li = document.createElement("li");
    li.innerHTML = '<span class="swatch budget-swatch"></span>';
    li.append(`${b.name}: ${gib(b.bytes)} GiB`);
    $("legend").append(li);
  }
  bar.setAttribute("aria-label", `peak ${gib(peak)} GiB`);
  const tbody = $("items").querySelector("tbody");
  tbody.replaceChildren();
  const row = (cells, cls) => {
    const tr = document.createElement("tr");
    if (cls) tr.className = cls;
    for (const c of cells) {
      const td = document.createElement("td");
      td.textContent = c;
      tr.append(td);
    }
    tbody.append(tr);
  };
  for (const it of e.items) row([it.name, it.bytes, gib(it.bytes), it.formula]);
  row(["peak (predicted)", peak, gib(peak), `in ${e.peak_phase}`], "total");
  if (e.reserved_bytes != null) row(["peak reserved (predicted)", e.reserved_bytes, gib(e.reserved_bytes), "the caching allocator's reserve"], "total");
  const m = $("measured");
  m.replaceChildren();
  if (!x.measured.length && x.measured_search) {
    const p = document.createElement("p");
    p.className = "note";
    p.textContent = `No measured row of this configuration among the ${x.measured_search.files} committed results files.`;
    m.append(p);
  }
  for (const r of x.measured) {
    const p = document.createElement("p");
    p.className = "measured";
    const off = r.relative_error != null
      ? `; the estimate, ${gib(r.predicted_bytes)} GiB ${r.counter}, is ${(100 * Math.abs(r.relative_error)).toFixed(1)} % ${r.relative_error >= 0 ? "over" : "under"} it`
      : " (on another kind of device than the estimate's: not compared)";
    p.textContent = `Measured ${gib(r.peak_bytes)} GiB ${r.counter} on ${r.device} (${r.id})${off}`;
    m.append(p);
  }
  // As `vramcal estimate` prints them: the changes that make it fit, least memory saved first.
  const f = $("fixes");
  f.replaceChildren();
  if (b && !b.fits) {
    const need = (a) => a.reserved_bytes ?? a.peak_bytes;
    const fit = x.alternatives.filter((a) => need(a) <= b.bytes).sort((p, q) => need(q) - need(p));
    const h = document.createElement("h3");
    h.textContent = fit.length
      ? "Changes that make it fit (least memory saved first; GiB needed)"
      : "No single change makes it fit (each tried alone and with checkpointing)";
    const ul = document.createElement("ul");
    for (const a of fit) {
      const li = document.createElement("li");
      li.textContent = `${a.change}: ${gib(need(a))} GiB`;
      ul.append(li);
    }
    f.append(h, ul);
  }
}

// An argument as a POSIX shell reads it back.
function shellQuote(s) {
  return /^[A-Za-z0-9_.,=:\/+-]+$/.test(s) ? s : `'${s.replaceAll("'", "'\\''")}'`;
}

function update() {
  clearErrors();
  const args = formArgs();
  $("command-note").textContent = $("model").value === "paste" ? " (with your config.json saved as pasted/config.json)" : "";
  $("command").textContent = `vramcal estimate ${args.map(shellQuote).join(" ")} --json`;
  let out;
  try {
    out = JSON.parse(wasm.estimate(args));
  } catch (err) {
    const why = wasm.last_panic?.() ?? String(err);
    showError(`internal error in the estimator (a bug: please report it with the command line below): ${why}`, null);
    freshInstance().catch((e) => { $("general-error").textContent += ` (and it could not restart: ${e})`; });
    return;
  }
  if (out.error !== undefined) {
    showError(out.error, out.option);
    return;
  }
  $("result").hidden = false;
  render(out.json);
}

async function main() {
  await init();
  cat = JSON.parse(wasm.catalog());
  fillForm();
  // Listeners on the fields run before the form's (the event bubbles to it): the calibration
  // list follows the profile, and the paste box and LoRA fields show, before the estimate.
  for (const ev of ["input", "change"]) {
    $("profile").addEventListener(ev, fillCalibrations);
    $("model").addEventListener(ev, () => { $("paste").hidden = $("model").value !== "paste"; });
    $("method").addEventListener(ev, () => { $("lora-fields").hidden = $("method").value === "full"; });
  }
  $("config").addEventListener("input", () => wasm.provide_config(PASTED, $("config").value));
  let picks = 0;
  $("config-file").addEventListener("change", async (ev) => {
    ev.stopPropagation();
    const file = ev.target.files[0];
    if (!file) return;
    const pick = ++picks;
    const text = await file.text();
    if (pick !== picks) return; // a later choice is being read
    $("config").value = text;
    wasm.provide_config(PASTED, text);
    update();
  });
  wasm.provide_config(PASTED, "");
  $("form").addEventListener("input", update);
  $("form").addEventListener("change", update);
  const t1 = performance.now();
  update();
  // Milliseconds from navigation start to the first estimate shown, and of that estimate
  // alone (read by web/tests/check_page.py).
  document.body.dataset.firstEstimateMs = performance.now().toFixed(1);
  document.body.dataset.estimateMs = (performance.now() - t1).toFixed(1);
  document.body.dataset.ready = "1";
}

main().catch((err) => {
  $("general-error").textContent = `The page could not start the estimator: ${err}`;
});
