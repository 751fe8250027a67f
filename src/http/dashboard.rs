//! `/dashboard`: the operator's page, served from assets compiled into the binary, behind the
//! admin key. The key is entered once in a login form; the browser then holds a session cookie
//! (HttpOnly, SameSite=Strict) that [`super::admin::Admin`] also accepts on GET requests, so
//! the page reads the admin JSON API with it: [`overview`] (this replica's metrics) and
//! `/admin/usage` (the ledger). Without a session only the login form is served.

pub mod backends;
pub mod overview;
pub mod spend;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::time::Instant;

use crate::app::AppState;
use crate::auth::{sha256, AuthError};
use crate::error::ApiError;

const LOGIN_HTML: &str = include_str!("../../assets/dashboard/login.html");
const INDEX_HTML: &str = include_str!("../../assets/dashboard/index.html");
const APP_JS: &str = include_str!("../../assets/dashboard/app.js");
const APP_CSS: &str = include_str!("../../assets/dashboard/app.css");
const LOGIN_CSS: &str = include_str!("../../assets/dashboard/login.css");

/// Where the login page shows why a login failed (a fixed message, never what was typed).
const LOGIN_ERROR_SLOT: &str = "<!--login-error-->";

const SESSION_COOKIE: &str = "tollgate_session";
const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// An admin key is far shorter; a larger login body is refused before it is parsed.
const MAX_LOGIN_BODY_BYTES: usize = 4096;

/// No inline script or style, nothing from another origin, no framing: an injected tag can
/// neither run nor load anything.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// A dashboard login, kept under its token's SHA-256 (never the token itself).
pub struct Session {
    expires_at: Instant,
    /// The admin key's SHA-256 when the session began: changing the key ends every session.
    admin_key_sha256: [u8; 32],
}

impl Session {
    fn is_live(&self, now: Instant, admin_key_sha256: &[u8; 32]) -> bool {
        self.expires_at > now && self.admin_key_sha256 == *admin_key_sha256
    }
}

/// Whether the request carries the cookie of a live session begun with `admin_key_sha256`
/// (the current admin key's hash). The token is hashed before the lookup, as keys are.
pub(super) fn has_session(state: &AppState, headers: &HeaderMap, admin_key_sha256: &[u8; 32]) -> bool {
    let Some(token) = session_token(headers) else { return false };
    state
        .dashboard_sessions
        .get(&sha256(token.as_bytes()))
        .is_some_and(|session| session.is_live(Instant::now(), admin_key_sha256))
}

/// Whether the request has a session and the admin API is on.
fn signed_in(state: &AppState, headers: &HeaderMap) -> bool {
    state.snapshot.load().admin_key_sha256.is_some_and(|admin| has_session(state, headers, &admin))
}

/// The session cookie's value, from any `Cookie` header.
fn session_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(SESSION_COOKIE)?.strip_prefix('='))
        .filter(|token| !token.is_empty())
}

/// `GET /dashboard`: the dashboard with a session, the login form without one.
pub async fn page(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if signed_in(&state, &headers) {
        crate::http::RankedUsers::warm_up(&state);
        document(StatusCode::OK, "text/html; charset=utf-8", INDEX_HTML.to_owned())
    } else {
        login_page(StatusCode::OK, None)
    }
}

/// `POST /dashboard/login` (form field `key`): the admin key, checked as the bearer is (both
/// sides hashed), begins a session; anything else gets the form again, 401.
pub async fn login(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let Some(admin_key_sha256) = state.snapshot.load().admin_key_sha256 else {
        return login_page(StatusCode::FORBIDDEN, Some("The admin API is disabled: set server.admin_key_env."));
    };
    let presented = if body.len() <= MAX_LOGIN_BODY_BYTES { form_value(&body, "key") } else { None };
    if presented.is_none_or(|key| sha256(key.as_bytes()) != admin_key_sha256) {
        tracing::warn!("dashboard login refused: not the admin key");
        return login_page(StatusCode::UNAUTHORIZED, Some("That is not the admin key."));
    }
    let mut random = [0u8; 32];
    if let Err(e) = getrandom::getrandom(&mut random) {
        tracing::error!(error = %e, "no randomness for a dashboard session");
        return secured(ApiError::Internal.into_response());
    }
    let token = crate::config::hex(&random);
    let now = Instant::now();
    // Only the admin key adds sessions, so dropping the dead ones at each login bounds the map.
    state.dashboard_sessions.retain(|_, session| session.is_live(now, &admin_key_sha256));
    state
        .dashboard_sessions
        .insert(sha256(token.as_bytes()), Session { expires_at: now + SESSION_LIFETIME, admin_key_sha256 });
    // No `Secure`: the gateway serves plain HTTP (TLS, when there is any, ends in front of it),
    // and a browser would not send a `Secure` cookie back over http://. Add it if it ever
    // terminates TLS itself.
    // The users table's sorted pages are cut from an order that takes a while to build with
    // many users: start it now, while the page loads.
    crate::http::RankedUsers::warm_up(&state);
    let cookie =
        format!("{SESSION_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}", SESSION_LIFETIME.as_secs());
    to_dashboard(&cookie)
}

/// `POST /dashboard/logout`: ends the session and clears the cookie.
pub async fn logout(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Some(token) = session_token(&headers) {
        state.dashboard_sessions.remove(&sha256(token.as_bytes()));
    }
    to_dashboard(&format!("{SESSION_COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"))
}

