// LabVM monitor pages: fetch the JSON API, render tables, draw uPlot charts.
"use strict";
(function () {
  const body = document.body;
  const prefix = body.dataset.prefix;
  const page = body.dataset.page;
  const interval = Math.max(2, Number(body.dataset.interval)) * 1000;
  const xsrf = body.dataset.xsrf;

  const esc = (s) => String(s ?? "").replace(/[&<>"']/g,
    (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  const gib = (b) => (b / 2 ** 30).toFixed(1) + " GiB";
  const mib = (b) => Math.round(b / 2 ** 20) + " MiB";
  const pct = (x) => x.toFixed(0) + " %";
  const bar = (x) => `<span class="bar" style="width:${Math.min(100, x)}px"></span> ${pct(x)}`;
  const when = (t) => (t ? new Date(t).toLocaleString() : "never");
  const hoursSel = () => Number((document.getElementById("hours") || {}).value || 1);

  // JupyterHub checks the xsrf token on every non-navigation request that uses the
  // login cookie, GETs from fetch() included.
  async function api(path, opts) {
    opts = Object.assign({ credentials: "same-origin", headers: {} }, opts);
    opts.headers["X-XSRFToken"] = xsrf;
    const r = await fetch(prefix + path, opts);
    const data = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(data.message || r.statusText);
    return data;
  }
  const post = (path, payload) => api(path, {
    method: "POST", body: JSON.stringify(payload),
    headers: { "Content-Type": "application/json" },
  });
  const status = (msg) => { const el = document.getElementById("status"); if (el) el.textContent = msg; };

  // ---- charts -------------------------------------------------------------
  const charts = {};
  const palette = ["#4a90d9", "#e4572e", "#29bf12", "#ffc914", "#8f2d56", "#17bebb", "#76448a", "#ff8c42"];

  // Several series (each [[t, values]...]) on one time axis, the field ``field`` of each.
  function drawChart(id, title, names, seriesPoints, field, scale) {
    const el = document.getElementById(id);
    if (!el) return;
    const times = [...new Set(seriesPoints.flatMap((pts) => pts.map((p) => p[0])))].sort((a, b) => a - b);
    const index = new Map(times.map((t, i) => [t, i]));
    const data = [times];
    for (const pts of seriesPoints) {
      const col = new Array(times.length).fill(null);
      for (const [t, v] of pts) col[index.get(t)] = (v[field] ?? 0) * (scale || 1);
      data.push(col);
    }
    const opts = {
      title, width: Math.min(1100, window.innerWidth - 60), height: 260,
      series: [{}].concat(names.map((n, i) => ({ label: n, stroke: palette[i % palette.length], spanGaps: true }))),
      axes: [{}, { size: 60 }],
    };
    if (charts[id]) charts[id].destroy();
    el.innerHTML = "";
    charts[id] = new uPlot(opts, data, el);
  }

  async function history(base, kind, subject) {
    const q = `?kind=${encodeURIComponent(kind)}&subject=${encodeURIComponent(subject)}&hours=${hoursSel()}`;
    return (await api(base + q)).points;
  }

  // ---- admin: nodes ----------------------------------------------------------
  async function renderNodes(state) {
    const rows = state.nodes.map((n) => {
      const h = n.host || {};
      return `<tr><td>${esc(n.name)}</td><td>${n.drained ? "<b>drained</b>" : "open"}</td>
        <td class="num">${bar(h.cpu_percent || 0)} of ${h.cpu_count} CPUs</td>
        <td class="num">${gib(h.mem_used)} / ${gib(h.mem_total)}</td>
        <td class="num">${gib(h.upper_free)} free / ${gib(h.upper_total)}</td>
        <td class="num">${gib(h.store_free)} free / ${gib(h.store_total)}</td>
        <td class="num">${n.gpus_held} / ${n.gpus}</td><td class="num">${n.containers}</td>
        <td><button data-drain="${esc(n.name)}" data-to="${!n.drained}">${n.drained ? "Undrain" : "Drain"}</button></td></tr>`;
    });
    document.getElementById("nodes").innerHTML = `<tr><th>Node</th><th>Placement</th><th>CPU</th>
      <th>Memory</th><th>Uppers disk</th><th>Layer store</th><th>GPUs held</th><th>Servers</th><th></th></tr>` + rows.join("");
    const node = state.nodes[0];
    if (node) {
      const pts = await history("api/admin/history", "node", node.name);
      drawChart("chart-node", "CPU % (node)", ["CPU %"], [pts], "cpu_percent");
      drawChart("chart-node-mem", "Memory used (GiB)", ["memory"], [pts], "mem_used", 1 / 2 ** 30);
    }
  }

  // ---- admin: GPUs -----------------------------------------------------------
  async function renderGpus(state) {
    const rows = state.gpus.map((g) => {
      const procs = g.processes.map((p) => `${p.pid} → ${esc(p.user || "(not LabVM)")} ${mib(p.used)}`).join("<br>");
      return `<tr data-uuid="${esc(g.uuid)}"><td>${g.index}</td><td>${esc(g.name)}</td><td title="${esc(g.uuid)}">${esc(g.uuid.slice(0, 12))}…</td>
        <td class="${g.holder ? "held" : "free"}">${g.holder ? esc(g.holder_user) + (g.holder.includes(".") ? " (" + esc(g.holder) + ")" : "") : "free"}</td>
        <td class="num">${bar(g.util)}</td><td class="num">${mib(g.mem_used)} / ${mib(g.mem_total)}</td>
        <td class="num">${g.temp_c.toFixed(0)} °C</td><td class="num">${g.power_w.toFixed(0)} W</td><td>${procs}</td></tr>`;
    });
    document.getElementById("gpus").innerHTML = `<tr><th>#</th><th>Model</th><th>UUID</th><th>Held by</th>
      <th>Utilisation</th><th>Memory</th><th>Temp.</th><th>Power</th><th>Processes (pid → user)</th></tr>` + rows.join("");
    const pts = await Promise.all(state.gpus.map((g) => history("api/admin/history", "gpu", g.uuid)));
    drawChart("chart-gpus", "GPU utilisation %", state.gpus.map((g) => "GPU " + g.index), pts, "util");
  }

  // ---- admin: users ----------------------------------------------------------
  function rootRow(u, r, restoreOk) {
    const c = r.container;
    const versions = r.versions.map((v) => (v === r.current_version ? `<b>${v}</b>` : v)).join(", ") || "none";
    const options = r.versions.filter((v) => v !== r.current_version).map((v) => `<option>${v}</option>`).join("");
    const canRestore = restoreOk && !r.running && options;
    return `<tr data-key="${esc(r.key)}"><td>${esc(u.name)}${u.admin ? " (admin)" : ""}</td><td>${esc(r.server || "(default)")}</td><td>${esc(r.node)}</td>
      <td>${r.running ? "running" : "stopped"}${r.warning ? '<br><span class="warning">idle GPUs: stop at ' + when(r.warning.stop_at * 1000) + "</span>" : ""}</td>
      <td class="num">${c ? pct(c.cpu_percent) + " / " + (c.cpu_limit ? c.cpu_limit + " CPUs" : "no limit") : ""}</td>
      <td class="num">${c ? gib(c.mem_used) + " / " + (c.mem_limit ? gib(c.mem_limit) : "no limit") : ""}</td>
      <td class="num">${c ? c.pids : ""}</td>
      <td>${r.gpus.map((g) => `GPU ${g.index} ${pct(g.util)}`).join("<br>") || "none"}</td>
      <td>${esc(r.last_activity ? when(r.last_activity) : "")}</td><td>${esc(r.last_sync)}</td><td>${versions}</td>
      <td><button data-stop="${esc(u.name)}" data-server="${esc(r.server)}" ${r.running ? "" : "disabled"}>Stop</button>
        <select data-versions="${esc(r.key)}" ${canRestore ? "" : "disabled"}>${options}</select>
        <button data-restore="${esc(r.key)}" ${canRestore ? "" : "disabled"} title="${restoreOk ? "the server must be stopped" : "not supported by this layer store yet"}">Restore</button>
        <button disabled title="migration comes with multi-node placement">Migrate</button></td></tr>`;
  }

  function renderUsers(state) {
    const rows = state.users.flatMap((u) => (u.roots.length ? u.roots.map((r) => rootRow(u, r, state.restore_supported))
      : [`<tr><td>${esc(u.name)}</td><td colspan="11" class="note">no server or stored root</td></tr>`]));
    document.getElementById("users").innerHTML = `<tr><th>User</th><th>Server</th><th>Node</th><th>State</th><th>CPU / limit</th>
      <th>Memory / limit</th><th>Pids</th><th>GPUs</th><th>Last activity</th><th>Last sync</th><th>Layer versions (current bold)</th><th>Actions</th></tr>` + rows.join("");
    const rc = state.reclaim;
    document.getElementById("reclaim").textContent = rc.idle_hours > 0
      ? `Idle GPU reclaim: servers whose GPUs stay idle ${rc.idle_hours} h are stopped (users warned ${rc.warn_hours} h before).`
      : "Idle GPU reclaim is off.";
  }

  // ---- the user's own page ---------------------------------------------------
  async function renderMe(me) {
    document.getElementById("warnings").innerHTML = me.roots.filter((r) => r.warning).map((r) =>
      `<div class="warning">The GPUs of your server <b>${esc(r.server || "(default)")}</b> have been idle since
       ${when(r.warning.idle_since * 1000)}. It will be stopped at <b>${when(r.warning.stop_at * 1000)}</b> unless they are used.
       Your files are kept.</div>`).join("");
    const el = document.getElementById("roots");
    el.innerHTML = me.roots.map((r, i) => {
      const c = r.container;
      return `<div class="root"><h2>Server ${esc(r.server || "(default)")} — ${r.running ? "running" : "stopped"}</h2>
        <p>${c ? `CPU ${pct(c.cpu_percent)} of ${c.cpu_limit || "unlimited"} CPUs · memory ${gib(c.mem_used)} of ${c.mem_limit ? gib(c.mem_limit) : "unlimited"} · ${c.pids} processes` : ""}</p>
        <p>GPUs: ${r.gpus.map((g) => `GPU ${g.index} (${esc(g.name)}) ${pct(g.util)}, ${mib(g.mem_used)} used`).join("; ") || "none"}</p>
        <p>Layer versions: ${r.versions.join(", ") || "none"} (current ${r.current_version ?? "none"}) · last sync: ${esc(r.last_sync)}</p>
        <div id="chart-me-${i}" class="chart"></div><div id="chart-me-gpu-${i}" class="chart"></div></div>`;
    }).join("") || "<p>You have no server yet.</p>";
    for (const [i, r] of me.roots.entries()) {
      const pts = await history("api/me/history", "user", r.key);
      drawChart(`chart-me-${i}`, "CPU % (100 = one core)", ["CPU %"], [pts], "cpu_percent");
      drawChart(`chart-me-gpu-${i}`, "GPU utilisation % (mean of your GPUs)", ["GPU %"], [pts], "gpu_util");
    }
  }

  // ---- actions ---------------------------------------------------------------
  document.addEventListener("click", async (ev) => {
    const b = ev.target;
    try {
      if (b.dataset.stop !== undefined) {
        if (!confirm(`Stop the server of ${b.dataset.stop}? Their files are kept.`)) return;
        await post("api/admin/stop", { user: b.dataset.stop, server: b.dataset.server });
        status(`Stopping the server of ${b.dataset.stop}.`);
      } else if (b.dataset.drain !== undefined) {
        await post("api/admin/drain", { node: b.dataset.drain, drained: b.dataset.to === "true" });
      } else if (b.dataset.restore !== undefined) {
        const key = b.dataset.restore;
        const v = Number(document.querySelector(`select[data-versions="${key}"]`).value);
        if (!confirm(`Make version ${v} of ${key} current again (as a new version)?`)) return;
        const r = await post("api/admin/restore", { key, version: v });
        status(`Restored ${key} version ${v} as version ${r.current_version}.`);
      } else return;
      refresh();
    } catch (e) { status("Failed: " + e.message); }
  });

  async function refresh() {
    // Re-rendering the users table would close a version list the admin has open.
    if (page === "users" && document.activeElement && document.activeElement.tagName === "SELECT") return;
    try {
      if (page === "me") await renderMe(await api("api/me"));
      else {
        const state = await api("api/admin/state");
        if (page === "nodes") await renderNodes(state);
        else if (page === "gpus") await renderGpus(state);
        else renderUsers(state);
      }
      body.dataset.loaded = "1";
    } catch (e) { status("Could not load: " + e.message); }
  }
  const hours = document.getElementById("hours");
  if (hours) hours.addEventListener("change", refresh);
  refresh();
  setInterval(refresh, interval);
})();
