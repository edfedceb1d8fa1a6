// Tiandi web console — the browser side of the controller's pages.
//
// One plain ES2020 file, no build step, no framework. The server renders each page's shell
// (header, navigation, BOOT JSON with the strings of the chosen language and the CSRF token);
// this file fills `main#main` from the JSON API and follows the live stream (`/api/stream`).
// It respects the page's Content-Security-Policy: no inline code or styles in markup, no eval;
// text from outside (site IDs, details, comments, user names) goes into the DOM as text only.
(() => {
'use strict';

// ---------------------------------------------------------------------------------------------
// Boot data, strings, state shared by all pages
// ---------------------------------------------------------------------------------------------

const BOOT = (() => {
  try { return JSON.parse(document.getElementById('boot').textContent); } catch (e) { return {}; }
})();
const STR = BOOT.i18n || {};
const LANG = BOOT.lang === 'en' ? 'en' : 'zh-CN';
const ME = BOOT.me || null;
let CSRF = BOOT.csrf || null;
const PAGE = BOOT.page || document.documentElement.dataset.page || 'overview';

/** The string of `key` in the page's language (the key itself when there is none); `{name}`
 *  placeholders are replaced from `vars`. */
function T(key, vars) {
  let s = Object.prototype.hasOwnProperty.call(STR, key) ? STR[key] : key;
  if (vars) s = s.replace(/\{(\w+)\}/g, (m, n) => (n in vars ? String(vars[n]) : m));
  return s;
}

const STATUSES = ['up', 'degraded', 'rain-fade', 'on-battery', 'disk-full', 'down'];
// How bad a status is (for "worst" and ordering): higher is worse.
const STATUS_RANK = { up: 0, 'rain-fade': 1, degraded: 2, 'on-battery': 3, 'disk-full': 4, down: 5 };
// Every alarm, most urgent first, with its severity as the server gives it (the page's boot
// data; the list here only stands in for a page without it).
const ALARM_INFO = Array.isArray(BOOT.alarms) && BOOT.alarms.length ? BOOT.alarms : [
  ['site-down', 'critical'], ['battery-low', 'critical'], ['on-battery', 'major'], ['rain-fade', 'minor'], ['disk-full', 'major'],
  ['device-unreachable', 'major'], ['device-alarm', 'major'], ['transfer-paused', 'minor'], ['backup-failed', 'major'],
  ['backup-overdue', 'major'], ['backup-check-failed', 'minor'], ['backup-near-quota', 'minor'], ['path-redundancy-lost', 'minor'],
  ['degraded', 'minor']].map(([name, severity]) => ({ name, severity }));
const ALARMS = ALARM_INFO.map((a) => a.name);
const ALARM_SEVERITY = Object.fromEntries(ALARM_INFO.map((a) => [a.name, a.severity]));
const SEVERITIES = ['critical', 'major', 'minor'];
const SEV_RANK = { critical: 0, major: 1, minor: 2 };
const PROVINCES = 'BJ TJ HE SX NM LN JL HL SH JS ZJ AH FJ JX SD HA HB HN GD GX HI CQ SC GZ YN XZ SN GS QH NX XJ'.split(' ');
const SITE_SORTS = ['site_id', 'province', 'status', 'last_seen', 'rtt', 'loss', 'esno', 'modcod', 'rx_rate', 'tx_rate', 'cpu'];

function severityOf(alarm) {
  return ALARM_SEVERITY[alarm] || 'minor';
}
function provName(code) {
  if (!code) return '';
  const k = 'prov.' + code;
  return Object.prototype.hasOwnProperty.call(STR, k) ? STR[k] : code;
}

// Test and benchmark hooks (see the contract).
const HOOK = (window.__tiandi = window.__tiandi || { firstRowsAt: null, live: [] });
if (!Array.isArray(HOOK.live)) HOOK.live = [];
function recordLive(kind, key, state, eventMs) {
  HOOK.live.push({ kind, key, status_or_state: state, event_ms: eventMs, shown_ms: Date.now() });
  if (HOOK.live.length > 1000) HOOK.live.splice(0, HOOK.live.length - 1000);
}
function markReady() { document.documentElement.dataset.ready = '1'; }

// ---------------------------------------------------------------------------------------------
// DOM helpers
// ---------------------------------------------------------------------------------------------

const $ = (sel, root) => (root || document).querySelector(sel);
const $$ = (sel, root) => Array.from((root || document).querySelectorAll(sel));
const PROPS = new Set(['value', 'checked', 'selected', 'disabled', 'hidden', 'htmlFor', 'type', 'tabIndex', 'open']);

/** Builds an element: `h('td.num.warn', {data: {site: id}, onclick: f}, 'text', child, …)`.
 *  Children are nodes or text (never parsed as HTML); null/false/undefined are skipped. */
function h(sel, props, ...kids) {
  let [tag, ...cls] = sel.split('.');
  let id = null;
  if (tag.includes('#')) [tag, id] = tag.split('#');
  const e = document.createElement(tag || 'div');
  if (id) e.id = id;
  if (cls.length) e.className = cls.join(' ');
  if (props != null && (typeof props !== 'object' || props instanceof Node || Array.isArray(props))) {
    kids.unshift(props);
    props = null;
  }
  if (props) {
    for (const k of Object.keys(props)) {
      const v = props[k];
      if (v == null || v === false) continue;
      if (k === 'class') e.className = e.className ? e.className + ' ' + v : v;
      else if (k === 'text') e.textContent = v;
      else if (k === 'data') { for (const dk of Object.keys(v)) if (v[dk] != null) e.dataset[dk] = v[dk]; }
      else if (k.startsWith('on') && typeof v === 'function') e.addEventListener(k.slice(2), v);
      else if (PROPS.has(k)) e[k] = v;
      else e.setAttribute(k, v === true ? '' : String(v));
    }
  }
  add(e, kids);
  return e;
}
function add(parent, kids) {
  for (const k of kids) {
    if (k == null || k === false || k === true) continue;
    if (Array.isArray(k)) add(parent, k);
    else if (k instanceof Node) parent.appendChild(k);
    else parent.appendChild(document.createTextNode(String(k)));
  }
  return parent;
}
function clear(e) { while (e.firstChild) e.removeChild(e.firstChild); return e; }
function replace(e, ...kids) { clear(e); return add(e, kids); }

const SVGNS = 'http://www.w3.org/2000/svg';
function svg(tag, attrs, ...kids) {
  const e = document.createElementNS(SVGNS, tag);
  if (attrs) for (const k of Object.keys(attrs)) if (attrs[k] != null) e.setAttribute(k, String(attrs[k]));
  for (const k of kids) if (k != null) e.appendChild(k instanceof Node ? k : document.createTextNode(String(k)));
  return e;
}

function option(value, text, selected) { return h('option', { value, selected: !!selected }, text); }

/** A select of `[value, text]` pairs. */
function selectOf(props, pairs, current) {
  return h('select', props, pairs.map(([v, t]) => option(v, t, String(v) === String(current == null ? '' : current))));
}
function provinceOptions(allText) {
  return [['', allText || T('filter.all_provinces')]].concat(PROVINCES.map((c) => [c, c + ' ' + provName(c)]));
}

function badge(status) {
  const s = status || 'unknown';
  return h('span.badge.st-' + s, { data: { status: s } }, T('status.' + s));
}
function sevBadge(sev) { return h('span.sev.sev-' + sev, T('sev.' + sev)); }
function siteLink(id) { return h('a.site', { href: '/sites/' + encodeURIComponent(id) }, id); }
/** A path's state (up, suspect, down) in the status colours: up, degraded, down. */
const PATH_STATE_COLOUR = { up: 'up', suspect: 'degraded', down: 'down' };
function pathBadge(state) {
  const s = PATH_STATE_COLOUR[state] ? state : 'down';
  return h('span.badge.st-' + PATH_STATE_COLOUR[s], { data: { state: s } }, T('paths.state.' + s));
}
/** Traffic classes of a dual-homed site, in the order the site's policy lists them. */
const PATH_CLASSES = ['reports', 'alarm', 'conference', 'normal', 'bulk', 'backup'];
/** Why a site switched a class to another path, as its selector says it; other text as sent. */
const PATH_REASONS = {
  'path down': 'paths.why.down', 'path up': 'paths.why.up', 'preferred path back': 'paths.why.back',
  'path losing packets': 'paths.why.losing', 'no path usable': 'paths.why.none',
  'not allowed now (window closed or policy)': 'paths.why.not_allowed',
};
function pathReason(r) { return PATH_REASONS[r] ? T(PATH_REASONS[r]) : r || ''; }

function debounce(fn, ms) {
  let t = null;
  return (...a) => { clearTimeout(t); t = setTimeout(() => fn(...a), ms); };
}

/** Runs `fn` soon, at most once per `ms`: calls in between are coalesced into one run;
 *  never two runs at once (a run that is asked for while one is going waits for it). */
function coalescer(fn, ms) {
  let last = 0, timer = null, running = false, again = false;
  const run = async () => {
    timer = null;
    if (running) { again = true; return; }
    running = true;
    last = Date.now();
    try { await fn(); } catch (e) { /* fn reports its own errors */ }
    running = false;
    if (again) { again = false; kick(); }
  };
  const kick = () => {
    if (running) { again = true; return; }
    if (timer) return;
    timer = setTimeout(run, Math.max(0, last + ms - Date.now()));
  };
  return kick;
}

// ---------------------------------------------------------------------------------------------
// Formatting: numbers, sizes, times (in the chosen time zone), durations
// ---------------------------------------------------------------------------------------------

function validZone(z) {
  try { new Intl.DateTimeFormat('en', { timeZone: z }); return true; } catch (e) { return false; }
}
let TZ = validZone(BOOT.tz) ? BOOT.tz : 'Asia/Shanghai';
const fmtCache = new Map();
function dtf(kind) {
  const key = kind + '|' + TZ;
  let f = fmtCache.get(key);
  if (!f) {
    const base = { timeZone: TZ, hour12: false };
    const o = {
      full: { year: 'numeric', month: '2-digit', day: '2-digit', hour: '2-digit', minute: '2-digit', second: '2-digit' },
      dt: { month: '2-digit', day: '2-digit', hour: '2-digit', minute: '2-digit', second: '2-digit' },
      dm: { month: '2-digit', day: '2-digit', hour: '2-digit', minute: '2-digit' },
      date: { year: 'numeric', month: '2-digit', day: '2-digit' },
      md: { month: '2-digit', day: '2-digit' },
      time: { hour: '2-digit', minute: '2-digit', second: '2-digit' },
      hm: { hour: '2-digit', minute: '2-digit' },
      clockdate: { year: 'numeric', month: 'long', day: 'numeric', weekday: 'long' },
      year: { year: 'numeric' },
    }[kind];
    f = new Intl.DateTimeFormat(LANG, Object.assign(base, o));
    fmtCache.set(key, f);
  }
  return f;
}
/** A moment, in the chosen zone: the time alone if today, else with the date (and the year if
 *  not this year). */
function fmtTime(ms, kind) {
  if (ms == null || !isFinite(ms) || ms <= 0) return '—';
  const d = new Date(ms);
  if (kind) return dtf(kind).format(d);
  const now = new Date();
  if (dtf('date').format(d) === dtf('date').format(now)) return dtf('time').format(d);
  if (dtf('year').format(d) === dtf('year').format(now)) return dtf('dt').format(d);
  return dtf('full').format(d);
}
/** A `<time>` element showing a moment, the full date in its tooltip; re-rendered on a zone
 *  change (`data-ms`). */
function timeEl(ms, kind) {
  const e = h('time', { data: { ms: ms == null ? '' : String(ms), kind: kind || '' } }, fmtTime(ms, kind));
  if (ms) e.title = fmtTime(ms, 'full') + ' (' + TZ + ')';
  return e;
}
function retimeAll(root) {
  for (const e of $$('time[data-ms]', root)) {
    const ms = Number(e.dataset.ms);
    if (!ms) continue;
    e.textContent = fmtTime(ms, e.dataset.kind || undefined);
    e.title = fmtTime(ms, 'full') + ' (' + TZ + ')';
  }
}

const nf = new Intl.NumberFormat(LANG);
const nf0 = new Intl.NumberFormat(LANG, { maximumFractionDigits: 0 });
const nf1 = new Intl.NumberFormat(LANG, { maximumFractionDigits: 1 });
const nf2 = new Intl.NumberFormat(LANG, { maximumFractionDigits: 2 });
function num(x, digits) {
  if (x == null || !isFinite(x)) return '—';
  return (digits === 2 ? nf2 : digits === 1 ? nf1 : digits === 0 ? nf0 : nf).format(x);
}
function fmtBytes(b) {
  if (b == null || !isFinite(b)) return '—';
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (Math.abs(b) >= 1024 && i < u.length - 1) { b /= 1024; i++; }
  return nf1.format(i === 0 ? b : Math.round(b * 10) / 10) + ' ' + u[i];
}
function fmtMib(m) { return m == null ? '—' : fmtBytes(m * 1048576); }
/** A rate in bit/s. */
function fmtBps(bps) {
  if (bps == null || !isFinite(bps)) return '—';
  const u = ['bit/s', 'kbit/s', 'Mbit/s', 'Gbit/s'];
  let i = 0;
  while (bps >= 1000 && i < u.length - 1) { bps /= 1000; i++; }
  return nf1.format(bps) + ' ' + u[i];
}
function fmtKbps(k) { return k == null ? '—' : fmtBps(k * 1000); }
/** A duration in seconds: the two largest units ("3 天 4 小时", "2 min 5 s"). */
function fmtDur(s) {
  if (s == null || !isFinite(s)) return '—';
  s = Math.max(0, Math.round(s));
  const parts = [[Math.floor(s / 86400), 'dur.d'], [Math.floor(s / 3600) % 24, 'dur.h'], [Math.floor(s / 60) % 60, 'dur.m'], [s % 60, 'dur.s']];
  const i = parts.findIndex((p) => p[0] > 0);
  if (i < 0) return T('dur.s', { n: 0 });
  return parts.slice(i, i + 2).filter((p) => p[0] > 0).map((p) => T(p[1], { n: p[0] })).join(' ');
}
function fmtAgo(ms) {
  if (!ms) return '—';
  const s = (Date.now() - ms) / 1000;
  if (s < 5) return T('time.just_now');
  return T('time.ago', { d: fmtDur(s) });
}
function pct(x, d) { return x == null || !isFinite(x) ? '—' : num(x, d == null ? 1 : d) + '%'; }

// ---------------------------------------------------------------------------------------------
// Messages to the user (div#toast: the last error or success, as text)
// ---------------------------------------------------------------------------------------------

let toastTimer = null;
function toast(msg, kind) {
  let t = document.getElementById('toast');
  if (!t) {
    t = h('div#toast', { role: 'status', 'aria-live': 'polite' });
    t.addEventListener('click', () => t.classList.add('gone'));
    document.body.appendChild(t);
  }
  t.textContent = String(msg);
  t.className = kind === 'error' ? 'error' : 'ok';
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => t.classList.add('gone'), kind === 'error' ? 12000 : 6000);
}
function toastError(e) { toast(errText(e), 'error'); }
function errText(e) {
  if (!e) return T('err.unknown');
  if (e.status === 0) return T('err.network');
  return e.message || String(e);
}

// ---------------------------------------------------------------------------------------------
// The API
// ---------------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message, body) { super(message); this.status = status; this.body = body || {}; }
}
function here() { return location.pathname + location.search; }
function toLogin() {
  if (PAGE === 'login') return;
  location.assign('/login?next=' + encodeURIComponent(here()));
}

/** Calls the API: GET without a body, POST with a JSON body and the CSRF token. Throws an
 *  ApiError with the server's message; a 401 (session gone) goes to the login page. */
async function api(path, body, opts) {
  opts = opts || {};
  const init = { credentials: 'same-origin', headers: { Accept: 'application/json' }, cache: 'no-store' };
  if (opts.signal) init.signal = opts.signal;
  if (body !== undefined) {
    init.method = 'POST';
    init.headers['Content-Type'] = 'application/json';
    if (CSRF) init.headers['X-CSRF-Token'] = CSRF;
    init.body = JSON.stringify(body);
  }
  let r;
  try {
    r = await fetch(path, init);
  } catch (e) {
    if (e && e.name === 'AbortError') throw e;
    throw new ApiError(0, T('err.network'));
  }
  let data = null;
  const text = await r.text();
  try { data = text ? JSON.parse(text) : {}; } catch (e) { data = { error: text.slice(0, 300) }; }
  if (!r.ok) {
    const msg = (data && data.error) || (r.status + ' ' + r.statusText);
    if (r.status === 401 && !opts.noRedirect) toLogin();
    if (r.status === 403 && /change (your )?password/i.test(msg) && PAGE !== 'login') {
      location.assign('/login?next=' + encodeURIComponent(here()));
    }
    throw new ApiError(r.status, msg, data);
  }
  return data;
}
const isAbort = (e) => e && e.name === 'AbortError';

// ---------------------------------------------------------------------------------------------
// The live stream: one EventSource per page
// ---------------------------------------------------------------------------------------------

/** Follows `/api/stream?events=<kinds>`; `onEvent(ev)` for each event, `onResync()` when
 *  events may have been lost (an `event: lagged`, or a reconnect): the page refetches.
 *  A server that does not know one of the kinds (it answers 400) is asked again without
 *  the optional ones. */
