// neurotwin live session dashboard: polls the JSON under api/ and draws it. Plain DOM calls only
// (text goes in with textContent, never as HTML), so nothing a session holds can run as code.
"use strict";

(() => {
  const query = new URLSearchParams(window.location.search);
  // ?poll=MS polls faster or slower than every 2 s (not below 250 ms).
  const POLL_MS = Math.max(250, Number(query.get("poll")) || 2000);
  const SYNTHETIC = "#1f5fa8";
  const NATURAL = "#c0392b";
  const SVG = "http://www.w3.org/2000/svg";
  const CURVES = [
    { key: "synthetic_mean", label: "synthetic mean", color: SYNTHETIC, width: 2 },
    { key: "synthetic_max", label: "synthetic max", color: SYNTHETIC, width: 1.5, opacity: 0.45 },
    { key: "best_so_far", label: "best so far", color: "#222", width: 1.2, dash: "5 4" },
    { key: "natural_mean", label: "natural mean", color: NATURAL, width: 2 },
    { key: "natural_max", label: "natural max", color: NATURAL, width: 1.5, opacity: 0.45 },
  ];

  let selected = decodeURIComponent(window.location.hash.replace(/^#/, "")) || null;
  let shownRevision = null;

  // -- helpers ------------------------------------------------------------------------------------
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (key === "className") node.className = value;
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child !== null && child !== undefined) {
        node.append(child instanceof Node ? child : String(child));
      }
    }
    return node;
  }

  function svg(tag, attributes) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attributes || {})) node.setAttribute(key, String(value));
    return node;
  }

  function num(value) {
    if (value === null || value === undefined || !Number.isFinite(value)) return "–";
    // Four significant digits without trailing zeros (7.5, not 7.500).
    return String(Number(Number(value).toPrecision(4)));
  }

  function when(seconds) {
    return new Date(seconds * 1000).toLocaleString();
  }

  async function getJSON(url) {
    // "no-cache": the browser revalidates with the ETag; an unchanged session is a 304.
    const response = await fetch(url, { cache: "no-cache", credentials: "same-origin" });
    if (response.status === 401) {
      window.location.href = "login";
      throw new Error("not logged in");
    }
    if (!response.ok) {
      let message = response.statusText;
      try {
        message = (await response.json()).error || message;
      } catch (ignored) {
        // not JSON: keep the status text
      }
      const error = new Error(`${response.status} ${message}`);
      error.status = response.status;
      throw error;
    }
    return response.json();
  }

  function setConnection(text, state) {
    const badge = document.getElementById("connection");
    badge.textContent = text;
    badge.className = `connection ${state}`;
  }

  function statusBadge(status) {
    return el("span", { className: `status status-${status}`, text: status });
  }

  // -- session list -------------------------------------------------------------------------------
  function renderSessions(sessions) {
    const body = document.querySelector("#sessions tbody");
    body.replaceChildren(
      ...sessions.map((s) => {
        const row = el(
          "tr",
          { "data-session-id": s.session_id, title: s.description || s.session_id },
          el("td", { text: s.session_id }),
          el("td", {}, statusBadge(s.status)),
          el("td", { className: "num", text: s.max_generations ? `${s.generations_told}/${s.max_generations}` : s.generations_told }),
          el("td", { className: "num", text: num(s.best_score) }),
        );
        if (s.session_id === selected) row.classList.add("selected");
        row.addEventListener("click", () => select(s.session_id));
        return row;
      }),
    );
    document.getElementById("no-sessions").hidden = sessions.length > 0;
    document.body.dataset.sessionCount = String(sessions.length);
    if (!selected && sessions.length) select(sessions[0].session_id);
  }

  function select(sessionId) {
    selected = sessionId;
    shownRevision = null;
    window.history.replaceState(null, "", `#${encodeURIComponent(sessionId)}`);
    for (const row of document.querySelectorAll("#sessions tbody tr")) {
      row.classList.toggle("selected", row.dataset.sessionId === sessionId);
    }
    refreshSession().catch(showError);
  }

  // -- one session --------------------------------------------------------------------------------
  function stimulusCard(stimulus, rank, units) {
    const card = el("div", { className: `card ${stimulus.kind}`, "data-stimulus-id": stimulus.stimulus_id });
    card.append(el("img", { src: stimulus.image_url, alt: stimulus.stimulus_id }));
    const title = rank ? `#${rank} ` : "";
    card.append(el("div", { className: "rank", text: `${title}g${stimulus.generation} · ${stimulus.stimulus_id}` }));
    if (stimulus.kind === "natural") {
      card.append(el("div", { className: "natural-label", text: `natural ${stimulus.natural_name || ""}` }));
    }
    card.append(el("div", { className: "measured", text: `measured ${num(stimulus.score)}` }));
    if (units !== undefined) {
      if (stimulus.confirmations.length) {
        card.append(el("div", { className: "confirmed", text: `confirmed ${num(stimulus.confirmed_score)} (n=${stimulus.confirmations.length})` }));
      } else {
        card.append(el("div", { className: "confirmed pending", text: "not shown again yet" }));
      }
      card.append(el("div", { className: "rates", title: units, text: `target rates ${stimulus.target_rates.map(num).join(", ")}` }));
      card.append(el("div", { text: `${stimulus.repeats} repeat${stimulus.repeats === 1 ? "" : "s"}` }));
    }
    return card;
  }

  function renderSession(data) {
    document.getElementById("placeholder").hidden = true;
    document.getElementById("session").hidden = false;
    document.getElementById("session-title").replaceChildren(`Session ${data.session_id} `, statusBadge(data.status));
    const of = data.max_generations ? ` of ${data.max_generations}` : "";
    document.getElementById("session-overview").textContent =
      `${data.generations_told}${of} generations and ${data.presentations_told} presentations told. ` +
      `Targets: ${data.target_neuron_ids.join(", ")} (${data.objective}, ${data.response_units}). ` +
      `Created ${when(data.created)}, last change ${when(data.updated)}.`;
    document.getElementById("exports").replaceChildren(
      ...data.exports.map((e) => el("a", { href: e.url, download: "", className: "export", text: e.label })),
    );
    document.getElementById("report-link").setAttribute("href", data.report_url);
    document.getElementById("objective").textContent = data.objective;

    drawCurve(document.getElementById("curve"), data.generations, data.response_units);

    const best = data.best.map((s, i) => stimulusCard(s, i + 1, data.response_units));
    if (data.best_natural) best.push(stimulusCard(data.best_natural, 0, data.response_units));
    document.getElementById("best").replaceChildren(...(best.length ? best : [el("p", { className: "note", text: "Nothing told yet." })]));

    const last = data.last_generation;
    document.getElementById("last-title").textContent = last.length
      ? `Last told generation (${last[0].generation}); natural references framed in red`
      : "Last told generation";
    document.getElementById("last").replaceChildren(...last.map((s) => stimulusCard(s, 0)));

    const pairs = [...Object.entries(data.settings), ...Object.entries(data.metadata)];
    document.querySelector("#settings tbody").replaceChildren(
      ...pairs.map(([key, value]) =>
        el("tr", {}, el("th", { text: key }), el("td", { text: Array.isArray(value) ? value.join("; ") : String(value) })),
      ),
    );
    shownRevision = data.revision;
    document.body.dataset.sessionId = data.session_id;
    document.body.dataset.revision = String(data.revision);
    document.body.dataset.generations = String(data.generations.length);
  }

  function drawCurve(root, rows, units) {
    const width = 760;
    const height = 330;
    const left = 64;
    const right = 16;
    const top = 14;
    const bottom = 40;
    root.replaceChildren();
    const values = [];
    for (const row of rows) for (const c of CURVES) if (row[c.key] !== null) values.push(row[c.key]);
    const legend = document.getElementById("curve-legend");
    if (!rows.length || !values.length) {
      root.append(Object.assign(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "empty" }), { textContent: "no generation told yet" }));
      legend.replaceChildren();
      return;
    }
    let xMin = rows[0].generation;
    let xMax = rows[rows.length - 1].generation;
    if (xMin === xMax) {
      xMin -= 0.5;
      xMax += 0.5;
    }
    let yMin = Math.min(...values);
    let yMax = Math.max(...values);
    const pad = yMax > yMin ? 0.06 * (yMax - yMin) : Math.max(1, Math.abs(yMax) * 0.1);
    yMin -= pad;
    yMax += pad;
    const x = (g) => left + ((g - xMin) / (xMax - xMin)) * (width - left - right);
    const y = (v) => top + (1 - (v - yMin) / (yMax - yMin)) * (height - top - bottom);

    for (const tick of ticks(yMin, yMax, 5)) {
      root.append(svg("line", { x1: left, x2: width - right, y1: y(tick), y2: y(tick), class: "grid" }));
      root.append(Object.assign(svg("text", { x: left - 6, y: y(tick) + 4, "text-anchor": "end" }), { textContent: num(tick) }));
    }
    for (const tick of ticks(xMin, xMax, 10).filter((t) => Number.isInteger(t))) {
      root.append(Object.assign(svg("text", { x: x(tick), y: height - bottom + 16, "text-anchor": "middle" }), { textContent: String(tick) }));
    }
    root.append(svg("line", { x1: left, x2: left, y1: top, y2: height - bottom, class: "axis" }));
    root.append(svg("line", { x1: left, x2: width - right, y1: height - bottom, y2: height - bottom, class: "axis" }));
    root.append(Object.assign(svg("text", { x: (left + width - right) / 2, y: height - 6, "text-anchor": "middle" }), { textContent: "generation" }));
    root.append(Object.assign(svg("text", { x: 12, y: (top + height - bottom) / 2, "text-anchor": "middle", transform: `rotate(-90 12 ${(top + height - bottom) / 2})` }), { textContent: `score (${units})` }));

    const shown = [];
    for (const curve of CURVES) {
      // A null (kind not shown in that generation) breaks the line into segments.
      const segments = [[]];
      for (const row of rows) {
        if (row[curve.key] === null) {
          if (segments[segments.length - 1].length) segments.push([]);
        } else {
          segments[segments.length - 1].push([x(row.generation), y(row[curve.key])]);
        }
      }
      const drawn = segments.filter((s) => s.length);
      if (!drawn.length) continue;
      shown.push(curve);
      const group = svg("g", { id: `curve-${curve.key.replace(/_/g, "-")}`, "data-points": drawn.reduce((n, s) => n + s.length, 0) });
      for (const segment of drawn) {
        const attributes = {
          points: segment.map(([px, py]) => `${px.toFixed(1)},${py.toFixed(1)}`).join(" "),
          fill: "none",
          stroke: curve.color,
          "stroke-width": curve.width,
          "stroke-opacity": curve.opacity || 1,
        };
        if (curve.dash) attributes["stroke-dasharray"] = curve.dash;
        group.append(svg("polyline", attributes));
        // Markers keep one- or two-generation sessions visible.
        if (rows.length < 30 && !curve.opacity && !curve.dash) {
          for (const [px, py] of segment) group.append(svg("circle", { cx: px, cy: py, r: 3, fill: curve.color }));
        }
      }
      root.append(group);
    }
    legend.replaceChildren(
      ...shown.map((c) => {
        const swatch = el("span", { className: `swatch${c.opacity ? " faint" : ""}${c.dash ? " dashed" : ""}` });
        swatch.style.borderTopColor = c.color;
        return el("span", {}, swatch, c.label);
      }),
    );
  }

  function ticks(low, high, count) {
    const span = high - low;
    const step0 = span / count;
    const magnitude = 10 ** Math.floor(Math.log10(step0));
    const step = [1, 2, 5, 10].map((m) => m * magnitude).find((s) => span / s <= count) || 10 * magnitude;
    const result = [];
    for (let t = Math.ceil(low / step) * step; t <= high + 1e-9; t += step) result.push(Number(t.toPrecision(12)));
    return result;
  }

  // -- polling ------------------------------------------------------------------------------------
  async function refreshSession() {
    if (!selected) return;
    try {
      const data = await getJSON(`api/sessions/${encodeURIComponent(selected)}`);
      if (data.revision !== shownRevision || data.session_id !== document.body.dataset.sessionId) renderSession(data);
    } catch (error) {
      if (error.status === 404) {
        selected = null;
        document.getElementById("session").hidden = true;
        document.getElementById("placeholder").hidden = false;
        return;
      }
      throw error;
    }
  }

  function showError(error) {
    setConnection(`error: ${error.message}`, "error");
  }

  async function poll() {
    if (document.hidden) {
      // A tab in the background costs the server (and the rig sharing it) nothing.
      window.setTimeout(poll, POLL_MS);
      return;
    }
    try {
      const list = await getJSON("api/sessions");
      renderSessions(list.sessions);
      await refreshSession();
      setConnection(`live · ${new Date().toLocaleTimeString()}`, "live");
    } catch (error) {
      showError(error);
    } finally {
      window.setTimeout(poll, POLL_MS);
    }
  }

  poll();
})();
