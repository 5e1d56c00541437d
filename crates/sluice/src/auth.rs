//! Bearer tokens with per-stream write and read scopes.

use axum::http::HeaderMap;
use sluice_core::TokenConfig;

/// The configured tokens with their secrets resolved.
pub struct Auth {
    tokens: Vec<(String, TokenConfig)>,
}

/// Why a request may not proceed.
pub enum Denied {
    /// No token, or not one we know: 401.
    Unauthenticated(&'static str),
    /// A known token without the needed scope: 403.
    Forbidden(String),
}

impl Auth {
    pub fn new(tokens: &[TokenConfig]) -> anyhow::Result<Auth> {
        let mut out = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            let secret = t.secret().map_err(|e| anyhow::anyhow!("tokens.{i}: {e}"))?;
            out.push((secret, t.clone()));
        }
        Ok(Auth { tokens: out })
    }

    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// The token presented with the request; None when auth is off.
    pub fn token(&self, headers: &HeaderMap) -> Result<Option<&TokenConfig>, Denied> {
        if !self.enabled() {
            return Ok(None);
        }
        let value = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or(Denied::Unauthenticated("missing Authorization: Bearer <token>"))?;
        let presented = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or(Denied::Unauthenticated("Authorization must be Bearer <token>"))?
            .trim();
        self.tokens
            .iter()
            .find(|(secret, _)| constant_time_eq(secret.as_bytes(), presented.as_bytes()))
            .map(|(_, t)| Some(t))
            .ok_or(Denied::Unauthenticated("unknown token"))
    }

    pub fn check_write(&self, headers: &HeaderMap, stream: &str) -> Result<(), Denied> {
        match self.token(headers)? {
            Some(t) if !t.can_write(stream) => Err(Denied::Forbidden(format!("token may not write stream {stream:?}"))),
            _ => Ok(()),
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