const Live = {
  es: null, kinds: [], optional: [], onEvent: null, onResync: null, opened: false, everOpened: false, retry: null,
  start(kinds, onEvent, onResync, optional) {
    this.kinds = kinds.slice();
    this.optional = optional || [];
    this.onEvent = onEvent;
    this.onResync = onResync || (() => {});
    this.connect();
    window.addEventListener('pagehide', () => this.close());
  },
  close() { if (this.es) { this.es.close(); this.es = null; } },
  connect() {
    this.close();
    clearTimeout(this.retry);
    if (!window.EventSource) return;
    const es = new EventSource('/api/stream?events=' + this.kinds.join(','));
    this.es = es;
    this.opened = false;
    setLive('connecting');
    es.onopen = () => {
      const again = this.everOpened;
      this.opened = this.everOpened = true;
      setLive('on');
      if (again) this.onResync();
    };
    es.onmessage = (m) => {
      let ev;
      try { ev = JSON.parse(m.data); } catch (e) { return; }
      if (ev && typeof ev === 'object') {
        try { this.onEvent(ev); } catch (e) { console.error(e); }
      }
    };
    es.addEventListener('lagged', () => this.onResync());
    es.onerror = () => {
      if (es !== this.es) return;
      if (es.readyState === EventSource.CLOSED) {
        // Refused (not a 200 answer), or closed for good: not retried by the browser.
        if (!this.opened && this.optional.some((k) => this.kinds.includes(k))) {
          this.kinds = this.kinds.filter((k) => !this.optional.includes(k));
          if (this.kinds.length) { this.connect(); return; }
        }
        setLive('off');
        // A session that ended → the login page (api() redirects on 401).
        api('/api/me').then(() => {
          this.retry = setTimeout(() => this.connect(), 5000);
        }, () => { this.retry = setTimeout(() => this.connect(), 10000); });
      } else {
        setLive('connecting');
      }
    };
  },
  /** Whether the stream carries `kind` (a server may refuse an optional kind). */
  has(kind) { return this.kinds.includes(kind); },
};
function setLive(state) {
  for (const e of $$('.live-dot')) {
    e.dataset.state = state;
    e.title = T('live.' + state);
    const l = e.querySelector('.live-label');
    if (l) l.textContent = T('live.' + state);
  }
}
function liveDot() {
  const e = h('span.live-dot', { data: { state: Live.es ? (Live.opened ? 'on' : 'connecting') : 'off' } },
    h('i'), h('span.live-label', T('live.' + (Live.es ? (Live.opened ? 'on' : 'connecting') : 'off'))));
  return e;
}

// ---------------------------------------------------------------------------------------------
// The server-rendered header: current page, time zone, language links, log out
// ---------------------------------------------------------------------------------------------

const retimers = [];
/** Registers what to redraw when the time zone changes (beyond `<time data-ms>` elements). */
function onRetime(fn) { retimers.push(fn); }

function initHeader() {
  const navKey = PAGE === 'site' ? 'sites' : PAGE;
  for (const a of $$('header#top nav a[data-nav]')) a.classList.toggle('active', a.dataset.nav === navKey);
  for (const a of $$('header#top a.lang[data-lang]')) a.classList.toggle('active', a.dataset.lang === LANG);
  fixLangLinks();
  const sel = document.getElementById('tz');
  if (sel) {
    let browser = null;
    try { browser = Intl.DateTimeFormat().resolvedOptions().timeZone; } catch (e) { /* none */ }
    const have = new Set(Array.from(sel.options).map((o) => o.value));
    if (browser && !have.has(browser)) sel.appendChild(option(browser, browser + ' ' + T('tz.browser')));
    if (!Array.from(sel.options).some((o) => o.value === TZ)) sel.appendChild(option(TZ, TZ));
    sel.value = TZ;
    sel.addEventListener('change', () => {
      if (!validZone(sel.value)) return;
      TZ = sel.value;
      document.cookie = 'tz=' + encodeURIComponent(TZ) + '; Path=/; SameSite=Strict; Max-Age=31536000';
      retimeAll(document);
      for (const f of retimers) { try { f(); } catch (e) { console.error(e); } }
    });
  }
  const out = document.getElementById('logout');
  if (out) {
    out.addEventListener('click', async () => {
      out.disabled = true;
      try { await api('/api/logout', {}, { noRedirect: true }); } catch (e) { /* gone anyway */ }
      Live.close();
      location.assign('/login');
    });
  }
}
/** The language links keep the page's query (filters) when switching. */
function fixLangLinks() {
  const q = new URLSearchParams(location.search);
  q.delete('lang');
  for (const a of $$('header#top a.lang[data-lang]')) {
    q.set('lang', a.dataset.lang);
    a.setAttribute('href', '?' + q.toString());
  }
}

// ---------------------------------------------------------------------------------------------
// Page frame: a title bar, the content, a footer (version, change password, live state)
// ---------------------------------------------------------------------------------------------

const MAIN = () => document.getElementById('main');

function pageHead(title, ...tools) {
  return h('div.pagehead', h('h1', title), h('div.tools', tools), liveDot());
}
function section(title, ...kids) {
  return h('section.panel', title ? h('h2', title) : null, kids);
}
function footer() {
  const f = h('footer.foot',
    h('span', T('app.title') + ' ' + (BOOT.version ? 'v' + BOOT.version : '')),
    ME ? h('a#change-password', { href: '#', onclick: (e) => { e.preventDefault(); accountDialog(); } }, T('account.change_password')) : null,
    h('span.tzinfo', T('settings.timezone') + ': ', h('span.tzname', TZ)),
    h('a', { href: '/assets/LICENCES.md' }, T('foot.licences')));
  onRetime(() => { const z = f.querySelector('.tzname'); if (z) z.textContent = TZ; });
  return f;
}
function emptyRow(cols, text) {
  return h('tr.empty', h('td', { colspan: cols }, text || T('common.none')));
}
function errorBox(e) { return h('div.errorbox', errText(e)); }

/** A bar showing a percentage (width set from JS, allowed by the CSP). */
function bar(p, cls) {
  const v = Math.max(0, Math.min(100, Number(p) || 0));
  const fill = h('i');
  fill.style.width = v + '%';
  return h('span.bar' + (cls ? '.' + cls : ''), fill);
}

/** The modal dialog of the account: change the password (form#password-change). */
function accountDialog() {
  let d = document.getElementById('account-dialog');
  if (d) d.remove();
  d = h('dialog#account-dialog.dialog');
  const close = h('button.close', { type: 'button', title: T('common.close'), onclick: () => d.close() }, '×');
  d.appendChild(h('div.dialog-head', h('h2', T('account.title') + (ME ? ' · ' + ME.user : '')), close));
  d.appendChild(passwordForm(false, () => { d.close(); toast(T('account.password_changed'), 'ok'); }));
  d.addEventListener('close', () => d.remove());
  document.body.appendChild(d);
  d.showModal();
  const first = d.querySelector('input');
  if (first) first.focus();
}

/** form#password-change (old, new, new2): POST /api/me/password; the answer's csrf is the one
 *  to use from then on. */
function passwordForm(forced, done) {
  const err = h('p.form-error');
  const f = h('form#password-change.form',
    forced ? h('p.note', T('account.must_change')) : null,
    h('label', h('span', T('account.old_password')), h('input', { name: 'old', type: 'password', autocomplete: 'current-password', required: true })),
    h('label', h('span', T('account.new_password')), h('input', { name: 'new', type: 'password', autocomplete: 'new-password', required: true, minlength: 10 })),
    h('label', h('span', T('account.new_password2')), h('input', { name: 'new2', type: 'password', autocomplete: 'new-password', required: true, minlength: 10 })),
    h('p.hint', T('account.password_rule')),
    err,
    h('div.actions', h('button.primary', { type: 'submit' }, T('account.change_password'))));
  f.addEventListener('submit', async (e) => {
    e.preventDefault();
    err.textContent = '';
    const o = f.elements.old.value, n = f.elements.new.value, n2 = f.elements.new2.value;
    if (n.length < 10) { err.textContent = T('account.too_short'); return; }
    if (n !== n2) { err.textContent = T('account.mismatch'); return; }
    if (n === o) { err.textContent = T('account.same'); return; }
    const btn = f.querySelector('button[type=submit]');
    btn.disabled = true;
    try {
      const r = await api('/api/me/password', { old: o, new: n }, { noRedirect: true });
      if (r && r.csrf) CSRF = r.csrf;
      done(r || {});
    } catch (ex) {
      err.textContent = errText(ex);
      toastError(ex);
    } finally {
      btn.disabled = false;
    }
  });
  return f;
}

// ---------------------------------------------------------------------------------------------
// Login (and the password change a one-time password requires)
// ---------------------------------------------------------------------------------------------

/** Where to go after logging in: `next` if it is a path of this console, else home. */
function safeNext(role) {
  const n = new URLSearchParams(location.search).get('next');
  if (n && n.startsWith('/') && !n.startsWith('//') && !n.startsWith('/\\') && !n.startsWith('/login')) return n;
  // The server shows the password change in place of any page: back to that page.
  if (location.pathname !== '/login') return location.pathname + location.search;
  return role === 'kiosk' ? '/wall' : '/';
}

function pageLogin() {
  const m = MAIN();
  const card = h('div.login-card');
  replace(m, h('div.login-wrap', card));
  const brand = h('div.login-brand', h('div.logo', '天地'), h('div', h('div.login-title', T('app.title')), h('div.login-sub', T('login.subtitle'))));

  const showChange = (role) => {
    replace(card, brand, h('h2', T('account.change_password')),
      passwordForm(true, (r) => location.assign(safeNext((r && r.role) || role))));
    const i = card.querySelector('input[name=old]');
    if (i) i.focus();
    markReady();
  };
  if (ME && ME.must_change) { showChange(ME.role); return; }

  const err = h('p#login-error.form-error', { role: 'alert' });
  const btn = h('button.primary', { type: 'submit' }, T('login.submit'));
  const f = h('form#login.form',
    h('label', h('span', T('login.user')), h('input', { name: 'user', autocomplete: 'username', required: true, autofocus: true, maxlength: 64 })),
    h('label', h('span', T('login.password')), h('input', { name: 'password', type: 'password', autocomplete: 'current-password', required: true })),
    err, h('div.actions', btn));
  let wait = null;
  f.addEventListener('submit', async (e) => {
    e.preventDefault();
    err.textContent = '';
    btn.disabled = true;
    try {
      const r = await api('/api/login', { user: f.elements.user.value.trim(), password: f.elements.password.value }, { noRedirect: true });
      if (r.csrf) CSRF = r.csrf;
      if (r.must_change) { showChange(r.role); return; }
      location.assign(safeNext(r.role));
      return;
    } catch (ex) {
      if (ex.status === 429) {
        let left = Math.max(1, Math.ceil(Number(ex.body.retry_after_s) || 30));
        const tick = () => {
          err.textContent = T('login.throttled', { s: left });
          if (left-- <= 0) { clearInterval(wait); err.textContent = ''; btn.disabled = false; }
        };
        clearInterval(wait);
        wait = setInterval(tick, 1000);
        tick();
        return;
      }
      err.textContent = ex.status === 401 ? T('login.wrong') + (ex.message ? ' (' + ex.message + ')' : '') : errText(ex);
      f.elements.password.value = '';
      f.elements.password.focus();
    }
    btn.disabled = false;
  });
  replace(card, brand, f, h('p.login-foot', 'v' + (BOOT.version || '')));
  markReady();
}

// ---------------------------------------------------------------------------------------------
// The map of China's provinces
// ---------------------------------------------------------------------------------------------

let mapData = null;
function loadMap() {
  if (!mapData) {
    mapData = fetch('/assets/china-map.json', { credentials: 'same-origin' }).then((r) => {
      if (!r.ok) throw new ApiError(r.status, 'map: ' + r.status);
      return r.json();
    });
    mapData.catch(() => { mapData = null; });
  }
  return mapData;
}
// Where a province's label goes, when the middle of its box is not inside it (viewBox units).
const LABEL_AT = {
  HE: [700, 345], NM: [620, 250], GS: [470, 330], BJ: [738, 312], TJ: [775, 340], SH: [880, 522], JS: [820, 470], HL: [840, 125], JL: [845, 220], LN: [810, 270], SN: [597, 450], SX: [660, 375],
};

/** A map panel: svg#map with one path per province (data-province, data-worst), other areas
 *  in grey, a tooltip, a legend; `update(provinces)` colours it from /api/overview. */
function makeMap(big) {
  const box = h('div.mapbox' + (big ? '.big' : ''));
  const tip = h('div.maptip', { hidden: true });
  const legend = h('div.legend', STATUSES.concat(['none']).map((s) =>
    h('span', h('i.sw.st-' + s), s === 'none' ? T('map.no_sites') : T('status.' + s))));
  let byCode = {};
  let svgEl = null;
  box.appendChild(h('div.map-loading', T('common.loading')));
  box.appendChild(tip);

  const showTip = (code, ev) => {
    const p = byCode[code];
    const rows = [h('div.tip-title', provName(code) + ' ' + code)];
    if (!p || !p.total) rows.push(h('div.muted', T('map.no_sites')));
    else {
      rows.push(h('div', T('map.sites', { n: p.total }), ' · ', T('map.worst'), ' ', badge(p.worst)));
      const bs = p.by_status || {};
      rows.push(h('div.tip-counts', STATUSES.filter((s) => bs[s]).map((s) => h('span', h('i.sw.st-' + s), T('status.' + s) + ' ' + bs[s]))));
    }
    replace(tip, rows);
    tip.hidden = false;
    const r = box.getBoundingClientRect();
    let x = ev.clientX - r.left + 14, y = ev.clientY - r.top + 14;
    if (x + 240 > r.width) x = Math.max(4, ev.clientX - r.left - 250);
    if (y + 110 > r.height) y = Math.max(4, ev.clientY - r.top - 110);
    tip.style.left = x + 'px';
    tip.style.top = y + 'px';
  };

  const build = (md) => {
    const s = svg('svg', { id: 'map', viewBox: md.viewBox || '0 0 1000 843', preserveAspectRatio: 'xMidYMid meet', role: 'img', 'aria-label': T('map.title') });
    const other = svg('g', { class: 'others' });
    for (const o of md.other || []) {
      const p = svg('path', { d: o.d, class: 'other' });
      p.appendChild(svg('title', null, LANG === 'en' ? o.en : o.zh));
      other.appendChild(p);
    }
    const provs = svg('g', { class: 'provinces' });
    const labels = svg('g', { class: 'labels' });
    for (const code of Object.keys(md.provinces || {})) {
      const pr = md.provinces[code];
      const p = svg('path', { d: pr.d, class: 'prov', 'data-province': code, 'data-worst': 'none', tabindex: '0' });
      p.addEventListener('mousemove', (ev) => showTip(code, ev));
      p.addEventListener('mouseleave', () => { tip.hidden = true; });
      p.addEventListener('click', () => location.assign('/sites?province=' + code));
      p.addEventListener('keydown', (ev) => { if (ev.key === 'Enter') location.assign('/sites?province=' + code); });
      provs.appendChild(p);
    }
    s.appendChild(other);
    s.appendChild(provs);
    s.appendChild(labels);
    const ld = box.querySelector('.map-loading');
    if (ld) ld.remove();
    box.insertBefore(s, tip);
    svgEl = s;
    // Labels once laid out (getBBox needs the element in the document).
    requestAnimationFrame(() => {
      for (const p of $$('path.prov', s)) {
        const code = p.dataset.province;
        let x, y;
        if (LABEL_AT[code]) [x, y] = LABEL_AT[code];
        else { try { const b = p.getBBox(); x = b.x + b.width / 2; y = b.y + b.height / 2; } catch (e) { continue; } }
        const small = ['BJ', 'TJ', 'SH', 'HI', 'NX'].includes(code);
        const t = svg('text', { x, y, class: 'plabel' + (small ? ' small' : ''), 'data-for': code, 'text-anchor': 'middle', 'dominant-baseline': 'middle' },
          LANG === 'en' ? code : provName(code));
        labels.appendChild(t);
      }
      paint();
    });
    paint();
  };
  const paint = () => {
    if (!svgEl) return;
    for (const p of $$('path.prov', svgEl)) {
      const d = byCode[p.dataset.province];
      const w = d && d.total ? d.worst || 'up' : 'none';
      if (p.getAttribute('data-worst') !== w) p.setAttribute('data-worst', w);
    }
    for (const t of $$('text.plabel', svgEl)) {
      const d = byCode[t.dataset.for];
      const n = d && d.by_status ? d.total - (d.by_status.up || 0) : 0;
      t.classList.toggle('bad', n > 0);
    }
  };
  loadMap().then(build, (e) => { replace(box, errorBox(e)); });
  return {
    el: h('div.mapwrap', box, legend),
    update(provinces) {
      byCode = {};
      for (const p of provinces || []) byCode[p.code] = p;
      paint();
    },
  };
}

// ---------------------------------------------------------------------------------------------
// Overview and wall
// ---------------------------------------------------------------------------------------------

function statusCards(d, big) {
  const bs = d.by_status || {};
  const cards = [
    h('a.card.total', { href: '/sites' }, h('div.card-label', T('ov.sites')), h('div.card-num', String(d.sites || 0))),
    h('a.card.connected', { href: '/sites' }, h('div.card-label', T('ov.connected')),
      h('div.card-num', String(d.connected || 0)),
      h('div.card-sub', d.sites ? pct(100 * (d.connected || 0) / d.sites, 1) : '—')),
  ];
  for (const s of STATUSES) {
    const n = bs[s] || 0;
    cards.push(h('a.card.st-card.st-' + s + (n && s !== 'up' ? '.hot' : ''), { href: '/sites?status=' + s },
      h('div.card-label', h('i.sw.st-' + s), T('status.' + s)),
      h('div.card-num', { data: { statusCount: s } }, String(n)),
      big ? null : h('div.card-sub', d.sites ? pct(100 * n / d.sites, 1) : '—')));
  }
  return h('div.cards' + (big ? '.big' : ''), cards);
}

function alarmItem(a) {
  a.severity = a.severity || severityOf(a.alarm);
  return h('li.alarm.sev-' + a.severity + (a.ack ? '.acked' : ''), { data: { site: a.site_id, alarm: a.alarm } },
    sevBadge(a.severity || severityOf(a.alarm)),
    h('span.al-site', siteLink(a.site_id), h('span.muted', ' ' + provName(a.province)), h('span.al-name', T('alarm.' + a.alarm))),
    h('span.al-detail', { title: a.detail || '' }, a.detail || ''),
    h('span.al-time', timeEl(a.since_ms)),
    a.ack ? h('span.al-ack', { title: T('alarms.acked_by', { by: a.ack.by }) + ': ' + (a.ack.comment || '') }, '✓ ' + a.ack.by) : null);
}

function alarmsPanel(al, limit) {
  const bs = al.by_severity || {};
  const list = h('ul#recent-alarms.alarmlist');
  const recent = (al.recent || []).slice(0, limit || 20);
  if (!recent.length) list.appendChild(h('li.empty', T('alarms.none_active')));
  for (const a of recent) list.appendChild(alarmItem(a));
  return [
    h('div.sevrow',
      SEVERITIES.map((s) => h('a.sevcard.sev-' + s + ((bs[s] || 0) ? '.hot' : ''), { href: '/alarms?severity=' + s },
        h('div.card-label', T('sev.' + s)), h('div.card-num', { data: { severityCount: s } }, String(bs[s] || 0)))),
      h('a.sevcard.unacked', { href: '/alarms' }, h('div.card-label', T('alarms.unacked')), h('div.card-num', String(al.unacked || 0)))),
    list,
  ];
}

