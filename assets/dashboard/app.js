// The dashboard: reads the admin JSON API with the session cookie and draws it. No framework,
// no inline handlers (the page's CSP allows scripts from this file only); text goes in with
// textContent, never as HTML, so a user's name cannot become markup. Charts are SVG elements
// made here, styled by class from app.css (no style attribute).
'use strict';

const REFRESH_MS = 15000;
const DEFAULT_PAGE_SIZE = 50;
const HOUR_MS = 3600000;
const DAY_MS = 86400000;
const SVG_NS = 'http://www.w3.org/2000/svg';

const $ = (id) => document.getElementById(id);

// ---- Formatting ----

// Money: USD with 6 significant digits, so a sub-cent request cost still shows ($0.000039),
// and at least cents.
const usdDigits = new Intl.NumberFormat('en-US', { maximumSignificantDigits: 6 });
function usd(value) {
  if (value === null || value === undefined) return '—';
  let text = usdDigits.format(Math.abs(value));
  const dot = text.indexOf('.');
  if (dot < 0) text += '.00';
  else if (text.length - dot === 2) text += '0';
  return (value < 0 ? '-$' : '$') + text;
}

// An axis label: 3 significant digits are enough to read a scale ($0.0025, $250).
const axisDigits = new Intl.NumberFormat('en-US', { maximumSignificantDigits: 3 });
const usdAxis = (value) => '$' + axisDigits.format(value);

const countFormat = new Intl.NumberFormat('en-US');
const count = (n) => (n === null || n === undefined ? '—' : countFormat.format(n));
function percent(share) {
  if (share === null || share === undefined) return '—';
  if (share > 0 && share < 0.001) return '<0.1%';
  return (100 * share).toFixed(1) + '%';
}
const plural = (n, one, many) => count(n) + ' ' + (n === 1 ? one : many);

// Seconds (a latency quantile) as milliseconds.
function millis(seconds) {
  if (seconds === null || seconds === undefined) return '—';
  const ms = seconds * 1000;
  return (ms < 10 ? ms.toFixed(1) : countFormat.format(Math.round(ms))) + ' ms';
}

// RFC 3339 (always Z) to "YYYY-MM-DD HH:MM:SS UTC"; utcMinute stops at the minute.
const utc = (rfc3339) => rfc3339.replace('T', ' ').replace(/(\.\d+)?Z$/, ' UTC');
const utcMinute = (rfc3339) => utc(rfc3339).slice(0, 16) + ' UTC';

const MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'];
const dayLabel = (ms) => { const d = new Date(ms); return MONTHS[d.getUTCMonth()] + ' ' + d.getUTCDate(); };
const hourLabel = (ms) => String(new Date(ms).getUTCHours()).padStart(2, '0') + ':00';

// A bucket of a chart: "2026-12-06 07:00–08:00 UTC", or "2026-12-06 UTC" for a day.
function bucketLabel(startMs, bucketMs) {
  const start = new Date(startMs).toISOString();
  if (bucketMs >= DAY_MS) return start.slice(0, 10) + ' UTC';
  const end = new Date(startMs + bucketMs).toISOString();
  return start.slice(0, 10) + ' ' + start.slice(11, 16) + '–' + end.slice(11, 16) + ' UTC';
}

// The same, short: "Dec 6 07:00–08:00", "Dec 6" (where UTC is said once nearby).
function bucketShort(startMs, bucketMs) {
  if (bucketMs >= DAY_MS) return dayLabel(startMs);
  return dayLabel(startMs) + ' ' + hourLabel(startMs) + '–' + hourLabel(startMs + bucketMs);
}

// An instant to the minute, short: "Dec 6 07:00" (where UTC is said once nearby).
const minuteShort = (rfc3339) => dayLabel(Date.parse(rfc3339)) + ' ' + new Date(Date.parse(rfc3339)).toISOString().slice(11, 16);

// ---- DOM ----

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function cell(row, text, className) {
  const td = element('td', className, text);
  row.appendChild(td);
  return td;
}

// A numeric cell's class, red when `bad`.
const numClass = (bad) => (bad ? 'num negative' : 'num');

// `name`, then its tier as a small tag.
function nameWithTier(node, name, tier) {
  node.append(name);
  if (tier) node.append(' ', element('span', 'tag', tier));
  return node;
}

function showError(id, error) {
  const node = $(id);
  node.textContent = error ? 'Could not load: ' + error.message : '';
  node.hidden = !error;
}

// Labelled bars as a list: items of {label, tag, value, share (0..1), className}.
function barList(list, items, emptyText) {
  list.replaceChildren();
  if (items.length === 0) list.appendChild(element('li', 'empty', emptyText));
  for (const it of items) {
    const fill = element('span', 'bar-fill' + (it.className ? ' ' + it.className : ''));
    // A CSSOM property, not a style attribute: the CSP allows it.
    fill.style.width = (100 * Math.min(1, Math.max(0, it.share))).toFixed(2) + '%';
    const track = element('span', 'bar-track');
    track.appendChild(fill);
    const item = element('li');
    item.append(nameWithTier(element('span', 'bar-label'), it.label, it.tag), element('span', 'bar-value', it.value), track);
    list.appendChild(item);
  }
}

