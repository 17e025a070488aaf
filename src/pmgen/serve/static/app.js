// pmgen serve page: plain JavaScript, no build step, no network beyond this server.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { user: null, generation: null, target: null, record: null, feedback: {} };
const SIGNAL_LABEL = { like: "♥ liked", dislike: "✗ disliked", pick: "✓ picked" };

// ---------------------------------------------------------------- α re-selection (same as pmgen.select)
// z = α·log d_p + (1 − α)·log d_t; chosen = argmax z, ties (to 1e-9) → the smaller weight (candidates are
// ordered by weight, so the first index wins).
function zScore(c, alpha) { return alpha * Math.log(c.d_p) + (1 - alpha) * Math.log(c.d_t); }
function choose(candidates, alpha) {
  let best = 0, bestZ = -Infinity;
  candidates.forEach((c, i) => {
    const z = Math.round(zScore(c, alpha) * 1e9) / 1e9;
    if (z > bestZ) { bestZ = z; best = i; }
  });
  return best;
}
window.pmgenChoose = choose;

// ---------------------------------------------------------------- HTTP
function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const token = localStorage.getItem("pmgen.token");
  if (token) h["Authorization"] = "Bearer " + token;
  return h;
}
async function api(method, url, body) {
  const sent = localStorage.getItem("pmgen.token");
  let resp = await fetch(url, { method, headers: headers(body !== undefined),
                                body: body !== undefined ? JSON.stringify(body) : undefined });
  if (resp.status === 401) { // a token given meanwhile (another request asked) is tried before asking again
    const now = localStorage.getItem("pmgen.token");
    const token = now !== sent ? now : prompt("This server needs its API token:");
    if (token) { localStorage.setItem("pmgen.token", token); return api(method, url, body); }
  }
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    const probs = (data.problems || []).map((p) => `${p.field || "request"}: ${p.message}`).join("\n");
    const err = new Error(`${resp.status} ${data.detail || resp.statusText}${probs ? "\n" + probs : ""}`);
    err.status = resp.status; err.retryAfter = resp.headers.get("Retry-After");
    throw err;
  }
  return data;
}
function showError(e) { const el = $("#error"); el.hidden = !e; el.textContent = e ? String(e.message || e) : ""; }
// Images are API reads too: with a token they are fetched with it and shown from a blob URL.
function setImage(img, url) {
  const auth = headers(false);
  if (!url || !auth.Authorization) { img.src = url; return; }
  fetch(url, { headers: auth }).then((r) => (r.ok ? r.blob() : null)).then((b) => {
    if (!b) return;
    img.addEventListener("load", () => URL.revokeObjectURL(img.src), { once: true });
    img.src = URL.createObjectURL(b);
  }).catch(() => {});
}
function el(tag, attrs = {}, ...children) {
  const n = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") n.className = v; else if (k.startsWith("on")) n.addEventListener(k.slice(2), v);
    else if (tag === "img" && k === "src") setImage(n, v);
    else n.setAttribute(k, v);
  }
  for (const c of children) n.append(c);
  return n;
}
function debounce(fn, ms) { let t; return (...a) => { clearTimeout(t); t = setTimeout(() => fn(...a), ms); }; }

// ---------------------------------------------------------------- users
async function loadUsers() {
  const { users } = await api("GET", "/v1/users");
  const sel = $("#user-select");
  sel.replaceChildren(el("option", { value: "" }, "— stored users —"),
    ...users.map((u) => el("option", { value: u.user_id }, `${u.user_id} (${u.n_events} events)`)));
  if (state.user) sel.value = state.user;
}
async function useUser(id) {
  state.user = id; localStorage.setItem("pmgen.user", id);
  $("#user-summary").textContent = `User ${id}`;
  await refreshProfile();
}
async function refreshProfile() {
  if (!state.user) return;
  let p;
  try { p = await api("GET", `/v1/users/${encodeURIComponent(state.user)}`); }
  catch (e) {
    if (e.status === 404) { $("#user-summary").textContent = `User ${state.user} (new: add events)`; renderProfile(null); return; }
    throw e;
  }
  renderProfile(p);
}
function renderProfile(p) {
  $("#n-events").textContent = p ? `(${p.n_events} events)` : "";
  const strip = $("#history");
  strip.replaceChildren(...(p ? p.events.slice().reverse() : []).map((e) => e.item_id
    ? el("img", { src: `/v1/items/${encodeURIComponent(e.item_id)}/image`, title: `${e.type} ${e.item_id}`, alt: e.item_id })
    : el("span", { class: "ev-text", title: e.text || "" }, `${e.type}: ${e.text || e.value || ""}`)));
  const kws = p && p.preference_keywords ? p.preference_keywords : [];
  $("#keywords").replaceChildren(...kws.map((k) => el("span", { class: "chip" }, k)));
  if (p) {
    const fb = p.feedback.length;
    $("#user-summary").textContent = `User ${p.user_id}: ${p.n_events} events, α ${p.alpha.value.toFixed(2)} `
      + `(${p.alpha.source}), ${fb} feedback signal${fb === 1 ? "" : "s"}`;
  }
}
async function addEvents(events) {
  if (!state.user) { showError("Choose or create a user first."); return; }
  showError(null);
  try {
    await api("POST", `/v1/users/${encodeURIComponent(state.user)}/events`, { events });
    await refreshProfile(); await loadUsers();
  } catch (e) { showError(e); }
}