function provinceTable(provs, compact) {
  const rows = (provs || []).filter((p) => p.total > 0).sort((a, b) =>
    (STATUS_RANK[b.worst] || 0) - (STATUS_RANK[a.worst] || 0) ||
    (b.total - ((b.by_status || {}).up || 0)) - (a.total - ((a.by_status || {}).up || 0)) || a.code.localeCompare(b.code));
  const cols = compact ? ['down', 'on-battery', 'disk-full', 'degraded', 'rain-fade'] : STATUSES;
  const t = h('table#province-table.grid.clickable',
    h('thead', h('tr', h('th', T('col.province')), h('th.num', T('col.total')),
      cols.map((s) => h('th.num', { title: T('status.' + s) }, h('i.sw.st-' + s), compact ? null : ' ' + T('status.' + s))),
      h('th', T('col.worst')))),
    h('tbody', rows.length ? rows.map((p) => h('tr', { data: { province: p.code, worst: p.worst }, onclick: () => location.assign('/sites?province=' + p.code) },
      h('td', h('a', { href: '/sites?province=' + p.code }, provName(p.code)), h('span.muted', ' ' + p.code)),
      h('td.num', String(p.total)),
      cols.map((s) => { const n = (p.by_status || {})[s] || 0; return h('td.num' + (n && s !== 'up' ? '.cnt-' + s : '.zero'), String(n)); }),
      h('td', badge(p.worst)))) : emptyRow(cols.length + 3)));
  return t;
}

function transferMini(tr) {
  const list = h('ul.xferlist');
  for (const j of (tr.recent || [])) {
    list.appendChild(h('li', { data: { transfer: j.id, dest: j.dest } },
      h('span.x-file', { title: j.file }, j.file), h('span.muted', ' → '), siteLink(j.dest),
      stateBadge(j.state), bar(j.progress_pct, 's-' + j.state), h('span.num', pct(j.progress_pct, 0))));
  }
  if (!(tr.recent || []).length) list.appendChild(h('li.empty', T('transfers.none')));
  return [
    h('div.minirow',
      mini(T('transfers.active'), tr.active, '/transfers'), mini(T('transfers.queued'), tr.queued, '/transfers'),
      mini(T('transfers.failed'), tr.failed, '/transfers', tr.failed ? 'bad' : ''), mini(T('transfers.done_24h'), tr.done_24h, '/transfers')),
    list,
  ];
}
function mini(label, n, href, cls) {
  return h('a.mini' + (cls ? '.' + cls : ''), { href }, h('div.mini-num', String(n || 0)), h('div.mini-label', label));
}
function stateBadge(state) { return h('span.state.s-' + (state || 'unknown'), T('xstate.' + (state || 'unknown'))); }

function confMini(confs) {
  if (!confs || !confs.length) return h('p.muted', T('conf.none'));
  return h('ul.conflist', confs.map((c) => h('li', h('a', { href: '/conferences' }, c.room),
    h('span.muted', ' · ' + T('conf.chair') + ' '), c.chair || '—',
    h('span.muted', ' · '), T('conf.participants_n', { n: c.participants || 0 }),
    c.floor ? [h('span.muted', ' · ' + T('conf.floor') + ' '), c.floor] : null)));
}

function controllerPanel(c) {
  c = c || {};
  const kv = (k, v) => [h('dt', k), h('dd', v)];
  return h('dl.kv',
    kv(T('ctl.version'), c.version || BOOT.version || '—'),
    kv(T('ctl.uptime'), fmtDur(c.uptime_s)),
    kv(T('ctl.started'), timeEl(c.started_ms)),
    kv(T('ctl.reports_per_s'), num(c.reports_per_s, 1)),
    kv(T('ctl.connected_sites'), num(c.connected_sites)),
    kv(T('ctl.sessions'), num(c.sessions)),
    kv(T('ctl.rss'), fmtBytes(c.rss_bytes)),
    kv(T('ctl.db'), fmtBytes(c.db_bytes)));
}

/** Overview and wall share the data and its refresh: /api/overview, refetched on live events
 *  (at most every 500 ms) and every 30 s. */
function overviewLoop(render) {
  let pending = [];
  let first = true;
  const load = async () => {
    const batch = pending;
    pending = [];
    try {
      const d = await api('/api/overview');
      render(d);
      for (const ev of batch) recordLive(ev.type, ev.site_id, ev.type === 'site' ? ev.status : ev.state, ev.at_ms);
      if (first) { first = false; markReady(); }
      setStale(false);
    } catch (e) {
      if (!(e instanceof ApiError)) console.error(e);
      pending = batch.concat(pending);
      setStale(true, e);
      if (first) toastError(e);
    }
  };
  const kick = coalescer(load, 500);
  Live.start(['site', 'alarm'], (ev) => {
    if (ev.type === 'site' || ev.type === 'alarm') { pending.push(ev); kick(); }
  }, kick);
  setInterval(kick, 30000);
  kick();
}
function setStale(on, e) {
  for (const s of $$('.stale')) { s.hidden = !on; s.textContent = on ? T('common.stale') + (e ? ': ' + errText(e) : '') : ''; }
}

function pageOverview() {
  const m = MAIN();
  const map = makeMap(false);
  const cards = h('div.cards-slot');
  const alarms = h('div.slot');
  const provs = h('div.slot.scroll');
  const xfer = h('div.slot');
  const conf = h('div.slot');
  const ctl = h('div.slot');
  replace(m,
    pageHead(T('nav.overview'), h('span.stale', { hidden: true })),
    cards,
    h('div.ov-grid',
      section(T('ov.map'), map.el),
      section(T('ov.alarms'), alarms),
      section(T('ov.provinces'), provs)),
    h('div.ov-grid3',
      section(T('ov.transfers'), xfer),
      section(T('ov.conferences'), conf),
      section(T('ov.controller'), ctl)),
    footer());
  overviewLoop((d) => {
    replace(cards, statusCards(d, false));
    map.update(d.provinces);
    replace(alarms, alarmsPanel(d.alarms || {}, 20));
    replace(provs, provinceTable(d.provinces, true));
    replace(xfer, transferMini(d.transfers || {}));
    replace(conf, confMini(d.conferences));
    replace(ctl, controllerPanel(d.controller));
  });
}

function pageWall() {
  const m = MAIN();
  const map = makeMap(true);
  const clockT = h('div.clock-time');
  const clockD = h('div.clock-date');
  const tick = () => {
    const d = new Date();
    clockT.textContent = dtf('time').format(d);
    clockD.textContent = dtf('clockdate').format(d) + ' · ' + TZ;
  };
  tick();
  setInterval(tick, 1000);
  onRetime(tick);
  const cards = h('div.cards-slot');
  const sev = h('div.slot');
  const probs = h('div.slot');
  const bottom = h('div.wall-bottom');
  const updated = h('span.updated');
  const isKiosk = ME && ME.role === 'kiosk';
  replace(m,
    h('div.wall-top',
      h('div.wall-brand', T('app.title'), h('span.wall-sub', T('wall.title'))),
      h('div.wall-clock', clockT, clockD),
      h('div.wall-meta', liveDot(), updated, h('span.stale', { hidden: true }),
        isKiosk ? null : h('a.wall-exit', { href: '/' }, T('wall.exit')))),
    cards,
    h('div.wall-grid',
      h('div.wall-map', map.el),
      h('div.wall-side', h('section.panel', h('h2', T('ov.alarms')), sev), h('section.panel', h('h2', T('wall.problem_provinces')), probs))),
    bottom);
  overviewLoop((d) => {
    replace(cards, statusCards(d, true));
    map.update(d.provinces);
    replace(sev, alarmsPanel(d.alarms || {}, 12));
    const nbad = (p) => p.total - ((p.by_status || {}).up || 0);
    const bad = (d.provinces || []).filter((p) => p.total && p.worst && p.worst !== 'up')
      .sort((a, b) => ((STATUS_RANK[b.worst] || 0) - (STATUS_RANK[a.worst] || 0)) || (nbad(b) - nbad(a)));
    replace(probs, bad.length ? h('ul.problist', bad.slice(0, 14).map((p) => h('li', { data: { province: p.code } },
      h('span.pname', provName(p.code)), badge(p.worst),
      h('span.pcounts', STATUSES.filter((s) => s !== 'up' && (p.by_status || {})[s]).map((s) => h('span.pc', h('i.sw.st-' + s), String(p.by_status[s])))),
      h('span.ptotal', '/' + p.total)))) : h('p.allgood', T('wall.all_good')));
    const tr = d.transfers || {};
    const c = d.controller || {};
    replace(bottom,
      h('div.wb', h('div.wb-num', String(tr.active || 0)), h('div.wb-label', T('transfers.active'))),
      h('div.wb', h('div.wb-num', String(tr.queued || 0)), h('div.wb-label', T('transfers.queued'))),
      h('div.wb' + (tr.failed ? '.bad' : ''), h('div.wb-num', String(tr.failed || 0)), h('div.wb-label', T('transfers.failed'))),
      h('div.wb', h('div.wb-num', String((d.conferences || []).length)), h('div.wb-label', T('wall.conferences'))),
      h('div.wb', h('div.wb-num', num(c.reports_per_s, 1)), h('div.wb-label', T('ctl.reports_per_s'))),
      h('div.wb', h('div.wb-num', fmtDur(c.uptime_s)), h('div.wb-label', T('ctl.uptime'))));
    updated.textContent = T('wall.updated', { t: dtf('time').format(new Date()) });
  });
}

// ---------------------------------------------------------------------------------------------
// Sites: a paged table (100 rows, the server filters, sorts and pages), state in the URL
// ---------------------------------------------------------------------------------------------

const PAGE_SIZE = 100;
// Metrics an operator wants worst-first when sorting by them.
const DESC_FIRST = new Set(['rtt', 'loss', 'cpu', 'rx_rate', 'tx_rate']);

function pageSites() {
  const m = MAIN();
  const q0 = new URLSearchParams(location.search);
  const st = {
    province: PROVINCES.includes(q0.get('province')) ? q0.get('province') : '',
    status: STATUSES.includes(q0.get('status')) ? q0.get('status') : '',
    link: ['satellite', 'terrestrial'].includes(q0.get('link')) ? q0.get('link') : '',
    redundancy: q0.get('redundancy') === 'lost' ? 'lost' : '',
    q: (q0.get('q') || '').slice(0, 100),
    sort: SITE_SORTS.includes(q0.get('sort')) ? q0.get('sort') : 'site_id',
    order: q0.get('order') === 'desc' ? 'desc' : 'asc',
    page: Math.max(1, parseInt(q0.get('page'), 10) || 1),
  };
  let count = 0;
  let rows = new Map(); // site_id → tr of the page shown
  let ctl = null; // AbortController of the request under way
  let shownOnce = false;

  const fProv = selectOf({ id: 'f-province', title: T('col.province') }, provinceOptions(), st.province);
  const fStatus = selectOf({ id: 'f-status', title: T('col.status') },
    [['', T('filter.all_statuses')]].concat(STATUSES.map((s) => [s, T('status.' + s)])), st.status);
  const fLink = selectOf({ id: 'f-link', title: T('col.link') },
    [['', T('filter.all_links')], ['satellite', T('link.satellite')], ['terrestrial', T('link.terrestrial')]], st.link);
  const fRed = selectOf({ id: 'f-redundancy', title: T('site.paths') },
    [['', T('filter.all_redundancy')], ['lost', T('filter.redundancy_lost')]], st.redundancy);
  const fQ = h('input#f-q', { type: 'search', placeholder: T('sites.search'), value: st.q, autocomplete: 'off', spellcheck: 'false' });
  const reset = h('button.ghost', { type: 'button' }, T('filter.reset'));
  const countEl = h('span#sites-count', '0');
  const prev = h('button#page-prev', { type: 'button', title: T('pager.prev') }, '‹ ' + T('pager.prev'));
  const next = h('button#page-next', { type: 'button', title: T('pager.next') }, T('pager.next') + ' ›');
  const first = h('button.pg-first', { type: 'button', title: T('pager.first') }, '«');
  const last = h('button.pg-last', { type: 'button', title: T('pager.last') }, '»');
  const info = h('span#page-info');
  const loading = h('span.loading', { hidden: true }, T('common.loading'));

  const COLS = [
    ['site_id', 'col.site'], ['province', 'col.province'], ['status', 'col.status'], [null, 'col.conditions'],
    [null, 'col.link'], ['rtt', 'col.rtt'], ['loss', 'col.loss'], ['esno', 'col.esno'], ['modcod', 'col.modcod'],
    ['rx_rate', 'col.rx'], ['tx_rate', 'col.tx'], ['cpu', 'col.cpu'], [null, 'col.mem'], [null, 'col.disk'], ['last_seen', 'col.last_seen'],
  ];
  const NUMERIC = new Set(['rtt', 'loss', 'esno', 'rx_rate', 'tx_rate', 'cpu', 'col.mem', 'col.disk']);
  const thead = h('thead', h('tr', COLS.map(([key, label]) => {
    const cls = NUMERIC.has(key || label) ? 'num' : '';
    if (!key) return h('th', { class: cls || null }, T(label));
    return h('th.sortable', { class: cls || null, data: { sort: key }, title: T('sites.sort_by') }, T(label), h('span.arrow'));
  })));
  const tbody = h('tbody');
  const table = h('table#sites-table.grid.sites', thead, tbody);

  replace(m,
    pageHead(T('nav.sites'), h('span.count-label', T('sites.count').split('{n}')[0], countEl, T('sites.count').split('{n}').slice(1).join('')), loading),
    h('div.filters', fProv, fStatus, fLink, fRed, fQ, reset),
    h('div.tablewrap.sites-wrap', table),
    h('div.pager', first, prev, info, next, last),
    footer());

  const syncUrl = () => {
    const q = new URLSearchParams();
    if (st.province) q.set('province', st.province);
    if (st.status) q.set('status', st.status);
    if (st.link) q.set('link', st.link);
    if (st.redundancy) q.set('redundancy', st.redundancy);
    if (st.q) q.set('q', st.q);
    if (st.sort !== 'site_id') q.set('sort', st.sort);
    if (st.order !== 'asc') q.set('order', st.order);
    if (st.page > 1) q.set('page', String(st.page));
    const s = q.toString();
    history.replaceState(null, '', location.pathname + (s ? '?' + s : ''));
    fixLangLinks();
  };
  const showSort = () => {
    for (const th of $$('th[data-sort]', thead)) {
      const on = th.dataset.sort === st.sort;
      th.classList.toggle('sorted', on);
      th.setAttribute('aria-sort', on ? (st.order === 'asc' ? 'ascending' : 'descending') : 'none');
      th.querySelector('.arrow').textContent = on ? (st.order === 'asc' ? ' ▲' : ' ▼') : '';
    }
  };
  const pages = () => Math.max(1, Math.ceil(count / PAGE_SIZE));
  const showPager = () => {
    const p = pages();
    const a = count ? (st.page - 1) * PAGE_SIZE + 1 : 0, b = Math.min(count, st.page * PAGE_SIZE);
    info.textContent = T('pager.info', { page: st.page, pages: p, from: a, to: b, count });
    prev.disabled = first.disabled = st.page <= 1;
    next.disabled = last.disabled = st.page >= p;
  };

  const cellNum = (v, fmt, cls) => h('td.num' + (cls ? '.' + cls : ''), v == null ? '—' : fmt(v));
  // A dual-homed site: a small mark under its link type, a warning one when it is down to one
  // path; its paths' states in the tooltip.
  const pathsMark = (s) => {
    if (!s.paths) return null;
    const title = s.paths.map((p) => p.name + ': ' + T('paths.state.' + p.state)).join(' · ');
    return s.redundancy_lost
      ? h('div', h('span.cond.sev-minor.path-lost', { title }, '⚠ ' + T('paths.one_left')))
      : h('div.muted.small.path-dual', { title }, T('paths.dual'));
  };
  const renderRow = (s) => {
    const l = s.link || {}, hs = s.host || {};
    const conds = s.conditions || [];
    const tr = h('tr.st-' + s.status + (s.connected ? '' : '.offline'), { data: { site: s.site_id, status: s.status, dual: s.paths ? '1' : null } },
      h('td.id', siteLink(s.site_id)),
      h('td', { title: s.province }, provName(s.province)),
      h('td.status', badge(s.status)),
      h('td.conds', conds.map((c) => h('span.cond.sev-' + severityOf(c.condition), { title: (c.detail || '') + ' · ' + fmtTime(c.since_ms, 'full') }, T('alarm.' + c.condition)))),
      h('td.linktype', l.type ? T('link.' + l.type) : '—', pathsMark(s)),
      cellNum(l.rtt_ms, (v) => num(v) + ' ms', l.rtt_ms > 1000 ? 'warn' : ''),
      cellNum(l.loss_pct, (v) => pct(v, 2), l.loss_pct >= 2 ? 'bad' : l.loss_pct >= 0.5 ? 'warn' : ''),
      cellNum(l.esno_db, (v) => num(v, 1) + ' dB', l.esno_db != null && l.esno_db < 5 ? 'warn' : ''),
      h('td.modcod', l.modcod || '—'),
      cellNum(l.rx_kbps, fmtKbps),
      cellNum(l.tx_kbps, fmtKbps),
      cellNum(hs.cpu_pct, (v) => pct(v, 0), hs.cpu_pct >= 90 ? 'warn' : ''),
      cellNum(hs.mem_pct, (v) => pct(v, 0), hs.mem_pct >= 90 ? 'warn' : ''),
      cellNum(hs.disk_pct, (v) => pct(v, 0), hs.disk_pct >= 95 ? 'bad' : hs.disk_pct >= 85 ? 'warn' : ''),
      h('td.ago', { data: { ms: String(s.last_seen_ms || '') }, title: fmtTime(s.last_seen_ms, 'full') }, fmtAgo(s.last_seen_ms)));
    return tr;
  };

  const load = async () => {
    if (ctl) ctl.abort();
    const my = (ctl = new AbortController());
    const q = new URLSearchParams();
    if (st.province) q.set('province', st.province);
    if (st.status) q.set('status', st.status);
    if (st.link) q.set('link', st.link);
    if (st.redundancy) q.set('redundancy', st.redundancy);
    if (st.q) q.set('q', st.q);
    q.set('sort', st.sort);
    q.set('order', st.order);
    q.set('offset', String((st.page - 1) * PAGE_SIZE));
    q.set('limit', String(PAGE_SIZE));
    loading.hidden = false;
    let d;
    try {
      d = await api('/api/sites?' + q.toString(), undefined, { signal: my.signal });
    } catch (e) {
      if (isAbort(e)) return;
      loading.hidden = true;
      toastError(e);
      if (!shownOnce) { replace(tbody, emptyRow(COLS.length, errText(e))); markReady(); }
      return;
    }
    if (my !== ctl) return;
    ctl = null;
    loading.hidden = true;
    count = d.count || 0;
    if (st.page > pages() && count > 0) { st.page = pages(); syncUrl(); return load(); }
    const frag = document.createDocumentFragment();
    rows = new Map();
    for (const s of d.sites || []) {
      const tr = renderRow(s);
      rows.set(s.site_id, tr);
      frag.appendChild(tr);
    }
    if (!rows.size) frag.appendChild(emptyRow(COLS.length, T('sites.none')));
    clear(tbody).appendChild(frag);
    countEl.textContent = String(count);
    showPager();
    if (rows.size && HOOK.firstRowsAt == null) HOOK.firstRowsAt = performance.now();
    if (!shownOnce) { shownOnce = true; markReady(); }
  };
  const refetch = coalescer(load, 2000);
  const change = (resetPage) => {
    if (resetPage) st.page = 1;
    syncUrl();
    showSort();
    load();
  };

  fProv.addEventListener('change', () => { st.province = fProv.value; change(true); });
  fStatus.addEventListener('change', () => { st.status = fStatus.value; change(true); });
  fLink.addEventListener('change', () => { st.link = fLink.value; change(true); });
  fRed.addEventListener('change', () => { st.redundancy = fRed.value; change(true); });
  const typed = debounce(() => { const v = fQ.value.trim(); if (v !== st.q) { st.q = v; change(true); } }, 250);
  fQ.addEventListener('input', typed);
  fQ.addEventListener('keydown', (e) => { if (e.key === 'Escape') { fQ.value = ''; typed(); } });
  reset.addEventListener('click', () => {
    Object.assign(st, { province: '', status: '', link: '', redundancy: '', q: '', sort: 'site_id', order: 'asc', page: 1 });
    fProv.value = fStatus.value = fLink.value = fRed.value = fQ.value = '';
    change(true);
  });
  thead.addEventListener('click', (e) => {
    const th = e.target.closest('th[data-sort]');
    if (!th) return;
    const k = th.dataset.sort;
    if (st.sort === k) st.order = st.order === 'asc' ? 'desc' : 'asc';
    else { st.sort = k; st.order = DESC_FIRST.has(k) ? 'desc' : 'asc'; }
    change(true);
  });
  prev.addEventListener('click', () => { if (st.page > 1) { st.page--; change(false); } });
  next.addEventListener('click', () => { if (st.page < pages()) { st.page++; change(false); } });
  first.addEventListener('click', () => { st.page = 1; change(false); });
  last.addEventListener('click', () => { st.page = pages(); change(false); });
  document.addEventListener('keydown', (e) => {
    if (e.target.closest('input,select,textarea')) return;
    if (e.key === '/') { e.preventDefault(); fQ.focus(); }
    else if (e.key === 'ArrowLeft' && !prev.disabled) prev.click();
    else if (e.key === 'ArrowRight' && !next.disabled) next.click();
  });
  tbody.addEventListener('click', (e) => {
    if (e.target.closest('a,button')) return;
    const tr = e.target.closest('tr[data-site]');
    if (tr && !window.getSelection().toString()) location.assign('/sites/' + encodeURIComponent(tr.dataset.site));
  });
  // The ages ("12 s ago") move on.
  setInterval(() => {
    for (const td of $$('td.ago', tbody)) td.textContent = fmtAgo(Number(td.dataset.ms));
  }, 5000);
  onRetime(() => { for (const td of $$('td.ago', tbody)) td.title = fmtTime(Number(td.dataset.ms), 'full'); });

  // Live: a row of this page changes in place; a change elsewhere that may bring a site into
  // (or out of) the filter refetches the page, at most every 2 s.
  const mayMatch = (ev) => {
    if (st.province && ev.province !== st.province) return false;
    if (st.q && !String(ev.site_id).toLowerCase().includes(st.q.toLowerCase())) return false;
    if (st.status) return ev.status === st.status;
    // A site that lost (or got back) a path changes its alarms, not always its status.
    return !!st.redundancy || st.sort === 'status' || st.sort === 'last_seen';
  };
  Live.start(['site'], (ev) => {
    if (ev.type !== 'site') return;
    const tr = rows.get(ev.site_id);
    if (tr) {
      const old = tr.dataset.status;
      tr.dataset.status = ev.status;
      tr.classList.remove('st-' + old);
      tr.classList.add('st-' + ev.status);
      tr.classList.toggle('offline', !ev.connected);
      const td = tr.querySelector('td.status');
      if (td) replace(td, badge(ev.status));
      if (ev.at_ms) {
        const ago = tr.querySelector('td.ago');
        if (ago && ev.connected) { ago.dataset.ms = String(ev.at_ms); ago.textContent = fmtAgo(ev.at_ms); }
      }
      tr.classList.remove('flash');
      void tr.offsetWidth; // restart the animation
      tr.classList.add('flash');
      recordLive('site', ev.site_id, ev.status, ev.at_ms);
      // A dual-homed site's row also shows its paths: fetched again (a status says nothing of them).
      if ((st.status && ev.status !== st.status) || st.redundancy || tr.dataset.dual) refetch();
    } else if (mayMatch(ev)) {
      refetch();
    }
  }, refetch);

  showSort();
  syncUrl();
  load();
}