// Counts by key as bars, most first: {key: n} over `total`.
function countBars(list, counts, total, emptyText, options = {}) {
  const items = Object.entries(counts)
    .sort((a, b) => b[1] - a[1])
    .map(([key, n]) => ({
      label: key,
      tag: options.tag ? options.tag(key) : undefined,
      value: (options.format || count)(n) + ' · ' + percent(total > 0 ? n / total : 0),
      share: total > 0 ? n / total : 0,
      className: options.bad && options.bad(key) ? 'bad' : '',
    }));
  barList(list, items, emptyText);
}

// ---- Loading ----

async function getJson(path) {
  const response = await fetch(path, { credentials: 'same-origin', headers: { Accept: 'application/json' } });
  if (response.status === 401) {
    // The session ended (expired, signed out elsewhere, admin key changed): the login form.
    window.location.assign('/dashboard');
    throw new Error('signed out');
  }
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const message = body && body.error ? body.error.message : 'HTTP ' + response.status;
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return body;
}

// The number of the latest load of each part: only the latest answer is drawn (a refresh, or
// a fast double click, can have two under way).
const latest = new Map();
const nextLoad = (part) => { const n = (latest.get(part) || 0) + 1; latest.set(part, n); return n; };
const isLatest = (part, n) => latest.get(part) === n;

// Loads one part of the page: `busy` is the element whose aria-busy says so (and names the
// part), `errorId` the element that shows a failure.
async function load(busy, errorId, get, render, failed) {
  const n = nextLoad(busy);
  $(busy).setAttribute('aria-busy', 'true');
  try {
    const answer = await get();
    if (!isLatest(busy, n)) return;
    render(answer);
    showError(errorId, null);
  } catch (error) {
    if (!isLatest(busy, n)) return;
    showError(errorId, error);
    if (failed) failed(error);
  }
  $(busy).setAttribute('aria-busy', 'false');
}

// ---- Charts ----

// Each chart is drawn to its box's width in CSS pixels (so its text keeps its size on a
// phone), and drawn again when that width changes.
const charts = new Map();

function drawChart(box, draw) {
  charts.set(box.id, { draw, width: 0 });
  redrawChart(box.id);
}

function redrawChart(id) {
  const box = $(id);
  const chart = charts.get(id);
  if (!box || !chart) return;
  const width = Math.floor(box.clientWidth);
  if (width === 0) return; // hidden: drawn when it is shown
  chart.width = width;
  box.replaceChildren();
  chart.draw(box, width);
}

let resizeFrame = 0;
window.addEventListener('resize', () => {
  cancelAnimationFrame(resizeFrame);
  resizeFrame = requestAnimationFrame(() => {
    for (const [id, chart] of charts) {
      const box = $(id);
      if (box && Math.floor(box.clientWidth) !== chart.width) redrawChart(id);
    }
  });
});

function svg(parent, tag, attributes, className) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes || {})) node.setAttribute(name, String(value));
  if (className) node.setAttribute('class', className);
  parent.appendChild(node);
  return node;
}

function svgText(parent, x, y, text, className, anchor) {
  const node = svg(parent, 'text', { x, y, 'text-anchor': anchor || 'start' }, className);
  node.textContent = text;
  return node;
}

// A rectangle, unless it has no height.
function rect(parent, x, y, width, height, className) {
  if (height > 0) svg(parent, 'rect', { x, y, width, height }, className);
}

// The SVG root and its plot area (with room for the axes' labels), `x(ms)` and `y(usd)`
// mapping into it once `domain` is set.
function chartFrame(box, width, label) {
  const height = width < 480 ? 180 : 250;
  const root = svg(box, 'svg', { viewBox: `0 0 ${width} ${height}`, width, height, role: 'img', 'aria-label': label }, 'chart-svg');
  const area = { left: 58, right: width - 12, top: 12, bottom: height - 26 };
  area.width = area.right - area.left;
  area.height = area.bottom - area.top;
  area.domain = (fromMs, toMs, topUsd) => {
    area.x = (ms) => area.left + ((ms - fromMs) / (toMs - fromMs)) * area.width;
    area.y = (value) => area.bottom - (topUsd > 0 ? (value / topUsd) * area.height : 0);
  };
  return { root, area };
}

// A round top for the money axis, at or above `max`: 1, 2, 2.5 or 5 times a power of ten.
function niceTop(max) {
  if (!(max > 0)) return 0;
  const power = 10 ** Math.floor(Math.log10(max));
  for (const step of [1, 2, 2.5, 5]) if (step * power >= max * (1 - 1e-9)) return step * power;
  return 10 * power;
}

// Gridlines at 0, half and the top, labelled with money.
function moneyAxis(root, area, top) {
  for (const f of top > 0 ? [0, 0.5, 1] : [0]) {
    const y = area.bottom - f * area.height;
    svg(root, 'line', { x1: area.left, x2: area.right, y1: y, y2: y }, f === 0 ? 'axis' : 'grid');
    svgText(root, area.left - 6, y + 4, usdAxis(f * top), 'tick-label', 'end');
  }
}

