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
  // Sizes a person reads: MiB below a GiB (a 64 MiB quota is not "0.1 GiB").
  const size = (b) => (b >= 2 ** 30 ? gib(b) : Math.round(b / 2 ** 20) + " MiB");
  const mib = (b) => Math.round(b / 2 ** 20) + " MiB";
  const pct = (x) => x.toFixed(0) + " %";
  const bar = (x) => `<span class="bar" style="width:${Math.min(100, x)}px"></span> ${pct(x)}`;
  const when = (t) => (t ? new Date(t).toLocaleString() : "never");
  const num = (x) => String(Math.round(Number(x || 0) * 10) / 10);
  const secs = (x) => (x == null ? "" : Number(x).toFixed(1) + " s");
  const hoursSel = () => Number((document.getElementById("hours") || {}).value || 1);

  // JupyterHub checks the xsrf token on every non-navigation request that uses the
  // login cookie, GETs from fetch() included.
  async function api(path, opts) {
    opts = Object.assign({ credentials: "same-origin", headers: {} }, opts);
    opts.headers["X-XSRFToken"] = xsrf;
    const r = await fetch(prefix + path, opts);
    const data = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(data.error || data.message || r.statusText);
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
      const age = n.t ? ` (sampled ${when(n.t * 1000)})` : "";
      return `<tr data-sampled="${esc(n.name)}"><td>${esc(n.name)}${n.up ? "" : ` <span class="down">down</span>${age}`}</td><td>${n.drained ? "<b>drained</b>" : "open"}</td>
        <td class="num">${bar(h.cpu_percent || 0)} of ${h.cpu_count} CPUs<br>${num(n.cpus_committed)} committed</td>
        <td class="num">${gib(h.mem_used)} / ${gib(h.mem_total)}<br>${gib(n.mem_committed || 0)} committed</td>
        <td class="num">${gib(h.upper_free)} free / ${gib(h.upper_total)}</td>
        <td class="num">${h.store_reachable === false
          ? `<span class="down">unreachable</span> since ${when(h.store_since * 1000)}`
          : `${gib(h.store_free)} free / ${gib(h.store_total)}`}</td>
        <td class="num">${n.gpus_held} / ${n.gpus}</td><td class="num">${n.containers}</td>
        <td><button data-drain="${esc(n.name)}" data-to="${!n.drained}">${n.drained ? "Undrain" : "Drain"}</button></td></tr>`;
    });
    document.getElementById("nodes").innerHTML = `<tr><th>Node</th><th>Placement</th><th>CPU</th>
      <th>Memory</th><th>Uppers disk</th><th>Layer store</th><th>GPUs held</th><th>Servers</th><th></th></tr>` + rows.join("");
    renderClusterNodes(state.cluster_nodes || []);
    renderHousekeeping([...state.nodes, ...(state.cluster_nodes || [])]);
    renderEnrolled(state.enrolled_nodes || [], state.node_warnings || []);
    // One line per node, every node the service samples (its own and each agent's).
    const names = state.nodes.map((n) => n.name);
    if (names.length) {
      const pts = await Promise.all(names.map((name) => history("api/admin/history", "node", name)));
      drawChart("chart-node", "CPU % per node", names, pts, "cpu_percent");
      drawChart("chart-node-mem", "Memory used per node (GiB)", names, pts, "mem_used", 1 / 2 ** 30);
    }
  }

  // Every registered node, from its heartbeat: what placement and migration choose from.
  function clusterNodeRow(n) {
    const up = n.up ? "up"
      : `<span class="down">down</span> (last heartbeat ${Math.round(Number(n.age_s || 0))} s ago)`;
    const gpus = n.gpus.map((g) => `${Number(g.free)} / ${Number(g.total)} ${esc(g.model)}`).join("<br>") || "none";
    return `<tr data-node="${esc(n.name)}"><td>${esc(n.name)}${n.local ? " (in the hub)" : ""}</td><td>${up}</td>
      <td class="num">${gpus}</td><td class="num">${num(n.cpus_committed)} / ${num(n.cpus)}</td>
      <td class="num">${gib(n.mem_committed || 0)} / ${gib(n.mem_bytes || 0)}</td><td class="num">${Number(n.servers)}</td>
      <td>${n.drained ? "<b>drained</b>" : "open"}</td>
      <td><button data-drain="${esc(n.name)}" data-to="${!n.drained}">${n.drained ? "Undrain" : "Drain"}</button></td></tr>`;
  }

  function renderClusterNodes(nodes) {
    const el = document.getElementById("cluster-nodes");
    if (!el) return;
    el.innerHTML = `<tr><th>Node</th><th>State</th><th>GPUs free / total</th><th>CPUs committed</th>
      <th>Memory committed</th><th>Servers</th><th>Placement</th><th></th></tr>` + (nodes.map(clusterNodeRow).join("")
      || '<tr><td colspan="8" class="note">No node agent has registered (MonitorService.registry_dir).</td></tr>');
  }

  // The last scheduled image prune, fsck and version prune of each node.
  function renderHousekeeping(nodes) {
    const el = document.getElementById("housekeeping");
    if (!el) return;
    const list = (xs) => xs && xs.length ? xs.map(esc).join("<br>") : "none";
    const rows = nodes.filter((n) => n.housekeeping && n.housekeeping.t).map((n) => {
      const h = n.housekeeping, ip = h.image_prune || {}, fs = h.fsck || {}, pr = h.prune || {};
      const pruned = Object.entries(pr.pruned || {}).map(([k, v]) => `${k}: ${v.join(", ")}`);
      const kept = Object.entries(pr.kept_for_leases || {}).map(([k, v]) =>
        Object.entries(v).map(([n, who]) => `${k} v${n} (in use on ${who.join(", ")})`).join("; "));
      return `<tr data-housekeeping="${esc(n.name)}"><td>${esc(n.name)}</td><td>${when(h.t * 1000)}</td>
        <td>${ip.error ? `<span class="down">${esc(ip.error)}</span>` : `${(ip.removed || []).length} tree(s) removed`}</td>
        <td>${fs.error ? `<span class="down">${esc(fs.error)}</span>` : `${Number(fs.keys || 0)} root(s): ${list(fs.problems)}${fs.repair ? "" : " (report only)"}`}</td>
        <td>pruned: ${list(pruned)}<br>kept for leases: ${list(kept)}</td></tr>`;
    });
    el.innerHTML = `<tr><th>Node</th><th>Last run</th><th>Image prune</th><th>fsck</th><th>Version prune</th></tr>`
      + (rows.join("") || '<tr><td colspan="5" class="note">No round has run yet.</td></tr>');
  }

  // Enrolled nodes (the only ones the hub calls) and records it ignored.
  function renderEnrolled(nodes, warnings) {
    const w = document.getElementById("node-warnings");
    if (w) {
      w.innerHTML = warnings.map((t) => `<div class="warning">${esc(t)}</div>`).join("");
    }
    const el = document.getElementById("enrolled-nodes");
    if (!el) return;
    el.innerHTML = `<tr><th>Node</th><th>URL</th><th>Certificate (SHA-256)</th><th>Enrolled</th><th>State</th><th></th></tr>`
      + (nodes.map((n) => `<tr data-enrolled="${esc(n.name)}"><td>${esc(n.name)}</td><td>${esc(n.url)}</td>
        <td class="fingerprint">${esc(n.fingerprint)}</td><td>${esc(when(n.enrolled_at * 1000))}</td>
        <td>${n.revoked_at ? `<span class="down">revoked</span> by ${esc(n.revoked_by)}` : "trusted"}</td>
        <td>${n.revoked_at ? "" : `<button data-revoke="${esc(n.name)}">Revoke</button>`}</td></tr>`).join("")
      || '<tr><td colspan="6" class="note">No node has enrolled: make a join token below.</td></tr>');
  }

  const joinForm = document.getElementById("join-token-form");
  if (joinForm) {
    joinForm.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const node = document.getElementById("join-node").value;
      const out = document.getElementById("join-token");
      try {
        const r = await post("api/admin/nodes/join-token", { node });
        // Shown this once: only its hash is kept.
        out.innerHTML = `<p>Join token for <b>${esc(r.node)}</b>, valid once until ${esc(when(r.expires * 1000))}.
          Put it in a root-only file on the node and run <code>labvm-node join --token-file FILE ...</code>:</p>
          <pre class="token">${esc(r.token)}</pre>`;
      } catch (e) { out.textContent = "Refused: " + e.message; }
    });
  }

  // ---- admin: GPUs -----------------------------------------------------------
  async function renderGpus(state) {
    const rows = state.gpus.map((g) => {
      const procs = g.processes.map((p) => `${p.pid} → ${esc(p.user || "(not LabVM)")} ${mib(p.used)}`).join("<br>");
      return `<tr data-uuid="${esc(g.uuid)}" data-node="${esc(g.node)}"><td>${esc(g.node)}</td><td>${g.index}</td><td>${esc(g.name)}</td><td title="${esc(g.uuid)}">${esc(g.uuid.slice(0, 12))}…</td>
        <td class="${g.holder ? "held" : "free"}">${g.holder ? esc(g.holder_user) + (g.holder.includes(".") ? " (" + esc(g.holder) + ")" : "") : "free"}</td>
        <td class="num">${bar(g.util)}</td><td class="num">${mib(g.mem_used)} / ${mib(g.mem_total)}</td>
        <td class="num">${g.temp_c.toFixed(0)} °C</td><td class="num">${g.power_w.toFixed(0)} W</td><td>${procs}</td></tr>`;
    });
    document.getElementById("gpus").innerHTML = `<tr><th>Node</th><th>#</th><th>Model</th><th>UUID</th><th>Held by</th>
      <th>Utilisation</th><th>Memory</th><th>Temp.</th><th>Power</th><th>Processes (pid → user)</th></tr>` + rows.join("");
    const pts = await Promise.all(state.gpus.map((g) => history("api/admin/history", "gpu", g.uuid)));
    drawChart("chart-gpus", "GPU utilisation %", state.gpus.map((g) => `${g.node} GPU ${g.index}`), pts, "util");
  }

  // ---- admin: users ----------------------------------------------------------
  // Up, undrained nodes other than the root's own: where it may be migrated to.
  function migrateTargets(state, r) {
    return (state.cluster_nodes || []).filter((n) => n.up && !n.drained && n.name !== r.node);
  }

  // A long (first) sync: entries, bytes, rate, and about how long is left.
  function syncProgress(p) {
    const eta = p.eta_s == null ? "" : `, about ${p.eta_s < 90 ? Math.round(p.eta_s) + " s" : Math.round(p.eta_s / 60) + " min"} left`;
    return `${Number(p.copied).toLocaleString()} of at least ${Number(p.seen).toLocaleString()} entries, `
      + `${gib(p.bytes)}, ${Math.round(p.rate)}/s${eta}`;
  }

  // Bytes in the root's writable layer against its quota (nodes with disk quotas only).
  function diskText(r) {
    if (!r.disk) return "";
    const pctUsed = r.disk.limit ? ` (${Math.round((100 * r.disk.used) / r.disk.limit)}%)` : "";
    return `${size(r.disk.used)} of ${r.disk.limit ? size(r.disk.limit) : "no quota"}${pctUsed}`;
  }

  // The store quota, and what it refused: a sync's entries or a whole commit.
  function storeText(r) {
    const parts = [];
    if (r.store_quota) parts.push(`stored layer ${r.store_used == null ? "" : size(r.store_used) + " of "}${size(r.store_quota)} quota`);
    if (r.last_sync_quota_errors) parts.push(`the store quota is full: ${Number(r.last_sync_quota_errors)} entries were not backed up by the last sync`);
    if (r.store_refused) parts.push(`a new version of ${size(r.store_refused.bytes)} was refused at ${when(r.store_refused.t * 1000)}: over the store quota of ${size(r.store_refused.limit)}`);
    return parts.join("; ");
  }

  function rootRow(u, r, state) {
    const restoreOk = state.restore_supported;
    const c = r.container;
    const pin = (state.pins || {})[u.name];
    const targets = migrateTargets(state, r).map((n) => `<option value="${esc(n.name)}">${esc(n.name)}</option>`).join("");
    const synced = (r.last_synced ? when(r.last_synced * 1000) + (r.last_synced_node ? " on " + r.last_synced_node : "") : "never")
      + (r.last_sync_errors ? ` (last sync had ${Number(r.last_sync_errors)} error${r.last_sync_errors === 1 ? "" : "s"})` : "")
      + (r.sync_progress ? `; syncing now: ${syncProgress(r.sync_progress)}` : "")
      + (storeText(r) ? `; ${storeText(r)}` : "");
    const versions = r.versions.map((v) => (v === r.current_version ? `<b>${v}</b>` : v)).join(", ") || "none";
    const options = r.versions.filter((v) => v !== r.current_version).map((v) => `<option>${v}</option>`).join("");
    const canRestore = restoreOk && !r.running && options;
    return `<tr data-key="${esc(r.key)}"><td>${esc(u.name)}${u.admin ? " (admin)" : ""}</td><td>${esc(r.server || "(default)")}</td><td>${esc(r.node)}${pin ? " (pinned to " + esc(pin) + ")" : ""}</td>
      <td>${r.running ? "running" : "stopped"}${r.warning ? '<br><span class="warning">idle GPUs: stop at ' + when(r.warning.stop_at * 1000) + "</span>" : ""}</td>
      <td class="num">${c ? pct(c.cpu_percent) + " / " + (c.cpu_limit ? c.cpu_limit + " CPUs" : "no limit") : ""}</td>
      <td class="num">${c ? gib(c.mem_used) + " / " + (c.mem_limit ? gib(c.mem_limit) : "no limit") : ""}</td>
      <td class="num">${c ? c.pids : ""}</td>
      <td class="num${r.disk_warning ? " warning" : ""}">${esc(diskText(r))}
        <br><input data-quota-for="${esc(r.key)}" size="6" placeholder="e.g. 50G" aria-label="new disk quota of ${esc(r.key)}">
        <button data-quota="${esc(r.key)}" title="set this root's disk quota (empty or none: no quota); a running server gets it at once">Set quota</button></td>
      <td>${r.gpus.map((g) => `GPU ${g.index} ${pct(g.util)}`).join("<br>") || "none"}</td>
      <td>${esc(r.last_activity ? when(r.last_activity) : "")}</td><td>${esc(synced)}</td><td>${versions}</td>
      <td><button data-stop="${esc(u.name)}" data-server="${esc(r.server)}" ${r.running ? "" : "disabled"}>Stop</button>
        <select data-versions="${esc(r.key)}" ${canRestore ? "" : "disabled"}>${options}</select>
        <button data-restore="${esc(r.key)}" ${canRestore ? "" : "disabled"} title="${restoreOk ? "the server must be stopped" : "not supported by this layer store yet"}">Restore</button>
        <select data-migrate-to="${esc(r.key)}" ${targets && r.node ? "" : "disabled"}><option value="">to node…</option>${targets}</select>
        <button data-migrate="${esc(u.name)}" data-server="${esc(r.server)}" data-key="${esc(r.key)}" ${targets && r.node ? "" : "disabled"}
          title="${r.node ? "move this server and its root to another node" : "not placed on a node yet: pin the user instead"}">Migrate</button></td></tr>`;
  }

  function renderMigrations(list) {
    const rows = list.map((m) => `<tr data-migration="${Number(m.id)}"><td class="num">${Number(m.id)}</td>
      <td>${esc(m.user)}${m.server ? " / " + esc(m.server) : ""}</td><td>${esc(m.source)}</td><td>${esc(m.target)}</td>
      <td>${esc(m.by)}</td><td>${esc(when(m.started * 1000))}</td><td class="${m.state === "failed" ? "failed" : ""}">${esc(m.state)}</td>
      <td>${esc(m.step)}</td><td class="num">${secs(m.downtime_s)}</td><td>${esc(m.error)}</td></tr>`);
    document.getElementById("migrations").innerHTML = `<tr><th>#</th><th>User</th><th>From</th><th>To</th><th>By</th>
      <th>Started</th><th>State</th><th>Step</th><th>Downtime</th><th>Error</th></tr>`
      + (rows.join("") || '<tr><td colspan="10" class="note">none yet</td></tr>');
  }

  function renderUsers(state) {
    // A chosen migration target survives the periodic re-render.
    const chosen = new Map([...document.querySelectorAll("select[data-migrate-to]")].map((s) => [s.dataset.migrateTo, s.value]));
    const rows = state.users.flatMap((u) => (u.roots.length ? u.roots.map((r) => rootRow(u, r, state))
      : [`<tr><td>${esc(u.name)}</td><td colspan="12" class="note">no server or stored root</td></tr>`]));
    document.getElementById("users").innerHTML = `<tr><th>User</th><th>Server</th><th>Node</th><th>State</th><th>CPU / limit</th>
      <th>Memory / limit</th><th>Pids</th><th>Disk / quota</th><th>GPUs</th><th>Last activity</th><th>Last sync</th><th>Layer versions (current bold)</th><th>Actions</th></tr>` + rows.join("");
    for (const s of document.querySelectorAll("select[data-migrate-to]")) {
      const v = chosen.get(s.dataset.migrateTo);
      if (v && [...s.options].some((o) => o.value === v)) s.value = v;
    }
    renderMigrations(state.migrations || []);
    const asides = state.asides || [];
    document.getElementById("asides").innerHTML = asides.length
      ? `<tr><th>Root</th><th>Node</th><th>Set aside</th><th>Size</th><th>Actions</th></tr>` + asides.map((a) =>
        `<tr data-aside="${esc(a.id)}"><td>${esc(a.key)}</td><td>${esc(a.node)}</td><td>${when(a.set_aside_at * 1000)}</td>
         <td>${a.bytes == null ? "?" : size(a.bytes)}</td>
         <td><button data-aside-restore="${esc(a.id)}" data-node="${esc(a.node)}" data-key="${esc(a.key)}">Restore as a new version</button>
         <button data-aside-delete="${esc(a.id)}" data-node="${esc(a.node)}" data-key="${esc(a.key)}">Delete</button></td></tr>`).join("")
      : `<tr><td class="note">none</td></tr>`;
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
       Your files are kept.</div>`).join("") + me.roots.filter((r) => r.disk_warning).map((r) =>
      `<div class="warning">The disk of your server <b>${esc(r.server || "(default)")}</b> is almost full: ${esc(diskText(r))}.
       When it is full, writes fail with "Disk quota exceeded". Delete what you no longer need, or ask your admin for more.</div>`).join("");
    const el = document.getElementById("roots");
    el.innerHTML = me.roots.map((r, i) => {
      const c = r.container;
      return `<div class="root"><h2>Server ${esc(r.server || "(default)")} — ${r.running ? "running" : "stopped"}</h2>
        <p>${c ? `CPU ${pct(c.cpu_percent)} of ${c.cpu_limit || "unlimited"} CPUs · memory ${gib(c.mem_used)} of ${c.mem_limit ? gib(c.mem_limit) : "unlimited"} · ${c.pids} processes` : ""}</p>
        <p>GPUs: ${r.gpus.map((g) => `GPU ${g.index} (${esc(g.name)}) ${pct(g.util)}, ${mib(g.mem_used)} used`).join("; ") || "none"}</p>
        <p>Layer versions: ${r.versions.join(", ") || "none"} (current ${r.current_version ?? "none"}) · last sync: ${esc(r.last_sync)}</p>
        ${r.disk ? `<p class="disk">Disk: ${esc(diskText(r))}</p>` : ""}
        ${storeText(r) ? `<p class="store${r.store_refused || r.last_sync_quota_errors ? " warning" : ""}">Layer store: ${esc(storeText(r))}</p>` : ""}
        <div id="chart-me-${i}" class="chart"></div><div id="chart-me-gpu-${i}" class="chart"></div></div>`;
    }).join("") || "<p>You have no server yet.</p>";
    for (const [i, r] of me.roots.entries()) {
      const pts = await history("api/me/history", "user", r.key);
      drawChart(`chart-me-${i}`, "CPU % (100 = one core)", ["CPU %"], [pts], "cpu_percent");
      drawChart(`chart-me-gpu-${i}`, "GPU utilisation % (mean of your GPUs)", ["GPU %"], [pts], "gpu_util");
    }
  }

  // ---- the user's SSH keys -----------------------------------------------------
  const sshStatus = (msg, failed) => {
    const el = document.getElementById("ssh-status");
    el.textContent = msg;
    el.className = failed ? "failed" : "note";
  };

  async function renderSSH() {
    const v = await api("api/me/ssh");
    document.getElementById("ssh-keys").innerHTML = v.keys.length
      ? `<table><tr><th>Key</th><th>Fingerprint</th><th>Added</th><th></th></tr>` + v.keys.map((k) =>
        `<tr data-ssh-key="${k.id}"><td>${esc(k.algorithm)} ${esc(k.comment)}</td><td><code>${esc(k.fingerprint)}</code></td>
         <td>${esc(k.added)}</td><td><button data-ssh-delete="${k.id}" data-fingerprint="${esc(k.fingerprint)}">Delete</button></td></tr>`).join("") + "</table>"
      : "<p>You have no SSH key yet.</p>";
    const gw = v.gateway;
    document.getElementById("ssh-gateway").innerHTML = gw
      ? `<p>Gateway <code>${esc(gw.host)}:${gw.port}</code>, host key <code id="ssh-fingerprint">${esc(gw.fingerprint)}</code>
         (check it the first time you connect).</p>
         <p>Put this in your <code>~/.ssh/config</code>, then <code>ssh labvm</code>:</p>
         <pre id="ssh-config">${esc(gw.config)}</pre>
         <p>And this line in <code>~/.ssh/known_hosts</code>, to trust the gateway without asking:</p>
         <pre id="ssh-known-hosts">${esc(gw.known_hosts)}</pre>`
      : `<p class="note">The SSH gateway is not running on this hub.</p>`;
  }

  const sshForm = document.getElementById("ssh-add");
  if (sshForm) {
    sshForm.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const text = document.getElementById("ssh-key");
      try {
        const r = await post("api/me/ssh", { key: text.value });
        text.value = "";
        sshStatus(`Added ${r.fingerprint}` + (r.servers_updated ? `; ${r.servers_updated} running server(s) have it now.` : "."));
      } catch (e) { sshStatus("Not added: " + e.message, true); }
      renderSSH().catch((e) => sshStatus("Could not load your keys: " + e.message, true));
    });
    renderSSH().catch((e) => sshStatus("Could not load your keys: " + e.message, true));
  }

  // ---- migrations ------------------------------------------------------------
  const migrationStatus = (msg, failed) => {
    const el = document.getElementById("migration-status");
    el.textContent = msg;
    el.className = failed ? "failed" : "note";
  };

  async function followMigration(id) {
    for (;;) {
      const m = await api(`api/admin/migrations/${Number(id)}`);
      let msg = `Migration ${m.id} of ${m.key} (${m.source} → ${m.target}): ${m.state}, ${m.step}`;
      if (m.state === "done") msg += `; downtime ${m.downtime_s == null ? "none" : secs(m.downtime_s)}`;
      if (m.error) msg += `; error: ${m.error}`;
      migrationStatus(msg, m.state === "failed");
      if (m.state !== "running") return refresh();
      await new Promise((done) => setTimeout(done, 1000));
    }
  }

  async function migrate(b) {
    const to = b.parentElement.querySelector("select[data-migrate-to]").value;
    if (!to) { migrationStatus(`Choose the node to move ${b.dataset.key} to.`); return; }
    if (!confirm(`Move ${b.dataset.key} to node ${to}? A running server is stopped and started again there.`)) return;
    let r;
    try {
      r = await post("api/admin/migrate", { user: b.dataset.migrate, server: b.dataset.server, node: to });
    } catch (e) { migrationStatus("Migration refused: " + e.message, true); return; }
    migrationStatus(`Migration ${r.id} of ${b.dataset.key} to node ${to} accepted.`);
    followMigration(r.id).catch((e) => migrationStatus(`Lost track of migration ${r.id}: ${e.message}`, true));
  }

  // ---- actions ---------------------------------------------------------------
  document.addEventListener("click", async (ev) => {
    const b = ev.target;
    try {
      if (b.dataset.sshDelete !== undefined) {
        if (!confirm(`Delete the SSH key ${b.dataset.fingerprint}? It stops working at once.`)) return;
        await api(`api/me/ssh/keys/${Number(b.dataset.sshDelete)}`, { method: "DELETE" });
        sshStatus(`Deleted ${b.dataset.fingerprint}.`);
        await renderSSH();
        return;
      } else if (b.dataset.asideRestore !== undefined || b.dataset.asideDelete !== undefined) {
        const restore = b.dataset.asideRestore !== undefined;
        const id = restore ? b.dataset.asideRestore : b.dataset.asideDelete;
        if (!confirm(restore ? `Turn the set-aside upper ${id} into a new version of ${b.dataset.key}?`
          : `Delete the set-aside upper ${id} of ${b.dataset.key}? Its unsynced changes are lost.`)) return;
        const r = await post("api/admin/aside", { node: b.dataset.node, id, action: restore ? "restore" : "delete" });
        status(restore ? `${b.dataset.key}: set-aside changes restored as version ${r.version}.` : `Deleted ${id}.`);
      } else if (b.dataset.stop !== undefined) {
        if (!confirm(`Stop the server of ${b.dataset.stop}? Their files are kept.`)) return;
        await post("api/admin/stop", { user: b.dataset.stop, server: b.dataset.server });
        status(`Stopping the server of ${b.dataset.stop}.`);
      } else if (b.dataset.drain !== undefined) {
        await post("api/admin/drain", { node: b.dataset.drain, drained: b.dataset.to === "true" });
      } else if (b.dataset.revoke !== undefined) {
        if (!confirm(`Revoke node ${b.dataset.revoke}? The hub stops using it at once; it needs a new join token to come back.`)) return;
        await post("api/admin/nodes/revoke", { node: b.dataset.revoke });
        status(`Node ${b.dataset.revoke} revoked.`);
      } else if (b.dataset.migrate !== undefined) {
        await migrate(b);
      } else if (b.dataset.quota !== undefined) {
        const key = b.dataset.quota;
        const v = document.querySelector(`input[data-quota-for="${key}"]`).value.trim();
        const disk = v === "" || v.toLowerCase() === "none" ? null : v;
        if (!confirm(disk === null ? `Remove the disk quota of ${key}?` : `Set the disk quota of ${key} to ${disk}?`)) return;
        const r = await post("api/admin/quota", { key, disk });
        status(`Disk quota of ${key}: ${r.disk_bytes == null ? "none" : size(r.disk_bytes)}`
          + (r.applied ? `, in force now (${size(r.applied.used_bytes)} used).` : ", from its next start."));
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
    if (page === "users" && document.activeElement && ["SELECT", "INPUT"].includes(document.activeElement.tagName)) return;
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