// ---------------------------------------------------------------------------------------------
// Shared: acknowledging an alarm, sending a file
// ---------------------------------------------------------------------------------------------

/** The "acknowledged" cell: who and when, the comment. */
function ackedCell(ack) {
  return h('td.acked', { title: ack.comment || '' },
    h('span.ack-by', '✓ ' + ack.by), ' ', timeEl(ack.at_ms),
    ack.comment ? h('div.ack-comment', ack.comment) : null);
}
/** The ack cell of an active alarm row: a button.ack that opens form.ack-form below the row
 *  (a comment is required); `done(ack)` once the server took it. */
function ackCell(a, cols, done) {
  if (a.ack) return ackedCell(a.ack);
  if (!ME || !ME.can_write) return h('td.unacked', T('alarms.not_acked'));
  const btn = h('button.ack', { type: 'button' }, T('alarms.ack'));
  const td = h('td.ackcell', btn);
  btn.addEventListener('click', () => {
    const tr = td.closest('tr');
    const open = tr.nextElementSibling && tr.nextElementSibling.classList.contains('ack-row') ? tr.nextElementSibling : null;
    if (open) { open.remove(); return; }
    const ta = h('textarea', { name: 'comment', rows: 2, maxlength: 500, required: true, placeholder: T('alarms.ack_comment_ph') });
    const err = h('span.form-error');
    const submit = h('button.primary', { type: 'submit' }, T('alarms.ack_submit'));
    const f = h('form.ack-form',
      h('label', h('span', T('alarms.ack_comment') + ' · ' + a.site_id + ' · ' + T('alarm.' + a.alarm)), ta),
      h('div.actions', submit, h('button.ghost', { type: 'button', onclick: () => row.remove() }, T('common.cancel')), err));
    const row = h('tr.ack-row', h('td', { colspan: cols }, f));
    tr.after(row);
    ta.focus();
    f.addEventListener('submit', async (e) => {
      e.preventDefault();
      const c = ta.value.trim();
      if (!c) { err.textContent = T('alarms.ack_need_comment'); ta.focus(); return; }
      submit.disabled = true;
      try {
        const r = await api('/api/alarms/ack', { site_id: a.site_id, alarm: a.alarm, comment: c });
        a.ack = r.ack || { by: ME.user, at_ms: Date.now(), comment: c };
        row.remove();
        td.replaceWith(ackedCell(a.ack));
        tr.classList.add('is-acked');
        toast(T('alarms.acked_ok', { site: a.site_id }), 'ok');
        if (done) done(a.ack);
      } catch (ex) {
        err.textContent = errText(ex);
        toastError(ex);
        submit.disabled = false;
      }
    });
  });
  return td;
}

let outgoingFiles = null;
function loadOutgoing() {
  if (!outgoingFiles) {
    outgoingFiles = api('/api/outgoing');
    outgoingFiles.catch(() => { outgoingFiles = null; });
  }
  return outgoingFiles;
}
const WINDOW_RE = /^\d{1,2}:\d{2}-\d{1,2}:\d{2}([+-]\d{2}:?\d{2}|Z)?$/;

/** form#send-form: a file from /api/outgoing, to a site / province / all (`fixedTo` for the
 *  site page), priority, a daily window, a rate limit. */
function sendForm(fixedTo, done) {
  const file = h('select#send-file', { required: true }, option('', T('common.loading')));
  const prio = selectOf({ id: 'send-priority' }, [['normal', T('prio.normal')], ['alarm', T('prio.alarm')], ['bulk', T('prio.bulk')]], 'normal');
  const win = h('input#send-window', { placeholder: '22:00-06:00+08:00', maxlength: 24, autocomplete: 'off', title: T('send.window_hint') });
  const rate = h('input#send-rate', { type: 'number', min: '0', step: '0.1', placeholder: T('send.rate_ph') });
  const to = fixedTo ? null : h('input#send-to', { list: 'send-to-list', placeholder: 'site:gd-001 · province:GD · all', required: true, autocomplete: 'off' });
  const list = fixedTo ? null : h('datalist#send-to-list', option('all', T('send.to_all')),
    PROVINCES.map((c) => option('province:' + c, T('send.to_province', { p: provName(c) }))));
  const err = h('p.form-error');
  const submit = h('button.primary', { type: 'submit' }, T('send.submit'));
  const f = h('form#send-form.form.inline',
    h('label', h('span', T('send.file')), file),
    to ? h('label', h('span', T('send.to')), to, list) : h('label', h('span', T('send.to')), h('span.fixed', fixedTo)),
    h('label', h('span', T('send.priority')), prio),
    h('label', h('span', T('send.window')), win),
    h('label', h('span', T('send.rate')), rate),
    h('div.actions', submit),
    h('p.hint', T('send.window_hint')),
    err);
  loadOutgoing().then((d) => {
    const files = (d && d.files) || [];
    replace(file, option('', files.length ? T('send.choose_file') : T('send.no_files')),
      files.map((x) => option(x.path, x.name + ' (' + fmtBytes(x.bytes) + ')')));
  }, (e) => { replace(file, option('', errText(e))); });
  f.addEventListener('submit', async (e) => {
    e.preventDefault();
    err.textContent = '';
    if (!file.value) { err.textContent = T('send.need_file'); return; }
    let dest = fixedTo ? 'site:' + fixedTo : to.value.trim();
    if (dest && dest !== 'all' && !/^(site|province):/.test(dest)) dest = PROVINCES.includes(dest.toUpperCase()) && dest.length === 2 ? 'province:' + dest.toUpperCase() : 'site:' + dest;
    if (!dest) { err.textContent = T('send.need_to'); return; }
    const w = win.value.trim();
    if (w && !WINDOW_RE.test(w)) { err.textContent = T('send.bad_window'); win.focus(); return; }
    const r = rate.value === '' ? null : Number(rate.value);
    if (r != null && !(r > 0)) { err.textContent = T('send.bad_rate'); rate.focus(); return; }
    const what = file.options[file.selectedIndex].textContent;
    if (dest === 'all' && !confirm(T('send.confirm_all', { file: what }))) return;
    submit.disabled = true;
    try {
      const a = await api('/api/admin/send', { path: file.value, to: dest, priority: prio.value, window: w || null, rate_limit_mbit: r });
      toast(T('send.ok', { file: a.file || what, n: (a.destinations || []).length }), 'ok');
      if (done) done(a);
    } catch (ex) {
      err.textContent = errText(ex);
      toastError(ex);
    } finally {
      submit.disabled = false;
    }
  });
  return f;
}

function receiptText(r) {
  if (!r) return null;
  return h('span.receipt', { title: (r.file_hash || '') + '\n' + (r.path || '') + '\n' + (r.node || '') },
    '✓ ' + T('transfers.verified') + ' ', timeEl(r.verified_ms), r.file_hash ? h('code', ' ' + String(r.file_hash).slice(0, 10) + '…') : null);
}

// ---------------------------------------------------------------------------------------------
// Charts (uPlot): history of a metric, avg with its min–max band
// ---------------------------------------------------------------------------------------------

const CHART_METRICS = ['link.rtt_ms', 'link.loss_pct', 'modem.esno_db', 'modem.rx_rate_kbps', 'modem.tx_rate_kbps', 'host.cpu_pct', 'host.mem_pct'];
const RANGES = { '1h': 3600e3, '24h': 86400e3, '7d': 7 * 86400e3, '30d': 30 * 86400e3 };
function fmtMetric(metric, v) {
  if (v == null || !isFinite(v)) return '—';
  if (metric.endsWith('_kbps')) return fmtKbps(v);
  if (metric.endsWith('_ms')) return num(v, v < 10 ? 1 : 0) + ' ms';
  if (metric.endsWith('_pct')) return num(v, 1) + '%';
  if (metric.endsWith('_db')) return num(v, 1) + ' dB';
  return num(v, 2);
}
const CHART_COLOURS = { 'link.rtt_ms': '#4ea1ff', 'link.loss_pct': '#ff8a65', 'modem.esno_db': '#2fbf71', 'modem.rx_rate_kbps': '#36c2c2',
  'modem.tx_rate_kbps': '#b794f6', 'host.cpu_pct': '#f0b429', 'host.mem_pct': '#e879a6' };
function rgba(hex, a) {
  const n = parseInt(hex.slice(1), 16);
  return 'rgba(' + (n >> 16) + ',' + ((n >> 8) & 255) + ',' + (n & 255) + ',' + a + ')';
}
const CHART_FONT = '11px "PingFang SC","Microsoft YaHei","Noto Sans CJK SC","WenQuanYi Micro Hei",sans-serif';

function makeChart(site, metric) {
  const plot = h('div.plot');
  const note = h('div.chart-note');
  const el = h('div.chart', { data: { metric } }, h('div.chart-title', T('metric.' + metric)), plot, note);
  let u = null, lastData = null;
  const colour = CHART_COLOURS[metric] || '#4ea1ff';
  const xValues = (self, splits, ax, space, incr) => {
    let prevDay = null;
    return splits.map((s) => {
      const d = new Date(s * 1000);
      if (incr >= 86400) return dtf('md').format(d);
      const day = dtf('md').format(d);
      const t = dtf('hm').format(d);
      const out = prevDay !== day && prevDay !== null ? day + '\n' + t : (prevDay === null && (splits[splits.length - 1] - splits[0]) > 80000 ? day + '\n' + t : t);
      prevDay = day;
      return out;
    });
  };
  const build = (data, width) => {
    const opts = {
      width, height: 170,
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1e3), TZ),
      cursor: { drag: { x: true, y: false }, points: { size: 6 } },
      legend: { live: true },
      scales: { x: { time: true }, y: { range: (self, min, max) => (metric === 'host.cpu_pct' || metric === 'host.mem_pct') ? [0, 100]
        : metric.endsWith('_pct') ? [0, Math.max(1, (max || 0) * 1.25)]
        : metric.endsWith('_kbps') ? [0, Math.max(1, (max || 0) * 1.15)] : uPlot.rangeNum(min == null ? 0 : min, max == null ? 1 : max, 0.1, true) } },
      series: [
        { label: T('col.time'), value: (self, v) => (v == null ? '—' : fmtTime(v * 1000, 'dt')) },
        { label: T('chart.avg'), stroke: colour, width: 1.6, value: (self, v) => fmtMetric(metric, v), spanGaps: false },
        { label: T('chart.min'), stroke: rgba(colour, 0.35), width: 1, value: (self, v) => fmtMetric(metric, v) },
        { label: T('chart.max'), stroke: rgba(colour, 0.35), width: 1, value: (self, v) => fmtMetric(metric, v) },
      ],
      bands: [{ series: [3, 2], fill: rgba(colour, 0.14) }],
      axes: [
        { stroke: '#8a96a8', font: CHART_FONT, grid: { stroke: '#222b38', width: 1 }, ticks: { stroke: '#2a3444', width: 1 }, values: xValues, space: 60 },
        { stroke: '#8a96a8', font: CHART_FONT, grid: { stroke: '#222b38', width: 1 }, ticks: { stroke: '#2a3444', width: 1 }, size: 70,
          values: (self, splits) => splits.map((v) => fmtMetric(metric, v)) },
      ],
    };
    u = new uPlot(opts, data, plot);
  };
  const width = () => Math.max(240, Math.floor(plot.clientWidth || el.clientWidth || 400));
  if (window.ResizeObserver) {
    let w0 = 0;
    new ResizeObserver(() => { const w = width(); if (u && Math.abs(w - w0) > 2) { w0 = w; u.setSize({ width: w, height: 170 }); } }).observe(plot);
  }
  return {
    el,
    async load(from, to) {
      if (!window.uPlot) { note.textContent = T('chart.no_uplot'); return; }
      let d;
      try {
        d = await api('/api/sites/' + encodeURIComponent(site) + '/history?metric=' + encodeURIComponent(metric) + '&from=' + from + '&to=' + to + '&points=300');
      } catch (e) { note.textContent = errText(e); return; }
      const pts = (d && d.points) || [];
      note.textContent = pts.length ? '' : T('chart.no_data');
      el.dataset.points = String(pts.length);
      // Buckets the server left out are gaps: a null breaks the line.
      const step = (to - from) / 300;
      const xs = [], av = [], mn = [], mx = [];
      for (let i = 0; i < pts.length; i++) {
        const p = pts[i];
        if (i > 0 && p[0] - pts[i - 1][0] > step * 2.5) { xs.push((pts[i - 1][0] + step) / 1000); av.push(null); mn.push(null); mx.push(null); }
        xs.push(p[0] / 1000); av.push(p[1]); mn.push(p[2] == null ? p[1] : p[2]); mx.push(p[3] == null ? p[1] : p[3]);
      }
      lastData = [xs, av, mn, mx];
      if (!u) build(lastData, width());
      else { u.setData(lastData); }
      u.setScale('x', { min: from / 1000, max: to / 1000 });
    },
    rebuild() { if (u && lastData) { u.destroy(); u = null; clear(plot); build(lastData, width()); } },
  };
}