// A few ticks along [fromMs, toMs] on whole UTC hours or days, as many as fit. An hour's tick
// is an instant (midnight shows the date, other hours the time; the first tick shows both);
// a day's label sits under the middle of its day. A label that would touch the one before is
// left out.
function timeAxis(root, area, fromMs, toMs, hourly) {
  const unit = hourly ? HOUR_MS : DAY_MS;
  const room = Math.max(2, Math.floor(area.width / 70));
  const span = (toMs - fromMs) / unit;
  const steps = hourly ? [1, 2, 3, 6, 12, 24, 48, 96, 168] : [1, 2, 7, 14, 28, 56, 91, 182, 364];
  const step = steps.find((s) => span / s <= room) || steps[steps.length - 1];
  // Weekly ticks fall on Mondays (day 0 of the epoch was a Thursday).
  const offset = !hourly && step % 7 === 0 ? 3 : 0;
  const phase = (t) => (Math.round(t / unit) + offset) % step;
  // The first bucket is labelled too (it says where the axis begins), unless a tick is near.
  const first = Math.ceil(fromMs / unit) * unit;
  const labelFirst = phase(first) === 0 || step - phase(first) >= step / 2;
  let taken = -Infinity; // the right end of the last label drawn
  for (let t = first; hourly ? t <= toMs : t < toMs; t += unit) {
    if (phase(t) !== 0 && !(t === first && labelFirst)) continue;
    const midnight = new Date(t).getUTCHours() === 0;
    const text = !hourly || midnight ? dayLabel(t) : t === first ? dayLabel(t) + ' ' + hourLabel(t) : hourLabel(t);
    const x = area.x(t);
    const at = hourly ? x : area.x(Math.min(t + unit / 2, toMs));
    const width = text.length * 6.5; // about, at 11px
    const anchor = at - area.left < width / 2 ? 'start' : area.right - at < width / 2 ? 'end' : 'middle';
    const left = anchor === 'start' ? at : anchor === 'end' ? at - width : at - width / 2;
    if (left < taken + 8) continue;
    taken = left + width;
    svg(root, 'line', { x1: x, x2: x, y1: area.bottom, y2: area.bottom + 4 }, 'axis');
    svgText(root, at, area.bottom + 17, text, 'tick-label', anchor);
  }
}

// A transparent band over one bucket that carries its <title> (the tooltip) and shows it in
// `readout` when pointed at or tapped.
function bucketBand(parent, area, x0, x1, title, readout, data) {
  const group = svg(parent, 'g', data, 'bucket');
  svg(group, 'title').textContent = title;
  rect(group, x0, area.top, Math.max(1, x1 - x0), area.height, 'bucket-hit');
  const show = () => { readout.textContent = title.replaceAll('\n', ' · '); };
  group.addEventListener('pointerenter', show);
  group.addEventListener('click', show);
  return group;
}

function emptyNote(root, area, text) {
  svgText(root, area.left + area.width / 2, area.top + area.height / 2, text, 'chart-empty', 'middle');
}

// `/admin/dashboard/spend` as bars, one per bucket: premium backends' spend at the bottom,
// the others' above it.
function drawSpendBars(box, width, answer, readout) {
  const bucketMs = answer.bucket === 'day' ? DAY_MS : HOUR_MS;
  const fromMs = Date.parse(answer.from);
  const toMs = Date.parse(answer.to);
  const label = 'Spend per ' + answer.bucket + ', ' + utcMinute(answer.from) + ' to ' + utcMinute(answer.to) +
    ': ' + usd(answer.totals.spend_usd) + ' in all';
  const { root, area } = chartFrame(box, width, label);
  const top = niceTop(Math.max(0, ...answer.points.map((p) => p.spend_usd)));
  area.domain(fromMs, toMs, top);
  moneyAxis(root, area, top);
  timeAxis(root, area, fromMs, toMs, bucketMs < DAY_MS);
  for (const p of answer.points) {
    const start = Date.parse(p.start);
    const x0 = area.x(start);
    const x1 = area.x(start + bucketMs);
    const title = bucketLabel(start, bucketMs) + '\n' + usd(p.spend_usd) + ' spent (' + usd(p.premium_spend_usd) +
      ' on premium backends)\n' + plural(p.requests, 'request', 'requests') + ', ' + plural(p.errors, 'error', 'errors');
    const group = bucketBand(root, area, x0, x1, title, readout, { 'data-start': p.start });
    if (p.spend_usd > 0) {
      const barWidth = Math.max(1, (x1 - x0) * 0.72);
      const x = x0 + (x1 - x0 - barWidth) / 2;
      // A bucket with any spend shows at least a pixel.
      const height = Math.max(1, area.bottom - area.y(p.spend_usd));
      const premium = height * Math.min(1, p.premium_spend_usd / p.spend_usd);
      rect(group, x, area.bottom - height, barWidth, height - premium, 'bar-rest');
      rect(group, x, area.bottom - premium, barWidth, premium, 'bar-premium');
    }
  }
  if (top === 0) emptyNote(root, area, answer.totals.requests > 0 ? 'Requests, but no spend, in this window.' : 'No spend in this window.');
}