// ---------------------------------------------------------------- catalog
function itemButton(item, onclick) {
  return el("button", { class: "item", title: item.title, "data-id": item.id, onclick },
    el("img", { src: item.image || "", alt: item.title, loading: "lazy" }), el("span", {}, item.title));
}
async function search(q, into, onpick) {
  const { items } = await api("GET", `/v1/items?q=${encodeURIComponent(q)}&limit=30`);
  into.replaceChildren(...items.map((it) => itemButton(it, () => onpick(it))));
}
function setTarget(item, message) {
  state.target = { item, message: message || null };
  localStorage.setItem("pmgen.target", JSON.stringify(state.target));
  $("#target-current").className = "target";
  $("#target-current").replaceChildren(el("img", { src: item.image || "", alt: item.title }),
    el("div", {}, el("b", {}, item.title), el("div", { class: "muted" },
      message ? `from the message “${message}” (used as the conversation)` : `catalog item ${item.id}`)));
}

// ---------------------------------------------------------------- generations
function renderResult(g) {
  state.generation = g.id; localStorage.setItem("pmgen.generation", g.id);
  state.record = g.record;
  state.feedback = {};
  for (const f of g.feedback || []) state.feedback[f.candidate] = f.signal; // the newest signal per candidate
  const r = g.record;
  $("#alpha-row").hidden = false;
  $("#result-meta").replaceChildren(
    el("div", {}, `Generation ${g.id} for ${g.user_id}: target “${r.target_title}”, ${r.candidates.length} candidates, `
      + `server chose w = ${r.candidates[r.chosen].weight} at α = ${Number(r.alpha).toFixed(2)}`),
    el("div", { class: "chips" }, ...r.preference_keywords.map((k) => el("span", { class: "chip" }, k)),
      ...r.target_keywords.map((k) => el("span", { class: "chip t" }, k))));
  $("#alpha").value = r.alpha; $("#alpha-value").textContent = Number(r.alpha).toFixed(2);
  $("#candidates").replaceChildren(...r.candidates.map((c, i) => el("div", { class: "cand", "data-index": i, "data-weight": c.weight },
    el("img", { src: g.images.candidates[i], alt: `candidate w=${c.weight}` }),
    el("div", {}, el("span", { class: "w" }, `w = ${c.weight}`), el("span", { class: "badge" }, "chosen")),
    el("table", {}, el("tr", {}, el("td", {}, "d_t"), el("td", { class: "n" }, c.d_t.toFixed(4))),
      el("tr", {}, el("td", {}, "d_p"), el("td", { class: "n" }, c.d_p.toFixed(4))),
      el("tr", {}, el("td", {}, "z(α)"), el("td", { class: "n z" }, ""))),
    el("div", { class: "fbs" }, ...["like", "dislike", "pick"].map((s) =>
      el("button", { class: "fb", "data-signal": s, onclick: () => sendFeedback(i, s) }, s))),
    el("div", { class: "fb-state" }, ""))));
  applyAlpha(); renderFeedback();
}
function applyAlpha() {
  if (!state.record) return;
  const alpha = Number($("#alpha").value);
  $("#alpha-value").textContent = alpha.toFixed(2);
  const cands = state.record.candidates;
  const chosen = choose(cands, alpha);
  document.querySelectorAll(".cand").forEach((n, i) => {
    n.classList.toggle("chosen", i === chosen);
    n.querySelector(".z").textContent = zScore(cands[i], alpha).toFixed(4);
  });
}
function renderFeedback() {
  document.querySelectorAll(".cand").forEach((n, i) => {
    const s = state.feedback[i];
    n.querySelector(".fb-state").textContent = s ? SIGNAL_LABEL[s] : "";
    n.querySelectorAll(".fb").forEach((b) => b.classList.toggle("active", b.dataset.signal === s));
  });
}
async function sendFeedback(candidate, signal) {
  try {
    await api("POST", `/v1/generations/${state.generation}/feedback`, { candidate, signal });
    state.feedback[candidate] = signal; renderFeedback(); await refreshProfile();
  } catch (e) { showError(e); }
}
async function generate() {
  showError(null);
  if (!state.user) { showError("Choose or create a user first."); return; }
  if (!state.target) { showError("Choose a target (search, or a chat message)."); return; }
  const weights = $("#weights").value.split(",").map((s) => s.trim()).filter(Boolean).map(Number);
  const body = { user_id: state.user, target_id: state.target.item.id, weights, seed: Number($("#seed").value || 0) };
  if (state.target.message) body.message = state.target.message;
  const btn = $("#generate"); btn.disabled = true;
  $("#progress").hidden = false; const t0 = performance.now();
  const status = (s) => { $("#status").textContent = `${s} · ${((performance.now() - t0) / 1000).toFixed(1)} s`; };
  try {
    let accepted;
    for (;;) {
      try { accepted = await api("POST", "/v1/generations", body); break; }
      catch (e) {
        if (e.status !== 503) throw e;
        status(`server busy, retrying in ${e.retryAfter || 2} s`);
        await new Promise((r) => setTimeout(r, 1000 * Number(e.retryAfter || 2)));
      }
    }
    status("queued");
    let g;
    for (;;) {
      g = await api("GET", `/v1/generations/${accepted.id}?wait=5`);
      if (g.status === "done" || g.status === "failed") break;
      status(g.status === "queued" ? `queued (${g.queue_depth ?? 0} waiting)` : "generating");
    }
    if (g.status === "failed") throw new Error(`generation failed: ${g.error}`);
    status("done");
    renderResult(g); await refreshProfile();
  } catch (e) { showError(e); }
  finally { btn.disabled = false; setTimeout(() => { $("#progress").hidden = true; }, 800); }
}