// ---------------------------------------------------------------------------------------------
// One site
// ---------------------------------------------------------------------------------------------

function kvList(pairs) {
  return h('dl.kv', pairs.filter(Boolean).map(([k, v, cls]) => [h('dt', k), h('dd' + (cls ? '.' + cls : ''), v == null ? '—' : v)]));
}

// A device's answer: its status, its profile's objects (values, problems, alarms), how its
// address answered the reachability check, its ports. Everything here came from the network:
// text nodes only (h() never parses HTML).
const DEV_STATUSES = ['ok', 'timeout', 'bad-answer', 'error'];
const DEV_SEVERITIES = ['critical', 'major', 'minor', 'warning', 'info'];
// Ups.missing and Modem.missing: figures the device did not give (a 0 there is unknown).
const UPS_CHARGE = 1, UPS_RUNTIME = 2, MODEM_RX_LEVEL = 1, MODEM_TX_POWER = 2, MODEM_MODCOD = 4;
function devSevBadge(sev) {
  const s = DEV_SEVERITIES.includes(sev) ? sev : 'unknown';
  return h('span.sev.sev-' + s, T('sev.' + s));
}
function fmtRttUs(us) { return (us < 10000 ? num(us / 1000, 1) : num(Math.round(us / 1000))) + ' ms'; }
/** A reachability check: "✓ ping 0.4 ms", "✗ ping: timeout". */
function reachText(p) {
  const kind = T('dev.reach.' + (p.kind === 'icmp' || p.kind === 'tcp' ? p.kind : 'unknown'));
  return p.ok ? h('span.ok', '✓ ' + kind + ' ' + fmtRttUs(p.rtt_us || 0))
    : h('span.bad', '✗ ' + kind + ': ' + (p.error || T('dev.no_answer')));
}
function objValue(v) {
  const parts = [];
  if (v.value != null) parts.push(num(v.value, 2) + (v.unit ? ' ' + v.unit : ''));
  if (v.text) parts.push(v.text);
  return parts.join(' · ') || '—';
}
function unknownOr(missing, text) { return missing ? h('span.muted', T('dev.unknown')) : text; }
function deviceCard(x) {
  const st = DEV_STATUSES.includes(x.status) ? x.status : 'unknown';
  const ok = st === 'ok';
  const u = x.ups, mo = x.modem, ifs = x.interfaces || [], problems = x.problems || [];
  const down = ifs.filter((i) => !i.oper_up).length;
  return h('div.devcard' + (ok ? '' : '.dev-bad'), { data: { device: x.name, status: st } },
    h('div.devhead',
      h('b.devname', x.name),
      h('span.muted', x.profile_name || x.profile || ''),
      h('span' + (ok ? '.ok' : '.bad'), (ok ? '✓ ' : '✗ ') + T('dev.status.' + st)),
      x.error ? h('span.bad', x.error) : null,
      x.reach ? h('span.devreach', h('span.muted', T('dev.reach') + ' '), reachText(x.reach)) : null),
    u ? h('div.devline', h('b', 'UPS '), u.on_battery ? h('span.warn', T('status.on-battery')) : T('dev.mains'),
      ' · ' + T('dev.charge') + ' ', unknownOr(u.missing & UPS_CHARGE, pct(u.charge_pct, 0)),
      ' · ' + T('dev.runtime') + ' ', unknownOr(u.missing & UPS_RUNTIME, fmtDur(u.runtime_s))) : null,
    mo ? h('div.devline', h('b', T('dev.modem') + ' '), 'Es/No ' + num(mo.esno_db_x10 / 10, 1) + ' dB · ',
      unknownOr(mo.missing & MODEM_MODCOD, mo.modcod || '—'), ' · ↓ ' + fmtKbps(mo.rx_rate_kbps) + ' · ↑ ' + fmtKbps(mo.tx_rate_kbps),
      ' · ' + T('site.rx_level') + ' ', unknownOr(mo.missing & MODEM_RX_LEVEL, num(mo.rx_level_dbm_x10 / 10, 1) + ' dBm'),
      ' · ' + T('site.tx_power') + ' ', unknownOr(mo.missing & MODEM_TX_POWER, num(mo.tx_power_dbm_x10 / 10, 1) + ' dBm')) : null,
    (x.alarms || []).length ? h('ul.devalarms', x.alarms.map((a) => h('li', { data: { alarm: a.name } },
      devSevBadge(a.severity), ' ', h('b', a.name), a.detail ? h('span.detail', ' ' + a.detail) : null))) : null,
    (x.values || []).length ? h('table.grid.small.devvalues',
      h('thead', h('tr', h('th', T('dev.object')), h('th.num', T('dev.value')))),
      h('tbody', x.values.map((v) => h('tr', { data: { object: v.name } }, h('td', v.name), h('td.num', objValue(v)))))) : null,
    problems.length ? h('div.devproblems',
      h('h4', T('dev.problems', { n: problems.length })),
      h('table.grid.small',
        h('thead', h('tr', h('th', T('dev.object')), h('th', T('dev.kind')), h('th', T('col.detail')), h('th', ''))),
        h('tbody', problems.map((p) => h('tr' + (p.essential ? '.essential' : ''), { data: { object: p.name, kind: p.kind } },
          h('td', p.name), h('td', T('dev.problem.' + p.kind)), h('td.detail', p.detail || ''),
          h('td', p.essential ? h('span.bad', T('dev.essential')) : h('span.muted', T('dev.not_essential')))))))) : null,
    ifs.length ? h('details.devifs', { open: ifs.length <= 8 },
      h('summary', T('dev.interfaces', { n: ifs.length }), down ? h('span.bad', ' · ' + T('dev.ifs_down', { n: down })) : null),
      h('table.grid.small',
        h('thead', h('tr', h('th.num', '#'), h('th', T('site.interface')), h('th', T('dev.alias')), h('th.num', T('dev.speed')),
          h('th', T('col.status')), h('th.num', '↓ ' + T('site.rx_bytes')), h('th.num', '↑ ' + T('site.tx_bytes')), h('th.num', T('dev.errors')))),
        h('tbody', ifs.map((i) => h('tr', { data: { interface: i.name, oper: i.oper_up ? 'up' : 'down' } },
          h('td.num', String(i.index)), h('td', i.name), h('td', i.alias || ''),
          h('td.num', i.speed_mbps ? fmtBps(i.speed_mbps * 1e6) : '—'),
          h('td', i.oper_up ? h('span.ok', '▲ ' + T('dev.if_up')) : h('span.bad', '▼ ' + T('dev.if_down'))),
          h('td.num', fmtBytes(i.in_octets)), h('td.num', fmtBytes(i.out_octets)),
          h('td.num' + ((i.in_errors || 0) + (i.out_errors || 0) ? '.warn' : ''), num((i.in_errors || 0) + (i.out_errors || 0)))))))) : null);
}

/** What a site's devices said on their own (traps, informs), newest first; a flood the agent
 *  summarised is one line: "link-down ×340". */
function deviceEventsTable(list) {
  return h('table#site-device-events.grid.small',
    h('thead', h('tr', h('th', T('col.time')), h('th', T('col.severity')), h('th', T('dev.name')), h('th', T('dev.event')),
      h('th', T('col.detail')), h('th', T('dev.how')))),
    h('tbody', list.length ? list.map((e) => h('tr' + (SEV_RANK[e.severity] != null ? '.sev-' + e.severity : ''), { data: { device: e.device, event: e.name } },
      h('td', timeEl(e.at_ms)), h('td', devSevBadge(e.severity)), h('td', e.device),
      h('td', h('b', e.name + (e.count > 1 ? ' ×' + e.count : ''))), h('td.detail', e.detail || ''),
      h('td.muted', e.inform ? T('dev.inform') : T('dev.trap')))) : emptyRow(6, T('dev.no_events'))));
}

function pageSite() {
  const m = MAIN();
  const id = (BOOT.params && BOOT.params.site) || decodeURIComponent(location.pathname.split('/').pop() || '');
  const title = h('h1#site-title', id);
  const status = h('span#site-status.badge', { data: { status: 'unknown' } }, '…');
  const sub = h('span.site-sub');
  const summary = h('div.slot'), conds = h('div.slot'), link = h('div.slot'), host = h('div.slot'),
    devices = h('div.slot'), cert = h('div.slot'), alarms = h('div.slot'), xfers = h('div.slot'), paths = h('div.slot'),
    devEvents = h('div.slot');
  // The site's device events, newest first (from its answer, then the live stream).
  let eventList = [];
  // A dual-homed site's paths: shown only for a site that has them.
  const pathsPanel = section(T('site.paths'), paths);
  pathsPanel.id = 'site-paths';
  pathsPanel.hidden = true;
  const ranges = h('div.ranges', Object.keys(RANGES).map((r) => h('button.range', { type: 'button', data: { range: r } }, T('range.' + r))));
  const charts = h('div.charts');
  let range = RANGES[new URLSearchParams(location.search).get('range')] ? new URLSearchParams(location.search).get('range') : '24h';
  let chartList = [];
  let detail = null;
  let pending = [];
  let firstDone = false;
  let missing = false;

  const canWrite = ME && ME.can_write;
  const revoke = canWrite ? h('button#revoke.danger', { type: 'button' }, T('site.revoke')) : null;
  const actions = canWrite ? section(T('site.actions'),
    h('div.site-actions', h('div', h('h3', T('site.send_file')), sendForm(id, () => { loadXfers(); })),
      h('div.revoke-box', h('h3', T('site.revoke_title')), h('p.hint', T('site.revoke_hint')), revoke))) : null;

  replace(m,
    h('div.pagehead.sitehead', h('a.back', { href: '/sites', title: T('nav.sites') }, '‹'), title, status, sub, h('div.tools'), liveDot()),
    h('div.site-grid',
      section(T('site.summary'), summary, conds),
      section(T('site.link'), link),
      section(T('site.host'), host)),
    pathsPanel,
    section(T('site.charts'), ranges, charts),
    section(T('site.devices'), devices),
    h('div.site-grid2',
      section(T('site.device_events'), devEvents),
      section(T('site.certificate'), cert)),
    section(T('site.alarms'), alarms),
    section(T('site.transfers'), xfers),
    actions,
    footer());

  const renderDetail = (d) => {
    detail = d;
    status.dataset.status = d.status;
    status.className = 'badge st-' + d.status;
    status.textContent = T('status.' + d.status);
    replace(sub, provName(d.province) + ' · ' + (d.link && d.link.type ? T('link.' + d.link.type) : '—') + ' · ',
      h('span' + (d.connected ? '.ok' : '.bad'), d.connected ? T('site.connected') : T('site.disconnected')));
    document.title = id + ' · ' + T('app.title');
    const L = d.link || {}, lat = d.latest || {}, ll = lat.link || {}, hs = lat.host || {}, hv = d.host || {};
    replace(summary, kvList([
      [T('col.province'), provName(d.province) + ' (' + d.province + ')'],
      [T('col.status'), h('span', badge(d.status), ' ', h('span.muted', T('site.since') + ' '), timeEl(d.status_since_ms))],
      [T('site.connection'), d.connected ? T('site.connected') : T('site.disconnected'), d.connected ? 'ok' : 'bad'],
      [T('col.last_seen'), h('span', fmtAgo(d.last_seen_ms), ' · ', timeEl(d.last_seen_ms))],
      [T('site.interval'), d.interval_ms ? fmtDur(d.interval_ms / 1000) : '—'],
    ]));
    replace(conds, (d.conditions || []).length ? h('ul.condlist', d.conditions.map((c) => h('li.sev-' + severityOf(c.condition),
      sevBadge(severityOf(c.condition)), ' ', h('b', T('alarm.' + c.condition)), ' ', h('span.detail', c.detail || ''), ' ', h('span.muted', T('site.since') + ' '), timeEl(c.since_ms))))
      : h('p.allgood.small', T('site.no_conditions')));
    const modem = (lat.devices || []).map((x) => x.modem).find(Boolean) || null;
    replace(link, kvList([
      [T('col.link'), L.type ? T('link.' + L.type) : '—'],
      [T('col.rtt'), L.rtt_ms == null ? null : num(L.rtt_ms) + ' ms'],
      [T('col.loss'), L.loss_pct == null ? null : pct(L.loss_pct, 2), L.loss_pct >= 2 ? 'bad' : L.loss_pct >= 0.5 ? 'warn' : ''],
      [T('col.esno'), L.esno_db == null ? null : num(L.esno_db, 1) + ' dB', L.esno_db != null && L.esno_db < 5 ? 'warn' : ''],
      [T('col.modcod'), L.modcod],
      [T('col.rx'), fmtKbps(L.rx_kbps)],
      [T('col.tx'), fmtKbps(L.tx_kbps)],
      modem ? [T('site.rx_level'), num(modem.rx_level_dbm_x10 / 10, 1) + ' dBm'] : null,
      modem ? [T('site.tx_power'), num(modem.tx_power_dbm_x10 / 10, 1) + ' dBm'] : null,
      [T('site.packets'), ll.sent_packets == null ? null : num(ll.sent_packets) + ' / ' + num(ll.lost_packets) + ' ' + T('site.lost')],
      [T('site.cwnd'), ll.cwnd_bytes == null ? null : fmtBytes(ll.cwnd_bytes)],
      [T('site.wire'), ll.rx_bytes == null ? null : '↓ ' + fmtBytes(ll.rx_bytes) + ' · ↑ ' + fmtBytes(ll.tx_bytes)],
    ]));
    const fs = hs.filesystems || [], ifs = hs.interfaces || [];
    replace(host,
      kvList([
        [T('col.cpu'), hs.cpu_permille == null ? pct(hv.cpu_pct, 1) : pct(hs.cpu_permille / 10, 1)],
        [T('site.load'), hs.load1_c == null ? null : num(hs.load1_c / 100, 2)],
        [T('col.mem'), hs.mem_total_mib ? fmtMib(hs.mem_used_mib) + ' / ' + fmtMib(hs.mem_total_mib) + ' (' + pct(100 * hs.mem_used_mib / hs.mem_total_mib, 0) + ')' : pct(hv.mem_pct, 0)],
        [T('site.uptime'), hs.uptime_s == null ? null : fmtDur(hs.uptime_s)],
      ]),
      fs.length ? h('table.grid.small', h('thead', h('tr', h('th', T('site.mount')), h('th.num', T('site.used')), h('th', ''), h('th.num', '%'))),
        h('tbody', fs.map((x) => {
          const p = x.total_mib ? 100 * x.used_mib / x.total_mib : 0;
          return h('tr', h('td', x.mount), h('td.num', fmtMib(x.used_mib) + ' / ' + fmtMib(x.total_mib)),
            h('td.barcell', bar(p, p >= 95 ? 'bad' : p >= 85 ? 'warn' : 'ok')), h('td.num', pct(p, 0)));
        }))) : null,
      ifs.length ? h('table.grid.small', h('thead', h('tr', h('th', T('site.interface')), h('th.num', '↓ ' + T('site.rx_bytes')), h('th.num', '↑ ' + T('site.tx_bytes')))),
        h('tbody', ifs.map((x) => h('tr', h('td', x.name), h('td.num', fmtBytes(x.rx_bytes)), h('td.num', fmtBytes(x.tx_bytes)))))) : null);
    const devs = lat.devices || [];
    const probes = lat.probes || [];
    replace(devices, devs.length ? h('div.devcards', devs.map(deviceCard)) : h('p.muted', T('dev.none')),
      probes.length ? h('div#site-probes', h('h4', T('dev.checks')),
        h('table.grid.small',
          h('thead', h('tr', h('th', T('dev.check')), h('th', T('col.status')))),
          h('tbody', probes.map((p) => h('tr', { data: { target: p.target, ok: p.ok ? 'yes' : 'no' } },
            h('td', p.target === 'next-hop' ? T('dev.next_hop') : p.target), h('td', reachText(p))))))) : null);
    eventList = (d.events || []).slice(0, 100);
    replace(devEvents, deviceEventsTable(eventList));
    const c = d.certificate;
    if (c) {
      const left = c.not_after_ms ? (c.not_after_ms - Date.now()) / 86400e3 : null;
      replace(cert, kvList([
        [T('cert.serial'), h('code', c.serial || '—')],
        [T('cert.role'), T('cert.role.' + (c.role || 'site'))],
        [T('cert.enrolled'), timeEl(c.enrolled_ms)],
        [T('cert.not_after'), h('span', timeEl(c.not_after_ms), left != null ? ' (' + (left < 0 ? T('cert.expired') : T('cert.days_left', { n: Math.floor(left) })) + ')' : ''),
          left != null && left < 30 ? 'warn' : ''],
        [T('cert.revoked'), c.revoked_ms ? timeEl(c.revoked_ms) : T('cert.not_revoked'), c.revoked_ms ? 'bad' : 'ok'],
      ]));
      if (revoke) { revoke.disabled = !!c.revoked_ms; revoke.textContent = c.revoked_ms ? T('site.revoked') : T('site.revoke'); }
    } else replace(cert, h('p.muted', T('cert.none')));
    renderPaths(d.paths);
  };

  // Each path (state in the status colours, figures as the site measured them, whether this
  // controller holds a connection on it), the path each class of traffic uses, and the latest
  // switches, newest first.
  const renderPaths = (p) => {
    pathsPanel.hidden = !p;
    if (!p) { clear(paths); return; }
    const list = p.paths || [], uses = p.uses || {};
    const sw = (p.switches || []).slice().reverse();
    const lossCls = (x) => (x >= 2 ? 'bad' : x >= 0.5 ? 'warn' : '');
    replace(paths,
      h('p.muted.small', T('paths.about'), ' ', T('paths.updated'), ' ', timeEl(p.updated_ms)),
      h('table#site-paths-table.grid',
        h('thead', h('tr', h('th', T('paths.name')), h('th', T('paths.kind')), h('th', T('col.state')),
          h('th.num', T('col.rtt')), h('th.num', T('col.loss')), h('th.num', T('col.tx')), h('th.num', T('col.rx')),
          h('th.num', T('paths.budget')), h('th', T('site.connection')))),
        h('tbody', list.length ? list.map((x) => h('tr', { data: { path: x.name, state: x.state } },
          h('td', h('b', x.name)),
          h('td', T('link.' + (x.kind === 'sky' ? 'satellite' : 'terrestrial'))),
          h('td', pathBadge(x.state), x.since_ms ? h('div.muted.small', T('site.since') + ' ', timeEl(x.since_ms)) : null),
          h('td.num', x.rtt_ms ? num(x.rtt_ms) + ' ms' : '—'),
          h('td.num' + (lossCls(x.loss_pct) ? '.' + lossCls(x.loss_pct) : ''), pct(x.loss_pct, 1)),
          h('td.num', fmtKbps(x.tx_kbps)), h('td.num', fmtKbps(x.rx_kbps)),
          h('td.num', x.budget_kbps ? fmtKbps(x.budget_kbps) : T('paths.no_limit')),
          h('td' + (x.connected ? '.ok' : '.bad'), x.connected ? '✓ ' + T('site.connected') : '✗ ' + T('site.disconnected')))) : emptyRow(9))),
      h('div.site-grid2',
        h('div',
          h('h3', T('paths.uses')),
          h('table#site-path-uses.grid.small',
            h('thead', h('tr', h('th', T('paths.class')), h('th', T('paths.name')))),
            h('tbody', PATH_CLASSES.concat(Object.keys(uses).filter((c) => !PATH_CLASSES.includes(c))).map((c) =>
              h('tr', { data: { class: c } }, h('td', T('paths.class.' + c)),
                h('td', uses[c] ? h('b', uses[c]) : h('span.bad', T('paths.none_usable')))))))),
        h('div',
          h('h3', T('paths.switches')),
          h('table#site-path-switches.grid.small',
            h('thead', h('tr', h('th', T('col.time')), h('th', T('paths.class')), h('th', T('paths.from_to')), h('th', T('paths.reason')))),
            h('tbody', sw.length ? sw.map((x) => h('tr', { data: { class: x.class } },
              h('td', timeEl(x.at_ms)), h('td', T('paths.class.' + x.class)),
              h('td', (x.from || T('paths.nowhere')) + ' → ' + (x.to || T('paths.nowhere'))),
              h('td.detail', { title: x.reason || '' }, pathReason(x.reason)))) : emptyRow(4, T('paths.no_switches')))))));
  };

  const renderAlarms = (ad) => {
    for (const a of ad.active || []) a.severity = a.severity || severityOf(a.alarm);
    const act = (ad.active || []).slice().sort((a, b) => SEV_RANK[a.severity] - SEV_RANK[b.severity] || b.since_ms - a.since_ms);
    const log = (ad.log || []).slice().reverse().slice(0, 100);
    replace(alarms,
      h('table#site-alarms.grid',
        h('thead', h('tr', h('th', T('col.severity')), h('th', T('col.alarm')), h('th', T('col.detail')), h('th', T('col.since')), h('th', T('col.ack')))),
        h('tbody', act.length ? act.map((a) => h('tr.sev-' + a.severity + (a.ack ? '.is-acked' : ''), { data: { site: a.site_id, alarm: a.alarm } },
          h('td', sevBadge(a.severity)), h('td', T('alarm.' + a.alarm)), h('td.detail', a.detail || ''),
          h('td', timeEl(a.since_ms), h('div.muted', fmtDur((Date.now() - a.since_ms) / 1000))), ackCell(a, 5))) : emptyRow(5, T('alarms.none_active')))),
      h('h3', T('alarms.history')),
      h('table#site-alarm-log.grid.small',
        h('thead', h('tr', h('th', T('col.time')), h('th', T('col.alarm')), h('th', T('col.state')), h('th', T('col.detail')))),
        h('tbody', log.length ? log.map((e) => h('tr.ev-' + e.state,
          h('td', timeEl(e.at_ms)), h('td', sevBadge(e.severity || severityOf(e.alarm)), ' ', T('alarm.' + e.alarm)),
          h('td', h('span.evstate.' + e.state, T('alarms.state.' + e.state))), h('td.detail', e.detail || ''))) : emptyRow(4))));
  };

  const loadXfers = async () => {
    try {
      const d = await api('/api/transfers?limit=1000');
      const mine = (d.transfers || []).filter((j) => j.dest === id);
      replace(xfers, mine.length ? h('table.grid.site-xfers',
        h('thead', h('tr', h('th', T('col.file')), h('th', T('col.priority')), h('th', T('col.state')), h('th', T('col.progress')),
          h('th.num', T('col.rate')), h('th.num', T('col.eta')), h('th', T('col.window')), h('th', T('col.created')), h('th', T('col.receipt')))),
        h('tbody', mine.map((j) => h('tr', { data: { transfer: j.id, dest: j.dest } },
          h('td', { title: j.file }, j.file, h('div.muted', fmtBytes(j.bytes))), h('td', h('span.prio.p-' + j.priority, T('prio.' + j.priority))),
          h('td', stateBadge(j.state), j.error ? h('div.bad.small', j.error) : null),
          h('td.progress', bar(j.progress_pct, 's-' + j.state), h('span.num', ' ' + pct(j.progress_pct, 1))),
          h('td.num', j.state === 'sending' ? fmtBps(j.rate_bps) : '—'), h('td.num', j.eta_s != null ? fmtDur(j.eta_s) : '—'),
          h('td', j.window || '—'), h('td', timeEl(j.created_ms)), h('td', receiptText(j.receipt) || '—'))))) : h('p.muted', T('transfers.none_site')));
    } catch (e) { replace(xfers, errorBox(e)); }
  };

  const load = async () => {
    const batch = pending;
    pending = [];
    try {
      const [d, ad] = await Promise.all([
        api('/api/sites/' + encodeURIComponent(id)),
        api('/api/alarms?site=' + encodeURIComponent(id) + '&limit=100').catch((e) => ({ active: [], log: [], error: e })),
      ]);
      renderDetail(d);
      if (!alarms.querySelector('form.ack-form')) renderAlarms(ad);
      for (const ev of batch) recordLive(ev.type, ev.site_id, ev.type === 'site' ? ev.status : ev.state, ev.at_ms);
      if (!firstDone) {
        firstDone = true;
        const have = new Set(d.metrics || ['link.rtt_ms', 'host.cpu_pct']);
        chartList = CHART_METRICS.filter((x) => have.has(x)).map((x) => makeChart(id, x));
        replace(charts, chartList.map((c) => c.el));
        if (!chartList.length) charts.appendChild(h('p.muted', T('chart.no_metrics')));
        loadCharts();
        markReady();
      }
    } catch (e) {
      if (e.status === 404) {
        // Unknown here, or outside this account's province: nothing of the page is shown.
        if (missing) return;
        missing = firstDone = true;
        replace(m, h('div.pagehead.sitehead', h('a.back', { href: '/sites', title: T('nav.sites') }, '‹'), h('h1#site-title', id)),
          h('div#site-missing.errorbox', T('site.not_found')), footer());
        markReady();
        return;
      }
      if (!firstDone) {
        firstDone = true;
        status.textContent = '?';
        replace(summary, errorBox(e));
        markReady();
      }
      toastError(e);
    }
  };
  const loadCharts = () => {
    const to = Date.now(), from = to - RANGES[range];
    for (const b of $$('button.range', ranges)) b.classList.toggle('active', b.dataset.range === range);
    return Promise.all(chartList.map((c) => c.load(from, to)));
  };
  ranges.addEventListener('click', (e) => {
    const b = e.target.closest('button[data-range]');
    if (!b) return;
    range = b.dataset.range;
    const q = new URLSearchParams(location.search);
    if (range === '24h') q.delete('range'); else q.set('range', range);
    history.replaceState(null, '', location.pathname + (q.toString() ? '?' + q : ''));
    fixLangLinks();
    loadCharts();
  });
  if (revoke) revoke.addEventListener('click', async () => {
    if (!confirm(T('site.revoke_confirm', { site: id }))) return;
    revoke.disabled = true;
    try {
      const r = await api('/api/admin/revoke', { site_id: id });
      toast(T('site.revoked_ok', { site: id }) + (r.disconnected ? ' ' + T('site.disconnected_now') : ''), 'ok');
      load();
    } catch (e) { toastError(e); revoke.disabled = false; }
  });
  onRetime(() => { chartList.forEach((c) => c.rebuild()); });

  const kick = coalescer(load, 500);
  const kickX = coalescer(loadXfers, 1000);
  Live.start(['site', 'alarm', 'transfer', 'path', 'device-event'], (ev) => {
    if ((ev.type === 'site' || ev.type === 'alarm') && ev.site_id === id) { pending.push(ev); kick(); }
    else if (ev.type === 'path' && ev.site_id === id) kick();
    else if (ev.type === 'device-event' && ev.site_id === id) {
      // At once, before the refetch its report brings.
      eventList = [ev].concat(eventList.filter((e) => !(e.seq === ev.seq && e.at_ms === ev.at_ms && e.device === ev.device && e.name === ev.name))).slice(0, 100);
      replace(devEvents, deviceEventsTable(eventList));
      recordLive('device-event', id, ev.name, ev.at_ms);
      kick();
    }
    else if (ev.type === 'transfer' && ev.dest === id) kickX();
  }, () => { kick(); kickX(); }, ['transfer', 'path', 'device-event']);
  setInterval(() => { loadCharts(); loadXfers(); }, 30000);
  setInterval(() => { if (detail) kick(); }, 60000);
  load();
  loadXfers();
}