// One user's budget period: the spend so far, cumulative, against the budget and the pace
// line (from nothing at the period's start to the budget at its end).
function drawPeriod(box, width, u, answer, readout) {
  const startMs = Date.parse(u.period_start);
  const endMs = Date.parse(u.period_end);
  const nowMs = Math.min(Date.now(), endMs);
  const bucketMs = answer.bucket === 'day' ? DAY_MS : HOUR_MS;
  const budget = u.budget_usd !== null && u.budget_usd > 0 ? u.budget_usd : null;
  let total = 0;
  const steps = answer.points.map((p) => {
    total += p.spend_usd;
    const start = Date.parse(p.start);
    return { p, start, end: Math.min(start + bucketMs, nowMs), total };
  }).filter((s) => s.start < nowMs);
  const label = 'Spend this ' + u.period + ': ' + usd(total) + (budget ? ' of a ' + usd(budget) + ' budget' : '');
  const { root, area } = chartFrame(box, width, label);
  const top = niceTop(Math.max(total, budget || 0));
  area.domain(startMs, endMs, top);
  moneyAxis(root, area, top);
  timeAxis(root, area, startMs, endMs, bucketMs < DAY_MS);

  for (const s of steps) {
    const title = bucketLabel(s.start, bucketMs) + '\n' + usd(s.p.spend_usd) + ' spent, ' +
      plural(s.p.requests, 'request', 'requests') + '\n' + usd(s.total) + ' so far' +
      (budget ? ' (pace line: ' + usd(budget * Math.min(1, (s.end - startMs) / (endMs - startMs))) + ')' : '');
    bucketBand(root, area, area.x(s.start), area.x(Math.min(s.start + bucketMs, endMs)), title, readout, { 'data-start': s.p.start });
  }
  if (budget) {
    svg(root, 'line', { x1: area.left, x2: area.right, y1: area.y(budget), y2: area.y(budget) }, 'budget-line');
    svgText(root, area.left + 6, area.y(budget) + 14, 'budget ' + usdAxis(budget), 'line-label');
    svg(root, 'line', { x1: area.x(startMs), y1: area.y(0), x2: area.x(endMs), y2: area.y(budget) }, 'pace-line');
  }
  const line = [[area.x(startMs), area.y(0)], ...steps.map((s) => [area.x(s.end), area.y(s.total)])];
  const points = line.map(([x, y]) => x.toFixed(1) + ',' + y.toFixed(1)).join(' ');
  const last = line[line.length - 1];
  svg(root, 'polygon', { points: points + ` ${last[0].toFixed(1)},${area.bottom} ${area.left},${area.bottom}` }, 'spent-area');
  svg(root, 'polyline', { points }, 'spent-line');
  svg(root, 'circle', { cx: last[0], cy: last[1], r: 3.5 }, 'spent-dot');
  if (top === 0) emptyNote(root, area, 'No spend this period and no budget.');
}

// A chart's legend: [swatch class, text] pairs.
function legend(id, keys) {
  $(id).replaceChildren(...keys.map(([swatch, text]) => {
    const key = element('span', 'key');
    key.append(element('i', 'swatch ' + swatch), text);
    return key;
  }));
}

// ---- Overview ----

// The latest overview and backends answers: the user view takes each backend's tier from them.
let lastOverview = null;
let lastBackends = null;

// "Today (UTC)" and "This month (UTC)": the ledger's rollups from `p.from`.
function renderPeriodCard(prefix, p) {
  $(prefix + '-spend').textContent = p ? usd(p.spend_usd) : '—';
  $(prefix + '-sub').textContent = p
    ? plural(p.requests, 'request', 'requests') + ' (' + count(p.premium_requests) + ' premium), ' +
      plural(p.errors, 'error', 'errors') + '; the ledger since ' + utcMinute(p.from)
    : 'not available';
}

function renderOverview(o) {
  lastOverview = o;
  $('stamp').textContent = 'Updated ' + utc(o.generated_at);
  $('overview-scope').textContent = 'Today and this month: the ledger. The rest: since start (' +
    utc(o.started_at) + '), this replica.';

  renderPeriodCard('today', o.today);
  renderPeriodCard('month', o.month);
  $('spend').textContent = usd(o.spend_usd);
  $('spend-sub').textContent = plural(o.requests.total, 'request', 'requests') +
    ' through a backend, this replica; hourly backends idle: ' + usd(o.idle_cost_usd);
  $('savings').textContent = usd(o.savings_usd);
  $('premium').textContent = percent(o.premium_share.share);
  $('premium-sub').textContent = count(o.premium_share.premium_tokens) + ' of ' +
    count(o.premium_share.tokens) + " tokens on a route's best backend";
  if (o.cache) {
    $('cache').textContent = percent(o.cache.hit_rate);
    $('cache-sub').textContent = plural(o.cache.hits, 'hit', 'hits') + ', ' +
      plural(o.cache.misses, 'miss', 'misses') + '; saved ' + usd(o.cache.saved_usd);
  } else {
    $('cache').textContent = 'off';
    $('cache-sub').textContent = 'no [cache] in the config';
  }
  $('refusals').textContent = count(o.refusals.total);
  const codes = Object.entries(o.refusals.by_code).sort((a, b) => b[1] - a[1]);
  $('refusals-sub').textContent = codes.length
    ? codes.slice(0, 3).map(([code, n]) => code + ' ' + count(n)).join(', ')
    : 'none';

  const reasons = Object.fromEntries(o.reasons.map((r) => [r.reason, r.requests]));
  countBars($('reasons'), reasons, o.requests.total, 'No requests yet.');
  countBars($('statuses'), o.requests.by_status, o.requests.total, 'No requests yet.', { bad: (code) => Number(code) >= 400 });
}