/// `GET /dashboard/app.js` (with a session).
pub async fn script(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    asset(&state, &headers, "text/javascript; charset=utf-8", APP_JS)
}

/// `GET /dashboard/app.css` (with a session).
pub async fn stylesheet(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    asset(&state, &headers, "text/css; charset=utf-8", APP_CSS)
}

/// `GET /dashboard/login.css`: the login form's own style, the one asset served without a
/// session (the CSP allows no inline style, and it says nothing about the gateway).
pub async fn login_stylesheet() -> Response {
    document(StatusCode::OK, "text/css; charset=utf-8", LOGIN_CSS.to_owned())
}

fn asset(state: &AppState, headers: &HeaderMap, content_type: &'static str, text: &'static str) -> Response {
    if signed_in(state, headers) {
        document(StatusCode::OK, content_type, text.to_owned())
    } else {
        secured(ApiError::Auth(AuthError::Missing).into_response())
    }
}

fn login_page(status: StatusCode, error: Option<&'static str>) -> Response {
    let html = match error {
        Some(message) => {
            LOGIN_HTML.replace(LOGIN_ERROR_SLOT, &format!("<p class=\"error\" role=\"alert\">{message}</p>"))
        }
        None => LOGIN_HTML.to_owned(),
    };
    document(status, "text/html; charset=utf-8", html)
}

fn document(status: StatusCode, content_type: &'static str, body: String) -> Response {
    secured((status, [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))], body).into_response())
}

/// 303 to `/dashboard`, setting `cookie`: after a form post, so a reload does not post again.
fn to_dashboard(cookie: &str) -> Response {
    let Ok(cookie) = HeaderValue::from_str(cookie) else { return secured(ApiError::Internal.into_response()) };
    secured(
        (
            StatusCode::SEE_OTHER,
            [(header::LOCATION, HeaderValue::from_static("/dashboard")), (header::SET_COOKIE, cookie)],
        )
            .into_response(),
    )
}

/// The headers every dashboard answer carries: no caching of a page that shows spend, no
/// content-type guessing, no referrer leaving the page.
fn secured(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

/// The first value of `name` in an `application/x-www-form-urlencoded` body; `None` when it is
/// absent, badly escaped or not UTF-8.
fn form_value(body: &[u8], name: &str) -> Option<String> {
    body.split(|&b| b == b'&').find_map(|pair| {
        let (field, value) = match pair.iter().position(|&b| b == b'=') {
            Some(at) => (&pair[..at], &pair[at + 1..]),
            None => (pair, &[][..]),
        };
        if form_decode(field)? != name.as_bytes() {
            return None;
        }
        String::from_utf8(form_decode(value)?).ok()
    })
}

/// Form decoding: `+` is a space, `%XX` a byte.
fn form_decode(text: &[u8]) -> Option<Vec<u8>> {
    let hex_digit = |b: u8| char::from(b).to_digit(16).and_then(|d| u8::try_from(d).ok());
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.iter();
    while let Some(&b) = bytes.next() {
        out.push(match b {
            b'+' => b' ',
            b'%' => (hex_digit(*bytes.next()?)? << 4) | hex_digit(*bytes.next()?)?,
            other => other,
        });
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_form_value_is_decoded_and_other_fields_are_ignored() {
        assert_eq!(form_value(b"other=1&key=a%2Bb+c%3D", "key").as_deref(), Some("a+b c="));
        assert_eq!(form_value(b"key=", "key").as_deref(), Some(""));
        assert_eq!(form_value(b"keyx=1", "key"), None);
        assert_eq!(form_value(b"key=%zz", "key"), None, "a bad escape is no key");
        assert_eq!(form_value(b"key=%4", "key"), None);
        assert_eq!(form_value(b"key=%ff", "key"), None, "not UTF-8");
    }

    #[test]
    fn the_session_token_is_read_among_other_cookies() {
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, HeaderValue::from_static("a=1; tollgate_sessionx=no"));
        headers.append(header::COOKIE, HeaderValue::from_static("b=2;tollgate_session=abc ; c=3"));
        assert_eq!(session_token(&headers), Some("abc"));
        headers.clear();
        headers.append(header::COOKIE, HeaderValue::from_static("tollgate_session="));
        assert_eq!(session_token(&headers), None);
    }

    #[test]
    fn a_session_ends_when_it_expires_or_the_admin_key_changes() {
        let now = Instant::now();
        let session = Session { expires_at: now + SESSION_LIFETIME, admin_key_sha256: sha256(b"old") };
        assert!(session.is_live(now, &sha256(b"old")));
        assert!(!session.is_live(now, &sha256(b"new")), "a new admin key ends it");
        assert!(!session.is_live(now + SESSION_LIFETIME, &sha256(b"old")), "12 hours end it");
    }

    #[test]
    fn every_page_and_asset_is_served_without_inline_script_or_style() {
        for text in [LOGIN_HTML, INDEX_HTML] {
            assert!(!text.contains("<style") && !text.contains(" style="), "{text}");
            let handler =
                |rest: &str| rest.split_once('=').is_some_and(|(name, _)| name.chars().all(|c| c.is_ascii_lowercase()));
            assert!(!text.split(" on").skip(1).any(handler), "no inline event handler");
            assert!(text.matches("<script").count() == text.matches("<script src=").count());
        }
        assert!(LOGIN_HTML.contains(LOGIN_ERROR_SLOT));
    }
}