// ---------------------------------------------------------------------------------------------
// Alarms: active (acknowledge with a comment) and history, filters in the URL
// ---------------------------------------------------------------------------------------------

function pageAlarms() {
  const m = MAIN();
  const q0 = new URLSearchParams(location.search);
  const st = {
    site: (q0.get('site') || '').slice(0, 64),
    province: PROVINCES.includes(q0.get('province')) ? q0.get('province') : '',
    severity: SEVERITIES.includes(q0.get('severity')) ? q0.get('severity') : '',
    alarm: ALARMS.includes(q0.get('alarm')) ? q0.get('alarm') : '',
    unacked: q0.get('unacked') === '1',
  };
  const fSite = h('input#fa-site', { type: 'search', placeholder: T('alarms.site_ph'), value: st.site, autocomplete: 'off' });
  const fProv = selectOf({ id: 'fa-province' }, provinceOptions(), st.province);
  const fSev = selectOf({ id: 'fa-severity' }, [['', T('filter.all_severities')]].concat(SEVERITIES.map((s) => [s, T('sev.' + s)])), st.severity);
  const fAlarm = selectOf({ id: 'fa-alarm' }, [['', T('filter.all_alarms')]].concat(ALARMS.map((a) => [a, T('alarm.' + a)])), st.alarm);
  const fUn = h('input#fa-unacked', { type: 'checkbox', checked: st.unacked });
  const summary = h('div.sevrow.small');
  const activeBody = h('tbody');
  const logBody = h('tbody');
  const older = h('button.ghost', { type: 'button', hidden: true }, T('alarms.older'));
  const activeCount = h('span.count');
  let next = null, expanded = false, pending = [], first = true, lastActive = [];

  replace(m,
    pageHead(T('nav.alarms'), h('span.stale', { hidden: true })),
    h('div.filters', fSite, fProv, fSev, fAlarm, h('label.check', fUn, ' ' + T('alarms.only_unacked'))),
    summary,
    section(h('span', T('alarms.active'), ' ', activeCount),
      h('div.tablewrap', h('table#active-alarms.grid',
        h('thead', h('tr', h('th', T('col.severity')), h('th', T('col.site')), h('th', T('col.province')), h('th', T('col.alarm')),
          h('th', T('col.detail')), h('th', T('col.since')), h('th', T('col.duration')), h('th', T('col.ack')))),
        activeBody))),
    section(T('alarms.history'),
      h('div.tablewrap', h('table#alarm-log.grid.small',
        h('thead', h('tr', h('th', T('col.time')), h('th', T('col.severity')), h('th', T('col.site')), h('th', T('col.province')),
          h('th', T('col.alarm')), h('th', T('col.state')), h('th', T('col.detail')))),
        logBody)),
      h('div.pager', older)),
    footer());

  const query = (extra) => {
    const q = new URLSearchParams();
    if (st.site) q.set('site', st.site);
    if (st.province) q.set('province', st.province);
    if (st.severity) q.set('severity', st.severity);
    if (st.alarm) q.set('alarm', st.alarm);
    for (const k of Object.keys(extra || {})) q.set(k, extra[k]);
    return q;
  };
  const syncUrl = () => {
    const q = query(st.unacked ? { unacked: '1' } : {});
    history.replaceState(null, '', location.pathname + (q.toString() ? '?' + q : ''));
    fixLangLinks();
  };
  const renderActive = (act) => {
    for (const a of act) a.severity = a.severity || severityOf(a.alarm);
    lastActive = act;
    const by = { critical: 0, major: 0, minor: 0 };
    let un = 0;
    for (const a of act) { by[a.severity] = (by[a.severity] || 0) + 1; if (!a.ack) un++; }
    replace(summary,
      SEVERITIES.map((s) => h('button.sevcard.sev-' + s + (by[s] ? '.hot' : '') + (st.severity === s ? '.active' : ''), { type: 'button', data: { sev: s } },
        h('div.card-label', T('sev.' + s)), h('div.card-num', String(by[s] || 0)))),
      h('div.sevcard.unacked', h('div.card-label', T('alarms.unacked')), h('div.card-num', String(un))));
    const rows = act.filter((a) => !st.unacked || !a.ack)
      .sort((a, b) => SEV_RANK[a.severity] - SEV_RANK[b.severity] || (a.ack ? 1 : 0) - (b.ack ? 1 : 0) || b.since_ms - a.since_ms);
    activeCount.textContent = '(' + rows.length + ')';
    const frag = document.createDocumentFragment();
    for (const a of rows.slice(0, 2000)) {
      frag.appendChild(h('tr.sev-' + a.severity + (a.ack ? '.is-acked' : ''), { data: { site: a.site_id, alarm: a.alarm } },
        h('td', sevBadge(a.severity)), h('td', siteLink(a.site_id)), h('td', provName(a.province)),
        h('td', T('alarm.' + a.alarm)), h('td.detail', a.detail || ''), h('td', timeEl(a.since_ms)),
        h('td.num', fmtDur((Date.now() - a.since_ms) / 1000)), ackCell(a, 8, () => renderSummaryOnly())));
    }
    if (!rows.length) frag.appendChild(emptyRow(8, T('alarms.none_active')));
    if (rows.length > 2000) frag.appendChild(emptyRow(8, T('alarms.more', { n: rows.length - 2000 })));
    clear(activeBody).appendChild(frag);
  };
  const renderSummaryOnly = () => {
    const un = lastActive.filter((a) => !a.ack).length;
    const c = summary.querySelector('.unacked .card-num');
    if (c) c.textContent = String(un);
  };
  const logRow = (e) => h('tr.ev-' + e.state, { data: { site: e.site_id, alarm: e.alarm } },
    h('td', timeEl(e.at_ms)), h('td', sevBadge(e.severity || severityOf(e.alarm))), h('td', siteLink(e.site_id)),
    h('td', provName(e.province)), h('td', T('alarm.' + e.alarm)), h('td', h('span.evstate.' + e.state, T('alarms.state.' + e.state))),
    h('td.detail', e.detail || ''));
  const renderLog = (log, append) => {
    const frag = document.createDocumentFragment();
    for (const e of log.slice().reverse()) frag.appendChild(logRow(e));
    if (!append) clear(logBody);
    if (!append && !log.length) frag.appendChild(emptyRow(7));
    logBody.appendChild(frag);
    older.hidden = !next;
  };
  let ctl = null;
  const load = async () => {
    const batch = pending;
    pending = [];
    if (ctl) ctl.abort();
    const my = (ctl = new AbortController());
    try {
      const d = await api('/api/alarms?' + query({ limit: '200' }), undefined, { signal: my.signal });
      if (my !== ctl) return;
      ctl = null;
      if (!activeBody.querySelector('form.ack-form')) renderActive(d.active || []);
      if (!expanded) { next = d.next || null; renderLog(d.log || [], false); }
      for (const ev of batch) recordLive('alarm', ev.site_id, ev.state, ev.at_ms);
      setStale(false);
      if (first) { first = false; markReady(); }
    } catch (e) {
      if (isAbort(e)) return;
      pending = batch.concat(pending);
      setStale(true, e);
      toastError(e);
      if (first) { first = false; markReady(); }
    }
  };
  const change = () => { expanded = false; syncUrl(); load(); };
  fSite.addEventListener('input', debounce(() => { st.site = fSite.value.trim(); change(); }, 300));
  fProv.addEventListener('change', () => { st.province = fProv.value; change(); });
  fSev.addEventListener('change', () => { st.severity = fSev.value; change(); });
  fAlarm.addEventListener('change', () => { st.alarm = fAlarm.value; change(); });
  fUn.addEventListener('change', () => { st.unacked = fUn.checked; syncUrl(); renderActive(lastActive); });
  summary.addEventListener('click', (e) => {
    const b = e.target.closest('button[data-sev]');
    if (!b) return;
    st.severity = st.severity === b.dataset.sev ? '' : b.dataset.sev;
    fSev.value = st.severity;
    change();
  });
  older.addEventListener('click', async () => {
    if (!next) return;
    older.disabled = true;
    try {
      const d = await api('/api/alarms?' + query({ limit: '200', before: next }));
      expanded = true;
      next = d.next || null;
      renderLog(d.log || [], true);
    } catch (e) { toastError(e); }
    older.disabled = false;
  });
  const kick = coalescer(load, 500);
  Live.start(['alarm'], (ev) => {
    if (ev.type !== 'alarm') return;
    if (st.province && ev.province !== st.province) return;
    if (st.site && ev.site_id !== st.site) return;
    pending.push(ev);
    kick();
  }, kick);
  setInterval(kick, 60000);
  syncUrl();
  load();
}

// ---------------------------------------------------------------------------------------------
// Transfers: grouped by transfer ID, a row per destination; the send form
// ---------------------------------------------------------------------------------------------