// ---------------------------------------------------------------- wiring
async function main() {
  $("#use-user").onclick = () => { const id = $("#user-id").value.trim(); if (id) useUser(id).catch(showError); };
  $("#user-select").onchange = (e) => { if (e.target.value) useUser(e.target.value).catch(showError); };
  $("#say").onclick = () => {
    const text = $("#chat-line").value.trim();
    if (text) addEvents([{ type: "conversation", speaker: "user", text }]).then(() => { $("#chat-line").value = ""; });
  };
  $("#event-search").oninput = debounce((e) => search(e.target.value, $("#event-results"),
    (it) => addEvents([{ type: "social", item_id: it.id, value: "send" }])).catch(showError), 200);
  $("#target-search").oninput = debounce((e) => search(e.target.value, $("#target-results"),
    (it) => setTarget(it)).catch(showError), 200);
  $("#target-from-message").onclick = async () => {
    const msg = $("#target-message").value.trim();
    if (!msg) return;
    try { setTarget(await api("GET", `/v1/items/from-message?message=${encodeURIComponent(msg)}`), msg); showError(null); }
    catch (e) { showError(e); }
  };
  $("#generate").onclick = generate;
  $("#alpha").addEventListener("input", applyAlpha);

  search("", $("#event-results"), (it) => addEvents([{ type: "social", item_id: it.id, value: "send" }])).catch(showError);
  search("", $("#target-results"), (it) => setTarget(it)).catch(showError);
  const poll = async () => {
    const r = await fetch("/readyz", { headers: headers(false) }).catch(() => null);
    const ok = r && r.ok;
    $("#ready").textContent = ok ? "models ready" : "loading models…";
    $("#ready").className = "pill " + (ok ? "ok" : "wait");
    if (!ok) setTimeout(poll, 2000);
  };
  poll();
  await loadUsers().catch(showError);
  // restore the last session: user, target, generation (with its feedback)
  const user = localStorage.getItem("pmgen.user");
  if (user) { $("#user-select").value = user; await useUser(user).catch(showError); }
  const target = localStorage.getItem("pmgen.target");
  if (target) { try { const t = JSON.parse(target); setTarget(t.item, t.message); } catch (e) { /* ignore */ } }
  const gen = localStorage.getItem("pmgen.generation");
  if (gen) {
    try { const g = await api("GET", `/v1/generations/${gen}`); if (g.status === "done") renderResult(g); }
    catch (e) { /* an old id from another store */ }
  }
  document.body.dataset.ready = "1";
}
main();