const loadOverview = () =>
  load('overview', 'overview-error', () => getJson('/admin/dashboard/overview'), renderOverview);

// ---- Spend over time ----

// The window asked for, and the one last drawn.
const spendChart = { bucket: 'hour', drawn: null };

function renderSpend(a) {
  const t = a.totals;
  const bucketMs = a.bucket === 'day' ? DAY_MS : HOUR_MS;
  $('spend-window').textContent = minuteShort(a.from) + ' to ' + minuteShort(a.to) + ' UTC';
  $('spend-total').textContent = usd(t.spend_usd);
  $('spend-premium').textContent = usd(t.premium_spend_usd) +
    (t.spend_usd > 0 ? ' (' + percent(t.premium_spend_usd / t.spend_usd) + ')' : '') +
    ', ' + plural(t.premium_requests, 'request', 'requests');
  $('spend-requests').textContent = count(t.requests);
  $('spend-errors').textContent = count(t.errors);
  $('spend-errors').classList.toggle('negative', t.errors > 0);
  $('spend-tokens').textContent = count(t.prompt_tokens) + ' / ' + count(t.completion_tokens);
  $('spend-peak-label').textContent = a.bucket === 'day' ? 'Busiest day' : 'Busiest hour';
  const peak = a.points.reduce((best, p) => (best === null || p.spend_usd > best.spend_usd ? p : best), null);
  $('spend-peak').textContent = peak && peak.spend_usd > 0
    ? usd(peak.spend_usd) + ', ' + bucketShort(Date.parse(peak.start), bucketMs) + ' UTC'
    : '—';
  // A refresh keeps what the readout shows; a new window starts it again.
  if (spendChart.drawn !== a.bucket) $('spend-readout').textContent = 'Point at a bar, or tap it, for its figures.';
  spendChart.drawn = a.bucket;
  drawChart($('spend-chart'), (box, width) => drawSpendBars(box, width, a, $('spend-readout')));
}

function chooseBucket(bucket) {
  spendChart.bucket = bucket;
  for (const button of document.querySelectorAll('#spend-panel .toggle button')) {
    button.setAttribute('aria-pressed', String(button.dataset.bucket === bucket));
  }
  loadSpend();
}

const loadSpend = () =>
  load('spend-panel', 'spend-error', () => getJson('/admin/dashboard/spend?bucket=' + spendChart.bucket), renderSpend);

// ---- Backends ----

function renderBackends(a) {
  lastBackends = a;
  $('backends-scope').textContent = 'Last 24 h: the ledger, ' + minuteShort(a.window.from) + ' to ' +
    minuteShort(a.window.to) + ' UTC. Latency, utilisation and idle cost: since start, this replica.';
  const body = $('backends-table').tBodies[0];
  body.replaceChildren();
  const all = { inFlight: 0, requests: 0, errors: 0, spend: 0, idle: 0 };
  for (const b of a.backends) {
    const row = body.insertRow();
    nameWithTier(cell(row, '', 'name'), b.name, b.tier);
    const health = !b.configured ? 'removed' : b.up === null ? '—' : b.up ? 'up' : 'down';
    cell(row, health, 'state-' + (health === '—' ? 'unknown' : health));
    const inFlight = b.in_flight === null ? '—' : count(b.in_flight) + (b.max_in_flight === null ? '' : ' / ' + count(b.max_in_flight));
    cell(row, inFlight, 'num');
    const day = b.last_24h;
    cell(row, count(day.requests), 'num');
    cell(row, count(day.errors), numClass(day.errors > 0));
    cell(row, usd(day.spend_usd), 'num');
    for (const [histogram, quantile] of [['latency_seconds', 'p50'], ['latency_seconds', 'p90'], ['latency_seconds', 'p99'], ['ttft_seconds', 'p50']]) {
      const h = b[histogram];
      const td = cell(row, millis(h ? h[quantile] : null), 'num');
      if (h) td.title = 'of ' + plural(h.count, 'request', 'requests') + ' since start';
    }
    cell(row, percent(b.utilisation), 'num');
    cell(row, b.pricing === 'per_hour' ? usd(b.idle_cost_usd) : '—', 'num');
    all.inFlight += b.in_flight || 0;
    all.requests += day.requests;
    all.errors += day.errors;
    all.spend += day.spend_usd;
    all.idle += b.pricing === 'per_hour' ? b.idle_cost_usd : 0;
  }
  const total = body.insertRow();
  total.className = 'total';
  for (const [text, className] of [
    ['All'], [''], [count(all.inFlight), 'num'], [count(all.requests), 'num'], [count(all.errors), numClass(all.errors > 0)],
    [usd(all.spend), 'num'], [''], [''], [''], [''], [''], [usd(all.idle), 'num'],
  ]) cell(total, text, className);
}

const loadBackends = () =>
  load('backends', 'backends-error', () => getJson('/admin/dashboard/backends'), renderBackends);

// ---- Users ----