const ACTIVE_STATES = new Set(['queued', 'sending', 'paused', 'waiting-window']);

function pageTransfers() {
  const m = MAIN();
  const q0 = new URLSearchParams(location.search);
  let fstate = ['active', 'delivered', 'failed'].includes(q0.get('state')) ? q0.get('state') : '';
  let ftext = (q0.get('q') || '').slice(0, 100);
  let limit = 200;
  let data = null;
  let first = true;
  const open = new Set(), closed = new Set(), showAll = new Set();
  const fState = selectOf({ id: 'ft-state' }, [['', T('filter.all_states')], ['active', T('transfers.f_active')],
    ['delivered', T('xstate.delivered')], ['failed', T('xstate.failed')]], fstate);
  const fText = h('input#ft-q', { type: 'search', placeholder: T('transfers.search'), value: ftext, autocomplete: 'off' });
  const totals = h('span.count-label');
  const more = h('button.ghost', { type: 'button', hidden: true }, T('transfers.more'));
  const tbody = h('tbody');
  const recv = h('div.slot');
  const canWrite = ME && ME.can_write;
  replace(m,
    pageHead(T('nav.transfers'), totals, h('span.stale', { hidden: true })),
    canWrite ? h('details.panel.sendpanel', { open: true }, h('summary', h('h2', T('transfers.send'))), sendForm(null, () => kick())) : null,
    section(null,
      h('div.filters', fState, fText),
      h('div.tablewrap', h('table#transfers.grid.xfers',
        h('thead', h('tr', h('th', ''), h('th', T('col.dest_file')), h('th', T('col.priority')), h('th', T('col.state')), h('th', T('col.progress')),
          h('th.num', T('col.size')), h('th.num', T('col.rate')), h('th.num', T('col.eta')), h('th', T('col.window')), h('th', T('col.receipt')), h('th', T('col.updated')))),
        tbody)),
      h('div.pager', more)),
    section(T('transfers.received'), recv),
    footer());

  const match = (j) => {
    if (fstate === 'active' && !ACTIVE_STATES.has(j.state)) return false;
    if (fstate && fstate !== 'active' && j.state !== fstate) return false;
    if (ftext) { const t = ftext.toLowerCase(); if (!String(j.file).toLowerCase().includes(t) && !String(j.dest).toLowerCase().includes(t) && !String(j.id).startsWith(t)) return false; }
    return true;
  };
  const destRow = (j) => h('tr.dest.s-' + j.state, { data: { transfer: j.id, dest: j.dest, state: j.state } },
    h('td', ''),
    h('td.destcell', siteLink(j.dest), j.via ? h('span.muted', ' ' + T('transfers.via', { relay: j.via })) : null),
    h('td', ''),
    h('td.st', stateBadge(j.state), j.error ? h('div.bad.small', j.error) : null),
    h('td.progress', bar(j.progress_pct, 's-' + j.state), h('span.pct', ' ' + pct(j.progress_pct, 1))),
    h('td.num', fmtBytes(j.acked_bytes) + ' / ' + fmtBytes(j.bytes)),
    h('td.num', j.state === 'sending' ? fmtBps(j.rate_bps) : '—'),
    h('td.num', j.eta_s != null && j.state !== 'delivered' ? fmtDur(j.eta_s) : '—'),
    h('td', j.window || '—'),
    h('td', receiptText(j.receipt) || '—'),
    h('td', timeEl(j.updated_ms)));
  const render = () => {
    if (!data) return;
    const groups = new Map();
    for (const j of data.transfers || []) {
      let g = groups.get(j.id);
      if (!g) { g = { id: j.id, jobs: [], created: j.created_ms, updated: j.updated_ms }; groups.set(j.id, g); }
      g.jobs.push(j);
      g.created = Math.min(g.created, j.created_ms);
      g.updated = Math.max(g.updated, j.updated_ms);
    }
    const list = Array.from(groups.values()).filter((g) => g.jobs.some(match)).sort((a, b) => b.created - a.created);
    const frag = document.createDocumentFragment();
    for (const g of list) {
      const jobs = g.jobs.filter(match).sort((a, b) => String(a.dest).localeCompare(String(b.dest)));
      const j0 = g.jobs[0];
      let bytes = 0, acked = 0, rate = 0, eta = null;
      const states = {};
      for (const j of g.jobs) {
        bytes += j.bytes || 0; acked += j.acked_bytes || 0;
        states[j.state] = (states[j.state] || 0) + 1;
        if (j.state === 'sending') { rate += j.rate_bps || 0; if (j.eta_s != null) eta = Math.max(eta || 0, j.eta_s); }
      }
      const p = bytes ? 100 * acked / bytes : 0;
      const worst = states.failed ? 'failed' : states.sending ? 'sending' : states.paused ? 'paused' : states.queued ? 'queued' : states.delivered === g.jobs.length ? 'delivered' : Object.keys(states)[0];
      const isOpen = open.has(g.id) || (!closed.has(g.id) && g.jobs.length <= 12);
      const tog = h('button.toggle', { type: 'button', title: T('transfers.toggle'), 'aria-expanded': String(isOpen) }, isOpen ? '▾' : '▸');
      frag.appendChild(h('tr.group.s-' + worst, { data: { transfer: g.id } },
        h('td', tog),
        h('td.filecell', h('b', j0.file), h('span.muted', ' → ' + T('transfers.n_dest', { n: g.jobs.length })), h('div.muted.small', h('code', g.id))),
        h('td', h('span.prio.p-' + j0.priority, T('prio.' + j0.priority))),
        h('td.states', Object.keys(states).sort().map((s) => h('span.stcount.s-' + s, T('xstate.' + s) + ' ' + states[s]))),
        h('td.progress', bar(p, 's-' + worst), h('span.pct', ' ' + pct(p, 1))),
        h('td.num', fmtBytes(j0.bytes) + (g.jobs.length > 1 ? ' ×' + g.jobs.length : '')),
        h('td.num', rate ? fmtBps(rate) : '—'),
        h('td.num', eta != null ? fmtDur(eta) : '—'),
        h('td', j0.window || '—'),
        h('td', states.delivered ? T('transfers.delivered_n', { n: states.delivered, of: g.jobs.length }) : '—'),
        h('td', timeEl(g.created))));
      if (isOpen) {
        const cap = showAll.has(g.id) ? jobs.length : 50;
        const shown = jobs.filter((j) => j.state === 'failed').concat(jobs.filter((j) => j.state !== 'failed')).slice(0, cap);
        for (const j of shown) frag.appendChild(destRow(j));
        if (jobs.length > cap) frag.appendChild(h('tr.more', h('td', ''), h('td', { colspan: 10 },
          h('button.ghost.showall', { type: 'button', data: { transfer: g.id } }, T('transfers.show_all', { n: jobs.length })))));
      }
    }
    if (!list.length) frag.appendChild(emptyRow(11, T('transfers.none')));
    clear(tbody).appendChild(frag);
    const total = data.total_transfers || (data.transfers || []).length;
    totals.textContent = T('transfers.totals', { groups: groups.size, jobs: (data.transfers || []).length, total });
    more.hidden = !((data.transfers || []).length < total && limit < 10000);
    const rec = data.received || [];
    replace(recv, rec.length ? h('table#received.grid.small',
      h('thead', h('tr', h('th', T('col.from')), h('th', T('col.file')), h('th.num', T('col.size')), h('th', T('col.progress')), h('th', T('col.started')), h('th', T('col.receipt')))),
      h('tbody', rec.map((r) => h('tr', h('td', siteLink(r.from)), h('td', { title: r.path || '' }, r.file), h('td.num', fmtBytes(r.bytes)),
        h('td.progress', bar(r.progress_pct, r.receipt ? 's-delivered' : 's-sending'), h('span.pct', ' ' + pct(r.progress_pct, 1))),
        h('td', timeEl(r.started_ms)), h('td', receiptText(r.receipt) || '—'))))) : h('p.muted', T('transfers.none_received')));
  };
  const load = async () => {
    try {
      data = await api('/api/transfers?limit=' + limit);
      render();
      setStale(false);
    } catch (e) {
      setStale(true, e);
      toastError(e);
    }
    if (first) { first = false; markReady(); }
  };
  const syncUrl = () => {
    const q = new URLSearchParams();
    if (fstate) q.set('state', fstate);
    if (ftext) q.set('q', ftext);
    history.replaceState(null, '', location.pathname + (q.toString() ? '?' + q : ''));
    fixLangLinks();
  };
  fState.addEventListener('change', () => { fstate = fState.value; syncUrl(); render(); });
  fText.addEventListener('input', debounce(() => { ftext = fText.value.trim(); syncUrl(); render(); }, 250));
  more.addEventListener('click', () => { limit = Math.min(10000, limit * 5); load(); });
  tbody.addEventListener('click', (e) => {
    const sa = e.target.closest('button.showall');
    if (sa) { showAll.add(sa.dataset.transfer); render(); return; }
    if (e.target.closest('a')) return;
    const tr = e.target.closest('tr.group');
    if (!tr) return;
    const id = tr.dataset.transfer;
    const isOpen = tr.querySelector('button.toggle').getAttribute('aria-expanded') === 'true';
    if (isOpen) { open.delete(id); closed.add(id); } else { closed.delete(id); open.add(id); }
    render();
  });
  const kick = coalescer(load, 500);
  // A transfer event moves its row's bar at once; the refetch brings rates and totals.
  Live.start(['transfer', 'site'], (ev) => {
    if (ev.type !== 'transfer') return;
    const tr = tbody.querySelector('tr.dest[data-transfer="' + CSS.escape(String(ev.id)) + '"][data-dest="' + CSS.escape(String(ev.dest)) + '"]');
    if (tr) {
      const b = tr.querySelector('.bar i');
      if (b) b.style.width = Math.max(0, Math.min(100, ev.progress_pct || 0)) + '%';
      const p = tr.querySelector('.pct');
      if (p) p.textContent = ' ' + pct(ev.progress_pct, 1);
      if (tr.dataset.state !== ev.state) { const s = tr.querySelector('td.st'); if (s) replace(s, stateBadge(ev.state)); tr.dataset.state = ev.state; }
    }
    recordLive('transfer', ev.id + '/' + ev.dest, ev.state, ev.at_ms);
    kick();
  }, kick, ['transfer']);
  // Without transfer events (a server that has none), poll.
  let ticks = 0;
  setInterval(() => { ticks++; if (!Live.has('transfer') || ticks % 3 === 0) kick(); }, 5000);
  load();
}

// ---------------------------------------------------------------------------------------------
// Conferences: rooms, roster with link health, floor, roll call (点名), end; create (admins)
// ---------------------------------------------------------------------------------------------

function pageConferences() {
  const m = MAIN();
  const relay = h('div.relayinfo');
  const rooms = h('div.rooms');
  const canWrite = ME && ME.can_write;
  let first = true, lastJson = '', fast = false;
  const lastRoll = new Map(); // room → the latest roll call ID seen

  let create = null;
  if (ME && ME.is_admin) {
    const name = h('input', { name: 'room', required: true, maxlength: 64, placeholder: T('conf.room_ph') });
    const chair = h('input', { name: 'chair', maxlength: 64, placeholder: T('conf.chair_ph') });
    create = h('form#room-create.form.inline',
      h('label', h('span', T('conf.room')), name), h('label', h('span', T('conf.chair')), chair),
      h('div.actions', h('button.primary', { type: 'submit' }, T('conf.create'))));
    create.addEventListener('submit', async (e) => {
      e.preventDefault();
      try {
        await api('/api/admin/conference', { op: 'create', room: name.value.trim(), chair: chair.value.trim() || undefined });
        toast(T('conf.created', { room: name.value.trim() }), 'ok');
        name.value = chair.value = '';
        load();
      } catch (ex) { toastError(ex); }
    });
  }
  replace(m, pageHead(T('nav.conferences'), relay, h('span.stale', { hidden: true })), rooms,
    create ? section(T('conf.create_title'), create) : null, footer());

  const op = async (body, okMsg) => {
    try { await api('/api/admin/conference', body); if (okMsg) toast(okMsg, 'ok'); load(); } catch (e) { toastError(e); }
  };
  const healthCell = (mb) => {
    const hs = mb.health || {};
    const keys = Object.keys(hs);
    if (!keys.length) return h('td.muted', '—');
    return h('td.health', keys.map((k) => {
      const x = hs[k] || {};
      // What the viewer's player shows (video it plays): frames shown, freezes, frame age.
      const played = x.shown_pct != null;
      const bad = (x.groups_lost || 0) > 0 || (x.latency_ms || 0) > 800
        || (played && (x.shown_pct < 99 || (x.longest_freeze_ms || 0) > 1000 || (x.age_p99_ms || 0) > 1500));
      const shown = played ? [' · ' + T('conf.shown') + ' ' + x.shown_pct.toFixed(1) + ' %',
        ' · ' + T('conf.freezes') + ' ' + num(x.freezes) + ' (' + T('conf.longest') + ' ' + num(x.longest_freeze_ms) + ' ms)',
        ' · ' + T('conf.age') + ' ' + num(x.age_p99_ms) + ' ms'] : [];
      return h('div.hl' + (bad ? '.warn' : ''), { title: k + ' · ' + T('conf.frames') + ' ' + num(x.frames) },
        h('span.rend', x.rendition || '—'), ' ', fmtKbps(x.kbps), ' · ', num(x.latency_ms) + ' ms',
        ' · ' + T('conf.lost') + ' ' + num(x.groups_lost), ...shown, h('span.muted.small', ' ' + k));
    }));
  };
  const renderRoom = (c) => {
    const roster = c.roster || [];
    const rc = c.rollcall;
    let rid = rc ? rc.id : null;
    if (rid == null) for (const mb of roster) for (const p of mb.present || []) if (rid == null || p > rid) rid = p;
    if (rid != null) lastRoll.set(c.room, rid);
    rid = lastRoll.get(c.room);
    const answered = rid == null ? 0 : roster.filter((mb) => (mb.present || []).includes(rid)).length;
    const tools = [];
    if (canWrite) {
      tools.push(h('button.rollcall', { type: 'button', disabled: !!rc }, T('conf.rollcall')));
      if (c.floor) tools.push(h('button.floor-release', { type: 'button' }, T('conf.take_floor')));
      tools.push(h('button.end.danger', { type: 'button' }, T('conf.end')));
    }
    const rcLine = rc ? h('div.rcline.running', T('conf.rollcall_running'), ' · ', h('span.rc-left', { data: { deadline: String(rc.deadline_ms) } },
      T('conf.seconds_left', { n: Math.max(0, Math.ceil((rc.deadline_ms - Date.now()) / 1000)) })), ' · ',
      h('b', T('conf.answered', { n: answered, of: roster.length })))
      : rid != null ? h('div.rcline', T('conf.rollcall_last'), ' · ', h('b', T('conf.answered', { n: answered, of: roster.length })),
        answered < roster.length ? h('span.bad', ' · ' + T('conf.missing', { list: roster.filter((mb) => !(mb.present || []).includes(rid)).map((mb) => mb.site).join(', ') })) : null)
        : null;
    const el = h('div.room.panel', { data: { room: c.room } },
      h('div.room-head',
        h('h2', c.room),
        h('span.room-meta', T('conf.chair') + ': ', h('b', c.chair || '—'), ' · ', T('conf.floor') + ': ',
          c.floor ? h('b.floor-holder', c.floor) : h('span.muted', T('conf.floor_free')), ' · ', T('conf.participants_n', { n: roster.length }),
          ' · ', T('conf.tracks_n', { n: (c.tracks || []).length })),
        h('div.tools', tools)),
      rcLine,
      h('table.grid.roster',
        h('thead', h('tr', h('th', T('col.site')), h('th', T('conf.role')), h('th', T('conf.publishing')), h('th', T('conf.health')),
          h('th', T('conf.present')), canWrite ? h('th', T('conf.floor')) : null)),
        h('tbody', roster.length ? roster.map((mb) => {
          const has = rid != null && (mb.present || []).includes(rid);
          return h('tr' + (c.floor === mb.site ? '.has-floor' : ''), { data: { site: mb.site } },
            h('td', siteLink(mb.site), c.chair === mb.site ? h('span.tag', T('conf.chair')) : null),
            h('td', T('conf.role.' + (mb.role || 'participant'))),
            h('td', (mb.publishing || []).join(', ') || '—'),
            healthCell(mb),
            h('td', rid == null ? '—' : has ? h('span.ok', '✓ ' + T('conf.answered_yes')) : h('span' + (rc ? '.muted' : '.bad'), rc ? '… ' + T('conf.waiting') : '✗ ' + T('conf.answered_no'))),
            canWrite ? h('td', c.floor === mb.site ? h('span.speaking', '● ' + T('conf.speaking'))
              : h('button.floor', { type: 'button', data: { site: mb.site } }, T('conf.give_floor'))) : null);
        }) : emptyRow(canWrite ? 6 : 5, T('conf.empty_roster')))));
    el.addEventListener('click', (e) => {
      const b = e.target.closest('button');
      if (!b || b.disabled) return;
      if (b.classList.contains('rollcall')) op({ op: 'rollcall', room: c.room, seconds: 30 }, T('conf.rollcall_started'));
      else if (b.classList.contains('floor')) op({ op: 'floor', room: c.room, site: b.dataset.site || null });
      else if (b.classList.contains('floor-release')) op({ op: 'floor', room: c.room, site: null });
      else if (b.classList.contains('end')) { if (confirm(T('conf.end_confirm', { room: c.room }))) op({ op: 'end', room: c.room }, T('conf.ended', { room: c.room })); }
    });
    return el;
  };
  const load = async () => {
    try {
      const d = await api('/api/conferences');
      const js = JSON.stringify(d);
      setStale(false);
      if (js !== lastJson) {
        lastJson = js;
        relay.textContent = d.relay ? T('conf.relay', { name: d.relay.name || '', addr: d.relay.address || '' }) : '';
        const list = d.conferences || [];
        fast = list.some((c) => c.rollcall);
        replace(rooms, list.length ? list.map(renderRoom) : h('p.muted.panel', T('conf.none')));
      }
    } catch (e) {
      if (e.status === 404) { lastJson = ''; replace(rooms, h('div.errorbox', T('conf.disabled') + ': ' + errText(e))); }
      else { setStale(true, e); if (first) toastError(e); }
    }
    if (first) { first = false; markReady(); }
  };
  const kick = coalescer(load, 500);
  let n = 0;
  setInterval(() => { n++; if (fast || n % 3 === 0) kick(); }, 1000);
  setInterval(() => {
    for (const e of $$('.rc-left[data-deadline]', rooms)) e.textContent = T('conf.seconds_left', { n: Math.max(0, Math.ceil((Number(e.dataset.deadline) - Date.now()) / 1000)) });
  }, 1000);
  Live.start(['site'], (ev) => {
    if (ev.type === 'site' && rooms.querySelector('tr[data-site="' + CSS.escape(String(ev.site_id)) + '"]')) kick();
  }, kick);
  load();
}

