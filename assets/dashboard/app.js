// The dashboard: reads the admin JSON API with the session cookie and draws it. No framework,
// no inline handlers (the page's CSP allows scripts from this file only); text goes in with
// textContent, never as HTML, so a user's name cannot become markup.
'use strict';

const OVERVIEW_REFRESH_MS = 15000;
const DEFAULT_PAGE_SIZE = 50;

const $ = (id) => document.getElementById(id);

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

const countFormat = new Intl.NumberFormat('en-US');
const count = (n) => (n === null || n === undefined ? '—' : countFormat.format(n));
function percent(share) {
  if (share === null || share === undefined) return '—';
  if (share > 0 && share < 0.001) return '<0.1%';
  return (100 * share).toFixed(1) + '%';
}
const plural = (n, one, many) => count(n) + ' ' + (n === 1 ? one : many);

// RFC 3339 (always Z) to "YYYY-MM-DD HH:MM:SS UTC".
const utc = (rfc3339) => rfc3339.replace('T', ' ').replace(/(\.\d+)?Z$/, ' UTC');

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

function showError(id, error) {
  const element = $(id);
  element.textContent = error ? 'Could not load: ' + error.message : '';
  element.hidden = !error;
}

function cell(row, text, className) {
  const td = document.createElement('td');
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

// ---- Overview ----

// The latest overview: the user view takes each backend's tier from it.
let lastOverview = null;

function renderOverview(o) {
  lastOverview = o;
  $('stamp').textContent = 'Updated ' + utc(o.generated_at);
  $('overview-scope').textContent = 'Since start (' + utc(o.started_at) + '), this replica';

  $('spend').textContent = usd(o.spend_usd);
  $('spend-sub').textContent = plural(o.requests.total, 'request', 'requests') +
    ' through a backend; hourly backends idle: ' + usd(o.idle_cost_usd);
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

  const body = $('backends').tBodies[0];
  body.replaceChildren();
  for (const b of o.backends) {
    const row = body.insertRow();
    const name = cell(row, b.name);
    if (b.tier) {
      const tier = document.createElement('span');
      tier.className = 'tag';
      tier.textContent = b.tier;
      name.append(' ', tier);
    }
    const state = b.up === null ? 'removed' : b.up ? 'up' : 'down';
    cell(row, state, 'state-' + state);
    cell(row, b.in_flight === null ? '—' : count(b.in_flight), 'num');
    cell(row, count(b.requests), 'num');
    cell(row, usd(b.spend_usd), 'num');
    cell(row, b.pricing === 'per_hour' ? usd(b.idle_cost_usd) : '—', 'num');
  }
  const totalRow = body.insertRow();
  totalRow.className = 'total';
  cell(totalRow, 'All');
  cell(totalRow, '');
  cell(totalRow, '');
  cell(totalRow, count(o.requests.total), 'num');
  cell(totalRow, usd(o.spend_usd), 'num');
  cell(totalRow, usd(o.idle_cost_usd), 'num');

  const reasons = $('reasons');
  reasons.replaceChildren();
  if (o.reasons.length === 0) {
    const item = document.createElement('li');
    item.className = 'empty';
    item.textContent = 'No requests yet.';
    reasons.appendChild(item);
  }
  for (const r of o.reasons) {
    const item = document.createElement('li');
    const label = document.createElement('span');
    label.className = 'bar-label';
    label.textContent = r.reason;
    const value = document.createElement('span');
    value.className = 'bar-value';
    value.textContent = count(r.requests) + ' · ' + percent(r.share);
    const track = document.createElement('span');
    track.className = 'bar-track';
    const fill = document.createElement('span');
    fill.className = 'bar-fill';
    // A CSSOM property, not a style attribute: the CSP allows it.
    fill.style.width = (100 * r.share).toFixed(2) + '%';
    track.appendChild(fill);
    item.append(label, value, track);
    reasons.appendChild(item);
  }
}

async function loadOverview() {
  try {
    renderOverview(await getJson('/admin/dashboard/overview'));
    showError('overview-error', null);
  } catch (error) {
    showError('overview-error', error);
  }
  $('overview').setAttribute('aria-busy', 'false');
}

// ---- Users ----

const params = new URLSearchParams(window.location.search);
const users = {
  limit: Math.min(1000, Math.max(1, parseInt(params.get('limit'), 10) || DEFAULT_PAGE_SIZE)),
  cursor: null,
  // The cursors of the pages before this one: Previous pops.
  previous: [],
  next: null,
  // Only the latest request's answer is drawn (a fast double click sends two).
  request: 0,
};

function readFilters() {
  return {
    sort: $('sort').value,
    plan: $('filter-plan').value.trim(),
    team: $('filter-team').value.trim(),
    overPrice: $('over-price').checked,
  };
}

function usersUrl() {
  const f = readFilters();
  const query = new URLSearchParams({ limit: String(users.limit), sort: f.sort });
  if (f.plan) query.set('plan', f.plan);
  if (f.team) query.set('team', f.team);
  if (f.overPrice) query.set('over_price', 'true');
  if (users.cursor !== null) query.set('cursor', users.cursor);
  return '/admin/usage?' + query.toString();
}

// Keeps the view in the address (not the cursor), so a reload or a shared link shows the same.
function rememberFilters() {
  const f = readFilters();
  const query = new URLSearchParams();
  if (users.limit !== DEFAULT_PAGE_SIZE) query.set('limit', String(users.limit));
  if (f.sort !== 'name') query.set('sort', f.sort);
  if (f.plan) query.set('plan', f.plan);
  if (f.team) query.set('team', f.team);
  if (f.overPrice) query.set('over_price', 'true');
  const search = query.toString();
  window.history.replaceState(null, '', '/dashboard' + (search ? '?' + search : ''));
}

function renderUsers(page) {
  const body = $('users-table').tBodies[0];
  body.replaceChildren();
  for (const u of page.data) {
    const row = body.insertRow();
    const name = cell(row, '', 'name');
    const link = document.createElement('a');
    link.href = '#user=' + encodeURIComponent(u.user);
    link.textContent = u.user;
    name.appendChild(link);
    cell(row, u.plan ?? '—');
    cell(row, u.team ?? '—');
    cell(row, usd(u.spent_usd), 'num');
    cell(row, u.budget_usd === null ? '—' : usd(u.budget_usd) + ' / ' + u.period, 'num');
    const used = u.budget_usd > 0 ? u.spent_usd / u.budget_usd : null;
    cell(row, percent(used), used !== null && used >= 1 ? 'num negative' : 'num');
    cell(row, usd(u.price_usd), 'num');
    cell(row, usd(u.margin_usd), u.margin_usd !== null && u.margin_usd < 0 ? 'num negative' : 'num');
    cell(row, count(u.requests), 'num');
    cell(row, count(u.prompt_tokens + u.completion_tokens), 'num');
  }
  $('users-empty').hidden = page.data.length > 0;
  users.next = page.next_cursor;
  $('next').disabled = users.next === null;
  $('prev').disabled = users.previous.length === 0;
  $('page-label').textContent = 'Page ' + (users.previous.length + 1);
  $('sort-note').hidden = readFilters().sort !== 'spent';
}

async function loadUsers() {
  const request = ++users.request;
  $('users').setAttribute('aria-busy', 'true');
  $('next').disabled = true;
  $('prev').disabled = true;
  try {
    const page = await getJson(usersUrl());
    if (request !== users.request) return;
    renderUsers(page);
    showError('users-error', null);
  } catch (error) {
    if (request !== users.request) return;
    showError('users-error', error);
    $('prev').disabled = users.previous.length === 0;
  }
  $('users').setAttribute('aria-busy', 'false');
}

function firstPage() {
  users.cursor = null;
  users.previous = [];
  rememberFilters();
  loadUsers();
}

// ---- One user ----

const userView = { request: 0 };

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

// How much of the budget period has gone by (0..1), or null for `total` (no end).
function elapsedFraction(period, periodStart, nowMs) {
  const start = new Date(periodStart);
  let end;
  if (period === 'day') {
    end = new Date(start.getTime() + 86400000);
  } else if (period === 'month') {
    end = new Date(Date.UTC(start.getUTCFullYear(), start.getUTCMonth() + 1, 1));
  } else {
    return null;
  }
  const length = end.getTime() - start.getTime();
  if (!(length > 0)) return null;
  return Math.min(1, Math.max(0, (nowMs - start.getTime()) / length));
}

function barList(list, items, emptyText) {
  list.replaceChildren();
  if (items.length === 0) {
    const item = document.createElement('li');
    item.className = 'empty';
    item.textContent = emptyText;
    list.appendChild(item);
  }
  for (const it of items) {
    const item = document.createElement('li');
    const label = document.createElement('span');
    label.className = 'bar-label';
    label.textContent = it.label;
    if (it.tag) {
      const tag = document.createElement('span');
      tag.className = 'tag';
      tag.textContent = it.tag;
      label.append(' ', tag);
    }
    const value = document.createElement('span');
    value.className = 'bar-value';
    value.textContent = it.value;
    const track = document.createElement('span');
    track.className = 'bar-track';
    const fill = document.createElement('span');
    fill.className = 'bar-fill';
    fill.style.width = (100 * Math.min(1, Math.max(0, it.share))).toFixed(2) + '%';
    track.appendChild(fill);
    item.append(label, value, track);
    list.appendChild(item);
  }
}

function renderUserUsage(u, tiers) {
  $('user-title').textContent = u.user;
  $('user-scope').textContent = 'Plan ' + (u.plan ?? '—') + ' · team ' + (u.team ?? '—') +
    ' · period ' + u.period + ' since ' + utc(u.period_start);

  const fraction = elapsedFraction(u.period, u.period_start, Date.now());
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

  if (fraction === null) {
    $('user-projection').textContent = '—';
    $('user-projection-sub').textContent = 'a total budget has no period end';
  } else if (fraction <= 0) {
    $('user-projection').textContent = '—';
    $('user-projection-sub').textContent = 'the period has just begun';
  } else {
    const projected = u.spent_usd / fraction;
    $('user-projection').textContent = usd(projected);
    $('user-projection-sub').textContent = 'at this pace, by the end of the ' + u.period +
      (hasBudget ? ' (' + percent(projected / u.budget_usd) + ' of the budget)' : '');
    $('user-projection').classList.toggle('negative', hasBudget && projected > u.budget_usd);
  }

  $('user-price').textContent = usd(u.price_usd);
  $('user-price-sub').textContent = u.price_usd === null ? 'no plan price' : 'per ' + u.period;
  $('user-margin').textContent = usd(u.margin_usd);
  $('user-margin').classList.toggle('negative', u.margin_usd !== null && u.margin_usd < 0);

  const backends = Object.entries(u.by_backend);
  const spendItems = backends
    .map(([name, b]) => ({
      label: name,
      tag: tiers.get(name),
      value: usd(b.spent_usd) + ' · ' + percent(u.spent_usd > 0 ? b.spent_usd / u.spent_usd : 0),
      share: u.spent_usd > 0 ? b.spent_usd / u.spent_usd : 0,
      sort: b.spent_usd,
    }))
    .sort((a, b) => b.sort - a.sort);
  barList($('user-spend-mix'), spendItems, 'No spend this period.');
  const requestItems = backends
    .map(([name, b]) => ({
      label: name,
      tag: tiers.get(name),
      value: count(b.requests) + ' · ' + percent(u.requests > 0 ? b.requests / u.requests : 0),
      share: u.requests > 0 ? b.requests / u.requests : 0,
      sort: b.requests,
    }))
    .sort((a, b) => b.sort - a.sort);
  barList($('user-request-mix'), requestItems, 'No requests this period.');
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
    cell(row, String(r.status), r.status >= 400 ? 'num negative' : 'num');
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

async function loadUser(name) {
  const request = ++userView.request;
  const section = $('user');
  section.setAttribute('aria-busy', 'true');
  $('user-title').textContent = name;
  $('user-scope').textContent = '';
  const path = encodeURIComponent(name);
  try {
    const [usage, records, keys, overview] = await Promise.all([
      getJson('/admin/usage/' + path),
      getJson('/admin/requests?' + new URLSearchParams({ user: name, limit: '50' }).toString()),
      getJson('/admin/users/' + path + '/keys').then(
        (answer) => answer.data,
        (error) => {
          if (error.status === 404) return null; // not an API user: a config user
          throw error;
        },
      ),
      lastOverview ? Promise.resolve(lastOverview) : getJson('/admin/dashboard/overview').catch(() => null),
    ]);
    if (request !== userView.request) return;
    const tiers = new Map((overview ? overview.backends : []).filter((b) => b.tier).map((b) => [b.name, b.tier]));
    renderUserUsage(usage, tiers);
    renderUserRequests(records.data);
    renderUserKeys(keys);
    $('user-body').hidden = false;
    showError('user-error', null);
  } catch (error) {
    if (request !== userView.request) return;
    $('user-body').hidden = true;
    const element = $('user-error');
    element.textContent = error.status === 404
      ? 'No user is named “' + name + '”.'
      : 'Could not load: ' + error.message;
    element.hidden = false;
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
    userView.request++;
  }
}

function start() {
  $('filter-plan').value = params.get('plan') ?? '';
  $('filter-team').value = params.get('team') ?? '';
  $('sort').value = params.get('sort') === 'spent' ? 'spent' : 'name';
  $('over-price').checked = params.get('over_price') === 'true';

  $('filters').addEventListener('submit', (event) => {
    event.preventDefault();
    firstPage();
  });
  for (const id of ['sort', 'over-price']) $(id).addEventListener('change', firstPage);
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

  $('back').addEventListener('click', (event) => {
    event.preventDefault();
    // Back to the list, keeping its filters in the address.
    window.history.pushState(null, '', window.location.pathname + window.location.search);
    route();
  });
  window.addEventListener('hashchange', route);

  loadOverview();
  loadUsers();
  route();
  window.setInterval(loadOverview, OVERVIEW_REFRESH_MS);
}

start();