const params = new URLSearchParams(window.location.search);
const SORTS = ['name', 'spent', 'margin', 'budget_used', 'projection', 'premium_share', 'requests'];
// The order a column's header asks for first: the margin's most negative (the losses) first.
const FIRST_ORDER = { margin: 'asc' };
// A budget's period after its amount, short: "$100.00/mo".
const PER_PERIOD = { day: '/day', month: '/mo', total: ' in all' };
// What a user lacks to have each figure: such users come last whichever the order.
const WITHOUT = {
  margin: 'a plan price',
  budget_used: 'a budget',
  projection: 'a period end (a total budget)',
  premium_share: 'requests this period',
};

const users = {
  limit: Math.min(1000, Math.max(1, parseInt(params.get('limit'), 10) || DEFAULT_PAGE_SIZE)),
  cursor: null,
  // The cursors of the pages before this one: Previous pops.
  previous: [],
  next: null,
};

function readFilters() {
  const sort = $('sort').value;
  return {
    sort,
    // The server ignores the order for names.
    order: sort === 'name' ? null : $('order').value,
    plan: $('filter-plan').value.trim(),
    team: $('filter-team').value.trim(),
    overPrice: $('over-price').checked,
  };
}

// The filters as a query: what the API takes, and what the address keeps (not the cursor, so
// a reload or a shared link shows the same first page). Defaults are left out of the address.
function filterQuery(forAddress) {
  const f = readFilters();
  const query = new URLSearchParams();
  if (!forAddress || users.limit !== DEFAULT_PAGE_SIZE) query.set('limit', String(users.limit));
  if (!forAddress || f.sort !== 'name') query.set('sort', f.sort);
  if (f.order && (!forAddress || f.order !== 'desc')) query.set('order', f.order);
  if (f.plan) query.set('plan', f.plan);
  if (f.team) query.set('team', f.team);
  if (f.overPrice) query.set('over_price', 'true');
  return query;
}

function usersUrl() {
  const query = filterQuery(false);
  if (users.cursor !== null) query.set('cursor', users.cursor);
  return '/admin/usage?' + query.toString();
}

function rememberFilters() {
  const search = filterQuery(true).toString();
  window.history.replaceState(null, '', '/dashboard' + (search ? '?' + search : '') + window.location.hash);
}

// The sort controls and the headers' arrows as the filters say.
function showSort() {
  const f = readFilters();
  $('order').disabled = f.order === null;
  for (const th of $('users-table').tHead.querySelectorAll('th[data-sort]')) {
    if (th.dataset.sort === f.sort) th.setAttribute('aria-sort', f.order === 'asc' || f.order === null ? 'ascending' : 'descending');
    else th.removeAttribute('aria-sort');
  }
  $('sort-note').hidden = !(f.sort in WITHOUT);
  if (f.sort in WITHOUT) $('sort-note').textContent = 'Users without ' + WITHOUT[f.sort] + ' are listed last, whichever the order.';
}

// The sortable headers become buttons: a click sorts by that column, a second click reverses.
function sortableHeaders() {
  for (const th of $('users-table').tHead.querySelectorAll('th[data-sort]')) {
    const button = element('button', 'sort', th.textContent);
    button.type = 'button';
    th.replaceChildren(button);
    button.addEventListener('click', () => {
      const sort = th.dataset.sort;
      if ($('sort').value === sort) {
        $('order').value = $('order').value === 'desc' ? 'asc' : 'desc';
      } else {
        $('sort').value = sort;
        $('order').value = FIRST_ORDER[sort] || 'desc';
      }
      firstPage();
    });
  }
}

function renderUsers(page) {
  const body = $('users-table').tBodies[0];
  body.replaceChildren();
  for (const u of page.data) {
    const row = body.insertRow();
    const link = element('a', '', u.user);
    link.href = '#user=' + encodeURIComponent(u.user);
    cell(row, '', 'name').appendChild(link);
    cell(row, u.plan ?? '—');
    cell(row, u.team ?? '—');
    cell(row, usd(u.spent_usd), 'num');
    cell(row, u.budget_usd === null ? '—' : usd(u.budget_usd) + PER_PERIOD[u.period], 'num');
    cell(row, percent(u.budget_used), numClass(u.budget_used !== null && u.budget_used >= 1));
    const overBudget = u.projection_usd !== null && u.budget_usd !== null && u.projection_usd > u.budget_usd;
    cell(row, usd(u.projection_usd), numClass(overBudget));
    cell(row, usd(u.price_usd), 'num');
    cell(row, usd(u.margin_usd), numClass(u.margin_usd !== null && u.margin_usd < 0));
    cell(row, count(u.requests), 'num');
    cell(row, percent(u.premium_share), 'num');
    cell(row, count(u.prompt_tokens + u.completion_tokens), 'num');
  }
  $('users-empty').hidden = page.data.length > 0;
  users.next = page.next_cursor;
  $('next').disabled = users.next === null;
  $('prev').disabled = users.previous.length === 0;
  $('page-label').textContent = 'Page ' + (users.previous.length + 1);
}

function loadUsers() {
  $('next').disabled = true;
  $('prev').disabled = true;
  showSort();
  return load('users', 'users-error', () => getJson(usersUrl()), renderUsers, () => {
    $('prev').disabled = users.previous.length === 0;
  });
}