// ---------------------------------------------------------------------------------------------
// Users (administrators) and the caller's API tokens
// ---------------------------------------------------------------------------------------------

const ROLES = ['admin', 'province', 'viewer', 'kiosk'];
function randomPassword() {
  const a = 'abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789';
  const b = new Uint32Array(16);
  crypto.getRandomValues(b);
  return Array.from(b, (x) => a[x % a.length]).join('');
}

function pageUsers() {
  const m = MAIN();
  if (!ME || !ME.is_admin) {
    replace(m, pageHead(T('nav.users')), h('div.errorbox', T('err.admins_only')), footer());
    markReady();
    return;
  }
  const tbody = h('tbody');
  const tokens = h('div.slot');
  let users = [];
  let first = true;

  const roleSel = (name, cur) => selectOf({ name }, ROLES.map((r) => [r, T('role.' + r)]), cur);
  const provSel = (name, cur) => selectOf({ name }, [['', '—']].concat(PROVINCES.map((c) => [c, c + ' ' + provName(c)])), cur || '');
  const pw = (name) => {
    const i = h('input', { name, type: 'text', minlength: 10, required: true, autocomplete: 'new-password', spellcheck: 'false' });
    return h('span.pwrow', i, h('button.ghost', { type: 'button', onclick: () => { i.value = randomPassword(); } }, T('users.generate')));
  };
  const uop = async (body, ok) => {
    try { await api('/api/admin/users', body); toast(ok, 'ok'); await load(); return true; } catch (e) { toastError(e); return false; }
  };

  const add = h('form#user-add.form.inline',
    h('label', h('span', T('users.name')), h('input', { name: 'name', required: true, maxlength: 64, autocomplete: 'off', pattern: '[A-Za-z0-9._\\-]+' })),
    h('label', h('span', T('users.role')), roleSel('role', 'viewer')),
    h('label.prov', h('span', T('col.province')), provSel('province', '')),
    h('label', h('span', T('users.password')), pw('password')),
    h('div.actions', h('button.primary', { type: 'submit' }, T('users.add'))),
    h('p.hint', T('users.add_hint')));
  const syncProv = (f) => { const p = f.querySelector('label.prov'); if (p) p.hidden = f.elements.role.value !== 'province'; };
  add.elements.role.addEventListener('change', () => syncProv(add));
  syncProv(add);
  add.addEventListener('submit', async (e) => {
    e.preventDefault();
    const f = add.elements;
    if (f.role.value === 'province' && !f.province.value) { toast(T('users.need_province'), 'error'); return; }
    if (f.password.value.length < 10) { toast(T('account.too_short'), 'error'); return; }
    const body = { op: 'add', name: f.name.value.trim(), role: f.role.value, password: f.password.value };
    if (f.role.value === 'province') body.province = f.province.value;
    if (await uop(body, T('users.added', { name: body.name, password: body.password }))) add.reset(), syncProv(add);
  });

  const tokenForm = h('form#token-create.form.inline',
    h('label', h('span', T('tokens.label')), h('input', { name: 'label', required: true, maxlength: 64, placeholder: T('tokens.label_ph') })),
    h('div.actions', h('button.primary', { type: 'submit' }, T('tokens.create'))));
  const tokenShown = h('div.slot');
  tokenForm.addEventListener('submit', async (e) => {
    e.preventDefault();
    try {
      const r = await api('/api/me/tokens', { label: tokenForm.elements.label.value.trim() });
      const code = h('code.token', r.token);
      replace(tokenShown, h('div.tokenbox', h('p', h('b', T('tokens.shown_once'))), code,
        h('button.ghost', { type: 'button', onclick: () => {
          const done = () => toast(T('tokens.copied'), 'ok');
          if (navigator.clipboard && window.isSecureContext) navigator.clipboard.writeText(r.token).then(done, () => selectText(code));
          else selectText(code);
        } }, T('tokens.copy')),
        h('button.ghost', { type: 'button', onclick: () => clear(tokenShown) }, T('common.close'))));
      tokenForm.reset();
      load();
    } catch (ex) { toastError(ex); }
  });

  replace(m, pageHead(T('nav.users')),
    section(T('users.list'), h('div.tablewrap', h('table#users.grid',
      h('thead', h('tr', h('th', T('users.name')), h('th', T('users.role')), h('th', T('col.province')), h('th', T('users.state')),
        h('th', T('users.created')), h('th', T('users.last_login')), h('th.num', T('users.tokens')), h('th', T('users.actions')))),
      tbody))),
    section(T('users.add_title'), add),
    section(T('tokens.title'), tokens, tokenForm, tokenShown),
    footer());

  const inlineRow = (tr, form) => {
    const nx = tr.nextElementSibling;
    if (nx && nx.classList.contains('edit-row')) nx.remove();
    const row = h('tr.edit-row', h('td', { colspan: 8 }, form));
    tr.after(row);
    const i = form.querySelector('input,select');
    if (i) i.focus();
    return row;
  };
  const render = () => {
    const frag = document.createDocumentFragment();
    for (const u of users) {
      const self = u.name === ME.user;
      const tr = h('tr' + (u.disabled ? '.disabled' : ''), { data: { user: u.name } },
        h('td', h('b', u.name), self ? h('span.tag', T('users.you')) : null),
        h('td', h('span.role.r-' + u.role, T('role.' + u.role))),
        h('td', u.province ? provName(u.province) + ' ' + u.province : '—'),
        h('td', u.disabled ? h('span.bad', T('users.disabled')) : h('span.ok', T('users.enabled'))),
        h('td', timeEl(u.created_ms)),
        h('td', u.last_login_ms ? timeEl(u.last_login_ms) : h('span.muted', T('users.never'))),
        h('td.num', String((u.tokens || []).length)),
        h('td.actions',
          h('button.ghost.act-role', { type: 'button' }, T('users.change_role')),
          h('button.ghost.act-passwd', { type: 'button' }, T('users.reset_password')),
          self ? null : u.disabled ? h('button.ghost.act-enable', { type: 'button' }, T('users.enable'))
            : h('button.ghost.danger.act-disable', { type: 'button' }, T('users.disable'))));
      tr.addEventListener('click', async (e) => {
        const b = e.target.closest('button');
        if (!b) return;
        if (b.classList.contains('act-role')) {
          const f = h('form.form.inline', h('label', h('span', T('users.role')), roleSel('role', u.role)),
            h('label.prov', h('span', T('col.province')), provSel('province', u.province)),
            h('div.actions', h('button.primary', { type: 'submit' }, T('common.save')), h('button.ghost', { type: 'button', onclick: () => row.remove() }, T('common.cancel'))));
          f.elements.role.addEventListener('change', () => syncProv(f));
          syncProv(f);
          const row = inlineRow(tr, f);
          f.addEventListener('submit', (ev) => {
            ev.preventDefault();
            const body = { op: 'role', name: u.name, role: f.elements.role.value };
            if (body.role === 'province') { if (!f.elements.province.value) { toast(T('users.need_province'), 'error'); return; } body.province = f.elements.province.value; }
            uop(body, T('users.role_changed', { name: u.name }));
          });
        } else if (b.classList.contains('act-passwd')) {
          const row2 = pw('password');
          const inp = row2.querySelector('input');
          inp.value = randomPassword();
          const f = h('form.form.inline', h('label', h('span', T('users.new_password')), row2),
            h('div.actions', h('button.primary', { type: 'submit' }, T('users.reset_password')), h('button.ghost', { type: 'button', onclick: () => row.remove() }, T('common.cancel'))),
            h('p.hint', T('users.reset_hint')));
          const row = inlineRow(tr, f);
          f.addEventListener('submit', (ev) => {
            ev.preventDefault();
            if (inp.value.length < 10) { toast(T('account.too_short'), 'error'); return; }
            uop({ op: 'passwd', name: u.name, password: inp.value }, T('users.password_reset', { name: u.name, password: inp.value }));
          });
        } else if (b.classList.contains('act-disable')) {
          if (confirm(T('users.disable_confirm', { name: u.name }))) uop({ op: 'disable', name: u.name }, T('users.disabled_ok', { name: u.name }));
        } else if (b.classList.contains('act-enable')) {
          uop({ op: 'enable', name: u.name }, T('users.enabled_ok', { name: u.name }));
        }
      });
      frag.appendChild(tr);
    }
    if (!users.length) frag.appendChild(emptyRow(8));
    clear(tbody).appendChild(frag);
    const mine = (users.find((u) => u.name === ME.user) || {}).tokens || [];
    replace(tokens, mine.length ? h('table#tokens.grid.small',
      h('thead', h('tr', h('th', T('tokens.label')), h('th', 'ID'), h('th', T('users.created')), h('th', T('tokens.last_used')), h('th', ''))),
      h('tbody', mine.map((t) => h('tr', { data: { token: t.id } }, h('td', t.label || '—'), h('td', h('code', t.id)), h('td', timeEl(t.created_ms)),
        h('td', t.last_used_ms ? timeEl(t.last_used_ms) : h('span.muted', T('users.never'))),
        h('td', h('button.ghost.danger.revoke-token', { type: 'button', onclick: async () => {
          if (!confirm(T('tokens.revoke_confirm', { label: t.label || t.id }))) return;
          try { await api('/api/me/tokens/revoke', { id: t.id }); toast(T('tokens.revoked'), 'ok'); load(); } catch (e) { toastError(e); }
        } }, T('tokens.revoke'))))))) : h('p.muted', T('tokens.none')));
  };
  const load = async () => {
    try {
      const d = await api('/api/admin/users');
      users = (d.users || []).slice().sort((a, b) => a.name.localeCompare(b.name));
      render();
    } catch (e) {
      toastError(e);
      if (first) replace(tbody, emptyRow(8, errText(e)));
    }
    if (first) { first = false; markReady(); }
  };
  load();
}
function selectText(el) {
  const r = document.createRange();
  r.selectNodeContents(el);
  const s = window.getSelection();
  s.removeAllRanges();
  s.addRange(r);
}

// ---------------------------------------------------------------------------------------------
// Audit log (administrators)
// ---------------------------------------------------------------------------------------------

function pageAudit() {
  const m = MAIN();
  if (!ME || !ME.is_admin) {
    replace(m, pageHead(T('nav.audit')), h('div.errorbox', T('err.admins_only')), footer());
    markReady();
    return;
  }
  const q0 = new URLSearchParams(location.search);
  const st = { user: (q0.get('user') || '').slice(0, 64), action: (q0.get('action') || '').slice(0, 64) };
  const fUser = h('input#fu-user', { type: 'search', placeholder: T('audit.user_ph'), value: st.user, autocomplete: 'off' });
  const fAction = h('input#fu-action', { type: 'search', placeholder: T('audit.action_ph'), value: st.action, autocomplete: 'off' });
  const tbody = h('tbody');
  const older = h('button.ghost', { type: 'button', hidden: true }, T('audit.older'));
  const shown = h('span.count-label');
  let next = null, n = 0, first = true, ctl = null;
  replace(m, pageHead(T('nav.audit'), shown),
    h('div.filters', fUser, fAction),
    h('div.tablewrap', h('table#audit.grid.small',
      h('thead', h('tr', h('th', T('col.time')), h('th', T('audit.user')), h('th', T('users.role')), h('th', T('audit.addr')),
        h('th', T('audit.action')), h('th', T('audit.target')), h('th', T('audit.outcome')), h('th', T('col.detail')))),
      tbody)),
    h('div.pager', older),
    footer());
  const row = (e) => {
    const ok = !e.outcome || e.outcome === 'ok';
    return h('tr' + (ok ? '' : '.failed'),
      h('td', timeEl(e.at_ms, 'full')), h('td', e.user || '—'), h('td', e.role ? T('role.' + e.role) : '—'), h('td', h('code', e.addr || '')),
      h('td', e.action || ''), h('td', e.target || ''), h('td', ok ? h('span.ok', T('audit.ok')) : h('span.bad', e.outcome)), h('td.detail', e.detail || ''));
  };
  const load = async (append) => {
    if (ctl) ctl.abort();
    const my = (ctl = new AbortController());
    const q = new URLSearchParams({ limit: '200' });
    if (st.user) q.set('user', st.user);
    if (st.action) q.set('action', st.action);
    if (append && next) q.set('before', next);
    try {
      const d = await api('/api/admin/audit?' + q, undefined, { signal: my.signal });
      if (my !== ctl) return;
      ctl = null;
      const frag = document.createDocumentFragment();
      for (const e of d.entries || []) frag.appendChild(row(e));
      if (!append) { clear(tbody); n = 0; }
      n += (d.entries || []).length;
      if (!n) frag.appendChild(emptyRow(8));
      tbody.appendChild(frag);
      next = d.next || null;
      older.hidden = !next;
      shown.textContent = T('audit.shown', { n });
    } catch (e) {
      if (isAbort(e)) return;
      toastError(e);
    }
    if (first) { first = false; markReady(); }
  };
  const change = () => {
    const q = new URLSearchParams();
    if (st.user) q.set('user', st.user);
    if (st.action) q.set('action', st.action);
    history.replaceState(null, '', location.pathname + (q.toString() ? '?' + q : ''));
    fixLangLinks();
    load(false);
  };
  fUser.addEventListener('input', debounce(() => { st.user = fUser.value.trim(); change(); }, 300));
  fAction.addEventListener('input', debounce(() => { st.action = fAction.value.trim(); change(); }, 300));
  older.addEventListener('click', () => load(true));
  load(false);
}

// ---------------------------------------------------------------------------------------------
// Backups: every job, its last run, the age of its newest backup at the partner against the RPO
// ---------------------------------------------------------------------------------------------

function backupRun(r) {
  if (!r) return h('span.muted', T('backups.never'));
  return h('span', h('span.state.s-' + (r.ok ? 'delivered' : 'failed'), T(r.ok ? 'backups.ok' : 'backups.failed')), ' ',
    timeEl(r.started_ms), r.error ? h('div.bad.small', r.error) : null);
}
function pageBackups() {
  const m = MAIN();
  const tbody = h('tbody');
  const totals = h('span.count-label');
  replace(m,
    pageHead(T('nav.backups'), totals, h('span.stale', { hidden: true })),
    section(null, h('p.muted', T('backups.about')),
      h('div.tablewrap', h('table#backups.grid',
        h('thead', h('tr', h('th', T('backups.job')), h('th', T('col.site')), h('th', T('backups.to')), h('th', T('backups.last')),
          h('th.num', T('backups.age')), h('th.num', T('backups.size')), h('th.num', T('backups.new')), h('th.num', T('backups.dedup')),
          h('th', T('backups.next')), h('th', T('backups.verify')), h('th', T('backups.drill')))),
        tbody))),
    footer());
  let first = true;
  const load = async () => {
    try {
      const data = await api('/api/backups');
      const jobs = data.jobs || [];
      const frag = document.createDocumentFragment();
      for (const j of jobs) {
        const age = j.age_s != null ? fmtDur(j.age_s) : '—';
        frag.appendChild(h('tr' + (j.overdue || (j.last_backup && !j.last_backup.ok) ? '.s-failed' : ''), { data: { job: j.job } },
          h('td', h('b', j.job), h('div.muted.small', j.schedule)),
          h('td', j.site === 'controller' ? T('backups.ministry') : siteLink(j.site)),
          h('td', j.to === 'controller' ? T('backups.ministry') : siteLink(j.to),
            j.at_partner === false ? h('div.muted.small', T('backups.sending')) : null),
          h('td', backupRun(j.last_backup)),
          h('td.num' + (j.overdue ? '.bad' : ''), age, h('div.muted.small', T('backups.rpo', { h: j.rpo_hours }))),
          h('td.num', fmtBytes(j.repo_bytes || 0), j.partner_bytes != null ? h('div.muted.small', T('backups.at_partner', { size: fmtBytes(j.partner_bytes) })) : null),
          h('td.num', fmtBytes(j.new_bytes || 0)),
          h('td.num', j.dedup_ratio != null ? j.dedup_ratio.toFixed(1) + '×' : '—'),
          h('td', j.next_run_ms ? timeEl(j.next_run_ms) : '—'),
          h('td', backupRun(j.last_verify),
            j.partner_check ? h('div.small', h('span.muted', T('backups.partner_check') + ' '), backupRun(j.partner_check)) : null),
          h('td', backupRun(j.last_drill))));
      }
      if (!jobs.length) frag.appendChild(h('tr', h('td.muted', { colspan: 11 }, T('backups.none'))));
      tbody.replaceChildren(frag);
      totals.textContent = T('backups.count', { n: jobs.length, bad: jobs.filter((j) => j.overdue || (j.last_backup && !j.last_backup.ok)).length });
      setStale(false);
    } catch (e) {
      setStale(true, e);
      toastError(e);
    }
    if (first) { first = false; markReady(); }
  };
  load();
  setInterval(load, 30000);
}

// ---------------------------------------------------------------------------------------------
// Start
// ---------------------------------------------------------------------------------------------

const PAGES = {
  login: pageLogin, overview: pageOverview, sites: pageSites, site: pageSite, alarms: pageAlarms,
  transfers: pageTransfers, backups: pageBackups, conferences: pageConferences, wall: pageWall, users: pageUsers, audit: pageAudit,
};
function start() {
  if (!document.getElementById('main')) return;
  initHeader();
  if (!ME && PAGE !== 'login') { toLogin(); return; }
  try {
    (PAGES[PAGE] || pageOverview)();
    // Pages without a live stream have no live indicator.
    if (!Live.es) for (const e of $$('.live-dot')) e.remove();
  } catch (e) {
    console.error(e);
    add(MAIN(), [errorBox(e)]);
    markReady();
  }
}
if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
else start();
})();