function firstPage() {
  users.cursor = null;
  users.previous = [];
  rememberFilters();
  loadUsers();
}

// ---- One user ----

// The user named by the address (`#user=NAME`), or null for the users list.
function userInHash() {
  const hash = window.location.hash;
  if (!hash.startsWith('#user=')) return null;
  try {
    return decodeURIComponent(hash.slice('#user='.length)) || null;
  } catch {
    return null;
  }
}

// How much of the budget period has gone by (0..1), or null without a period end.
function elapsedFraction(u, nowMs) {
  if (!u.period_end) return null;
  const start = Date.parse(u.period_start);
  const length = Date.parse(u.period_end) - start;
  if (!(length > 0)) return null;
  return Math.min(1, Math.max(0, (nowMs - start) / length));
}

function renderUserUsage(u, tiers) {
  $('user-title').textContent = u.user;
  $('user-scope').textContent = 'Plan ' + (u.plan ?? '—') + ' · team ' + (u.team ?? '—') +
    ' · period ' + u.period + ' since ' + utc(u.period_start) + (u.period_end ? ', until ' + utc(u.period_end) : '');

  const fraction = elapsedFraction(u, Date.now());
  $('user-spent').textContent = usd(u.spent_usd);
  const hasBudget = u.budget_usd !== null && u.budget_usd > 0;
  $('user-meter').hidden = !hasBudget;
  if (hasBudget) {
    const used = u.spent_usd / u.budget_usd;
    $('user-meter-fill').style.width = (100 * Math.min(1, used)).toFixed(2) + '%';
    $('user-meter-fill').classList.toggle('over', used >= 1);
    $('user-meter-pace').hidden = fraction === null;
    if (fraction !== null) {
      $('user-meter-pace').style.left = (100 * fraction).toFixed(2) + '%';
      $('user-meter-pace').title = 'pace: ' + usd(u.budget_usd * fraction) + ' by now';
    }
    $('user-spent-sub').textContent = percent(used) + ' of ' + usd(u.budget_usd) + ' / ' + u.period +
      (fraction === null ? '' : '; pace line at ' + usd(u.budget_usd * fraction));
  } else {
    $('user-spent-sub').textContent = 'no budget';
  }

  const projected = u.projection_usd;
  $('user-projection').textContent = usd(projected);
  $('user-projection').classList.toggle('negative', hasBudget && projected !== null && projected > u.budget_usd);
  $('user-projection-sub').textContent = projected === null
    ? 'a total budget has no period end'
    : 'at this pace, by the end of the ' + u.period + (hasBudget ? ' (' + percent(projected / u.budget_usd) + ' of the budget)' : '');

  $('user-price').textContent = usd(u.price_usd);
  $('user-price-sub').textContent = u.price_usd === null ? 'no plan price' : 'per ' + u.period;
  $('user-margin').textContent = usd(u.margin_usd);
  $('user-margin').classList.toggle('negative', u.margin_usd !== null && u.margin_usd < 0);

  const backends = Object.entries(u.by_backend);
  const spent = Object.fromEntries(backends.map(([name, b]) => [name, b.spent_usd]));
  const requests = Object.fromEntries(backends.map(([name, b]) => [name, b.requests]));
  const tag = (name) => tiers.get(name);
  countBars($('user-spend-mix'), spent, u.spent_usd, 'No spend this period.', { tag, format: usd });
  countBars($('user-request-mix'), requests, u.requests, 'No requests this period.', { tag });
}

// The user's spend over its budget period: hourly for a day, daily for a month; a total budget
// has no period to draw, so its last 31 days, daily.
function userSpendUrl(u) {
  const query = new URLSearchParams({ user: u.user, bucket: u.period === 'day' ? 'hour' : 'day' });
  if (u.period_end) query.set('from', u.period_start);
  return '/admin/dashboard/spend?' + query.toString();
}

function renderUserChart(u, chart) {
  const readout = $('user-chart-readout');
  readout.textContent = 'Point at the chart, or tap it, for ' + (u.period === 'day' ? "an hour's" : "a day's") + ' figures.';
  showError('user-chart-error', chart.error || null);
  if (chart.error) {
    charts.delete('user-chart');
    $('user-chart').replaceChildren();
    legend('user-chart-legend', []);
    return;
  }
  if (u.period_end) {
    $('user-chart-title').textContent = 'Spend this ' + u.period + ' (UTC), cumulative';
    const keys = [['spent', 'spent so far']];
    if (u.budget_usd !== null && u.budget_usd > 0) keys.push(['budget', 'budget'], ['pace', 'pace line']);
    legend('user-chart-legend', keys);
    drawChart($('user-chart'), (box, width) => drawPeriod(box, width, u, chart.answer, readout));
  } else {
    $('user-chart-title').textContent = 'Spend by day, last 31 days (UTC)';
    legend('user-chart-legend', [['premium', 'premium backends'], ['rest', 'the others']]);
    drawChart($('user-chart'), (box, width) => drawSpendBars(box, width, chart.answer, readout));
  }
}

function renderUserRequests(records) {
  const body = $('user-requests').tBodies[0];
  body.replaceChildren();
  const newestFirst = records.slice().reverse();
  for (const r of newestFirst) {
    const row = body.insertRow();
    cell(row, utc(r.at));
    cell(row, r.backend);
    cell(row, r.reason);
    cell(row, count(r.prompt_tokens + r.completion_tokens), 'num');
    cell(row, usd(r.cost_usd), 'num');
    cell(row, String(r.status), numClass(r.status >= 400));
    cell(row, count(r.latency_ms), 'num');
  }
  $('user-requests-count').textContent = '(last ' + plural(records.length, 'request', 'requests') + ')';
  $('user-requests-empty').hidden = records.length > 0;
}

function renderUserKeys(keys) {
  const body = $('user-keys').tBodies[0];
  body.replaceChildren();
  $('user-keys-note').hidden = keys !== null && keys.length > 0;
  $('user-keys-scroll').hidden = keys === null || keys.length === 0;
  if (keys === null) {
    $('user-keys-note').textContent = 'A config user: its key is in the config file (only its SHA-256).';
    return;
  }
  $('user-keys-note').textContent = 'No keys.';
  for (const k of keys) {
    const row = body.insertRow();
    cell(row, k.label ?? '—');
    cell(row, k.prefix + '…', 'mono');
    cell(row, utc(k.created_at));
    cell(row, k.last_used_at ? utc(k.last_used_at) : 'never');
    let state = 'active';
    if (k.revoked) state = 'revoked';
    else if (k.expires_at && new Date(k.expires_at).getTime() <= Date.now()) state = 'expired ' + utc(k.expires_at);
    else if (k.expires_at) state = 'expires ' + utc(k.expires_at);
    cell(row, state, k.revoked || state.startsWith('expired') ? 'negative' : '');
  }
}

// Each backend's tier, from the latest answer that lists them.
async function backendTiers() {
  const known = lastBackends || lastOverview || (await getJson('/admin/dashboard/backends').catch(() => null));
  return new Map((known ? known.backends : []).filter((b) => b.tier).map((b) => [b.name, b.tier]));
}

async function loadUser(name) {
  const n = nextLoad('user');
  const section = $('user');
  section.setAttribute('aria-busy', 'true');
  $('user-title').textContent = name;
  $('user-scope').textContent = '';
  const path = encodeURIComponent(name);
  const usage = getJson('/admin/usage/' + path);
  try {
    const [u, records, keys, tiers, chart] = await Promise.all([
      usage,
      getJson('/admin/requests?' + new URLSearchParams({ user: name, limit: '50' }).toString()),
      getJson('/admin/users/' + path + '/keys').then(
        (answer) => answer.data,
        (error) => {
          if (error.status === 404) return null; // not an API user: a config user
          throw error;
        },
      ),
      backendTiers(),
      // The chart failing leaves the rest of the view.
      usage.then((u) => getJson(userSpendUrl(u))).then((answer) => ({ answer }), (error) => ({ error })),
    ]);
    if (!isLatest('user', n)) return;
    $('user-body').hidden = false;
    renderUserUsage(u, tiers);
    renderUserChart(u, chart);
    renderUserRequests(records.data);
    renderUserKeys(keys);
    showError('user-error', null);
  } catch (error) {
    if (!isLatest('user', n)) return;
    $('user-body').hidden = true;
    const node = $('user-error');
    node.textContent = error.status === 404 ? 'No user is named “' + name + '”.' : 'Could not load: ' + error.message;
    node.hidden = false;
  }
  section.setAttribute('aria-busy', 'false');
}

// Shows the users list or one user's view, as the address says.
function route() {
  const name = userInHash();
  $('users').hidden = name !== null;
  $('user').hidden = name === null;
  if (name !== null) {
    loadUser(name);
    $('user').scrollIntoView({ block: 'start' });
  } else {
    nextLoad('user'); // an answer still under way is not drawn
    charts.delete('user-chart');
  }
}

function refresh() {
  loadOverview();
  loadSpend();
  loadBackends();
}

function start() {
  $('filter-plan').value = params.get('plan') ?? '';
  $('filter-team').value = params.get('team') ?? '';
  $('sort').value = SORTS.includes(params.get('sort')) ? params.get('sort') : 'name';
  $('order').value = params.get('order') === 'asc' ? 'asc' : 'desc';
  $('over-price').checked = params.get('over_price') === 'true';
  sortableHeaders();

  $('filters').addEventListener('submit', (event) => {
    event.preventDefault();
    firstPage();
  });
  for (const id of ['sort', 'order', 'over-price']) $(id).addEventListener('change', firstPage);
  $('next').addEventListener('click', () => {
    if (users.next === null) return;
    users.previous.push(users.cursor);
    users.cursor = users.next;
    loadUsers();
  });
  $('prev').addEventListener('click', () => {
    if (users.previous.length === 0) return;
    users.cursor = users.previous.pop();
    loadUsers();
  });
  for (const button of document.querySelectorAll('#spend-panel .toggle button')) {
    button.addEventListener('click', () => chooseBucket(button.dataset.bucket));
  }

  $('back').addEventListener('click', (event) => {
    event.preventDefault();
    // Back to the list, keeping its filters in the address.
    window.history.pushState(null, '', window.location.pathname + window.location.search);
    route();
  });
  window.addEventListener('hashchange', route);

  refresh();
  loadUsers();
  route();
  window.setInterval(refresh, REFRESH_MS);
}

start();
